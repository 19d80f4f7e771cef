"""The modules that came after MS-SAR (SPEC.md §7): ECA, CBAM, Gather-Excite, Coordinate
Attention and Global Context.

Oracles: parameter counts written from each paper at mssar's widths (C' = max(1, C // r)), the
papers' equations recomputed with plain tensor operations on the modules' weights, structural
properties of the gates (GE's piecewise-constant cells and overlapping windows, Coordinate
Attention's row-times-column gate, GC's context shared by every position), mssar's SE for GE
with a global extent, and the plain composition for the BN-recompute path of the blocks.
"""

from __future__ import annotations

import copy
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mssar_cli.errors import ModelError
from mssar_cli.models import create_model
from mssar_cli.models.bn_recompute import recalibrate_bn_output
from mssar_cli.models.cifar_resnet import CifarResNet
from mssar_cli.models.densenet import DenseLayer
from mssar_cli.recalibration import zoo
from mssar_cli.recalibration.gather_excite import GatherExcite
from mssar_cli.recalibration.se import SqueezeExcitation
from mssar_cli.recalibration.zoo import (
    ConvolutionalBlockAttention,
    CoordinateAttention,
    EfficientChannelAttention,
    GlobalContextBlock,
    eca_kernel_size,
)

CLASSES = {
    "eca": EfficientChannelAttention,
    "cbam": ConvolutionalBlockAttention,
    "ge": GatherExcite,
    "coord": CoordinateAttention,
    "gc": GlobalContextBlock,
}
# (id, registry name, options): the defaults, and the other forms a test should see
VARIANTS = [
    ("eca", "eca", {}),
    ("cbam", "cbam", {"reduction": 3}),
    ("ge", "ge", {"reduction": 3}),
    ("ge-theta", "ge", {"mlp": False}),
    ("ge-theta-minus", "ge", {"parametric": False, "mlp": False}),
    ("ge-theta-minus-mlp", "ge", {"parametric": False, "reduction": 3}),
    ("coord", "coord", {"reduction": 3}),
    ("gc", "gc", {"reduction": 3}),
    ("gc-scale", "gc", {"reduction": 3, "fusion": "scale"}),
]
VARIANT_IDS = [v[0] for v in VARIANTS]
SIZES = [(32, 32), (16, 16), (8, 8), (7, 7), (2, 2)]
PLAIN_RESNET20 = 272_474


def build(name, channels=16, source_channels=None, **options):
    return CLASSES[name](channels, source_channels, **options)


def hidden(channels, reduction):
    """mssar's width rule (SPEC.md §1) for one scale: floor(D / reduction), at least 1."""
    return max(1, int(channels // reduction))


def paper_params(name, c, options) -> int:
    """Each paper's parameter count at mssar's widths (the modules' docstrings)."""
    r = options.get("reduction")
    if name == "eca":  # one 1-D kernel of k weights, no bias (Eq. 12)
        t = int(abs((math.log2(c) + 1) / 2))
        return t if t % 2 else t + 1
    if name == "cbam":  # shared MLP with biases; 7x7 conv on [mean, max], no bias, BN of 1 channel
        h = hidden(c, r or 16)
        return (c * h + h) + (h * c + c) + 2 * 7 * 7 + 2
    if name == "ge":
        e = options.get("extent", 8)
        count = 0
        if options.get("parametric", True):  # log2(e) depthwise 3x3 convs (9C) + BN (2C) each
            count += int(math.log2(e)) * (9 * c + 2 * c)
        if options.get("mlp", True):  # SE's excitation: C -> C' -> C with biases
            h = hidden(c, r or 16)
            count += (c * h + h) + (h * c + c)
        return count
    if name == "coord":  # shared conv C -> C' (no bias) + BN(C'); two C' -> C convs with biases
        h = hidden(c, r or 32)
        return c * h + 2 * h + 2 * (h * c + c)
    if name == "gc":  # attention conv C -> 1 (no bias); C -> C' + LN(C') + C' -> C, biases
        h = hidden(c, r or 16)
        return c + (c * h + h) + 2 * h + (h * c + c)
    raise AssertionError(name)


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter random (GC's zero-initialised last conv too), BN statistics random."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        for bn in (m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
            bn.weight.copy_(0.5 + torch.rand(bn.weight.shape, generator=gen))
            bn.running_mean.copy_(0.2 * torch.randn(bn.running_mean.shape, generator=gen))
            bn.running_var.copy_(0.5 + torch.rand(bn.running_var.shape, generator=gen))
    return module


def away_from_zero(shape, seed=0, dtype=torch.float64):
    """Inputs with |x| >= 0.5, so that module(x) / x is the gate."""
    gen = torch.Generator().manual_seed(seed)
    sign = torch.randint(0, 2, shape, generator=gen).to(dtype) * 2 - 1
    return sign * (0.5 + torch.rand(shape, generator=gen, dtype=dtype))


def bn_eval(t, bn):
    shape = (1, -1, 1, 1)
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return (t - bn.running_mean.view(shape)) * scale.view(shape) + bn.bias.view(shape)


def one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


# --- shape, modes, sizes and batches ----------------------------------------------------------


def refuses_single_value(name, options, size, batch, training) -> bool:
    """GE's parametric gather in training: its BN sees one value per channel when one image's
    map is gathered into one cell (nn.BatchNorm's ValueError, as MS-SAR's)."""
    e = options.get("extent", 8)
    cells = math.ceil(size[0] / e) * math.ceil(size[1] / e)
    return (
        name == "ge" and options.get("parametric", True) and training and batch == 1 and cells == 1
    )


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_output_shape_in_train_and_eval_every_size_and_batch(variant):
    _, name, options = variant
    module = randomize(build(name, 16, **options))
    for size in SIZES:
        for batch in (1, 2):
            for training in (True, False):
                module.train(training)
                x = torch.randn(batch, 16, *size)
                if refuses_single_value(name, options, size, batch, training):
                    with pytest.raises(ValueError, match="more than 1 value per channel"):
                        module(x)
                    continue
                out = module(x)
                assert out.shape == x.shape, (size, batch, training)
                assert torch.isfinite(out).all()


# --- parameters -------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("channels", [12, 16, 32, 40, 64, 256])
def test_parameter_count_is_the_papers_at_mssar_widths(variant, channels):
    _, name, options = variant
    assert count(build(name, channels, **options)) == paper_params(name, channels, options)


def test_parameter_counts_by_hand():
    """C = 16, reduction 3: C' = 5 (timm's defaults would round it up to 8)."""
    assert count(build("eca", 16)) == 3
    assert count(build("cbam", 16, reduction=3)) == 2 * 16 * 5 + 5 + 16 + 98 + 2 == 281
    assert count(build("ge", 16, reduction=3)) == 3 * 11 * 16 + 2 * 16 * 5 + 5 + 16 == 709
    assert count(build("coord", 16, reduction=3)) == 3 * 16 * 5 + 2 * 5 + 2 * 16 == 282
    assert count(build("gc", 16, reduction=3)) == 2 * 16 * 5 + 3 * 5 + 2 * 16 == 207
    for name in ("cbam", "ge", "coord", "gc"):
        assert build(name, 16, reduction=3).hidden_channels == 5
        assert build(name, 16, reduction=16).hidden_channels == 1  # at least 1


def test_option_defaults_are_the_papers():
    assert EfficientChannelAttention.option_defaults() == {
        "gamma": 2,
        "beta": 1,
        "kernel_size": None,
    }
    assert ConvolutionalBlockAttention.option_defaults() == {
        "reduction": 16,
        "spatial_kernel_size": 7,
    }
    assert GatherExcite.option_defaults() == {
        "extent": 8,
        "parametric": True,
        "mlp": True,
        "reduction": 16,
    }
    assert CoordinateAttention.option_defaults() == {"reduction": 32}
    assert GlobalContextBlock.option_defaults() == {"reduction": 16, "fusion": "add"}


# --- the gates are the papers' ----------------------------------------------------------------


def test_eca_kernel_size_is_adaptive():
    """k = |log2(C)/2 + 1/2|_odd (ECA-Net Eq. 12)."""
    table = {16: 3, 32: 3, 64: 3, 12: 3, 40: 3, 256: 5, 512: 5, 1024: 5, 2048: 7, 4: 1}
    for channels, k in table.items():
        assert eca_kernel_size(channels) == k, channels
        module = build("eca", channels)
        assert module.kernel_size == k
        assert module.body.conv.weight.shape == (1, 1, k)
    assert build("eca", 16, kernel_size=5).body.conv.weight.shape == (1, 1, 5)
    assert build("eca", 2048, gamma=3, beta=2).kernel_size == 5  # int((11 + 2) / 3) = 4 -> 5


def test_eca_gate_is_a_1d_conv_across_channels_of_the_mean():
    module = randomize(build("eca", 64, kernel_size=5)).double().eval()
    x = torch.randn(2, 64, 5, 6, dtype=torch.float64)
    w = module.body.conv.weight.view(-1)
    y = x.mean((2, 3))
    z = torch.zeros_like(y)
    for c in range(64):
        for j in range(5):
            if 0 <= c + j - 2 < 64:
                z[:, c] += w[j] * y[:, c + j - 2]
    want = x * torch.sigmoid(z)[:, :, None, None]
    torch.testing.assert_close(module(x), want, rtol=1e-12, atol=1e-12)


def test_cbam_is_a_channel_gate_then_a_7x7_spatial_gate_on_mean_and_max():
    module = randomize(build("cbam", 16, reduction=3)).double().eval()
    x = torch.randn(2, 16, 9, 11, dtype=torch.float64)
    channel, spatial = module.body.channel, module.body.spatial

    def mlp(v):
        w0, b0 = channel.fc1.weight.flatten(1), channel.fc1.bias
        w1, b1 = channel.fc2.weight.flatten(1), channel.fc2.bias
        return F.relu(v @ w0.t() + b0) @ w1.t() + b1

    mc = torch.sigmoid(mlp(x.mean((2, 3))) + mlp(x.amax((2, 3))))  # Eq. 2
    refined = x * mc[:, :, None, None]
    pooled = torch.cat([refined.mean(1, keepdim=True), refined.amax(1, keepdim=True)], 1)
    weight = spatial.conv.conv.weight
    assert weight.shape == (1, 2, 7, 7) and spatial.conv.conv.bias is None
    ms = torch.sigmoid(bn_eval(F.conv2d(pooled, weight, padding=3), spatial.conv.bn))  # Eq. 3
    torch.testing.assert_close(module(x), refined * ms, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("size", SIZES + [(5, 9)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_ge_over_the_whole_map_without_parameters_is_x_times_sigmoid_of_the_mean(size):
    """SPEC.md §7: SE without its MLP, whether the extent is 'global' or covers the map."""
    x = torch.randn(2, 16, *size, dtype=torch.float64)
    want = x * torch.sigmoid(x.mean((2, 3), keepdim=True))
    for extent in ("global", 32):
        module = build("ge", 16, extent=extent, parametric=False, mlp=False)
        assert count(module) == 0
        torch.testing.assert_close(module(x), want, rtol=1e-12, atol=1e-12)


def test_ge_global_without_parametric_gather_is_se():
    torch.manual_seed(0)
    ge = build("ge", 32, extent="global", parametric=False, reduction=3).double()
    se = SqueezeExcitation(32, reduction=3).double()
    mlp = ge.body.mlp
    with torch.no_grad():
        for mine, theirs in ((mlp[0], se.fc1), (mlp[2], se.fc2)):
            theirs.weight.copy_(mine.weight)
            theirs.bias.copy_(mine.bias)
    assert count(ge) == count(se)
    x = torch.randn(2, 32, 7, 7, dtype=torch.float64)
    torch.testing.assert_close(ge(x), se(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("options", [{}, {"mlp": False}, {"parametric": False, "mlp": False}])
def test_ge_gate_is_constant_on_each_gathered_cell(options):
    """Extent 8 on 32 x 32: a 4 x 4 grid of cells of 8 x 8 positions, nearest interpolation."""
    module = randomize(build("ge", 16, reduction=3, **options)).double().eval()
    x = away_from_zero((2, 16, 32, 32))
    gate = module(x) / x
    cells = gate.view(2, 16, 4, 8, 4, 8)
    torch.testing.assert_close(cells, cells[:, :, :, :1, :, :1].expand_as(cells))
    # the cells differ (a channel that a ReLU of the random gather zeroes may be constant)
    assert (cells[:, :, :, 0, :, 0].flatten(2).std(-1) > 1e-6).double().mean() > 0.75


@pytest.mark.parametrize("parametric", [True, False], ids=["theta", "theta-minus"])
def test_ge_windows_overlap(parametric):
    """Extent 2 on 8 x 8: cell j gathers rows and columns 2j-1..2j+1, so one input at (3, 3)
    changes cells 1 and 2 along each axis (gate rows and columns 2-5), and only those."""
    module = randomize(build("ge", 16, extent=2, parametric=parametric, reduction=3))
    module = module.double().eval()
    x = away_from_zero((1, 16, 8, 8))
    moved = x.clone()
    moved[:, :, 3, 3] += 3.0
    changed = (module(moved) / moved - module(x) / x).abs().amax((0, 1)) > 1e-12
    want = torch.zeros(8, 8, dtype=torch.bool)
    want[2:6, 2:6] = True
    assert torch.equal(changed, want)


def test_coordinate_attention_is_the_papers_row_times_column_gate():
    module = randomize(build("coord", 16, reduction=3)).double().eval()
    body = module.body
    x = away_from_zero((2, 16, 5, 7))
    h = x.shape[2]
    z = torch.cat([x.mean(3), x.mean(2)], 2)  # (N, C, H + W): z^h then z^w
    f = F.conv1d(z, body.conv1.weight.flatten(1).unsqueeze(-1))  # F1, no bias
    bn = body.bn1
    f = (f - bn.running_mean[:, None]) / torch.sqrt(bn.running_var[:, None] + bn.eps)
    f = F.hardswish(f * bn.weight[:, None] + bn.bias[:, None])  # Eq. 4
    gh = torch.sigmoid(torch.einsum("oc,nci->noi", body.conv_h.weight.flatten(1), f[:, :, :h]))
    gw = torch.sigmoid(torch.einsum("oc,nci->noi", body.conv_w.weight.flatten(1), f[:, :, h:]))
    gh = torch.sigmoid(torch.logit(gh) + body.conv_h.bias[:, None])  # Eq. 5 with its bias
    gw = torch.sigmoid(torch.logit(gw) + body.conv_w.bias[:, None])  # Eq. 6
    want = x * gh[:, :, :, None] * gw[:, :, None, :]  # Eq. 7
    torch.testing.assert_close(module(x), want, rtol=1e-10, atol=1e-10)
    gate = module(x) / x  # a product of a row gate and a column gate: rank one per channel
    outer = gate[:, :, :, :1] * gate[:, :, :1, :] / gate[:, :, :1, :1]
    torch.testing.assert_close(gate, outer, rtol=1e-10, atol=1e-10)
    assert gate.std(2).min() > 1e-6 and gate.std(3).min() > 1e-6  # varies along both axes


@pytest.mark.parametrize("fusion", ["add", "scale"])
def test_global_context_adds_one_attention_pooled_context_to_every_position(fusion):
    module = randomize(build("gc", 16, reduction=3, fusion=fusion)).double().eval()
    body = module.body
    mlp = body.mlp_add if fusion == "add" else body.mlp_scale
    x = away_from_zero((2, 16, 6, 5))
    logits = torch.einsum("c,ncp->np", body.conv_attn.weight.flatten(), x.flatten(2))
    context = torch.einsum("np,ncp->nc", torch.softmax(logits, -1), x.flatten(2))
    t = context @ mlp.fc1.weight.flatten(1).t() + mlp.fc1.bias
    t = F.layer_norm(t, t.shape[-1:], mlp.norm.weight, mlp.norm.bias, mlp.norm.eps)
    t = F.relu(t) @ mlp.fc2.weight.flatten(1).t() + mlp.fc2.bias
    t = t[:, :, None, None]
    want = x + t if fusion == "add" else x * torch.sigmoid(t)
    out = module(x)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    if fusion == "add":  # the same vector at every position
        delta = (out - x).flatten(2)
        torch.testing.assert_close(delta, delta[:, :, :1].expand_as(delta))


@pytest.mark.parametrize("network", ["resnet20", "densenet100", "resnet18"])
def test_global_context_starts_as_the_identity_in_every_network(network):
    """The networks' He-normal pass over every convolution must not undo GC's zero last conv."""
    model = create_model(network, recalibration="gc")
    blocks = [m for m in model.modules() if type(m).__name__ == "GlobalContextBlock"]
    assert blocks and all(not b.body.mlp_add.fc2.weight.any() for b in blocks)
    assert all(b.body.conv_attn.weight.any() for b in blocks)


def test_global_context_starts_as_the_identity():
    """With addition the last conv's weight starts at zero: out = x + its bias."""
    module = build("gc", 16, reduction=3).double()
    x = torch.randn(2, 16, 4, 4, dtype=torch.float64)
    bias = module.body.mlp_add.fc2.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(module(x), x + bias)


# --- gradients and the networks ---------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_gradients_reach_every_parameter(variant):
    _, name, options = variant
    module = randomize(build(name, 16, **options)).double().train()
    x = torch.randn(2, 16, 8, 8, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(x.shape, dtype=x.dtype)
    (module(x) * upstream).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for pname, p in module.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 1e-8, pname


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_bn_recompute_path_matches_the_plain_composition(variant):
    """The residual block rebuilds the BN output the module saves (bn_recompute): same outputs
    and gradients as module(bn(pre))."""
    _, name, options = variant
    torch.manual_seed(3)
    first = randomize(build(name, 16, **options)).double().train()
    bn = randomize(nn.BatchNorm2d(16)).double().train()
    second, bn2 = copy.deepcopy(first), copy.deepcopy(bn)
    pre = torch.randn(2, 16, 8, 8, dtype=torch.float64, requires_grad=True)
    pre2 = pre.detach().clone().requires_grad_()
    upstream = torch.randn(pre.shape, dtype=pre.dtype)
    out = recalibrate_bn_output(bn, pre, first)
    want = second(bn2(pre2))
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    (out * upstream).sum().backward()
    (want * upstream).sum().backward()
    torch.testing.assert_close(pre.grad, pre2.grad, rtol=1e-9, atol=1e-9)
    for (pname, p), q in zip(first.named_parameters(), second.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-9, msg=pname)


def resnet_factory(name):
    options = {} if name == "eca" else {"reduction": 3}
    return lambda channels, source_channels=None: CLASSES[name](
        channels, source_channels, **options
    )


def test_plain_resnet20_parameters():
    assert count(CifarResNet(20, 10, None)) == PLAIN_RESNET20


@pytest.mark.parametrize("name", list(CLASSES))
def test_in_cifar_resnet20(name):
    """Nine blocks, three at each of 16, 32, 64 channels, each with a module (reduction 3)."""
    torch.manual_seed(0)
    model = CifarResNet(20, 10, resnet_factory(name)).train()
    options = {} if name == "eca" else {"reduction": 3}
    added = 3 * sum(paper_params(name, c, options) for c in (16, 32, 64))
    assert count(model) == PLAIN_RESNET20 + added
    x = torch.randn(2, 3, 32, 32)
    loss = F.cross_entropy(model(x), torch.tensor([1, 7]))
    loss.backward()
    assert torch.isfinite(loss)
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, 10)


@pytest.mark.parametrize("name", list(CLASSES))
def test_densenet_layers_single_stage_only(name):
    factory = resnet_factory(name)
    layer = DenseLayer(24, 12, "single", factory).train()
    out = layer(torch.randn(2, 24, 8, 8))
    assert out.shape == (2, 12, 8, 8)
    with pytest.raises(ModelError) as error:
        DenseLayer(24, 12, "multi", factory)
    assert "single-stage" in one_line(error)


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CLASSES))
def test_a_different_source_is_refused(name):
    module = build(name, 16, source_channels=16)  # the same width is the single-stage case
    x = torch.randn(2, 16, 8, 8)
    torch.testing.assert_close(module(x, x), module(x))
    with pytest.raises(ModelError) as error:
        build(name, 12, source_channels=40)
    message = one_line(error)
    assert repr(name) in message and "single-stage" in message
    with pytest.raises(ModelError) as error:
        module(x, x.clone())
    assert repr(name) in one_line(error)


@pytest.mark.parametrize("name", list(CLASSES))
def test_unknown_options_are_refused(name):
    with pytest.raises(ModelError) as error:
        build(name, 16, scales=(1, 2))
    message = one_line(error)
    assert repr(name) in message and "'scales'" in message


BAD_OPTIONS = [
    ("eca", {"gamma": 0}),
    ("eca", {"beta": "one"}),
    ("eca", {"kernel_size": 4}),
    ("eca", {"reduction": 3}),
    ("cbam", {"reduction": 0}),
    ("cbam", {"spatial_kernel_size": 6}),
    ("ge", {"extent": 3}),
    ("ge", {"extent": 1}),
    ("ge", {"extent": "whole"}),
    ("ge", {"extent": "global"}),  # parametric by default: needs a fixed map size
    ("ge", {"parametric": "yes"}),
    ("ge", {"mlp": 1}),
    ("coord", {"reduction": -1}),
    ("gc", {"fusion": "multiply"}),
    ("gc", {"reduction": float("nan")}),
]


@pytest.mark.parametrize("name, options", BAD_OPTIONS, ids=[str(o) for o in BAD_OPTIONS])
def test_impossible_values_are_refused(name, options):
    with pytest.raises(ModelError) as error:
        build(name, 16, **options)
    message = one_line(error)
    assert name in message


def test_a_type_error_of_the_wrapped_constructor_is_a_model_error(monkeypatch):
    def refuses(module, cls):
        def constructor(*args, **kwargs):
            raise TypeError("CbamModule() got an unexpected keyword argument\nsecond line")

        return constructor

    monkeypatch.setattr(zoo, "timm_layer", refuses)
    with pytest.raises(ModelError) as error:
        build("cbam", 16)
    assert "'cbam'" in one_line(error)


def test_missing_timm_is_a_model_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm.layers.cbam", None)
    with pytest.raises(ModelError) as error:
        build("cbam", 16)
    assert zoo.TIMM_REQUIREMENT in one_line(error)
    assert count(build("ge", 16)) > 0  # Gather-Excite needs no timm

"""Where the modules sit and what they cost (SPEC.md §1-2, paper Table 2): one module per
residual block or dense layer, after the residual branch's last BN or on a dense layer's new maps,
with the widths of SPEC.md §1; closed-form parameter counts (MS-SAR, DenseNet-BC) and the paper's
cost accounting of ResNet-20.

Oracles: closed-form parameter counts (MS-SAR, SE, DenseNet-BC) and hand-counted convolution MACs;
the structure is read off networks built on the meta device.
"""

from __future__ import annotations

import pytest
import torch
from helpers import (
    CIFAR_RESNETS,
    DENSENETS,
    IMAGENET,
    NUM_CLASSES,
    UNITS,
    any_recalibration,
    build_meta,
    n_params,
    recalibration_modules,
)
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from mssar_cli import complexity
from mssar_cli.models import MODELS, create_model, model_spec
from mssar_cli.models.blocks import (
    RecalibratedBasicBlock,
    RecalibratedBottleneck,
    with_recalibration,
)
from mssar_cli.models.densenet import DenseLayer
from mssar_cli.recalibration.mssar import MSSAR
from mssar_cli.recalibration.se import SqueezeExcitation
from mssar_cli.recalibration.zoo import eca_kernel_size

pytestmark = pytest.mark.usefixtures("one_thread")

RESNET50_WIDTHS = [256] * 3 + [512] * 4 + [1024] * 6 + [2048] * 3  # each block's output


# --- DenseNet-BC parameter counts (closed form) -------------------------------------------------


def densenet_params(depth: int, recalibration: str, stage: str, num_classes: int) -> int:
    """DenseNet-BC (k = 12 / 40, compression 0.5) counted by hand, plus one module per layer:
    MS-SAR with L = 3 and D' = k // 3 (reduction 1), SE with hidden width k (reduction 1)."""
    k = {100: 12, 190: 40}[depth]
    n = (depth - 4) // 6
    channels = 2 * k
    total = 3 * channels * 9  # stem
    for block in range(3):
        for i in range(n):
            c = channels + i * k
            total += 2 * c + c * 4 * k + 2 * 4 * k + 4 * k * k * 9
            source = c if stage == "multi" else k
            if recalibration == "mssar":
                hidden = k // 3
                total += 3 * (source * hidden + 2 * hidden + hidden * k + k)
            elif recalibration == "se":
                total += source * k + k + k * k + k
        channels += n * k
        if block < 2:
            total += 2 * channels + channels * (channels // 2)
            channels //= 2
    return total + 2 * channels + channels * num_classes + num_classes


@pytest.mark.parametrize(
    "recalibration, stage",
    [("none", "multi"), ("se", "single"), ("se", "multi"), ("mssar", "single"), ("mssar", "multi")],
)
@pytest.mark.parametrize("name", DENSENETS)
def test_densenet_parameter_count(name, recalibration, stage):
    options = {} if recalibration == "none" else {"stage": stage}
    model = build_meta(name, recalibration, **options)
    depth = model_spec(name).depth
    assert n_params(model) == densenet_params(depth, recalibration, stage, NUM_CLASSES)


def test_densenet_baseline_sizes_match_the_paper_family():
    # Huang et al.: DenseNet-BC k=12 depth 100 has 0.8 M parameters, k=40 depth 190 25.6 M.
    assert round(n_params(build_meta("densenet100")) / 1e6, 2) == 0.77
    assert round(n_params(build_meta("densenet190")) / 1e6, 1) == 25.6


# --- where the modules are ----------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_plain_networks_have_no_recalibration(name):
    assert any_recalibration(build_meta(name)) == []


@pytest.mark.parametrize("recalibration", ["se", "mssar"])
@pytest.mark.parametrize("name", CIFAR_RESNETS + IMAGENET)
def test_one_module_per_residual_block(name, recalibration):
    model = build_meta(name, recalibration)
    other = "se" if recalibration == "mssar" else "mssar"
    assert len(recalibration_modules(model, recalibration)) == UNITS[name]
    assert recalibration_modules(model, other) == []
    blocks = [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))]
    assert len(blocks) == UNITS[name]
    for block in blocks:
        last_bn = block.bn3 if isinstance(block, Bottleneck) else block.bn2
        module = block.recalibration
        assert isinstance(module, SqueezeExcitation if recalibration == "se" else MSSAR)
        assert module.channels == last_bn.num_features
        assert module.source_channels == last_bn.num_features


@pytest.mark.parametrize("stage", ["single", "multi"])
@pytest.mark.parametrize("recalibration", ["se", "mssar"])
@pytest.mark.parametrize("name", DENSENETS)
def test_one_module_per_dense_layer(name, recalibration, stage):
    model = build_meta(name, recalibration, stage=stage)
    k = {"densenet100": 12, "densenet190": 40}[name]
    layers = [m for m in model.modules() if isinstance(m, DenseLayer)]
    assert len(layers) == UNITS[name]
    assert len(recalibration_modules(model, recalibration)) == UNITS[name]
    for layer in layers:
        module = layer.recalibration
        assert module.channels == k
        expected_source = layer.norm1.num_features if stage == "multi" else k
        assert module.source_channels == expected_source
    # the multi-stage source grows with the layer's input; single-stage stays k
    sources = {layer.recalibration.source_channels for layer in layers}
    assert (len(sources) > 1) == (stage == "multi")


class Spy(nn.Module):
    """A stand-in recalibration that records what it is given and doubles ``x``."""

    def __init__(self, channels: int, source_channels: int | None = None) -> None:
        super().__init__()
        self.channels, self.source_channels = channels, source_channels
        self.seen: list[tuple[torch.Tensor, torch.Tensor | None]] = []

    def forward(self, x: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
        self.seen.append((x, source))
        return 2 * x


@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
def test_module_sits_after_the_last_bn_before_the_addition(kind):
    """SPEC.md §2: on the residual branch after its last BN, before the shortcut is added."""
    torch.manual_seed(0)
    base = RecalibratedBasicBlock if kind == "basic" else RecalibratedBottleneck
    inplanes, planes = (8, 8) if kind == "basic" else (16, 4)  # bottleneck: 4 * 4 = 16 out
    block = with_recalibration(base, Spy)(inplanes, planes).eval()
    x = torch.randn(2, inplanes, 6, 6)
    with torch.no_grad():
        out = block(x)
        branch = block.relu(block.bn1(block.conv1(x)))
        if kind == "basic":
            branch = block.bn2(block.conv2(branch))
        else:
            branch = block.bn3(block.conv3(block.relu(block.bn2(block.conv2(branch)))))
    assert isinstance(block.recalibration, Spy) and block.recalibration.channels == inplanes
    ((seen, source),) = block.recalibration.seen
    torch.testing.assert_close(seen, branch)
    assert source is None
    torch.testing.assert_close(out, torch.relu(2 * branch + x))


@pytest.mark.parametrize("stage", ["single", "multi"])
def test_dense_layer_recalibrates_the_new_maps(stage):
    """SPEC.md §2: the k new maps, before the concatenation; weights from the layer's input
    (multi-stage) or from the new maps themselves (single-stage)."""
    torch.manual_seed(0)
    layer = DenseLayer(20, 6, stage, Spy).eval()
    assert layer.recalibration.source_channels == (20 if stage == "multi" else 6)
    features = torch.randn(2, 20, 5, 5)
    with torch.no_grad():
        out = layer(features)
        new = layer.conv2(layer.relu2(layer.norm2(layer.conv1(layer.relu1(layer.norm1(features))))))
    ((seen, source),) = layer.recalibration.seen
    torch.testing.assert_close(seen, new)
    torch.testing.assert_close(source, features if stage == "multi" else new)
    torch.testing.assert_close(out, 2 * new)


def test_densenet_default_stage_is_multi():
    model = build_meta("densenet100", "mssar")
    layer = next(m for m in model.modules() if isinstance(m, DenseLayer))
    assert layer.multi_stage
    assert layer.recalibration.source_channels == layer.norm1.num_features == 24


# --- MS-SAR parameter formula (SPEC.md §1) ------------------------------------------------------


def width(channels: int, num_scales: int, reduction: int) -> int:
    return max(1, channels // (reduction * num_scales))


@pytest.mark.parametrize("reduction", [1, 3, 16])
@pytest.mark.parametrize("scales", [(1,), (2,), (1, 2), (1, 4), (1, 2, 4)], ids=str)
@pytest.mark.parametrize("channels", [12, 16, 40, 64, 512])
def test_mssar_parameter_formula(channels, scales, reduction):
    module = MSSAR(channels, scales, reduction=reduction)
    L, D, Dh = len(scales), channels, width(channels, len(scales), reduction)
    assert module.hidden_channels == Dh
    assert n_params(module) == 2 * L * D * Dh + L * (2 * Dh + D)
    assert len(module.branches) == L
    for branch in module.branches:  # reduce D -> D' (no bias), BN(D'), expand D' -> D (+bias)
        assert branch.reduce.weight.shape == (Dh, D) and branch.reduce.bias is None
        assert branch.bn.weight.shape == branch.bn.bias.shape == (Dh,)
        assert branch.expand.weight.shape == (D, Dh) and branch.expand.bias.shape == (D,)


@pytest.mark.parametrize("scales", [(1,), (1, 2, 4)], ids=str)
def test_mssar_parameter_formula_with_source_and_hidden(scales):
    L, D, Dsrc, Dh = len(scales), 12, 108, 5
    module = MSSAR(D, scales, source_channels=Dsrc, hidden_channels=Dh)
    assert n_params(module) == L * (Dsrc * Dh + 2 * Dh + Dh * D + D)


def test_resnet20_mssar_extra_parameters_follow_the_formula():
    extra = n_params(build_meta("resnet20", "mssar")) - n_params(build_meta("resnet20"))
    per_block = {D: 2 * 3 * D * width(D, 3, 3) + 3 * (2 * width(D, 3, 3) + D) for D in (16, 32, 64)}
    assert extra == 3 * sum(per_block.values()) == 11_286


# --- complexity accounting (paper Table 2) ------------------------------------------------------


def resnet20_macs() -> int:
    """Convolution and classifier MACs of ResNet-20 on one 32x32 image, counted by hand."""
    stem = 3 * 16 * 9 * 32 * 32
    stage1 = 6 * 16 * 16 * 9 * 32 * 32
    stage2 = 16 * 32 * 9 * 16 * 16 + 5 * 32 * 32 * 9 * 16 * 16 + 16 * 32 * 16 * 16
    stage3 = 32 * 64 * 9 * 8 * 8 + 5 * 64 * 64 * 9 * 8 * 8 + 32 * 64 * 8 * 8
    return stem + stage1 + stage2 + stage3 + 64 * 10


def test_resnet20_cost_matches_paper_accounting():
    model = create_model("resnet20", num_classes=10)
    params = complexity.count_parameters(model)
    assert params == n_params(model) == 272_474
    assert complexity.projection_params(model) == 2_752
    # the paper's 0.27 M: He et al.'s identity-shortcut count, i.e. ours less the projections
    assert round((params - complexity.projection_params(model)) / 1e6, 2) == 0.27
    flops = complexity.count_flops(model, 32)
    assert abs(flops - resnet20_macs()) <= 10  # the classifier's bias adds at most 10
    assert abs(flops - 40.8e6) <= 0.005 * 40.8e6
    assert round(flops / 1e6, 2) == 40.81
    assert model.training  # count_flops restores the mode
    assert complexity.measure("resnet20") == complexity.Complexity(params, flops)


def test_measure_counts_the_direct_form_at_any_input_size():
    """FLOPs are counted on a model built in the direct form (paper §3.5: the MLPs on the pooled
    positions): the same parameters as the default build, and every module direct."""
    counted = complexity.build_for_counting("resnet20", "mssar")
    modules = recalibration_modules(counted, "mssar")
    assert modules and all(m.implementation == "direct" for m in modules)
    default = create_model("resnet20", recalibration="mssar")
    assert {m.implementation for m in recalibration_modules(default, "mssar")} == {"fast"}
    measured = complexity.measure("resnet20", "mssar")
    assert measured.params == n_params(default)
    assert measured.flops == complexity.count_flops(counted, 32)
    # paper §3.5: 2 D D' sum_l K_l^2 extra MACs per module, and b2 (D per region) as counted
    plain = complexity.measure("resnet20")
    extra = sum(
        3 * (d * width(d, 3, 3) * (1 + 4 + 16) * 2 + d * (1 + 4 + 16)) for d in (16, 32, 64)
    )
    assert measured.flops - plain.flops == extra
    # sliding: 2 L W H D D' (every scale's MLP at every position, K = 1's global window too)
    sliding = complexity.measure("resnet20", "mssar", strategy="sliding")
    maps = ((16, 32 * 32), (32, 16 * 16), (64, 8 * 8))
    extra = sum(3 * 3 * positions * (2 * d * width(d, 3, 3) + d) for d, positions in maps)
    assert sliding.flops - plain.flops == extra
    # an explicit input size and channel count (a 2x2 last stage: K = 4 clamped)
    small = complexity.measure("resnet18", "mssar", num_classes=10, input_size=64)
    assert small.params == n_params(build_meta("resnet18", "mssar")) + (10 - NUM_CLASSES) * 513
    gray = complexity.measure("resnet20", in_channels=1)
    assert gray.params == plain.params - 2 * 16 * 9
    single = complexity.measure("densenet100", "mssar", stage="single")
    assert single.params < complexity.measure("densenet100", "mssar").params


def test_projection_params_only_for_cifar_resnets():
    assert complexity.projection_params(build_meta("resnet18")) == 0
    assert complexity.projection_params(build_meta("densenet100")) == 0
    assert complexity.projection_params(build_meta("resnet56")) == 2_752


# --- ResNet-50 (not in the paper; the backbone of the later modules' published numbers) --------


def test_resnet50_module_costs_follow_their_closed_forms():
    """One module per bottleneck, on its 4x output: SE adds 2·C·C/16 + C/16 + C per block; ECA
    adds its kernel k(C) only: 5, 5, 5, 7 per stage with mssar's reading of Eq. 12 (ECA-Net's own
    ResNet-50 used 3, 5, 5, 7: 80 parameters, its abstract)."""
    classifier = (1000 - NUM_CLASSES) * (2048 + 1)  # the 1000-class head less ours
    plain = n_params(build_meta("resnet50"))
    assert plain + classifier == 25_557_032
    se = n_params(build_meta("resnet50", "se"))
    assert se - plain == sum(2 * c * c // 16 + c // 16 + c for c in RESNET50_WIDTHS)
    assert se + classifier == 28_088_024
    eca = n_params(build_meta("resnet50", "eca"))
    assert [eca_kernel_size(c) for c in (256, 512, 1024, 2048)] == [5, 5, 5, 7]
    assert eca - plain == sum(eca_kernel_size(c) for c in RESNET50_WIDTHS) == 86
    # MS-SAR: SE's total width D/16 split over 3 scales, a BN in each branch (SPEC.md §1)
    mssar = n_params(build_meta("resnet50", "mssar"))
    extra = sum(3 * (2 * c * (c // 48) + 2 * (c // 48) + c) for c in RESNET50_WIDTHS)
    assert mssar - plain == extra


@pytest.mark.parametrize("recalibration", ["eca", "cbam", "ge", "coord", "gc"])
def test_resnet50_later_modules_sit_where_se_sits(recalibration):
    """SPEC.md §7: every later module on the bottleneck's output after bn3, one per block."""
    model = build_meta("resnet50", recalibration)
    blocks = [m for m in model.modules() if isinstance(m, Bottleneck)]
    assert len(blocks) == UNITS["resnet50"]
    assert [block.recalibration.channels for block in blocks] == RESNET50_WIDTHS
    assert [block.bn3.num_features for block in blocks] == RESNET50_WIDTHS

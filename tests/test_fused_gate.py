"""The fused gate, MS-SAR's fast path (``mssar_cli.fused_gate``): the layout it chooses and the
maps it declines, the gradients it returns and how it backpropagates (only the inputs that need
one, retained graphs, no double backward, bf16 autocast, parametrized or replicated weights,
never writing into its input), and channels-last maps in every implementation.

The oracle is the ``implementation="direct"`` module with the same parameters.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import (
    CHANNELS,
    SOURCE_CHANNELS,
    forward_backward,
    make_inputs,
    randomize_bn,
    size_id,
)
from torch import nn

from mssar_cli import fused_gate
from mssar_cli.fused_gate_layouts import BandLayout, MatrixLayout
from mssar_cli.recalibration.mssar import IMPLEMENTATIONS, MSSAR

# --- the gradients it returns -----------------------------------------------------------------


@pytest.mark.parametrize("size", [(32, 32), (8, 8), (7, 7)], ids=size_id)
@pytest.mark.parametrize("needs", ["x", "source", "params", "x+params"])
def test_fast_equals_direct_when_only_some_inputs_need_grad(size, needs):
    """The fused gate returns exactly the gradients autograd asks for, and the right ones."""
    torch.manual_seed(12)
    fast = randomize_bn(MSSAR(CHANNELS, (1, 2, 4), source_channels=SOURCE_CHANNELS)).double()
    direct = copy.deepcopy(fast)
    direct.implementation = "direct"
    x, source = make_inputs(
        4, CHANNELS, *size, source_channels=SOURCE_CHANNELS, dtype=torch.float64
    )
    upstream = torch.randn_like(x)
    results = []
    for module in (fast, direct):
        module.requires_grad_("params" in needs)
        xx = x.clone().requires_grad_("x" in needs)
        ss = source.clone().requires_grad_(needs == "source")
        (module(xx, ss) * upstream).sum().backward()
        results.append([xx.grad, ss.grad] + [p.grad for p in module.parameters()])
    for got, want in zip(*results):
        assert (got is None) == (want is None)
        if want is not None:
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


# --- memory format ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "strategy,scales,size",
    [
        ("regional", (1, 2, 4), (32, 32)),  # uniform refined grid
        ("regional", (1, 2, 4), (7, 7)),  # non-uniform refined grid
        ("regional", (1, 3), (9, 13)),
        ("sliding", (1, 2, 4), (8, 8)),
        ("sliding", (1, 3), (9, 13)),
    ],
)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_channels_last_matches_contiguous(strategy, scales, size, implementation):
    torch.manual_seed(10)
    m = randomize_bn(MSSAR(CHANNELS, scales, strategy, source_channels=SOURCE_CHANNELS))
    m = m.double().train()
    m.implementation = implementation
    other = copy.deepcopy(m)
    x, source = make_inputs(
        4, CHANNELS, *size, source_channels=SOURCE_CHANNELS, dtype=torch.float64
    )
    upstream = torch.randn_like(x)
    want = forward_backward(m, x, source, upstream)
    cl = torch.channels_last
    got = forward_backward(
        other, x.contiguous(memory_format=cl), source.contiguous(memory_format=cl), upstream
    )
    assert x.contiguous(memory_format=cl).stride() != x.stride()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-10, atol=1e-10, msg=key)


# --- the fused gate ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", [8, 16, 32], ids=lambda s: f"{s}x{s}")
def test_fast_path_trains_under_bf16_autocast(size):
    """GPU recipes train under bf16 autocast: the weights come out of autocast's bf16 matmuls while
    the map may stay fp32; every fast path (block matrix, strided sums) must still backpropagate."""
    torch.manual_seed(11)
    module = MSSAR(CHANNELS, (1, 2, 4)).train()
    x = torch.randn(4, CHANNELS, size, size, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x)
    out.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in module.parameters())


@pytest.mark.parametrize("size", [8, 32], ids=lambda s: f"{s}x{s}")
def test_fused_gate_backpropagates_twice_through_a_retained_graph(size):
    """The fused gate keeps what its backward needs as saved tensors: retain_graph works."""
    torch.manual_seed(5)
    module = MSSAR(CHANNELS, (1, 2, 4)).train()
    x = torch.randn(2, CHANNELS, size, size, requires_grad=True)
    out = (module(x) ** 2).sum()
    out.backward(retain_graph=True)
    once = [x.grad.clone()] + [p.grad.clone() for p in module.parameters()]
    out.backward()
    twice = [x.grad] + [p.grad for p in module.parameters()]
    for a, b in zip(once, twice):
        torch.testing.assert_close(b, 2 * a)


def test_fused_gate_refuses_double_backward_clearly():
    module = MSSAR(CHANNELS, (1, 2, 4)).train()
    x = torch.randn(2, CHANNELS, 8, 8, requires_grad=True)
    (grad,) = torch.autograd.grad(module(x).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        grad.sum().backward()


@pytest.mark.parametrize("size", [(8, 8), (32, 32)], ids=size_id)
def test_branches_the_fused_gate_cannot_differentiate_take_the_autograd_path(size, monkeypatch):
    """A BN without affine parameters (or a SyncBatchNorm) is not differentiated by hand: the
    gate declines and the module, through the autograd composition, still equals the direct
    implementation."""
    torch.manual_seed(4)
    fast = MSSAR(CHANNELS, (1, 2, 4)).double().train()
    for branch in fast.branches:
        branch.bn = nn.BatchNorm1d(branch.bn.num_features, affine=False).double()
    direct = copy.deepcopy(fast)
    direct.implementation = "direct"
    called = []
    monkeypatch.setattr(fused_gate._FusedGate, "apply", lambda *a: called.append(a))
    x, _ = make_inputs(4, CHANNELS, *size, dtype=torch.float64)
    mlps = [branch.gate_mlp() for branch in fast.branches]
    assert fused_gate.recalibrate(x, None, fast.scales, mlps) is None
    upstream = torch.randn(x.shape, dtype=torch.float64)
    got, want = (
        forward_backward(fast, x, None, upstream),
        forward_backward(direct, x, None, upstream),
    )
    assert not called
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-10, atol=1e-10, msg=key)


@pytest.mark.parametrize(
    "scales, size, band_rows",
    [((8,), (16, 16), 2), ((2, 8), (16, 16), 2), ((4,), (16, 16), 4), ((1, 4), (32, 32), 8)],
)
@pytest.mark.parametrize("own_source", [True, False], ids=["own", "source"])
def test_band_layout_sums_bands_of_every_height_exactly(
    scales, size, band_rows, own_source, monkeypatch
):
    """Bands of 2 and 4 rows are summed by adding halves, taller ones by ``sum``: each equals the
    direct implementation, forward and backward, with x as its own source and with another."""
    layouts = []
    original = fused_gate._FusedGate.apply
    monkeypatch.setattr(
        fused_gate._FusedGate, "apply", lambda *a: layouts.append(a[2]) or original(*a)
    )
    torch.manual_seed(5)
    source_channels = None if own_source else SOURCE_CHANNELS
    fast = randomize_bn(MSSAR(CHANNELS, scales, source_channels=source_channels)).double().train()
    direct = copy.deepcopy(fast)
    direct.implementation = "direct"
    x, source = make_inputs(
        4, CHANNELS, *size, source_channels=source_channels, dtype=torch.float64
    )
    source = None if own_source else source
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = forward_backward(fast, x, source, upstream)
    want = forward_backward(direct, x, source, upstream)
    assert layouts and isinstance(layouts[0], BandLayout) and layouts[0].sh == band_rows
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-10, atol=1e-10, msg=key)


class _Doubled(nn.Module):
    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return 2 * weight


@pytest.mark.parametrize("size", [(8, 8), (16, 16)], ids=size_id)
def test_parametrized_or_replicated_weights_reach_the_fused_gate(size):
    """Weights that are not in a module's own parameter dictionary, a parametrized weight
    (torch.nn.utils.parametrize) or a plain tensor attribute as on a DataParallel replica, are
    read through the module: the module still equals the direct implementation."""
    from torch.nn.utils import parametrize

    torch.manual_seed(8)
    fast = randomize_bn(MSSAR(CHANNELS, (1, 2, 4))).double().train()
    parametrize.register_parametrization(fast.branches[0].reduce, "weight", _Doubled())
    parametrize.register_parametrization(fast.branches[1].expand, "bias", _Doubled())
    replica = fast.branches[2].expand
    weight = replica._parameters.pop("weight")
    replica.weight = weight.detach().clone().requires_grad_(True)  # a plain attribute
    direct = copy.deepcopy(fast)
    direct.implementation = "direct"
    x, _ = make_inputs(4, CHANNELS, *size, dtype=torch.float64)
    outputs, grads = [], []
    for module in (fast, direct):
        xi = x.clone().requires_grad_(True)
        out = module(xi)
        plain = module.branches[2].expand.weight
        out.square().sum().backward()
        outputs.append(out.detach())
        grads.append([xi.grad, plain.grad, *(p.grad for p in module.parameters())])
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-10, atol=1e-10)
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "scales, size, layout",
    [
        ((1, 2, 4), (8, 8), MatrixLayout),  # small maps: products with the region matrices
        ((1, 2, 4), (7, 7), MatrixLayout),
        ((1, 2, 4), (14, 14), MatrixLayout),  # non-uniform, up to SMALL_MAP positions
        ((1, 2, 4), (16, 16), BandLayout),  # uniform refined grid: bands
        ((1, 2, 4), (32, 32), BandLayout),
        ((1, 2, 4), (18, 17), None),  # non-uniform and large: the autograd composition
    ],
)
def test_the_gate_chooses_its_layout(scales, size, layout):
    chosen = fused_gate.choose_layout(scales, *size)
    assert type(chosen) is type(None) if layout is None else isinstance(chosen, layout)
    if isinstance(chosen, BandLayout):
        assert chosen.sh == size[0] // 4


def test_the_gate_declines_what_it_does_not_cover():
    """A channels-last map or source, or a map too large for its layouts: ``None``, so MS-SAR
    composes the same steps with autograd."""
    module = MSSAR(CHANNELS, (1, 2, 4)).train()
    mlps = [branch.gate_mlp() for branch in module.branches]
    x = torch.randn(2, CHANNELS, 8, 8)
    assert fused_gate.recalibrate(x, None, module.scales, mlps) is not None
    channels_last = x.contiguous(memory_format=torch.channels_last)
    assert fused_gate.recalibrate(channels_last, None, module.scales, mlps) is None
    assert fused_gate.recalibrate(x, channels_last, module.scales, mlps) is None
    large = torch.randn(2, CHANNELS, 18, 17)
    assert fused_gate.recalibrate(large, None, module.scales, mlps) is None


def test_the_fused_gate_never_writes_into_its_input():
    """No tensor is the gate's scratch space: its input is the same after backward."""
    torch.manual_seed(17)
    module = MSSAR(CHANNELS, (1, 2, 4)).train()
    for size in (8, 32):
        x = torch.randn(4, CHANNELS, size, size, requires_grad=True)
        kept = x.detach().clone()
        module(x).square().sum().backward()
        assert torch.equal(x.detach(), kept)

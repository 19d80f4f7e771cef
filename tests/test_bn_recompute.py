"""The recalibrated residual blocks rebuild the BN output they multiply instead of keeping it
(mssar_cli.models.bn_recompute): same forward, running statistics and (to rounding) gradients
as the plain composition ``recalibration(bn(conv(...)))``, and the BN output is freed."""

from __future__ import annotations

import copy
import weakref

import pytest
import torch
from torch import nn

from mssar_cli.models import bn_recompute, create_model
from mssar_cli.models.blocks import (
    RecalibratedBasicBlock,
    RecalibratedBottleneck,
    with_recalibration,
)
from mssar_cli.recalibration.mssar import MSSAR
from mssar_cli.recalibration.se import SqueezeExcitation

FACTORIES = {
    "se": lambda channels: SqueezeExcitation(channels, reduction=4),
    "mssar": lambda channels: MSSAR(channels, (1, 2, 4)),
    "mssar-sliding": lambda channels: MSSAR(channels, (1, 2, 4), "sliding"),
    "mssar-autograd": lambda channels: MSSAR(channels, (1, 2, 4), implementation="autograd"),
    "mssar-direct": lambda channels: MSSAR(channels, (1, 2, 4), implementation="direct"),
}


def plain_forward(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The block's forward without the rebuild: recalibration(bn(conv(...)))."""
    identity = x if block.downsample is None else block.downsample(x)
    out = block.relu(block.bn1(block.conv1(x)))
    if isinstance(block, RecalibratedBottleneck):
        out = block.relu(block.bn2(block.conv2(out)))
        out = block.recalibration(block.bn3(block.conv3(out)))
    else:
        out = block.recalibration(block.bn2(block.conv2(out)))
    return block.relu(out + identity)


def make_block(kind: str, factory: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "basic":
        block = with_recalibration(RecalibratedBasicBlock, FACTORIES[factory])(16, 16)
    else:
        block = with_recalibration(RecalibratedBottleneck, FACTORIES[factory])(64, 16)
    with torch.no_grad():  # non-trivial BN affine parameters
        for bn in (m for m in block.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0, 0.3)
    return block.double().train()


@pytest.mark.parametrize("factory", list(FACTORIES))
@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_rebuild_matches_the_plain_composition(kind, factory, memory_format):
    block = make_block(kind, factory)
    reference = copy.deepcopy(block)
    channels = 16 if kind == "basic" else 64
    x = torch.randn(4, channels, 16, 16, dtype=torch.float64).contiguous(
        memory_format=memory_format
    )
    upstream = torch.randn(4, channels, 16, 16, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    got, want = block(xa), plain_forward(reference, xb)
    assert torch.equal(got, want)  # the forward is BN's own kernel: bitwise
    (got * upstream).sum().backward()
    (want * upstream).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-9, atol=1e-10)
    for (name, p), q in zip(block.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-10, msg=name)
    for (name, b), c in zip(block.named_buffers(), reference.buffers()):
        assert torch.equal(b, c), name  # running statistics and num_batches_tracked


def test_momentum_none_uses_the_cumulative_average():
    block = make_block("basic", "mssar")
    reference = copy.deepcopy(block)
    block.bn2.momentum = reference.bn2.momentum = None
    for _ in range(3):
        x = torch.randn(4, 16, 8, 8, dtype=torch.float64)
        block(x)
        plain_forward(reference, x)
    assert torch.equal(block.bn2.running_mean, reference.bn2.running_mean)
    assert torch.equal(block.bn2.running_var, reference.bn2.running_var)
    assert int(block.bn2.num_batches_tracked) == 3


@pytest.mark.parametrize("factory", ["se", "mssar", "mssar-direct"])
def test_the_bn_output_is_not_kept_for_backward(factory, monkeypatch):
    """The point of the rebuild: after the forward pass no BN output of a block is alive."""
    outputs: list[weakref.ref] = []
    original = bn_recompute.batch_norm_with_statistics

    def spy(bn, pre):
        result = original(bn, pre)
        outputs.append(weakref.ref(result[0]))
        return result

    monkeypatch.setattr(bn_recompute, "batch_norm_with_statistics", spy)
    options = {"implementation": "direct"} if factory == "mssar-direct" else {}
    model = create_model("resnet20", recalibration=factory.split("-")[0], **options).train()
    loss = model(torch.randn(4, 3, 32, 32)).sum()
    assert len(outputs) == 9  # one per residual block
    assert all(ref() is None for ref in outputs)
    loss.backward()  # and backward still works from the rebuilt outputs
    assert all(p.grad is not None for p in model.parameters())


def test_falls_back_outside_training(monkeypatch):
    block = make_block("basic", "mssar").eval()
    calls = []
    original = bn_recompute.batch_norm_with_statistics
    monkeypatch.setattr(
        bn_recompute,
        "batch_norm_with_statistics",
        lambda bn, pre: calls.append(1) or original(bn, pre),
    )
    x = torch.randn(2, 16, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(block(x), plain_forward(block, x))
    block.train()
    with torch.no_grad():
        torch.testing.assert_close(block(x), plain_forward(copy.deepcopy(block), x))
    assert calls == []
    block(x)  # training with autograd: the rebuild path, which the spy sees
    assert calls == [1]


@pytest.mark.parametrize("size", [8, 16], ids=lambda s: f"{s}x{s}")
def test_a_retained_graph_backpropagates_twice_through_a_rebuilt_bn_output(size):
    """Every unpack rebuilds the BN output afresh, and nothing writes into it: a second backward
    through a retained graph gives the first one's gradients again (matrix and band layouts)."""
    block = make_block("basic", "mssar")
    reference = copy.deepcopy(block)
    x = torch.randn(4, 16, size, size, dtype=torch.float64)
    upstream = torch.randn(4, 16, size, size, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    loss = (block(xa) * upstream).sum()
    loss.backward(retain_graph=True)
    once = [xa.grad.clone()] + [p.grad.clone() for p in block.parameters()]
    loss.backward()
    (plain_forward(reference, xb) * upstream).sum().backward()
    torch.testing.assert_close(xa.grad, 2 * once[0])
    torch.testing.assert_close(xa.grad, 2 * xb.grad, rtol=1e-9, atol=1e-10)
    for (name, p), q, first in zip(block.named_parameters(), reference.parameters(), once[1:]):
        torch.testing.assert_close(p.grad, 2 * first, msg=name)
        torch.testing.assert_close(p.grad, 2 * q.grad, rtol=1e-9, atol=1e-10, msg=name)


@pytest.mark.parametrize("stage", ["layer1", "layer3"])  # band (32x32) and matrix (8x8) layouts
def test_the_gradient_at_a_rebuilt_bn_output_is_an_ordinary_tensor(stage):
    """The fused gate hands its scratch buffer (``grad * x``) out as x's gradient: that gradient
    must be a plain tensor, usable in grad mode, and never overwritten later by another fused
    gate that receives it as its input."""
    torch.manual_seed(0)
    model = create_model("resnet20", recalibration="mssar").train()
    seen = []
    getattr(model, stage)[0].recalibration.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    loss = model(torch.randn(2, 3, 32, 32)).sum()
    (grad,) = torch.autograd.grad(loss, seen[0])
    assert not grad.requires_grad and grad.grad_fn is None
    assert torch.equal(grad * 2, grad + grad)  # usable in grad mode
    kept = grad.clone()
    other = MSSAR(grad.shape[1]).train()
    other(grad.clone().requires_grad_()).square().sum().backward()
    other(grad.requires_grad_()).square().sum().backward()
    assert torch.equal(grad.detach(), kept)


def test_parameters_changed_between_forward_and_backward_are_refused():
    """As with any autograd graph: a second backward after an optimizer step raises."""
    torch.manual_seed(0)
    module = MSSAR(16).train()
    x = torch.randn(2, 16, 8, 8, requires_grad=True)
    loss = module(x).square().sum()
    loss.backward(retain_graph=True)
    with torch.no_grad():
        for p in module.parameters():
            p.sub_(0.1 * p.grad)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize(
    "name, rebuilt",
    [("cbam", False), ("se", True), ("mssar", True), ("eca", True), ("ge", True), ("coord", True)],
)
def test_a_module_whose_backward_compares_values_gets_the_bn_output_itself(
    name, rebuilt, monkeypatch
):
    """CBAM's max poolings send the gradient to the positions equal to the saved maximum. A rebuilt
    BN output differs from the original by rounding, matches none, and amax's backward divides by
    zero: NaN gradients from the second step of ResNet-20 + CBAM on Fashion-MNIST (2026-12-03).
    Its blocks keep the BN output; the others rebuild it. The rebuild is exaggerated here (+1e-3)
    so that any use of it shows."""
    calls = []
    exact = bn_recompute._Rebuild.tensor

    def rebuilt_off_by_rounding(self):
        calls.append(1)
        return exact(self) + 1e-3

    monkeypatch.setattr(bn_recompute._Rebuild, "tensor", rebuilt_off_by_rounding)
    torch.manual_seed(0)
    model = create_model("resnet20", recalibration=name).train()
    model(torch.randn(4, 3, 32, 32)).square().sum().backward()
    assert bool(calls) == rebuilt
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())

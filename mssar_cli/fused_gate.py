"""A regional recalibration as one autograd node with a hand-written backward (§3.2, Eqs. 1-2).

A regional MS-SAR touches the full ``(N, D, H, W)`` map only twice: it pools the source onto a
few regions and multiplies ``x`` by the weights of those regions. Everything in between (every
scale's MLP, BN and sigmoid, the mean over scales) runs on ``N x regions`` rows. Left to
autograd, the two full-size steps cost five full-size passes in backward and the small MLPs some
sixty tiny autograd nodes. Here the whole module is one :class:`torch.autograd.Function`:

* the MLPs of all scales run side by side as block-diagonal products (:class:`_Stack`), with the
  region means as rows ``(N, regions, C)`` and the hidden layer as ``(units, N, regions)``, so
  that every product is one plain matrix product with its long dimension last, and b2 rides on
  Ω2's product (indicator rows);
* backward differentiates them by hand (sigmoid, Ω2, ReLU, BN via
  ``native_batch_norm_backward``, Ω1) and makes two full-size passes: ``grad * x`` reduced onto
  the regions for the weights' gradient, then one pass that writes ``x``'s whole gradient (its
  multiply path plus its pooling path) into the buffer of ``grad * x``;
* it keeps ``x``, the region means, the hidden layer after BN and each scale's own block of it
  before BN (BN runs on that block as one contiguous ``(1, D', N*K*K)`` tensor, its fast kernel);
  the weights are recomputed in backward from the layer after BN (one small product).

The caller (:class:`mssar_cli.recalibration.mssar.MSSAR`) asks one question,
:func:`recalibrate`, and hands over each scale's parameters as a :class:`ScaleMLP`; the answer is
the recalibrated map, or ``None`` where the gate does not apply (a channels-last map, a map too
large for the layouts, ``torch.compile``, a SyncBatchNorm) and the caller composes the same steps
with autograd. How the regions meet the map is :mod:`mssar_cli.fused_gate_layouts`.
BN statistics and running averages are ``nn.BatchNorm1d``'s own (the same kernel,
:mod:`mssar_cli.batchnorm`). Double backward is not supported (``once_differentiable``); a second
backward through a retained graph is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from mssar_cli.batchnorm import batch_norm_with_statistics, uses_batch_statistics
from mssar_cli.fused_gate_layouts import BandLayout, Layout, MatrixLayout
from mssar_cli.partition import axis_plan

# The layout of a map. Up to MATRIX_MAP positions (8x8) the regions' matrices win: there strided
# reductions and broadcasts run over blocks of two elements and lose to one BLAS product. Larger
# maps whose refined grid has equal blocks use bands, where a product over every position would
# do work proportional to the map times the regions. Other partitions (7x7 or 14x14 with K = 4)
# use the matrices up to SMALL_MAP positions; beyond, the autograd composition.
MATRIX_MAP = 64
SMALL_MAP = 256


class ScaleMLP(NamedTuple):
    """One scale's Eq. 1, sigmoid(Ω2 · relu(BN(Ω1 · y)) + b2), as the gate takes it: the tensors
    it differentiates, then the BN module whose mode, ε, momentum and running statistics apply."""

    reduce: torch.Tensor  # Ω1, (D', C_source)
    gamma: torch.Tensor  # BN's weight, (D',)
    beta: torch.Tensor  # BN's bias, (D',)
    expand: torch.Tensor  # Ω2, (D, D')
    bias: torch.Tensor  # b2, (D,)
    bn: nn.BatchNorm1d


TENSORS_PER_SCALE = 5  # the tensor fields of ScaleMLP, in its order


@lru_cache(maxsize=256)
def choose_layout(scales: tuple[int, ...], height: int, width: int) -> Layout | None:
    """The layout for an ``height x width`` map and scale set, or ``None`` (see MATRIX_MAP)."""
    rows, cols = axis_plan(height, scales), axis_plan(width, scales)
    uniform = rows.uniform and cols.uniform
    positions = height * width
    if positions <= MATRIX_MAP or (not uniform and positions <= SMALL_MAP):
        return MatrixLayout(scales, height, width)
    if uniform:
        return BandLayout(scales, height, width, rows.sizes[0])
    return None


def recalibrate(
    x: torch.Tensor,
    source: torch.Tensor | None,
    scales: tuple[int, ...],
    mlps: Sequence[ScaleMLP],
) -> torch.Tensor | None:
    """``x`` times the mean over scales of each scale's weights on its regions of ``source``.

    ``source`` None means ``x`` is its own source; ``mlps`` are the scales' MLPs in the order of
    ``scales``. Returns ``None`` where the gate does not apply (see the module docstring). Outside
    autograd (nothing needs a gradient) it runs the same steps without a node.
    """
    if not (
        x.is_contiguous()
        and (source is None or source.is_contiguous())
        and not torch.compiler.is_compiling()
        and all(type(mlp.bn) is nn.BatchNorm1d and mlp.gamma is not None for mlp in mlps)
    ):
        return None
    layout = choose_layout(tuple(scales), x.shape[2], x.shape[3])
    if layout is None:
        return None
    params = [t for mlp in mlps for t in mlp[:TENSORS_PER_SCALE]]
    bns = tuple(mlp.bn for mlp in mlps)
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad
        or (source is not None and source.requires_grad)
        or any(p.requires_grad for p in params)
    )
    if not needs_grad:
        with torch.no_grad():
            return _gate_forward(x, source, layout, bns, params, for_backward=False)[0]
    return _FusedGate.apply(x, source, layout, bns, *params)


@dataclass(frozen=True)
class _Stack:
    """Every scale's MLP (Eq. 1) side by side, as block-diagonal products over the regions.

    The hidden layer is ``(L*D' + L, N, regions)``, hidden units first: ``reduce @ rows.T``
    computes every scale's Ω1 on every region; only scale ``s``'s block (its D' hidden units, its
    K x K regions) is normalised and kept, the rest of ``active`` stays zero, and the last L rows
    are indicators (1 on scale ``s``'s regions), so ``active.T @ expand.T``, whose last L columns
    are the scales' b2, gives each region exactly its own scale's Ω2 · relu(BN(Ω1 · y)) + b2. The
    wasted products are on a few rows per sample; in return each layer is one product for all
    scales and b2 costs no pass of its own (its gradient comes out of Ω2's product).
    """

    reduce: torch.Tensor  # (L*D', C_source): Ω1 of every scale, stacked
    expand: torch.Tensor  # (D, L*D' + L): Ω2 of every scale side by side, then b2 of every scale
    gammas: tuple[torch.Tensor, ...]
    betas: tuple[torch.Tensor, ...]
    bns: tuple[nn.BatchNorm1d, ...]
    region_rows: tuple[slice, ...]  # per scale, its regions
    hidden_cols: tuple[slice, ...]  # per scale, its D' hidden units

    @property
    def units(self) -> int:
        """L*D', the hidden units of all scales (without the L indicator rows)."""
        return self.reduce.shape[0]

    def blocks(self):
        """(scale, index of its block in (L*D', N, regions) tensors) of every scale."""
        return [
            (i, (cols, slice(None), rows))
            for i, (rows, cols) in enumerate(zip(self.region_rows, self.hidden_cols))
        ]


def _stack(params: Sequence[torch.Tensor], bns, regions: Sequence[int], dtype) -> _Stack:
    """The stacked MLPs from the parameters, :class:`ScaleMLP`'s tensors scale after scale."""
    per = TENSORS_PER_SCALE
    reduces, gammas, betas = params[0::per], params[1::per], params[2::per]
    expands, biases = params[3::per], params[4::per]
    width = reduces[0].shape[0]
    region_rows, hidden_cols, start = [], [], 0
    for i, count in enumerate(regions):
        region_rows.append(slice(start, start + count))
        hidden_cols.append(slice(i * width, (i + 1) * width))
        start += count
    return _Stack(
        reduce=torch.cat(reduces).to(dtype),
        expand=torch.cat([*expands, torch.stack(biases, 1)], 1).to(dtype),
        gammas=tuple(gammas),
        betas=tuple(betas),
        bns=tuple(bns),
        region_rows=tuple(region_rows),
        hidden_cols=tuple(hidden_cols),
    )


def _weights(stack: _Stack, active: torch.Tensor) -> torch.Tensor:
    """sigmoid(Ω2 · active + b2) of every region, (N, regions, D); ``active`` is
    (L*D' + L, N, regions) with its indicator rows."""
    depth, n, r = active.shape
    return (active.view(depth, n * r).t() @ stack.expand.t()).view(n, r, -1).sigmoid_()


def _mlp_forward(stack: _Stack, rows: torch.Tensor, for_backward: bool):
    """Eq. 1 of every scale on its regions' means, rows (N, regions, C_source).

    Returns the weights (N, regions, D); per scale its block of the hidden layer before BN,
    (D', N, K*K) and contiguous; the hidden layer after BN + ReLU as (L*D' + L, N, regions),
    hidden units first, zero outside each scale's block, with b2's indicator rows
    (:class:`_Stack`); and per scale the statistics BN used (with copies of the running ones in
    evaluation mode when ``for_backward``). BN updates its running statistics as
    ``nn.BatchNorm1d`` does (once per forward).

    Hidden units first, the products that make and use the hidden layer have their long
    dimension last, the shape MKL's products run fastest on; BN on a contiguous block runs
    torch's contiguous kernel rather than its generic strided one.
    """
    n, r, c = rows.shape
    hidden = (stack.reduce @ rows.view(n * r, c).t()).view(-1, n, r)
    active = hidden.new_zeros(stack.units + len(stack.bns), n, r)
    for i, rows_of in enumerate(stack.region_rows):
        active[stack.units + i, :, rows_of] = 1  # b2's indicator rows
    blocks, stats = [], []
    for i, block in stack.blocks():  # BN's channels are the hidden units
        bn = stack.bns[i]
        own = hidden[block].contiguous()  # (D', N, K*K)
        normalised, mean, invstd = batch_norm_with_statistics(
            bn, own.view(1, own.shape[0], -1), (stack.gammas[i], stack.betas[i])
        )
        active[block] = normalised.relu_().view(own.shape)
        running = None
        if for_backward and not uses_batch_statistics(bn):  # evaluation-mode BN's backward
            running = (bn.running_mean.clone(), bn.running_var.clone())
        blocks.append(own)
        stats.append((mean, invstd, running))
    return _weights(stack, active), blocks, active, stats


def _mlp_backward(
    stack: _Stack,
    rows: torch.Tensor,
    blocks: Sequence[torch.Tensor],
    active: torch.Tensor,
    stats: list,
    weights: torch.Tensor,
    grad_weights: torch.Tensor,
    need_rows: bool,
) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """Gradients of Eq. 1 by hand: the rows' (or None) and, per scale, Ω1, γ, β, Ω2, b2's.

    ``grad_weights`` is overwritten.
    """
    n, r, c = rows.shape
    units = stack.units
    grad_logits = torch.ops.aten.sigmoid_backward.grad_input(  # in place: ours to overwrite
        grad_weights, weights, grad_input=grad_weights
    )
    flat_logits = grad_logits.view(n * r, -1)
    grad_expand = (active.view(active.shape[0], n * r) @ flat_logits).t()  # Ω2's and b2's
    grad_active = torch.ops.aten.threshold_backward(
        (stack.expand[:, :units].t() @ flat_logits.t()).view(units, n, r), active[:units], 0
    )
    grad_hidden = torch.zeros_like(grad_active)
    grad_bn = []
    for (i, block), hidden, (mean, invstd, running) in zip(stack.blocks(), blocks, stats):
        running_mean, running_var = running if running is not None else (None, None)
        flat = (1, hidden.shape[0], -1)
        grad_block, grad_gamma, grad_beta = torch.ops.aten.native_batch_norm_backward(
            grad_active[block].contiguous().view(flat),
            hidden.view(flat),
            stack.gammas[i],
            running_mean,
            running_var,
            mean,
            invstd,
            running is None,
            stack.bns[i].eps,
            [True, True, True],
        )
        grad_hidden[block] = grad_block.view(hidden.shape)
        grad_bn.append((grad_gamma, grad_beta))
    flat_hidden = grad_hidden.view(units, n * r)
    grad_reduce = flat_hidden @ rows.view(n * r, c)
    grad_rows = (flat_hidden.t() @ stack.reduce).view(n, r, c) if need_rows else None
    per_scale = []
    for i, (cols, (grad_gamma, grad_beta)) in enumerate(zip(stack.hidden_cols, grad_bn)):
        grad_b2 = grad_expand[:, units + i]
        per_scale += [grad_reduce[cols], grad_gamma, grad_beta, grad_expand[:, cols], grad_b2]
    return grad_rows, per_scale


def _gate_forward(x, source, layout: Layout, bns, params, for_backward: bool):
    """``x * spread(mlps(pool(source)))`` and what backward needs: the region means (as rows),
    the stacked MLPs and the MLPs' hidden layers and BN statistics (see :func:`_mlp_forward`)."""
    with torch.autocast(x.device.type, enabled=False):  # the map's dtype, MLPs in fp32 or wider
        regions = layout.pool(x if source is None else source)
        dtype = torch.promote_types(regions.dtype, params[0].dtype)
        stack = _stack(params, bns, layout.regions, dtype)
        regions = regions.to(dtype)
        weights, hidden, active, stats = _mlp_forward(stack, regions, for_backward)
        return layout.scale(x, weights), (regions, stack, hidden, active, stats)


class _FusedGate(torch.autograd.Function):
    """``x * spread(mlps(pool(source)))``; backward as in the module docstring."""

    @staticmethod
    def forward(ctx, x, source, layout, bns, *params):
        # the weights are rebuilt in backward from ``active``
        out, (regions, stack, hidden, active, stats) = _gate_forward(
            x, source, layout, bns, params, for_backward=True
        )
        # the parameters too, for autograd's check that nothing changed them before backward
        ctx.save_for_backward(x, regions, active, *hidden, *params)
        ctx.layout, ctx.stack, ctx.stats, ctx.own = layout, stack, stats, source is None
        ctx.source_meta = None if source is None else (source.shape, source.dtype)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, regions, active, *saved = ctx.saved_tensors
        layout, stack = ctx.layout, ctx.stack
        hidden, params = saved[: len(stack.bns)], saved[len(stack.bns) :]
        grad = grad.contiguous()
        weights = _weights(stack, active)
        source_needs = ctx.needs_input_grad[0 if ctx.own else 1]
        param_needs = ctx.needs_input_grad[4:]
        grad_regions, param_grads = None, [None] * len(param_needs)
        scratch = None  # a full-size buffer backward no longer needs (``grad * x``)
        if source_needs or any(param_needs):
            grad_weights, scratch = layout.weight_grad(grad, x)
            grad_regions, param_grads = _mlp_backward(
                stack,
                regions,
                hidden,
                active,
                ctx.stats,
                weights,
                grad_weights.to(weights.dtype),
                source_needs,
            )
            if scratch.dtype != grad.dtype:
                scratch = None
        grad_x = grad_source = None
        if ctx.needs_input_grad[0]:
            pooled_grad = grad_regions if ctx.own else None
            grad_x = layout.input_grad(grad, weights, pooled_grad, scratch).to(x.dtype)
        if not ctx.own and grad_regions is not None:
            shape, dtype = ctx.source_meta
            grad_source = layout.source_grad(grad_regions, shape, grad).to(dtype)
        return (
            grad_x,
            grad_source,
            None,
            None,
            *(
                _in_layout(g, p) if needed else None
                for g, p, needed in zip(param_grads, params, param_needs)
            ),
        )


def _in_layout(grad: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``grad`` with ``param``'s strides.

    Ω2's gradient is a column block of a transposed product: strided, and for D' = 1 a (D, 1)
    tensor with strides (1, D). Autograd keeps a gradient whose strides differ from its
    parameter's only on a size-1 dimension, and DDP, which compares them all, then warns "Grad
    strides do not match bucket view strides" and copies it into its bucket through mismatched
    views on every step; a gradient strided otherwise autograd copies anyway. Written in the
    parameter's own layout here, it is kept as it is.
    """
    if grad.stride() == param.stride():
        return grad
    return torch.empty_like(param, dtype=grad.dtype).copy_(grad)

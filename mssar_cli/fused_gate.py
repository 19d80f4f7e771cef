"""A regional recalibration as one autograd node with a hand-written backward (paper §3.2, Eqs. 1-2).

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
  When ``x`` is a BN output rebuilt for this backward alone (:mod:`mssar_cli.models.bn_recompute`)
  ``grad * x`` is written into it.

BN statistics and running averages are ``nn.BatchNorm1d``'s own (the same kernel,
:mod:`mssar_cli.batchnorm`). Two layouts of the regions (:meth:`mssar_cli.recalibration.MSSAR`
chooses):

* :class:`BandLayout`, maps larger than ``MATRIX_MAP`` whose regions are unions of equal
  ``sh x sw`` blocks (e.g. 8 x 8 blocks of a 32 x 32 map for scales {1, 2, 4}): the map is cut
  into bands of ``sh`` rows and the cells are single columns of a band; one strided sum over the
  band's rows, then region means by one product; weights spread onto the cells and broadcast over
  the ``sh`` rows.
* :class:`MatrixLayout`, maps of up to ``MATRIX_MAP`` positions, and other partitions (7 x 7 or
  14 x 14 with K = 4) of up to ``SMALL_MAP``: the regions of every scale are the rows of a
  pooling matrix ``P`` (``1/area`` on the region's positions) and of a spreading matrix ``S``
  (``1/L`` on them), so the pooling, the mean over scales and the spread back to the map are each
  one (batched) matrix product.

Measured on the project's 2-core CPU (ResNet-56 shapes, batch 128, README "Performance"). Double
backward is not supported (``once_differentiable``); a second backward through a retained graph
is.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from mssar_cli.batchnorm import batch_norm_with_statistics, take_disposable, uses_batch_statistics
from mssar_cli.partition import region_of_index

# Layout choice, measured inside a ResNet-56 training step on the project's 2-core CPU: maps of up
# to MATRIX_MAP positions (8x8) use MatrixLayout, where strided reductions and broadcasts over
# blocks of 2 elements are slower than BLAS products with the region matrices; larger ones with an
# equal-block refined grid use BandLayout (16x16: 5.4 ms per module against 8.1 ms as matrices,
# measured before the hand-written backward),
# and other maps of up to SMALL_MAP positions (7x7 or 14x14 with K = 4) use MatrixLayout.
MATRIX_MAP = 64
SMALL_MAP = 256

@lru_cache(maxsize=128)
def _region_matrices(
    rows: tuple[int, ...],
    cols: tuple[int, ...],
    scales: tuple[int, ...],
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooling ``P`` and spreading ``S`` matrices, (sum K^2, cells), regions of each scale in turn.

    The map is cut into cells of ``rows[i] x cols[j]`` positions (single positions, or the blocks
    of a refined grid); every region of every scale is a union of cells (:mod:`mssar_cli.partition`).
    Region (i, j)'s row of ``P`` weighs each of its cells by the cell's share of the region's
    area (so ``P`` applied to cell means gives region means); its row of ``S`` is 1/L on its
    cells (the mean over scales of the weights a cell receives).
    """
    row_cuts = [0, *itertools.accumulate(rows)]
    col_cuts = [0, *itertools.accumulate(cols)]
    area = torch.outer(torch.tensor(rows, dtype=torch.float64), torch.tensor(cols, dtype=torch.float64))
    members = []
    for k in scales:
        of_row, of_col = region_of_index(row_cuts[-1], k), region_of_index(col_cuts[-1], k)
        row_region = torch.tensor([of_row[start] for start in row_cuts[:-1]])
        col_region = torch.tensor([of_col[start] for start in col_cuts[:-1]])
        for i in range(k):
            for j in range(k):
                members.append(torch.outer(row_region == i, col_region == j).flatten())
    member = torch.stack(members).to(torch.float64)
    weighted = member * area.flatten()
    pool = weighted / weighted.sum(1, keepdim=True)
    spread = member / len(scales)
    return pool.to(device=device, dtype=dtype), spread.to(device=device, dtype=dtype)


@lru_cache(maxsize=128)
def _band_matrices(
    scales: tuple[int, ...], height: int, width: int, sh: int, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Region-mean and spreading matrices over ``sh x 1`` cells (one band, one column).

    ``mean`` (sum K^2, H/sh * W) is 1/area on a region's cells, so applied to the cells' sums it
    gives the region means; ``spread`` is :func:`_region_matrices`' 1/L.
    """
    pool, spread = _region_matrices((sh,) * (height // sh), (1,) * width, scales, device, dtype)
    return pool / sh, spread  # a cell's share of its region's area is sh / area


def _product(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``grad * x``; written into ``x`` when ``x`` is a disposable rebuilt BN output (it is
    needed for nothing else), which saves a full-size allocation. The buffer may become ``x``'s
    gradient, so its mark is taken off and it is detached from the graph ``x`` came with."""
    if x.dtype == grad.dtype and x.is_contiguous() and take_disposable(x):
        return x.detach().mul_(grad)
    return grad * x


@dataclass(frozen=True)
class MatrixLayout:
    """Cells are single positions: pooling and spreading are one (batched) product each."""

    scales: tuple[int, ...]
    height: int
    width: int

    def _matrices(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ones_h, ones_w = (1,) * self.height, (1,) * self.width
        return _region_matrices(ones_h, ones_w, self.scales, like.device, like.dtype)

    def pool(self, source: torch.Tensor) -> torch.Tensor:
        n, c = source.shape[:2]
        pool, _ = self._matrices(source)
        return torch.matmul(pool, source.view(n, c, -1).transpose(1, 2))

    def _spread(self, weights: torch.Tensor, like: torch.Tensor, out=None) -> torch.Tensor:
        n, d = like.shape[:2]
        _, spread = self._matrices(like)
        weights = weights.transpose(1, 2).to(spread.dtype)
        if out is None:
            return torch.matmul(weights, spread).view(like.shape)
        return torch.bmm(weights, spread.expand(n, -1, -1), out=out.view(n, d, -1)).view(like.shape)

    def scale(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self._spread(weights, x).mul_(x)  # in place: one full-size allocation

    def weight_grad(self, grad: torch.Tensor, x: torch.Tensor):
        """The weights' gradient, and ``grad * x`` as scratch space for :meth:`input_grad`."""
        n, d = x.shape[:2]
        product = _product(grad, x)
        _, spread = self._matrices(product)
        return torch.matmul(spread, product.view(n, d, -1).transpose(1, 2)), product

    def input_grad(
        self,
        grad: torch.Tensor,
        weights: torch.Tensor,
        pooled_grad: torch.Tensor | None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """grad * weights, plus the pooling's gradient when ``x`` is its own source (into ``out``)."""
        out = self._spread(weights, grad, out).mul_(grad)
        if pooled_grad is not None:
            n, c = grad.shape[:2]
            pool, _ = self._matrices(grad)
            pooled_grad = pooled_grad.transpose(1, 2).to(pool.dtype)
            out.view(n, c, -1).baddbmm_(pooled_grad, pool.expand(n, -1, -1))
        return out

    def source_grad(
        self, pooled_grad: torch.Tensor, shape: torch.Size, like: torch.Tensor
    ) -> torch.Tensor:
        pool, _ = self._matrices(like)
        return torch.matmul(pooled_grad.transpose(1, 2).to(pool.dtype), pool).view(shape)


@dataclass(frozen=True)
class BandLayout:
    """Cells are ``sh x 1``: one column of a band of ``sh`` rows; W stays the contiguous axis.

    Pooling sums each band over its ``sh`` rows (one strided reduction) and takes the region means
    with one product; values that go back to the map are a tensor of the cells (1/sh of the map)
    that broadcasts over the band's rows.
    """

    scales: tuple[int, ...]
    height: int
    width: int
    sh: int

    def _matrices(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _band_matrices(self.scales, self.height, self.width, self.sh, like.device, like.dtype)

    def _bands(self, t: torch.Tensor) -> torch.Tensor:
        n, c = t.shape[:2]
        return t.view(n, c, self.height // self.sh, self.sh, self.width)

    def _band(self, cells: torch.Tensor) -> torch.Tensor:
        """(N, C, H/sh * W) values of the cells as (N, C, H/sh, 1, W)."""
        n, c = cells.shape[:2]
        return cells.view(n, c, self.height // self.sh, 1, self.width)

    def _cell_sums(self, t: torch.Tensor) -> torch.Tensor:
        """Sums of a full-size map over each cell's ``sh`` rows, (N, C, H/sh * W).

        Bands of 2 or 4 rows are summed by adding halves (each add runs over contiguous runs of
        ``sh/2 * W`` values); a strided ``sum`` over so few rows is slower (16x16x32 maps of batch
        128, 4-row bands: 0.37 against 0.61 ms on the project's CPU). Taller bands use ``sum``
        (8-row bands: 0.80 against 1.05 ms with halves). For bf16 maps the halves round to bf16
        twice where ``sum`` accumulates in fp32 (4-row bands: cell sums 2.5e-3 against 1.7e-3
        relative error); the module's output under bf16 autocast moves by at most 1.6e-5.
        """
        n, c = t.shape[:2]
        bands = self._bands(t)
        if self.sh in (2, 4):
            while bands.shape[3] > 1:
                half = bands.shape[3] // 2
                bands = bands[:, :, :, :half] + bands[:, :, :, half:]
            return bands.view(n, c, -1)
        return bands.sum(3).view(n, c, -1)

    def pool(self, source: torch.Tensor) -> torch.Tensor:
        mean, _ = self._matrices(source)
        return torch.matmul(mean, self._cell_sums(source).transpose(1, 2))

    def _spread(self, weights: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        _, spread = self._matrices(like)
        return self._band(torch.matmul(weights.transpose(1, 2).to(spread.dtype), spread))

    def scale(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return (self._bands(x) * self._spread(weights, x)).view(x.shape)

    def weight_grad(self, grad: torch.Tensor, x: torch.Tensor):
        """The weights' gradient, and ``grad * x`` as scratch space for :meth:`input_grad`."""
        product = _product(grad, x)
        cells = self._cell_sums(product)
        _, spread = self._matrices(cells)
        return torch.matmul(spread, cells.transpose(1, 2)), product

    def _mean_grad(self, pooled_grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Gradient of the region means with respect to every position, as (N, C, H/sh, 1, W)."""
        mean, _ = self._matrices(like)
        return self._band(torch.matmul(pooled_grad.transpose(1, 2).to(mean.dtype), mean))

    def input_grad(
        self,
        grad: torch.Tensor,
        weights: torch.Tensor,
        pooled_grad: torch.Tensor | None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """grad * weights, plus the pooling's gradient when ``x`` is its own source (into ``out``)."""
        spread = self._spread(weights, grad)
        bands = self._bands(grad)
        out = None if out is None else self._bands(out)
        if pooled_grad is None:
            result = torch.mul(bands, spread, out=out)
        else:
            result = torch.addcmul(self._mean_grad(pooled_grad, grad), bands, spread, out=out)
        return result.view(grad.shape)

    def source_grad(
        self, pooled_grad: torch.Tensor, shape: torch.Size, like: torch.Tensor
    ) -> torch.Tensor:
        n, c = shape[:2]
        mean_grad = self._mean_grad(pooled_grad, like)
        return mean_grad.expand(n, c, self.height // self.sh, self.sh, self.width).reshape(shape)


Layout = BandLayout | MatrixLayout


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
    bns: tuple[nn.BatchNorm1d, ...]
    region_rows: tuple[slice, ...]  # per scale, its K*K regions
    hidden_cols: tuple[slice, ...]  # per scale, its D' hidden units

    @property
    def units(self) -> int:
        """L*D', the hidden units of all scales (without the L indicator rows)."""
        return self.reduce.shape[0]

    def blocks(self):
        """(bn, index of its block in (L*D', N, regions) tensors) of every scale."""
        return [
            (bn, (cols, slice(None), rows))
            for bn, rows, cols in zip(self.bns, self.region_rows, self.hidden_cols)
        ]


def _stack(
    params: Sequence[torch.Tensor], bns: Sequence[nn.BatchNorm1d], scales: Sequence[int], dtype
) -> _Stack:
    """The stacked MLPs from the parameters in :func:`_branch_params`' order."""
    reduces, expands, biases = params[0::5], params[3::5], params[4::5]
    width = reduces[0].shape[0]
    region_rows, hidden_cols, start = [], [], 0
    for i, k in enumerate(scales):
        region_rows.append(slice(start, start + k * k))
        hidden_cols.append(slice(i * width, (i + 1) * width))
        start += k * k
    return _Stack(
        reduce=torch.cat(reduces).to(dtype),
        expand=torch.cat([*expands, torch.stack(biases, 1)], 1).to(dtype),
        bns=tuple(bns),
        region_rows=tuple(region_rows),
        hidden_cols=tuple(hidden_cols),
    )


# (submodule, its parameters) of a ScaleBranch, in the order of _FusedGate.backward's gradients
_BRANCH_PARAMETERS = (
    ("reduce", ("weight",)),
    ("bn", ("weight", "bias")),
    ("expand", ("weight", "bias")),
)


def _branch_params(branches: Sequence[nn.Module]) -> list[torch.Tensor]:
    """Every scale's parameters, in the order :meth:`_FusedGate.backward` returns their gradients.

    Read from the modules' parameter dictionaries (``nn.Module.__getattr__`` costs about a
    microsecond per access, and this runs on every forward), through ``getattr`` where a weight is
    not there: a parametrized weight (``torch.nn.utils.parametrize``) or a DataParallel replica's.
    """
    params = []
    for branch in branches:
        modules = branch._modules
        for name, attributes in _BRANCH_PARAMETERS:
            module = modules[name]
            own = module._parameters
            for attribute in attributes:
                param = own.get(attribute)
                params.append(getattr(module, attribute) if param is None else param)
    return params


def supports(branches: Sequence[nn.Module]) -> bool:
    """Whether the fused gate can differentiate these branches by hand: plain affine BatchNorm1d
    (a SyncBatchNorm, or BN without affine parameters, takes the autograd path)."""
    return all(type(b.bn) is nn.BatchNorm1d and b.bn.affine for b in branches)


def _weights(stack: _Stack, active: torch.Tensor) -> torch.Tensor:
    """sigmoid(Ω2 · active + b2) of every region, (N, regions, D); ``active`` is
    (L*D' + L, N, regions) with its indicator rows."""
    depth, n, r = active.shape
    return (active.view(depth, n * r).t() @ stack.expand.t()).view(n, r, -1).sigmoid_()


def _mlp_forward(stack: _Stack, rows: torch.Tensor, for_backward: bool):
    """Eq. 1 of every scale on its regions' means, rows (N, regions, C_source).

    Returns the weights (N, regions, D); the hidden layer after BN + ReLU as
    (L*D' + L, N, regions), hidden units first, zero outside each scale's block, with b2's
    indicator rows (:class:`_Stack`); per scale its block of the hidden layer before BN,
    (D', N, K*K) and contiguous; and per scale the statistics BN used (with copies of the running
    ones in evaluation mode when ``for_backward``). BN updates its running statistics as
    ``nn.BatchNorm1d`` does (once per forward).

    Hidden units first, the products that make and use the hidden layer have their long
    dimension last, which MKL runs faster (Ω1 for 2688 rows of 32 channels: 56 against 107 us);
    BN on a contiguous block runs its fast kernel (a 7 x 128 x 16 block: forward 52 against
    157 us, backward 24 against 101 us, measured on the project's CPU).
    """
    n, r, c = rows.shape
    hidden = (stack.reduce @ rows.view(n * r, c).t()).view(-1, n, r)
    active = hidden.new_zeros(stack.units + len(stack.bns), n, r)
    for i, rows_of in enumerate(stack.region_rows):
        active[stack.units + i, :, rows_of] = 1  # b2's indicator rows
    blocks, stats = [], []
    for bn, block in stack.blocks():  # BN's channels are the hidden units
        own = hidden[block].contiguous()  # (D', N, K*K)
        normalised, mean, invstd = batch_norm_with_statistics(bn, own.view(1, own.shape[0], -1))
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
    for (bn, block), hidden, (mean, invstd, running) in zip(stack.blocks(), blocks, stats):
        running_mean, running_var = running if running is not None else (None, None)
        flat = (1, hidden.shape[0], -1)
        grad_block, grad_gamma, grad_beta = torch.ops.aten.native_batch_norm_backward(
            grad_active[block].contiguous().view(flat), hidden.view(flat), bn.weight,
            running_mean, running_var, mean, invstd, running is None, bn.eps, [True, True, True],
        )
        grad_hidden[block] = grad_block.view(hidden.shape)
        grad_bn.append((grad_gamma, grad_beta))
    flat_hidden = grad_hidden.view(units, n * r)
    grad_reduce = flat_hidden @ rows.view(n * r, c)
    grad_rows = (flat_hidden.t() @ stack.reduce).view(n, r, c) if need_rows else None
    per_scale = []
    for i, (cols, (grad_gamma, grad_beta)) in enumerate(zip(stack.hidden_cols, grad_bn)):
        per_scale += [
            grad_reduce[cols], grad_gamma, grad_beta, grad_expand[:, cols], grad_expand[:, units + i]
        ]
    return grad_rows, per_scale


def _gate_forward(x, source, layout, branches, params, for_backward: bool):
    """``x * spread(mlps(pool(source)))`` and what backward needs: the region means (as rows),
    the stacked MLPs and the MLPs' hidden layers and BN statistics (see :func:`_mlp_forward`)."""
    with torch.autocast(x.device.type, enabled=False):  # the map's dtype, MLPs in fp32 or wider
        regions = layout.pool(x if source is None else source)
        dtype = torch.promote_types(regions.dtype, params[0].dtype)
        stack = _stack(params, [b.bn for b in branches], layout.scales, dtype)
        regions = regions.to(dtype)
        weights, hidden, active, stats = _mlp_forward(stack, regions, for_backward)
        return layout.scale(x, weights), (regions, stack, hidden, active, stats)


class _FusedGate(torch.autograd.Function):
    """``x * spread(mlps(pool(source)))``; backward as in the module docstring."""

    @staticmethod
    def forward(ctx, x, source, layout, branches, *params):
        # the weights are rebuilt in backward from ``active``
        out, (regions, stack, hidden, active, stats) = _gate_forward(
            x, source, layout, branches, params, for_backward=True
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
        hidden = saved[: len(stack.bns)]
        grad = grad.contiguous()
        weights = _weights(stack, active)
        source_needs = ctx.needs_input_grad[0 if ctx.own else 1]
        param_needs = ctx.needs_input_grad[4:]
        grad_regions, param_grads = None, [None] * len(param_needs)
        scratch = None  # a full-size buffer backward no longer needs (``grad * x``)
        if source_needs or any(param_needs):
            grad_weights, scratch = layout.weight_grad(grad, x)
            grad_regions, param_grads = _mlp_backward(
                stack, regions, hidden, active, ctx.stats, weights,
                grad_weights.to(weights.dtype), source_needs,
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
            *(g if needed else None for g, needed in zip(param_grads, param_needs)),
        )


def fused_gate(
    x: torch.Tensor,
    source: torch.Tensor | None,
    layout: Layout,
    branches: Sequence[nn.Module],
) -> torch.Tensor:
    """``x`` times the mean over scales of the branches' weights on their regions of ``source``.

    ``branches`` are the scales' :class:`~mssar_cli.recalibration.ScaleBranch` modules, in the
    order of ``layout.scales`` (:func:`supports` must hold); ``source`` None means ``x`` is its
    own source. Outside autograd (nothing needs a gradient) it runs the same steps without a node.
    """
    params = _branch_params(branches)
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad
        or (source is not None and source.requires_grad)
        or any(p.requires_grad for p in params)
    )
    if not needs_grad:
        with torch.no_grad():
            return _gate_forward(x, source, layout, branches, params, for_backward=False)[0]
    return _FusedGate.apply(x, source, layout, branches, *params)

"""The full-size work of a regional recalibration as one autograd node (paper §3.2, Eq. 2).

A regional MS-SAR touches the full ``(N, D, H, W)`` map only twice: it pools the source onto a
few regions and multiplies ``x`` by the weights of those regions. Everything in between (every
scale's MLP, BN and sigmoid, the mean over scales) runs on ``N x regions`` rows. Left to
autograd, the two full-size steps cost five full-size passes in backward (two products, a
materialised pooling gradient, the sum of ``x``'s two gradients and a reduction). Here they are
one :class:`torch.autograd.Function` whose backward does two: one pass over ``grad * x`` for the
weights' gradient, one ``addcmul`` that writes ``x``'s whole gradient (its multiply path plus its
pooling path). The small graph in between is built once in forward (BN running statistics are
updated once) and differentiated with :func:`torch.autograd.grad` in backward.

Two layouts of the regions (:meth:`mssar_cli.recalibration.MSSAR` chooses):

* :class:`BandLayout`, maps larger than ``MATRIX_MAP`` whose regions are unions of equal
  ``sh x sw`` blocks (e.g. 8 x 8 blocks of a 32 x 32 map for scales {1, 2, 4}); block sums over
  W-contiguous bands, weights widened along W only and broadcast over the ``sh`` rows.
* :class:`MatrixLayout`, maps of up to ``MATRIX_MAP`` positions, and other partitions (7 x 7 or
  14 x 14 with K = 4) of up to ``SMALL_MAP``: the regions of every scale are the rows of a pooling matrix ``P`` (``1/area`` on the
  region's positions) and of a spreading matrix ``S`` (``1/L`` on them), so the pooling, the
  mean over scales and the spread back to the map are each one matrix product.

Measured on the project's 2-core CPU (ResNet-56 shapes, batch 128, README "Performance"). Not
supported: double backward, and a second backward through the same graph (the small graph is
freed by the first, like any non-retained graph).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch

from mssar_cli.partition import region_of_index

# Layout choice, measured inside a ResNet-56 training step on the project's 2-core CPU: maps of up
# to MATRIX_MAP positions (8x8) use MatrixLayout, where strided reductions and broadcasts over
# blocks of 2 elements are slower than BLAS products with the region matrices; larger ones with an
# equal-block refined grid use BandLayout (16x16: 5.4 ms per module against 8.1 ms as matrices),
# and other maps of up to SMALL_MAP positions (7x7 or 14x14 with K = 4) use MatrixLayout.
MATRIX_MAP = 64
SMALL_MAP = 256

Branches = Callable[[list[torch.Tensor]], list[torch.Tensor]]


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


def _block_sum(t: torch.Tensor, sh: int, sw: int) -> torch.Tensor:
    """Sums of the ``sh x sw`` blocks of a contiguous (N, C, H, W) map, shape (N, C, H/sh, W/sw)."""
    n, c, height, width = t.shape
    if sh > 1:
        t = t.view(n, c, height // sh, sh, width).sum(3)
    if sw > 1:
        t = t.view(n, c, height // sh, width // sw, sw).sum(4)
    return t


@dataclass(frozen=True)
class MatrixLayout:
    """Cells are single positions: pooling and spreading are one matrix product each."""

    scales: tuple[int, ...]
    height: int
    width: int

    def _matrices(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ones_h, ones_w = (1,) * self.height, (1,) * self.width
        return _region_matrices(ones_h, ones_w, self.scales, like.device, like.dtype)

    def pool(self, source: torch.Tensor) -> torch.Tensor:
        n, c = source.shape[:2]
        pool, _ = self._matrices(source)
        return (source.reshape(n * c, -1) @ pool.t()).view(n, c, -1)

    def _spread(self, weights: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        n, d = like.shape[:2]
        _, spread = self._matrices(like)
        return (weights.reshape(n * d, -1).to(spread.dtype) @ spread).view(like.shape)

    def scale(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return x * self._spread(weights, x)

    def weight_grad(self, grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        n, d = x.shape[:2]
        _, spread = self._matrices(grad)
        return ((grad * x).reshape(n * d, -1) @ spread.t()).view(n, d, -1)

    def input_grad(
        self, grad: torch.Tensor, weights: torch.Tensor, pooled_grad: torch.Tensor | None
    ) -> torch.Tensor:
        """grad * weights, plus the pooling's gradient when ``x`` is its own source."""
        spread = self._spread(weights, grad)
        if pooled_grad is None:
            return grad * spread
        return torch.addcmul(self.source_grad(pooled_grad, grad.shape, grad), grad, spread)

    def source_grad(
        self, pooled_grad: torch.Tensor, shape: torch.Size, like: torch.Tensor
    ) -> torch.Tensor:
        n, c = shape[:2]
        pool, _ = self._matrices(like)
        return (pooled_grad.reshape(n * c, -1).to(pool.dtype) @ pool).view(shape)


@dataclass(frozen=True)
class BandLayout:
    """Cells are equal ``sh x sw`` blocks, handled as W-contiguous bands of ``sh`` rows.

    Block sums reduce over the ``sh`` rows of a band, then over ``sw`` columns; block values are
    widened along W only (1/sh of the map) and broadcast over the band's rows, which keeps W the
    innermost, contiguous dimension of every full-size operand.
    """

    scales: tuple[int, ...]
    height: int
    width: int
    sh: int
    sw: int

    def _matrices(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows, cols = (self.sh,) * (self.height // self.sh), (self.sw,) * (self.width // self.sw)
        return _region_matrices(rows, cols, self.scales, like.device, like.dtype)

    def _bands(self, t: torch.Tensor) -> torch.Tensor:
        n, c = t.shape[:2]
        return t.view(n, c, self.height // self.sh, self.sh, self.width)

    def _band(self, cells: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """(N*C, cells) values as (N, C, H/sh, 1, W): widened along W, broadcast over sh rows."""
        n, c = shape[:2]
        cells = cells.view(n, c, self.height // self.sh, self.width // self.sw)
        wide = cells if self.sw == 1 else cells.repeat_interleave(self.sw, dim=3)
        return wide.unsqueeze(3)

    def pool(self, source: torch.Tensor) -> torch.Tensor:
        n, c = source.shape[:2]
        pool, _ = self._matrices(source)
        cells = _block_sum(source, self.sh, self.sw).reshape(n * c, -1) / (self.sh * self.sw)
        return (cells @ pool.t()).view(n, c, -1)

    def _cell_weights(self, weights: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        n, d = like.shape[:2]
        _, spread = self._matrices(like)
        return weights.reshape(n * d, -1).to(spread.dtype) @ spread

    def scale(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return (self._bands(x) * self._band(self._cell_weights(weights, x), x.shape)).view(x.shape)

    def weight_grad(self, grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        n, d = x.shape[:2]
        _, spread = self._matrices(grad)
        cells = _block_sum(grad * x, self.sh, self.sw).reshape(n * d, -1)
        return (cells @ spread.t()).view(n, d, -1)

    def _mean_grad(self, pooled_grad: torch.Tensor, shape: torch.Size, like: torch.Tensor):
        n, c = shape[:2]
        pool, _ = self._matrices(like)
        cells = pooled_grad.reshape(n * c, -1).to(pool.dtype) @ pool
        return self._band(cells / (self.sh * self.sw), shape)

    def input_grad(
        self, grad: torch.Tensor, weights: torch.Tensor, pooled_grad: torch.Tensor | None
    ) -> torch.Tensor:
        """grad * weights, plus the pooling's gradient when ``x`` is its own source."""
        spread = self._band(self._cell_weights(weights, grad), grad.shape)
        if pooled_grad is None:
            return (self._bands(grad) * spread).view(grad.shape)
        mean_grad = self._mean_grad(pooled_grad, grad.shape, grad)
        return torch.addcmul(mean_grad, self._bands(grad), spread).view(grad.shape)

    def source_grad(
        self, pooled_grad: torch.Tensor, shape: torch.Size, like: torch.Tensor
    ) -> torch.Tensor:
        n, c = shape[:2]
        mean_grad = self._mean_grad(pooled_grad, shape, like)
        return mean_grad.expand(n, c, self.height // self.sh, self.sh, self.width).reshape(shape)


Layout = BandLayout | MatrixLayout


def _split_rows(regions: torch.Tensor, scales: tuple[int, ...]) -> list[torch.Tensor]:
    """(N, C, sum K^2) -> per scale, the (N*K*K, C) rows its MLP takes (contiguous copies)."""
    c = regions.shape[1]
    parts = regions.split([k * k for k in scales], dim=2)
    return [part.transpose(1, 2).reshape(-1, c) for part in parts]


def _join_rows(rows: Sequence[torch.Tensor], n: int) -> torch.Tensor:
    """The inverse of :func:`_split_rows`: per-scale (N*K*K, C) rows -> (N, C, sum K^2)."""
    return torch.cat([r.view(n, -1, r.shape[1]) for r in rows], 1).transpose(1, 2)


class _FusedGate(torch.autograd.Function):
    """``x * spread(branches(pool(source)))``; backward as in the module docstring."""

    @staticmethod
    def forward(ctx, x, source, layout, branches, *params):
        n = x.shape[0]
        own = source is None
        source_needs = ctx.needs_input_grad[0 if own else 1]
        rows = _split_rows(layout.pool(x if own else source), layout.scales)
        with torch.enable_grad():
            rows = [r.requires_grad_(source_needs) for r in rows]
            outputs = branches(rows)
        weights = _join_rows([z.detach() for z in outputs], n)
        ctx.layout, ctx.graph, ctx.params = layout, (rows, outputs), params
        ctx.own, ctx.source_needs = own, source_needs
        ctx.source_meta = None if own else (source.shape, source.dtype)
        ctx.save_for_backward(x)  # the weights are not saved: the graph's outputs hold them
        return layout.scale(x, weights)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        if ctx.graph is None:
            raise RuntimeError(
                "MSSAR's fused gate supports one backward pass per forward (retain_graph=True "
                "does not keep its inner graph); use implementation='direct' for more"
            )
        rows, outputs = ctx.graph
        layout, n = ctx.layout, x.shape[0]
        weights = _join_rows([z.detach() for z in outputs], n)
        grad = grad.contiguous()
        param_needs = ctx.needs_input_grad[4:]
        wanted = [p for p, needed in zip(ctx.params, param_needs) if needed]
        inputs = (list(rows) if ctx.source_needs else []) + wanted
        grads: list[torch.Tensor | None] = []
        if inputs:
            weight_grad = _split_rows(layout.weight_grad(grad, x), layout.scales)
            weight_grad = [g.to(z.dtype) for g, z in zip(weight_grad, outputs)]
            grads = list(torch.autograd.grad(outputs, inputs, weight_grad, allow_unused=True))
        ctx.graph = ctx.params = None
        pooled_grad = None
        if ctx.source_needs:
            pooled_grad = _join_rows(grads[: len(rows)], n)
            grads = grads[len(rows) :]
        grad_x = grad_source = None
        if ctx.own:
            if ctx.needs_input_grad[0]:
                grad_x = layout.input_grad(grad, weights, pooled_grad).to(x.dtype)
        else:
            if ctx.needs_input_grad[0]:
                grad_x = layout.input_grad(grad, weights, None).to(x.dtype)
            if pooled_grad is not None:
                shape, dtype = ctx.source_meta
                grad_source = layout.source_grad(pooled_grad, shape, grad).to(dtype)
        param_grads = iter(grads)
        return (
            grad_x,
            grad_source,
            None,
            None,
            *(next(param_grads) if needed else None for needed in param_needs),
        )


def fused_gate(
    x: torch.Tensor,
    source: torch.Tensor | None,
    layout: Layout,
    branches: Branches,
    params: Sequence[torch.Tensor],
) -> torch.Tensor:
    """``x`` times the mean over scales of ``branches``' weights on their regions of ``source``.

    ``branches`` maps the per-scale (N*K*K, C) rows of region means to per-scale (N*K*K, D)
    weights; ``params`` are the tensors they use. ``source`` None means ``x`` is its own source.
    Outside autograd (nothing needs a gradient) it runs the same steps without a graph.
    """
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad
        or (source is not None and source.requires_grad)
        or any(p.requires_grad for p in params)
    )
    if not needs_grad:
        regions = layout.pool(x if source is None else source)
        outputs = branches(_split_rows(regions, layout.scales))
        return layout.scale(x, _join_rows(outputs, x.shape[0]))
    return _FusedGate.apply(x, source, layout, branches, *params)

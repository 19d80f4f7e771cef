"""How the fused gate (:mod:`mssar_cli.fused_gate`) meets the full-size map (paper §3.2, Eq. 2).

A regional MS-SAR touches the ``(N, D, H, W)`` map in four places: it pools the source onto the
regions of every scale, multiplies ``x`` by the mean over scales of the regions' weights, and in
backward reduces ``grad * x`` onto the regions and writes the gradients of ``x`` (and of the
source). A *layout* does these four steps for one map size and scale set; everything between
them runs on ``N x regions`` rows. The regions of every scale, in turn, are rows of the tensors a
layout exchanges, ``(N, regions, C)``, each scale's regions row-major.

* :class:`MatrixLayout`: cells are single positions; the regions of every scale are the rows of a
  pooling matrix ``P`` (``1/area`` on the region's positions) and of a spreading matrix ``S``
  (``1/L`` on them), so the pooling, the mean over scales and the spread back to the map are each
  one (batched) matrix product. Any partition.
* :class:`BandLayout`: maps whose refined grid (:mod:`mssar_cli.partition`) has equal blocks of
  ``sh`` rows: the map is cut into bands of ``sh`` rows and the cells are single columns of a
  band; one strided sum over the band's rows, then region means by one product; weights spread
  onto the cells broadcast over the band's rows, so nothing full-size is built but the result.

Which layout a map gets is :func:`mssar_cli.fused_gate.choose_layout`'s decision.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import lru_cache

import torch

from mssar_cli.partition import region_of_index, regions_along


def region_counts(scales: tuple[int, ...], height: int, width: int) -> tuple[int, ...]:
    """Regions of every scale on an ``height x width`` map (K x K, clamped to the map)."""
    return tuple(regions_along(height, k) * regions_along(width, k) for k in scales)


@lru_cache(maxsize=128)
def _region_matrices(
    rows: tuple[int, ...],
    cols: tuple[int, ...],
    scales: tuple[int, ...],
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooling ``P`` and spreading ``S`` matrices, (regions, cells), each scale's regions in turn.

    The map is cut into cells of ``rows[i] x cols[j]`` positions (single positions, or the blocks
    of a refined grid); every region of every scale is a union of cells
    (:mod:`mssar_cli.partition`).
    Region (i, j)'s row of ``P`` weighs each of its cells by the cell's share of the region's
    area (so ``P`` applied to cell means gives region means); its row of ``S`` is 1/L on its
    cells (the mean over scales of the weights a cell receives).
    """
    row_cuts = [0, *itertools.accumulate(rows)]
    col_cuts = [0, *itertools.accumulate(cols)]
    height, width = row_cuts[-1], col_cuts[-1]
    area = torch.outer(
        torch.tensor(rows, dtype=torch.float64), torch.tensor(cols, dtype=torch.float64)
    )
    members = []
    for k in scales:
        of_row, of_col = region_of_index(height, k), region_of_index(width, k)
        row_region = torch.tensor([of_row[start] for start in row_cuts[:-1]])
        col_region = torch.tensor([of_col[start] for start in col_cuts[:-1]])
        for i in range(regions_along(height, k)):
            for j in range(regions_along(width, k)):
                members.append(torch.outer(row_region == i, col_region == j).flatten())
    member = torch.stack(members).to(torch.float64)
    weighted = member * area.flatten()
    pool = weighted / weighted.sum(1, keepdim=True)
    spread = member / len(scales)
    return pool.to(device=device, dtype=dtype), spread.to(device=device, dtype=dtype)


@lru_cache(maxsize=128)
def _band_matrices(
    scales: tuple[int, ...],
    height: int,
    width: int,
    sh: int,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Region-mean and spreading matrices over ``sh x 1`` cells (one band, one column).

    ``mean`` is 1/area on a region's cells, so applied to the cells' sums it gives the region
    means; ``spread`` is :func:`_region_matrices`' 1/L.
    """
    pool, spread = _region_matrices((sh,) * (height // sh), (1,) * width, scales, device, dtype)
    return pool / sh, spread  # a cell's share of its region's area is sh / area


@dataclass(frozen=True)
class MatrixLayout:
    """Cells are single positions: pooling and spreading are one (batched) product each."""

    scales: tuple[int, ...]
    height: int
    width: int

    @property
    def regions(self) -> tuple[int, ...]:
        return region_counts(self.scales, self.height, self.width)

    def _matrices(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ones_h, ones_w = (1,) * self.height, (1,) * self.width
        return _region_matrices(ones_h, ones_w, self.scales, like.device, like.dtype)

    def pool(self, source: torch.Tensor) -> torch.Tensor:
        """Region means of ``source``, (N, regions, C)."""
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
        """``x`` times the mean over scales of its regions' weights (N, regions, D)."""
        return self._spread(weights, x).mul_(x)  # in place: one full-size allocation

    def weight_grad(self, grad: torch.Tensor, x: torch.Tensor):
        """The weights' gradient, and ``grad * x``, a buffer :meth:`input_grad` may write into."""
        n, d = x.shape[:2]
        product = grad * x
        _, spread = self._matrices(product)
        return torch.matmul(spread, product.view(n, d, -1).transpose(1, 2)), product

    def input_grad(
        self,
        grad: torch.Tensor,
        weights: torch.Tensor,
        pooled_grad: torch.Tensor | None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """grad * weights, plus the pooling's gradient if ``x`` is its own source (into ``out``)."""
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
        """The gradient of a separate source, from the gradient of its region means."""
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

    @property
    def regions(self) -> tuple[int, ...]:
        return region_counts(self.scales, self.height, self.width)

    def _matrices(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        device, dtype = like.device, like.dtype
        return _band_matrices(self.scales, self.height, self.width, self.sh, device, dtype)

    def _bands(self, t: torch.Tensor) -> torch.Tensor:
        n, c = t.shape[:2]
        return t.view(n, c, self.height // self.sh, self.sh, self.width)

    def _band(self, cells: torch.Tensor) -> torch.Tensor:
        """(N, C, H/sh * W) values of the cells as (N, C, H/sh, 1, W)."""
        n, c = cells.shape[:2]
        return cells.view(n, c, self.height // self.sh, 1, self.width)

    def _cell_sums(self, t: torch.Tensor) -> torch.Tensor:
        """Sums of a full-size map over each cell's ``sh`` rows, (N, C, H/sh * W).

        Bands of 2 or 4 rows are summed by adding halves: each add then runs over contiguous runs
        of ``sh/2 * W`` values, where a strided ``sum`` over so few rows spends its time on the
        stride. Taller bands use ``sum``, whose reduction amortises the stride. For bf16 maps the
        halves round to bf16 twice where ``sum`` accumulates in fp32: the cell sums' error stays
        of the order of bf16's own rounding, and the gate's output moves far less than that.
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
        """Region means of ``source``, (N, regions, C)."""
        mean, _ = self._matrices(source)
        return torch.matmul(mean, self._cell_sums(source).transpose(1, 2))

    def _spread(self, weights: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        _, spread = self._matrices(like)
        return self._band(torch.matmul(weights.transpose(1, 2).to(spread.dtype), spread))

    def scale(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``x`` times the mean over scales of its regions' weights (N, regions, D)."""
        return (self._bands(x) * self._spread(weights, x)).view(x.shape)

    def weight_grad(self, grad: torch.Tensor, x: torch.Tensor):
        """The weights' gradient, and ``grad * x``, a buffer :meth:`input_grad` may write into."""
        product = grad * x
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
        """grad * weights, plus the pooling's gradient if ``x`` is its own source (into ``out``)."""
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
        """The gradient of a separate source, from the gradient of its region means."""
        n, c = shape[:2]
        mean_grad = self._mean_grad(pooled_grad, like)
        return mean_grad.expand(n, c, self.height // self.sh, self.sh, self.width).reshape(shape)


Layout = BandLayout | MatrixLayout

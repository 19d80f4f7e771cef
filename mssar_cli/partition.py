"""Exact K x K regional partitions of a feature-map lattice (paper §3.2, SPEC.md §1).

Row ``i`` of an ``H``-row map belongs to region ``floor(i * K / H)``, so region ``r`` holds rows
``ceil(r * H / K) <= i < ceil((r + 1) * H / K)``. When ``H`` is not divisible by ``K`` (the 7 x 7
ImageNet stage with K = 4) the regions differ in size by one row, but they never overlap, unlike
``F.adaptive_avg_pool2d``. A scale larger than an axis is clamped to it, separately for rows and
columns (:func:`regions_along`): each row or column is then its own region.

For a set of scales, the union of every scale's region boundaries cuts each axis into *refined
segments*: every region of every scale is a union of whole segments. The fast MS-SAR pools the
map once onto this refined grid, derives each scale's region means from it, and combines the
scales' weights there before touching the full-size map again.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch


def regions_along(length: int, k: int) -> int:
    """Regions scale ``k`` cuts an axis of ``length`` into: ``k``, or ``length`` if ``k`` is larger.

    The paper never has K larger than the map; cut further, some regions would be empty. Clamped,
    each row (column) is its own region, the finest partition the axis has.
    """
    return min(k, length)


def region_of_index(length: int, k: int) -> list[int]:
    """Region index of every position along an axis of ``length`` cut into ``k`` parts (clamped)."""
    k = regions_along(length, k)
    return [i * k // length for i in range(length)]


def region_bounds(length: int, k: int) -> list[int]:
    """Start of each region along an axis cut into ``k`` parts (clamped), followed by ``length``."""
    k = regions_along(length, k)
    return [-(-r * length // k) for r in range(k)] + [length]


@dataclass(frozen=True)
class AxisPlan:
    """One axis of a refined grid: segment sizes and, per scale, each segment's region."""

    sizes: tuple[int, ...]  # length of every refined segment
    segment_of_index: tuple[int, ...]  # refined segment of every position (len = axis length)
    region_of_segment: tuple[tuple[int, ...], ...]  # per scale: region of every refined segment
    # per scale: share of its region's positions that each segment holds (sums to 1 per region)
    share_of_segment: tuple[tuple[float, ...], ...]

    @property
    def uniform(self) -> bool:
        return len(set(self.sizes)) == 1


def axis_plan(length: int, scales: tuple[int, ...]) -> AxisPlan:
    """Refine the partitions of one axis for all ``scales`` (see the module docstring).

    Built once per (length, scale set) and cached; while ``torch.compile`` traces a forward, it
    is built by the uncached function (the note at ``_cached_axis_plan``).
    """
    if torch.compiler.is_compiling():
        return _build_axis_plan(length, scales)
    return _cached_axis_plan(length, scales)


def _build_axis_plan(length: int, scales: tuple[int, ...]) -> AxisPlan:
    cuts = sorted({b for k in scales for b in region_bounds(length, k)})
    sizes = tuple(b - a for a, b in zip(cuts[:-1], cuts[1:]))
    segment_of_index = tuple(s for s, size in enumerate(sizes) for _ in range(size))
    regions, shares = [], []
    for k in scales:
        of_index = region_of_index(length, k)
        region_size = [of_index.count(r) for r in range(regions_along(length, k))]
        seg_region = tuple(of_index[start] for start in cuts[:-1])
        regions.append(seg_region)
        shares.append(tuple(size / region_size[r] for size, r in zip(sizes, seg_region)))
    return AxisPlan(sizes, segment_of_index, tuple(regions), tuple(shares))


# Dynamo does not call an ``lru_cache`` wrapper: it traces the function inside and warns that it
# did (a UserWarning on every compiled run). While it traces, the plans are therefore built by
# the plain functions, once per graph it compiles (their values specialise the graph, their few
# small tensors become part of it); the caches serve the eager forwards.
_cached_axis_plan = lru_cache(maxsize=256)(_build_axis_plan)


@dataclass(frozen=True)
class GridPlan:
    """Refined grid of an ``H x W`` map for a scale set, with its index tensors on one device."""

    rows: AxisPlan
    cols: AxisPlan
    row_region: tuple[torch.Tensor, ...]  # per scale, long (Rh,)
    col_region: tuple[torch.Tensor, ...]  # per scale, long (Rw,)
    # per scale, (Rh, Rw) in the input's dtype: segment area / region area
    share: tuple[torch.Tensor, ...]
    row_segment: torch.Tensor  # long (H,), used only when the grid is not uniform
    col_segment: torch.Tensor  # long (W,)

    @property
    def uniform(self) -> bool:
        return self.rows.uniform and self.cols.uniform

    def regions(self, k: int) -> tuple[int, int]:
        """Rows and columns of regions of scale ``k`` (clamped to the map)."""
        return regions_along(len(self.row_segment), k), regions_along(len(self.col_segment), k)


def grid_plan(
    height: int, width: int, scales: tuple[int, ...], device: torch.device, dtype: torch.dtype
) -> GridPlan:
    """Cached per (map size, scale set, device, dtype): the eager forward pass builds no tensors.
    While ``torch.compile`` traces, built afresh (see :func:`axis_plan`)."""
    if torch.compiler.is_compiling():
        return _build_grid_plan(height, width, scales, device, dtype)
    return _cached_grid_plan(height, width, scales, device, dtype)


def _build_grid_plan(
    height: int, width: int, scales: tuple[int, ...], device: torch.device, dtype: torch.dtype
) -> GridPlan:
    rows, cols = axis_plan(height, scales), axis_plan(width, scales)

    def long(values: tuple[int, ...]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    share = tuple(
        torch.outer(
            torch.tensor(rs, dtype=torch.float64), torch.tensor(cs, dtype=torch.float64)
        ).to(device=device, dtype=dtype)
        for rs, cs in zip(rows.share_of_segment, cols.share_of_segment)
    )
    return GridPlan(
        rows=rows,
        cols=cols,
        row_region=tuple(long(r) for r in rows.region_of_segment),
        col_region=tuple(long(r) for r in cols.region_of_segment),
        share=share,
        row_segment=long(rows.segment_of_index),
        col_segment=long(cols.segment_of_index),
    )


_cached_grid_plan = lru_cache(maxsize=256)(_build_grid_plan)

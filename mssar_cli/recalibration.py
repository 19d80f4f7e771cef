"""Recalibration modules: MS-SAR (paper §3.2-3.3, Eqs. 1-2) and SE (Hu et al., SENet).

Both are called as ``module(x)`` or ``module(x, source)``: the weights are computed from
``source`` (default ``x``) and multiply ``x``. A separate source is the paper's *multi-stage*
DenseNet recalibration (§3.4), where the weights of a layer's ``k`` new maps come from the
layer's whole input.

``MSSAR(implementation="fast")`` (the default) pools the source once onto the regions of every
scale, runs every scale's MLP on its K x K pooled positions as matrix products, and multiplies
the full map once by the mean over scales of the weights, without materialising a full-size
weight map per scale. The whole module is one autograd node (:mod:`mssar_cli.fused_gate`) whose
backward is written by hand and makes two passes over the map; what it does not cover
(channels-last maps, large non-uniform partitions, ``torch.compile``, a SyncBatchNorm in the
MLPs) uses the same steps as plain autograd operations.
``implementation="direct"`` is the textbook version of Fig. 2 (a pooling, two 1 x 1
convolutions, a BN and an upsampled full-size weight map per scale, then their mean): it shares
the parameters, is the oracle of the tests and the reference of the benchmarks.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from mssar_cli.batchnorm import momentum_factor
from mssar_cli.fused_gate import MATRIX_MAP, SMALL_MAP, BandLayout, MatrixLayout, fused_gate
from mssar_cli.fused_gate import supports as fused_gate_supports
from mssar_cli.partition import grid_plan, region_bounds

STRATEGIES = ("regional", "sliding")
IMPLEMENTATIONS = ("fast", "direct")
DEFAULT_SCALES = (1, 2, 4)


def validate_scales(scales: Sequence[int]) -> tuple[int, ...]:
    """Scale set L (paper §3.3): a non-empty set of distinct positive integers."""
    try:
        values = tuple(scales)
    except TypeError:
        raise ValueError(f"scales must be a sequence of positive integers, got {scales!r}") from None
    if not values:
        raise ValueError("scales must be a non-empty set of positive integers, got an empty set")
    for k in values:
        if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
            raise ValueError(f"scales must be positive integers, got {k!r} in {list(values)}")
    if len(set(values)) != len(values):
        raise ValueError(f"scales must be distinct, got {list(values)}")
    return values


def bottleneck_width(channels: int, num_scales: int, reduction: float) -> int:
    """Per-scale width D' of the MLP (SPEC.md §1): total width D / reduction split over L scales.

    The paper writes D' = D / L (§3.5) and D' = D / 3 for CIFAR (§4.1); its Tables 2 and 3 are
    reproduced by floor(D / (reduction * L)) per scale with reduction = 3, at least 1.
    """
    if reduction <= 0:
        raise ValueError(f"reduction must be positive, got {reduction!r}")
    return max(1, int(channels // (reduction * num_scales)))


class ScaleBranch(nn.Module):
    """Recalibration function of one scale, Eq. 1: sigmoid(Ω2 · relu(BN(Ω1 · y)) + b2).

    Works on pooled vectors laid out as rows, shape (positions, source_channels).
    """

    def __init__(self, source_channels: int, hidden_channels: int, channels: int) -> None:
        super().__init__()
        self.reduce = nn.Linear(source_channels, hidden_channels, bias=False)  # Ω1, BN follows
        self.bn = nn.BatchNorm1d(hidden_channels)
        self.expand = nn.Linear(hidden_channels, channels)  # Ω2 and its bias

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        # The hidden units as (1, D', rows): BN's statistics then reduce over a contiguous last
        # dimension (measured on CPU, 2048 rows: forward 3.7x, forward + backward 2.3x faster than
        # over the rows of a (rows, D') matrix).
        hidden = (self.reduce.weight @ pooled.t()).unsqueeze(0)
        hidden = F.relu(self.bn(hidden)).squeeze(0)
        return torch.sigmoid(torch.addmm(self.expand.bias, hidden.t(), self.expand.weight.t()))


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N*H*W, C): pooled positions as rows for the MLP."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def _unrows(z: torch.Tensor, n: int, h: int, w: int) -> torch.Tensor:
    """(N*H*W, D) -> (N, D, H, W), the inverse of :func:`_rows`."""
    return z.view(n, h, w, -1).permute(0, 3, 1, 2)


def _global_branch(branch: ScaleBranch, pooled: torch.Tensor, positions: int) -> torch.Tensor:
    """``branch(pooled)`` for a sliding scale whose window covers the whole map.

    Every position then has the same pooled vector, so the per-position BN of the direct form
    sees ``positions`` identical copies of each of the N rows. Its batch statistics equal those
    of the N rows (so are the output and the gradients), but its running variance is updated with
    Bessel's factor for N * positions values, not N: that update is reproduced here exactly.
    """
    bn = branch.bn
    if not (bn.training and bn.track_running_stats and bn.running_var is not None):
        return branch(pooled)
    hidden = branch.reduce(pooled)
    normalised = F.batch_norm(hidden, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
    with torch.no_grad():
        factor = momentum_factor(bn)
        count = hidden.shape[0] * positions
        var = hidden.var(0, unbiased=False) * (count / max(count - 1, 1))
        bn.running_mean.lerp_(hidden.mean(0).to(bn.running_mean.dtype), factor)
        bn.running_var.lerp_(var.to(bn.running_var.dtype), factor)
    return torch.sigmoid(branch.expand(F.relu(normalised)))


def sliding_radius(height: int, width: int, k: int) -> int:
    """Chebyshev radius T = floor(sqrt(H*W) / K) of the sliding window (§3.2, footnote 3)."""
    return math.isqrt(height * width) // k


class MSSAR(nn.Module):
    """Multi-scale spatially-asymmetric recalibration (paper §3.2-3.3).

    Args:
        channels: D, channels of the recalibrated map ``x``.
        scales: the scale set L; each K cuts the map into K x K coordinate sets.
        strategy: ``"regional"`` (exact K x K partition, the paper's default) or ``"sliding"``
            (a clipped square window of radius floor(sqrt(HW)/K) around every position; SPEC.md
            §1 explains why it is a square rather than the L1 ball of the text).
        reduction: total MLP width is D / reduction, split over the scales (:func:`bottleneck_width`).
        source_channels: D_in of the tensor the weights are computed from (default ``channels``).
        hidden_channels: explicit per-scale width D', overriding ``reduction``.
        implementation: ``"fast"`` or ``"direct"`` (same parameters and output; see module doc).
    """

    def __init__(
        self,
        channels: int,
        scales: Sequence[int] = DEFAULT_SCALES,
        strategy: str = "regional",
        reduction: float = 3,
        source_channels: int | None = None,
        hidden_channels: int | None = None,
        implementation: str = "fast",
    ) -> None:
        super().__init__()
        self.scales = validate_scales(scales)
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {list(STRATEGIES)}, got {strategy!r}")
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"implementation must be one of {list(IMPLEMENTATIONS)}, got {implementation!r}"
            )
        if channels <= 0:
            raise ValueError(f"channels must be positive, got {channels}")
        source_channels = channels if source_channels is None else source_channels
        if hidden_channels is None:
            hidden_channels = bottleneck_width(channels, len(self.scales), reduction)
        elif hidden_channels <= 0:
            raise ValueError(f"hidden_channels must be positive, got {hidden_channels}")
        self.strategy = strategy
        self.implementation = implementation
        self.channels, self.source_channels, self.hidden_channels = (
            channels,
            source_channels,
            hidden_channels,
        )
        self.branches = nn.ModuleList(
            ScaleBranch(source_channels, hidden_channels, channels) for _ in self.scales
        )

    def extra_repr(self) -> str:
        return (
            f"{self.channels}, scales={self.scales}, strategy={self.strategy!r}, "
            f"source_channels={self.source_channels}, hidden_channels={self.hidden_channels}"
            + (", implementation='direct'" if self.implementation == "direct" else "")
        )

    def forward(self, x: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
        source = x if source is None else source
        self._check_shapes(x, source)
        if self.implementation == "direct":
            return x * self.direct_weights(source)
        if self.strategy == "sliding":
            return x * self.sliding_weights(source)
        return self._regional_fast(x, source)

    def _check_shapes(self, x: torch.Tensor, source: torch.Tensor) -> None:
        if x.dim() != 4 or source.dim() != 4:
            raise ValueError(f"MSSAR expects (N, C, H, W) tensors, got {tuple(x.shape)}")
        if x.shape[1] != self.channels or source.shape[1] != self.source_channels:
            raise ValueError(
                f"MSSAR built for {self.channels} channels (source {self.source_channels}), got "
                f"x with {x.shape[1]} and source with {source.shape[1]}"
            )
        if x.shape[0] != source.shape[0] or x.shape[2:] != source.shape[2:]:
            raise ValueError(
                f"source {tuple(source.shape)} must match x {tuple(x.shape)} in batch and size"
            )
        height, width = x.shape[2:]
        too_large = [k for k in self.scales if k > min(height, width)]
        if too_large:
            raise ValueError(
                f"scales {too_large} are larger than the {height}x{width} feature map: "
                f"a scale K needs at least K rows and K columns"
            )

    # --- fast regional path -------------------------------------------------------------------

    def _regional_fast(self, x: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        n, d, height, width = x.shape
        plan = grid_plan(height, width, self.scales, source.device, source.dtype)
        rh, rw = len(plan.rows.sizes), len(plan.cols.sizes)
        sh, sw = plan.rows.sizes[0], plan.cols.sizes[0]
        if (
            x.is_contiguous()
            and source.is_contiguous()
            and not torch.compiler.is_compiling()
            and fused_gate_supports(self.branches)
        ):
            # The whole module as one autograd node with a hand-written backward (fused_gate).
            layout = None
            if height * width <= MATRIX_MAP or (not plan.uniform and height * width <= SMALL_MAP):
                layout = MatrixLayout(self.scales, height, width)
            elif plan.uniform:
                layout = BandLayout(self.scales, height, width, sh)
            if layout is not None:
                own = None if source is x else source
                return fused_gate(x, own, layout, self.branches)

        # Autograd composition: torch.compile (which fuses it), channels-last maps, and large maps
        # whose refined grid is not uniform.
        if plan.uniform and all(rh % k == 0 and rw % k == 0 for k in self.scales):
            weigh = self._nested_weights
        else:
            weigh = functools.partial(self._refined_weights, plan=plan)
        if plan.uniform:
            weights = weigh(F.avg_pool2d(source, (sh, sw))).expand(n, d, rh, rw)
            if x.is_contiguous():
                # W-widened band multiply: no full-size weight map (see BandLayout)
                banded = weights.repeat_interleave(sw, dim=3).unsqueeze(3)
                return (x.view(n, d, rh, sh, width) * banded).view(n, d, height, width)
            full = weights.repeat_interleave(sh, dim=2)
            return x * full.repeat_interleave(sw, dim=3)
        sums = source.new_zeros(n, source.shape[1], rh, width).index_add(2, plan.row_segment, source)
        sums = sums.new_zeros(n, source.shape[1], rh, rw).index_add(3, plan.col_segment, sums)
        area = torch.outer(
            torch.tensor(plan.rows.sizes, dtype=sums.dtype, device=sums.device),
            torch.tensor(plan.cols.sizes, dtype=sums.dtype, device=sums.device),
        )
        weights = weigh(sums / area).expand(n, d, rh, rw)
        full = weights.index_select(2, plan.row_segment)
        return x * full.index_select(3, plan.col_segment)

    def _nested_weights(self, refined: torch.Tensor) -> torch.Tensor:
        """Mean over scales of the weights on an equal-block grid that every scale's regions nest in.

        Each K x K region is then exactly (rh/K) x (rw/K) refined blocks of equal size, so its mean
        is an average pool of the refined means, and its weight reaches the refined grid by a
        nearest upsampling. The common case: {1, 2, 4} on 32x32, 16x16, 8x8 maps (grid 4 x 4).
        """
        n, _, rh, rw = refined.shape
        weights = None
        for k, branch in zip(self.scales, self.branches):
            if k == 1:
                term = branch(refined.mean((2, 3)))[:, :, None, None]  # broadcast over the grid
            else:
                pooled = refined if k == rh and k == rw else F.avg_pool2d(refined, (rh // k, rw // k))
                z = _unrows(branch(_rows(pooled)), n, k, k)
                # nearest upsampling by the integer factors: region r covers blocks r*f .. r*f+f-1
                # (its backward kernel is several times faster than an expand's strided sum)
                term = z if k == rh and k == rw else F.interpolate(z, size=(rh, rw), mode="nearest")
            weights = term if weights is None else weights + term
        return weights / len(self.scales)

    def _refined_weights(self, refined: torch.Tensor, plan) -> torch.Tensor:
        """Mean over scales of the weights on the refined grid, for any partition (index_add)."""
        n, d = refined.shape[0], self.channels
        rw = refined.shape[3]
        weights = None  # sum over scales of each scale's weights, on the refined grid
        for k, branch, rows, cols, share in zip(
            self.scales, self.branches, plan.row_region, plan.col_region, plan.share
        ):
            weighted = refined * share  # segment mean x its share of the region
            if k == 1:
                z = branch(weighted.sum((2, 3))).view(n, d, 1, 1)
            else:
                pooled = weighted.new_zeros(n, weighted.shape[1], k, rw).index_add(2, rows, weighted)
                pooled = pooled.new_zeros(n, pooled.shape[1], k, k).index_add(3, cols, pooled)
                z = _unrows(branch(_rows(pooled)), n, k, k)
                z = z.index_select(2, rows).index_select(3, cols)
            weights = z if weights is None else weights + z
        return weights / len(self.scales)

    # --- sliding strategy ---------------------------------------------------------------------

    def sliding_weights(self, source: torch.Tensor) -> torch.Tensor:
        """Z of Eq. 2 for the sliding strategy, shape (N, D, H, W) (or (N, D, 1, 1) for K=1)."""
        n, _, height, width = source.shape
        total = None
        for k, branch in zip(self.scales, self.branches):
            radius = sliding_radius(height, width, k)
            if radius >= max(height, width) - 1:  # the window covers the whole map: SE-like
                z = _global_branch(branch, source.mean((2, 3)), height * width).view(n, -1, 1, 1)
            else:
                pooled = F.avg_pool2d(
                    source, 2 * radius + 1, stride=1, padding=radius, count_include_pad=False
                )
                z = _unrows(branch(_rows(pooled)), n, height, width)
            total = z if total is None else total + z
        return total / len(self.scales)

    # --- direct implementation (oracle, benchmark reference) ---------------------------------

    def direct_weights(self, source: torch.Tensor) -> torch.Tensor:
        """Z of Eq. 2 computed the direct way: a full-size weight map per scale, then the mean."""
        n, _, height, width = source.shape
        total = torch.zeros((), dtype=source.dtype, device=source.device)
        for k, branch in zip(self.scales, self.branches):
            pooled = self._direct_pool(source, k)
            hidden = F.conv2d(pooled, branch.reduce.weight[:, :, None, None])
            hidden = _unrows(branch.bn(_rows(hidden)), n, pooled.shape[2], pooled.shape[3])
            z = torch.sigmoid(
                F.conv2d(F.relu(hidden), branch.expand.weight[:, :, None, None], branch.expand.bias)
            )
            if self.strategy == "regional":
                rows = torch.diff(torch.tensor(region_bounds(height, k), device=source.device))
                cols = torch.diff(torch.tensor(region_bounds(width, k), device=source.device))
                z = z.repeat_interleave(rows, dim=2).repeat_interleave(cols, dim=3)
            total = total + z.expand(n, -1, height, width)
        return total / len(self.scales)

    def _direct_pool(self, source: torch.Tensor, k: int) -> torch.Tensor:
        height, width = source.shape[2:]
        if self.strategy == "sliding":
            return _window_means(source, sliding_radius(height, width, k))
        if height % k == 0 and width % k == 0:
            return F.adaptive_avg_pool2d(source, k)
        rows, cols = region_bounds(height, k), region_bounds(width, k)
        return torch.stack(
            [
                torch.stack(
                    [
                        source[:, :, rows[i] : rows[i + 1], cols[j] : cols[j + 1]].mean((2, 3))
                        for j in range(k)
                    ],
                    dim=-1,
                )
                for i in range(k)
            ],
            dim=-2,
        )


def _window_means(source: torch.Tensor, radius: int) -> torch.Tensor:
    """Mean over each position's clipped square window, from an integral image (footnote 3)."""
    height, width = source.shape[2:]
    integral = F.pad(source.cumsum(2).cumsum(3), (1, 0, 1, 0))
    i = torch.arange(height, device=source.device)
    j = torch.arange(width, device=source.device)
    top, bottom = (i - radius).clamp(min=0), (i + radius + 1).clamp(max=height)
    left, right = (j - radius).clamp(min=0), (j + radius + 1).clamp(max=width)
    total = (
        integral[:, :, bottom][:, :, :, right]
        - integral[:, :, top][:, :, :, right]
        - integral[:, :, bottom][:, :, :, left]
        + integral[:, :, top][:, :, :, left]
    )
    count = torch.outer(bottom - top, right - left).to(source.dtype)
    return total / count


class SqueezeExcitation(torchvision.ops.SqueezeExcitation):
    """SE (Hu et al. 2018): global mean -> FC -> ReLU -> FC -> sigmoid -> multiply; no BN.

    torchvision's module, extended to take a separate ``source`` (multi-stage DenseNets); its
    squeeze width is ``channels // reduction`` unless ``hidden_channels`` is given.
    """

    def __init__(
        self,
        channels: int,
        reduction: float = 16,
        source_channels: int | None = None,
        hidden_channels: int | None = None,
    ) -> None:
        if hidden_channels is None:
            hidden_channels = bottleneck_width(channels, 1, reduction)
        super().__init__(channels, hidden_channels)
        self.channels = channels
        self.source_channels = channels if source_channels is None else source_channels
        if self.source_channels != channels:
            self.fc1 = nn.Conv2d(self.source_channels, hidden_channels, 1)

    def forward(self, x: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
        return x * self._scale(x if source is None else source)


RECALIBRATIONS: dict[str, Callable[..., nn.Module] | None] = {
    "none": None,
    "se": SqueezeExcitation,
    "mssar": MSSAR,
}
MSSAR_ONLY_OPTIONS = ("scales", "strategy", "implementation")


def make_recalibration(kind: str, channels: int, **options) -> nn.Module | None:
    """Build the recalibration module ``kind`` for a ``channels``-wide map, or None for "none".

    ``options`` go to the module's constructor; MS-SAR-only options are rejected for SE.
    """
    if kind not in RECALIBRATIONS:
        raise ValueError(f"recalibration must be one of {list(RECALIBRATIONS)}, got {kind!r}")
    factory = RECALIBRATIONS[kind]
    if factory is None:
        return None
    if factory is SqueezeExcitation:
        stray = [name for name in MSSAR_ONLY_OPTIONS if name in options]
        if stray:
            raise ValueError(f"option(s) {stray} apply only to recalibration 'mssar', not 'se'")
    return factory(channels, **options)

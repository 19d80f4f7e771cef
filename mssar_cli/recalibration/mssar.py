"""MS-SAR, multi-scale spatially-asymmetric recalibration (paper §3.2-3.3, Eqs. 1-2).

Called as ``module(x)`` or ``module(x, source)``: the weights are computed from ``source``
(default ``x``) and multiply ``x``. A separate source is the paper's *multi-stage* DenseNet
recalibration (§3.4), where the weights of a layer's ``k`` new maps come from the layer's whole
input.

Three implementations compute the same function with the same parameters (``implementation``, an
internal option of the registry: benchmarks and tests choose it, recipes do not):

* ``"fast"`` (the default): a regional module is one autograd node with a hand-written backward
  (:mod:`mssar_cli.fused_gate`) where that node applies, else the autograd composition;
* ``"autograd"``: the composition of plain autograd operations. It pools the source once onto
  the refined grid every scale's regions are unions of (:mod:`mssar_cli.partition`), runs every
  scale's MLP on its pooled positions, brings the weights to the grid by nested upsampling and
  multiplies the map once by their mean, without a full-size weight map per scale. It is also
  what ``"fast"`` runs under ``torch.compile``, on channels-last maps and on large maps with a
  non-uniform grid;
* ``"direct"``: the textbook version of Fig. 2 (a pooling, two 1 x 1 convolutions, a BN and an
  upsampled full-size weight map per scale, then their mean): the oracle of the tests, the
  reference of the benchmarks and the form FLOPs are counted on (:mod:`mssar_cli.complexity`).

The sliding strategy has one form in ``"fast"`` and ``"autograd"`` (window means by one average
pooling, the MLPs on every position).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mssar_cli import fused_gate
from mssar_cli.batchnorm import momentum_factor, uses_batch_statistics
from mssar_cli.errors import ModelError
from mssar_cli.partition import grid_plan, region_bounds, regions_along
from mssar_cli.recalibration.width import bottleneck_width, check_width

STRATEGIES = ("regional", "sliding")
IMPLEMENTATIONS = ("fast", "autograd", "direct")
DEFAULT_SCALES = (1, 2, 4)


def validate_scales(scales: Sequence[int]) -> tuple[int, ...]:
    """Scale set L (paper §3.3): a non-empty set of distinct positive integers."""
    try:
        values = tuple(scales)
    except TypeError:
        message = f"scales must be a sequence of positive integers, got {scales!r}"
        raise ModelError(message) from None
    if not values:
        raise ModelError("scales must be a non-empty set of positive integers, got an empty set")
    for k in values:
        if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
            raise ModelError(f"scales must be positive integers, got {k!r} in {list(values)}")
    if len(set(values)) != len(values):
        raise ModelError(f"scales must be distinct, got {list(values)}")
    return values


def _param(module: nn.Module, name: str) -> torch.Tensor:
    """``module.<name>``, from its parameter dictionary when it is there (no
    ``nn.Module.__getattr__`` on every forward), else the attribute itself: a parametrized weight
    (``torch.nn.utils.parametrize``) or a DataParallel replica's plain tensor."""
    param = module._parameters.get(name)
    return getattr(module, name) if param is None else param


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
        # dimension, which its kernel does in one streaming pass, where over the rows of a
        # (rows, D') matrix every channel's values are strided.
        hidden = (self.reduce.weight @ pooled.t()).unsqueeze(0)
        hidden = F.relu(self.bn(hidden)).squeeze(0)
        return torch.sigmoid(torch.addmm(self.expand.bias, hidden.t(), self.expand.weight.t()))

    def gate_mlp(self) -> fused_gate.ScaleMLP:
        """This scale's parameters and BN as the fused gate takes them."""
        modules = self._modules
        reduce, bn, expand = modules["reduce"], modules["bn"], modules["expand"]
        return fused_gate.ScaleMLP(
            _param(reduce, "weight"),
            _param(bn, "weight"),
            _param(bn, "bias"),
            _param(expand, "weight"),
            _param(expand, "bias"),
            bn,
        )


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


def covers_whole_map(height: int, width: int, k: int) -> bool:
    """Whether scale ``k``'s sliding window around every position covers the whole map."""
    return sliding_radius(height, width, k) >= max(height, width) - 1


class MSSAR(nn.Module):
    """Multi-scale spatially-asymmetric recalibration (paper §3.2-3.3).

    Args:
        channels: D, channels of the recalibrated map ``x``.
        scales: the scale set L; each K cuts the map into K x K coordinate sets.
        strategy: ``"regional"`` (exact K x K partition, the paper's default) or ``"sliding"``
            (a clipped square window of radius floor(sqrt(HW)/K) around every position; SPEC.md
            §1 explains why it is a square rather than the L1 ball of the text).
        reduction: total MLP width is D / reduction, split over the scales
            (:func:`~mssar_cli.recalibration.width.bottleneck_width`).
        source_channels: D_in of the tensor the weights are computed from (default ``channels``).
        hidden_channels: explicit per-scale width D', overriding ``reduction``.
        implementation: ``"fast"``, ``"autograd"`` or ``"direct"`` (same parameters and output;
            see the module docstring).

    A scale K larger than an axis of the map is clamped to that axis, separately for rows and
    columns: on a 2 x 2 map K = 4 cuts 2 x 2 regions, each position its own (the paper never has
    K larger than the map; :func:`mssar_cli.partition.regions_along`). The sliding window needs
    no clamp: its radius floor(sqrt(HW)/K) is defined for every K (0: each position alone).

    In training, BN normalises each scale's pooled values with their batch statistics, so one
    image that a scale pools into a single vector (K = 1, a map clamped to one region, a sliding
    window covering the whole map) raises a ValueError in every implementation, as
    ``nn.BatchNorm1d`` does for one value per channel; in evaluation mode BN uses its running
    statistics and any batch works.
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
            raise ModelError(f"strategy must be one of {list(STRATEGIES)}, got {strategy!r}")
        if implementation not in IMPLEMENTATIONS:
            raise ModelError(
                f"implementation must be one of {list(IMPLEMENTATIONS)}, got {implementation!r}"
            )
        channels = check_width("channels", channels)
        source_channels = channels if source_channels is None else source_channels
        source_channels = check_width("source_channels", source_channels)
        if hidden_channels is None:
            hidden_channels = bottleneck_width(channels, len(self.scales), reduction)
        hidden_channels = check_width("hidden_channels", hidden_channels)
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
            + ("" if self.implementation == "fast" else f", implementation={self.implementation!r}")
        )

    def forward(self, x: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
        own = source is None or source is x
        source = x if source is None else source
        self._check_shapes(x, source)
        if x.shape[0] == 1:
            self._check_single_image(*x.shape[2:])
        if self.implementation == "direct":
            return x * self.direct_weights(source)
        if self.strategy == "sliding":
            return x * self.sliding_weights(source)
        if self.implementation == "fast":
            mlps = [branch.gate_mlp() for branch in self.branches]
            out = fused_gate.recalibrate(x, None if own else source, self.scales, mlps)
            if out is not None:
                return out
        return self.regional_composition(x, source)

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

    def _check_single_image(self, height: int, width: int) -> None:
        """One image: refuse a scale whose BN would normalise one value per channel with batch
        statistics, the same for every implementation (the direct sliding form's copies of that
        one value would hide it from BN's own check)."""
        for k, branch in zip(self.scales, self.branches):
            if self.strategy == "sliding":
                single = covers_whole_map(height, width, k)
            else:
                single = regions_along(height, k) * regions_along(width, k) == 1
            if single and uses_batch_statistics(branch.bn):
                raise ValueError(
                    f"Expected more than 1 value per channel when training: MS-SAR scale {k} "
                    f"pools one image's {height}x{width} map into one vector, and its BN cannot "
                    "normalise a single value (use a batch of 2 or more, or evaluation mode)"
                )

    # --- regional strategy: the autograd composition -------------------------------------------

    def regional_composition(self, x: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """``x`` times Z of Eq. 2, regional strategy, composed of autograd operations."""
        n, d, height, width = x.shape
        plan = grid_plan(height, width, self.scales, source.device, source.dtype)
        rh, rw = len(plan.rows.sizes), len(plan.cols.sizes)
        sh, sw = plan.rows.sizes[0], plan.cols.sizes[0]
        if plan.uniform:
            refined = F.avg_pool2d(source, (sh, sw))
            nested = all(rh % kh == 0 and rw % kw == 0 for kh, kw in map(plan.regions, self.scales))
            if nested:
                weights = self._nested_weights(refined, plan)
            else:
                weights = self._refined_weights(refined, plan)
            weights = weights.expand(n, d, rh, rw)
            if x.is_contiguous():
                # widened along W and broadcast over each block's rows: no full-size weight map
                banded = weights.repeat_interleave(sw, dim=3).unsqueeze(3)
                return (x.view(n, d, rh, sh, width) * banded).view(n, d, height, width)
            full = weights.repeat_interleave(sh, dim=2)
            return x * full.repeat_interleave(sw, dim=3)
        c = source.shape[1]
        sums = source.new_zeros(n, c, rh, width).index_add(2, plan.row_segment, source)
        sums = sums.new_zeros(n, c, rh, rw).index_add(3, plan.col_segment, sums)
        area = torch.outer(
            torch.tensor(plan.rows.sizes, dtype=sums.dtype, device=sums.device),
            torch.tensor(plan.cols.sizes, dtype=sums.dtype, device=sums.device),
        )
        weights = self._refined_weights(sums / area, plan).expand(n, d, rh, rw)
        full = weights.index_select(2, plan.row_segment)
        return x * full.index_select(3, plan.col_segment)

    def _nested_weights(self, refined: torch.Tensor, plan) -> torch.Tensor:
        """Mean over scales of the weights on an equal-block grid every scale's regions nest in.

        Each region is then exactly (rh/kh) x (rw/kw) refined blocks of equal size, so its mean
        is an average pool of the refined means, and its weight reaches the refined grid by a
        nearest upsampling. The common case: {1, 2, 4} on 32x32, 16x16, 8x8 maps (grid 4 x 4).
        """
        n, _, rh, rw = refined.shape
        weights = None
        for k, branch in zip(self.scales, self.branches):
            kh, kw = plan.regions(k)
            if kh == kw == 1:
                term = branch(refined.mean((2, 3)))[:, :, None, None]  # broadcast over the grid
            else:
                whole = kh == rh and kw == rw
                pooled = refined if whole else F.avg_pool2d(refined, (rh // kh, rw // kw))
                z = _unrows(branch(_rows(pooled)), n, kh, kw)
                # nearest upsampling by the integer factors: region r covers blocks r*f .. r*f+f-1
                # (its backward sums each block directly, where an expand's is a strided sum)
                term = z if whole else F.interpolate(z, size=(rh, rw), mode="nearest")
            weights = term if weights is None else weights + term
        return weights / len(self.scales)

    def _refined_weights(self, refined: torch.Tensor, plan) -> torch.Tensor:
        """Mean over scales of the weights on the refined grid, for any partition (index_add)."""
        n, c, _, rw = refined.shape
        weights = None  # sum over scales of each scale's weights, on the refined grid
        for k, branch, rows, cols, share in zip(
            self.scales, self.branches, plan.row_region, plan.col_region, plan.share
        ):
            kh, kw = plan.regions(k)
            weighted = refined * share  # segment mean x its share of the region
            if kh == kw == 1:
                z = branch(weighted.sum((2, 3))).view(n, self.channels, 1, 1)
            else:
                pooled = weighted.new_zeros(n, c, kh, rw).index_add(2, rows, weighted)
                pooled = pooled.new_zeros(n, c, kh, kw).index_add(3, cols, pooled)
                z = _unrows(branch(_rows(pooled)), n, kh, kw)
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
            if covers_whole_map(height, width, k):  # SE-like: one vector per image
                z = _global_branch(branch, source.mean((2, 3)), height * width).view(n, -1, 1, 1)
            else:
                pooled = F.avg_pool2d(
                    source, 2 * radius + 1, stride=1, padding=radius, count_include_pad=False
                )
                z = _unrows(branch(_rows(pooled)), n, height, width)
            total = z if total is None else total + z
        return total / len(self.scales)

    # --- direct implementation (oracle, benchmark reference, FLOPs) ---------------------------

    def direct_weights(self, source: torch.Tensor) -> torch.Tensor:
        """Z of Eq. 2 computed the direct way: a full-size weight map per scale, then the mean."""
        return sum(self.scale_weights(source)) / len(self.scales)

    def scale_weights(self, source: torch.Tensor) -> list[torch.Tensor]:
        """Each scale's weight map Z_K of Eq. 1 at full size, (N, D, H, W) per scale in the
        order of :attr:`scales`: what ``mssar show`` draws. Their mean is Z of Eq. 2."""
        n, _, height, width = source.shape
        weights = []
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
            weights.append(z.expand(n, -1, height, width))
        return weights

    def _direct_pool(self, source: torch.Tensor, k: int) -> torch.Tensor:
        height, width = source.shape[2:]
        if self.strategy == "sliding":
            return _window_means(source, sliding_radius(height, width, k))
        kh, kw = regions_along(height, k), regions_along(width, k)
        if height % kh == 0 and width % kw == 0:
            return F.adaptive_avg_pool2d(source, (kh, kw))
        rows, cols = region_bounds(height, k), region_bounds(width, k)
        return torch.stack(
            [
                torch.stack(
                    [
                        source[:, :, rows[i] : rows[i + 1], cols[j] : cols[j + 1]].mean((2, 3))
                        for j in range(kw)
                    ],
                    dim=-1,
                )
                for i in range(kh)
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

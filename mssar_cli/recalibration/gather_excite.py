"""Gather-Excite (Hu et al., "Gather-Excite: Exploiting Feature Context in Convolutional Neural
Networks", NeurIPS 2018), MS-SAR's nearest relative: one scale, overlapping windows.

Written here rather than wrapped: timm's ``GatherExcite`` raises ``TypeError`` for its
parametric gather and its MLP in releases 1.0.21 to 1.0.31 (``*dd`` where ``**dd`` was meant),
and the module is short. No timm needed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mssar_cli.errors import ModelError
from mssar_cli.recalibration.zoo import ZooModule

GLOBAL = "global"


class GatherExciteOperator(nn.Module):
    """x ⊙ σ(interp(mlp(gather(x)))) for one extent (see :class:`GatherExcite`)."""

    def __init__(
        self, channels: int, extent: int | str, parametric: bool, hidden_channels: int | None
    ) -> None:
        super().__init__()
        self.extent = extent
        self.gather = None
        if parametric:  # log2(e) depthwise 3x3 stride-2 convolutions, BN after each, ReLU between
            steps = int(math.log2(extent))
            layers: list[nn.Module] = []
            for i in range(steps):
                layers.append(nn.Conv2d(channels, channels, 3, 2, 1, groups=channels, bias=False))
                layers.append(nn.BatchNorm2d(channels))
                if i < steps - 1:
                    layers.append(nn.ReLU(inplace=True))
            self.gather = nn.Sequential(*layers)
        self.mlp = None
        if hidden_channels is not None:  # SE's excitation MLP, applied at every gathered cell
            self.mlp = nn.Sequential(
                nn.Conv2d(channels, hidden_channels, 1),
                nn.ReLU(inplace=True),
                nn.Conv2d(hidden_channels, channels, 1),
            )

    def gathered(self, x: torch.Tensor) -> torch.Tensor:
        """ξ_G(x): (N, C, ceil(H / e), ceil(W / e)), or (N, C, 1, 1) for the global extent."""
        if self.gather is not None:
            return self.gather(x)
        if self.extent == GLOBAL:
            return x.mean((2, 3), keepdim=True)
        e = self.extent  # windows of 2e - 1, the receptive field of the parametric gather's stack
        return F.avg_pool2d(x, 2 * e - 1, e, e - 1, count_include_pad=False)

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """σ(interp(mlp(ξ_G(x)))): (N, C, H, W), or (N, C, 1, 1) for the global extent."""
        context = self.gathered(x)
        if self.mlp is not None:
            context = self.mlp(context)
        size = x.shape[-2:]
        if context.shape[-2:] != (1, 1) and context.shape[-2:] != size:
            context = F.interpolate(context, size=size, mode="nearest")
        return torch.sigmoid(context)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


class GatherExcite(ZooModule):
    """Gather-Excite (Hu et al., NeurIPS 2018), by default its parametric GE-θ+ form.

    Gather (§3): ξ_G maps each channel of an H x W map to a ceil(H/e) x ceil(W/e) grid, each cell
    summarising an overlapping neighbourhood of extent ratio ``extent`` (e); excite: x ⊙ σ of
    the gathered map brought back to H x W by nearest-neighbour interpolation. The variants (§4):

    * GE-θ- (``parametric=False, mlp=False``): average pooling, windows of 2e - 1 with stride e
      (the receptive field of the parametric stack; timm's choice); with ``extent="global"`` it
      is x·σ(mean over the map), SE without its MLP (SPEC.md §7);
    * GE-θ (``parametric=True``): log2(e) depthwise 3x3 convolutions of stride 2, each followed by
      BN, a ReLU between them (the paper's Fig. 9 for e = 8);
    * GE-θ+ (``parametric=True, mlp=True``, the default): GE-θ's gather and SE's excitation MLP
      (1x1 conv C -> C' + ReLU + 1x1 conv C' -> C, with biases) at every gathered cell.

    A parametric gather over the whole map (the paper's global GE-θ, one depthwise convolution
    the size of the map) needs a fixed map size, which the network's factory does not pass:
    ``extent="global"`` is parameter-free only. Options: ``extent`` (8, a power of two, or
    "global"), ``parametric`` (True), ``mlp`` (True), ``reduction`` (16, SE's; C' = D /
    reduction, mssar's rule). Parameters: log2(e)·11·C (9C conv weights + 2C BN each) +
    2·C·C' + C' + C with the MLP. In training, a BN given one value per channel (a batch of one
    image whose map the gather reduces to 1 x 1) raises nn.BatchNorm's ValueError, as MS-SAR's.
    """

    name = "ge"

    def build(
        self,
        *,
        extent: int | str = 8,
        parametric: bool = True,
        mlp: bool = True,
        reduction: float = 16,
    ):
        parametric = self.flag("parametric", parametric)
        mlp = self.flag("mlp", mlp)
        power = isinstance(extent, int) and not isinstance(extent, bool) and extent >= 2
        if extent != GLOBAL and not (power and extent & (extent - 1) == 0):
            raise ModelError(f"ge: extent must be a power of two >= 2 or 'global', got {extent!r}")
        if parametric and extent == GLOBAL:
            raise ModelError(
                "ge: a parametric gather over the whole map needs a fixed map size; use an "
                "extent of 2, 4, 8, ... or parametric: false with extent 'global'"
            )
        self.extent = extent
        self.hidden_channels = self.hidden_width(reduction) if mlp else None
        return GatherExciteOperator(self.channels, extent, parametric, self.hidden_channels)

    def spatial_gate(self, x: torch.Tensor) -> torch.Tensor:
        """The excite gate at every position, (N, C, H, W) (constant for ``extent="global"``)."""
        return self.body.gate(x).expand_as(x)

"""Squeeze-and-Excitation (Hu et al., "Squeeze-and-Excitation Networks", CVPR 2018).

The paper's baseline recalibration (MS-SAR §2, §4): global mean -> FC -> ReLU -> FC -> sigmoid
-> multiply, no BN. MS-SAR with L = {1} differs from it only by the BN in sigma_1 (SPEC.md §1).
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from mssar_cli.recalibration.width import bottleneck_width, check_width


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
        channels = check_width("channels", channels)
        source_channels = channels if source_channels is None else source_channels
        source_channels = check_width("source_channels", source_channels)
        if hidden_channels is None:
            hidden_channels = bottleneck_width(channels, 1, reduction)
        hidden_channels = check_width("hidden_channels", hidden_channels)
        super().__init__(channels, hidden_channels)
        self.channels = channels
        self.source_channels = source_channels
        if self.source_channels != channels:
            self.fc1 = nn.Conv2d(self.source_channels, hidden_channels, 1)

    def forward(self, x: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
        return x * self._scale(x if source is None else source)

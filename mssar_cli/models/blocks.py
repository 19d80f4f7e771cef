"""torchvision's residual blocks with a recalibration module (paper §3.4, Fig. 2 left).

The module sits on the residual branch after its last BN, before the addition with the
shortcut, which is also where SENet places SE. torchvision's ``ResNet._make_layer`` builds blocks
with a fixed argument list, so the recalibration factory travels as a class attribute of a
subclass made by :func:`with_recalibration`; the blocks keep torchvision's module names, so the
rest of a torchvision ``state_dict`` loads unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

RecalibrationFactory = Callable[[int], nn.Module | None]


class RecalibratedBasicBlock(BasicBlock):
    """conv3x3-BN-ReLU-conv3x3-BN-[recalibration]-(+shortcut)-ReLU."""

    make_recalibration: RecalibrationFactory | None = None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        factory = type(self).make_recalibration
        self.recalibration = factory(self.bn2.num_features) if factory else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.recalibration is not None:
            out = self.recalibration(out)
        return self.relu(out + identity)


class RecalibratedBottleneck(Bottleneck):
    """1x1-3x3(grouped)-1x1 bottleneck with the recalibration after its last BN."""

    make_recalibration: RecalibrationFactory | None = None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        factory = type(self).make_recalibration
        self.recalibration = factory(self.bn3.num_features) if factory else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.recalibration is not None:
            out = self.recalibration(out)
        return self.relu(out + identity)


def with_recalibration(block: type[nn.Module], factory: RecalibrationFactory) -> type[nn.Module]:
    """A subclass of ``block`` whose instances build ``factory(channels)`` as their module."""
    return type(block.__name__, (block,), {"make_recalibration": staticmethod(factory)})

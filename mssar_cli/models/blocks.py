"""torchvision's residual blocks with a recalibration module (paper §3.4, Fig. 2 left).

The module sits on the residual branch after its last BN, before the addition with the
shortcut, which is also where SENet places SE. The BN output it multiplies is rebuilt from the
BN's input in backward instead of being kept (:mod:`mssar_cli.models.bn_recompute`).
torchvision's ``ResNet._make_layer`` builds blocks with a fixed argument list, so the
recalibration factory travels as a class attribute of a subclass made by
:func:`with_recalibration`; the blocks keep torchvision's module names, so the
rest of a torchvision ``state_dict`` loads unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from mssar_cli.models.bn_recompute import recalibrate_bn_output

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
        if self.recalibration is None:
            out = self.bn2(self.conv2(out))
        else:
            out = recalibrate_bn_output(self.bn2, self.conv2(out), self.recalibration)
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
        if self.recalibration is None:
            out = self.bn3(self.conv3(out))
        else:
            out = recalibrate_bn_output(self.bn3, self.conv3(out), self.recalibration)
        return self.relu(out + identity)


def restore_module_init(model: nn.Module) -> None:
    """After a network's own initialisation pass: each recalibration module's initialisation that
    its paper specifies beyond it (``init_after_network``, e.g. GC's zero last convolution)."""
    for module in model.modules():
        init = getattr(module, "init_after_network", None)
        if callable(init):
            init()


def with_recalibration(block: type[nn.Module], factory: RecalibrationFactory) -> type[nn.Module]:
    """A subclass of ``block`` whose instances build ``factory(channels)`` as their module."""
    return type(block.__name__, (block,), {"make_recalibration": staticmethod(factory)})

"""CIFAR ResNets of He et al. 2016 (paper Table 1, SPEC.md §3): ResNet-20/32/56.

A 3x3 stem of 16 channels, three stages of ``n`` basic blocks with 16, 32 and 64 channels
(n = 3, 5, 9), global average pooling and a linear classifier. Where the shape changes the
shortcut is a projection (1x1 conv + BN): this reproduces the paper's 40.8 M / 69.1 M / 125.7 M
FLOPs (Table 1's "135.7M" for ResNet-56 is a typo for 125.7 M). The blocks are torchvision's.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import conv1x1

from mssar_cli.errors import ModelError
from mssar_cli.models.blocks import (
    RecalibratedBasicBlock,
    RecalibrationFactory,
    restore_module_init,
    with_recalibration,
)

STAGE_WIDTHS = (16, 32, 64)
BLOCKS_PER_STAGE = {20: 3, 32: 5, 56: 9}


class CifarResNet(nn.Module):
    def __init__(
        self,
        depth: int,
        num_classes: int = 10,
        make_recalibration: RecalibrationFactory | None = None,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if depth not in BLOCKS_PER_STAGE:
            raise ModelError(f"CIFAR ResNet depth must be one of {list(BLOCKS_PER_STAGE)}")
        block = with_recalibration(RecalibratedBasicBlock, make_recalibration or (lambda _: None))
        self.conv1 = nn.Conv2d(in_channels, STAGE_WIDTHS[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(STAGE_WIDTHS[0])
        self.relu = nn.ReLU(inplace=True)
        inplanes = STAGE_WIDTHS[0]
        layers = []
        for index, planes in enumerate(STAGE_WIDTHS):
            stride = 1 if index == 0 else 2
            blocks = []
            for i in range(BLOCKS_PER_STAGE[depth]):
                downsample = None
                if i == 0 and (stride != 1 or inplanes != planes):
                    downsample = nn.Sequential(
                        conv1x1(inplanes, planes, stride), nn.BatchNorm2d(planes)
                    )
                blocks.append(block(inplanes, planes, stride if i == 0 else 1, downsample))
                inplanes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _init_weights(model: nn.Module) -> None:
    """He-normal convolutions and unit BN, as torchvision's ResNet initialises them."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    restore_module_init(model)

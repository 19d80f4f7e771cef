"""CIFAR DenseNet-BC of Huang et al. 2017 (paper Table 1, SPEC.md §3): DenseNet-100 and -190.

A 3x3 stem of 2k channels, three dense blocks of BN-ReLU-1x1 conv (4k)-BN-ReLU-3x3 conv (k)
layers, transitions BN-ReLU-1x1 conv (compression 0.5)-2x2 average pooling, then BN-ReLU, global
average pooling and a linear classifier. Module names follow torchvision's DenseNet.

Recalibration (paper §3.4, Fig. 2 right) acts on the k new maps of each layer before they are
concatenated to the main vector. *Single-stage*: weights from those k maps. *Multi-stage* (the
paper's default for DenseNets): weights from the layer's input, the main vector.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from mssar_cli.errors import ModelError
from mssar_cli.models import STAGES
from mssar_cli.models.cifar_resnet import _init_weights

# (channels of the new maps, channels of the source) -> module or None
DenseRecalibrationFactory = Callable[[int, int], nn.Module | None]
CONFIGS = {100: 12, 190: 40}  # depth -> growth rate k


class DenseLayer(nn.Module):
    def __init__(
        self,
        in_channels: int,
        growth_rate: int,
        stage: str,
        make_recalibration: DenseRecalibrationFactory | None,
        bottleneck_factor: int = 4,
    ) -> None:
        super().__init__()
        width = bottleneck_factor * growth_rate
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(width)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, growth_rate, 3, padding=1, bias=False)
        self.multi_stage = stage == "multi"
        source = in_channels if self.multi_stage else growth_rate
        self.recalibration = make_recalibration(growth_rate, source) if make_recalibration else None

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # relu1 is in place on norm1's output, never on ``features`` itself.
        new = self.conv1(self.relu1(self.norm1(features)))
        new = self.conv2(self.relu2(self.norm2(new)))
        if self.recalibration is not None:
            new = self.recalibration(new, features if self.multi_stage else new)
        return new


class DenseBlock(nn.ModuleDict):
    def __init__(
        self, num_layers: int, in_channels: int, growth_rate: int, **layer_options
    ) -> None:
        super().__init__()
        for i in range(num_layers):
            layer = DenseLayer(in_channels + i * growth_rate, growth_rate, **layer_options)
            self.add_module(f"denselayer{i + 1}", layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.values():
            features.append(layer(torch.cat(features, 1)))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.pool = nn.AvgPool2d(2, stride=2)


class CifarDenseNet(nn.Module):
    def __init__(
        self,
        depth: int,
        num_classes: int = 10,
        stage: str = "multi",
        make_recalibration: DenseRecalibrationFactory | None = None,
        in_channels: int = 3,
        compression: float = 0.5,
    ) -> None:
        super().__init__()
        if depth not in CONFIGS:
            raise ModelError(f"CIFAR DenseNet depth must be one of {list(CONFIGS)}")
        if stage not in STAGES:
            raise ModelError(f"stage must be one of {', '.join(STAGES)}, got {stage!r}")
        growth = CONFIGS[depth]
        layers_per_block = (depth - 4) // 6
        channels = 2 * growth
        self.features = nn.Sequential()
        self.features.add_module(
            "conv0", nn.Conv2d(in_channels, channels, 3, padding=1, bias=False)
        )
        for index in range(3):
            block = DenseBlock(
                layers_per_block,
                channels,
                growth,
                stage=stage,
                make_recalibration=make_recalibration,
            )
            self.features.add_module(f"denseblock{index + 1}", block)
            channels += layers_per_block * growth
            if index < 2:
                out_channels = int(channels * compression)
                self.features.add_module(
                    f"transition{index + 1}", Transition(channels, out_channels)
                )
                channels = out_channels
        self.features.add_module("norm5", nn.BatchNorm2d(channels))
        self.features.add_module("relu5", nn.ReLU(inplace=True))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        _init_weights(self)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))

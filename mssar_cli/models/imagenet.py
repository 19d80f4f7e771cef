"""ImageNet networks: torchvision's ResNet-18/34 and ResNeXt-50 32x4d (paper Table 4) and
ResNet-50 (not in the paper: the backbone of the ImageNet numbers the later modules' papers
publish, :data:`mssar_cli.paper.PUBLISHED_RESNET50`).

With recalibration "none" these *are* ``torchvision.models.resnet18`` / ``resnet34`` /
``resnet50`` / ``resnext50_32x4d``. With a module the same torchvision ``ResNet`` is built from a
block subclass that adds it after the block's last BN (SPEC.md §2); every other module keeps
torchvision's name, so a torchvision checkpoint loads into the backbone of a recalibrated model
with ``strict=False`` (only the ``recalibration`` keys are new).
"""

from __future__ import annotations

from torch import nn
from torchvision.models import resnet

from mssar_cli.models.blocks import (
    RecalibratedBasicBlock,
    RecalibratedBottleneck,
    RecalibrationFactory,
    restore_module_init,
    with_recalibration,
)

# name -> (torchvision builder, block with recalibration, blocks per stage, ResNet kwargs)
ARCHITECTURES = {
    "resnet18": (resnet.resnet18, RecalibratedBasicBlock, [2, 2, 2, 2], {}),
    "resnet34": (resnet.resnet34, RecalibratedBasicBlock, [3, 4, 6, 3], {}),
    "resnet50": (resnet.resnet50, RecalibratedBottleneck, [3, 4, 6, 3], {}),
    "resnext50": (
        resnet.resnext50_32x4d,
        RecalibratedBottleneck,
        [3, 4, 6, 3],
        {"groups": 32, "width_per_group": 4},
    ),
}


def imagenet_resnet(
    name: str, num_classes: int = 1000, make_recalibration: RecalibrationFactory | None = None
) -> nn.Module:
    builder, block, layers, kwargs = ARCHITECTURES[name]
    if make_recalibration is None:
        return builder(num_classes=num_classes)
    model = resnet.ResNet(
        with_recalibration(block, make_recalibration), layers, num_classes=num_classes, **kwargs
    )
    restore_module_init(model)  # torchvision's pass re-initialised the modules' convolutions
    return model

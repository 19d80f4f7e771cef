"""Model registry: ``create_model(name, num_classes=..., recalibration=..., **module_options)``.

Networks (SPEC.md §3): resnet20/32/56 and densenet100/190 for 32x32 inputs; resnet18/34 and
resnext50 for 224x224. ``recalibration`` is "none", "se" or "mssar"; the module options are

- ``scales`` (tuple of ints, MS-SAR), ``strategy`` ("regional" | "sliding", MS-SAR),
  ``implementation`` ("fast" | "direct", MS-SAR: the direct one is the oracle/benchmark reference);
- ``reduction``: total MLP width is D / reduction (D = channels recalibrated), split across
  MS-SAR's scales. Defaults: CIFAR ResNets 3 (paper §4.1), DenseNets 1 (D' = k / L, the rule that
  reproduces every DenseNet FLOPs entry of Tables 2 and 3), ImageNet 16 (SENet's);
- ``stage`` ("single" | "multi", DenseNets only; default "multi", paper §3.4).

An option that is ``None`` takes the family default. An unknown model or option, or an option
that does not apply, raises ``ValueError`` naming the known ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from torch import nn

from mssar_cli.models.cifar_resnet import CifarResNet
from mssar_cli.models.densenet import CifarDenseNet
from mssar_cli.models.imagenet import imagenet_resnet
from mssar_cli.recalibration import RECALIBRATIONS, make_recalibration

MODULE_OPTIONS = ("scales", "strategy", "reduction", "implementation", "stage")
MSSAR_OPTIONS = ("scales", "strategy", "implementation")


@dataclass(frozen=True)
class ModelSpec:
    family: str  # "cifar-resnet" | "cifar-densenet" | "imagenet-resnet"
    depth: int
    input_size: int  # side of the square input the paper counts FLOPs at
    default_reduction: int
    label: str  # the paper's name for it

    @property
    def is_densenet(self) -> bool:
        return self.family == "cifar-densenet"


MODELS: dict[str, ModelSpec] = {
    "resnet20": ModelSpec("cifar-resnet", 20, 32, 3, "RN-20"),
    "resnet32": ModelSpec("cifar-resnet", 32, 32, 3, "RN-32"),
    "resnet56": ModelSpec("cifar-resnet", 56, 32, 3, "RN-56"),
    # DenseNets: total width k (the recalibrated maps) split over the scales; README "DenseNet width"
    "densenet100": ModelSpec("cifar-densenet", 100, 32, 1, "DN-100"),
    "densenet190": ModelSpec("cifar-densenet", 190, 32, 1, "DN-190"),
    "resnet18": ModelSpec("imagenet-resnet", 18, 224, 16, "ResNet-18"),
    "resnet34": ModelSpec("imagenet-resnet", 34, 224, 16, "ResNet-34"),
    "resnext50": ModelSpec("imagenet-resnet", 50, 224, 16, "ResNeXt-50"),
}


def list_models() -> list[str]:
    return list(MODELS)


def model_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODELS)}")
    return MODELS[name]


def create_model(
    name: str,
    num_classes: int = 10,
    recalibration: str = "none",
    in_channels: int = 3,
    **module_options,
) -> nn.Module:
    """Build network ``name`` with the given recalibration (see the module docstring)."""
    spec = model_spec(name)
    if recalibration not in RECALIBRATIONS:
        raise ValueError(
            f"recalibration must be one of {', '.join(RECALIBRATIONS)}, got {recalibration!r}"
        )
    unknown = [key for key in module_options if key not in MODULE_OPTIONS]
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}; known options: {', '.join(MODULE_OPTIONS)}")
    options = {key: value for key, value in module_options.items() if value is not None}
    stage = options.pop("stage", "multi")
    if "stage" in module_options and module_options["stage"] is not None and not spec.is_densenet:
        raise ValueError(f"option 'stage' applies only to DenseNets, not {name!r}")
    if recalibration != "mssar":
        stray = [key for key in MSSAR_OPTIONS if key in options]
        if stray:
            raise ValueError(f"option(s) {stray} apply only to recalibration 'mssar'")
    if recalibration == "none" and "reduction" in options:
        raise ValueError("option 'reduction' does not apply to recalibration 'none'")
    options.setdefault("reduction", spec.default_reduction)

    if spec.family == "cifar-densenet":
        factory = None
        if recalibration != "none":
            factory = partial(_dense_recalibration, recalibration, options)
        return CifarDenseNet(spec.depth, num_classes, stage, factory, in_channels=in_channels)

    factory = None
    if recalibration != "none":
        factory = partial(make_recalibration, recalibration, **options)
    if spec.family == "cifar-resnet":
        return CifarResNet(spec.depth, num_classes, factory, in_channels=in_channels)
    if in_channels != 3:
        raise ValueError(f"{name!r} takes 3-channel images, got in_channels={in_channels}")
    return imagenet_resnet(name, num_classes, factory)


def _dense_recalibration(kind: str, options: dict, channels: int, source: int) -> nn.Module | None:
    return make_recalibration(kind, channels, source_channels=source, **options)

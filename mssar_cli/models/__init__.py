"""The network registry: ``create_model(name, num_classes=..., recalibration=..., **options)``.

Networks (SPEC.md §3): resnet20/32/56 and densenet100/190 for 32x32 inputs; resnet18/34/50 and
resnext50 for 224x224 (resnet50 is not in the paper: it is the network the later modules' papers
report ImageNet numbers for, :data:`mssar_cli.paper.PUBLISHED_RESNET50`). ``recalibration`` names
an entry of :data:`mssar_cli.recalibration.RECALIBRATIONS`; the networks receive the factory it
makes (or ``None``) and never look at the name. Module options (``scales``, ``strategy``,
``reduction``, ...) are those the entry takes; ``None`` means the default, and ``reduction``'s
default is the network family's: CIFAR ResNets 3 (paper §4.1), DenseNets 1 (D' = k / L, the
rule that reproduces every DenseNet FLOPs entry of Tables 2 and 3, docs/readings.md), ImageNet
16 (SENet's). ``stage`` ("single" | "multi", default "multi", paper §3.4) is a DenseNet option.

Importing this package imports no torch (the builders import their network when called), so
the recipe schema and the report can read the table. Every problem raises
:class:`~mssar_cli.errors.ModelError` naming what is known.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from mssar_cli.errors import ModelError
from mssar_cli.recalibration import get as get_recalibration
from mssar_cli.recalibration import recalibration_factory

STAGES = ("single", "multi")
DEFAULT_STAGE = "multi"  # the paper's DenseNet recalibration (§3.4)


def default_stage(recalibration: str) -> str:
    """A DenseNet's recalibration stage when none is given: the paper's multi-stage, or single
    for a module that gates only the map it is given (the registry's ``takes_source``)."""
    return DEFAULT_STAGE if get_recalibration(recalibration).takes_source else "single"


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
    # DenseNets: total width k (the recalibrated maps) split over the scales (docs/readings.md)
    "densenet100": ModelSpec("cifar-densenet", 100, 32, 1, "DN-100"),
    "densenet190": ModelSpec("cifar-densenet", 190, 32, 1, "DN-190"),
    "resnet18": ModelSpec("imagenet-resnet", 18, 224, 16, "ResNet-18"),
    "resnet34": ModelSpec("imagenet-resnet", 34, 224, 16, "ResNet-34"),
    "resnet50": ModelSpec("imagenet-resnet", 50, 224, 16, "ResNet-50"),
    "resnext50": ModelSpec("imagenet-resnet", 50, 224, 16, "ResNeXt-50"),
}


def list_models() -> list[str]:
    return list(MODELS)


def model_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        close = difflib.get_close_matches(str(name), list(MODELS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ModelError(f"unknown model {name!r}{hint} (known: {', '.join(MODELS)})")
    return MODELS[name]


def create_model(
    name: str,
    num_classes: int = 10,
    recalibration: str = "none",
    in_channels: int = 3,
    stage: str | None = None,
    **module_options,
):
    """Build network ``name`` with the given recalibration (see the module docstring)."""
    spec = model_spec(name)
    for option, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ModelError(f"{option} must be a positive integer, got {value!r}")
    if stage is not None and not spec.is_densenet:
        raise ModelError(f"option 'stage' applies only to DenseNets, not {name!r}")
    if stage is not None and stage not in STAGES:
        raise ModelError(f"stage must be one of {', '.join(STAGES)}, got {stage!r}")
    factory = recalibration_factory(recalibration, module_options, spec.default_reduction)

    if spec.family == "cifar-densenet":
        from mssar_cli.models.densenet import CifarDenseNet

        return CifarDenseNet(
            spec.depth,
            num_classes,
            stage or default_stage(recalibration),
            factory,
            in_channels=in_channels,
        )
    if spec.family == "cifar-resnet":
        from mssar_cli.models.cifar_resnet import CifarResNet

        return CifarResNet(spec.depth, num_classes, factory, in_channels=in_channels)
    if in_channels != 3:
        raise ModelError(f"{name!r} takes 3-channel images, got in_channels={in_channels}")
    from mssar_cli.models.imagenet import imagenet_resnet

    return imagenet_resnet(name, num_classes, factory)

"""The recalibration registry: one entry per module, name -> how to build it.

Like timm's ``create_attn``, this table is the only place that knows the module names. Networks
receive a factory from :func:`recalibration_factory` (or ``None`` for a plain network) and never
test names; the recipe schema, ``mssar count``, ``mssar ablate recalibration`` and the report's
labels all read :data:`RECALIBRATIONS`. Adding a module is one entry here, its file and its tests.

Importing this package imports no torch: each entry's ``build`` imports its class when called,
so reading results (``mssar report``) stays light.

Every module is called as ``module(x)`` or ``module(x, source)``: the weights are computed from
``source`` (default ``x``) and multiply ``x``. A separate source is the paper's multi-stage
DenseNet recalibration (§3.4).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mssar_cli.errors import ModelError

PLAIN = "none"  # the entry of the network without a module
# ``reduction: None`` in an entry's options means "the network family's default" (SPEC.md §1).
FAMILY_DEFAULT = None


@dataclass(frozen=True)
class Recalibration:
    """One registered module.

    Attributes:
        name: the recipe's ``model.recalibration`` value.
        label: its name in tables and figures.
        reference: the paper it comes from.
        options: every option it takes, with its default (``None``: the network family's).
        build: ``build(channels, source_channels=None, **options) -> nn.Module``; ``None`` for
            the plain network.
        internal: options the recipe does not expose (benchmark and test switches).
        takes_source: whether it can compute its weights from another tensor than the one it
            multiplies (the paper's multi-stage DenseNet recalibration, §3.4).
        spatial: whether its gate differs between positions (what ``mssar show`` draws); SE,
            ECA and GC gate (or shift) every position of a channel alike.
    """

    name: str
    label: str
    reference: str
    options: Mapping[str, Any] = field(default_factory=dict)
    build: Callable[..., Any] | None = None
    internal: tuple[str, ...] = ()
    takes_source: bool = True
    spatial: bool = False


def _build_se(channels: int, source_channels: int | None = None, **options):
    from mssar_cli.recalibration.se import SqueezeExcitation

    return SqueezeExcitation(channels, source_channels=source_channels, **options)


def _build_mssar(channels: int, source_channels: int | None = None, **options):
    from mssar_cli.recalibration.mssar import MSSAR

    return MSSAR(channels, source_channels=source_channels, **options)


def _build_zoo(module: str, cls: str):
    """The build function of a module that came after MS-SAR (``zoo.py``, ``gather_excite.py``)."""

    def build(channels: int, source_channels: int | None = None, **options):
        import importlib

        module_class = getattr(importlib.import_module(f"mssar_cli.recalibration.{module}"), cls)
        return module_class(channels, source_channels=source_channels, **options)

    return build


RECALIBRATIONS: dict[str, Recalibration] = {
    entry.name: entry
    for entry in (
        Recalibration(PLAIN, "plain", "no recalibration"),
        Recalibration(
            "se",
            "SE",
            "Hu et al., Squeeze-and-Excitation Networks, CVPR 2018",
            {"reduction": FAMILY_DEFAULT},
            _build_se,
        ),
        Recalibration(
            "mssar",
            "MS-SAR",
            "Multi-Scale Spatially-Asymmetric Recalibration for Image Classification, ECCV 2018",
            {"scales": (1, 2, 4), "strategy": "regional", "reduction": FAMILY_DEFAULT},
            _build_mssar,
            internal=("implementation",),
            spatial=True,
        ),
        # The modules that came after MS-SAR, at SE's placement with their papers' defaults and
        # mssar's widths (SPEC.md §7). They gate the map they are given: single-stage in DenseNets.
        Recalibration(
            "eca",
            "ECA",
            "Wang et al., ECA-Net: Efficient Channel Attention for Deep Convolutional Neural "
            "Networks, CVPR 2020",
            {"gamma": 2, "beta": 1, "kernel_size": None},
            _build_zoo("zoo", "EfficientChannelAttention"),
            takes_source=False,
        ),
        Recalibration(
            "cbam",
            "CBAM",
            "Woo et al., CBAM: Convolutional Block Attention Module, ECCV 2018",
            {"reduction": FAMILY_DEFAULT, "spatial_kernel_size": 7},
            _build_zoo("zoo", "ConvolutionalBlockAttention"),
            takes_source=False,
            spatial=True,
        ),
        Recalibration(
            "ge",
            "GE",
            "Hu et al., Gather-Excite: Exploiting Feature Context in Convolutional Neural "
            "Networks, NeurIPS 2018",
            {"extent": 8, "parametric": True, "mlp": True, "reduction": FAMILY_DEFAULT},
            _build_zoo("gather_excite", "GatherExcite"),
            takes_source=False,
            spatial=True,
        ),
        Recalibration(
            "coord",
            "CA",
            "Hou et al., Coordinate Attention for Efficient Mobile Network Design, CVPR 2021",
            {"reduction": FAMILY_DEFAULT},
            _build_zoo("zoo", "CoordinateAttention"),
            takes_source=False,
            spatial=True,
        ),
        Recalibration(
            "gc",
            "GC",
            "Cao et al., GCNet: Non-local Networks Meet Squeeze-Excitation Networks and Beyond, "
            "ICCV Workshops 2019",
            {"reduction": FAMILY_DEFAULT, "fusion": "add"},
            _build_zoo("zoo", "GlobalContextBlock"),
            takes_source=False,
        ),
    )
}


def get(name: str) -> Recalibration:
    """The entry called ``name``; a :class:`ModelError` listing the known ones otherwise."""
    if name not in RECALIBRATIONS:
        close = difflib.get_close_matches(str(name), list(RECALIBRATIONS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ModelError(
            f"unknown recalibration {name!r}{hint} (known: {', '.join(RECALIBRATIONS)})"
        )
    return RECALIBRATIONS[name]


def option_names() -> tuple[str, ...]:
    """Every option any registered module takes (the recipe's module keys)."""
    names: dict[str, None] = {}
    for entry in RECALIBRATIONS.values():
        names.update(dict.fromkeys(entry.options))
    return tuple(names)


def check_options(name: str, options: Mapping[str, Any]) -> None:
    """Raise a :class:`ModelError` naming the module and the option for an option it does not
    take (options that are ``None`` are unset and pass)."""
    entry = get(name)
    for key, value in options.items():
        if value is not None and key not in entry.options and key not in entry.internal:
            takes = ", ".join(entry.options) or "no options"
            raise ModelError(f"recalibration {name!r} does not take {key!r} (it takes: {takes})")


def resolve_options(
    name: str, options: Mapping[str, Any], family_reduction: float
) -> dict[str, Any]:
    """The options module ``name`` is built with: every default explicit (``None`` -> default,
    the family's reduction where the entry says so). Options it does not take are refused."""
    check_options(name, options)
    entry = get(name)
    resolved = {}
    for key, default in entry.options.items():
        value = options.get(key)
        if value is None:
            value = family_reduction if key == "reduction" and default is None else default
        resolved[key] = value
    resolved.update({k: v for k, v in options.items() if k in entry.internal and v is not None})
    return resolved


def recalibration_factory(
    name: str, options: Mapping[str, Any], family_reduction: float
) -> Callable[..., Any] | None:
    """``factory(channels, source_channels=None)`` building module ``name`` with ``options``, or
    ``None`` for the plain network. Options are checked here, before any layer is built."""
    resolved = resolve_options(name, options, family_reduction)
    entry = get(name)
    if entry.build is None:
        return None
    build = entry.build

    def factory(channels: int, source_channels: int | None = None):
        return build(channels, source_channels, **resolved)

    return factory


# The module classes, for code that builds them directly (``from mssar_cli.recalibration import
# MSSAR``); imported on first use so that reading the registry still imports no torch.
_CLASSES = {
    "MSSAR": "mssar_cli.recalibration.mssar",
    "SqueezeExcitation": "mssar_cli.recalibration.se",
}


def __getattr__(name: str):
    if name in _CLASSES:
        import importlib

        return getattr(importlib.import_module(_CLASSES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

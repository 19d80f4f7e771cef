"""The networks the module-step benchmark (benchmarks/module_step.py) can time: its variants.

Every module of the registry (:data:`mssar_cli.recalibration.RECALIBRATIONS`) is a variant of
the same name, except the network without one, which the benchmark (and its CSV) calls
``plain`` (``none`` is accepted for it); two more variants are other implementations of MS-SAR,
``mssar-direct`` and ``mssar-autograd``. A variant's CSV name is what the report matches to the
registry (:mod:`mssar_cli.report.bench`). Imports no torch.
"""

from __future__ import annotations

from mssar_cli.recalibration import PLAIN, RECALIBRATIONS

PLAIN_VARIANT = "plain"
# name -> create_model keyword arguments
VARIANTS: dict[str, dict] = {
    PLAIN_VARIANT: {"recalibration": PLAIN},
    **{name: {"recalibration": name} for name in RECALIBRATIONS if name != PLAIN},
    "mssar-direct": {"recalibration": "mssar", "implementation": "direct"},
    "mssar-autograd": {"recalibration": "mssar", "implementation": "autograd"},
}
# what `make bench` times (and what the benchmark timed before it took every module)
DEFAULT_VARIANTS = ("plain", "se", "mssar", "mssar-direct", "mssar-autograd")
ALIASES = {PLAIN: PLAIN_VARIANT}
# Variants whose modules are not timed with hooks: the textbook MS-SAR is the tests' oracle, not
# a contender, and clocking it would lengthen every default run.
UNCLOCKED = frozenset({PLAIN_VARIANT, "mssar-direct"})


def known_variants() -> str:
    """The accepted names, for help texts and errors."""
    return ", ".join(f"{v} (or {PLAIN})" if v == PLAIN_VARIANT else v for v in VARIANTS)


def parse_variants(text: str) -> list[str]:
    """The variants of a comma list, in its order, once each (``none`` read as ``plain``);
    ValueError naming every unknown one and listing the known ones."""
    names = [ALIASES.get(v.strip(), v.strip()) for v in text.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        plural = "s" if len(unknown) > 1 else ""
        raise ValueError(
            f"unknown variant{plural} {', '.join(map(repr, unknown))}; "
            f"choose from {known_variants()}"
        )
    if not names:
        raise ValueError(f"no variant given; choose from {known_variants()}")
    return list(dict.fromkeys(names))


def module_label(variant: str) -> str:
    """The label of the variant's module (the registry's: ``MS-SAR`` for every implementation
    of it)."""
    return RECALIBRATIONS[VARIANTS[variant]["recalibration"]].label


def label(variant: str) -> str:
    """The variant's name in summaries: its module's label, or the variant's own name for an
    implementation variant (``mssar-autograd``)."""
    return variant if "implementation" in VARIANTS[variant] else module_label(variant)


def clocked(variants: list[str]) -> list[str]:
    """The variants whose time inside the modules is measured: those with a module (but
    ``mssar-direct``), when SE, the reference, and at least one other are among them."""
    chosen = [v for v in variants if v not in UNCLOCKED]
    return chosen if "se" in chosen and len(chosen) > 1 else []

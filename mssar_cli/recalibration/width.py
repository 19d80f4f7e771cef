"""Widths of a recalibration module (SPEC.md §1), shared by SE and MS-SAR: the hidden width of
its MLP, and the check every channel count passes."""

from __future__ import annotations

import math

from mssar_cli.errors import ModelError


def bottleneck_width(channels: int, num_scales: int, reduction: float) -> int:
    """Per-scale width D' of the MLP (SPEC.md §1): total width D / reduction split over L scales.

    The paper writes D' = D / L (§3.5) and D' = D / 3 for CIFAR (§4.1); its Tables 2 and 3 are
    reproduced by floor(D / (reduction * L)) per scale with reduction = 3, at least 1.
    """
    number = isinstance(reduction, (int, float)) and not isinstance(reduction, bool)
    if not (number and math.isfinite(reduction) and reduction > 0):
        raise ModelError(f"reduction must be a positive number, got {reduction!r}")
    return max(1, int(channels // (reduction * num_scales)))


def check_width(name: str, value) -> int:
    """``value`` if it is a positive integer (a channel count or a width), else a ModelError."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ModelError(f"{name} must be a positive integer, got {value!r}")
    return value

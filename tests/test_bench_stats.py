"""The statistics `make bench` prints about the module step (benchmarks/module_step.py)."""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def module_step():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location("module_step", ROOT / "benchmarks" / "module_step.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["module_step"] = module  # dataclasses look their module up while it loads
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("module_step", None)
        sys.path.remove(str(ROOT / "benchmarks"))


def noisy(level: float, rounds: int, seed: int, spread: float = 0.01) -> list[float]:
    rng = random.Random(seed)
    return [level * (1 + rng.gauss(0, spread)) for _ in range(rounds)]


def test_overhead_interval_cancels_a_drift_shared_within_rounds(module_step):
    """Load that changes between rounds but hits every variant of a round alike cancels out."""
    drift = [1 + 0.3 * ((i * 7) % 5) / 4 for i in range(21)]  # +-30% from round to round
    plain = [1.0 * d for d in drift]
    se = [1.1 * d for d in drift]
    mssar = [1.15 * d for d in drift]
    estimate, low, high = module_step.overhead_interval(plain, se, mssar)
    assert estimate == pytest.approx(1.5) and low == pytest.approx(1.5) and high == pytest.approx(1.5)


def test_overhead_interval_brackets_the_true_ratio(module_step):
    """plain 1.0 s, SE +10%, MS-SAR +15%: the overhead ratio is 1.5 and the interval holds it."""
    plain, se, mssar = noisy(1.0, 21, 1), noisy(1.10, 21, 2), noisy(1.15, 21, 3)
    estimate, low, high = module_step.overhead_interval(plain, se, mssar)
    assert low < 1.5 < high and low <= estimate <= high
    assert estimate == pytest.approx(1.5, abs=0.25)
    assert high - low < 1.0


def test_overhead_interval_widens_with_noise(module_step):
    quiet = module_step.overhead_interval(noisy(1, 21, 1), noisy(1.1, 21, 2), noisy(1.15, 21, 3))
    loud = module_step.overhead_interval(
        noisy(1, 21, 1, 0.03), noisy(1.1, 21, 2, 0.03), noisy(1.15, 21, 3, 0.03)
    )
    assert loud[2] - loud[1] > quiet[2] - quiet[1]


def test_no_interval_without_an_se_overhead_or_with_few_rounds(module_step):
    same = noisy(1.0, 21, 1)
    assert module_step.overhead_interval(same, same, noisy(1.1, 21, 3)) is None
    assert module_step.overhead_interval([1.0] * 4, [1.1] * 4, [1.2] * 4) is None


def test_summary_line_names_the_interval_and_the_goal(module_step):
    rows = [
        {"variant": "plain", "ratio_to_plain": 1.0, "overhead_interval": (1.4, 1.1, 1.9)},
        {"variant": "se", "ratio_to_plain": 1.1, "overhead_interval": (1.4, 1.1, 1.9)},
        {"variant": "mssar", "ratio_to_plain": 1.15, "overhead_interval": (1.4, 1.1, 1.9)},
    ]
    line = module_step.overhead_summary(rows)
    assert line.startswith("MS-SAR overhead / SE overhead: 1.40 (median paired differences")
    assert "95% bootstrap interval 1.10-1.90" in line and "1.50 (ratio of medians)" in line
    assert line.endswith("goal <= 1.5")
    assert module_step.overhead_summary(rows[:2]) is None

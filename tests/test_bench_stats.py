"""The statistics `make bench` prints about the module step (benchmarks/stats.py) and the hooks
that time the inside of the modules (benchmarks/module_clock.py). The variants, the zoo's
summary line and a small run: tests/test_bench_variants.py."""

from __future__ import annotations

import random
import time

import pytest

from benchmarks.stats import module_summary, overhead_interval, overhead_summary, ratio_interval


def noisy(level: float, rounds: int, seed: int, spread: float = 0.01) -> list[float]:
    rng = random.Random(seed)
    return [level * (1 + rng.gauss(0, spread)) for _ in range(rounds)]


def test_overhead_interval_cancels_a_drift_shared_within_rounds():
    """Load that changes between rounds but hits every variant of a round alike cancels out."""
    drift = [1 + 0.3 * ((i * 7) % 5) / 4 for i in range(21)]  # +-30% from round to round
    plain = [1.0 * d for d in drift]
    se = [1.1 * d for d in drift]
    mssar = [1.15 * d for d in drift]
    estimate, low, high = overhead_interval(plain, se, mssar)
    assert (
        estimate == pytest.approx(1.5) and low == pytest.approx(1.5) and high == pytest.approx(1.5)
    )


def test_overhead_interval_brackets_the_true_ratio():
    """plain 1.0 s, SE +10%, MS-SAR +15%: the overhead ratio is 1.5 and the interval holds it."""
    plain, se, mssar = noisy(1.0, 21, 1), noisy(1.10, 21, 2), noisy(1.15, 21, 3)
    estimate, low, high = overhead_interval(plain, se, mssar)
    assert low < 1.5 < high and low <= estimate <= high
    assert estimate == pytest.approx(1.5, abs=0.25)
    assert high - low < 1.0


def test_overhead_interval_widens_with_noise():
    quiet = overhead_interval(noisy(1, 21, 1), noisy(1.1, 21, 2), noisy(1.15, 21, 3))
    loud = overhead_interval(
        noisy(1, 21, 1, 0.03), noisy(1.1, 21, 2, 0.03), noisy(1.15, 21, 3, 0.03)
    )
    assert loud[2] - loud[1] > quiet[2] - quiet[1]


def test_no_interval_without_an_se_overhead_or_with_few_rounds():
    same = noisy(1.0, 21, 1)
    assert overhead_interval(same, same, noisy(1.1, 21, 3)) is None
    assert overhead_interval([1.0] * 4, [1.1] * 4, [1.2] * 4) is None


def test_summary_line_names_the_interval_and_the_goal():
    rows = [
        {"variant": "plain", "ratio_to_plain": 1.0, "overhead_interval": (1.4, 1.1, 1.9)},
        {"variant": "se", "ratio_to_plain": 1.1, "overhead_interval": (1.4, 1.1, 1.9)},
        {"variant": "mssar", "ratio_to_plain": 1.15, "overhead_interval": (1.4, 1.1, 1.9)},
    ]
    line = overhead_summary(rows)
    assert line.startswith("MS-SAR overhead / SE overhead: 1.40 (median paired differences")
    assert "95% bootstrap interval 1.10-1.90" in line and "1.50 (ratio of medians)" in line
    assert line.endswith("goal <= 1.5")
    assert overhead_summary(rows[:2]) is None


def test_ratio_interval_brackets_a_known_ratio_and_needs_five_rounds():
    mssar, se = noisy(1.35, 21, 4), noisy(1.0, 21, 5)
    estimate, low, high = ratio_interval(mssar, se)
    assert low <= estimate <= high and low < 1.35 < high and high - low < 0.1
    assert ratio_interval([1.3] * 4, [1.0] * 4) is None


def test_module_summary_line():
    times = {"se": [(0.05, 0.13)] * 6, "mssar": [(0.10, 0.15)] * 6}
    line = module_summary(times)
    assert line.startswith("Inside the recalibration modules (6 more interleaved steps")
    assert "SE 180.0 ms per step (forward 50.0, backward 130.0)" in line
    assert "MS-SAR 250.0 ms per step (forward 100.0, backward 150.0)" in line
    assert "MS-SAR / SE 1.39 (95% bootstrap interval 1.39-1.39)" in line
    assert module_summary({"se": times["se"]}) is None


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("recalibration", ["se", "mssar", "eca", "cbam", "ge", "coord", "gc"])
def test_module_clock_times_the_modules_without_changing_the_step(recalibration):
    """The hooks time every recalibration module's forward and backward (every registered
    module's: test_module_clock_knows_every_registered_module), leave the gradients as they are,
    and are gone after ``remove``."""
    import torch

    from benchmarks.module_clock import ModuleClock
    from mssar_cli.models import create_model

    def gradients(model, x, y):
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        return [p.grad.clone() for p in model.parameters()]

    torch.manual_seed(0)
    model = create_model("resnet20", 10, recalibration=recalibration).double().train()
    x, y = torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    want = gradients(model, x, y)
    model.load_state_dict(state)  # the same BN running statistics for the timed step
    clock = ModuleClock(model, torch.device("cpu"))
    started = time.perf_counter()
    got = gradients(model, x, y)
    elapsed = time.perf_counter() - started
    assert 0 < clock.forward and 0 < clock.backward and clock.forward + clock.backward < elapsed
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    clock.remove()
    clock.reset()
    gradients(model, x, y)
    assert clock.forward == clock.backward == 0.0
    assert not any(
        m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
        for m in model.modules()
    )


def test_module_clock_knows_every_registered_module():
    """Every module the registry builds is one ModuleClock hooks (a new entry of another class
    fails here, not silently in the benchmark)."""
    from benchmarks.module_clock import MODULE_CLASSES
    from mssar_cli.recalibration import RECALIBRATIONS

    for name, entry in RECALIBRATIONS.items():
        if entry.build is not None:
            options = {k: (16 if k == "reduction" else v) for k, v in entry.options.items()}
            assert isinstance(entry.build(64, **options), MODULE_CLASSES), name


def test_module_clock_refuses_a_model_without_recalibration():
    import torch

    from benchmarks.module_clock import ModuleClock
    from mssar_cli.models import create_model

    with pytest.raises(ValueError, match="no recalibration module"):
        ModuleClock(create_model("resnet20", 10, recalibration="none"), torch.device("cpu"))


def test_module_clock_refuses_an_input_without_gradient():
    """PyTorch would fire the backward hook before the module's backward: refused, not mistimed."""
    import torch

    from benchmarks.module_clock import ModuleClock
    from mssar_cli.recalibration.se import SqueezeExcitation

    model = torch.nn.Sequential(SqueezeExcitation(8, 4))
    clock = ModuleClock(model, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="does not require a gradient"):
        model(torch.randn(2, 8, 4, 4))
    with torch.no_grad():
        model(torch.randn(2, 8, 4, 4))  # no backward to time: allowed
    clock.remove()

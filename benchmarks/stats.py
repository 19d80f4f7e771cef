"""The statistics the module-step benchmark prints (benchmarks/module_step.py): medians in
milliseconds, per-round ratios and the overhead ratio (MS-SAR's step overhead over SE's) with
bootstrap intervals over whole rounds, and the summary lines under each model's table.

Pure functions of the timings (lists of seconds, one entry per interleaved round): no torch.
"""

from __future__ import annotations

import random
import statistics

from benchmarks.step_variants import label as variant_label


def median_ms(values: list[float]) -> float:
    return 1000 * statistics.median(values)


def ratio_interval(
    numerator: list[float], denominator: list[float], resamples: int = 2000
) -> tuple[float, float, float] | None:
    """Median of the per-round ratios numerator_i / denominator_i with its 95% bootstrap interval
    over rounds; None with fewer than 5 rounds."""
    ratios = [n / d for n, d in zip(numerator, denominator)]
    if len(ratios) < 5:
        return None
    medians = [
        statistics.median(ratios[i] for i in pick)
        for pick in resampled_rounds(len(ratios), resamples)
    ]
    return statistics.median(ratios), *percentile_interval(medians)


def resampled_rounds(rounds: int, resamples: int):
    """Bootstrap resamples of whole rounds, as index lists (seeded: the same in every run)."""
    rng = random.Random(0)
    for _ in range(resamples):
        yield [rng.randrange(rounds) for _ in range(rounds)]


def percentile_interval(values: list[float]) -> tuple[float, float]:
    """The 2.5% and 97.5% points of bootstrap estimates."""
    values = sorted(values)
    return values[int(0.025 * len(values))], values[int(0.975 * len(values)) - 1]


def module_summary(times: dict[str, list[tuple[float, float]]]) -> str | None:
    """The line on the time inside the modules, or None without both SE and MS-SAR times."""
    if not {"se", "mssar"} <= times.keys():
        return None
    parts = []
    for name, label in (("se", "SE"), ("mssar", "MS-SAR")):
        fwd, bwd = zip(*times[name])
        total = [f + b for f, b in times[name]]
        parts.append(
            f"{label} {median_ms(total):.1f} ms per step (forward {median_ms(fwd):.1f}, "
            f"backward {median_ms(bwd):.1f})"
        )
    text = (
        f"Inside the recalibration modules ({len(times['se'])} more interleaved steps, "
        f"hooks): " + ", ".join(parts)
    )
    interval = ratio_interval([f + b for f, b in times["mssar"]], [f + b for f, b in times["se"]])
    if interval is not None:
        estimate, low, high = interval
        text += f"; MS-SAR / SE {estimate:.2f} (95% bootstrap interval {low:.2f}-{high:.2f})"
    return text


def others_summary(times: dict[str, list[tuple[float, float]]]) -> str | None:
    """The line on the time inside the modules other than SE and MS-SAR (module_summary's), each
    with the median of its per-round ratios to SE's; None without SE's times and another's.
    ``mssar-autograd`` is left to handwritten_summary when ``mssar`` is there."""
    others = [
        name
        for name in times
        if name not in ("se", "mssar") and not (name == "mssar-autograd" and "mssar" in times)
    ]
    if "se" not in times or not others:
        return None
    se = [f + b for f, b in times["se"]]
    parts = [f"SE {median_ms(se):.1f} ms"]
    for name in others:
        total = [f + b for f, b in times[name]]
        part = f"{variant_label(name)} {median_ms(total):.1f} ms, "
        interval = ratio_interval(total, se)
        if interval is None:  # fewer than 5 rounds
            part += f"{statistics.median(t / s for t, s in zip(total, se)):.2f}"
        else:
            part += f"{interval[0]:.2f} ({interval[1]:.2f}-{interval[2]:.2f})"
        parts.append(part)
    return (
        f"Inside the modules ({len(se)} more interleaved steps, hooks), per step and x SE "
        "(median of the per-round ratios, 95% bootstrap interval): " + "; ".join(parts)
    )


def overhead_interval(
    plain: list[float], se: list[float], mssar: list[float], resamples: int = 2000
) -> tuple[float, float, float] | None:
    """Overhead ratio from paired differences, with its 95% bootstrap interval.

    A round times every variant once, back to back, so within a round the load is about the same
    for all of them: the ratio is median(MS-SAR_i - plain_i) / median(SE_i - plain_i) over rounds
    i, and the interval comes from resampling whole rounds. Returns (ratio, low, high), or None
    with fewer than 5 rounds or when SE's overhead is not positive in the data or in more than 5%
    of the resamples (a ratio to it would then mean nothing).
    """
    rounds = len(plain)
    if rounds < 5:
        return None
    se_overhead = [s - p for s, p in zip(se, plain)]
    mssar_overhead = [m - p for m, p in zip(mssar, plain)]
    if statistics.median(se_overhead) <= 0:
        return None
    ratios = []
    for pick in resampled_rounds(rounds, resamples):
        s = statistics.median(se_overhead[i] for i in pick)
        if s > 0:
            ratios.append(statistics.median(mssar_overhead[i] for i in pick) / s)
    if len(ratios) < 0.95 * resamples:
        return None
    estimate = statistics.median(mssar_overhead) / statistics.median(se_overhead)
    return estimate, *percentile_interval(ratios)


def overhead_summary(rows: list[dict]) -> str | None:
    """The overhead-ratio line of a model's table, or None without plain, SE and MS-SAR rows."""
    ratio = overhead_ratio(rows)
    if ratio is None:
        return None
    interval = rows[0].get("overhead_interval")
    text = "MS-SAR overhead / SE overhead: "
    if interval is not None:
        estimate, low, high = interval
        text += (
            f"{estimate:.2f} (median paired differences, 95% bootstrap interval "
            f"{low:.2f}-{high:.2f}), "
        )
    return text + f"{ratio:.2f} (ratio of medians); goal <= 1.5"


def summaries(rows: list[dict]) -> list[str]:
    """The lines printed under a model's table: the overhead ratio, the time inside the modules
    (SE and MS-SAR, the others over SE) and what the hand-written backward buys."""
    times = rows[0].get("module_times", {}) if rows else {}
    lines = (
        overhead_summary(rows),
        module_summary(times),
        others_summary(times),
        handwritten_summary(rows),
    )
    return [line for line in lines if line is not None]


def handwritten_summary(rows: list[dict]) -> str | None:
    """What the hand-written backward (``mssar``) buys over autograd's (``mssar-autograd``):
    per-round ratios of whole steps and of the time inside the modules, with bootstrap intervals."""
    totals = rows[0].get("step_totals", {}) if rows else {}
    if not {"mssar", "mssar-autograd"} <= totals.keys():
        return None
    text = "Hand-written / autograd backward, whole step: "
    interval = ratio_interval(totals["mssar"], totals["mssar-autograd"])
    if interval is None:
        return None
    estimate, low, high = interval
    text += f"{estimate:.3f} (95% bootstrap interval {low:.3f}-{high:.3f})"
    times = rows[0].get("module_times", {})
    if {"mssar", "mssar-autograd"} <= times.keys():
        module = ratio_interval(
            [f + b for f, b in times["mssar"]], [f + b for f, b in times["mssar-autograd"]]
        )
        fused = median_ms([f + b for f, b in times["mssar"]])
        auto = median_ms([f + b for f, b in times["mssar-autograd"]])
        if module is not None:
            text += (
                f"; inside the modules {fused:.1f} against {auto:.1f} ms per step, "
                f"{module[0]:.3f} ({module[1]:.3f}-{module[2]:.3f})"
            )
    return text


def overhead_ratio(rows: list[dict], key: str = "ratio_to_plain") -> float | None:
    ratio = {row["variant"]: row[key] for row in rows}
    if not {"se", "mssar"} <= ratio.keys() or ratio["se"] == 1:
        return None
    return (ratio["mssar"] - 1) / (ratio["se"] - 1)

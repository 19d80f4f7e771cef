"""Measured training-step cost of the modules: the CPU rows of the step benchmark.

``benchmarks/module_step.py`` appends one row per network and variant to
``results/bench/module_step.csv`` (``date``, ``machine``, ``device``, ``threads``, ``model``,
``batch``, ``variant``, ``paired_ratio``, ...): ``paired_ratio`` is the median over interleaved
rounds of the variant's step time over the plain network's in the same round, the ratio least
disturbed by other load on a shared machine. The report shows, per network and module, the
**newest** CPU row. The paper's cost columns (Tables 2, 3, 5) are FLOPs and parameters only,
which do not predict time: a module's pooling and gating add few multiply-adds but whole passes
over the feature maps.

The file is looked for beside the results directory's run folders (``RESULTS/bench/``) and one
level up (``mssar report results/fashion_mnist`` finds ``results/bench/``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from mssar_cli.recalibration import PLAIN
from mssar_cli.report.collect import model_label

BENCH_FILE = Path("bench") / "module_step.csv"
# The benchmark names the network without a module "plain"; its other variants are registry
# names ("se", "mssar", "eca", "gc", ...: benchmarks/step_variants.py) or implementations of one
# ("mssar-direct", "mssar-autograd"), which are never matched.
BENCH_PLAIN = "plain"
_COLUMNS = ("date", "machine", "device", "model", "variant", "paired_ratio")


@dataclass(frozen=True)
class StepRatio:
    """One benchmark row: a module's step time over the plain network's, and where it was
    measured."""

    ratio: float
    date: str
    machine: str
    threads: str
    batch: str


@dataclass(frozen=True)
class StepBench:
    """The newest CPU row per (network, variant) of a benchmark file (empty when none)."""

    path: Path | None = None
    rows: dict[tuple[str, str], StepRatio] = field(default_factory=dict)
    problem: str = ""

    def ratio(self, model: str, recalibration: str) -> StepRatio | None:
        """The newest CPU measurement of ``model`` with ``recalibration``, if any."""
        variant = BENCH_PLAIN if recalibration == PLAIN else recalibration
        return self.rows.get((model, variant))

    def source(self, shown: Iterable[tuple[str, str]]) -> str:
        """The caption's sentence on where the ratios of the ``shown`` (model, recalibration)
        pairs come from: the file, and the date and machine of every row used."""
        head = "CPU step time × plain: the measured training-step time over the plain network's"
        if self.path is None:
            return f"{head}; no {BENCH_FILE.as_posix()} beside the results (—)."
        if self.problem:
            return f"{head}; {self.path} could not be read ({self.problem}; —)."
        rows: dict[str, set[tuple[str, str, str, str]]] = {}
        for model, recalibration in shown:
            row = self.ratio(model, recalibration)
            if row is not None:
                rows.setdefault(model, set()).add((row.date, row.machine, row.threads, row.batch))
        used = [
            f"{model_label(model)}: {date}, {machine}, {threads} threads, batch {batch}"
            for model, seen in rows.items()
            for date, machine, threads, batch in sorted(seen)
        ]
        if not used:
            return f"{head}; {self.path} has no CPU row of these networks (—)."
        return (
            f"{head} (paired_ratio), the newest CPU row per network and module of {self.path} "
            f"({'; '.join(used)}); — where it has none."
        )


def find_bench(root: str | Path | None) -> Path | None:
    """``ROOT/bench/module_step.csv`` or ``ROOT/../bench/module_step.csv``, if either exists."""
    if root is None:
        return None
    root = Path(root)
    for folder in (root, root.parent):
        if (folder / BENCH_FILE).is_file():
            return folder / BENCH_FILE
    return None


def read_bench(path: Path | None) -> StepBench:
    """The newest CPU row per (model, variant) of the benchmark CSV at ``path``."""
    if path is None:
        return StepBench()
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as error:
        return StepBench(path, problem=type(error).__name__)
    missing = [c for c in _COLUMNS if c not in frame.columns]
    if missing:
        return StepBench(path, problem=f"no column {', '.join(missing)}")
    frame = frame[frame["device"].str.lower().str.startswith("cpu")].copy()
    # ISO 8601 dates with offsets: compared as times, not strings; unparsable ones go first
    frame["_when"] = pd.to_datetime(frame["date"], utc=True, errors="coerce", format="ISO8601")
    frame["_ratio"] = pd.to_numeric(frame["paired_ratio"], errors="coerce")
    frame = frame[frame["_ratio"].notna()].sort_values("_when", kind="stable", na_position="first")
    rows = {}
    for (model, variant), group in frame.groupby(["model", "variant"], sort=False):
        last = group.iloc[-1]
        rows[(model, variant)] = StepRatio(
            float(last["_ratio"]),
            last["date"],
            last["machine"],
            last.get("threads", "?") or "?",
            last.get("batch", "?") or "?",
        )
    return StepBench(path, rows)

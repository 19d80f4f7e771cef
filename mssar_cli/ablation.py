"""Ablation grids (paper §4.2, Table 3): expand a base recipe into runs, and run what is missing.

Every cell is the base recipe plus ``--set`` overrides and its own experiment name
``<base>--<kind>-<label>``, so each lands in its own run directory. Each run is a separate
``mssar train --resume`` process: finished runs are skipped without starting one, interrupted
runs continue from their last checkpoint, so re-running an ablation after a crash finishes only
what is missing.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mssar_cli import runs
from mssar_cli.errors import MssarError
from mssar_cli.models import MODELS
from mssar_cli.recipe import Recipe, apply_override, from_dict, load

SCALE_SETS = ((1,), (2,), (4,), (1, 2), (1, 4), (2, 4), (1, 2, 4))  # Table 3's rows
KINDS = ("scales", "strategy", "stage", "recalibration", "grid")
MSSAR_ONLY = ("model.scales", "model.strategy")


@dataclass(frozen=True)
class Cell:
    """One configuration of the grid: a label and the overrides that make it."""

    label: str
    overrides: tuple[str, ...]


@dataclass(frozen=True)
class PlannedRun:
    cell: Cell
    seed: int
    recipe: Recipe
    overrides: tuple[str, ...] = field(default=())  # everything passed to `mssar train --set`

    @property
    def run_dir(self) -> Path:
        return self.recipe.run_dir()

    @property
    def status(self) -> str:
        if runs.is_finished(self.run_dir):
            return "finished"
        if (self.run_dir / runs.CHECKPOINT).exists():
            return "interrupted"
        return "missing"


def _set(key: str, value) -> str:
    return f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"


def kind_cells(kind: str, base: Recipe) -> list[Cell]:
    """The paper's grids: Table 3's scale sets, regional vs sliding, single vs multi-stage, none/SE/MS-SAR."""
    if kind == "scales":
        cells = [Cell("none", _none_overrides())]
        for scales in SCALE_SETS:
            label = "_".join(map(str, scales))
            cells.append(Cell(label, (_set("model.recalibration", "mssar"), _set("model.scales", list(scales)))))
        return cells
    if kind == "strategy":
        return [
            Cell(s, (_set("model.recalibration", "mssar"), _set("model.strategy", s)))
            for s in ("regional", "sliding")
        ]
    if kind == "stage":
        if not MODELS[base.model.name].is_densenet:
            raise MssarError(f"{base.source}: model.name: the stage ablation needs a DenseNet, not {base.model.name}")
        recal = base.model.recalibration if base.model.recalibration != "none" else "mssar"
        return [Cell(s, (_set("model.recalibration", recal), _set("model.stage", s))) for s in ("single", "multi")]
    if kind == "recalibration":
        return [
            Cell("none", _none_overrides()),
            Cell("se", (_set("model.recalibration", "se"), *_unset(MSSAR_ONLY))),
            Cell("mssar", (_set("model.recalibration", "mssar"),)),
        ]
    if kind == "grid":
        return [Cell("base", ())]
    raise MssarError(f"ablation kind must be one of {', '.join(KINDS)}, got {kind!r}")


def _unset(keys) -> tuple[str, ...]:
    return tuple(f"{key}=null" for key in keys)


def _none_overrides() -> tuple[str, ...]:
    return (_set("model.recalibration", "none"), *_unset((*MSSAR_ONLY, "model.reduction")))


def parse_grid(items: list[str], source: str) -> list[list[Cell]]:
    """``--grid optim.lr=0.1,0.05`` -> one axis of cells per option."""
    axes = []
    for item in items:
        if "=" not in item:
            raise MssarError(f"--grid {item!r}: expected KEY=V1,V2,... such as optim.lr=0.1,0.05")
        key, values = item.split("=", 1)
        parts = _split_values(values)
        if not parts:
            raise MssarError(f"--grid {key}: give at least one value")
        short = key.split(".")[-1]
        axes.append([Cell(f"{short}_{_slug(v)}", (f"{key}={v}",)) for v in parts])
    return axes


def _split_values(text: str) -> list[str]:
    """Split on commas outside brackets: ``[1,2],[4]`` -> ``["[1,2]", "[4]"]``."""
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return [p.strip() for p in parts if p.strip()]


def _slug(value: str) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in value).strip("_") or "x"


def plan(
    kind: str,
    recipe_path: str,
    overrides: list[str],
    grid: list[str],
    seeds: int,
) -> list[PlannedRun]:
    """Every run of the ablation, validated (a bad cell fails here, before anything runs)."""
    if seeds < 1:
        raise MssarError(f"--seeds: expected at least 1, got {seeds}")
    base = load(recipe_path, overrides)
    if kind == "grid" and not grid:
        raise MssarError("mssar ablate grid needs at least one --grid KEY=V1,V2")
    axes = [kind_cells(kind, base), *parse_grid(grid, base.source)]
    base_raw = yaml.safe_load(Path(recipe_path).read_text()) or {}
    base_raw.setdefault("experiment", Path(recipe_path).stem)
    planned = []
    for combo in itertools.product(*axes):
        labels = [c.label for c in combo if c.label != "base"]
        cell_overrides = tuple(o for c in combo for o in c.overrides)
        name = f"{base.experiment}--{kind}-{'-'.join(labels)}" if labels else f"{base.experiment}--{kind}"
        cell = Cell("-".join(labels) or "base", cell_overrides)
        for i in range(seeds):
            seed = base.run.seed + i
            all_overrides = (*overrides, *cell_overrides, f"experiment={name}", f"run.seed={seed}")
            raw = yaml.safe_load(yaml.safe_dump(base_raw))
            for item in all_overrides:
                apply_override(raw, item, base.source)
            recipe = from_dict(raw, f"{base.source} [{cell.label}]")
            planned.append(PlannedRun(cell, seed, recipe, all_overrides))
    return planned


@dataclass
class Outcome:
    run: PlannedRun
    returncode: int
    seconds: float
    log_tail: str


def train_command(run: PlannedRun, recipe_path: str, threads: int | None) -> list[str]:
    command = [sys.executable, "-m", "mssar_cli", "train", recipe_path, "--resume", "--quiet"]
    for item in run.overrides:
        command += ["--set", item]
    if threads is not None and run.recipe.run.threads is None:
        command += ["--set", f"run.threads={threads}"]
    return command


def execute(
    planned: list[PlannedRun],
    recipe_path: str,
    jobs: int,
    on_done: Callable[[Outcome], None],
    on_start: Callable[[PlannedRun], None] | None = None,
) -> list[Outcome]:
    """Run every run that is not finished, ``jobs`` at a time, each in its own process."""
    if jobs < 1:
        raise MssarError(f"--jobs: expected at least 1, got {jobs}")
    todo = [run for run in planned if run.status != "finished"]
    on_cpu = all(run.recipe.run.device == "cpu" or not _has_cuda() for run in todo)
    threads = max(1, (os.cpu_count() or 1) // jobs) if on_cpu and jobs > 1 else None
    outcomes: list[Outcome] = []

    def one(run: PlannedRun) -> Outcome:
        start = time.perf_counter()
        log_dir = run.run_dir.parent.parent / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / f"{run.recipe.experiment}-seed{run.seed}.log"
        with open(log_path, "a") as log:
            process = subprocess.run(
                train_command(run, recipe_path, threads), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        tail = "\n".join(log_path.read_text().splitlines()[-3:])
        return Outcome(run, process.returncode, time.perf_counter() - start, tail)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        pending: set[Future] = set()
        queue = list(todo)
        while queue or pending:
            while queue and len(pending) < jobs:
                run = queue.pop(0)
                if on_start:
                    on_start(run)
                pending.add(pool.submit(one, run))
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                outcome = future.result()
                outcomes.append(outcome)
                on_done(outcome)
    return outcomes


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def summary_frame(planned: list[PlannedRun]):
    """Per cell: finished seeds and mean ± std of the final test error."""
    import pandas as pd

    records = []
    for run in planned:
        summary_path = run.run_dir / runs.SUMMARY
        err = None
        if runs.is_finished(run.run_dir):
            err = runs.read_json(summary_path)["final"]["test_err"]
        records.append({"cell": run.cell.label, "experiment": run.recipe.experiment, "seed": run.seed, "test_err": err})
    frame = pd.DataFrame.from_records(records)
    grouped = frame.groupby(["cell", "experiment"], sort=False)["test_err"]
    out = grouped.agg(["count", "size", "mean", "std"]).reset_index()
    out["final test error %"] = [
        "—" if n == 0 else (f"{m:.2f}" if n == 1 else f"{m:.2f} ± {s:.2f}") for n, m, s in zip(out["count"], out["mean"], out["std"])
    ]
    out["finished"] = [f"{c}/{n}" for c, n in zip(out["count"], out["size"])]
    return out[["cell", "experiment", "finished", "final test error %"]]

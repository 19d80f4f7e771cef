"""Ablation grids (paper §4.2, Table 3): expand a base recipe into the runs of a grid.

Every cell is the base recipe plus ``--set`` overrides and its own experiment name
``<base>--<kind>-<label>``, so each lands in its own run directory. This module only plans:
:mod:`mssar_cli.launch` starts each run as a separate ``mssar train --resume`` process (here or
on a Slurm cluster), skipping finished runs and continuing interrupted ones from their last
checkpoint, so re-running an ablation after a crash finishes only what is missing.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mssar_cli import runs
from mssar_cli.errors import MssarError
from mssar_cli.models import MODELS, STAGES
from mssar_cli.recalibration import PLAIN, RECALIBRATIONS, get
from mssar_cli.recipe import MODULE_KEYS, Recipe, choices, load, with_overrides

SCALE_SETS = ((1,), (2,), (4,), (1, 2), (1, 4), (2, 4), (1, 2, 4))  # Table 3's rows
KINDS = ("scales", "strategy", "stage", "recalibration", "grid")


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
    def log_path(self) -> Path:
        """Where a launcher writes the run's output: ``results/<dataset>/logs/``."""
        return self.run_dir.parent.parent / "logs" / f"{self.recipe.experiment}-seed{self.seed}.log"

    @property
    def status(self) -> str:
        if runs.is_finished(self.run_dir):
            return "finished"
        if (self.run_dir / runs.CHECKPOINT).exists():
            return "interrupted"
        return "missing"


def _set(key: str, value) -> str:
    text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
    return f"{key}={text}"


def kind_cells(kind: str, base: Recipe, modules: list[str] | None = None) -> list[Cell]:
    """The paper's grids (§4.2): Table 3's scale sets, regional vs sliding, single vs multi-stage,
    and the registered recalibration modules (``modules``, default all) against the plain
    network."""
    if kind == "scales":
        cells = [_module_cell("none", base)]
        mssar = _module_cell("mssar", base).overrides
        for scales in SCALE_SETS:
            label = "_".join(map(str, scales))
            cells.append(Cell(label, (*mssar, _set("model.scales", list(scales)))))
        return cells
    if kind == "strategy":
        mssar = _module_cell("mssar", base).overrides
        return [Cell(s, (*mssar, _set("model.strategy", s))) for s in choices("model.strategy")]
    if kind == "stage":
        if not MODELS[base.model.name].is_densenet:
            raise MssarError(
                f"{base.source}: model.name: the stage ablation needs a DenseNet, "
                f"not {base.model.name}"
            )
        recal = base.model.recalibration if base.model.recalibration != "none" else "mssar"
        module = _module_cell(recal, base).overrides
        return [Cell(s, (*module, _set("model.stage", s))) for s in STAGES]
    if kind == "recalibration":
        return [_module_cell(name, base) for name in _chosen_modules(modules)]
    if kind == "grid":
        return [Cell("base", ())]
    raise MssarError(f"ablation kind must be one of {', '.join(KINDS)}, got {kind!r}")


def _chosen_modules(modules: list[str] | None) -> list[str]:
    """The plain network and ``modules`` (every registered one when None), in registry order."""
    if modules is None:
        return list(RECALIBRATIONS)
    for name in modules:
        if name not in RECALIBRATIONS:
            known = ", ".join(k for k in RECALIBRATIONS if k != PLAIN)
            raise MssarError(f"--modules: unknown module {name!r} (known: {known})")
    return [name for name in RECALIBRATIONS if name == PLAIN or name in modules]


def _module_cell(name: str, base: Recipe) -> Cell:
    """The cell of recalibration module ``name`` for recipe ``base``: the options it does not take
    are dropped, both the model keys (``scales``, ``strategy``, ``reduction``: unset) and those
    under ``model.options`` (e.g. ge's ``extent``; the ones it takes keep their values)."""
    takes = get(name).options
    unset = [f"model.{key}=null" for key in MODULE_KEYS if key not in takes]
    kept = {key: value for key, value in base.model.options.items() if key in takes}
    options = [_set("model.options", kept)] if kept != dict(base.model.options) else []
    return Cell(name, (_set("model.recalibration", name), *unset, *options))


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
    modules: list[str] | None = None,
) -> list[PlannedRun]:
    """Every run of the ablation, validated (a bad cell fails here, before anything runs).
    ``modules`` chooses the modules of the ``recalibration`` grid (default: all registered)."""
    if modules is not None and kind != "recalibration":
        raise MssarError("--modules chooses the modules of `mssar ablate recalibration` only")
    if seeds < 1:
        raise MssarError(f"--seeds: expected at least 1, got {seeds}")
    base = load(recipe_path, overrides)
    if kind == "grid" and not grid:
        raise MssarError("mssar ablate grid needs at least one --grid KEY=V1,V2")
    axes = [kind_cells(kind, base, modules), *parse_grid(grid, base.source)]
    planned = []
    for combo in itertools.product(*axes):
        labels = [c.label for c in combo if c.label != "base"]
        cell_overrides = tuple(o for c in combo for o in c.overrides)
        name = (
            f"{base.experiment}--{kind}-{'-'.join(labels)}"
            if labels
            else f"{base.experiment}--{kind}"
        )
        cell = Cell("-".join(labels) or "base", cell_overrides)
        for i in range(seeds):
            seed = base.run.seed + i
            run_overrides = (*cell_overrides, f"experiment={name}", f"run.seed={seed}")
            recipe = with_overrides(base, run_overrides, f"{base.source} [{cell.label}]")
            all_overrides = (*overrides, *run_overrides)
            planned.append(PlannedRun(cell, seed, recipe, all_overrides))
    return planned


def summary_frame(planned: list[PlannedRun]):
    """Per cell: finished seeds and mean ± std of the final test error."""
    import pandas as pd

    records = []
    for run in planned:
        summary_path = run.run_dir / runs.SUMMARY
        err = None
        if runs.is_finished(run.run_dir):
            err = runs.read_json(summary_path)["final"]["test_err"]
        records.append(
            {
                "cell": run.cell.label,
                "experiment": run.recipe.experiment,
                "seed": run.seed,
                "test_err": err,
            }
        )
    frame = pd.DataFrame.from_records(records)
    grouped = frame.groupby(["cell", "experiment"], sort=False)["test_err"]
    out = grouped.agg(["count", "size", "mean", "std"]).reset_index()
    out["final test error %"] = [
        "—" if n == 0 else (f"{m:.2f}" if n == 1 else f"{m:.2f} ± {s:.2f}")
        for n, m, s in zip(out["count"], out["mean"], out["std"])
    ]
    out["finished"] = [f"{c}/{n}" for c, n in zip(out["count"], out["size"])]
    return out[["cell", "experiment", "finished", "final test error %"]]

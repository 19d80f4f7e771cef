"""Run directories → one pandas DataFrame, one row per run (SPEC.md §4).

``mssar report`` reads only run directories (``RESULTS/<dataset>/<experiment>/seed<k>/``, see
:mod:`mssar_cli.runs`), never models or checkpoints, and imports no torch. A run's
``recipe.yaml`` is read through the recipe schema (:func:`mssar_cli.recipe.load`: validated,
every default filled in); its network through the network table
(:data:`mssar_cli.models.MODELS`) and its module through the recalibration registry
(:data:`mssar_cli.recalibration.RECALIBRATIONS`), so that a newly registered module is reported
without editing the report.

- the number of a run is the error of its **final** epoch (``summary.json`` ``final``, the last
  row of ``epochs.csv``); the best epoch is never shown;
- a run's *configuration* is its dataset, network, module options with every default explicit
  (``scales: null`` and ``[1, 2, 4]`` are the same network) and training protocol (the schema's
  :func:`~mssar_cli.recipe.protocol_keys`, labelled by :mod:`mssar_cli.report.protocols`);
- an unfinished run (no ``summary.json`` with status "finished") keeps its last finished epoch
  and is marked so; it is never averaged in (:mod:`mssar_cli.report.stats`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from mssar_cli.errors import MssarError
from mssar_cli.models import MODELS, default_stage
from mssar_cli.recalibration import RECALIBRATIONS, resolve_options
from mssar_cli.recipe import Recipe, RecipeError, load, protocol_keys
from mssar_cli.report.protocols import is_paper_protocol, label_protocols
from mssar_cli.report.render import NONE

DATASETS = {
    "cifar10": "CIFAR-10",
    "cifar100": "CIFAR-100",
    "imagenet": "ImageNet",
    "fashion-mnist": "Fashion-MNIST",
    "synthetic": "synthetic",
}
METRICS = ("test_err", "test_top5_err", "test_loss", "train_err", "train_loss")
# The module columns: display strings, "—" where the option does not apply. ``options`` holds
# the options of a module that none of the other columns shows ("" for plain, SE and MS-SAR).
MODULE_COLUMNS = ("scales", "strategy", "stage", "reduction", "options")
CONFIG_COLUMNS = ["dataset", "model", "recalibration", *MODULE_COLUMNS, "protocol_key"]
RUN_COLUMNS = [
    "path",
    "run",
    "dataset",
    "experiment",
    "model",
    "recalibration",
    *MODULE_COLUMNS,
    "protocol",
    "paper_protocol",
    "protocol_key",
    "epochs_planned",
    "epochs_done",
    "status",
    "seed",
    *METRICS,
    "params",
    "flops",
]


# --- names and labels: the network table and the recalibration registry ---------------------


def model_label(model: str) -> str:
    """The paper's name of a network ("RN-20")."""
    spec = MODELS.get(model)
    return spec.label if spec else model


def model_family(model: str) -> str:
    spec = MODELS.get(model)
    return spec.family if spec else "unknown"


def recalibration_label(recalibration: str) -> str:
    """A module's name in tables and figures ("plain", "SE", "MS-SAR")."""
    entry = RECALIBRATIONS.get(recalibration)
    return entry.label if entry else recalibration


def recalibration_order(recalibration: str) -> int:
    """Position in the registry: the order of rows and legends (plain, SE, MS-SAR, ...)."""
    order = list(RECALIBRATIONS)
    return order.index(recalibration) if recalibration in order else len(order)


def format_scales(scales: Iterable[int]) -> str:
    return "{" + ",".join(str(k) for k in scales) + "}"


def format_number(value: float) -> str:
    return f"{float(value):g}"


def _option_text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return format_scales(value)
    if isinstance(value, float):
        return format_number(value)
    return str(value)


def module_columns(
    model: str,
    recalibration: str,
    options: Mapping[str, Any] | None = None,
    stage: str | None = None,
) -> dict[str, str]:
    """The options the network's module is built with, as display strings (``MODULE_COLUMNS``).

    Defaults come from the registry (:func:`~mssar_cli.recalibration.resolve_options`) and the
    network table (the family's reduction); ``stage`` applies to a recalibrated DenseNet
    (paper §3.4). "—" where an option does not apply; scales as "{1,2,4}".
    """
    spec = MODELS[model]
    resolved = resolve_options(recalibration, options or {}, spec.default_reduction)
    recalibrates = RECALIBRATIONS[recalibration].build is not None
    columns = {
        "scales": format_scales(sorted(resolved["scales"])) if "scales" in resolved else NONE,
        "strategy": str(resolved["strategy"]) if "strategy" in resolved else NONE,
        "stage": (stage or default_stage(recalibration))
        if spec.is_densenet and recalibrates
        else NONE,
        "reduction": format_number(resolved["reduction"]) if "reduction" in resolved else NONE,
    }
    if spec.is_densenet and recalibrates:
        columns["stage"] = stage or default_stage(recalibration)
    rest = [f"{key}={_option_text(v)}" for key, v in resolved.items() if key not in columns]
    columns["options"] = ", ".join(rest)
    return columns


# --- reading run directories ------------------------------------------------------------------


def protocol_of(recipe: Recipe) -> dict[str, Any]:
    """The recipe's training protocol: the schema's protocol keys, flattened ("optim.lr")."""
    sections = recipe.to_dict()
    out = {}
    for key in protocol_keys():
        section, name = key.split(".", 1)
        value = sections[section][name]
        out[key] = list(value) if isinstance(value, (list, tuple)) else value
    return out


def _read_csv(path: Path) -> pd.DataFrame:
    if not path.exists() or path.stat().st_size == 0:
        return pd.DataFrame()
    return pd.read_csv(path)


def read_history(run_dir: str | Path) -> pd.DataFrame:
    """A run's ``epochs.csv`` (empty frame when it has none)."""
    return _read_csv(Path(run_dir) / "epochs.csv")


def _read_run(run_dir: Path, root: Path) -> dict:
    recipe = load(run_dir / "recipe.yaml")
    model = recipe.model
    history = read_history(run_dir)
    summary: dict = {}
    if (run_dir / "summary.json").exists():
        summary = json.loads((run_dir / "summary.json").read_text())
    finished = summary.get("status") == "finished"
    last = history.iloc[-1].to_dict() if len(history) else {}
    final = {**last, **(summary.get("final") or {})} if finished else last
    protocol = protocol_of(recipe)
    options = {k: v for k, v in recipe.module_options().items() if k != "stage"}
    record = {
        "path": str(run_dir),
        "run": run_dir.relative_to(root).as_posix() if run_dir != root else run_dir.name,
        "dataset": recipe.data.dataset,
        "experiment": recipe.experiment,
        "model": model.name,
        "recalibration": model.recalibration,
        **module_columns(model.name, model.recalibration, options, model.stage),
        "protocol": "",  # filled in by label_protocols, which sees every run
        "paper_protocol": is_paper_protocol(model_family(model.name), protocol),
        "protocol_key": json.dumps(protocol, sort_keys=True),
        "epochs_planned": recipe.optim.epochs,
        "epochs_done": len(history)
        if len(history) or not finished
        else int(summary.get("epochs", 0)),
        "status": "finished" if finished else "unfinished",
        "seed": recipe.run.seed,
        "params": summary.get("params", math.nan) if finished else math.nan,
        "flops": summary.get("flops", math.nan) if finished else math.nan,
    }
    for metric in METRICS:
        value = final.get(metric)
        record[metric] = float(value) if value is not None and value == value else math.nan
    return record


def collect_runs(results_dir: str | Path) -> pd.DataFrame:
    """One row per run directory (any folder below ``results_dir`` holding a ``recipe.yaml``).

    Columns: ``RUN_COLUMNS``. The module columns are the effective values as strings ("—"
    where they do not apply); ``protocol`` is a short label ("160 ep (paper)", "5 ep, 6000
    imgs"); the metric columns hold the final epoch of a finished run and, for an unfinished
    run, its last finished epoch (never averaged; see ``status``). Folders whose recipe does not
    load or whose files cannot be read are listed in ``frame.attrs["skipped"]``;
    ``frame.attrs["root"]`` is ``results_dir``.
    """
    root = Path(results_dir)
    if not root.is_dir():
        raise MssarError(f"{root}: no such directory")
    records, skipped = [], []
    for recipe_path in sorted(root.rglob("recipe.yaml")):
        run_dir = recipe_path.parent
        try:
            records.append(_read_run(run_dir, root))
        except RecipeError as error:  # one line naming the file and the key
            skipped.append(str(error))
        except (MssarError, OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            skipped.append(f"{run_dir}: {type(error).__name__}: {error}")
    frame = pd.DataFrame.from_records(records, columns=RUN_COLUMNS)
    label_protocols(frame)
    frame.attrs["skipped"] = skipped
    frame.attrs["root"] = str(root)
    return frame


def runs_of(results: str | Path | pd.DataFrame) -> pd.DataFrame:
    """The runs frame: ``results`` itself when it is one, else ``collect_runs(results)``."""
    return results if isinstance(results, pd.DataFrame) else collect_runs(results)

"""Results → tables: read run directories, average seeds per configuration, set the paper beside.

``mssar report`` reads only run directories (``RESULTS/<dataset>/<experiment>/seed<k>/``, see
:mod:`mssar_cli.runs`), never models or checkpoints, and imports no torch.

Rules (SPEC.md §4):

- the number of a run is the error of its **final** epoch (``summary.json`` ``final``, the last
  row of ``epochs.csv``); the best epoch is never shown;
- runs are grouped by their *configuration*: everything in the recipe except ``experiment``,
  ``run.*`` and ``data.root / workers / download / eval_batch_size``, with every default made
  explicit (``scales: null`` and ``[1, 2, 4]`` are the same network). Runs of different
  protocols (epochs, subset, batch, learning rate, ...) are never averaged together;
- a cell is the mean ± sample standard deviation (ddof 1) over the finished seeds, with n;
- an unfinished run (no ``summary.json`` with status "finished") is never averaged in: the cell
  counts it ("; +1 unfinished") and the last table lists it.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml
from rich.console import Console

from mssar_cli import paper
from mssar_cli.errors import MssarError
from mssar_cli.tables import human_count, render_text, rich_table

NONE = "—"
DEFAULT_SCALES = (1, 2, 4)

# The networks of mssar_cli.models.MODELS, restated here so that reading results needs no torch
# (tests/test_report.py checks that the two agree): paper name, family, default reduction.
MODELS: dict[str, tuple[str, str, float]] = {
    "resnet20": ("RN-20", "cifar-resnet", 3),
    "resnet32": ("RN-32", "cifar-resnet", 3),
    "resnet56": ("RN-56", "cifar-resnet", 3),
    "densenet100": ("DN-100", "cifar-densenet", 1),
    "densenet190": ("DN-190", "cifar-densenet", 1),
    "resnet18": ("ResNet-18", "imagenet-resnet", 16),
    "resnet34": ("ResNet-34", "imagenet-resnet", 16),
    "resnext50": ("ResNeXt-50", "imagenet-resnet", 16),
}
DATASETS = {
    "cifar10": "CIFAR-10",
    "cifar100": "CIFAR-100",
    "imagenet": "ImageNet",
    "fashion-mnist": "Fashion-MNIST",
    "synthetic": "synthetic",
}
RECALIBRATIONS = {"none": "plain", "se": "SE", "mssar": "MS-SAR"}
CIFAR = ("cifar10", "cifar100")

# The paper's training protocols (SPEC.md §4), in the flattened keys of ``protocol_key``.
_SGD = {"optim.lr": 0.1, "optim.momentum": 0.9, "optim.nesterov": True, "optim.weight_decay": 1e-4, "optim.gamma": 0.1}
_FULL_DATA = {"data.augment": True, "data.subset": None, "data.test_subset": None}
PAPER_PROTOCOLS = {
    "cifar-resnet": {**_SGD, **_FULL_DATA, "data.batch_size": 128, "optim.epochs": 160, "optim.milestones": [80, 120]},
    "cifar-densenet": {**_SGD, **_FULL_DATA, "data.batch_size": 64, "optim.epochs": 300, "optim.milestones": [150, 225]},
    "imagenet-resnet": {
        **_SGD,
        **_FULL_DATA,
        "optim.lr": 0.6,
        "data.batch_size": 1024,
        "optim.epochs": 100,
        "optim.milestones": [30, 60, 90],
    },
}
# Recipe keys that are not part of a configuration (where the data lives, how it is loaded).
_NOT_CONFIG = {"data.dataset", "data.root", "data.workers", "data.download", "data.eval_batch_size"}
METRICS = ("test_err", "test_top5_err", "test_loss", "train_err", "train_loss")
CONFIG_COLUMNS = ["dataset", "model", "recalibration", "scales", "strategy", "stage", "reduction", "protocol_key"]
RUN_COLUMNS = [
    "path",
    "run",
    "dataset",
    "experiment",
    "model",
    "recalibration",
    "scales",
    "strategy",
    "stage",
    "reduction",
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
STD_NOTE = "mean ± sample std (ddof 1) over seeds of the final-epoch error, n = finished runs"
UNFINISHED_NOTE = "unfinished runs are counted (\"+k unfinished\") but never averaged in"


@dataclass(frozen=True)
class ReportTable:
    """One table of the report: display strings, a title and a caption."""

    title: str
    frame: pd.DataFrame
    caption: str = ""


# --- reading run directories --------------------------------------------------------------------


def model_label(model: str) -> str:
    return MODELS.get(model, (model, "", 3))[0]


def model_family(model: str) -> str:
    return MODELS.get(model, (model, "unknown", 3))[1]


def is_densenet(model: str) -> bool:
    return model_family(model) == "cifar-densenet"


def format_scales(scales: Iterable[int]) -> str:
    return "{" + ",".join(str(k) for k in scales) + "}"


def _format_number(value: float) -> str:
    return f"{float(value):g}"


def effective_module(model: dict) -> dict[str, str]:
    """The recipe's module options with every default made explicit, as display strings."""
    name = model["name"]
    recal = model.get("recalibration") or "none"
    mssar = recal == "mssar"
    scales = model.get("scales")
    reduction = model.get("reduction")
    default_reduction = MODELS.get(name, (name, "", 3))[2]
    return {
        "scales": format_scales(sorted(scales or DEFAULT_SCALES)) if mssar else NONE,
        "strategy": (model.get("strategy") or "regional") if mssar else NONE,
        "stage": (model.get("stage") or "multi") if is_densenet(name) and recal != "none" else NONE,
        "reduction": _format_number(reduction if reduction is not None else default_reduction) if recal != "none" else NONE,
    }


def _protocol(recipe: dict) -> dict:
    """The data and optimisation settings of a recipe that make a protocol (flattened keys)."""
    out = {}
    for section in ("data", "optim"):
        for key, value in sorted((recipe.get(section) or {}).items()):
            name = f"{section}.{key}"
            if name not in _NOT_CONFIG:
                out[name] = list(value) if isinstance(value, (list, tuple)) else value
    return out


def _same(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def is_paper_protocol(model: str, protocol: dict) -> bool:
    """True when ``protocol`` is the paper's training protocol for ``model``'s family (SPEC §4)."""
    reference = PAPER_PROTOCOLS.get(model_family(model))
    if reference is None:
        return False
    return all(_same(protocol.get(key), value) for key, value in reference.items())


def _read_csv(path: Path) -> pd.DataFrame:
    if not path.exists() or path.stat().st_size == 0:
        return pd.DataFrame()
    return pd.read_csv(path)


def read_history(run_dir: Path) -> pd.DataFrame:
    """A run's ``epochs.csv`` (empty frame when it has none)."""
    return _read_csv(Path(run_dir) / "epochs.csv")


def _read_run(run_dir: Path, root: Path) -> dict:
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    if not isinstance(recipe, dict) or not isinstance(recipe.get("model"), dict):
        raise ValueError("recipe.yaml has no model section")
    model = recipe["model"]
    data = recipe.get("data") or {}
    optim = recipe.get("optim") or {}
    run = recipe.get("run") or {}
    history = read_history(run_dir)
    summary: dict = {}
    if (run_dir / "summary.json").exists():
        summary = json.loads((run_dir / "summary.json").read_text())
    finished = summary.get("status") == "finished"
    last = history.iloc[-1].to_dict() if len(history) else {}
    final = {**last, **(summary.get("final") or {})} if finished else last
    protocol = _protocol(recipe)
    name = model["name"]
    record = {
        "path": str(run_dir),
        "run": run_dir.relative_to(root).as_posix() if run_dir != root else run_dir.name,
        "dataset": data.get("dataset") or run_dir.parent.parent.name.replace("_", "-"),
        "experiment": recipe.get("experiment") or run_dir.parent.name,
        "model": name,
        "recalibration": model.get("recalibration") or "none",
        **effective_module(model),
        "protocol": "",  # filled in by _label_protocols, which sees every run
        "paper_protocol": is_paper_protocol(name, protocol),
        "protocol_key": json.dumps(protocol, sort_keys=True),
        "epochs_planned": int(optim.get("epochs") or 0),
        "epochs_done": len(history) if len(history) or not finished else int(summary.get("epochs", 0)),
        "status": "finished" if finished else "unfinished",
        "seed": int(run.get("seed", summary.get("seed", 0)) or 0),
        "params": summary.get("params", math.nan) if finished else math.nan,
        "flops": summary.get("flops", math.nan) if finished else math.nan,
    }
    for metric in METRICS:
        value = final.get(metric)
        record[metric] = float(value) if value is not None and value == value else math.nan
    return record


def collect_runs(results_dir: str | Path) -> pd.DataFrame:
    """One row per run directory (any folder below ``results_dir`` holding a ``recipe.yaml``).

    Columns: ``RUN_COLUMNS``. ``scales`` / ``strategy`` / ``stage`` / ``reduction`` are the
    effective values as strings ("—" where they do not apply); ``protocol`` is a short label
    ("160 ep (paper)", "5 ep, 6000 imgs"); the metric columns hold the final epoch of a finished
    run and, for an unfinished run, its last finished epoch (never averaged; see ``status``).
    Folders whose recipe cannot be read are listed in ``frame.attrs["skipped"]``.
    """
    root = Path(results_dir)
    if not root.is_dir():
        raise MssarError(f"{root}: no such directory")
    records, skipped = [], []
    for recipe_path in sorted(root.rglob("recipe.yaml")):
        run_dir = recipe_path.parent
        try:
            records.append(_read_run(run_dir, root))
        except (OSError, ValueError, KeyError, TypeError, AttributeError, yaml.YAMLError, pd.errors.ParserError) as error:
            skipped.append(f"{run_dir}: {type(error).__name__}: {error}")
    frame = pd.DataFrame.from_records(records, columns=RUN_COLUMNS)
    _label_protocols(frame)
    frame.attrs["skipped"] = skipped
    return frame


def _family_of_dataset(dataset: str) -> str:
    return "cifar" if dataset in CIFAR else dataset


_SHORT_KEYS = {
    "data.batch_size": "batch",
    "data.augment": "augment",
    "optim.lr": "lr",
    "optim.momentum": "momentum",
    "optim.nesterov": "nesterov",
    "optim.weight_decay": "wd",
    "optim.milestones": "milestones",
    "optim.gamma": "gamma",
}


def _short_protocol(protocol: dict) -> str:
    text = f"{protocol.get('optim.epochs', '?')} ep"
    if protocol.get("data.subset"):
        text += f", {protocol['data.subset']} imgs"
    if protocol.get("data.test_subset"):
        text += f", {protocol['data.test_subset']} test imgs"
    return text


def _value_text(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return "[" + ",".join(map(str, value)) + "]"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _label_protocols(frame: pd.DataFrame) -> None:
    """Give each protocol a short label, unique within a dataset family (CIFAR-10/100 share).

    The label is "<epochs> ep[, <subset> imgs][, <test subset> test imgs]"; when two protocols
    would share it, the settings in which they differ are appended; " (paper)" marks the paper's
    own protocol for the network's family.
    """
    if frame.empty:
        return
    labels: dict[tuple[str, str], str] = {}
    families = frame["dataset"].map(_family_of_dataset)
    for family in families.unique():
        keys = frame.loc[families == family, "protocol_key"].unique()
        protocols = {key: json.loads(key) for key in keys}
        by_short: dict[str, list[str]] = {}
        for key, protocol in protocols.items():
            by_short.setdefault(_short_protocol(protocol), []).append(key)
        for short, group in by_short.items():
            differing = []
            if len(group) > 1:
                names = sorted({name for key in group for name in protocols[key]})
                differing = [n for n in names if len({json.dumps(protocols[k].get(n)) for k in group}) > 1]
            for key in group:
                extra = [f"{_SHORT_KEYS.get(n, n)} {_value_text(protocols[key].get(n))}" for n in differing]
                labels[(family, key)] = ", ".join([short, *extra])
    frame["protocol"] = [
        labels[(family, key)] + (" (paper)" if is_paper else "")
        for family, key, is_paper in zip(families, frame["protocol_key"], frame["paper_protocol"])
    ]


# --- configurations: seeds averaged -------------------------------------------------------------


@dataclass(frozen=True)
class Stat:
    """Mean and sample std over the finished runs of a configuration, and how many are unfinished."""

    mean: float = math.nan
    std: float = math.nan
    n: int = 0
    unfinished: int = 0

    def cell(self, digits: int = 2) -> str:
        more = f"; +{self.unfinished} unfinished" if self.unfinished else ""
        if self.n == 0:
            return f"{NONE} ({self.unfinished} unfinished)" if self.unfinished else NONE
        if self.n == 1 or self.std != self.std:
            return f"{self.mean:.{digits}f} (n={self.n}{more})"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f} (n={self.n}{more})"


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration: keys, protocol, n finished, unfinished, mean/std per metric,
    mean params and FLOPs of the finished runs, and the seeds."""
    records = []
    if runs.empty:
        return pd.DataFrame(columns=[*CONFIG_COLUMNS, "protocol", "paper_protocol", "n", "unfinished"])
    for key, group in runs.groupby(CONFIG_COLUMNS, sort=False, dropna=False):
        done = group[group["status"] == "finished"]
        record = dict(zip(CONFIG_COLUMNS, key))
        record |= {
            "protocol": group["protocol"].iloc[0],
            "paper_protocol": bool(group["paper_protocol"].iloc[0]),
            "epochs_planned": int(group["epochs_planned"].iloc[0]),
            "n": len(done),
            "unfinished": len(group) - len(done),
            "seeds": sorted(done["seed"].tolist()),
            "experiments": sorted(group["experiment"].unique().tolist()),
            "params": done["params"].mean() if len(done) else math.nan,
            "flops": done["flops"].mean() if len(done) else math.nan,
        }
        for metric in METRICS:
            values = done[metric].dropna()
            record[f"{metric}_mean"] = values.mean() if len(values) else math.nan
            record[f"{metric}_std"] = values.std(ddof=1) if len(values) > 1 else math.nan
            record[f"{metric}_n"] = len(values)
        records.append(record)
    return pd.DataFrame.from_records(records)


def stat(match: pd.DataFrame, metric: str = "test_err") -> Stat:
    """The Stat of ``metric`` for a matched configuration (an empty match gives "—")."""
    if match.empty:
        return Stat()
    row = match.iloc[0]
    mean = row.get(f"{metric}_mean", math.nan)
    return Stat(mean, row.get(f"{metric}_std", math.nan), int(row.get(f"{metric}_n", 0)) if mean == mean else 0, int(row["unfinished"]))


def _criteria(model: str, recalibration: str, **overrides: str) -> dict[str, str]:
    """The configuration the paper means by ``model`` with ``recalibration`` (defaults explicit)."""
    raw = {"name": model, "recalibration": recalibration}
    module = effective_module(raw)
    return {"model": model, "recalibration": recalibration, **module, **overrides}


def _match(configs: pd.DataFrame, **criteria) -> pd.DataFrame:
    if configs.empty:
        return configs
    mask = pd.Series(True, index=configs.index)
    for column, value in criteria.items():
        if isinstance(value, (list, tuple, set)):
            mask &= configs[column].isin(list(value))
        else:
            mask &= configs[column] == value
    return configs[mask]


def _protocols(configs: pd.DataFrame, datasets: Iterable[str], criteria: Iterable[dict]) -> list[str]:
    """The protocols under which any of ``criteria`` was run on ``datasets``: paper's first."""
    found = {}
    for crit in criteria:
        match = _match(configs, dataset=list(datasets), **crit)
        for _, row in match.iterrows():
            found[row["protocol"]] = (not row["paper_protocol"], -row["epochs_planned"], row["protocol"])
    return sorted(found, key=found.get)


# --- formatting ---------------------------------------------------------------------------------


def _delta(ours: float, reference: float) -> str:
    if ours != ours or reference != reference:
        return NONE
    return f"{ours - reference:+.2f}"


def _drop(plain: float, recalibrated: float) -> str:
    """Relative error drop (plain − recalibrated) / plain, in %."""
    if plain != plain or recalibrated != recalibrated or plain == 0:
        return NONE
    return f"{100 * (plain - recalibrated) / plain:.1f}%"


def _count(value: float) -> str:
    return human_count(float(value)) if value == value else NONE


def _first(values: Iterable[float]) -> float:
    for value in values:
        if value == value:
            return value
    return math.nan


def _network_name(model: str, recalibration: str, dataset: str) -> str:
    label = model_label(model)
    if dataset == "imagenet":
        return label + {"none": "", "se": "+SE", "mssar": "+MS-SAR"}[recalibration]
    return label + {"none": "", "se": "+SE", "mssar": "*"}[recalibration]


# --- the tables ---------------------------------------------------------------------------------

_CONTRADICTIONS = (
    "The paper disagrees with itself twice (SPEC §5): the RN-56 CIFAR-100 baseline is 29.07 in "
    "Table 2 but 29.41 in Table 3; DN-100* CIFAR-10 is 4.16 in Table 2 but 4.06 in Table 3 and the text."
)


def _table2(configs: pd.DataFrame, shown: set) -> ReportTable:
    rows = []
    pairs = [paper.TABLE2[i : i + 2] for i in range(0, len(paper.TABLE2), 2)]
    for plain_row, star_row in pairs:
        model = plain_row.model
        crits = {r.recalibration: _criteria(model, r.recalibration) for r in (plain_row, star_row)}
        for protocol in _protocols(configs, CIFAR, crits.values()) or [None]:
            means: dict[tuple[str, str], float] = {}
            for prow in (plain_row, star_row):
                row = {"network": prow.label, "protocol": protocol or NONE}
                costs = []
                for dataset, short in (("cifar10", "C10"), ("cifar100", "C100")):
                    match = _match(configs, dataset=dataset, protocol=protocol, **crits[prow.recalibration]) if protocol else configs.iloc[0:0]
                    shown.update(match.index)
                    s = stat(match)
                    means[(prow.recalibration, dataset)] = s.mean
                    row[f"{short} ours"] = s.cell()
                    row[f"{short} paper"] = f"{prow.errors[dataset]:.2f}"
                    row[f"{short} Δ"] = _delta(s.mean, prow.errors[dataset])
                    costs.append((match["params"].iloc[0], match["flops"].iloc[0]) if len(match) else (math.nan, math.nan))
                row["params"] = _count(_first(c[0] for c in costs))
                row["FLOPs"] = _count(_first(c[1] for c in costs))
                for dataset, short in (("cifar10", "C10"), ("cifar100", "C100")):
                    if prow is star_row:
                        ours = _drop(means[("none", dataset)], means[("mssar", dataset)])
                        theirs = _drop(plain_row.errors[dataset], star_row.errors[dataset])
                        row[f"{short} drop ours / paper"] = f"{ours} / {theirs}"
                    else:
                        row[f"{short} drop ours / paper"] = ""
                rows.append(row)
    caption = (
        f"Test error (%) on CIFAR, final epoch. Ours: {STD_NOTE}; {UNFINISHED_NOTE}. "
        "Paper: Table 2 (ResNets: mean of 3 runs; DenseNets: 1 run). Δ = ours − paper (points). "
        "* = MS-SAR with L = {1,2,4}, regional, multi-stage for DenseNets. "
        "Drop = relative error drop of MS-SAR vs the plain network, (plain − MS-SAR) / plain, same protocol. "
        "params / FLOPs (MACs) are ours, of the CIFAR-10 network (CIFAR-100 when only that was run). "
        "(paper) marks the paper's own training protocol; other protocols are not comparable with the paper. "
        + _CONTRADICTIONS
    )
    return ReportTable("Table 2: CIFAR-10 / CIFAR-100 test error (%), ours vs paper", pd.DataFrame(rows), caption)


def _table3(configs: pd.DataFrame, shown: set) -> ReportTable:
    rows = []
    networks = (("resnet56", "RN-56"), ("densenet100", "DN-100"))
    for model, label in networks:
        crit_of = {
            row.scales: (_criteria(model, "none") if not row.scales else _criteria(model, "mssar", scales=format_scales(row.scales)))
            for row in paper.TABLE3
        }
        for protocol in _protocols(configs, CIFAR, crit_of.values()) or [None]:
            for prow in paper.TABLE3:
                crit = crit_of[prow.scales]
                row = {"network": label, "scales": format_scales(prow.scales) if prow.scales else "none", "protocol": protocol or NONE}
                costs = []
                for dataset, short in (("cifar10", "C10"), ("cifar100", "C100")):
                    match = _match(configs, dataset=dataset, protocol=protocol, **crit) if protocol else configs.iloc[0:0]
                    shown.update(match.index)
                    s = stat(match)
                    if model == "resnet56":
                        mean, std = getattr(prow, f"resnet56_{dataset}")
                        theirs = f"{mean:.2f} ± {std:.2f} (n=3)"
                    else:
                        mean = getattr(prow, f"densenet100_{dataset}")
                        theirs = f"{mean:.2f} (n=1)"
                    row[f"{short} ours"] = s.cell()
                    row[f"{short} paper"] = theirs
                    row[f"{short} Δ"] = _delta(s.mean, mean)
                    costs.append((match["params"].iloc[0], match["flops"].iloc[0]) if len(match) else (math.nan, math.nan))
                row["FLOPs ours"] = _count(_first(c[1] for c in costs))
                row["FLOPs paper"] = _count(getattr(prow, f"{model}_flops"))
                row["params ours"] = _count(_first(c[0] for c in costs))
                if model == "densenet100":
                    row["params paper"] = _count(prow.densenet100_params)
                else:  # Table 3 gives no RN-56 params; Table 2's, which the paper says do not change with L
                    row["params paper"] = _count(paper.cost_row(model, "mssar" if prow.scales else "none").params)
                rows.append(row)
    caption = (
        f"Scale ablation (paper Table 3), test error (%), final epoch. Ours: {STD_NOTE}; {UNFINISHED_NOTE}. "
        "Paper: ResNet-56 mean ± std of 3 runs, DenseNet-100 one run. MS-SAR rows: regional, "
        "multi-stage for DenseNet-100, the family's default width. Δ = ours − paper (points). "
        "RN-56 paper params are Table 2's (Table 3 states they do not change with L). "
        + _CONTRADICTIONS
        + " Δ here uses Table 3's values."
    )
    return ReportTable("Table 3: scale ablation, ResNet-56 and DenseNet-100 on CIFAR", pd.DataFrame(rows), caption)


def _table5(configs: pd.DataFrame, shown: set) -> ReportTable:
    rows = []
    groups = [paper.TABLE5[i : i + 3] for i in range(0, len(paper.TABLE5), 3)]
    for group in groups:
        model = group[0].model
        crits = {r.recalibration: _criteria(model, r.recalibration) for r in group}
        for protocol in _protocols(configs, ["imagenet"], crits.values()) or [None]:
            means = {}
            for prow in group:
                match = _match(configs, dataset="imagenet", protocol=protocol, **crits[prow.recalibration]) if protocol else configs.iloc[0:0]
                shown.update(match.index)
                top1, top5 = stat(match, "test_err"), stat(match, "test_top5_err")
                means[prow.recalibration] = top1.mean
                plain = group[0]
                rows.append(
                    {
                        "network": prow.label,
                        "protocol": protocol or NONE,
                        "top-1 ours": top1.cell(),
                        "top-1 paper": f"{prow.errors['top1']:.2f}",
                        "top-1 Δ": _delta(top1.mean, prow.errors["top1"]),
                        "top-5 ours": top5.cell(),
                        "top-5 paper": f"{prow.errors['top5']:.2f}",
                        "top-5 Δ": _delta(top5.mean, prow.errors["top5"]),
                        "params": _count(match["params"].iloc[0]) if len(match) else NONE,
                        "FLOPs": _count(match["flops"].iloc[0]) if len(match) else NONE,
                        "top-1 drop ours / paper": ""
                        if prow.recalibration == "none"
                        else f"{_drop(means['none'], top1.mean)} / {_drop(plain.errors['top1'], prow.errors['top1'])}",
                    }
                )
    caption = (
        f"ILSVRC2012 validation error (%), single 224 centre crop, final epoch. Ours: {STD_NOTE}; "
        f"{UNFINISHED_NOTE}. Paper: Table 5, one run. Δ = ours − paper (points). SE: reduction 16 "
        "(SENet); MS-SAR: L = {1,2,4}, regional, the same total width. Drop = (plain − X) / plain. "
        "params / FLOPs are ours (reference torchvision architectures; the paper's cost columns do not all match them, SPEC §5)."
    )
    return ReportTable("Table 5: ImageNet top-1 / top-5 error (%), ours vs paper", pd.DataFrame(rows), caption)


def _paired(configs: pd.DataFrame, keys: list[str], column: str, values: tuple[str, str], shown: set):
    """Groups of ``configs`` equal in ``keys`` that hold both ``values`` of ``column``.

    Yields (the group's first row, the rows with values[0], the rows with values[1]) and marks
    those rows as shown.
    """
    for _, group in configs.groupby(keys, sort=False):
        a, b = (group[group[column] == value] for value in values)
        if a.empty or b.empty:
            continue
        shown.update(a.index)
        shown.update(b.index)
        yield group.iloc[0], a, b


def _strategy_table(configs: pd.DataFrame, shown: set) -> ReportTable | None:
    mssar = _match(configs, recalibration="mssar")
    keys = ["dataset", "model", "scales", "stage", "reduction", "protocol_key"]
    rows = []
    for first, regional, sliding in _paired(mssar, keys, "strategy", ("regional", "sliding"), shown):
        r, s = stat(regional), stat(sliding)
        rows.append(
            {
                "dataset": DATASETS.get(first["dataset"], first["dataset"]),
                "network": model_label(first["model"]),
                "scales": first["scales"],
                "stage": first["stage"],
                "protocol": first["protocol"],
                "regional": r.cell(),
                "sliding": s.cell(),
                "sliding − regional": _delta(s.mean, r.mean),
                "paper": f"+{paper.STRATEGY_ABLATION_GAP_CIFAR100:.1f} (approx.)" if first["dataset"] == "cifar100" else NONE,
            }
        )
    if not rows:
        return None
    caption = (
        f"MS-SAR regional vs sliding strategy (paper §4.2), test error (%), final epoch. {STD_NOTE}; "
        f"{UNFINISHED_NOTE}. Paper: the regional strategy beats the sliding one by about "
        f"{paper.STRATEGY_ABLATION_GAP_CIFAR100} points on CIFAR-100 for ResNets and DenseNets (text only, no table)."
    )
    return ReportTable("Ablation: regional vs sliding", pd.DataFrame(rows), caption)


def _stage_table(configs: pd.DataFrame, shown: set) -> ReportTable | None:
    dense = configs[(configs["stage"] != NONE)] if not configs.empty else configs
    keys = ["dataset", "model", "recalibration", "scales", "strategy", "reduction", "protocol_key"]
    rows = []
    for first, single, multi in _paired(dense, keys, "stage", ("single", "multi"), shown):
        s, m = stat(single), stat(multi)
        has_paper = (
            first["dataset"] in CIFAR
            and first["model"] == "densenet100"
            and first["recalibration"] == "mssar"
            and first["scales"] == format_scales(DEFAULT_SCALES)
            and first["strategy"] == "regional"
        )
        ps = paper.STAGE_ABLATION["single"][first["dataset"]] if has_paper else math.nan
        pm = paper.STAGE_ABLATION["multi"][first["dataset"]] if has_paper else math.nan
        rows.append(
            {
                "dataset": DATASETS.get(first["dataset"], first["dataset"]),
                "network": _network_name(first["model"], first["recalibration"], first["dataset"]),
                "scales": first["scales"],
                "protocol": first["protocol"],
                "single ours": s.cell(),
                "multi ours": m.cell(),
                "single − multi ours": _delta(s.mean, m.mean),
                "single paper": f"{ps:.2f}" if has_paper else NONE,
                "multi paper": f"{pm:.2f}" if has_paper else NONE,
                "single − multi paper": _delta(ps, pm),
            }
        )
    if not rows:
        return None
    caption = (
        f"DenseNet single- vs multi-stage recalibration (paper §3.4, §4.2), test error (%), final epoch. "
        f"{STD_NOTE}; {UNFINISHED_NOTE}. Paper: DenseNet-100 with MS-SAR L = {{1,2,4}}, one run "
        "(its single-stage numbers equal its L = {1} row of Table 3)."
    )
    return ReportTable("Ablation: DenseNet single- vs multi-stage", pd.DataFrame(rows), caption)


def _sort_key(row: pd.Series) -> tuple:
    order = list(MODELS)
    return (
        order.index(row["model"]) if row["model"] in order else len(order),
        row["model"],
        not row["paper_protocol"],
        -row["epochs_planned"],
        row["protocol"],
        list(RECALIBRATIONS).index(row["recalibration"]) if row["recalibration"] in RECALIBRATIONS else 9,
        (len(row["scales"]), row["scales"]),
        row["strategy"],
        row["stage"],
        row["reduction"],
    )


def _spread_verdict(delta: float, a: Stat, b: Stat) -> str:
    if delta != delta:
        return NONE
    if a.n < 2 or b.n < 2 or a.std != a.std or b.std != b.std:
        return "n/a (needs ≥ 2 seeds each)"
    return "yes" if abs(delta) > max(a.std, b.std) else "no"


def _configurations_table(configs: pd.DataFrame, everything: pd.DataFrame, title: str, intro: str) -> ReportTable:
    """One row per configuration in ``configs``; the plain baselines are looked up in ``everything``."""
    rows = []
    ordered = sorted((row for _, row in configs.iterrows()), key=_sort_key)
    with_top5 = bool(configs["test_top5_err_n"].sum()) if "test_top5_err_n" in configs else False
    with_stage = bool((configs["stage"] != NONE).any())
    for row in ordered:
        this = stat(row.to_frame().T)
        plain_match = _match(
            everything, dataset=row["dataset"], model=row["model"], protocol_key=row["protocol_key"], recalibration="none"
        )
        plain = stat(plain_match)
        if row["recalibration"] == "none":
            delta_text, verdict = "(baseline)", ""
        elif plain_match.empty or plain.n == 0:
            delta_text, verdict = "— (no plain run)", NONE
        else:
            delta = this.mean - plain.mean
            delta_text = f"{delta:+.2f} ({100 * delta / plain.mean:+.1f}%)" if this.n and plain.mean else NONE
            verdict = _spread_verdict(delta, this, plain)
        out = {
            "network": model_label(row["model"]),
            "recalibration": RECALIBRATIONS.get(row["recalibration"], row["recalibration"]),
            "scales": row["scales"],
            "strategy": row["strategy"],
        }
        if with_stage:
            out["stage"] = row["stage"]
        out |= {
            "reduction": row["reduction"],
            "protocol": row["protocol"],
            "test error": this.cell(),
        }
        if with_top5:
            out["top-5 error"] = stat(row.to_frame().T, "test_top5_err").cell()
        out |= {
            "train error": stat(row.to_frame().T, "train_err").cell(),
            "params": _count(row["params"]),
            "FLOPs": _count(row["flops"]),
            "Δ vs plain": delta_text,
            "|Δ| > seed std": verdict,
        }
        rows.append(out)
    caption = (
        f"{intro}Errors in %, final epoch: {STD_NOTE}; {UNFINISHED_NOTE}. "
        "Δ vs plain = this − the plain network of the same model and protocol (points, and relative). "
        "|Δ| > seed std: whether the difference of the means exceeds the larger of the two seed-to-seed "
        "standard deviations (a rough screen, not a significance test). reduction: total MLP width is "
        "D / reduction. FLOPs are MACs per image."
    )
    return ReportTable(title, pd.DataFrame(rows), caption)


def _unfinished_table(runs: pd.DataFrame) -> ReportTable | None:
    todo = runs[runs["status"] != "finished"]
    if todo.empty:
        return None
    rows = [
        {
            "run": r["run"],
            "protocol": r["protocol"],
            "epochs done": f"{r['epochs_done']}/{r['epochs_planned']}",
            "last test error": f"{r['test_err']:.2f} (epoch {r['epochs_done']})" if r["test_err"] == r["test_err"] else NONE,
        }
        for _, r in todo.iterrows()
    ]
    caption = "Runs without a finished summary.json (interrupted or still running): shown here only, never averaged into the tables above. Resume with `mssar train RECIPE --resume`."
    return ReportTable(f"Unfinished runs ({len(rows)})", pd.DataFrame(rows), caption)


def build_report(results_dir: str | Path) -> list[ReportTable]:
    """Every table that the runs under ``results_dir`` fill, in the paper's order.

    Tables 2 and 3 appear when there is any CIFAR run, Table 5 when there is any ImageNet run
    (with "—" in the cells nobody ran); then the regional/sliding and single/multi-stage
    ablations where both sides were run; then one table per other dataset (and the CIFAR /
    ImageNet configurations no paper table holds); last, the unfinished runs.
    """
    root = Path(results_dir)
    runs = collect_runs(root)
    if runs.empty:
        raise MssarError(
            f"{root}: no run directories found (expected <dataset>/<experiment>/seed<k>/ with recipe.yaml)"
        )
    configs = summarize(runs)
    datasets = set(runs["dataset"])
    shown: set = set()
    tables: list[ReportTable] = []
    if datasets & set(CIFAR):
        tables += [_table2(configs, shown), _table3(configs, shown)]
    if "imagenet" in datasets:
        tables.append(_table5(configs, shown))
    for builder in (_strategy_table, _stage_table):
        table = builder(configs, shown)
        if table is not None:
            tables.append(table)
    order = [*DATASETS, *sorted(datasets - set(DATASETS))]
    for dataset in (d for d in order if d in datasets):
        rest = configs[(configs["dataset"] == dataset) & ~configs.index.isin(list(shown))]
        if rest.empty:
            continue
        name = DATASETS.get(dataset, dataset)
        if dataset in paper_datasets():
            title = f"{name}: other configurations"
            intro = "Configurations of this dataset that no paper table above holds. "
        else:
            title = f"{name}: test error by configuration"
            intro = f"{name} is not in the paper: no published numbers to compare with. "
        tables.append(_configurations_table(rest, configs, title, intro))
    unfinished = _unfinished_table(runs)
    if unfinished is not None:
        tables.append(unfinished)
    if runs.attrs.get("skipped"):
        tables.append(
            ReportTable(
                "Skipped directories",
                pd.DataFrame({"directory: problem": runs.attrs["skipped"]}),
                "Folders with a recipe.yaml that could not be read; they are in no table.",
            )
        )
    return tables


def paper_datasets() -> tuple[str, ...]:
    return (*CIFAR, "imagenet")


# --- rendering ----------------------------------------------------------------------------------

# LaTeX: tables.render_text escapes backslashes first, so the braces of "{1,2,4}" and the Greek
# letters go through as placeholders and are put back after it.
_TEX_PLACEHOLDERS = {
    "{": ("\x01", r"\{"),
    "}": ("\x02", r"\}"),
    "Δ": ("\x03", r"$\Delta$"),
    "−": ("\x04", "--"),
    "≥": ("\x05", r"$\geq$"),
    "|": ("\x06", r"\textbar{}"),  # "|Δ| > seed std": in text mode, | and > print as other glyphs (OT1)
    ">": ("\x07", r"\textgreater{}"),
}


def _tex_frame(frame: pd.DataFrame) -> pd.DataFrame:
    def swap(text: str) -> str:
        for char, (placeholder, _) in _TEX_PLACEHOLDERS.items():
            text = text.replace(char, placeholder)
        return text

    out = frame.map(lambda v: swap(str(v)) if isinstance(v, str) else v)
    out.columns = [swap(str(c)) for c in frame.columns]
    return out


def _tex_restore(text: str) -> str:
    for placeholder, tex in _TEX_PLACEHOLDERS.values():
        text = text.replace(placeholder, tex)
    return text


def _markdown_escape(text: str) -> str:
    for char in ("\\", "*", "_", "`"):
        text = text.replace(char, "\\" + char)
    return text


def render(tables: list[ReportTable], fmt: str) -> str:
    """The report as text: ``markdown`` ("### title", table, caption in italics), ``csv`` (a
    "# title" line and "# caption" line before each CSV block, blocks separated by a blank
    line) or ``latex`` (one booktabs tabular per table, title and caption as % comments)."""
    blocks = []
    for table in tables:
        if fmt == "markdown":
            frame = table.frame.map(lambda v: _markdown_escape(v) if isinstance(v, str) else v)
            # tables.render_text escapes "|" in the cells but not in the header ("|Δ| > seed std")
            frame.columns = [_markdown_escape(str(c)).replace("|", "\\|") for c in table.frame.columns]
            parts = [f"### {table.title}", "", render_text(frame, "markdown").rstrip("\n")]
            if table.caption:
                parts += ["", f"*{_markdown_escape(table.caption)}*"]
            blocks.append("\n".join(parts) + "\n")
        elif fmt == "csv":
            lines = [f"# {table.title}"]
            if table.caption:
                lines.append(f"# {table.caption}")
            blocks.append("\n".join(lines) + "\n" + table.frame.to_csv(index=False))
        elif fmt == "latex":
            comments = [f"% {table.title}"] + ([f"% {table.caption}"] if table.caption else [])
            body = _tex_restore(render_text(_tex_frame(table.frame), "latex"))
            blocks.append("\n".join(comments) + "\n" + body)
        else:
            raise MssarError(f"--format must be one of rich, markdown, csv, latex, got {fmt!r}")
    return "\n".join(blocks)


def read_csv_blocks(text: str) -> list[pd.DataFrame]:
    """Parse ``render(tables, "csv")`` back into one frame per table (for scripts and tests)."""
    frames = []
    for block in text.split("\n\n"):
        body = "\n".join(line for line in block.splitlines() if not line.startswith("# "))
        if body.strip():
            frames.append(pd.read_csv(io.StringIO(body), dtype=str, keep_default_na=False))
    return frames


def _looks_numeric(text: str) -> bool:
    text = str(text).strip()
    return bool(text) and (text[0].isdigit() or text[0] in "+-−—(") and not text.startswith("(baseline")


def print_rich(tables: list[ReportTable], console: Console) -> None:
    """Print every table as a Rich table, numbers right-aligned, caption below."""
    for table in tables:
        rich = rich_table(table.frame, table.title, table.caption)
        for column, name in zip(rich.columns, table.frame.columns):
            cells = [v for v in table.frame[name] if isinstance(v, str) and v not in ("", NONE)]
            if cells and all(_looks_numeric(v) for v in cells):
                column.justify = "right"
        rich.caption_justify = "left"
        console.print(rich)
        console.print()

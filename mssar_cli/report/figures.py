"""Figures from run directories (matplotlib, Agg, no pyplot state): the paper's Fig. 3/4 and 5.

- ``curves_<dataset>_<model>_<protocol>.png``: train/test loss and error per epoch, one line per
  recalibration (plain / SE / MS-SAR), mean over the finished seeds with a ±std band (Fig. 3, 4);
- ``error_vs_flops_<dataset>_<protocol>.png``: final test error against FLOPs (MACs) for every
  network with and without recalibration, error bars = seed std; for CIFAR-10/100 and ImageNet
  the paper's points beside as hollow markers with the paper's names (Fig. 5).

Only finished runs are drawn; runs of different protocols are never mixed in one figure.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from mssar_cli import paper
from mssar_cli.models import MODELS
from mssar_cli.recalibration import PLAIN, RECALIBRATIONS
from mssar_cli.report.collect import (
    CONFIG_COLUMNS,
    DATASETS,
    NONE,
    model_label,
    module_columns,
    read_history,
    recalibration_label,
    recalibration_order,
    runs_of,
)
from mssar_cli.report.stats import summarize

# One colour and marker per registered module: plain, SE and MS-SAR keep theirs; any other
# module takes one of the palette, in registry order (module_color, module_marker).
COLORS = {"none": "#4d4d4d", "se": "#1f77b4", "mssar": "#d62728"}
EXTRA_COLORS = ("#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22")
MARKERS = {"none": "o", "se": "s", "mssar": "^"}
EXTRA_MARKERS = ("D", "v", "P", "X", "<", ">", "p", "h")


def _registry_style(name: str, fixed: dict[str, str], extra: tuple[str, ...], unknown: str) -> str:
    if name in fixed:
        return fixed[name]
    others = [entry for entry in RECALIBRATIONS if entry not in fixed]
    return extra[others.index(name) % len(extra)] if name in others else unknown


def module_color(recalibration: str) -> str:
    """The colour of a registered module's lines and points."""
    return _registry_style(recalibration, COLORS, EXTRA_COLORS, "#000000")


def module_marker(recalibration: str) -> str:
    """The marker of a registered module's points (Fig. 5)."""
    return _registry_style(recalibration, MARKERS, EXTRA_MARKERS, "o")


PANELS = (
    ("train_loss", "train loss"),
    ("test_loss", "test loss"),
    ("train_err", "train error (%)"),
    ("test_err", "test error (%)"),
)
DPI = 130
# Where the paper's point labels go (Fig. 5): plain above, SE to the right, MS-SAR below.
LABEL_PLACES = {
    "none": ((0, 7), "center", "bottom"),
    "se": ((7, 0), "left", "center"),
    "mssar": ((0, -7), "center", "top"),
}
_MAIN_COLUMNS = ("scales", "strategy", "stage")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", text).strip("_") or "x"


def _is_main(row: pd.Series) -> bool:
    """A module as the paper runs it: its default options (MS-SAR: L = {1,2,4}, regional),
    multi-stage on DenseNets; any width."""
    defaults = module_columns(row["model"], row["recalibration"])
    return all(row[column] == defaults[column] for column in _MAIN_COLUMNS)


def _seeds_text(counts: list[int]) -> str:
    low, high = min(counts), max(counts)
    return f"n = {low} seed{'s' if high > 1 else ''}" if low == high else f"n = {low}–{high} seeds"


def _config_label(row: pd.Series, duplicated: bool) -> str:
    name = recalibration_label(row["recalibration"])
    if row["scales"] != NONE:
        name += f" {row['scales']}"
    if duplicated and row["reduction"] != NONE:
        name += f", r={row['reduction']}"
    if duplicated and row["options"]:
        name += f", {row['options']}"
    return name


def _histories(runs: pd.DataFrame, config: pd.Series) -> list[pd.DataFrame]:
    mask = runs["status"] == "finished"
    for column in CONFIG_COLUMNS:
        mask &= runs[column] == config[column]
    frames = [read_history(Path(path)) for path in runs.loc[mask, "path"]]
    return [f for f in frames if len(f)]


def _mean_std(
    histories: list[pd.DataFrame], column: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    series = [h.set_index("epoch")[column] for h in histories if column in h]
    if not series:
        return None
    table = pd.concat(series, axis=1)
    epochs = table.index.to_numpy()
    mean = table.mean(axis=1).to_numpy()
    if table.shape[1] > 1:
        std = table.std(axis=1, ddof=1).fillna(0).to_numpy()
    else:
        std = np.zeros_like(mean)
    return epochs, mean, std


def _milestones(protocol_key: str) -> list[int]:
    return list(json.loads(protocol_key).get("optim.milestones") or [])


def _curves_figure(runs: pd.DataFrame, group: pd.DataFrame, path: Path) -> Path | None:
    first = group.iloc[0]
    dataset, model, protocol = first["dataset"], first["model"], first["protocol"]
    recal_counts = group["recalibration"].value_counts()
    lines = []
    extra = iter(EXTRA_COLORS)
    used_colors: set[str] = set()
    # registry order (plain, SE, MS-SAR, ...): the same legend order in every figure
    configs = sorted(
        group.iterrows(), key=lambda item: recalibration_order(item[1]["recalibration"])
    )
    for _, config in configs:
        histories = _histories(runs, config)
        if not histories:
            continue
        color = module_color(config["recalibration"])
        if color in used_colors:  # a second configuration of the same module
            color = next((c for c in extra if c not in used_colors), "#000000")
        used_colors.add(color)
        label = _config_label(config, recal_counts[config["recalibration"]] > 1)
        lines.append((label, color, config, histories))
    if len({config["recalibration"] for _, _, config, _ in lines}) < 2:
        return None

    fig = Figure(figsize=(11, 8), layout="constrained", dpi=DPI)
    axes = fig.subplots(2, 2, sharex=True)
    for ax, (column, ylabel) in zip(axes.flat, PANELS):
        finals = []
        for label, color, _config, histories in lines:
            stats = _mean_std(histories, column)
            if stats is None:
                continue
            epochs, mean, std = stats
            n = len(histories)
            tail = f"{mean[-1]:.2f}" + (f" ± {std[-1]:.2f}" if n > 1 else "")
            marker = "o" if len(epochs) == 1 else None  # a one-epoch run is a point, not a line
            line_label = f"{label}: {tail} (n={n})"
            ax.plot(epochs, mean, color=color, lw=1.6, marker=marker, label=line_label)
            if n > 1:  # losses and errors are never negative, errors never above 100 %
                low = np.maximum(mean - std, 0)
                high = mean + std if column.endswith("loss") else np.minimum(mean + std, 100)
                ax.fill_between(epochs, low, high, color=color, alpha=0.2, lw=0)
            finals.append(mean[-1])
        for milestone in _milestones(first["protocol_key"]):
            ax.axvline(milestone, color="#999999", lw=0.8, ls=":", zorder=0)
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.grid(True, alpha=0.3)
        if column.endswith("_err") and finals:
            # the first epochs' errors dwarf the final differences: show from 0 to a bit above
            # the errors of the last third of training, and say so when the start is cut off
            tops = []
            for _, _, _, histories in lines:
                stats = _mean_std(histories, column)
                if stats is not None:
                    _, mean, std = stats
                    tops.append(np.max((mean + std)[len(mean) // 3 :]))
            top = max(tops) * 1.25 if tops else None
            data_top = max(
                np.max(_mean_std(h, column)[1])
                for _, _, _, h in lines
                if _mean_std(h, column) is not None
            )
            if top and top < data_top:
                ax.set_ylim(0, top)
                ax.text(
                    0.99,
                    0.98,
                    "(first epochs cut off)",
                    transform=ax.transAxes,
                    ha="right",
                    va="top",
                    fontsize=8,
                    color="#666666",
                )
            else:
                ax.set_ylim(bottom=0)
        title = ylabel.split(" (")[0]
        ax.set_title(f"{title} (final: mean ± std over seeds)", fontsize=10)
        loc = "upper right" if column.endswith("loss") else "lower left"
        ax.legend(fontsize=8, loc=loc, framealpha=0.85)
    for ax in axes[1]:
        ax.set_xlabel("epoch")
    counts = [len(h) for _, _, _, h in lines]
    name = DATASETS.get(dataset, dataset)
    fig.suptitle(
        f"{name} · {model_label(model)} ({model}) · {protocol} — mean over seeds, "
        f"band ±1 std ({_seeds_text(counts)})",
        fontsize=12,
    )
    fig.savefig(path)
    return path


def _paper_points(dataset: str) -> list[tuple[str, str, str, float, float]]:
    """(label, model, recalibration, flops, error) of the paper's Table 2 / 5 rows for
    ``dataset``."""
    if dataset in ("cifar10", "cifar100"):
        rows, metric = paper.TABLE2, dataset
    elif dataset == "imagenet":
        rows, metric = paper.TABLE5, "top1"
    else:
        return []
    return [(r.label, r.model, r.recalibration, r.flops, r.errors[metric]) for r in rows]


def _model_color(model: str) -> str:
    palette = (
        "#1f77b4",
        "#ff7f0e",
        "#2ca02c",
        "#d62728",
        "#9467bd",
        "#8c564b",
        "#e377c2",
        "#17becf",
    )
    order = list(MODELS)
    return palette[order.index(model) % len(palette)] if model in order else "#000000"


def _flops_figure(group: pd.DataFrame, path: Path) -> Path | None:
    first = group.iloc[0]
    dataset, protocol = first["dataset"], first["protocol"]
    ours = group[(group["n"] > 0) & group["flops"].notna()]
    if ours.empty:
        return None
    fig = Figure(figsize=(9, 6.5), layout="constrained", dpi=DPI)
    ax = fig.add_subplot()
    models_seen: list[str] = []
    for model, rows in ours.groupby("model", sort=False):
        color = _model_color(model)
        models_seen.append(model)
        rows = rows.sort_values("flops")
        if len(rows) > 1:
            ax.plot(rows["flops"], rows["test_err_mean"], color=color, lw=1, alpha=0.7)
        for _, row in rows.iterrows():
            std = row["test_err_std"] if row["test_err_std"] == row["test_err_std"] else 0.0
            ax.errorbar(
                row["flops"],
                row["test_err_mean"],
                yerr=std,
                fmt=module_marker(row["recalibration"]),
                color=color,
                ms=8,
                capsize=3,
                zorder=3,
            )
    points = _paper_points(dataset)
    if points:
        by_model: dict[str, list] = {}
        for label, model, recal, flops, err in points:
            by_model.setdefault(model, []).append((label, recal, flops, err))
        for model, items in by_model.items():
            color = _model_color(model)
            items.sort(key=lambda item: item[2])
            xs, ys = [i[2] for i in items], [i[3] for i in items]
            ax.plot(xs, ys, color=color, lw=0.8, ls="--", alpha=0.6)
            for label, recal, flops, err in items:
                ax.scatter(
                    flops,
                    err,
                    marker=module_marker(recal),
                    s=70,
                    facecolors="none",
                    edgecolors=color,
                    linewidths=1.4,
                    zorder=2,
                )
                # plain above, MS-SAR below, SE to the right: a label beside its point runs into
                # the next network's on CIFAR's log axis (RN-20* and RN-32 are ~1 cm apart)
                offset, ha, va = LABEL_PLACES.get(recal, ((7, 0), "left", "center"))
                ax.annotate(
                    label,
                    (flops, err),
                    xytext=offset,
                    textcoords="offset points",
                    ha=ha,
                    va=va,
                    fontsize=8,
                    color=color,
                )
    ax.set_xscale("log")
    ax.set_xlabel("FLOPs per image (multiply-accumulates, log scale)")
    metric = "top-1 error (%)" if dataset == "imagenet" else "test error (%)"
    ax.set_ylabel(f"final-epoch {metric}")
    ax.grid(True, which="both", alpha=0.25)
    ax.margins(x=0.15, y=0.08)
    handles = [
        Line2D(
            [],
            [],
            color="#333333",
            marker=module_marker(r),
            ls="",
            ms=8,
            label=f"ours, {recalibration_label(r)} (mean ± std)",
        )
        for r in RECALIBRATIONS
        if r in set(ours["recalibration"])
    ]
    if points:
        recals_in_paper = {p[2] for p in points}
        handles += [
            Line2D(
                [],
                [],
                color="#333333",
                marker=module_marker(r),
                ls="",
                ms=8,
                mfc="none",
                label=f"paper, {recalibration_label(r)}",
            )
            for r in RECALIBRATIONS
            if r in recals_in_paper
        ]
    handles += [
        Line2D([], [], color=_model_color(m), lw=3, label=model_label(m)) for m in models_seen
    ]
    ax.legend(handles=handles, fontsize=8, loc="best", framealpha=0.9, ncol=2)
    name = DATASETS.get(dataset, dataset)
    source = {
        "cifar10": " vs paper Table 2",
        "cifar100": " vs paper Table 2",
        "imagenet": " vs paper Table 5",
    }.get(dataset, "")
    seeds = _seeds_text(ours["n"].astype(int).tolist())
    fig.suptitle(
        f"{name}: final test error vs FLOPs{source}\nours: {protocol}, {seeds} per point; "
        "* / +MS-SAR = MS-SAR {1,2,4}",
        fontsize=11,
    )
    fig.savefig(path)
    return path


def write_figures(results: str | Path | pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """Write every figure the finished runs allow; returns the PNG paths.

    ``results`` is a results directory or the runs frame the tables were built from
    (:func:`mssar_cli.report.collect.collect_runs`).
    """
    runs = runs_of(results)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if runs.empty:
        return []
    configs = summarize(runs)
    main = configs[configs.apply(_is_main, axis=1) & (configs["n"] > 0)]
    written: list[Path] = []
    for _, group in main.groupby(["dataset", "model", "protocol"], sort=False):
        recals = set(group["recalibration"])
        if PLAIN not in recals or len(recals) < 2:  # the plain network and a recalibrated one
            continue
        first = group.iloc[0]
        name = f"curves_{_slug(first['dataset'])}_{first['model']}_{_slug(first['protocol'])}.png"
        done = _curves_figure(runs, group, out / name)
        if done:
            written.append(done)
    for _, group in main.groupby(["dataset", "protocol"], sort=False):
        first = group.iloc[0]
        name = f"error_vs_flops_{_slug(first['dataset'])}_{_slug(first['protocol'])}.png"
        done = _flops_figure(group, out / name)
        if done:
            written.append(done)
    return written

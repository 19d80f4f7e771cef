"""Error against extra FLOPs, every module of one network (matplotlib, Agg, no pyplot state).

``error_vs_extra_flops_<dataset>_<model>_<protocol>.png``: for each (dataset, network, protocol)
of :func:`mssar_cli.report.modules.module_groups` with at least two modules besides the plain
network, x = the module's extra FLOPs (MACs) in % over the plain network's, y = final test
error, mean ± std over the finished seeds; the plain network sits at x = 0. It puts the paper's
cost axis (the FLOPs of Tables 2, 3, 5, and its Fig. 5) on the gain each module buys, with the
same selection of runs as the "modules at equal protocol" table.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from mssar_cli.recalibration import PLAIN
from mssar_cli.report.collect import DATASETS, model_label, recalibration_label
from mssar_cli.report.figures import DPI, _slug, module_color, module_marker
from mssar_cli.report.modules import extra_percent, module_groups, settings
from mssar_cli.report.significance import format_p, welch
from mssar_cli.report.stats import stat

# Besides the plain network: one module alone is a row of the table, not a trade-off.
MIN_MODULES = 2


def _label(row: pd.Series, several: bool) -> str:
    """The registry's label; with the settings when the module has several configurations."""
    label = recalibration_label(row["recalibration"])
    return f"{label} ({settings(row)})" if several else label


def _figure(plain: pd.Series, modules: list[pd.Series], path: Path) -> Path | None:
    points = [(row, extra_percent(row["flops"], plain["flops"])) for row in modules]
    points = [(row, x) for row, x in points if x == x]
    if len({row["recalibration"] for row, _ in points}) < MIN_MODULES:
        return None
    counts = pd.Series([row["recalibration"] for row, _ in points]).value_counts()
    fig = Figure(figsize=(7.5, 5.5), layout="constrained", dpi=DPI)
    ax = fig.add_subplot()
    base = stat(plain.to_frame().T)
    for row, x in [(plain, 0.0), *points]:
        std = row["test_err_std"] if row["test_err_std"] == row["test_err_std"] else 0.0
        name = row["recalibration"]
        several = name != PLAIN and counts[name] > 1
        spread = f" ± {std:.2f}" if row["n"] > 1 else ""  # one seed: no std, no bar
        label = f"{_label(row, several)}: {row['test_err_mean']:.2f}{spread} (n={int(row['n'])})"
        test = welch(stat(row.to_frame().T), base) if name != PLAIN else None
        if test is not None and test.p == test.p:  # the table's test, so the legend can be read
            label += f", Δ {test.delta:+.2f}, p {format_p(test.p)}"
        ax.errorbar(
            x,
            row["test_err_mean"],
            yerr=std,
            fmt=module_marker(name),
            color=module_color(name),
            ms=9,
            capsize=4,
            zorder=3,
            label=label,
        )
    # the plain network's error as a reference line: a module below it is better
    ax.axhline(plain["test_err_mean"], color=module_color(PLAIN), lw=0.8, ls=":", zorder=1)
    ax.set_xlabel("extra FLOPs over the plain network (%, multiply-accumulates per image)")
    metric = "top-1 error" if plain["dataset"] == "imagenet" else "test error"
    ax.set_ylabel(f"final-epoch {metric} (%)")
    ax.grid(True, alpha=0.3)
    ax.margins(x=0.2, y=0.15)
    ax.legend(fontsize=8, loc="best", framealpha=0.9)
    name = DATASETS.get(plain["dataset"], plain["dataset"])
    fig.suptitle(
        f"{name} · {model_label(plain['model'])} · {plain['protocol']}\n"
        f"{metric} vs extra FLOPs, mean ± std over seeds; dotted: plain; "
        "p: Welch's t-test vs plain",
        fontsize=11,
    )
    fig.savefig(path)
    return path


def write_module_figures(configs: pd.DataFrame, out: Path) -> list[Path]:
    """One figure per (dataset, network, protocol) with the plain network and at least
    :data:`MIN_MODULES` modules; ``configs`` is :func:`mssar_cli.report.stats.summarize` of the
    runs frame the tables were built from."""
    written = []
    for plain, modules in module_groups(configs):
        name = (
            f"error_vs_extra_flops_{_slug(plain['dataset'])}_{plain['model']}_"
            f"{_slug(plain['protocol'])}.png"
        )
        done = _figure(plain, modules, out / name)
        if done:
            written.append(done)
    return written

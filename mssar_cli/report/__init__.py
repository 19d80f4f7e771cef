"""Results → tables and figures: read run directories, average seeds per configuration, set the
paper beside (SPEC.md §4).

- :mod:`~mssar_cli.report.collect`: run directories → one frame, one row per run;
- :mod:`~mssar_cli.report.protocols`: the paper's training protocols, protocol labels;
- :mod:`~mssar_cli.report.stats`: mean ± std over seeds per configuration (:class:`Stat`);
- :mod:`~mssar_cli.report.significance`: Welch's t-test of a configuration against plain;
- :mod:`~mssar_cli.report.tables`: Tables 2, 3, 5 and the §4.2 ablations, ours vs the paper;
- :mod:`~mssar_cli.report.published`: ImageNet ResNet-50 (not in the paper) beside the numbers
  the later modules' papers publish (:data:`mssar_cli.paper.PUBLISHED_RESNET50`), each source a
  footnote: a table of every module, and the published cells of the modules table;
- :mod:`~mssar_cli.report.configurations`: every other configuration, unfinished runs;
- :mod:`~mssar_cli.report.modules`: every module against plain at equal protocol, with its cost
  (:mod:`~mssar_cli.report.bench`: the measured CPU step-time ratios);
- :mod:`~mssar_cli.report.render`: Rich, Markdown, CSV and LaTeX;
- :mod:`~mssar_cli.report.figures`: the paper's Fig. 3/4 and 5 (matplotlib, imported on use);
- :mod:`~mssar_cli.report.module_figure`: error against extra FLOPs, every module of a network;
- :mod:`~mssar_cli.report.command`: the ``mssar report`` command.

Reading results imports no torch (scipy only when a significance test is made).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from mssar_cli.errors import MssarError
from mssar_cli.report.collect import (
    CONFIG_COLUMNS,
    DATASETS,
    METRICS,
    NONE,
    RUN_COLUMNS,
    collect_runs,
    read_history,
    runs_of,
)
from mssar_cli.report.configurations import configurations_table, skipped_table, unfinished_table
from mssar_cli.report.modules import modules_tables
from mssar_cli.report.protocols import CIFAR
from mssar_cli.report.published import published_table
from mssar_cli.report.render import ReportTable, print_rich, read_csv_blocks, render
from mssar_cli.report.stats import Stat, summarize
from mssar_cli.report.tables import stage_table, strategy_table, table2, table3, table5

__all__ = [
    "CONFIG_COLUMNS",
    "METRICS",
    "NONE",
    "RUN_COLUMNS",
    "ReportTable",
    "Stat",
    "build_report",
    "collect_runs",
    "paper_datasets",
    "print_rich",
    "read_csv_blocks",
    "read_history",
    "render",
    "summarize",
    "write_figures",
]


def paper_datasets() -> tuple[str, ...]:
    """The datasets of the paper's tables: CIFAR-10/100 (Tables 2, 3) and ImageNet (Table 5)."""
    return (*CIFAR, "imagenet")


def build_report(results: str | Path | pd.DataFrame) -> list[ReportTable]:
    """Every table that the runs under ``results`` fill, in the paper's order.

    ``results`` is a results directory or the frame :func:`collect_runs` made of one. Tables 2
    and 3 appear when there is any CIFAR run, Table 5 when there is any ImageNet run (with "—"
    in the cells nobody ran), followed by the ImageNet ResNet-50 table of every module beside
    its published numbers when a ResNet-50 ImageNet run exists
    (:func:`~mssar_cli.report.published.published_table`); then the regional/sliding and
    single/multi-stage ablations (§4.2) where both sides were run; then one table per other
    dataset (and the CIFAR / ImageNet configurations no paper table holds); then every module
    against the plain network at equal protocol
    (:func:`~mssar_cli.report.modules.modules_tables`); last, the unfinished runs and the
    unreadable folders.
    """
    runs = runs_of(results)
    if runs.empty:
        raise MssarError(
            f"{runs.attrs.get('root', results)}: no run directories found "
            "(expected <dataset>/<experiment>/seed<k>/ with recipe.yaml)"
        )
    configs = summarize(runs)
    datasets = set(runs["dataset"])
    shown: set = set()
    tables: list[ReportTable] = []
    if datasets & set(CIFAR):
        tables += [table2(configs, shown), table3(configs, shown)]
    if "imagenet" in datasets:
        tables.append(table5(configs, shown))
        published = published_table(configs, shown)  # its rows leave "other configurations"
        if published is not None:
            tables.append(published)
    for builder in (strategy_table, stage_table):
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
        tables.append(configurations_table(rest, configs, title, intro))
    tables += modules_tables(configs, runs.attrs.get("root"))
    for table in (unfinished_table(runs), skipped_table(runs)):
        if table is not None:
            tables.append(table)
    return tables


def write_figures(results: str | Path | pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """The figures (Fig. 3/4, 5) of :func:`mssar_cli.report.figures.write_figures`, then error
    against extra FLOPs per network (:mod:`~mssar_cli.report.module_figure`), from one reading of
    the runs; matplotlib is imported here, when figures are asked for."""
    from mssar_cli.report import figures, module_figure

    runs = runs_of(results)
    written = figures.write_figures(runs, out_dir)
    if not runs.empty:
        written += module_figure.write_module_figures(summarize(runs), Path(out_dir))
    return written

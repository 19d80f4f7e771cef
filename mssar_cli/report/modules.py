"""Modules at equal protocol: every registered module against the plain network, trained the same
way, with a significance test and its cost.

The paper compares MS-SAR with SE only on ImageNet (Table 5, one run each) and reports cost as
FLOPs and parameters (Tables 2, 3, 5). Here every (dataset, network, protocol) that has finished
runs of the plain network and of at least one module gets one row per module, in registry order
(:data:`mssar_cli.recalibration.RECALIBRATIONS`): the error over seeds, Δ vs plain with Welch's
test (:mod:`mssar_cli.report.significance`), the extra parameters and FLOPs in % of the plain
network's (the runs' ``summary.json``) and the measured CPU step-time ratio
(:mod:`mssar_cli.report.bench`). ImageNet ResNet-50 rows also show the module's published top-1
error and the baseline of the same source, with the source as a footnote
(:mod:`mssar_cli.report.published`, which also makes the ResNet-50 table of every module, ours vs
published). :func:`module_groups` is also what the error-vs-extra-FLOPs figure draws
(:mod:`mssar_cli.report.module_figure`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from mssar_cli.models import MODELS
from mssar_cli.recalibration import PLAIN
from mssar_cli.report.bench import StepBench, find_bench, read_bench
from mssar_cli.report.collect import (
    DATASETS,
    model_label,
    module_columns,
    recalibration_label,
    recalibration_order,
)
from mssar_cli.report.protocols import SHORT_KEYS, value_text
from mssar_cli.report.published import (
    PUBLISHED_NOTE,
    Sources,
    has_published,
    published_cells,
)
from mssar_cli.report.render import NONE, ReportTable, human_count
from mssar_cli.report.significance import CI_COLUMN, P_COLUMN, WELCH_NOTE, welch_cells
from mssar_cli.report.stats import STD_NOTE, delta, stat

# The module options that must be the registry's defaults for a configuration to stand for its
# module here (the width, ``reduction``, may differ: the recalibration ablation matches SE's
# total width to MS-SAR's); other settings are ablations and have their own tables.
_DEFAULT_COLUMNS = ("scales", "strategy", "stage", "options")


def at_defaults(row: pd.Series) -> bool:
    """Whether a configuration's module is built with the registry's default options (any
    width), as the paper runs each module (MS-SAR: L = {1,2,4}, regional, multi-stage)."""
    defaults = module_columns(row["model"], row["recalibration"])
    return all(row[column] == defaults[column] for column in _DEFAULT_COLUMNS)


def _order(row: pd.Series) -> tuple:
    reduction = row["reduction"]
    return (
        recalibration_order(row["recalibration"]),
        float(reduction) if reduction != NONE else 0.0,
        row["options"],
    )


def module_groups(configs: pd.DataFrame) -> Iterator[tuple[pd.Series, list[pd.Series]]]:
    """Per (dataset, network, protocol) with a finished plain network and at least one finished
    module at its defaults: (the plain configuration, the modules' configurations in registry
    order). Datasets in the report's order, networks in the network table's, the paper's
    protocol first, then longer ones."""
    if configs.empty:
        return
    finished = configs[configs["n"] > 0]
    finished = finished[finished.apply(at_defaults, axis=1)] if len(finished) else finished
    models, datasets = list(MODELS), list(DATASETS)
    keys = []
    for (dataset, model, _), group in finished.groupby(
        ["dataset", "model", "protocol_key"], sort=False
    ):
        plain = group[group["recalibration"] == PLAIN]
        modules = group[group["recalibration"] != PLAIN]
        if plain.empty or modules.empty:
            continue
        first = plain.iloc[0]
        order = (
            datasets.index(dataset) if dataset in datasets else len(datasets),
            dataset,
            not first["paper_protocol"],
            -first["epochs_planned"],
            first["protocol"],
            models.index(model) if model in models else len(models),
            model,
        )
        rows = sorted((row for _, row in modules.iterrows()), key=_order)
        keys.append((order, first, rows))
    for _, first, rows in sorted(keys, key=lambda item: item[0]):
        yield first, rows


def settings(row: pd.Series) -> str:
    """A module's options in one cell ("L={1,2,4}, regional, r=3"); "—" for the plain one."""
    if row["recalibration"] == PLAIN:
        return NONE
    parts = []
    if row["scales"] != NONE:
        parts.append(f"L={row['scales']}")
    parts += [row[c] for c in ("strategy", "stage") if row[c] != NONE]
    if row["reduction"] != NONE:
        parts.append(f"r={row['reduction']}")
    if row["options"]:
        parts.append(row["options"])
    return ", ".join(parts) or NONE


def extra_percent(value: float, plain: float) -> float:
    """(value − plain) / plain in %; NaN when either is missing."""
    if value != value or plain != plain or not plain:
        return float("nan")
    return 100 * (value - plain) / plain


def _percent_cell(value: float, plain: float) -> str:
    extra = extra_percent(value, plain)
    return NONE if extra != extra else f"{extra:+.2f}%"


def _seeds(counts: list[int]) -> str:
    low, high = min(counts), max(counts)
    return f"here {low} each" if low == high else f"here {low}–{high}, see each row"


def _row(
    row: pd.Series, plain: pd.Series, bench: StepBench, sources: Sources | None
) -> dict[str, str]:
    """One row; with ``sources`` (a table holding ImageNet ResNet-50 runs) the published top-1
    error of the module and the baseline of its source, footnoted."""
    this, base = stat(row.to_frame().T), stat(plain.to_frame().T)
    is_plain = row["recalibration"] == PLAIN
    if is_plain:
        d_text, interval, p_text = "(baseline)", "", ""
        params = f"({human_count(float(row['params']))})"
        flops = f"({human_count(float(row['flops']))})"
    else:
        d_text = delta(this.mean, base.mean)
        interval, p_text = welch_cells(this, base)
        params = _percent_cell(row["params"], plain["params"])
        flops = _percent_cell(row["flops"], plain["flops"])
    measured = bench.ratio(row["model"], row["recalibration"])
    cells = {
        "network": model_label(row["model"]),
        "module": recalibration_label(row["recalibration"]),
        "settings": settings(row),
        "test error": this.cell(),
    }
    if sources is not None:
        published, baseline = published_cells(
            row["model"], row["recalibration"], row["dataset"], sources
        )
        cells |= {"published top-1": published, "source's plain top-1": baseline}
    return cells | {
        "Δ vs plain": d_text,
        CI_COLUMN: interval,
        P_COLUMN: p_text,
        "extra params (% of plain)": params,
        "extra FLOPs (% of plain)": flops,
        "CPU step time × plain": f"{measured.ratio:.2f}" if measured else NONE,
    }


def _protocol_text(first: pd.Series) -> str:
    """The protocol's label and main settings, and whether it is the paper's ("8 ep, 6000 imgs
    (batch 128, lr 0.1, milestones [4,6], wd 0.0001; not the paper's protocol)")."""
    protocol = json.loads(first["protocol_key"])
    shown = ("data.batch_size", "optim.lr", "optim.milestones", "optim.weight_decay")
    settings_text = ", ".join(
        f"{SHORT_KEYS[key]} {value_text(protocol[key])}" for key in shown if key in protocol
    )
    mark = "the paper's protocol" if first["paper_protocol"] else "not the paper's protocol"
    return f"{first['protocol']} ({settings_text}; {mark})"


def modules_tables(configs: pd.DataFrame, root: str | Path | None = None) -> list[ReportTable]:
    """One table per (dataset, protocol) of :func:`module_groups`, the plain network first in
    each network's rows. ``root`` is the results directory (where the step benchmark is
    looked for, :func:`mssar_cli.report.bench.find_bench`)."""
    by_table: dict[tuple[str, str], list[tuple[pd.Series, list[pd.Series]]]] = {}
    for first, rows in module_groups(configs):
        by_table.setdefault((first["dataset"], first["protocol_key"]), []).append((first, rows))
    if not by_table:
        return []
    bench = read_bench(find_bench(root))
    tables = []
    for groups in by_table.values():
        first = groups[0][0]
        with_published = any(has_published(p["model"], p["dataset"]) for p, _ in groups)
        sources = Sources() if with_published else None
        rows, counts, shown = [], [], []
        for plain, modules in groups:
            for row in (plain, *modules):
                rows.append(_row(row, plain, bench, sources))
                counts.append(int(row["n"]))
                shown.append((row["model"], row["recalibration"]))
        name = DATASETS.get(first["dataset"], first["dataset"])
        caption = (
            "Every module against the plain network of the same dataset, network and protocol, "
            "each with its registry's default options but for the width r, as run. Protocol: "
            f"{_protocol_text(first)}. Test error in %, final epoch: {STD_NOTE} "
            f"({_seeds(counts)}). Δ vs plain = module − plain (points; negative: the module "
            f"helps). {WELCH_NOTE}. Extra params / FLOPs = (module − plain) / plain, in %, from "
            "the runs' summary.json (plain row: its own count; FLOPs are MACs per image). "
            + bench.source(shown)
        )
        if sources is not None:
            caption += f" ResNet-50 rows: {PUBLISHED_NOTE} Sources: {sources.text()}"
        title = f"{name}: modules at equal protocol ({first['protocol']})"
        tables.append(ReportTable(title, pd.DataFrame(rows), caption))
    return tables

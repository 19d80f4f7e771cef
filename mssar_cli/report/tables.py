"""The report's tables, ours beside the paper's: Tables 2, 3 and 5, the §4.2 ablations, one table
per other dataset, and the unfinished runs.

Every cell of ours is a :class:`~mssar_cli.report.stats.Stat` of one configuration (mean ± std
over the finished seeds, the final epoch); the paper's numbers come from :mod:`mssar_cli.paper`.
The helpers that find the runs of a published row (:func:`paper_criteria`, :func:`protocols_run`,
:func:`matched_cell`) also serve the ImageNet ResNet-50 table of the later modules' published
numbers (:mod:`mssar_cli.report.published`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import pandas as pd

from mssar_cli import paper
from mssar_cli.recalibration import PLAIN
from mssar_cli.report.collect import (
    DATASETS,
    format_scales,
    model_label,
    module_columns,
    recalibration_label,
)
from mssar_cli.report.protocols import CIFAR
from mssar_cli.report.render import NONE, ReportTable, human_count
from mssar_cli.report.stats import STD_NOTE, UNFINISHED_NOTE, delta, drop, match, stat

# The paper's row names: its CIFAR tables (2, 3) mark MS-SAR with "*" ("RN-20*"); Table 5 and
# every other module take "+<label>" ("ResNet-18+SE").
PAPER_MARKS = {"mssar": "*"}
_CONTRADICTIONS = (
    "The paper disagrees with itself twice (SPEC §5): the RN-56 CIFAR-100 baseline is 29.07 in "
    "Table 2 but 29.41 in Table 3; DN-100* CIFAR-10 is 4.16 in Table 2 but 4.06 in Table 3 and "
    "the text."
)
_CIFAR_COLUMNS = (("cifar10", "C10"), ("cifar100", "C100"))


# --- cells --------------------------------------------------------------------------------------


def _count(value: float) -> str:
    return human_count(float(value))


def _first(values: Iterable[float]) -> float:
    for value in values:
        if value == value:
            return value
    return math.nan


def _costs(matched: pd.DataFrame) -> tuple[float, float]:
    if len(matched):
        return matched["params"].iloc[0], matched["flops"].iloc[0]
    return math.nan, math.nan


def network_name(model: str, recalibration: str, dataset: str) -> str:
    """A network as the paper names it: "RN-20", "RN-20*" (MS-SAR on CIFAR), "ResNet-18+SE"."""
    label = model_label(model)
    if recalibration == PLAIN:
        return label
    if dataset != "imagenet" and recalibration in PAPER_MARKS:
        return label + PAPER_MARKS[recalibration]
    return f"{label}+{recalibration_label(recalibration)}"


def paper_criteria(model: str, recalibration: str, **overrides: str) -> dict[str, str]:
    """The configuration the paper means by ``model`` with ``recalibration`` (defaults explicit)."""
    module = module_columns(model, recalibration)
    return {"model": model, "recalibration": recalibration, **module, **overrides}


def protocols_run(configs: pd.DataFrame, datasets: Iterable[str], criteria: Iterable[dict]) -> list:
    """The protocols under which any of ``criteria`` was run on ``datasets``: paper's first."""
    found = {}
    for crit in criteria:
        for _, row in match(configs, dataset=list(datasets), **crit).iterrows():
            found[row["protocol"]] = (
                not row["paper_protocol"],
                -row["epochs_planned"],
                row["protocol"],
            )
    return sorted(found, key=found.get)


def matched_cell(
    configs: pd.DataFrame, protocol: str | None, shown: set, **criteria
) -> pd.DataFrame:
    """The configuration of one cell (none when nobody ran the network), marked as shown."""
    matched = match(configs, protocol=protocol, **criteria) if protocol else configs.iloc[0:0]
    shown.update(matched.index)
    return matched


# --- Tables 2, 3, 5 -----------------------------------------------------------------------------


def table2(configs: pd.DataFrame, shown: set) -> ReportTable:
    """Table 2: CIFAR-10 / CIFAR-100 error of each network plain and with MS-SAR (§4.1)."""
    rows = []
    pairs = [paper.TABLE2[i : i + 2] for i in range(0, len(paper.TABLE2), 2)]
    for plain_row, star_row in pairs:
        model = plain_row.model
        crits = {
            r.recalibration: paper_criteria(model, r.recalibration) for r in (plain_row, star_row)
        }
        for protocol in protocols_run(configs, CIFAR, crits.values()) or [None]:
            means: dict[tuple[str, str], float] = {}
            for prow in (plain_row, star_row):
                row = {"network": prow.label, "protocol": protocol or NONE}
                costs = []
                for dataset, short in _CIFAR_COLUMNS:
                    matched = matched_cell(
                        configs, protocol, shown, dataset=dataset, **crits[prow.recalibration]
                    )
                    s = stat(matched)
                    means[(prow.recalibration, dataset)] = s.mean
                    row[f"{short} ours"] = s.cell()
                    row[f"{short} paper"] = f"{prow.errors[dataset]:.2f}"
                    row[f"{short} Δ"] = delta(s.mean, prow.errors[dataset])
                    costs.append(_costs(matched))
                row["params"] = _count(_first(c[0] for c in costs))
                row["FLOPs"] = _count(_first(c[1] for c in costs))
                for dataset, short in _CIFAR_COLUMNS:
                    if prow is star_row:
                        ours = drop(
                            means[(plain_row.recalibration, dataset)],
                            means[(star_row.recalibration, dataset)],
                        )
                        theirs = drop(plain_row.errors[dataset], star_row.errors[dataset])
                        row[f"{short} drop ours / paper"] = f"{ours} / {theirs}"
                    else:
                        row[f"{short} drop ours / paper"] = ""
                rows.append(row)
    caption = (
        f"Test error (%) on CIFAR, final epoch. Ours: {STD_NOTE}; {UNFINISHED_NOTE}. "
        "Paper: Table 2 (ResNets: mean of 3 runs; DenseNets: 1 run). Δ = ours − paper (points). "
        "* = MS-SAR with L = {1,2,4}, regional, multi-stage for DenseNets. "
        "Drop = relative error drop of MS-SAR vs the plain network, (plain − MS-SAR) / plain, "
        "same protocol. "
        "params / FLOPs (MACs) are ours, of the CIFAR-10 network (CIFAR-100 when only that was "
        "run). (paper) marks the paper's own training protocol; other protocols are not "
        "comparable with the paper. " + _CONTRADICTIONS
    )
    title = "Table 2: CIFAR-10 / CIFAR-100 test error (%), ours vs paper"
    return ReportTable(title, pd.DataFrame(rows), caption)


def table3(configs: pd.DataFrame, shown: set) -> ReportTable:
    """Table 3: the scale ablation of MS-SAR, ResNet-56 and DenseNet-100 on CIFAR (§4.2)."""
    rows = []
    for model, label in (("resnet56", "RN-56"), ("densenet100", "DN-100")):
        crit_of = {
            row.scales: paper_criteria(model, "mssar", scales=format_scales(row.scales))
            if row.scales
            else paper_criteria(model, PLAIN)
            for row in paper.TABLE3
        }
        for protocol in protocols_run(configs, CIFAR, crit_of.values()) or [None]:
            for prow in paper.TABLE3:
                scales = format_scales(prow.scales) if prow.scales else "none"
                row = {"network": label, "scales": scales, "protocol": protocol or NONE}
                costs = []
                for dataset, short in _CIFAR_COLUMNS:
                    matched = matched_cell(
                        configs, protocol, shown, dataset=dataset, **crit_of[prow.scales]
                    )
                    s = stat(matched)
                    if model == "resnet56":
                        mean, std = getattr(prow, f"resnet56_{dataset}")
                        theirs = f"{mean:.2f} ± {std:.2f} (n=3)"
                    else:
                        mean = getattr(prow, f"densenet100_{dataset}")
                        theirs = f"{mean:.2f} (n=1)"
                    row[f"{short} ours"] = s.cell()
                    row[f"{short} paper"] = theirs
                    row[f"{short} Δ"] = delta(s.mean, mean)
                    costs.append(_costs(matched))
                row["FLOPs ours"] = _count(_first(c[1] for c in costs))
                row["FLOPs paper"] = _count(getattr(prow, f"{model}_flops"))
                row["params ours"] = _count(_first(c[0] for c in costs))
                if model == "densenet100":
                    row["params paper"] = _count(prow.densenet100_params)
                else:  # no RN-56 params in Table 3: Table 2's, which do not change with L
                    cost = paper.cost_row(model, "mssar" if prow.scales else PLAIN)
                    row["params paper"] = _count(cost.params)
                rows.append(row)
    caption = (
        f"Scale ablation (paper Table 3), test error (%), final epoch. Ours: {STD_NOTE}; "
        f"{UNFINISHED_NOTE}. "
        "Paper: ResNet-56 mean ± std of 3 runs, DenseNet-100 one run. MS-SAR rows: regional, "
        "multi-stage for DenseNet-100, the family's default width. Δ = ours − paper (points). "
        "RN-56 paper params are Table 2's (Table 3 states they do not change with L). "
        + _CONTRADICTIONS
        + " Δ here uses Table 3's values."
    )
    title = "Table 3: scale ablation, ResNet-56 and DenseNet-100 on CIFAR"
    return ReportTable(title, pd.DataFrame(rows), caption)


def table5(configs: pd.DataFrame, shown: set) -> ReportTable:
    """Table 5: ImageNet top-1 / top-5 error, plain, SE and MS-SAR (§4.3)."""
    rows = []
    groups = [paper.TABLE5[i : i + 3] for i in range(0, len(paper.TABLE5), 3)]
    for group in groups:
        model = group[0].model
        crits = {r.recalibration: paper_criteria(model, r.recalibration) for r in group}
        for protocol in protocols_run(configs, ["imagenet"], crits.values()) or [None]:
            means = {}
            plain = group[0]
            for prow in group:
                criteria = crits[prow.recalibration]
                matched = matched_cell(configs, protocol, shown, dataset="imagenet", **criteria)
                top1, top5 = stat(matched, "test_err"), stat(matched, "test_top5_err")
                means[prow.recalibration] = top1.mean
                drops = ""
                if prow.recalibration != plain.recalibration:
                    ours = drop(means[plain.recalibration], top1.mean)
                    drops = f"{ours} / {drop(plain.errors['top1'], prow.errors['top1'])}"
                params, flops = _costs(matched)
                rows.append(
                    {
                        "network": prow.label,
                        "protocol": protocol or NONE,
                        "top-1 ours": top1.cell(),
                        "top-1 paper": f"{prow.errors['top1']:.2f}",
                        "top-1 Δ": delta(top1.mean, prow.errors["top1"]),
                        "top-5 ours": top5.cell(),
                        "top-5 paper": f"{prow.errors['top5']:.2f}",
                        "top-5 Δ": delta(top5.mean, prow.errors["top5"]),
                        "params": _count(params) if len(matched) else NONE,
                        "FLOPs": _count(flops) if len(matched) else NONE,
                        "top-1 drop ours / paper": drops,
                    }
                )
    caption = (
        "ILSVRC2012 validation error (%), single 224 centre crop, final epoch. Ours: "
        f"{STD_NOTE}; {UNFINISHED_NOTE}. Paper: Table 5, one run. Δ = ours − paper (points). "
        "SE: reduction 16 (SENet); MS-SAR: L = {1,2,4}, regional, the same total width. "
        "Drop = (plain − X) / plain. params / FLOPs are ours (reference torchvision "
        "architectures; the paper's cost columns do not all match them, SPEC §5)."
    )
    title = "Table 5: ImageNet top-1 / top-5 error (%), ours vs paper"
    return ReportTable(title, pd.DataFrame(rows), caption)


# --- the §4.2 ablations -------------------------------------------------------------------------


def _paired(configs: pd.DataFrame, keys: list[str], column: str, values: tuple, shown: set):
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


def strategy_table(configs: pd.DataFrame, shown: set) -> ReportTable | None:
    """MS-SAR's regional vs sliding strategy (§4.2, text only in the paper)."""
    mssar = match(configs, recalibration="mssar")
    keys = ["dataset", "model", "scales", "stage", "reduction", "options", "protocol_key"]
    gap = paper.STRATEGY_ABLATION_GAP_CIFAR100
    rows = []
    for first, regional, sliding in _paired(
        mssar, keys, "strategy", ("regional", "sliding"), shown
    ):
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
                "sliding − regional": delta(s.mean, r.mean),
                "paper": f"+{gap:.1f} (approx.)" if first["dataset"] == "cifar100" else NONE,
            }
        )
    if not rows:
        return None
    caption = (
        "MS-SAR regional vs sliding strategy (paper §4.2), test error (%), final epoch. "
        f"{STD_NOTE}; {UNFINISHED_NOTE}. Paper: the regional strategy beats the sliding one by "
        f"about {gap} points on CIFAR-100 for ResNets and DenseNets (text only, no table)."
    )
    return ReportTable("Ablation: regional vs sliding", pd.DataFrame(rows), caption)


def stage_table(configs: pd.DataFrame, shown: set) -> ReportTable | None:
    """A recalibrated DenseNet's single- vs multi-stage recalibration (§3.4, §4.2)."""
    dense = configs[(configs["stage"] != NONE)] if not configs.empty else configs
    keys = ["dataset", "model", "recalibration", "scales", "strategy", "reduction", "options"]
    in_paper = paper_criteria(
        "densenet100", "mssar"
    )  # the paper's row: DN-100, MS-SAR, L = {1,2,4}
    rows = []
    for first, single, multi in _paired(
        dense, [*keys, "protocol_key"], "stage", ("single", "multi"), shown
    ):
        s, m = stat(single), stat(multi)
        has_paper = first["dataset"] in CIFAR and all(
            first[key] == in_paper[key] for key in ("model", "recalibration", "scales", "strategy")
        )
        ps = paper.STAGE_ABLATION["single"][first["dataset"]] if has_paper else math.nan
        pm = paper.STAGE_ABLATION["multi"][first["dataset"]] if has_paper else math.nan
        rows.append(
            {
                "dataset": DATASETS.get(first["dataset"], first["dataset"]),
                "network": network_name(first["model"], first["recalibration"], first["dataset"]),
                "scales": first["scales"],
                "protocol": first["protocol"],
                "single ours": s.cell(),
                "multi ours": m.cell(),
                "single − multi ours": delta(s.mean, m.mean),
                "single paper": f"{ps:.2f}" if has_paper else NONE,
                "multi paper": f"{pm:.2f}" if has_paper else NONE,
                "single − multi paper": delta(ps, pm),
            }
        )
    if not rows:
        return None
    caption = (
        "DenseNet single- vs multi-stage recalibration (paper §3.4, §4.2), test error (%), final "
        f"epoch. {STD_NOTE}; {UNFINISHED_NOTE}. Paper: DenseNet-100 with MS-SAR L = {{1,2,4}}, "
        "one run (its single-stage numbers equal its L = {1} row of Table 3)."
    )
    return ReportTable("Ablation: DenseNet single- vs multi-stage", pd.DataFrame(rows), caption)

"""Published ImageNet ResNet-50 numbers beside ours (:data:`mssar_cli.paper.PUBLISHED_RESNET50`).

ResNet-50 is not in the paper: it is the backbone the papers of the other modules report on
ImageNet. Each of them trained its own ResNet-50 under its own protocol, so a published number is
shown with the baseline of the same source, and its source as a numbered footnote in the caption
(:class:`Sources`), the way Table 5 sets the paper beside our runs. Two places use it: the cells of
the modules table (:func:`published_cells`, :mod:`mssar_cli.report.modules`) and the ResNet-50
table (:func:`published_table`), one row per registered module with ours where it was run.
"""

from __future__ import annotations

import math

import pandas as pd

from mssar_cli import paper
from mssar_cli.recalibration import PLAIN, RECALIBRATIONS
from mssar_cli.report.collect import recalibration_label
from mssar_cli.report.render import NONE, ReportTable, human_count
from mssar_cli.report.stats import STD_NOTE, UNFINISHED_NOTE, delta, drop, stat
from mssar_cli.report.tables import matched_cell, network_name, paper_criteria, protocols_run

PUBLISHED_MODEL = "resnet50"
PUBLISHED_DATASET = "imagenet"
PUBLISHED_NOTE = (
    "Published: ILSVRC2012 validation top-1 error (%), single 224 crop, of ResNet-50 with the "
    "module, from the source in the footnote (accuracies converted to error); each source trained "
    "its own ResNet-50 under its own protocol, so its gain is measured against the baseline of "
    "the same source (source's plain), not against ours or another source's."
)


def has_published(model: str, dataset: str) -> bool:
    """Whether runs of ``model`` on ``dataset`` have published numbers to stand beside."""
    return model == PUBLISHED_MODEL and dataset == PUBLISHED_DATASET


class Sources:
    """The footnotes of one table: each source numbered in order of first use."""

    def __init__(self) -> None:
        self._rows: list[paper.PublishedRow] = []

    def mark(self, row: paper.PublishedRow) -> str:
        """The footnote mark of ``row``'s source ("[2]")."""
        keys = [r.source for r in self._rows]
        if row.source not in keys:
            self._rows.append(row)
            keys.append(row.source)
        return f"[{keys.index(row.source) + 1}]"

    def text(self) -> str:
        """The footnotes, "[1] source (url; read in ...). note" each; "" when none is used."""
        notes = []
        for number, row in enumerate(self._rows, 1):
            read = f"read in {row.read_in}" if row.read_in else "not verified"
            where = "; ".join(part for part in (row.url, read) if part)
            notes.append(
                f"[{number}] {recalibration_label(row.recalibration)}: {row.source} "
                f"({where}). {row.note}"
            )
        return " ".join(notes)


def _number(value: float | None, mark: str) -> str:
    return f"{NONE} {mark}" if value is None else f"{value:.2f} {mark}"


def published_cells(
    model: str, recalibration: str, dataset: str, sources: Sources, metric: str = "top1"
) -> tuple[str, str]:
    """(the published error of ``recalibration``'s module, the plain ResNet-50 error of the same
    source), each with its footnote mark; "—" for the plain network and for runs that have no
    published numbers (:func:`has_published`). ``metric``: "top1" or "top5"."""
    row = paper.published_resnet50(recalibration) if has_published(model, dataset) else None
    if row is None:
        return NONE, NONE
    mark = sources.mark(row)
    return _number(getattr(row, metric), mark), _number(getattr(row, f"baseline_{metric}"), mark)


def _published_drop(row: paper.PublishedRow | None) -> str:
    if row is None or row.top1 is None or row.baseline_top1 is None:
        return NONE
    return drop(row.baseline_top1, row.top1)


def _missing(value: float | None) -> float:
    return math.nan if value is None else value


def published_table(configs: pd.DataFrame, shown: set | None = None) -> ReportTable | None:
    """ImageNet ResNet-50, every registered module at its defaults: ours (mean ± std over seeds,
    per protocol, the paper's first) beside the published error, Δ, the source's own baseline
    and the relative drop each side; ``None`` when no ImageNet ResNet-50 run exists. The rows'
    configurations are added to ``shown`` when given."""
    shown = set() if shown is None else shown
    criteria = {name: paper_criteria(PUBLISHED_MODEL, name) for name in RECALIBRATIONS}
    protocols = protocols_run(configs, [PUBLISHED_DATASET], criteria.values())
    if not protocols:
        return None
    sources = Sources()
    rows = []
    for protocol in protocols:
        plain_mean = math.nan
        for name, crit in criteria.items():
            matched = matched_cell(configs, protocol, shown, dataset=PUBLISHED_DATASET, **crit)
            top1, top5 = stat(matched, "test_err"), stat(matched, "test_top5_err")
            published = paper.published_resnet50(name)
            p1, base1 = published_cells(PUBLISHED_MODEL, name, PUBLISHED_DATASET, sources)
            p5, _ = published_cells(PUBLISHED_MODEL, name, PUBLISHED_DATASET, sources, "top5")
            if name == PLAIN:
                plain_mean = top1.mean
                drops = ""
            else:
                drops = f"{drop(plain_mean, top1.mean)} / {_published_drop(published)}"
            params = matched["params"].iloc[0] if len(matched) else math.nan
            flops = matched["flops"].iloc[0] if len(matched) else math.nan
            reference = _missing(published.top1) if published else math.nan
            rows.append(
                {
                    "network": network_name(PUBLISHED_MODEL, name, PUBLISHED_DATASET),
                    "protocol": protocol,
                    "top-1 ours": top1.cell(),
                    "top-1 published": p1,
                    "top-1 Δ": delta(top1.mean, reference),
                    "top-1 source's plain": base1,
                    "top-1 drop ours / published": drops,
                    "top-5 ours": top5.cell(),
                    "top-5 published": p5,
                    "params": human_count(float(params)),
                    "FLOPs": human_count(float(flops)),
                }
            )
    caption = (
        f"ImageNet ResNet-50 (torchvision's; not in the paper, whose Table 5 has ResNet-18/34 "
        f"and ResNeXt-50), every module at SE's placement with its registry defaults. Ours: "
        f"top-1 / top-5 error (%), final epoch, {STD_NOTE}; {UNFINISHED_NOTE}; — where not run. "
        f"{PUBLISHED_NOTE} Δ = ours − published (points). Drop = (plain − module) / plain, ours "
        "against our plain run, published against the source's plain. params / FLOPs (MACs) are "
        f"ours. Sources: {sources.text()}"
    )
    title = "ImageNet ResNet-50: every module, ours vs published"
    return ReportTable(title, pd.DataFrame(rows), caption)

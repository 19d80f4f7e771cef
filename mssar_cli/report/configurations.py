"""Tables of our own runs that no paper table holds: one row per configuration (a dataset the
paper does not use, or a CIFAR / ImageNet configuration outside Tables 2, 3 and 5), the
unfinished runs and the directories that could not be read.
"""

from __future__ import annotations

import pandas as pd

from mssar_cli.models import MODELS
from mssar_cli.recalibration import PLAIN
from mssar_cli.report.collect import model_label, recalibration_label, recalibration_order
from mssar_cli.report.render import NONE, ReportTable, human_count
from mssar_cli.report.significance import CI_COLUMN, P_COLUMN, WELCH_NOTE, welch_cells
from mssar_cli.report.stats import STD_NOTE, UNFINISHED_NOTE, match, stat


def _sort_key(row: pd.Series) -> tuple:
    """Networks in the order of the network table, the paper's protocol first, then longer
    protocols, modules in the order of the registry, then their options."""
    order = list(MODELS)
    return (
        order.index(row["model"]) if row["model"] in order else len(order),
        row["model"],
        not row["paper_protocol"],
        -row["epochs_planned"],
        row["protocol"],
        recalibration_order(row["recalibration"]),
        (len(row["scales"]), row["scales"]),
        row["strategy"],
        row["stage"],
        row["reduction"],
        row["options"],
    )


def configurations_table(
    configs: pd.DataFrame, everything: pd.DataFrame, title: str, intro: str
) -> ReportTable:
    """One row per configuration in ``configs``; the plain baselines are looked up in
    ``everything``."""
    rows = []
    ordered = sorted((row for _, row in configs.iterrows()), key=_sort_key)
    with_top5 = bool(configs["test_top5_err_n"].sum()) if "test_top5_err_n" in configs else False
    with_stage = bool((configs["stage"] != NONE).any())
    with_options = bool((configs["options"] != "").any())
    for row in ordered:
        this = stat(row.to_frame().T)
        plain_match = match(
            everything,
            dataset=row["dataset"],
            model=row["model"],
            protocol_key=row["protocol_key"],
            recalibration=PLAIN,
        )
        plain = stat(plain_match)
        if row["recalibration"] == PLAIN:
            delta_text, interval, p_text = "(baseline)", "", ""
        elif plain_match.empty or plain.n == 0:
            delta_text, interval, p_text = "— (no plain run)", NONE, NONE
        else:
            delta = this.mean - plain.mean
            delta_text = (
                f"{delta:+.2f} ({100 * delta / plain.mean:+.1f}%)"
                if this.n and plain.mean
                else NONE
            )
            interval, p_text = welch_cells(this, plain)
        out = {
            "network": model_label(row["model"]),
            "recalibration": recalibration_label(row["recalibration"]),
            "scales": row["scales"],
            "strategy": row["strategy"],
        }
        if with_stage:
            out["stage"] = row["stage"]
        if with_options:
            out["options"] = row["options"] or NONE
        out |= {
            "reduction": row["reduction"],
            "protocol": row["protocol"],
            "test error": this.cell(),
        }
        if with_top5:
            out["top-5 error"] = stat(row.to_frame().T, "test_top5_err").cell()
        out |= {
            "train error": stat(row.to_frame().T, "train_err").cell(),
            "params": human_count(float(row["params"])),
            "FLOPs": human_count(float(row["flops"])),
            "Δ vs plain": delta_text,
            CI_COLUMN: interval,
            P_COLUMN: p_text,
        }
        rows.append(out)
    caption = (
        f"{intro}Errors in %, final epoch: {STD_NOTE}; {UNFINISHED_NOTE}. "
        "Δ vs plain = this − the plain network of the same model and protocol (points, and "
        f"relative). {WELCH_NOTE}. "
        "reduction: total MLP width is D / reduction. FLOPs are MACs per image."
    )
    return ReportTable(title, pd.DataFrame(rows), caption)


def unfinished_table(runs: pd.DataFrame) -> ReportTable | None:
    """The runs without a finished summary: never averaged into the other tables."""
    todo = runs[runs["status"] != "finished"]
    if todo.empty:
        return None
    rows = [
        {
            "run": r["run"],
            "protocol": r["protocol"],
            "epochs done": f"{r['epochs_done']}/{r['epochs_planned']}",
            "last test error": f"{r['test_err']:.2f} (epoch {r['epochs_done']})"
            if r["test_err"] == r["test_err"]
            else NONE,
        }
        for _, r in todo.iterrows()
    ]
    caption = (
        "Runs without a finished summary.json (interrupted or still running): shown here only, "
        "never averaged into the tables above. Resume with `mssar train RECIPE --resume`."
    )
    return ReportTable(f"Unfinished runs ({len(rows)})", pd.DataFrame(rows), caption)


def skipped_table(runs: pd.DataFrame) -> ReportTable | None:
    """The folders with a recipe.yaml that could not be read (``runs.attrs["skipped"]``)."""
    skipped = runs.attrs.get("skipped")
    if not skipped:
        return None
    return ReportTable(
        "Skipped directories",
        pd.DataFrame({"directory: problem": skipped}),
        "Folders with a recipe.yaml that could not be read; they are in no table.",
    )

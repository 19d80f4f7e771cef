"""Seeds → one number per configuration: mean ± sample std over the finished runs (SPEC.md §4).

A cell is the mean ± sample standard deviation (ddof 1) of the final-epoch error over the
finished seeds of one configuration, with n; unfinished runs are counted ("; +1 unfinished")
and never averaged in. :func:`delta` and :func:`drop` are the differences the tables print
(points, and the relative drop of Tables 2 and 5); whether a difference to the plain network is
more than seed noise is Welch's t-test (:mod:`mssar_cli.report.significance`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from mssar_cli.report.collect import CONFIG_COLUMNS, METRICS, NONE

STD_NOTE = "mean ± sample std (ddof 1) over seeds of the final-epoch error, n = finished runs"
UNFINISHED_NOTE = 'unfinished runs are counted ("+k unfinished") but never averaged in'


@dataclass(frozen=True)
class Stat:
    """Mean and sample std over the finished runs of a configuration, and how many are
    unfinished."""

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
        return pd.DataFrame(
            columns=[*CONFIG_COLUMNS, "protocol", "paper_protocol", "n", "unfinished"]
        )
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


def match(configs: pd.DataFrame, **criteria) -> pd.DataFrame:
    """The configurations whose columns equal ``criteria`` (a list, tuple or set: any of)."""
    if configs.empty:
        return configs
    mask = pd.Series(True, index=configs.index)
    for column, value in criteria.items():
        if isinstance(value, (list, tuple, set)):
            mask &= configs[column].isin(list(value))
        else:
            mask &= configs[column] == value
    return configs[mask]


def stat(matched: pd.DataFrame, metric: str = "test_err") -> Stat:
    """The Stat of ``metric`` for a matched configuration (an empty match gives "—")."""
    if matched.empty:
        return Stat()
    row = matched.iloc[0]
    mean = row.get(f"{metric}_mean", math.nan)
    n = int(row.get(f"{metric}_n", 0)) if mean == mean else 0
    return Stat(mean, row.get(f"{metric}_std", math.nan), n, int(row["unfinished"]))


def delta(ours: float, reference: float) -> str:
    """``ours`` − ``reference`` in points ("+0.30"), "—" when either is missing."""
    if ours != ours or reference != reference:
        return NONE
    return f"{ours - reference:+.2f}"


def drop(plain: float, recalibrated: float) -> str:
    """Relative error drop (plain − recalibrated) / plain, in % (Tables 2 and 5)."""
    if plain != plain or recalibrated != recalibrated or plain == 0:
        return NONE
    return f"{100 * (plain - recalibrated) / plain:.1f}%"

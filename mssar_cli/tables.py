"""Render pandas frames as Rich tables (terminal) or CSV / Markdown / LaTeX text (files)."""

from __future__ import annotations

import os
import sys

import pandas as pd
from rich.console import Console
from rich.table import Table

FORMATS = ("rich", "csv", "markdown", "latex")


def human_count(value: float, unit: str = "") -> str:
    """12_345_678 -> '12.35M'; 7_950_000_000 -> '7.950G' (paper style: M below 1e9, G above)."""
    if value != value:  # NaN
        return "—"
    if abs(value) >= 1e9:
        return f"{value / 1e9:.3f}G{unit}"
    return f"{value / 1e6:.3f}M{unit}" if abs(value) < 1e7 else f"{value / 1e6:.2f}M{unit}"


PIPE_WIDTH = 200  # columns of Rich output written to a file or a pipe (a terminal uses its own)


def output_console(stderr: bool = False) -> Console:
    """A Rich console; when it writes to a file or pipe, wide enough that tables are not squeezed."""
    stream = sys.stderr if stderr else sys.stdout
    piped = not stream.isatty() and "COLUMNS" not in os.environ
    return Console(stderr=stderr, width=PIPE_WIDTH if piped else None)


def rich_table(frame: pd.DataFrame, title: str | None = None, caption: str | None = None) -> Table:
    table = Table(title=title, caption=caption, show_lines=False)
    for column in frame.columns:
        numeric = pd.api.types.is_numeric_dtype(frame[column])
        table.add_column(str(column), justify="right" if numeric else "left")
    for row in frame.itertuples(index=False):
        table.add_row(*("—" if _missing(v) else str(v) for v in row))
    return table


def render_text(frame: pd.DataFrame, fmt: str) -> str:
    """CSV, Markdown (GitHub pipes) or LaTeX (booktabs) text of ``frame``."""
    if fmt == "csv":
        return frame.to_csv(index=False)
    cells = [[("—" if _missing(v) else str(v)) for v in row] for row in frame.itertuples(index=False)]
    if fmt == "markdown":
        header = "| " + " | ".join(map(str, frame.columns)) + " |"
        rule = "|" + "|".join("---" for _ in frame.columns) + "|"
        body = ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells]
        return "\n".join([header, rule, *body]) + "\n"
    if fmt == "latex":
        def tex(text: str) -> str:
            for a, b in (("\\", r"\textbackslash{}"), ("%", r"\%"), ("_", r"\_"), ("&", r"\&"), ("#", r"\#"), ("±", r"$\pm$"), ("—", "--")):
                text = text.replace(a, b)
            return text

        lines = [
            r"\begin{tabular}{" + "l" * len(frame.columns) + "}",
            r"\toprule",
            " & ".join(tex(str(c)) for c in frame.columns) + r" \\",
            r"\midrule",
            *(" & ".join(tex(c) for c in row) + r" \\" for row in cells),
            r"\bottomrule",
            r"\end{tabular}",
        ]
        return "\n".join(lines) + "\n"
    raise ValueError(f"format must be one of {list(FORMATS)}, got {fmt!r}")


def emit(frame: pd.DataFrame, fmt: str, console: Console, title: str | None = None, caption: str | None = None) -> None:
    """Print ``frame`` to ``console`` as a Rich table, or as text in ``fmt``."""
    if fmt == "rich":
        console.print(rich_table(frame, title, caption))
    else:
        console.print(render_text(frame, fmt), end="", markup=False, highlight=False, soft_wrap=True)


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and value != value)

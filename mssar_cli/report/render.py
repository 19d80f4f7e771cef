"""Tables as text: Rich (terminal), Markdown, CSV and LaTeX (booktabs).

The frame helpers (:func:`rich_table`, :func:`render_text`, :func:`emit`) serve every command
that prints a table (``mssar count``, ``mssar ablate``); :func:`render` and :func:`print_rich`
print the report's tables with their titles and captions.
"""

from __future__ import annotations

import io
import os
import sys
from dataclasses import dataclass

import pandas as pd
from rich.console import Console
from rich.table import Table

from mssar_cli.errors import MssarError

FORMATS = ("rich", "csv", "markdown", "latex")
NONE = "—"
PIPE_WIDTH = 200  # columns of Rich output written to a file or a pipe (a terminal uses its own)


@dataclass(frozen=True)
class ReportTable:
    """One table of the report: display strings, a title and a caption."""

    title: str
    frame: pd.DataFrame
    caption: str = ""


# --- frames ---------------------------------------------------------------------------------


def human_count(value: float, unit: str = "") -> str:
    """12_345_678 -> '12.35M'; 7_950_000_000 -> '7.950G' (paper style: M below 1e9, G above)."""
    if value != value:  # NaN
        return NONE
    if abs(value) >= 1e9:
        return f"{value / 1e9:.3f}G{unit}"
    return f"{value / 1e6:.3f}M{unit}" if abs(value) < 1e7 else f"{value / 1e6:.2f}M{unit}"


def output_console(stderr: bool = False) -> Console:
    """A Rich console; when it writes to a file or pipe, wide enough that tables are not
    squeezed."""
    stream = sys.stderr if stderr else sys.stdout
    piped = not stream.isatty() and "COLUMNS" not in os.environ
    return Console(stderr=stderr, width=PIPE_WIDTH if piped else None)


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and value != value)


def rich_table(frame: pd.DataFrame, title: str | None = None, caption: str | None = None) -> Table:
    table = Table(title=title, caption=caption, show_lines=False)
    for column in frame.columns:
        numeric = pd.api.types.is_numeric_dtype(frame[column])
        table.add_column(str(column), justify="right" if numeric else "left")
    for row in frame.itertuples(index=False):
        table.add_row(*(NONE if _missing(v) else str(v) for v in row))
    return table


_TEX_ESCAPES = (
    ("\\", r"\textbackslash{}"),
    ("%", r"\%"),
    ("_", r"\_"),
    ("&", r"\&"),
    ("#", r"\#"),
    ("±", r"$\pm$"),
    ("—", "--"),
)


def _tex(text: str) -> str:
    for a, b in _TEX_ESCAPES:
        text = text.replace(a, b)
    return text


def render_text(frame: pd.DataFrame, fmt: str) -> str:
    """CSV, Markdown (GitHub pipes) or LaTeX (booktabs) text of ``frame``."""
    if fmt == "csv":
        return frame.to_csv(index=False)
    cells = [
        [(NONE if _missing(v) else str(v)) for v in row] for row in frame.itertuples(index=False)
    ]
    if fmt == "markdown":
        header = "| " + " | ".join(map(str, frame.columns)) + " |"
        rule = "|" + "|".join("---" for _ in frame.columns) + "|"
        body = ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells]
        return "\n".join([header, rule, *body]) + "\n"
    if fmt == "latex":
        lines = [
            r"\begin{tabular}{" + "l" * len(frame.columns) + "}",
            r"\toprule",
            " & ".join(_tex(str(c)) for c in frame.columns) + r" \\",
            r"\midrule",
            *(" & ".join(_tex(c) for c in row) + r" \\" for row in cells),
            r"\bottomrule",
            r"\end{tabular}",
        ]
        return "\n".join(lines) + "\n"
    raise ValueError(f"format must be one of {list(FORMATS)}, got {fmt!r}")


def emit(
    frame: pd.DataFrame,
    fmt: str,
    console: Console,
    title: str | None = None,
    caption: str | None = None,
) -> None:
    """Print ``frame`` to ``console`` as a Rich table, or as text in ``fmt``."""
    if fmt == "rich":
        console.print(rich_table(frame, title, caption))
    else:
        console.print(
            render_text(frame, fmt), end="", markup=False, highlight=False, soft_wrap=True
        )


# --- the report -------------------------------------------------------------------------------

# LaTeX: render_text escapes backslashes first, so the braces of "{1,2,4}" and the Greek letters
# go through as placeholders and are put back after it.
_TEX_PLACEHOLDERS = {
    "{": ("\x01", r"\{"),
    "}": ("\x02", r"\}"),
    "Δ": ("\x03", r"$\Delta$"),
    "−": ("\x04", "--"),
    "≥": ("\x05", r"$\geq$"),
    # in text mode |, > and < print as other glyphs (OT1): "< 0.001" of a Welch p-value
    "|": ("\x06", r"\textbar{}"),
    ">": ("\x07", r"\textgreater{}"),
    "<": ("\x08", r"\textless{}"),
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
            # render_text escapes "|" in the cells but not in the header ("|Δ|")
            frame.columns = [_markdown_escape(str(c)).replace("|", "\\|") for c in table.frame]
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
    return (
        bool(text)
        and (text[0].isdigit() or text[0] in "+-−—(")
        and not text.startswith("(baseline")
    )


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

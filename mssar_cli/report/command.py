"""The ``mssar report`` command (registered in cli.py as
``app.command(name="report")(user_errors(report))``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from mssar_cli.errors import MssarError
from mssar_cli.report import build_report, collect_runs, print_rich, render, write_figures
from mssar_cli.report.render import output_console

REPORT_FORMATS = ("rich", "markdown", "csv", "latex")


def report(
    results_dir: Annotated[
        str,
        typer.Argument(
            help="Results root holding <dataset>/<experiment>/seed<k>/ run directories."
        ),
    ] = "results",
    fmt: Annotated[str, typer.Option("--format", help="rich | markdown | csv | latex")] = "rich",
    output: Annotated[
        str | None,
        typer.Option(
            "--output",
            help="Write the report to this file (atomically) instead of the terminal; rich is "
            "written as markdown.",
        ),
    ] = None,
    figures: Annotated[
        str | None, typer.Option("--figures", help="write PNG figures to DIR")
    ] = None,
) -> None:
    """Tables of final-epoch test errors (mean ± std over seeds), the paper's numbers beside ours.

    Reads run directories only. Runs of the same configuration and protocol are averaged;
    unfinished runs are counted but never averaged in. Tables 2 and 3 appear for CIFAR runs,
    Table 5 for ImageNet, then ablations, every other dataset and every module against the
    plain network at equal protocol (Welch's t-test, extra cost). --figures also writes the
    training curves (paper Fig. 3/4), error vs FLOPs (Fig. 5) and error vs extra FLOPs per
    network as PNG files.
    """
    if fmt not in REPORT_FORMATS:
        raise MssarError(f"--format must be one of {', '.join(REPORT_FORMATS)}, got {fmt!r}")
    console = output_console()
    notes = Console(stderr=True)  # where files went: kept off stdout, which may carry CSV
    runs = collect_runs(Path(results_dir))  # one reading for the tables and the figures
    tables = build_report(runs)
    if output is not None:
        target = Path(output)
        if target.is_dir():
            raise MssarError(
                f"--output {output}: is a directory; give a file name such as report.md"
            )
        from mssar_cli.runs import atomic_write_text  # imports torch: only when writing a file

        text_format = "markdown" if fmt == "rich" else fmt
        try:
            atomic_write_text(target, render(tables, text_format))
        except OSError as error:
            raise MssarError(
                f"--output {output}: cannot write: {error.strerror or error}"
            ) from None
        notes.print(
            f"wrote {len(tables)} tables ({text_format}) to {target}",
            markup=False,
            highlight=False,
        )
    elif fmt == "rich":
        print_rich(tables, console)
    else:
        console.print(render(tables, fmt), end="", markup=False, highlight=False, soft_wrap=True)
    if figures is not None:
        try:
            paths = write_figures(runs, Path(figures))
        except OSError as error:
            raise MssarError(
                f"--figures {figures}: cannot write: {error.strerror or error}"
            ) from None
        if not paths:
            notes.print(
                "no figures: they need finished runs of a plain and a recalibrated network "
                f"({figures} left empty)",
                markup=False,
                highlight=False,
            )
        for path in paths:  # one line per file, never wrapped: the paths are copied from here
            notes.print(f"wrote {path}", markup=False, highlight=False, soft_wrap=True)

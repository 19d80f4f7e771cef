"""The ``mssar`` command: thin Typer commands that parse options, call the library, print with Rich.

User errors (``MssarError``, or a ``ValueError`` from building a model) end in one line on
stderr and exit code 2; ``mssar --debug ...`` shows the traceback instead.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Annotated, Optional

import typer
from rich.console import Console

from mssar_cli.errors import MssarError
from mssar_cli.tables import FORMATS, emit

app = typer.Typer(
    name="mssar",
    help="MS-SAR (ECCV 2018) reproduction: train, evaluate, ablate, count and report.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
STATE = {"debug": False}


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
) -> None:
    STATE["debug"] = debug


def fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"mssar: error: {message}", err=True)
    return typer.Exit(code)


def user_errors(command: Callable) -> Callable:
    """Turn user errors into one line on stderr and exit code 2 (traceback with --debug)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (MssarError, ValueError) as error:
            if STATE["debug"]:
                raise
            raise fail(str(error), getattr(error, "exit_code", 2)) from None
        except KeyboardInterrupt:
            if STATE["debug"]:
                raise
            raise fail("interrupted; the last checkpoint and CSV rows are intact", 130) from None

    return wrapper


def _parse_scales(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise MssarError(f"--scales expects comma-separated integers such as 1,2,4, got {text!r}") from None


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise MssarError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")


@app.command()
@user_errors
def count(
    model: Annotated[Optional[str], typer.Argument(help="Network name (see --list).")] = None,
    recalibration: Annotated[str, typer.Option(help="none | se | mssar")] = "mssar",
    scales: Annotated[Optional[str], typer.Option(help="MS-SAR scale set, e.g. 1,2,4.")] = None,
    strategy: Annotated[Optional[str], typer.Option(help="regional | sliding")] = None,
    reduction: Annotated[Optional[float], typer.Option(help="Total MLP width is D / reduction.")] = None,
    stage: Annotated[Optional[str], typer.Option(help="single | multi (DenseNets).")] = None,
    num_classes: Annotated[Optional[int], typer.Option(help="Classifier outputs (default 10 or 1000).")] = None,
    paper: Annotated[bool, typer.Option("--paper", help="Every row of Tables 2 and 5, paper beside ours.")] = False,
    list_: Annotated[bool, typer.Option("--list", help="List the networks.")] = False,
    fmt: Annotated[str, typer.Option("--format", help="rich | csv | markdown | latex")] = "rich",
) -> None:
    """Parameters and FLOPs (MACs, ptflops aten backend) beside the baseline and the paper."""
    from mssar_cli import complexity, paper as paper_data
    from mssar_cli.models import list_models, model_spec

    _check_format(fmt)
    if list_:
        for name in list_models():
            spec = model_spec(name)
            console.print(f"{name:12s} {spec.label:11s} {spec.family:16s} {spec.input_size}x{spec.input_size}")
        return
    if paper:
        rows = list(paper_data.PAPER_COST_ROWS)
        entries = []
        with _progress(fmt) as progress:
            task = progress.add_task("counting", total=len(rows))
            for row in rows:
                progress.update(task, description=f"counting {row.label}")
                entries.append(complexity.cost_entry(row.model, row.recalibration))
                progress.advance(task)
        frame = complexity.entries_frame(entries, rows, human=fmt != "csv")
        caption = "FLOPs: multiply-accumulates, ptflops aten backend. " + complexity.PAPER_ACCOUNTING
        emit(frame, fmt, console, "Tables 2 and 5: cost columns, paper beside mssar", caption)
        return
    if model is None:
        raise MssarError("give a MODEL, --paper or --list (see mssar count --help)")
    model_spec(model)  # unknown names fail here with the list of known ones
    options = dict(scales=_parse_scales(scales), strategy=strategy, reduction=reduction, stage=stage)
    entries = [complexity.cost_entry(model, "none", num_classes=num_classes, stage=None)]
    if recalibration != "none":
        entries.append(complexity.cost_entry(model, recalibration, num_classes=num_classes, **options))
    elif any(v is not None for k, v in options.items() if k != "stage"):
        raise MssarError("--scales, --strategy and --reduction need --recalibration se or mssar")
    frame = complexity.entries_frame(entries, human=fmt != "csv")
    emit(frame, fmt, console, f"{model}: parameters and FLOPs")


def _progress(fmt: str):
    """A Rich progress bar on stderr (kept off stdout so CSV/Markdown output stays clean)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
        disable=not sys.stderr.isatty(),
    )


def _not_implemented(name: str) -> Callable:
    def command() -> None:
        raise fail(f"'mssar {name}' is not implemented yet (see README: what works)")

    command.__doc__ = f"(not implemented yet) {name}"
    return command


for _name in ("train", "eval", "ablate", "report"):
    app.command(name=_name, context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(
        _not_implemented(_name)
    )


def main() -> None:
    app()


if __name__ == "__main__":
    main()

"""The ``mssar`` command: thin Typer commands that parse options, call the library, print with Rich.

User errors (``MssarError``, or a ``ValueError`` from building a model) end in one line on
stderr and exit code 2; ``mssar --debug ...`` shows the traceback instead.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Annotated

import typer
from rich.console import Console

from mssar_cli.errors import MssarError
from mssar_cli.tables import FORMATS, emit, output_console

app = typer.Typer(
    name="mssar",
    help="MS-SAR (ECCV 2018) reproduction: train, evaluate, ablate, count and report.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = output_console()
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
    model: Annotated[str | None, typer.Argument(help="Network name (see --list).")] = None,
    recalibration: Annotated[str, typer.Option(help="none | se | mssar")] = "mssar",
    scales: Annotated[str | None, typer.Option(help="MS-SAR scale set, e.g. 1,2,4.")] = None,
    strategy: Annotated[str | None, typer.Option(help="regional | sliding")] = None,
    reduction: Annotated[float | None, typer.Option(help="Total MLP width is D / reduction.")] = None,
    stage: Annotated[str | None, typer.Option(help="single | multi (DenseNets).")] = None,
    num_classes: Annotated[int | None, typer.Option(help="Classifier outputs (default 10 or 1000).")] = None,
    paper: Annotated[bool, typer.Option("--paper", help="Every row of Tables 2 and 5, paper beside ours.")] = False,
    list_: Annotated[bool, typer.Option("--list", help="List the networks.")] = False,
    fmt: Annotated[str, typer.Option("--format", help="rich | csv | markdown | latex")] = "rich",
) -> None:
    """Parameters and FLOPs (MACs, ptflops aten backend) beside the baseline and the paper."""
    from mssar_cli import complexity
    from mssar_cli import paper as paper_data
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


SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a recipe field: --set optim.lr=0.05 (repeatable)."),
]


@app.command()
@user_errors
def train(
    recipe: Annotated[str, typer.Argument(help="YAML recipe, e.g. recipes/quickstart.yaml")],
    set_: SetOption = None,
    seed: Annotated[int | None, typer.Option(help="Override run.seed.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the run's last checkpoint.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="One plain line per epoch, no progress bar.")] = False,
    download: Annotated[
        bool, typer.Option("--download", help="CIFAR: let torchvision download the data (data.download=true).")
    ] = False,
) -> None:
    """Train a network from a recipe into results/<dataset>/<experiment>/seed<k>/."""
    from mssar_cli import recipe as recipes
    from mssar_cli.progress import PlainReporter, RichReporter
    from mssar_cli.training import train as run_training
    from mssar_cli.training import with_seed

    overrides = [*(set_ or []), *(["data.download=true"] if download else [])]
    loaded = with_seed(recipes.load(recipe, overrides), seed)
    plain = quiet or not console.is_terminal
    reporter = PlainReporter(console) if plain else RichReporter(console)
    try:
        run_training(loaded, resume=resume, reporter=reporter)
    finally:
        if isinstance(reporter, RichReporter):
            reporter.close()


@app.command(name="eval")
@user_errors
def eval_(
    path: Annotated[str, typer.Argument(help="A run directory or a checkpoint.pt.")],
    set_: SetOption = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda | cuda:N (default: the recipe's).")] = None,
) -> None:
    """Re-evaluate a finished (or interrupted) run on its test split; compare with its CSV."""
    from pathlib import Path

    from mssar_cli.training import evaluate_saved

    result = evaluate_saved(Path(path), set_ or [], device)
    top5 = f", top-5 error {result['test_top5_err']:.2f}%" if "test_top5_err" in result else ""
    console.print(
        f"{result['experiment']} (epoch {result['epoch']}) on {result['dataset']} "
        f"({result['test_images']} test images): top-1 error {result['test_err']:.2f}%{top5}, "
        f"loss {result['test_loss']:.4f}",
        markup=False,
        highlight=False,
    )
    logged = result["logged"]
    if logged:
        diff = abs(logged["test_err"] - result["test_err"])
        verdict = "agrees with" if diff < 1e-6 else f"differs by {diff:.4f} points from"
        console.print(f"{verdict} the final row of epochs.csv (top-1 error {logged['test_err']:.2f}%)", markup=False, highlight=False)


@app.command()
@user_errors
def ablate(
    kind: Annotated[str, typer.Argument(help="scales | strategy | stage | recalibration | grid")],
    recipe: Annotated[str, typer.Argument(help="The base recipe.")],
    grid: Annotated[list[str] | None, typer.Option("--grid", help="Another axis: KEY=V1,V2 (repeatable).")] = None,
    seeds: Annotated[int, typer.Option(help="Runs per cell (seeds run.seed, run.seed+1, ...).")] = 1,
    jobs: Annotated[int, typer.Option(help="Runs at once (CPU threads are split between them).")] = 1,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List the runs and their state; run nothing.")] = False,
    set_: SetOption = None,
) -> None:
    """Expand a recipe into one of the paper's ablation grids and run what is not finished."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from mssar_cli import ablation

    planned = ablation.plan(kind, recipe, set_ or [], grid or [], seeds)
    states = [run.status for run in planned]
    counts = {state: states.count(state) for state in ("finished", "interrupted", "missing")}
    console.print(
        f"{len(planned)} runs: {counts['finished']} finished (skipped), "
        f"{counts['interrupted']} interrupted (resumed), {counts['missing']} to start",
        markup=False,
        highlight=False,
    )
    if dry_run:
        for run, state in zip(planned, states):
            console.print(f"  {state:11s} {run.run_dir}", markup=False, highlight=False)
        return
    failures = []
    progress = Progress(
        TextColumn("ablation {task.fields[kind]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=not console.is_terminal,
    )

    def done(outcome) -> None:
        mark = "done" if outcome.returncode == 0 else f"FAILED (exit {outcome.returncode})"
        progress.console.print(
            f"{mark:>6} {outcome.run.recipe.experiment} seed {outcome.run.seed} in {outcome.seconds:.0f} s",
            markup=False,
            highlight=False,
        )
        if outcome.returncode != 0:
            failures.append(outcome)
            progress.console.print(outcome.log_tail, markup=False, highlight=False)
        progress.advance(task)

    with progress:
        task = progress.add_task("runs", total=len(planned) - counts["finished"], kind=kind)
        ablation.execute(planned, recipe, jobs, done)
    emit(ablation.summary_frame(planned), "rich", console, f"ablation {kind}: final-epoch test error")
    if failures:
        raise fail(f"{len(failures)} run(s) failed; their logs are under {planned[0].run_dir.parent.parent / 'logs'}", 1)


from mssar_cli.report_cli import report

app.command(name="report")(user_errors(report))


def main() -> None:
    app()


if __name__ == "__main__":
    main()

"""The ``mssar`` command: thin Typer commands that parse options, call the library, print with Rich.

User errors (``MssarError``: a bad recipe, missing data, an impossible option, a model that
cannot be built as asked) end in one line on stderr and exit code 2; ``mssar --debug ...``
shows the traceback instead. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Annotated

import typer
from rich.console import Console

from mssar_cli.errors import MssarError, RunStopped
from mssar_cli.recalibration import PLAIN, RECALIBRATIONS, check_options
from mssar_cli.report.command import report
from mssar_cli.report.render import FORMATS, emit, output_console

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
        except RunStopped as stopped:  # asked for (a signal), not an error
            typer.echo(f"mssar: {stopped}", err=True)
            raise typer.Exit(stopped.exit_code) from None
        except MssarError as error:
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
        raise MssarError(
            f"--scales expects comma-separated integers such as 1,2,4, got {text!r}"
        ) from None


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise MssarError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")


@app.command()
@user_errors
def count(
    model: Annotated[str | None, typer.Argument(help="Network name (see --list).")] = None,
    recalibration: Annotated[str, typer.Option(help=" | ".join(RECALIBRATIONS))] = "mssar",
    scales: Annotated[str | None, typer.Option(help="MS-SAR scale set, e.g. 1,2,4.")] = None,
    strategy: Annotated[str | None, typer.Option(help="regional | sliding")] = None,
    reduction: Annotated[
        float | None, typer.Option(help="Total MLP width is D / reduction.")
    ] = None,
    stage: Annotated[str | None, typer.Option(help="single | multi (DenseNets).")] = None,
    num_classes: Annotated[
        int | None, typer.Option(help="Classifier outputs (default 10 or 1000).")
    ] = None,
    paper: Annotated[
        bool, typer.Option("--paper", help="Every row of Tables 2 and 5, paper beside ours.")
    ] = False,
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
            console.print(
                f"{name:12s} {spec.label:11s} {spec.family:16s} {spec.input_size}x{spec.input_size}"
            )
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
        caption = (
            "FLOPs: multiply-accumulates, ptflops aten backend. " + complexity.PAPER_ACCOUNTING
        )
        emit(frame, fmt, console, "Tables 2 and 5: cost columns, paper beside mssar", caption)
        return
    if model is None:
        raise MssarError("give a MODEL, --paper or --list (see mssar count --help)")
    model_spec(model)  # unknown names fail here with the list of known ones
    module_options = dict(scales=_parse_scales(scales), strategy=strategy, reduction=reduction)
    check_options(recalibration, module_options)  # unknown modules and options they do not take
    entries = [complexity.cost_entry(model, PLAIN, num_classes=num_classes, stage=None)]
    if recalibration != PLAIN:
        entries.append(
            complexity.cost_entry(
                model, recalibration, num_classes=num_classes, stage=stage, **module_options
            )
        )
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
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the run's last checkpoint.")
    ] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", help="One plain line per epoch, no progress bar.")
    ] = False,
    download: Annotated[
        bool,
        typer.Option(
            "--download", help="CIFAR: let torchvision download the data (data.download=true)."
        ),
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
    device: Annotated[
        str | None, typer.Option(help="auto | cpu | cuda | cuda:N (default: the recipe's).")
    ] = None,
) -> None:
    """Re-evaluate a finished (or interrupted) run on its test split; compare with its CSV."""
    from pathlib import Path

    from mssar_cli.evaluation import evaluate_saved

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
        console.print(
            f"{verdict} the final row of epochs.csv (top-1 error {logged['test_err']:.2f}%)",
            markup=False,
            highlight=False,
        )


@app.command()
@user_errors
def show(
    path: Annotated[str, typer.Argument(help="A run directory or a checkpoint.pt.")],
    images: Annotated[int, typer.Option(help="Test images to draw (the first of the split).")] = 8,
    output: Annotated[
        str | None, typer.Option(help="Folder for the PNGs and CSV (default: RUN_DIR/show).")
    ] = None,
    block: Annotated[
        int, typer.Option(help="Which block of each stage to draw (0 = first, -1 = last).")
    ] = -1,
    channels: Annotated[
        int, typer.Option(help="Channels to draw beside the means: those varying most.")
    ] = 3,
    checkpoint: Annotated[
        str | None, typer.Option(help="Another checkpoint of the run directory's network.")
    ] = None,
    set_: SetOption = None,
    device: Annotated[
        str | None, typer.Option(help="auto | cpu | cuda | cuda:N (default: the recipe's).")
    ] = None,
) -> None:
    """Pictures of what the gates learned: per stage, each scale's weights on test images."""
    from pathlib import Path

    from rich.table import Table

    from mssar_cli.show import show as draw

    result = draw(
        Path(path),
        output=None if output is None else Path(output),
        images=images,
        block=block,
        channels=channels,
        checkpoint=None if checkpoint is None else Path(checkpoint),
        overrides=set_ or [],
        device=device,
    )
    if result.note:
        console.print(f"{result.title}: {result.note}", markup=False, highlight=False)
        return
    labels = list(result.stages[0].asymmetry())
    console.print(result.title, markup=False, highlight=False)
    table = Table(title="spatial asymmetry: std of a weight over positions")
    for column in ("stage", "map", "blocks", *labels):
        table.add_column(column, justify="left" if column == "stage" else "right")
    for stage in result.stages:
        values = stage.asymmetry()
        table.add_row(
            str(stage.index),
            f"{stage.size[0]}x{stage.size[1]}",
            str(len(stage.modules)),
            *(f"{values[label]:.4f}" for label in labels),
        )
    console.print(table)
    for file in result.files:
        console.print(f"wrote {file}", markup=False, highlight=False)


@app.command()
@user_errors
def ablate(
    kind: Annotated[str, typer.Argument(help="scales | strategy | stage | recalibration | grid")],
    recipe: Annotated[str, typer.Argument(help="The base recipe.")],
    grid: Annotated[
        list[str] | None, typer.Option("--grid", help="Another axis: KEY=V1,V2 (repeatable).")
    ] = None,
    seeds: Annotated[
        int, typer.Option(help="Runs per cell (seeds run.seed, run.seed+1, ...).")
    ] = 1,
    launcher: Annotated[
        str, typer.Option(help="local (processes here) | slurm (a job array) | submitit-local")
    ] = "local",
    jobs: Annotated[
        int | None,
        typer.Option(help="Runs at once (default 1, or GPUs x --runs-per-gpu); slurm: tasks."),
    ] = None,
    runs_per_gpu: Annotated[
        int | None, typer.Option(help="local: runs sharing one GPU (small CIFAR runs).")
    ] = None,
    gpus_per_run: Annotated[
        int | None, typer.Option(help="slurm: GPUs of each run (default 1; >1: one DDP task each).")
    ] = None,
    cpus_per_run: Annotated[int | None, typer.Option(help="slurm: CPUs of each run.")] = None,
    partition: Annotated[str | None, typer.Option(help="slurm: the partition.")] = None,
    time_min: Annotated[
        int | None,
        typer.Option("--time", help="slurm: each run's time limit, minutes (then it requeues)."),
    ] = None,
    slurm: Annotated[
        list[str] | None,
        typer.Option("--slurm", help="slurm: another sbatch parameter, e.g. account=vision."),
    ] = None,
    modules: Annotated[
        str | None,
        typer.Option(help="recalibration: the modules to run beside plain, e.g. se,mssar,eca."),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List the runs and their state; run nothing.")
    ] = False,
    set_: SetOption = None,
) -> None:
    """Expand a recipe into one of the paper's ablation grids and run (here) or submit (Slurm)
    every run that is not finished, running or queued."""
    from mssar_cli import ablation, launch
    from mssar_cli.launch.state import TO_START, run_states

    options = launch.LaunchOptions(
        launcher,
        jobs,
        runs_per_gpu,
        gpus_per_run,
        cpus_per_run,
        partition,
        time_min,
        tuple(slurm or ()),
    )
    gpus = launch.check(options, not dry_run)  # impossible options fail here, before any run
    chosen = None if modules is None else [m.strip() for m in modules.split(",") if m.strip()]
    planned = ablation.plan(kind, recipe, set_ or [], grid or [], seeds, chosen)
    states = run_states(planned)
    _say(_ablate_counts([state.state for state in states]))
    if dry_run:
        for run, state in zip(planned, states):
            detail = f"  {state.detail}" if state.detail else ""
            _say(f"  {state.state:11s} {run.run_dir}{detail}")
            for line in state.tail:
                _say(f"      | {line}")
        return
    todo = [run for run, state in zip(planned, states) if state.state in TO_START]
    if options.launcher == "slurm":
        _ablate_submit(todo, recipe, options, kind)
        return
    failures = _ablate_here(todo, recipe, options, gpus, kind)
    title = f"ablation {kind}: final-epoch test error"
    emit(ablation.summary_frame(planned), "rich", console, title)
    if failures:
        logs = sorted({str(outcome.run.log_path.parent) for outcome in failures})
        raise fail(f"{len(failures)} run(s) failed; their logs are under {', '.join(logs)}", 1)


def _say(text: str) -> None:
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def _ablate_counts(states: list[str]) -> str:
    """``24 runs: 3 finished (skipped), [2 running (skipped), ...] 5 interrupted (resumed), ...``"""
    n = {state: states.count(state) for state in set(states)}
    parts = [f"{n.get('finished', 0)} finished (skipped)"]
    parts += [f"{n[state]} {state} (skipped)" for state in ("running", "queued") if n.get(state)]
    parts += [f"{n['failed']} failed (run again)"] if n.get("failed") else []
    parts += [f"{n.get('interrupted', 0)} interrupted (resumed)", f"{n.get('missing', 0)} to start"]
    return f"{len(states)} runs: " + ", ".join(parts)


def _ablate_here(todo, recipe: str, options, gpus: int, kind: str) -> list:
    """Run ``todo`` on this machine with a progress bar; the outcomes that failed."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from mssar_cli import launch

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
        where = f" on GPU {outcome.gpu}" if outcome.gpu is not None else ""
        progress.console.print(
            f"{mark:>6} {outcome.run.recipe.experiment} seed {outcome.run.seed}{where} "
            f"in {outcome.seconds:.0f} s",
            markup=False,
            highlight=False,
        )
        if outcome.returncode != 0:
            failures.append(outcome)
            progress.console.print(outcome.log_tail, markup=False, highlight=False)
        progress.advance(task)

    with progress:
        task = progress.add_task("runs", total=len(todo), kind=kind)
        if todo:
            launch.run_here(todo, recipe, options, gpus, done)
    return failures


def _ablate_submit(todo, recipe: str, options, kind: str) -> None:
    """Submit ``todo`` as one Slurm job array and say where to follow it."""
    from pathlib import Path

    from mssar_cli.launch.slurm import submit

    if not todo:
        _say("nothing to submit")
        return
    sub = submit(todo, recipe, options, f"mssar-{kind}")

    def short(path: Path) -> str:
        return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)

    tasks = f"{sub.task_ids[0]} ... {sub.task_ids[-1]}" if len(sub.task_ids) > 1 else sub.job_id
    _say(f"submitted {len(todo)} runs as Slurm job {sub.job_id} ({tasks}, {sub.parallel} at once)")
    logs = sorted({short(path.parent.resolve()) for path in sub.run_logs})
    _say(f"  training logs: {', '.join(logs)}/<experiment>-seed<k>.log")
    _say(
        f"  submitit: {short(sub.submitit_folder)}/ (sbatch script {sub.job_id}_submission.sh, "
        f"task logs {sub.job_id}_<task>_0_log.out/.err)"
    )
    _say(f"  recorded in: {', '.join(short(path.resolve()) for path in sub.records)}")
    _say(f"  follow: squeue -j {sub.job_id}, or this same command with --dry-run")


app.command(name="report")(user_errors(report))


def main() -> None:
    app()


if __name__ == "__main__":
    main()

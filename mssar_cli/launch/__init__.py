"""Starting an ablation's runs: on this machine or on a Slurm cluster, and how many at once.

Three launchers, one way to run a run (``mssar train RECIPE --resume --quiet --set ...``, its
output in ``results/<dataset>/logs/<experiment>-seed<k>.log``, see :mod:`.job`):

- ``local`` (the default): N processes here (:mod:`.local`), one GPU each, round-robin over the
  machine's GPUs (``--runs-per-gpu K`` packs K small runs on one);
- ``submitit-local``: the same runs as submitit jobs on this machine (:mod:`.slurm`): what a
  cluster will run, checked here first;
- ``slurm``: every run one task of a Slurm job array, through submitit (:mod:`.slurm`); returns
  once submitted, the state of each run is then ``mssar ablate ... --dry-run`` (:mod:`.state`).

:func:`check` refuses impossible options with one :class:`~mssar_cli.errors.MssarError` before
anything runs or is written. Importing this package imports no torch (a submitit job on a node
unpickles :class:`~mssar_cli.launch.job.TrainRun` through it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mssar_cli.errors import MssarError

if TYPE_CHECKING:
    from mssar_cli.ablation import PlannedRun
    from mssar_cli.launch.local import Outcome

LAUNCHERS = ("local", "slurm", "submitit-local")


@dataclass(frozen=True)
class LaunchOptions:
    """The options of ``mssar ablate`` that say where and how runs start (None: not given)."""

    launcher: str = "local"
    jobs: int | None = None  # runs at once (here), array tasks at once (Slurm)
    runs_per_gpu: int | None = None  # here: runs sharing one GPU
    gpus_per_run: int | None = None  # Slurm: GPUs (and tasks, if > 1) of each run
    cpus_per_run: int | None = None  # Slurm: CPUs of each run
    partition: str | None = None  # Slurm
    time_min: int | None = None  # Slurm: each task's time limit; submitit-local: its timeout
    slurm: tuple[str, ...] = ()  # Slurm: KEY=VALUE for submitit's update_parameters


def gpu_count() -> int:
    """The GPUs runs are placed on here (tests replace this)."""
    import torch

    return torch.cuda.device_count()


def check(options: LaunchOptions, starting: bool = True) -> int:
    """Refuse impossible options; the number of GPUs runs go on here (0 for Slurm).
    ``starting``: runs are to start now (not ``--dry-run``), so Slurm must be reachable."""
    if options.launcher not in LAUNCHERS:
        raise MssarError(
            f"--launcher must be one of {', '.join(LAUNCHERS)}, got {options.launcher!r}"
        )
    for flag, value, least in (
        ("--jobs", options.jobs, 1),
        ("--runs-per-gpu", options.runs_per_gpu, 1),
        ("--gpus-per-run", options.gpus_per_run, 0),
        ("--cpus-per-run", options.cpus_per_run, 1),
        ("--time", options.time_min, 1),
    ):
        if value is not None and value < least:
            raise MssarError(f"{flag}: expected at least {least}, got {value}")
    if options.launcher == "slurm":
        if options.runs_per_gpu is not None:
            raise MssarError(
                "--runs-per-gpu is for --launcher local and submitit-local; a Slurm task gets "
                "--gpus-per-run GPUs of its own"
            )
        from mssar_cli.launch.slurm import check_cluster, check_slurm_options

        check_slurm_options(options)
        if starting:
            check_cluster()
        return 0
    if options.gpus_per_run is not None:
        raise MssarError(
            f"--gpus-per-run is for --launcher slurm (one task per GPU, joined by DDP); with "
            f"--launcher {options.launcher} each run gets one GPU (--runs-per-gpu packs several "
            "runs on one), and torchrun trains one run on several"
        )
    given = [
        flag
        for flag, value in (
            ("--partition", options.partition),
            ("--cpus-per-run", options.cpus_per_run),
            ("--slurm", options.slurm or None),
            ("--time", options.time_min if options.launcher == "local" else None),
        )
        if value is not None
    ]
    if given:
        raise MssarError(f"{given[0]} is for --launcher slurm, not {options.launcher}")
    gpus = gpu_count()
    if options.runs_per_gpu is not None and gpus == 0:
        raise MssarError(
            "--runs-per-gpu: this machine has no GPU (torch.cuda.device_count() is 0); runs on "
            "the CPU share it through --jobs"
        )
    return gpus


def jobs_here(options: LaunchOptions, gpus: int) -> int:
    """Runs at once on this machine: ``--jobs``, else one per GPU slot (G x K), else 1."""
    if options.jobs is not None:
        return options.jobs
    return gpus * (options.runs_per_gpu or 1) if gpus else 1


def run_here(
    todo: Sequence[PlannedRun],
    recipe_path: str,
    options: LaunchOptions,
    gpus: int,
    on_done: Callable[[Outcome], None],
    on_start: Callable[[PlannedRun], None] | None = None,
) -> list[Outcome]:
    """Run ``todo`` on this machine (``local`` or ``submitit-local``) and wait for them."""
    jobs = jobs_here(options, gpus)
    if options.launcher == "submitit-local":
        from mssar_cli.launch.slurm import execute_local

        return execute_local(todo, recipe_path, options, jobs, gpus, on_done, on_start)
    from mssar_cli.launch.local import execute

    return execute(todo, recipe_path, jobs, on_done, on_start, gpus, options.runs_per_gpu)

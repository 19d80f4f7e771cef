"""The runs as submitit jobs: one Slurm job array (``--launcher slurm``), or the very same jobs on
this machine (``--launcher submitit-local``, submitit's ``LocalExecutor``).

Every run is one :class:`~mssar_cli.launch.job.TrainRun`, a checkpointable submitit job that
runs ``mssar train --resume``. Under Slurm, all of them go in one array (``sbatch --array``,
``--jobs`` tasks at once), each task with ``--gpus-per-run`` GPUs (one task per GPU when there
are several, joined by DDP) and ``--cpus-per-run`` CPUs; submitit's files (the sbatch script,
pickles, its own logs) are in ``results/<dataset>/logs/submitit/``, the training output in the
run's log beside them. A task that times out (submitit signals it ``signal_delay_s`` before its
time limit) or is preempted checkpoints and requeues itself, up to :data:`MAX_TIMEOUTS` times.

``submitit-local`` starts each job with ``LocalExecutor`` through the pool of ``--launcher
local`` (which respects ``--jobs`` and places runs on GPUs), since that executor alone would start
every job at once, give each the same GPUs and stop them after 2 minutes.
"""

from __future__ import annotations

import difflib
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from mssar_cli.errors import MssarError
from mssar_cli.launch.job import TrainRun, last_session, train_command
from mssar_cli.launch.local import GpuSlots, Outcome, cpu_threads, run_pool

if TYPE_CHECKING:
    from mssar_cli.ablation import PlannedRun
    from mssar_cli.launch import LaunchOptions

MAX_TIMEOUTS = 20  # times a run may hit its time limit and continue from its checkpoint
SIGNAL_DELAY_S = 120  # submitit's signal before the time limit: time to write the checkpoint
LOCAL_TIMEOUT_MIN = 7 * 24 * 60  # submitit-local without --time: a week, not submitit's 2 min
# sbatch parameters set by their own options, not through --slurm KEY=VALUE
OWN_OPTIONS = {
    "partition": "--partition",
    "time": "--time",
    "array_parallelism": "--jobs",
    "cpus_per_task": "--cpus-per-run",
    "gpus_per_node": "--gpus-per-run",
    "gpus_per_task": "--gpus-per-run",
    "num_gpus": "--gpus-per-run",
    "ntasks_per_node": "--gpus-per-run",
}


def known_parameters() -> list[str]:
    """What submitit's ``SlurmExecutor.update_parameters`` accepts (sbatch options, with ``_``)."""
    from submitit import SlurmExecutor

    return sorted(SlurmExecutor._valid_parameters())


def extra_parameters(items: Sequence[str]) -> dict[str, Any]:
    """``--slurm account=vision --slurm mem=64G`` -> ``{"account": "vision", "mem": "64G"}``;
    values are read as YAML (``exclusive=true``, ``setup=["module load cuda"]``)."""
    known = known_parameters()
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise MssarError(f"--slurm {item!r}: expected KEY=VALUE such as account=vision")
        if key in OWN_OPTIONS:
            raise MssarError(f"--slurm {key}: use {OWN_OPTIONS[key]} for this")
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            others = ", ".join(k for k in known if k not in OWN_OPTIONS)
            raise MssarError(f"--slurm {key}: unknown Slurm parameter; {hint}known: {others}")
        try:
            out[key] = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            out[key] = text
    return out


def slurm_parameters(options: LaunchOptions, name: str) -> dict[str, Any]:
    """The ``update_parameters`` of every task of the array."""
    gpus = 1 if options.gpus_per_run is None else options.gpus_per_run
    params: dict[str, Any] = {"job_name": name, "time": options.time_min}
    params["signal_delay_s"] = SIGNAL_DELAY_S
    if options.partition:
        params["partition"] = options.partition
    if options.jobs is not None:
        params["array_parallelism"] = options.jobs
    if gpus > 0:
        params["gpus_per_node"] = gpus
    if gpus > 1:
        params["ntasks_per_node"] = gpus  # one task (one DDP rank) per GPU
    if options.cpus_per_run is not None:
        params["cpus_per_task"] = options.cpus_per_run // max(1, gpus)
    return params | extra_parameters(options.slurm)


def check_slurm_options(options: LaunchOptions) -> None:
    """The Slurm options alone (no cluster needed): refuse what sbatch would not take."""
    if options.time_min is None:
        raise MssarError(
            "--launcher slurm needs --time MINUTES, each run's time limit (a run that needs "
            "longer continues from its checkpoint in a requeued task)"
        )
    gpus = 1 if options.gpus_per_run is None else options.gpus_per_run
    if options.cpus_per_run is not None and gpus > 1 and options.cpus_per_run % gpus:
        raise MssarError(
            f"--cpus-per-run {options.cpus_per_run}: not a multiple of --gpus-per-run {gpus} "
            "(each of the run's tasks, one per GPU, gets an equal share)"
        )
    extra_parameters(options.slurm)


def check_cluster() -> None:
    missing = [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None]
    if missing:
        raise MssarError(
            f"--launcher slurm: {' and '.join(missing)} not on the PATH (not a Slurm login node?); "
            "use --launcher local or submitit-local on this machine"
        )


@dataclass(frozen=True)
class Submission:
    job_id: str  # the array's id (or the job's, for a single run)
    task_ids: list[str]
    parallel: int  # tasks at once
    submitit_folder: Path  # sbatch script, pickles, submitit's logs
    run_logs: list[Path]  # each run's training output: <folder>/<experiment>-seed<k>.log
    records: list[Path]  # the submitted.json files written


def submit(
    todo: Sequence[PlannedRun], recipe_path: str, options: LaunchOptions, name: str
) -> Submission:
    """Submit ``todo`` as one Slurm job array; returns once ``sbatch`` accepted it."""
    from submitit import SlurmExecutor
    from submitit.core.utils import FailedJobError, FailedSubmissionError

    from mssar_cli.launch.state import record_submissions

    check_slurm_options(options)
    check_cluster()
    folder = todo[0].log_path.parent.resolve() / "submitit"
    executor = SlurmExecutor(folder=folder, max_num_timeout=MAX_TIMEOUTS)
    params = slurm_parameters(options, name)
    try:
        executor.update_parameters(**params)
    except (ValueError, TypeError) as error:
        raise MssarError(f"--slurm: {str(error).splitlines()[0]}") from None
    threads = params.get("cpus_per_task")
    jobs = [_train_run(run, recipe_path, threads) for run in todo]
    try:
        submitted = executor.submit_array(jobs)
    except (FailedJobError, FailedSubmissionError) as error:
        lines = [line for line in str(error).splitlines() if line.strip()]
        raise MssarError(f"sbatch refused the job array: {lines[-1] if lines else error}") from None
    task_ids = [job.job_id for job in submitted]
    records = record_submissions(list(zip(todo, task_ids)))
    return Submission(
        job_id=task_ids[0].split("_")[0],
        task_ids=task_ids,
        parallel=min(len(todo), options.jobs or params.get("array_parallelism", 256)),
        submitit_folder=folder,
        run_logs=[run.log_path for run in todo],
        records=records,
    )


def _train_run(run: PlannedRun, recipe_path: str, threads: int | None) -> TrainRun:
    own = threads if run.recipe.run.threads is None else None
    command = train_command(recipe_path, run.overrides, own)
    label = f"{run.recipe.experiment} seed {run.seed}"
    return TrainRun(command, str(run.log_path.resolve()), os.getcwd(), label)


def execute_local(
    todo: Sequence[PlannedRun],
    recipe_path: str,
    options: LaunchOptions,
    jobs: int,
    gpus: int,
    on_done: Callable[[Outcome], None],
    on_start: Callable[[PlannedRun], None] | None = None,
) -> list[Outcome]:
    """``--launcher submitit-local``: every run a submitit job on this machine, ``jobs`` at a
    time, each given its own GPU (or none), waiting for them all."""
    from submitit import LocalExecutor

    if jobs < 1:
        raise MssarError(f"--jobs: expected at least 1, got {jobs}")
    folder = todo[0].log_path.parent.resolve() / "submitit-local"
    executor = LocalExecutor(folder=folder, max_num_timeout=MAX_TIMEOUTS)
    timeout = options.time_min or LOCAL_TIMEOUT_MIN
    threads = cpu_threads(todo, jobs, gpus)
    slots = GpuSlots(gpus, os.environ.get("CUDA_VISIBLE_DEVICES"), options.runs_per_gpu)
    started = []

    def start(run: PlannedRun, gpu: str | None):
        devices = [int(gpu)] if gpu is not None and gpu.isdigit() else []
        executor.update_parameters(
            timeout_min=timeout,
            signal_delay_s=min(SIGNAL_DELAY_S, 30 * timeout),
            gpus_per_node=len(devices),
            visible_gpus=devices,
        )
        job = executor.submit(_train_run(run, recipe_path, threads))
        started.append(job)
        return run, job

    def finished(handle) -> int | None:
        run, job = handle
        if not job.done():
            return None
        if job.exception() is None:
            return 0
        code = last_session(run.log_path)[1]
        return code if code else 1

    try:
        return run_pool(todo, jobs, slots, start, finished, on_done, on_start)
    finally:
        for job in started:  # on Ctrl-C or an error here: stop what still runs
            if not job.done():
                job.cancel(check=False)

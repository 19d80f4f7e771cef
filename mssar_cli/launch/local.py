"""``--launcher local``: the runs as ``mssar train`` processes on this machine, N at a time.

On a machine with G GPUs, each run that may use a GPU (``run.device`` auto or cuda) gets one,
least busy first (round-robin while all are free), through ``CUDA_VISIBLE_DEVICES`` in its
environment; ``--runs-per-gpu K`` packs K small runs on each (``--jobs`` defaults to G x K).
Without GPUs, the CPU threads are split between the runs. The pool itself
(:func:`run_pool`) is shared with ``--launcher submitit-local``, whose runs are submitit jobs.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mssar_cli.errors import MssarError
from mssar_cli.launch.job import log_tail, run_logged, train_command

if TYPE_CHECKING:
    from mssar_cli.ablation import PlannedRun

POLL_S = 0.2


@dataclass
class Outcome:
    run: PlannedRun
    returncode: int
    seconds: float
    log_tail: str
    gpu: str | None = None  # the CUDA_VISIBLE_DEVICES it ran with


class GpuSlots:
    """Which GPU the next run goes on: the one running fewest runs, the lowest index among
    equals, so runs started together go round-robin over the GPUs.

    ``count`` GPUs as torch numbers them; ``visible`` the ``CUDA_VISIBLE_DEVICES`` this process
    has (its entries are what a child must be given to see the same device); ``per_gpu`` the
    most runs one GPU takes (``--runs-per-gpu``; None: no limit but ``--jobs``)."""

    def __init__(self, count: int, visible: str | None = None, per_gpu: int | None = None) -> None:
        names = [part.strip() for part in (visible or "").split(",") if part.strip()]
        self.names = names[:count] if len(names) >= count else [str(i) for i in range(count)]
        self.busy = [0] * count
        self.per_gpu = per_gpu

    def __len__(self) -> int:
        return len(self.busy)

    def full(self) -> bool:
        return self.per_gpu is not None and min(self.busy, default=0) >= self.per_gpu

    def acquire(self) -> str:
        index = min(range(len(self.busy)), key=lambda i: (self.busy[i], i))
        self.busy[index] += 1
        return self.names[index]

    def release(self, name: str) -> None:
        self.busy[self.names.index(name)] -= 1


def uses_gpu(run: PlannedRun) -> bool:
    """Runs placed on a GPU: ``run.device`` auto or cuda (``cuda:N`` chose its own)."""
    return run.recipe.run.device in ("auto", "cuda")


def cpu_threads(todo: Sequence[PlannedRun], jobs: int, gpus: int) -> int | None:
    """Torch threads per run when CPU runs share this machine: the cores split between them
    (None: leave torch's default, e.g. for GPU runs or a recipe that sets run.threads)."""
    on_cpu = all(not uses_gpu(run) or gpus == 0 for run in todo)
    return max(1, (os.cpu_count() or 1) // jobs) if on_cpu and jobs > 1 else None


def run_pool(
    todo: Sequence[PlannedRun],
    jobs: int,
    slots: GpuSlots,
    start: Callable[[PlannedRun, str | None], Any],
    finished: Callable[[Any], int | None],
    on_done: Callable[[Outcome], None],
    on_start: Callable[[PlannedRun], None] | None = None,
) -> list[Outcome]:
    """Start runs while fewer than ``jobs`` run, each on the least busy GPU of ``slots`` (if it
    uses one); ``start(run, gpu)`` returns a handle, ``finished(handle)`` its exit code once it
    ended (None before). Returns every outcome, in the order they ended."""
    if jobs < 1:
        raise MssarError(f"--jobs: expected at least 1, got {jobs}")
    queue = list(todo)
    pending: list[tuple[PlannedRun, Any, str | None, float]] = []
    outcomes: list[Outcome] = []
    while queue or pending:
        while queue and len(pending) < jobs:
            on_gpu = len(slots) > 0 and uses_gpu(queue[0])
            if on_gpu and slots.full():
                break  # every GPU has its --runs-per-gpu runs: wait for one to end
            run = queue.pop(0)
            gpu = slots.acquire() if on_gpu else None
            if on_start:
                on_start(run)
            pending.append((run, start(run, gpu), gpu, time.perf_counter()))
        time.sleep(POLL_S)
        for entry in list(pending):
            run, handle, gpu, began = entry
            code = finished(handle)
            if code is None:
                continue
            pending.remove(entry)
            if gpu is not None:
                slots.release(gpu)
            tail = "\n".join(log_tail(run.log_path))
            outcome = Outcome(run, code, time.perf_counter() - began, tail, gpu)
            outcomes.append(outcome)
            on_done(outcome)
    return outcomes


def execute(
    todo: Sequence[PlannedRun],
    recipe_path: str,
    jobs: int,
    on_done: Callable[[Outcome], None],
    on_start: Callable[[PlannedRun], None] | None = None,
    gpus: int = 0,
    runs_per_gpu: int | None = None,
) -> list[Outcome]:
    """Run every run of ``todo``, ``jobs`` at a time, each in its own ``mssar train`` process
    on ``gpus`` GPUs (``CUDA_VISIBLE_DEVICES`` set per process, at most ``runs_per_gpu`` each)."""
    if jobs < 1:
        raise MssarError(f"--jobs: expected at least 1, got {jobs}")
    threads = cpu_threads(todo, jobs, gpus)
    slots = GpuSlots(gpus, os.environ.get("CUDA_VISIBLE_DEVICES"), runs_per_gpu)

    def start(run: PlannedRun, gpu: str | None) -> Future:
        own = threads if run.recipe.run.threads is None else None
        command = train_command(recipe_path, run.overrides, own)
        env = None if gpu is None else {"CUDA_VISIBLE_DEVICES": gpu}
        return pool.submit(run_logged, command, run.log_path, None, env)

    def finished(future: Future) -> int | None:
        return future.result() if future.done() else None

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return run_pool(todo, jobs, slots, start, finished, on_done, on_start)

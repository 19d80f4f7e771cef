"""One training run, end to end: run directory, resume, epochs, CSV, checkpoints, summary.

The reported number is the error of the **final** epoch (SPEC.md §4); the best epoch is kept in
the summary only under a name that says what it is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import signal
import threading
import time
from pathlib import Path
from typing import Protocol

import torch

from mssar_cli import distributed, runs
from mssar_cli.engine import (
    EpochProgress,
    Session,
    Stopped,
    build_session,
    evaluate,
    resolve_device,
    train_one_epoch,
)
from mssar_cli.errors import MssarError, RunStopped
from mssar_cli.recipe import Recipe, dump, read_raw

CSV_COLUMNS = (
    "epoch",
    "lr",
    "train_loss",
    "train_err",
    "test_loss",
    "test_err",
    "test_top5_err",
    "epoch_seconds",
    "images_per_s",
)


class Reporter(Protocol):
    def start(self, run_dir: Path, session: Session, first_epoch: int) -> None: ...
    def batch(
        self, epoch: int, done: int, total: int, loss: float, err: float, images_per_s: float
    ) -> None: ...
    def epoch(self, row: dict) -> None: ...
    def finish(self, summary: dict) -> None: ...
    def note(self, text: str) -> None: ...


def with_seed(recipe: Recipe, seed: int | None) -> Recipe:
    if seed is None:
        return recipe
    if seed < 0:
        raise MssarError(f"--seed: expected a non-negative integer, got {seed}")
    return dataclasses.replace(recipe, run=dataclasses.replace(recipe.run, seed=seed))


def train(recipe: Recipe, *, resume: bool = False, reporter: Reporter | None = None) -> dict:
    """Train ``recipe`` in its run directory; returns the summary (also written to summary.json)."""
    device = resolve_device(recipe.run.device)
    world = distributed.init_from_environment(device.type)
    if device.type == "cuda" and world.distributed:
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not world.is_main:
        reporter = None
    try:
        return _train(recipe, device, world, resume, reporter)
    finally:
        distributed.shutdown(world)


def _train(
    recipe: Recipe, device: torch.device, world: distributed.World, resume: bool, reporter
) -> dict:
    run_dir = recipe.run_dir()
    checkpoint_path = run_dir / runs.CHECKPOINT
    stored = run_dir / runs.RECIPE
    if stored.exists():
        differences = runs.recipe_differences(read_raw(stored), recipe.to_dict())
        if differences:
            raise MssarError(
                f"{run_dir}: holds a run of a different recipe "
                f"(differs in {', '.join(differences)}); "
                "change the experiment name or remove the directory"
            )
    if runs.is_finished(run_dir):
        summary = runs.read_json(run_dir / runs.SUMMARY)
        if reporter:
            reporter.note(
                f"{run_dir} is already finished "
                f"(test error {summary['final']['test_err']:.2f}%); nothing to do"
            )
        return summary | {"already_finished": True}
    holder = runs.lock_holder(run_dir) if world.is_main else None
    if holder is not None:  # fail before loading any data; RunLock below decides for certain
        raise MssarError(
            f"{run_dir}: in use by {runs.describe_holder(holder)}; wait for it, or stop it"
        )
    if checkpoint_path.exists() and not resume:
        raise MssarError(
            f"{run_dir}: holds an unfinished run; pass --resume to continue it, "
            "or remove the directory"
        )

    try:
        session = build_session(recipe, recipe.run.seed, device, world)  # data errors surface here
    except MssarError as error:  # name the recipe the data (or subset, batch) came from
        if recipe.source and not str(error).startswith(str(recipe.source)):
            raise type(error)(f"{recipe.source}: {error}") from None
        raise
    note = reporter.note if reporter else None
    lock = runs.RunLock(run_dir, note) if world.is_main else contextlib.nullcontext()
    with lock:
        return _run_epochs(recipe, session, run_dir, resume, reporter)


def _run_epochs(recipe: Recipe, session: Session, run_dir: Path, resume: bool, reporter) -> dict:
    """Restore, then train the remaining epochs, writing CSV rows and checkpoints (main rank)."""
    world, device = session.world, session.device
    checkpoint_path = run_dir / runs.CHECKPOINT
    stored = run_dir / runs.RECIPE
    history: list[dict] = []
    first_epoch = 0
    partial: EpochProgress | None = None
    if resume and checkpoint_path.exists():
        state = runs.load_checkpoint(checkpoint_path, map_location=device)
        restore(session, state)
        history, first_epoch = list(state["history"]), state["epoch"]
        if state.get("partial"):
            partial = EpochProgress(**state["partial"])
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        runs.atomic_write_text(stored, dump(recipe))
        env = runs.environment(device, world.world_size) | {"resumed_from_epoch": first_epoch}
        if partial:
            env["resumed_from_batch"] = partial.batches
        runs.write_json(run_dir / runs.ENV, env)
        if history:
            runs.atomic_write_text(run_dir / runs.CSV, runs.csv_text(history))
    epochs = recipe.optim.epochs
    start = time.perf_counter()
    with stop_requests() as received:
        stop = received.__len__
        if reporter:
            reporter.start(run_dir, session, first_epoch)
        for epoch in range(first_epoch, epochs):
            resume_at = partial if partial and partial.epoch == epoch else None
            if stop():  # asked between two epochs: save the state unless the checkpoint holds it
                on_disk = resume_at is not None or (epoch > 0 and _checkpointed(recipe, epoch))
                _stop(session, run_dir, history, resume_at, received, saved=on_disk)
            lr = session.optimizer.param_groups[0]["lr"]
            on_batch = (lambda *a, e=epoch: reporter.batch(e, *a)) if reporter else None
            row = {"epoch": epoch + 1, "lr": lr}
            try:
                row |= train_one_epoch(
                    session,
                    epoch,
                    on_batch,
                    resume=resume_at,
                    stop=stop,
                    on_compiled=getattr(reporter, "compiled", None),
                )
            except Stopped as stopped:
                _stop(session, run_dir, history, stopped.progress, received, saved=False)
            session.scheduler.step()
            row |= evaluate(
                session.model,
                session.test_loader,
                device,
                session.amp_dtype,
                world,
                recipe.run.channels_last,
            )
            row = {key: row[key] for key in CSV_COLUMNS if key in row}
            if session.info.num_classes <= 10:
                row.pop("test_top5_err", None)
            history.append(row)
            if world.is_main:
                if _checkpointed(recipe, epoch + 1):
                    runs.save_checkpoint(run_dir, checkpoint_state(session, epoch + 1, history))
                runs.atomic_write_text(run_dir / runs.CSV, runs.csv_text(history))
            if reporter:
                reporter.epoch(row)

    summary = make_summary(recipe, session, history, time.perf_counter() - start)
    if world.is_main:
        runs.write_json(run_dir / runs.SUMMARY, summary)
    distributed.barrier(world)
    if reporter:
        reporter.finish(summary)
    return summary


def _checkpointed(recipe: Recipe, epochs_done: int) -> bool:
    """Whether the checkpoint is written after ``epochs_done`` epochs (run.checkpoint_every)."""
    every = recipe.run.checkpoint_every
    return epochs_done % every == 0 or epochs_done == recipe.optim.epochs


# --- stopping on a signal -----------------------------------------------------------------------

# What Slurm sends before preemption or the time limit (SIGTERM, or SIGUSR1 with --signal), and
# Ctrl-C: each becomes a request that training honours after the current batch.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


@contextlib.contextmanager
def stop_requests():
    """Collect stop signals into a list while training runs (main thread only; elsewhere, as in
    a test runner's worker thread, nothing is installed). A second Ctrl-C interrupts at once."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}

    def request(signum, _frame) -> None:
        received.append(signum)
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, previous[signal.SIGINT])

    for sig in STOP_SIGNALS:
        signal.signal(sig, request)
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stop(session, run_dir, history, progress, received, *, saved: bool) -> None:
    """Save where training stopped (inside an epoch: ``progress``), then end the run."""
    epochs_done = len(history)
    if session.world.is_main and not saved:
        state = checkpoint_state(session, epochs_done, history)
        if progress is not None:
            state["partial"] = dataclasses.asdict(progress)
        runs.save_checkpoint(run_dir, state)
    distributed.barrier(session.world)
    signum = received[0]
    if progress is None:
        where = f"after epoch {epochs_done}"
    else:
        total = len(session.train_loader)
        where = f"in epoch {progress.epoch + 1} at batch {progress.batches}/{total}"
    raise RunStopped(
        f"{run_dir}: stopped by {signal.Signals(signum).name} {where}; checkpoint saved, "
        "continue with --resume",
        signum,
    )


def checkpoint_state(session: Session, epoch: int, history: list[dict]) -> dict:
    state = {
        "epoch": epoch,
        "model": session.module.state_dict(),
        "optimizer": session.optimizer.state_dict(),
        "scheduler": session.scheduler.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        "history": history,
        "recipe": session.recipe.to_dict(),
    }
    if torch.cuda.is_available():
        state["rng"]["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore(session: Session, state: dict) -> None:
    session.module.load_state_dict(state["model"])
    session.optimizer.load_state_dict(state["optimizer"])
    session.scheduler.load_state_dict(state["scheduler"])
    rng = state.get("rng", {})
    if "torch" in rng:
        torch.set_rng_state(rng["torch"].cpu())
    if "python" in rng:
        random.setstate(rng["python"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])


def _flops(recipe: Recipe, session: Session) -> int:
    """MACs per image of the trained network (ptflops aten backend), counted on the same network
    built in its direct form (:func:`mssar_cli.complexity.measure`)."""
    from mssar_cli.complexity import measure

    info = session.info
    return measure(
        recipe.model.name,
        recipe.model.recalibration,
        info.num_classes,
        in_channels=info.in_channels,
        input_size=info.image_size,
        **recipe.module_options(),
    ).flops


def make_summary(recipe: Recipe, session: Session, history: list[dict], seconds: float) -> dict:
    final = history[-1]
    best = min(history, key=lambda row: row["test_err"])
    return {
        "status": "finished",
        "experiment": recipe.experiment,
        "dataset": recipe.data.dataset,
        "model": recipe.model.name,
        "recalibration": recipe.model.recalibration,
        "seed": recipe.run.seed,
        "epochs": len(history),
        "final": {
            k: v for k, v in final.items() if k not in ("lr", "epoch_seconds", "images_per_s")
        },
        "best_epoch_not_reported": {"epoch": best["epoch"], "test_err": best["test_err"]},
        "params": sum(p.numel() for p in session.module.parameters()),
        "flops": _flops(recipe, session),
        "train_images": session.train_loader.num_samples * session.world.world_size,
        "test_images": session.info.test_size,
        "seconds_this_session": round(seconds, 2),
        "total_epoch_seconds": round(sum(r["epoch_seconds"] for r in history), 2),
        "device": str(session.device),
        "world_size": session.world.world_size,
    }

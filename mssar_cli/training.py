"""One training run, end to end: run directory, resume, epochs, CSV, checkpoints, summary.

The reported number is the error of the **final** epoch (SPEC.md §4); the best epoch is kept in
the summary only under a name that says what it is.
"""

from __future__ import annotations

import dataclasses
import random
import time
from pathlib import Path
from typing import Protocol

import torch

from mssar_cli import distributed, runs
from mssar_cli.engine import Session, build_session, evaluate, resolve_device, train_one_epoch
from mssar_cli.errors import MssarError
from mssar_cli.recipe import Recipe, dump

CSV_COLUMNS = ("epoch", "lr", "train_loss", "train_err", "test_loss", "test_err", "test_top5_err", "epoch_seconds", "images_per_s")


class Reporter(Protocol):
    def start(self, run_dir: Path, session: Session, first_epoch: int) -> None: ...
    def batch(self, epoch: int, done: int, total: int, loss: float, err: float, images_per_s: float) -> None: ...
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


def _train(recipe: Recipe, device: torch.device, world: distributed.World, resume: bool, reporter) -> dict:
    run_dir = recipe.run_dir()
    checkpoint_path = run_dir / runs.CHECKPOINT
    stored = run_dir / runs.RECIPE
    if stored.exists():
        import yaml

        differences = runs.recipe_differences(yaml.safe_load(stored.read_text()) or {}, recipe.to_dict())
        if differences:
            raise MssarError(
                f"{run_dir}: holds a run of a different recipe (differs in {', '.join(differences)}); "
                "change the experiment name or remove the directory"
            )
    if runs.is_finished(run_dir):
        summary = runs.read_json(run_dir / runs.SUMMARY)
        if reporter:
            reporter.note(f"{run_dir} is already finished (test error {summary['final']['test_err']:.2f}%); nothing to do")
        return summary | {"already_finished": True}
    if checkpoint_path.exists() and not resume:
        raise MssarError(
            f"{run_dir}: holds an unfinished run; pass --resume to continue it, or remove the directory"
        )

    try:
        session = build_session(recipe, recipe.run.seed, device, world)  # data errors surface here
    except MssarError as error:  # name the recipe the data (or subset, batch) came from
        if recipe.source and not str(error).startswith(str(recipe.source)):
            raise type(error)(f"{recipe.source}: {error}") from None
        raise
    history: list[dict] = []
    first_epoch = 0
    if resume and checkpoint_path.exists():
        state = runs.load_checkpoint(checkpoint_path, map_location=device)
        restore(session, state)
        history, first_epoch = list(state["history"]), state["epoch"]
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        runs.atomic_write_text(stored, dump(recipe))
        env = runs.environment(device, world.world_size) | {"resumed_from_epoch": first_epoch}
        runs.write_json(run_dir / runs.ENV, env)
        if history:
            runs.atomic_write_text(run_dir / runs.CSV, runs.csv_text(history))
    if reporter:
        reporter.start(run_dir, session, first_epoch)

    epochs = recipe.optim.epochs
    start = time.perf_counter()
    for epoch in range(first_epoch, epochs):
        lr = session.optimizer.param_groups[0]["lr"]
        on_batch = (lambda *a, e=epoch: reporter.batch(e, *a)) if reporter else None
        row = {"epoch": epoch + 1, "lr": lr}
        row |= train_one_epoch(session, epoch, on_batch)
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
        last = epoch + 1 == epochs
        if world.is_main:
            if (epoch + 1) % recipe.run.checkpoint_every == 0 or last:
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


def _flops(session: Session) -> int:
    """MACs per image of the trained network (ptflops aten backend, on a CPU copy)."""
    import copy

    from mssar_cli.complexity import count_flops

    model = copy.deepcopy(session.module).cpu().float().to(memory_format=torch.contiguous_format)
    return count_flops(model, session.info.image_size, session.info.in_channels)


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
        "final": {k: v for k, v in final.items() if k not in ("lr", "epoch_seconds", "images_per_s")},
        "best_epoch_not_reported": {"epoch": best["epoch"], "test_err": best["test_err"]},
        "params": sum(p.numel() for p in session.module.parameters()),
        "flops": _flops(session),
        "train_images": session.train_loader.num_samples * session.world.world_size,
        "test_images": session.info.test_size,
        "seconds_this_session": round(seconds, 2),
        "total_epoch_seconds": round(sum(r["epoch_seconds"] for r in history), 2),
        "device": str(session.device),
        "world_size": session.world.world_size,
    }


def evaluate_saved(path: Path, overrides: list[str], device_name: str | None = None) -> dict:
    """Re-evaluate a run directory's (or a checkpoint file's) model on the test split.

    The model is rebuilt from the recipe stored in the checkpoint; ``overrides`` (``--set``)
    may point ``data.root`` elsewhere. Returns the errors and, when the checkpoint holds a
    history, the final CSV row's errors to compare with.
    """
    from mssar_cli.data import build_test_loader
    from mssar_cli.engine import build_model, data_spec, resolve_precision
    from mssar_cli.recipe import apply_override, from_dict

    path = Path(path)
    checkpoint = path / runs.CHECKPOINT if path.is_dir() else path
    if not checkpoint.exists():
        where = f"{path} has no {runs.CHECKPOINT}" if path.is_dir() else f"{path}: no such file"
        raise MssarError(f"{where}; expected a run directory or a checkpoint written by mssar train")
    state = runs.load_checkpoint(checkpoint)
    if not isinstance(state, dict) or "recipe" not in state or "model" not in state:
        raise MssarError(f"{checkpoint}: not an mssar checkpoint (no recipe or model inside)")
    raw = dict(state["recipe"])
    for item in overrides:
        apply_override(raw, item, str(checkpoint))
    recipe = from_dict(raw, str(checkpoint))
    device = resolve_device(device_name or recipe.run.device)
    loader, info = build_test_loader(data_spec(recipe), device=device)
    model = build_model(recipe, info).to(device)
    model.load_state_dict(state["model"])
    if recipe.run.channels_last:
        model = model.to(memory_format=torch.channels_last)
    result = evaluate(model, loader, device, resolve_precision(recipe.run.precision, device), None, recipe.run.channels_last)
    if info.num_classes <= 10:
        result.pop("test_top5_err")
    history = state.get("history") or []
    return {
        "checkpoint": str(checkpoint),
        "epoch": state.get("epoch"),
        "experiment": recipe.experiment,
        "dataset": recipe.data.dataset,
        "test_images": info.test_size,
        **result,
        "logged": {k: history[-1][k] for k in ("test_loss", "test_err", "test_top5_err") if history and k in history[-1]},
    }

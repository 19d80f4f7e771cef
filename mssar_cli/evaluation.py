"""Re-evaluating a saved run: rebuild its model from the recipe inside its checkpoint.

``mssar eval RUN_DIR|CHECKPOINT`` uses it to check a run's reported number (the final epoch's
test error, SPEC.md §4) against its ``epochs.csv``; whatever reads a trained model (``mssar
show``) starts from :func:`read_saved_run`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mssar_cli import runs
from mssar_cli.errors import MssarError
from mssar_cli.recipe import Recipe, from_dict, with_overrides


@dataclass(frozen=True)
class SavedRun:
    checkpoint: Path
    state: dict  # what training saved: model, optimizer, history, recipe, ...
    recipe: Recipe  # the recipe the run was trained with (plus any --set overrides)


def read_saved_run(path: Path, overrides: list[str] | tuple[str, ...] = ()) -> SavedRun:
    """The checkpoint of a run directory (or a checkpoint file) and its validated recipe.

    ``overrides`` (``--set``) may point ``data.root`` elsewhere. Raises :class:`MssarError` for a
    directory without a checkpoint or a file that is not an mssar checkpoint.
    """
    path = Path(path)
    checkpoint = path / runs.CHECKPOINT if path.is_dir() else path
    if not checkpoint.exists():
        where = f"{path} has no {runs.CHECKPOINT}" if path.is_dir() else f"{path}: no such file"
        raise MssarError(
            f"{where}; expected a run directory or a checkpoint written by mssar train"
        )
    state = runs.load_checkpoint(checkpoint)
    if not isinstance(state, dict) or "recipe" not in state or "model" not in state:
        raise MssarError(f"{checkpoint}: not an mssar checkpoint (no recipe or model inside)")
    stored = from_dict(dict(state["recipe"]), str(checkpoint))
    return SavedRun(checkpoint, state, with_overrides(stored, list(overrides)))


def evaluate_saved(path: Path, overrides: list[str], device_name: str | None = None) -> dict:
    """Re-evaluate a run directory's (or a checkpoint file's) model on the test split.

    Returns the errors and, when the checkpoint holds a history, the final CSV row's errors to
    compare with.
    """
    from mssar_cli.data import build_test_loader
    from mssar_cli.engine import build_model, evaluate, resolve_device, resolve_precision

    saved = read_saved_run(path, overrides)
    recipe = saved.recipe
    device = resolve_device(device_name or recipe.run.device)
    loader, info = build_test_loader(recipe.data, device=device)
    model = build_model(recipe, info).to(device)
    try:
        model.load_state_dict(saved.state["model"])
    except (RuntimeError, TypeError) as error:  # weights of another layout, or not weights
        detail = " ".join(str(error).split())[:200]
        raise MssarError(
            f"{saved.checkpoint}: its weights do not fit its recipe's network ({detail})"
        ) from None
    if recipe.run.channels_last:
        model = model.to(memory_format=torch.channels_last)
    precision = resolve_precision(recipe.run.precision, device)
    result = evaluate(model, loader, device, precision, None, recipe.run.channels_last)
    if info.num_classes <= 10:
        result.pop("test_top5_err")
    history = saved.state.get("history") or []
    logged = history[-1] if history else {}
    return {
        "checkpoint": str(saved.checkpoint),
        "epoch": saved.state.get("epoch"),
        "experiment": recipe.experiment,
        "dataset": recipe.data.dataset,
        "test_images": info.test_size,
        **result,
        "logged": {k: logged[k] for k in ("test_loss", "test_err", "test_top5_err") if k in logged},
    }

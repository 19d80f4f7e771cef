"""``mssar show RUN_DIR``: pictures of what a trained network's recalibration gates learned.

For the first ``images`` test images (fixed order, no augmentation) it writes, into ``output``
(default ``RUN_DIR/show``):

* ``stage<i>.png`` per stage: the images and one block's gates (:mod:`mssar_cli.gate_figures`);
* ``asymmetry.png`` and ``asymmetry.csv``: every stage's spatial asymmetry, the standard
  deviation of a weight over the positions of its map, averaged over channels, images and the
  stage's blocks (:mod:`mssar_cli.gates`).

MS-SAR (paper §3.2), CBAM, Gather-Excite and Coordinate Attention have gates that vary over
positions. SE, ECA and GC give every position of a channel the same weight (GC the same added
vector): for them there is nothing spatial to draw, and ``show`` says so and writes nothing. A
plain network, a directory without a checkpoint, a ``--checkpoint`` of another network than the
run directory's or an ``--output`` that cannot be written is a user error (one line, exit code
2), found before anything is written; every file is rendered before the first is written, and
they are written all or none (each to a temporary file first, then all renamed into place).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from mssar_cli import runs
from mssar_cli.errors import MssarError
from mssar_cli.evaluation import read_saved_run
from mssar_cli.gate_figures import asymmetry_figure, stage_figure
from mssar_cli.gates import Stage, record_gates
from mssar_cli.models import model_spec
from mssar_cli.recalibration import PLAIN
from mssar_cli.recalibration import get as get_recalibration
from mssar_cli.recipe import Recipe
from mssar_cli.recipe import load as load_recipe

CLASS_NAMES = {
    "fashion-mnist": (
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ),
    "cifar10": (
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ),
}
OUTPUT = "show"
ASYMMETRY_PNG, ASYMMETRY_CSV = "asymmetry.png", "asymmetry.csv"


@dataclass
class ShowResult:
    title: str
    note: str | None = None  # why nothing was drawn (a module whose gate is spatially constant)
    stages: list[Stage] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)


def _network_differences(ours: Recipe, theirs: Recipe) -> list[str]:
    """The recipe keys that make ``theirs`` another network than ``ours``: the model section,
    and the dataset (it sets the input channels and the classes, and what the gates were
    trained on)."""
    differences = [
        f"model.{key}: {getattr(theirs.model, key)!r} vs {getattr(ours.model, key)!r}"
        for key in ours.model.__dataclass_fields__
        if getattr(ours.model, key) != getattr(theirs.model, key)
    ]
    if ours.data.dataset != theirs.data.dataset:
        differences.append(f"data.dataset: {theirs.data.dataset!r} vs {ours.data.dataset!r}")
    return differences


def _saved_run(path: Path, checkpoint: Path | None, overrides: list[str]):
    """The checkpoint to draw and its recipe; with ``checkpoint``, checked against ``path``'s."""
    if checkpoint is None:
        return read_saved_run(path, overrides)
    if not path.is_dir():
        raise MssarError(f"--checkpoint goes with a run directory, and {path} is not one")
    saved = read_saved_run(checkpoint, overrides)
    differences = _network_differences(load_recipe(path / runs.RECIPE), saved.recipe)
    if differences:
        raise MssarError(
            f"{checkpoint} is not a checkpoint of {path}'s network ({'; '.join(differences)})"
        )
    return saved


def _check_output(folder: Path) -> None:
    """Refuse, before any work, an ``--output`` that cannot become a directory of ours."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise MssarError(f"--output {folder}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise MssarError(f"--output {folder}: {existing} is not writable")


def _write_all(folder: Path, files: dict[str, bytes]) -> list[Path]:
    """Write every file or none of them: each is first written whole (and synced) to a temporary
    file beside its target, and only then are they all renamed into place, so a full disk or a
    refused write leaves the previous pictures (or no folder) as they were, never a mix."""
    created = [p for p in (folder, *folder.parents) if not p.exists()]  # innermost first
    staged: dict[Path, str] = {}
    mask = os.umask(0)
    os.umask(mask)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            fd, temporary = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
            staged[folder / name] = temporary
            os.fchmod(fd, 0o666 & ~mask)  # mkstemp's 0600 would make the figures private
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        for target, temporary in staged.items():
            os.replace(temporary, target)
    except BaseException as error:
        for temporary in staged.values():
            Path(temporary).unlink(missing_ok=True)
        for directory in created:  # only the folders made here, and only when left empty
            try:
                directory.rmdir()
            except OSError:
                break
        if isinstance(error, OSError):
            reason = error.strerror or type(error).__name__
            raise MssarError(f"--output {folder}: cannot write the figures ({reason})") from None
        raise
    return list(staged)


def _first_images(loader, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels, held = [], [], 0
    for x, y in loader:
        images.append(x[: count - held])
        labels.append(y[: count - held])
        held += len(images[-1])
        if held == count:
            break
    return torch.cat(images), torch.cat(labels)


def _trained_for(state: dict) -> str:
    """How far training got: a run stopped inside an epoch saved the weights of that epoch's
    first batches, past the finished epochs its ``epoch`` counts."""
    when = f"epoch {state.get('epoch')}"
    partial = state.get("partial")
    if isinstance(partial, dict) and "batches" in partial:
        when += f" and {partial['batches']} batches"
    return when


def _caption(dataset: str, label: int, predicted: int) -> str:
    names = CLASS_NAMES.get(dataset)
    name = names.__getitem__ if names else lambda i: f"class {i}"
    mark = "" if label == predicted else " (wrong)"
    return f"{name(label)}\n-> {name(predicted)}{mark}"


def _asymmetry_table(stages: list[Stage]) -> pd.DataFrame:
    rows = [
        {
            "stage": stage.index,
            "map": f"{stage.size[0]}x{stage.size[1]}",
            "blocks": len(stage.modules),
            "gate": label,
            "asymmetry": value,
        }
        for stage in stages
        for label, value in stage.asymmetry().items()
    ]
    return pd.DataFrame(rows)


def show(
    path: Path,
    *,
    output: Path | None = None,
    images: int = 8,
    block: int = -1,
    channels: int = 3,
    checkpoint: Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    device: str | None = None,
) -> ShowResult:
    """Draw the gates of the run at ``path`` (a run directory or a checkpoint file)."""
    from mssar_cli.data import build_test_loader
    from mssar_cli.data.formats import NORMALISATION
    from mssar_cli.engine import build_model, resolve_device

    path = Path(path)
    saved = _saved_run(path, checkpoint, list(overrides))
    recipe = saved.recipe
    entry = get_recalibration(recipe.model.recalibration)
    title = (
        f"{recipe.experiment}: {model_spec(recipe.model.name).label} with {entry.label} on "
        f"{recipe.data.dataset}, {_trained_for(saved.state)}"
    )
    if entry.name == PLAIN:
        raise MssarError(
            f"{saved.checkpoint} is a plain {recipe.model.name} (recalibration: none): it has no "
            "gates to show"
        )
    # options first: a bad one is an error even where there is nothing to draw
    for option, value, low in (("--images", images, 1), ("--channels", channels, 0)):
        if value < low:
            raise MssarError(f"{option} must be at least {low}, got {value}")
    # RUN_DIR/show, also with --checkpoint (the figures belong to the run directory asked about)
    run_dir = path if path.is_dir() else saved.checkpoint.parent
    folder = Path(output) if output is not None else run_dir / OUTPUT
    _check_output(folder)
    if not entry.spatial:
        added = " (GC adds one vector to every position)" if entry.name == "gc" else ""
        note = (
            f"{entry.label}'s gate is spatially constant: one weight per channel, the same at "
            f"every position{added}, so there is nothing spatial to draw; nothing written"
        )
        return ShowResult(title, note=note)

    torch_device = resolve_device(device or recipe.run.device)
    loader, info = build_test_loader(recipe.data, device=torch_device)
    if images > info.test_size:
        raise MssarError(f"--images {images}: the test split has {info.test_size} images")
    model = build_model(recipe, info).to(torch_device)
    try:
        model.load_state_dict(saved.state["model"])
    except (RuntimeError, TypeError) as error:
        # torch's first line only names the class; the next one names the keys that do not fit
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        detail = " ".join(lines[1:2] or lines[:1])
        detail = detail if len(detail) <= 200 else detail[:197] + "..."
        raise MssarError(
            f"{saved.checkpoint}: its weights do not fit its recipe's network ({detail})"
        ) from None
    x, labels = _first_images(loader, images)
    stages, logits = record_gates(model, x, channels)
    for stage in stages:
        if not -len(stage.modules) <= block < len(stage.modules):
            raise MssarError(
                f"--block {block}: stage {stage.index} has {len(stage.modules)} blocks "
                f"(use 0..{len(stage.modules) - 1}, or -1 for the last)"
            )

    mean, std = NORMALISATION[recipe.data.dataset]
    shown = x.float().cpu() * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    predicted = logits.argmax(1).tolist()
    captions = [_caption(recipe.data.dataset, int(t), p) for t, p in zip(labels, predicted)]
    rendered = {
        f"stage{stage.index}.png": stage_figure(stage, block, shown, captions, title)
        for stage in stages
    }
    rendered[ASYMMETRY_PNG] = asymmetry_figure(stages, f"{title}: spatial asymmetry of the gates")
    rendered[ASYMMETRY_CSV] = _asymmetry_table(stages).to_csv(index=False).encode()

    return ShowResult(title, stages=stages, files=_write_all(folder, rendered))

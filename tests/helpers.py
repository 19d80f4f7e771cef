"""Helpers shared by the test files: the one-line error contract, tiny datasets in their exact
on-disk formats (CIFAR and ImageNet cannot be downloaded here) and the loaders over them, the
MS-SAR modules' test grid, inputs and gradient comparisons, the networks' families built on the
meta device, and run directories as `mssar train` leaves them (for the report)."""

from __future__ import annotations

import functools
import json
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from torch import nn

from mssar_cli.data import NORMALISATION, build_loaders
from mssar_cli.models import create_model
from mssar_cli.recalibration.mssar import MSSAR, ScaleBranch
from mssar_cli.recalibration.se import SqueezeExcitation
from mssar_cli.recipe import DataSection


def assert_one_error_line(stderr: str, *must: str) -> str:
    """A user error: exactly one line on stderr, ``mssar: error: ...``, no traceback."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("mssar: error: "), stderr
    assert "Traceback" not in stderr
    for text in must:
        assert text in lines[0], lines[0]
    return lines[0]


def assert_one_line_error(result, *fragments: str) -> str:
    """The same for a ``CliRunner`` result: exit code 2 and nothing on stdout."""
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    return assert_one_error_line(result.stderr, *fragments)


def pickle_to(path: Path, entry: dict) -> None:
    """A protocol-2 pickle with str keys: what the release's files give under encoding="latin1"."""
    with open(path, "wb") as handle:
        pickle.dump(entry, handle, protocol=2)


def as_chw(rows: np.ndarray) -> torch.Tensor:
    """N x 3072 release rows (R plane, G plane, B plane) as N x 3 x 32 x 32."""
    return torch.from_numpy(rows.reshape(-1, 3, 32, 32).copy())


def write_cifar10(root: Path, per_batch: int = 6, test: int = 5, seed: int = 0):
    """``root/cifar-10-batches-py`` as the release has it; returns the (images, labels) written."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    train_x, train_y = [], []
    for i in range(1, 6):
        x = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        y = rng.integers(0, 10, per_batch).tolist()
        entry = {
            "batch_label": f"training batch {i} of 5",
            "labels": y,
            "data": x,
            "filenames": [f"img_{i}_{j}.png" for j in range(per_batch)],
        }
        pickle_to(folder / f"data_batch_{i}", entry)
        train_x.append(x)
        train_y += y
    test_x = rng.integers(0, 256, (test, 3072), dtype=np.uint8)
    test_y = rng.integers(0, 10, test).tolist()
    pickle_to(
        folder / "test_batch",
        {"batch_label": "testing batch 1 of 1", "labels": test_y, "data": test_x},
    )
    pickle_to(
        folder / "batches.meta", {"label_names": [f"c{i}" for i in range(10)], "num_vis": 3072}
    )
    return (
        (as_chw(np.concatenate(train_x)), torch.tensor(train_y)),
        (as_chw(test_x), torch.tensor(test_y)),
    )


# --- loaders: the recipe's data section and what the loaders yield ----------------------------

CPU = torch.device("cpu")


def normalise(images_uint8: torch.Tensor, dataset: str) -> torch.Tensor:
    mean, std = NORMALISATION[dataset]
    mean = torch.tensor(mean).view(1, -1, 1, 1)
    std = torch.tensor(std).view(1, -1, 1, 1)
    return (images_uint8.float() / 255 - mean) / std


def collect(loader) -> tuple[torch.Tensor, torch.Tensor]:
    batches = list(loader)
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def spec(dataset: str, root: Path, **kwargs) -> DataSection:
    """The recipe's ``data:`` section for ``dataset`` under ``root``."""
    return DataSection(dataset, root=str(root), **kwargs)


def loaders(section: DataSection, **kwargs):
    """``build_loaders`` with ``section.batch_size`` as this rank's training batch (unless
    ``batch_size`` is given): the engine's per-rank share when there is one process."""
    kwargs.setdefault("batch_size", section.batch_size)
    return build_loaders(section, **kwargs)


# --- MS-SAR modules: the test grid, inputs and gradients --------------------------------------

SCALE_SETS = [(1,), (2,), (4,), (1, 2), (1, 4), (2, 4), (1, 2, 4), (1, 3)]
STRATEGIES = ["regional", "sliding"]
CHANNELS, SOURCE_CHANNELS = 8, 12


def scale_id(scales) -> str:
    return "L" + "-".join(map(str, scales))


def size_id(size) -> str:
    return f"{size[0]}x{size[1]}"


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def randomize_bn(module: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN affine parameters and running statistics (default ones are the identity)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in (m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
            n = bn.num_features
            bn.weight.copy_(0.5 + torch.rand(n, generator=gen))
            bn.bias.copy_(0.3 * torch.randn(n, generator=gen))
            bn.running_mean.copy_(0.2 * torch.randn(n, generator=gen))
            bn.running_var.copy_(0.5 + torch.rand(n, generator=gen))
    return module


def make_inputs(n, channels, height, width, source_channels=None, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, height, width, generator=gen, dtype=dtype)
    source = None
    if source_channels is not None:
        source = torch.randn(n, source_channels, height, width, generator=gen, dtype=dtype)
    return x, source


def forward_backward(m, x, source, upstream):
    x = x.clone().requires_grad_(True)
    source = None if source is None else source.clone().requires_grad_(True)
    m.zero_grad(set_to_none=True)
    out = m(x, source)
    (out * upstream).sum().backward()
    grads = {"out": out.detach(), "x": x.grad}
    if source is not None:
        grads["source"] = source.grad
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        grads[f"param:{name}"] = p.grad
    for name, b in m.named_buffers():
        grads[f"buffer:{name}"] = b.detach().clone()
    return grads


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    denom = torch.linalg.vector_norm(b)
    if denom == 0:
        return float(torch.linalg.vector_norm(a))
    return float(torch.linalg.vector_norm(a - b) / denom)


def flat(grads: dict, keys: list[str]) -> torch.Tensor:
    """The gradients of ``keys`` as one vector (the parameter gradient the optimizer sees)."""
    return torch.cat([grads[key].flatten() for key in keys])


# --- networks: the paper's families and their structure on the meta device --------------------

NUM_CLASSES = 7  # not a default of any family, so the classifier width is really passed through
CIFAR_RESNETS = ["resnet20", "resnet32", "resnet56"]
IMAGENET = ["resnet18", "resnet34", "resnet50", "resnext50"]  # resnet50: not in the paper
DENSENETS = ["densenet100", "densenet190"]
# residual blocks / dense layers: one recalibration module each (SPEC.md §2)
UNITS = {
    "resnet20": 9,
    "resnet32": 15,
    "resnet56": 27,
    "densenet100": 48,
    "densenet190": 93,
    "resnet18": 8,
    "resnet34": 16,
    "resnet50": 16,
    "resnext50": 16,
}


def recalibration_modules(model: nn.Module, kind: str) -> list[nn.Module]:
    cls = {"se": SqueezeExcitation, "mssar": MSSAR}[kind]
    return [m for m in model.modules() if isinstance(m, cls)]


def any_recalibration(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (MSSAR, SqueezeExcitation, ScaleBranch))]


def build_meta(name: str, recalibration: str = "none", **options) -> nn.Module:
    """Structure only: parameters on the meta device (no memory, no initialisation cost).

    Cached, since several tests inspect the same network: callers must not modify it."""
    return _build_meta(name, recalibration, tuple(sorted(options.items())))


@functools.cache
def _build_meta(name: str, recalibration: str, options: tuple) -> nn.Module:
    with torch.device("meta"):
        return create_model(
            name, num_classes=NUM_CLASSES, recalibration=recalibration, **dict(options)
        )


# --- run directories as `mssar train` leaves them ---------------------------------------------


def write_run(
    root: Path,
    dataset: str,
    experiment: str,
    seed: int,
    *,
    model: str = "resnet20",
    recalibration: str = "none",
    scales: list[int] | None = None,
    strategy: str | None = None,
    reduction: float | None = None,
    stage: str | None = None,
    epochs: int = 4,
    done: int | None = None,
    final_err: float = 10.0,
    subset: int | None = None,
    batch_size: int = 128,
    milestones: list[int] | None = None,
    params: int = 272_474,
    flops: int | None = 40_810_000,
    top5: bool | None = None,
) -> Path:
    """A run directory as `mssar train` leaves it; ``done < epochs`` leaves it unfinished."""
    done = epochs if done is None else done
    top5 = dataset in ("cifar100", "imagenet") if top5 is None else top5
    run_dir = root / dataset.replace("-", "_") / experiment / f"seed{seed}"
    run_dir.mkdir(parents=True)
    recipe = {
        "experiment": experiment,
        "model": {
            "name": model,
            "recalibration": recalibration,
            "scales": scales,
            "strategy": strategy,
            "reduction": reduction,
            "stage": stage,
        },
        "data": {
            "dataset": dataset,
            "root": "data",
            "batch_size": batch_size,
            "eval_batch_size": 512,
            "augment": True,
            "subset": subset,
            "test_subset": None,
            "workers": 4,
            "download": False,
        },
        "optim": {
            "lr": 0.1,
            "momentum": 0.9,
            "nesterov": True,
            "weight_decay": 1e-4,
            "epochs": epochs,
            "milestones": milestones if milestones is not None else [max(1, epochs // 2)],
            "gamma": 0.1,
        },
        "run": {
            "seed": seed,
            "device": "cpu",
            "precision": "auto",
            "channels_last": False,
            "compile": False,
            "output": str(root),
            "checkpoint_every": 1,
            "threads": None,
        },
    }
    (run_dir / "recipe.yaml").write_text(
        yaml.safe_dump(recipe, sort_keys=False, default_flow_style=None)
    )
    rows = []
    for epoch in range(1, done + 1):
        t = epoch / epochs
        test_err = final_err + (80 - final_err) * (1 - t) ** 2
        row = {
            "epoch": epoch,
            "lr": 0.1,
            "train_loss": 2.3 * (1 - t) + 0.1,
            "train_err": max(0.0, test_err - 3),
            "test_loss": 2.3 * (1 - t) + 0.3,
            "test_err": test_err,
        }
        if top5:
            row["test_top5_err"] = test_err / 3
        rows.append(row | {"epoch_seconds": 1.0, "images_per_s": 1000.0})
    if rows:
        pd.DataFrame(rows).to_csv(run_dir / "epochs.csv", index=False)
    if done == epochs:
        final = {
            k: v for k, v in rows[-1].items() if k not in ("lr", "epoch_seconds", "images_per_s")
        }
        summary = {
            "status": "finished",
            "experiment": experiment,
            "dataset": dataset,
            "model": model,
            "recalibration": recalibration,
            "seed": seed,
            "epochs": epochs,
            "final": final,
            "best_epoch_not_reported": {"epoch": 1, "test_err": 0.0},
            "params": params,
        }
        if flops is not None:
            summary["flops"] = flops
        (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


def table(tables, start: str):
    matches = [t for t in tables if t.title.startswith(start)]
    assert matches, f"no table {start!r} in {[t.title for t in tables]}"
    return matches[0]


def row_of(frame: pd.DataFrame, **where) -> pd.Series:
    mask = pd.Series(True, index=frame.index)
    for key, value in where.items():
        mask &= frame[key] == value
    assert mask.sum() == 1, f"{where}: {mask.sum()} rows in\n{frame}"
    return frame[mask].iloc[0]

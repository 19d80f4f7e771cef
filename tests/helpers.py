"""Helpers shared by the test files: the one-line error contract and tiny datasets in their
exact on-disk formats (CIFAR and ImageNet cannot be downloaded here)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch


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

"""Fixtures shared by the test files."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "recipes" / "smoke.yaml"


@pytest.fixture
def smoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of recipes/smoke.yaml in an empty working directory (runs land in ./results)."""
    monkeypatch.chdir(tmp_path)
    shutil.copy(SMOKE, tmp_path / "smoke.yaml")
    return tmp_path / "smoke.yaml"


@pytest.fixture(scope="module")
def one_thread():
    """The CPU is shared: with two intra-op threads on a busy machine, every parallel region
    waits for a descheduled thread, and one thread is faster than fighting for two."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def cifar10(tmp_path: Path):
    """``tmp_path`` with a tiny CIFAR-10 in the release's format, and the (images, labels) of its
    training and test splits (``helpers.write_cifar10``)."""
    from helpers import write_cifar10

    return tmp_path, write_cifar10(tmp_path)

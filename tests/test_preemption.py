"""Preemption-safe runs: SIGTERM / SIGUSR1 / Ctrl-C stop training after the current batch, save
a checkpoint there (inside the epoch), and ``--resume`` ends bitwise where an uninterrupted run
ends (on the CPU, one thread)."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mssar_cli import recipe as recipes
from mssar_cli import runs
from mssar_cli.errors import RunStopped
from mssar_cli.training import train

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "recipes" / "smoke.yaml"
# 16 batches an epoch, 3 epochs, one lr step: small, single-threaded (bitwise repeatable)
SETS = [
    "data.subset=256",
    "data.batch_size=16",
    "data.test_subset=64",
    "optim.epochs=3",
    "optim.milestones=[2]",
    "run.device=cpu",
    "run.threads=1",
]
TIMING = ("epoch_seconds", "images_per_s")


class SignalAt:
    """A reporter that sends ``signum`` to this process at (epoch, batch): the real signal path."""

    def __init__(self, epoch: int, batch: int, signum: int = signal.SIGTERM) -> None:
        self.at, self.signum, self.notes = (epoch, batch), signum, []

    def start(self, *args) -> None:
        if self.at == ("start", None):
            os.kill(os.getpid(), self.signum)

    def epoch(self, row) -> None: ...
    def finish(self, summary) -> None: ...

    def note(self, text: str) -> None:
        self.notes.append(text)

    def batch(self, epoch, done, total, loss, err, images_per_s) -> None:
        if (epoch, done) == self.at:
            os.kill(os.getpid(), self.signum)


def rows(run_dir: Path) -> list[dict]:
    with open(run_dir / runs.CSV, newline="") as handle:
        return [{k: v for k, v in r.items() if k not in TIMING} for r in csv.DictReader(handle)]


def load(output: Path) -> recipes.Recipe:
    return recipes.load(SMOKE, [*SETS, f"run.output={output}"])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    recipe = load(tmp_path_factory.mktemp("a"))
    train(recipe)
    return recipe.run_dir()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_a_signal_inside_an_epoch_saves_there_and_resume_is_bitwise(
    tmp_path, uninterrupted, signum
):
    recipe = load(tmp_path)
    with pytest.raises(RunStopped) as info:
        train(recipe, reporter=SignalAt(epoch=1, batch=10, signum=signum))
    name = signal.Signals(signum).name
    assert str(info.value) == (
        f"{recipe.run_dir()}: stopped by {name} in epoch 2 at batch 10/16; checkpoint saved, "
        "continue with --resume"
    )
    assert info.value.exit_code == 128 + signum
    assert signal.getsignal(signum) is not None  # handlers restored
    state = runs.load_checkpoint(recipe.run_dir() / runs.CHECKPOINT)
    assert state["epoch"] == 1 and state["partial"]["batches"] == 10
    assert len(rows(recipe.run_dir())) == 1  # the CSV holds finished epochs only
    assert not (recipe.run_dir() / runs.LOCK).exists()

    summary = train(recipe, resume=True)
    assert summary["epochs"] == 3
    assert rows(recipe.run_dir()) == rows(uninterrupted)  # every loss and error, bitwise
    mine = runs.load_checkpoint(recipe.run_dir() / runs.CHECKPOINT)["model"]
    theirs = runs.load_checkpoint(uninterrupted / runs.CHECKPOINT)["model"]
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)


def test_a_signal_between_epochs_stops_before_the_next(tmp_path, uninterrupted):
    """Asked during the last batch (the epoch still ends: evaluation, CSV row, checkpoint), the
    run stops before the next epoch; with checkpoint_every=2 it saves the epoch it ended."""
    recipe = recipes.with_overrides(load(tmp_path), ["run.checkpoint_every=2"])
    with pytest.raises(RunStopped, match=r"stopped by SIGTERM after epoch 1; checkpoint saved"):
        train(recipe, reporter=SignalAt(epoch=0, batch=16))
    assert runs.load_checkpoint(recipe.run_dir() / runs.CHECKPOINT)["epoch"] == 1
    train(recipe, resume=True)
    assert rows(recipe.run_dir()) == rows(uninterrupted)


def test_a_stop_before_the_resumed_epoch_trains_keeps_the_partial_checkpoint(
    tmp_path, uninterrupted
):
    recipe = load(tmp_path)
    with pytest.raises(RunStopped):
        train(recipe, reporter=SignalAt(epoch=1, batch=10))
    saved = (recipe.run_dir() / runs.CHECKPOINT).read_bytes()
    with pytest.raises(RunStopped, match="in epoch 2 at batch 10/16; checkpoint saved"):
        train(recipe, resume=True, reporter=SignalAt(epoch="start", batch=None))
    assert (recipe.run_dir() / runs.CHECKPOINT).read_bytes() == saved  # it already held it all
    train(recipe, resume=True)
    assert rows(recipe.run_dir()) == rows(uninterrupted)


def test_sigterm_from_outside_is_one_line_and_resumes(tmp_path):
    """What Slurm does before preemption: SIGTERM to the process; one line, exit 143."""
    args = [sys.executable, "-m", "mssar_cli", "train", str(SMOKE), "--quiet"]
    for item in [*SETS, "optim.epochs=6", "optim.milestones=[3]"]:
        args += ["--set", item]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        args, cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    csv_path = tmp_path / "results" / "synthetic" / "smoke" / "seed0" / runs.CSV
    deadline = time.monotonic() + 240
    while not (csv_path.exists() and csv_path.read_text().count("\n") >= 2):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith("mssar: results/synthetic/smoke/seed0: stopped by SIGTERM ")
    assert lines[0].endswith("; checkpoint saved, continue with --resume")
    resumed = subprocess.run(
        [*args, "--resume"], cwd=tmp_path, env=env, text=True, capture_output=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr
    assert csv_path.read_text().count("\n") == 7  # header + 6 epochs

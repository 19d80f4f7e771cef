"""``mssar train`` / ``mssar eval`` end to end on the smoke recipe (synthetic data, CPU): the run
directory, re-runs, kill-and-resume bitwise equality, evaluation, bad inputs, a 2-process gloo
run and a diverging run. Every run happens in a temporary directory used as the CWD."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import assert_one_error_line
from typer.testing import CliRunner

from mssar_cli import recipe as recipes
from mssar_cli.cli import app

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "recipes" / "smoke.yaml"
RUN = Path("results/synthetic/smoke/seed0")  # relative to the CWD of the run
FILES = {"recipe.yaml", "env.json", "epochs.csv", "checkpoint.pt", "summary.json"}
COLUMNS = [
    "epoch",
    "lr",
    "train_loss",
    "train_err",
    "test_loss",
    "test_err",
    "epoch_seconds",
    "images_per_s",
]
# small and single-threaded: the machine is shared, and one thread keeps CPU runs bitwise repeatable
FAST = {"data.subset": 128, "data.test_subset": 64, "run.device": "cpu", "run.threads": 1}


def sets(**overrides) -> list[str]:
    """``--set`` arguments: FAST plus overrides (keys with __ for dots: optim__epochs=3)."""
    values = FAST | {k.replace("__", "."): v for k, v in overrides.items()}
    return [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def subprocess_env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    return env | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run_process(args: list, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m mssar_cli ARGS`` in ``cwd``, single-threaded like the rest of these tests."""
    command = [sys.executable, "-m", "mssar_cli", *map(str, args)]
    return subprocess.run(command, cwd=cwd, env=subprocess_env(), capture_output=True, text=True)


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished 2-epoch smoke run: (cwd it ran in, the CLI result)."""
    cwd = tmp_path_factory.mktemp("smoke")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        result = invoke("train", SMOKE, "--quiet", *sets())
    return cwd, result


# --------------------------------------------------------------------------------------------
# A smoke run and its run directory
# --------------------------------------------------------------------------------------------


def test_smoke_run_writes_the_run_directory(finished):
    cwd, result = finished
    assert result.exit_code == 0, result.output
    assert "finished: final test error" in result.stdout
    assert sorted(p.name for p in cwd.iterdir()) == ["results"]
    run = cwd / RUN
    assert {p.name for p in run.iterdir()} == FILES  # and no temporary files left behind

    columns, rows = read_csv(run / "epochs.csv")
    assert columns == COLUMNS  # 10 classes: no top-5 column
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert [float(r["lr"]) for r in rows] == pytest.approx([0.1, 0.01])  # milestones [1]
    for row in rows:
        assert 0 < float(row["train_loss"]) < 10 and 0 < float(row["test_loss"]) < 10
        assert 0 <= float(row["train_err"]) <= 100 and 0 <= float(row["test_err"]) <= 100
        assert float(row["epoch_seconds"]) > 0 and float(row["images_per_s"]) > 0

    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert (summary["experiment"], summary["dataset"], summary["seed"]) == ("smoke", "synthetic", 0)
    assert (summary["epochs"], summary["world_size"]) == (2, 1)
    assert (summary["train_images"], summary["test_images"]) == (128, 64)
    assert summary["final"]["test_err"] == float(
        rows[-1]["test_err"]
    )  # the final epoch, not the best
    assert summary["final"]["train_loss"] == float(rows[-1]["train_loss"])
    assert summary["params"] > 0 and summary["flops"] > 0

    stored = recipes.load(run / "recipe.yaml")
    expected = recipes.load(SMOKE, sets()[1::2])  # the KEY=VALUE items
    assert stored.to_dict() == expected.to_dict()
    assert stored.data.subset == 128 and stored.experiment == "smoke"

    env = json.loads((run / "env.json").read_text())
    assert env["world_size"] == 1 and env["device"] == "cpu" and env["torch"] == torch.__version__

    state = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert state["epoch"] == 2
    assert {"model", "optimizer", "scheduler", "rng", "history", "recipe"} <= set(state)
    assert state["recipe"] == expected.to_dict()
    assert len(state["history"]) == 2
    for logged, row in zip(state["history"], rows):
        assert {k: float(v) for k, v in row.items()} == logged


def test_rerunning_a_finished_run_changes_nothing(finished, monkeypatch):
    cwd, first = finished
    assert first.exit_code == 0, first.output
    monkeypatch.chdir(cwd)
    before = snapshot(cwd / RUN)
    result = invoke("train", SMOKE, "--quiet", *sets())
    assert result.exit_code == 0, result.output
    assert "already finished" in result.stdout and "nothing to do" in result.stdout
    assert snapshot(cwd / RUN) == before


def test_a_different_recipe_in_the_same_run_directory_is_refused(finished, monkeypatch):
    cwd, _ = finished
    monkeypatch.chdir(cwd)
    before = snapshot(cwd / RUN)
    result = invoke("train", SMOKE, "--quiet", *sets(optim__lr=0.05))
    assert result.exit_code == 2
    assert_one_error_line(result.stderr, "different recipe", "optim.lr")
    assert snapshot(cwd / RUN) == before


# --------------------------------------------------------------------------------------------
# mssar eval
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["run-dir", "checkpoint"])
def test_eval_agrees_with_the_last_csv_row(finished, target):
    cwd, _ = finished
    run = cwd / RUN
    _, rows = read_csv(run / "epochs.csv")
    path = run if target == "run-dir" else run / "checkpoint.pt"
    result = invoke("eval", path)
    assert result.exit_code == 0, result.output
    assert "agrees with the final row of epochs.csv" in result.stdout
    assert f"top-1 error {float(rows[-1]['test_err']):.2f}%" in result.stdout
    assert "(epoch 2)" in result.stdout and "64 test images" in result.stdout


@pytest.mark.parametrize(
    "what", ["missing-dir", "missing-file", "not-a-checkpoint", "dir-without-checkpoint"]
)
def test_eval_of_a_bad_path_is_one_line(finished, tmp_path, what):
    cwd, _ = finished
    path, must = {
        "missing-dir": (tmp_path / "no" / "such" / "run", "no such file"),
        "missing-file": (tmp_path / "checkpoint.pt", "no such file"),
        "not-a-checkpoint": (cwd / RUN / "epochs.csv", "not a readable mssar checkpoint"),
        "dir-without-checkpoint": (tmp_path, "has no checkpoint.pt"),
    }[what]
    result = invoke("eval", path)
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    assert_one_error_line(result.stderr, str(path), must)


def test_eval_of_weights_that_do_not_fit_is_one_line(finished, tmp_path):
    """A checkpoint whose model entry does not fit its recipe (here: DDP-style prefixed keys)."""
    import torch

    cwd, _ = finished
    state = torch.load(cwd / RUN / "checkpoint.pt", weights_only=False)
    state["model"] = {f"module.{k}": v for k, v in state["model"].items()}
    torch.save(state, tmp_path / "checkpoint.pt")
    result = invoke("eval", tmp_path / "checkpoint.pt")
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    assert_one_error_line(result.stderr, "weights do not fit", "Missing key(s)")


# --------------------------------------------------------------------------------------------
# Kill and resume
# --------------------------------------------------------------------------------------------


def _kill_after_first_epoch(
    proc: subprocess.Popen, csv_path: Path, outcome: dict, timeout: float = 300
) -> None:
    """SIGKILL ``proc`` as soon as its CSV holds a row (its first checkpoint is then on disk)."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            rows = csv_path.read_text().count("\n") - 1 if csv_path.exists() else 0
        except OSError:
            rows = 0
        if rows >= 1:
            os.kill(proc.pid, signal.SIGKILL)
            outcome["killed_after_rows"] = rows
            break
        time.sleep(0.02)
    else:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def test_kill_and_resume_is_bitwise_equal_to_an_uninterrupted_run(tmp_path, monkeypatch):
    # A, B and B's resumption run as `python -m mssar_cli` processes, as users run them. A run
    # inside the pytest process (CliRunner) was seen to differ from such a process in the last
    # bits (epoch-1 loss 2.355198 vs 2.355214, one thread in both; cause not found), while
    # processes always agree bitwise.
    args = ["train", SMOKE, "--quiet", *sets(optim__epochs=3, optim__milestones="[2]")]
    a_cwd, b_cwd = tmp_path / "a", tmp_path / "b"
    a_cwd.mkdir()
    b_cwd.mkdir()

    # B: a separate process, killed (SIGKILL: no clean-up at all) after its first checkpoint
    outcome: dict = {}
    with open(tmp_path / "b.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mssar_cli", *map(str, args)],
            cwd=b_cwd,
            env=subprocess_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        csv_path = b_cwd / RUN / "epochs.csv"
        killer = threading.Thread(target=_kill_after_first_epoch, args=(proc, csv_path, outcome))
        killer.start()
        try:
            # A: uninterrupted, while B starts up
            result_a = run_process(args, a_cwd)
        finally:
            killer.join()
    assert result_a.returncode == 0, result_a.stdout + result_a.stderr
    b_log = (tmp_path / "b.log").read_text()
    assert proc.returncode == -signal.SIGKILL, (
        f"B was not killed mid-run (exit {proc.returncode}):\n{b_log}"
    )
    assert "killed_after_rows" in outcome

    # the kill left a readable checkpoint and CSV that agree, and no summary
    b_run = b_cwd / RUN
    assert not (b_run / "summary.json").exists()
    state = torch.load(b_run / "checkpoint.pt", map_location="cpu", weights_only=False)
    killed_at = state["epoch"]
    assert 1 <= killed_at < 3 and len(state["history"]) == killed_at
    columns, rows = read_csv(b_run / "epochs.csv")
    assert columns == COLUMNS
    assert killed_at - 1 <= len(rows) <= killed_at and len(rows) >= 1
    for row, logged in zip(rows, state["history"]):
        assert {k: float(v) for k, v in row.items()} == logged

    # re-running the unfinished run without --resume: refused, nothing touched
    monkeypatch.chdir(b_cwd)
    before = snapshot(b_run)
    refused = invoke(*args)
    assert refused.exit_code == 2
    assert_one_error_line(refused.stderr, "unfinished run", "--resume")
    assert snapshot(b_run) == before

    resumed = run_process([*args, "--resume"], b_cwd)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resuming after epoch {killed_at}" in resumed.stdout
    assert json.loads((b_run / "env.json").read_text())["resumed_from_epoch"] == killed_at

    a_run = a_cwd / RUN
    final_a = torch.load(a_run / "checkpoint.pt", map_location="cpu", weights_only=False)
    final_b = torch.load(b_run / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert final_a["epoch"] == final_b["epoch"] == 3
    model_a, model_b = final_a["model"], final_b["model"]
    assert list(model_a) == list(model_b)
    different = [name for name in model_a if not torch.equal(model_a[name], model_b[name])]
    assert not different, f"tensors differ after resume: {different[:5]}"
    momentum_a = [s["momentum_buffer"] for s in final_a["optimizer"]["state"].values()]
    momentum_b = [s["momentum_buffer"] for s in final_b["optimizer"]["state"].values()]
    assert len(momentum_a) == len(momentum_b) > 0
    assert all(torch.equal(x, y) for x, y in zip(momentum_a, momentum_b))

    _, rows_a = read_csv(a_run / "epochs.csv")
    _, rows_b = read_csv(b_run / "epochs.csv")
    assert len(rows_a) == len(rows_b) == 3
    for key in ("epoch", "lr", "train_loss", "train_err", "test_loss", "test_err"):
        assert [r[key] for r in rows_a] == [r[key] for r in rows_b], key
    assert [float(r["lr"]) for r in rows_b] == pytest.approx(
        [0.1, 0.1, 0.01]
    )  # the scheduler resumed
    summary_a = json.loads((a_run / "summary.json").read_text())
    summary_b = json.loads((b_run / "summary.json").read_text())
    assert summary_a["final"] == summary_b["final"]


# --------------------------------------------------------------------------------------------
# Bad inputs: exit code 2, one line on stderr, no run directory
# --------------------------------------------------------------------------------------------


def _bad_input(tmp_path: Path, case: str) -> tuple[list[str], list[str]]:
    """(arguments after `train`, texts the error line must contain)."""
    if case == "unknown-key-in-file":
        path = tmp_path / "typo.yaml"
        path.write_text(SMOKE.read_text().rstrip("\n") + "\n  lrr: 0.1\n")
        return [str(path), *sets()], [str(path), "optim.lrr", "unknown key", "'lr'"]
    if case == "unknown-key-set":
        return [str(SMOKE), *sets(optim__lrr=0.1)], ["optim.lrr", "unknown key"]
    if case == "wrong-type":
        return [str(SMOKE), *sets(optim__epochs="two")], ["optim.epochs", "integer", "'two'"]
    if case == "missing-file":
        path = tmp_path / "nothere.yaml"
        return [str(path)], [str(path), "no such recipe file"]
    if case == "yaml-syntax":
        path = tmp_path / "broken.yaml"
        path.write_text("model:\n  name: [resnet20\ndata:\n  dataset: synthetic\n")
        return [str(path)], [str(path), "YAML syntax error", "line"]
    if case == "missing-dataset":
        empty = tmp_path / "empty"
        empty.mkdir()
        return [str(SMOKE), *sets(data__dataset="cifar10", data__root=empty)], [
            "cifar10 data not found",
            str(empty / "cifar-10-batches-py"),
        ]
    raise AssertionError(case)


BAD_INPUTS = [
    "unknown-key-in-file",
    "unknown-key-set",
    "wrong-type",
    "missing-file",
    "yaml-syntax",
    "missing-dataset",
]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_and_exit_2(tmp_path, monkeypatch, case):
    monkeypatch.chdir(tmp_path)
    args, must = _bad_input(tmp_path, case)
    result = invoke("train", *args, "--quiet")
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)  # not an uncaught exception
    assert result.stdout == ""
    assert_one_error_line(result.stderr, *must)
    assert not (tmp_path / "results").exists()


def test_missing_dataset_in_a_real_process_has_no_traceback(tmp_path):
    args, must = _bad_input(tmp_path, "missing-dataset")
    proc = subprocess.run(
        [sys.executable, "-m", "mssar_cli", "train", *args],
        cwd=tmp_path,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert_one_error_line(proc.stderr, *must)
    assert not (tmp_path / "results").exists()


# --------------------------------------------------------------------------------------------
# A diverging run
# --------------------------------------------------------------------------------------------


def test_non_finite_loss_stops_with_exit_1_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    """Epoch 1 trains at lr 0.1; the milestone then multiplies it by 1e30, and epoch 2 blows up."""
    monkeypatch.chdir(tmp_path)
    result = invoke("train", SMOKE, "--quiet", *sets(optim__gamma="1e30"))
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)
    assert_one_error_line(result.stderr, "the training loss became", "epoch 2", "checkpoint")
    run = tmp_path / RUN
    assert not (run / "summary.json").exists()
    state = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert state["epoch"] == 1 and len(state["history"]) == 1
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    _, rows = read_csv(run / "epochs.csv")
    assert [r["epoch"] for r in rows] == ["1"]
    # what was kept is a usable run: mssar eval reads it
    evaluated = invoke("eval", run)
    assert evaluated.exit_code == 0 and "(epoch 1)" in evaluated.stdout


# --------------------------------------------------------------------------------------------
# Two processes (torchrun, gloo)
# --------------------------------------------------------------------------------------------


def test_two_process_gloo_run(tmp_path, finished):
    _, single = finished
    assert single.exit_code == 0
    single_summary = json.loads((finished[0] / RUN / "summary.json").read_text())
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "mssar_cli",
        "train",
        str(SMOKE),
        "--quiet",
        *sets(),
    ]
    # its own session, so a hang ends with the launcher *and* its two workers killed
    proc = subprocess.Popen(
        command,
        cwd=tmp_path,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("the 2-process run did not finish in 300 s")
    assert proc.returncode == 0, stdout + stderr
    # rank 0 alone reports and writes
    assert stdout.count("finished: final test error") == 1, stdout
    runs = [
        p for p in (tmp_path / "results").rglob("*") if p.is_dir() and p.name.startswith("seed")
    ]
    assert runs == [tmp_path / RUN]
    assert {p.name for p in (tmp_path / RUN).iterdir()} == FILES

    _, rows = read_csv(tmp_path / RUN / "epochs.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    summary = json.loads((tmp_path / RUN / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["status"] == "finished" and summary["epochs"] == 2
    assert json.loads((tmp_path / RUN / "env.json").read_text())["world_size"] == 2
    # each rank trains on half of every epoch: together the single process's images
    assert summary["train_images"] == single_summary["train_images"] == 128
    assert summary["test_images"] == single_summary["test_images"] == 64

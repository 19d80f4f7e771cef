"""Run directories: one process per directory (``lock.json``), atomic writes, recipe differences."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from mssar_cli import runs
from mssar_cli.errors import MssarError

ROOT = Path(__file__).resolve().parents[1]


def dead_pid() -> int:
    """A pid that belonged to a process which has exited (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def hold_lock_in_child(run_dir: Path) -> subprocess.Popen:
    """Another process holding ``run_dir``'s lock until its stdin closes."""
    code = textwrap.dedent(
        f"""
        import sys
        from mssar_cli import runs
        with runs.RunLock({str(run_dir)!r}):
            print("locked", flush=True)
            sys.stdin.read()
        """
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert child.stdout.readline().strip() == "locked"
    return child


def test_lock_is_exclusive_and_names_the_holder(tmp_path: Path):
    child = hold_lock_in_child(tmp_path)
    try:
        holder = runs.lock_holder(tmp_path)
        assert holder["pid"] == child.pid and holder["host"] == socket.gethostname()
        with pytest.raises(MssarError) as info, runs.RunLock(tmp_path):
            pass
        message = str(info.value)
        assert "\n" not in message
        assert f"in use by pid {child.pid} on {socket.gethostname()} since " in message
    finally:
        child.communicate("")
    assert runs.lock_holder(tmp_path) is None
    assert not (tmp_path / runs.LOCK).exists()  # released on exit


def test_stale_lock_of_a_gone_process_is_taken_over_with_a_notice(tmp_path: Path):
    stale = {"pid": dead_pid(), "host": socket.gethostname(), "started": "2026-01-01T00:00:00"}
    (tmp_path / runs.LOCK).write_text(json.dumps(stale))
    assert runs.lock_holder(tmp_path) is None  # a gone process holds nothing
    notices: list[str] = []
    with runs.RunLock(tmp_path, notices.append):
        mine = json.loads((tmp_path / runs.LOCK).read_text())
        assert mine["pid"] == os.getpid()
    assert notices == [
        f"took over the lock of pid {stale['pid']} on {stale['host']} since "
        f"{stale['started']}, which is gone"
    ]
    assert not list(tmp_path.iterdir())  # no aside files left


def test_lock_of_another_host_is_respected(tmp_path: Path):
    other = {"pid": dead_pid(), "host": "some-other-node", "started": "2026-01-01T00:00:00"}
    (tmp_path / runs.LOCK).write_text(json.dumps(other))
    assert runs.lock_holder(tmp_path) == other  # its pid cannot be checked from here
    with (
        pytest.raises(MssarError, match="in use by pid .* on some-other-node"),
        runs.RunLock(tmp_path),
    ):
        pass
    assert json.loads((tmp_path / runs.LOCK).read_text()) == other  # untouched


def test_a_requeued_slurm_task_takes_over_its_own_lock(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    before = {"pid": 1, "host": "node-a", "started": "2026-01-01", "slurm_task": "4242_7"}
    (tmp_path / runs.LOCK).write_text(json.dumps(before))
    assert runs.lock_holder(tmp_path) is None
    with runs.RunLock(tmp_path):
        assert json.loads((tmp_path / runs.LOCK).read_text())["slurm_task"] == "4242_7"
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "8")  # another task's lock is not ours
    (tmp_path / runs.LOCK).write_text(json.dumps(before))
    assert runs.lock_holder(tmp_path) == before


def test_lock_released_when_the_body_fails(tmp_path: Path):
    with pytest.raises(RuntimeError), runs.RunLock(tmp_path):
        raise RuntimeError("training failed")
    assert not (tmp_path / runs.LOCK).exists()


def test_second_train_on_a_held_directory_is_one_line_and_writes_nothing(tmp_path: Path):
    """A second ``mssar train --resume`` on a directory that a live process trains in ends in
    one line naming the holder and exit code 2, and touches nothing there."""
    run_dir = tmp_path / "results" / "synthetic" / "smoke" / "seed0"
    child = hold_lock_in_child(run_dir)
    try:
        before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
        started = time.perf_counter()
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "mssar_cli",
                "train",
                str(ROOT / "recipes" / "smoke.yaml"),
                "--resume",
                "--set",
                "run.device=cpu",
            ],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
        assert f"in use by pid {child.pid} on {socket.gethostname()}" in lines[0]
        assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before
        assert time.perf_counter() - started < 60  # refused before any data is loaded
    finally:
        child.communicate("")


def test_recipe_differences_ignore_the_schema_local_keys():
    stored = {
        "experiment": "a",
        "run": {"output": "x", "device": "cpu", "seed": 0},
        "data": {"root": "/d"},
    }
    current = {
        "experiment": "a",
        "run": {"output": "y", "device": "cuda", "seed": 1},
        "data": {"root": "/e"},
    }
    assert runs.recipe_differences(stored, current) == ["run.seed"]

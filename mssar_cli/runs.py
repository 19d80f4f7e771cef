"""Run directories: ``OUTPUT/<dataset>/<experiment>/seed<k>/``.

Files (all written atomically: temp file, fsync, rename, so a kill or power loss at any moment
leaves the previous version whole):

- ``recipe.yaml``  the resolved recipe (every default filled in);
- ``env.json``     versions, device, git commit, command;
- ``epochs.csv``   one row per finished epoch, rewritten from the checkpoint's history, so the
  CSV and the checkpoint always agree;
- ``checkpoint.pt`` model, optimizer, scheduler, every RNG, the epoch and the history;
- ``summary.json`` written at the end: final errors, time, status "finished";
- ``lock.json``    while a process trains in it: pid, host, start time (:class:`RunLock`).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

import mssar_cli
from mssar_cli import recipe as recipes
from mssar_cli.errors import MssarError

RECIPE, ENV, CSV, CHECKPOINT, SUMMARY, LOCK = (
    "recipe.yaml",
    "env.json",
    "epochs.csv",
    "checkpoint.pt",
    "summary.json",
    "lock.json",
)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would make results private
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def csv_text(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def save_checkpoint(run_dir: Path, state: dict) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(run_dir / CHECKPOINT, buffer.getvalue())


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict:
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as error:  # a truncated or foreign file
        raise MssarError(
            f"{path}: not a readable mssar checkpoint ({type(error).__name__}: {error})"
        ) from None


def is_finished(run_dir: Path) -> bool:
    summary = run_dir / SUMMARY
    if not summary.exists():
        return False
    try:
        return read_json(summary).get("status") == "finished"
    except (OSError, ValueError):
        return False


def git_commit() -> str:
    here = Path(mssar_cli.__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: torch.device, world_size: int) -> dict[str, Any]:
    import torchvision

    info: dict[str, Any] = {
        "mssar": mssar_cli.__version__,
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "world_size": world_size,
        "command": " ".join(sys.argv),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def recipe_differences(stored: dict, current: dict) -> list[str]:
    """Keys whose values differ between two recipe dicts, ignoring where things are on the
    machine (the schema's local keys: run.output, run.device, data.root, ...)."""
    ignore = set(recipes.local_keys())
    diffs = []
    for section, values in current.items():
        if not isinstance(values, dict):
            if stored.get(section) != values:
                diffs.append(section)
            continue
        for key, value in values.items():
            name = f"{section}.{key}"
            if name not in ignore and stored.get(section, {}).get(key) != value:
                diffs.append(name)
    return diffs


# --- one process per run directory --------------------------------------------------------------


def _owner() -> dict[str, Any]:
    import datetime as dt
    import socket

    owner = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    job = _slurm_task()
    if job:
        owner["slurm_task"] = job
    return owner


def _slurm_task() -> str | None:
    """The Slurm array task (or job) this process runs as: a requeued task keeps it."""
    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    if not job:
        return None
    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{job}_{task}" if task else job


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read_lock(path: Path) -> dict | None:
    try:
        holder = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # being written, or garbage: treated as held by an unknown process
    return holder if isinstance(holder, dict) else {}


def _is_stale(holder: dict) -> bool:
    """A lock whose process is known to be gone: same host and no such pid, or an earlier run of
    this very Slurm task (requeued after preemption; the old process cannot still run)."""
    import socket

    if holder.get("slurm_task") and holder.get("slurm_task") == _slurm_task():
        return holder.get("host") != socket.gethostname() or holder.get("pid") != os.getpid()
    pid = holder.get("pid")
    return holder.get("host") == socket.gethostname() and isinstance(pid, int) and not _alive(pid)


def lock_holder(run_dir: Path) -> dict | None:
    """Who trains in ``run_dir`` now: the lock's contents, or None (no lock, or a stale one)."""
    holder = _read_lock(Path(run_dir) / LOCK)
    if holder is None or (holder and _is_stale(holder)):
        return None
    return holder


def describe_holder(holder: dict) -> str:
    if not holder:
        return "another process (its lock.json is unreadable)"
    return f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')}"


class RunLock:
    """``with RunLock(run_dir, notice):`` this process alone trains in ``run_dir``.

    The lock is ``lock.json``, created with ``O_EXCL`` (atomic on local and NFSv3+ file systems).
    A live holder makes the second process fail with one line naming it; a stale lock (its
    process gone, see :func:`lock_holder`) is taken over and ``notice`` says so. The file is
    removed on exit, also when training fails; a killed process leaves it, and the next run on
    the same host (or the same Slurm task) takes it over.
    """

    def __init__(self, run_dir: Path, notice=None) -> None:
        self.path = Path(run_dir) / LOCK
        self.notice = notice
        self.owner = _owner()

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read_lock(self.path)
                if holder is None:
                    continue  # released meanwhile
                if not holder or not _is_stale(holder):
                    raise MssarError(
                        f"{self.path.parent}: in use by {describe_holder(holder)}; wait for it, "
                        f"or stop it (if it is gone, delete {self.path})"
                    ) from None
                # move the stale lock aside first: of two processes taking it over, one wins
                aside = self.path.with_name(f".{LOCK}.{os.getpid()}.stale")
                try:
                    os.replace(self.path, aside)
                except FileNotFoundError:
                    continue
                if _read_lock(aside) != holder:  # another process took it over meanwhile
                    with contextlib.suppress(FileExistsError):
                        os.link(aside, self.path)  # give it back, unless a third came
                    aside.unlink(missing_ok=True)
                    continue
                aside.unlink(missing_ok=True)
                if self.notice:
                    self.notice(f"took over the lock of {describe_holder(holder)}, which is gone")
                continue
            with os.fdopen(fd, "w") as handle:
                json.dump(self.owner, handle)
                handle.flush()
                os.fsync(handle.fileno())
            return self
        raise MssarError(f"{self.path.parent}: could not take its lock; try again")

    def __exit__(self, *exc) -> None:
        if _read_lock(self.path) == self.owner:
            self.path.unlink(missing_ok=True)

"""Run directories: ``OUTPUT/<dataset>/<experiment>/seed<k>/``.

Files (all written atomically: temp file, fsync, rename, so a kill or power loss at any moment
leaves the previous version whole):

- ``recipe.yaml``  the resolved recipe (every default filled in);
- ``env.json``     versions, device, git commit, command;
- ``epochs.csv``   one row per finished epoch, rewritten from the checkpoint's history, so the
  CSV and the checkpoint always agree;
- ``checkpoint.pt`` model, optimizer, scheduler, every RNG, the epoch and the history;
- ``summary.json`` written at the end: final errors, time, status "finished".
"""

from __future__ import annotations

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

RECIPE, ENV, CSV, CHECKPOINT, SUMMARY = (
    "recipe.yaml",
    "env.json",
    "epochs.csv",
    "checkpoint.pt",
    "summary.json",
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
        raise recipes.MssarError(f"{path}: not a readable mssar checkpoint ({type(error).__name__}: {error})") from None


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
    """Keys whose values differ between two recipe dicts, ignoring run.output and run.device."""
    ignore = {"run.output", "run.device", "data.root", "data.workers", "data.download", "run.threads"}
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

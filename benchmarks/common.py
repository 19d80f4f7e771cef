"""Helpers shared by the benchmarks: the machine's name, CSV rows, Markdown tables."""

from __future__ import annotations

import csv
import os
import platform
from collections.abc import Sequence
from pathlib import Path

import torch

from mssar_cli.runs import cpu_name

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results" / "bench"


def machine_name(device: torch.device) -> str:
    """What the numbers were measured on: the GPU (on CUDA), the CPU model and cores, the OS."""
    host = f"{cpu_name()} ({os.cpu_count()} cores), {platform.system()} {platform.machine()}"
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}; host {host}"
    return host


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    return torch.device(name)


def append_csv(path: Path, columns: Sequence[str], rows: list[dict]) -> None:
    """Append ``rows`` (only ``columns``) to ``path``, writing the header to a new file.

    Refuses to append to a file whose header is different, so old and new columns never mix.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size > 0:
        with path.open(newline="") as handle:
            header = next(csv.reader(handle), [])
        if header != list(columns):
            raise SystemExit(
                f"{path} has the columns {','.join(header)}, not {','.join(columns)}; "
                "move it aside (or pass --csv NEW_PATH) and run again"
            )
        new = False
    else:
        new = True
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows(rows)


def markdown_table(headers: Sequence[str], rows: list[Sequence[str]], right: Sequence[bool]) -> str:
    """A GitHub-flavoured Markdown table; ``right[i]`` right-aligns column i."""

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    align = ["---:" if r else ":---" for r in right]
    return "\n".join([line(headers), "| " + " | ".join(align) + " |", *(line(r) for r in rows)])


def write_markdown(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text if text.endswith("\n") else text + "\n")

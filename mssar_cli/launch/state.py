"""Where each planned run stands, for ``mssar ablate --dry-run`` and for what a launcher starts.

A run is, in this order of precedence:

- ``finished``: its ``summary.json`` says so;
- ``running``: a live process holds its run-directory lock (:func:`mssar_cli.runs.lock_holder`);
- ``queued``: submitted to Slurm (``results/<dataset>/logs/submitted.json``) and not started
  since: its log is older than the submission, and ``squeue``, where it can be asked, still
  lists the job;
- ``failed``: its log ends with an error (a non-zero exit line, a traceback, ``mssar: error``);
- ``interrupted``: a checkpoint and nobody training in it (``--resume`` continues it);
- ``missing``: nothing yet.

Launchers start the failed, interrupted and missing runs, and skip the others: a run is never
trained by two processes, nor submitted twice.
"""

from __future__ import annotations

import datetime as dt
import getpass
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mssar_cli import runs
from mssar_cli.launch.job import INTERRUPTED_CODES, last_session

if TYPE_CHECKING:
    from mssar_cli.ablation import PlannedRun

STATES = ("finished", "running", "queued", "failed", "interrupted", "missing")
TO_START = ("failed", "interrupted", "missing")
SUBMITTED = "submitted.json"  # in results/<dataset>/logs/: run directory -> Slurm job
ERROR_LINES = ("Traceback (most recent call last)", "mssar: error:")


@dataclass(frozen=True)
class RunState:
    state: str
    detail: str = ""  # who runs it, which job it waits in, which log tells the error
    tail: tuple[str, ...] = ()  # the last lines of a failed run's log


def run_states(planned: list[PlannedRun]) -> list[RunState]:
    """The state of every planned run (reads files; asks ``squeue`` only if runs were
    submitted to Slurm and it is on the PATH)."""
    submissions: dict[str, dict] = {}
    for folder in dict.fromkeys(run.log_path.parent for run in planned):
        submissions |= read_submissions(folder)
    live = live_slurm_jobs() if submissions else None
    return [_state(run, submissions.get(_key(run.run_dir)), live) for run in planned]


def _state(run: PlannedRun, submission: dict | None, live: set[str] | None) -> RunState:
    if runs.is_finished(run.run_dir):
        return RunState("finished")
    holder = runs.lock_holder(run.run_dir)
    if holder is not None and not _gone_from_slurm(holder, live):
        return RunState("running", runs.describe_holder(holder))
    log = run.log_path
    if submission and not _started_since(log, submission) and _listed(submission, live):
        return RunState("queued", f"Slurm job {submission['job']}, submitted {submission['at']}")
    failure = failure_tail(log)
    if failure is not None:
        return RunState("failed", str(log), tuple(failure))
    if (run.run_dir / runs.CHECKPOINT).exists():
        return RunState("interrupted")
    return RunState("missing")


def failure_tail(log: Path, lines: int = 4) -> list[str] | None:
    """The last lines of ``log``'s last process if they show an error, else None."""
    session, code = last_session(log)
    tail = session[-lines:]
    if code is not None and code != 0 and code not in INTERRUPTED_CODES:
        return [*tail, f"(exit code {code})"]
    if code is None and any(line.startswith(ERROR_LINES) for line in tail):
        return tail
    return None


def _started_since(log: Path, submission: dict) -> bool:
    try:
        return log.stat().st_mtime >= submission["time"]
    except OSError:
        return False


def _listed(submission: dict, live: set[str] | None) -> bool:
    """Whether the job still waits in Slurm's queue (True when ``squeue`` cannot be asked)."""
    return live is None or submission["job"] in live


def _gone_from_slurm(holder: dict, live: set[str] | None) -> bool:
    """A lock taken by a Slurm task that ``squeue`` no longer lists: its node died with it."""
    task = holder.get("slurm_task")
    return bool(task) and live is not None and task not in live


# --- the record of submissions ------------------------------------------------------------------


def _key(run_dir: Path) -> str:
    return str(Path(run_dir).resolve())


def read_submissions(folder: Path) -> dict[str, dict]:
    path = Path(folder) / SUBMITTED
    try:
        data = runs.read_json(path)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def record_submissions(submitted: list[tuple[PlannedRun, str]]) -> list[Path]:
    """Add ``(run, Slurm job id)`` pairs to each dataset's ``submitted.json`` (written
    atomically); the files written."""
    now = time.time()
    at = dt.datetime.fromtimestamp(now, dt.timezone.utc).isoformat(timespec="seconds")
    by_folder: dict[Path, dict[str, dict]] = {}
    for run, job_id in submitted:
        entry = {"job": job_id, "at": at, "time": now, "log": str(run.log_path)}
        by_folder.setdefault(run.log_path.parent, {})[_key(run.run_dir)] = entry
    for folder, entries in by_folder.items():
        runs.write_json(folder / SUBMITTED, read_submissions(folder) | entries)
    return [folder / SUBMITTED for folder in by_folder]


def live_slurm_jobs() -> set[str] | None:
    """This user's jobs and array tasks in Slurm's queue (``squeue -r``: one id per array
    task), or None when there is no ``squeue`` to ask."""
    squeue = shutil.which("squeue")
    if squeue is None:
        return None
    try:
        out = subprocess.run(
            [squeue, "--noheader", "--array", "--format=%i", f"--user={getpass.getuser()}"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return {line.strip() for line in out.stdout.splitlines() if line.strip()}

"""One planned run as a process: its ``mssar train`` command line, its log, and the job submitit
runs (on a Slurm node, or on this machine with ``--launcher submitit-local``).

Every launcher starts a run the same way: ``python -m mssar_cli train RECIPE --resume --quiet
--set ...`` in the directory the ablation was started from, its output appended to
``results/<dataset>/logs/<experiment>-seed<k>.log`` between two marker lines (a start line, then
an exit line), so ``mssar ablate --dry-run`` reads how a run ended from its log whatever started
it. A process of its own per run keeps one run's crash, memory and CUDA state out of the others.

This module imports neither torch nor the rest of mssar: a submitit job unpickles it first.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from submitit.helpers import Checkpointable, DelayedSubmission

MARK = "[mssar ablate]"  # starts every line the launcher itself writes into a run's log
EXIT_LINE = re.compile(rf"^{re.escape(MARK)} exit code (-?\d+)")
# exit codes of a run asked to stop (Ctrl-C, a scheduler's SIGTERM or SIGUSR1): not a failure.
# Training saves a checkpoint and exits with 128 + the signal (mssar_cli.errors.RunStopped).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
INTERRUPTED_CODES = frozenset(
    {128 + int(s) for s in STOP_SIGNALS} | {-int(s) for s in STOP_SIGNALS}
)
STOP_GRACE_S = 60  # how long a run may take to write its checkpoint once asked to stop
REQUEUE_WAIT_S = 180  # on Slurm, after a SIGTERM: how long to wait for submitit's requeue signal


def train_command(
    recipe_path: str, overrides: Sequence[str], threads: int | None = None
) -> list[str]:
    """``python -m mssar_cli train RECIPE --resume --quiet --set ...`` (``run.threads`` added
    when ``threads`` is given: the caller knows whether the recipe sets it)."""
    command = [sys.executable, "-m", "mssar_cli", "train", recipe_path, "--resume", "--quiet"]
    for item in overrides:
        command += ["--set", item]
    if threads is not None:
        command += ["--set", f"run.threads={threads}"]
    return command


def last_session(path: Path) -> tuple[list[str], int | None]:
    """What the last process started in a run's log wrote (the lines after the last start line),
    and its exit code if the log records how it ended (None: running, killed together with the
    launcher, or stopped to be requeued)."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return [], None
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(f"{MARK} start ")]
    session = lines[starts[-1] + 1 :] if starts else lines
    kept = [line for line in session if line.strip() and not line.startswith(MARK)]
    ends = [EXIT_LINE.match(line) for line in session if line.startswith(MARK)]
    code = int(ends[-1].group(1)) if ends and ends[-1] else None
    return kept, code


def log_tail(path: Path, lines: int = 3) -> list[str]:
    """The last ``lines`` lines the last process of a run's log wrote."""
    return last_session(path)[0][-lines:]


class LoggedProcess:
    """A run's process with its output appended to its log, between a start and an exit line."""

    def __init__(
        self,
        command: Sequence[str],
        log_path: Path,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        ignore_signals: Sequence[int] = (),
    ) -> None:
        self.command = list(command)
        self.log_path = Path(log_path)
        self.cwd = cwd
        self.env = env
        self.ignore_signals = tuple(ignore_signals)
        self.process: subprocess.Popen | None = None
        self.started = 0.0
        self._log = None

    def start(self, where: str = "") -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "a")  # closed by _close
        when = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        self._write(
            f"{MARK} start {when} on {socket.gethostname()}{where}: {shlex.join(self.command)}"
        )
        ignored = self.ignore_signals
        self.started = time.perf_counter()
        try:
            self.process = subprocess.Popen(
                self.command,
                cwd=self.cwd,
                env=None if self.env is None else os.environ | self.env,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                # ignored signals stay ignored across exec: the job, not training, handles them
                preexec_fn=(lambda: [signal.signal(s, signal.SIG_IGN) for s in ignored])
                if ignored
                else None,
            )
        except OSError as error:
            self._write(f"mssar: error: cannot start {self.command[0]}: {error}")
            self._close("exit code 127")
            raise

    def wait(self, poll_s: float = 0.2) -> int:
        """Wait for the process; stop it (and re-raise) if this wait is interrupted.

        Polls rather than blocking in ``Popen.wait``: that holds a lock a signal handler running
        meanwhile (submitit's, calling :meth:`stop`) would wait for forever."""
        assert self.process is not None
        try:
            while (code := self.process.poll()) is None:
                time.sleep(poll_s)
        except BaseException:
            self.stop("the launcher was interrupted")
            raise
        self._close(f"exit code {code}")
        return code

    def stop(self, reason: str, grace_s: float = STOP_GRACE_S) -> int | None:
        """SIGTERM (training writes a checkpoint and exits), SIGKILL after ``grace_s``."""
        if self.process is None or self._log is None:
            return None
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.terminate()
            try:
                self.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        code = self.process.returncode
        self._close(f"stopped ({reason}), exit code {code}")
        return code

    def _write(self, line: str) -> None:
        assert self._log is not None
        self._log.write(line + "\n")
        self._log.flush()

    def _close(self, what: str) -> None:
        if self._log is None:
            return
        self._write(f"{MARK} {what} after {time.perf_counter() - self.started:.0f} s")
        self._log.close()
        self._log = None


def run_logged(
    command: Sequence[str], log_path: Path, cwd: str | None = None, env: dict | None = None
) -> int:
    """Run ``command`` to its end with its output in ``log_path``; its exit code."""
    process = LoggedProcess(command, log_path, cwd, env)
    process.start()
    return process.wait()


class RunFailed(RuntimeError):
    """A run's ``mssar train`` ended with an error (submitit marks the job FAILED)."""


class TrainRun(Checkpointable):
    """One planned run as a submitit job: ``TrainRun(...)()`` runs ``mssar train --resume``.

    Picklable (a top-level class holding a command line, paths and a label), so submitit can send
    it to a Slurm node. On a Slurm time limit or preemption signal, submitit calls
    :meth:`checkpoint` in the job process: it stops the training process with SIGTERM (training
    writes its checkpoint) and returns the same call, which submitit requeues; the new task
    starts ``mssar train --resume`` again, which continues from that checkpoint. The training
    process ignores submitit's own signal (USR2), so that the job alone decides.

    With ``--gpus-per-run G`` > 1, Slurm starts G tasks that each run this; training joins them
    into one DDP group from Slurm's environment
    (:func:`mssar_cli.distributed.init_from_environment`). Rank 0 writes the run's log, rank r
    ``<log>.rank<r>``.
    """

    def __init__(self, command: Sequence[str], log_path: str, cwd: str, label: str) -> None:
        self.command = list(command)
        self.log_path = str(log_path)
        self.cwd = str(cwd)
        self.label = label
        self._process: LoggedProcess | None = None

    def __call__(self) -> int:
        rank = _task_rank()
        log = Path(self.log_path)
        if rank:
            log = log.with_name(f"{log.stem}.rank{rank}.log")
        self._process = LoggedProcess(
            self.command, log, self.cwd, ignore_signals=(_preemption_signal(),)
        )
        self._process.start(_job_note())
        code = self._process.wait()
        if code in INTERRUPTED_CODES and os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
            # preempted: training got SIGTERM and checkpointed; submitit's signal requeues us
            time.sleep(REQUEUE_WAIT_S)
        if code != 0:
            raise RunFailed(f"{self.label}: mssar train exit code {code}; its log: {log}")
        return code

    def checkpoint(self, *args, **kwargs) -> DelayedSubmission:
        """Stop training (it checkpoints on SIGTERM); the same run again, to be requeued."""
        if self._process is not None:
            self._process.stop("requeued by submitit")
        return DelayedSubmission(TrainRun(self.command, self.log_path, self.cwd, self.label))

    def __getstate__(self) -> dict:
        return {key: value for key, value in self.__dict__.items() if key != "_process"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._process = None


def _preemption_signal() -> int:
    from submitit import JobEnvironment

    return getattr(signal, "SIG" + JobEnvironment.USR_SIG)


def _task_rank() -> int:
    """This task's rank within its submitit job (0 outside one)."""
    from submitit import JobEnvironment

    try:
        return JobEnvironment().global_rank
    except (RuntimeError, KeyError, ValueError):
        return 0


def _job_note() -> str:
    from submitit import JobEnvironment

    try:
        environment = JobEnvironment()
        return f" ({environment.cluster} job {environment.job_id})"
    except (RuntimeError, KeyError, ValueError):
        return ""

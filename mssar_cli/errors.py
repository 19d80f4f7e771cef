"""User-facing errors: one line on stderr and exit code 2 at the CLI boundary (no traceback)."""

from __future__ import annotations


class MssarError(Exception):
    """A problem with what the user asked for (bad recipe, missing data, impossible option)."""

    exit_code = 2


class ModelError(MssarError, ValueError):
    """A network or module that cannot be built as asked (unknown name, option that does not apply,
    impossible value). A ``ValueError`` too, for code that builds models as a library."""


class RunStopped(MssarError):
    """Training stopped on request (a signal) after saving a checkpoint where it stopped: not an
    error, but the process ends with the signal's conventional exit code."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum  # what a shell reports for a process ended by the signal

"""User-facing errors: one line on stderr and exit code 2 at the CLI boundary (no traceback)."""

from __future__ import annotations


class MssarError(Exception):
    """A problem with what the user asked for (bad recipe, missing data, impossible option)."""

    exit_code = 2

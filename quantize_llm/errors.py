"""Errors the tool raises on purpose, each carrying a one-line message, a fix, and an exit code.

`cli.main()` is the only place that turns them into text and exit codes; library code raises.
"""
from __future__ import annotations


class QuantizeError(Exception):
    """Base class: `message` says what is wrong, `hint` how to fix it."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        text = self.message if not self.hint else f"{self.message} ({self.hint})"
        return " ".join(text.split())


class UsageError(QuantizeError):
    """Bad input from the user: an option, a path, a recipe. Exit code 2."""

    exit_code = 2


class SpecError(UsageError):
    """An impossible or unsupported quantization setting."""


class ModelError(UsageError):
    """The model cannot be found, or is not something we can quantize."""


class CheckpointError(UsageError):
    """A checkpoint file is corrupt, truncated, unsafe, or holds bad values."""


class OutputError(UsageError):
    """The output folder exists, cannot be written, or the disk is too small."""


class RunError(QuantizeError):
    """The run failed after the inputs were accepted. Exit code 1."""


class Interrupted(QuantizeError):
    """The user interrupted the run (Ctrl-C). Exit code 130."""

    exit_code = 130

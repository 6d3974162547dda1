"""The checkpoint package's errors: user mistakes reported in one line."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, unreadable or of another model (one line)."""


class CheckpointLayoutError(CheckpointError):
    """A checkpoint that cannot be resumed at this layout (one line, says what to do)."""

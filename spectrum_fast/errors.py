"""Errors meant for users: the CLI prints them as one line and exits non-zero, without a traceback."""

from __future__ import annotations


class SpectrumError(Exception):
    """A problem with the user's input or environment (not a bug in spectrum_fast)."""


class CheckpointError(SpectrumError):
    """A checkpoint that cannot be found or read; the message names the file or tensor."""


class ResultFileError(SpectrumError):
    """A result file that cannot be read or written."""

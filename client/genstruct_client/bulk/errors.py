"""Errors of a bulk run that are the caller's to fix (exit code 2 on the command line)."""

from __future__ import annotations


class UsageError(Exception):
    """Bad input, options or files; the message says what to change."""

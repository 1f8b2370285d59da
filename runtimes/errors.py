"""The one exception type that every CLI turns into a one-line message and a non-zero exit.

Bottom layer: it lives under runtimes/ so that runtimes, stages and CLIs can all raise it without a runtime
importing the exporter (``exporter.errors`` re-exports it under its old name).
"""
from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input or environment (not a bug): shown as one line, exit code 2."""

    exit_code = 2

"""The one exception type that the CLI turns into a one-line message and a non-zero exit."""
from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input or environment (not a bug): shown as one line, exit code 2."""

    exit_code = 2

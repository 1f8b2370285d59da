"""The one exception type that the CLI turns into a one-line message and a non-zero exit."""
from __future__ import annotations

from runtimes.errors import UserError  # defined in the bottom layer so runtimes/ can raise it too

__all__ = ["UserError"]

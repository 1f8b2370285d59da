"""What the three console scripts share (yolo7-export, yolo7-bench, yolo7-detect): the error boundary,
``--img H W`` parsing and click value checks.

It lives in runtimes/ (imports only click and the bottom layer) so that yolo7-detect can use it without
importing the exporter's CLI, and exporter/cli.py and exporter/check/cli.py import it from here.
"""
from __future__ import annotations

import re
import sys

import click

from .errors import UserError


def run_cli(fn, debug: bool) -> None:
    """Run a command body: user errors become one line and exit 2; bugs one line and exit 1."""
    try:
        fn()
    except UserError as exc:
        if debug:
            raise
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the CLI boundary
        if debug:
            raise
        msg = str(exc).splitlines()[0] if str(exc) else ""
        click.echo(f"internal error: {type(exc).__name__}: {msg} (rerun with --debug for the traceback)", err=True)
        sys.exit(1)


def parse_imgsz(value: str | None, hint: str = "--img") -> tuple[int, int] | None:
    """'640' -> (640, 640); '384,640' / '384x640' -> (384, 640) as (H, W)."""
    if value is None:
        return None
    parts = [p for p in re.split(r"[,x ]+", value.strip()) if p]
    if not 1 <= len(parts) <= 2 or not all(p.isdigit() for p in parts):
        raise click.BadParameter(f"expected H or H W (e.g. 640 or 384 640), got {value!r}", param_hint=hint)
    h = int(parts[0])
    return h, int(parts[-1])


def join_img_args(argv: list[str]) -> list[str]:
    """Let `--img H W` work (click options take a fixed number of values): join two numbers after --img."""
    out, i = [], 0
    while i < len(argv):
        pair = argv[i + 1:i + 3]
        if argv[i] in ("--img", "--imgsz", "--min-img", "--max-img") and len(pair) == 2 and all(p.isdigit() for p in pair):
            out += [argv[i], ",".join(pair)]
            i += 3
        else:
            out.append(argv[i])
            i += 1
    return out


def unit_interval(ctx, param, value):
    """click callback: a value within [0, 1] (or unset)."""
    if value is not None and not 0.0 <= value <= 1.0:
        raise click.BadParameter(f"must be within [0, 1], got {value}")
    return value


def positive(ctx, param, value):
    """click callback: an integer >= 1 (or unset)."""
    if value is not None and value < 1:
        raise click.BadParameter(f"must be >= 1, got {value}")
    return value


def invoke(command: click.Command, prog_name: str, argv: list[str] | None) -> None:
    """The body of every console script: `--img H W` support, then click (shared by all three commands)."""
    command.main(args=join_img_args(list(sys.argv[1:] if argv is None else argv)), prog_name=prog_name)

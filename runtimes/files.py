"""Writing and hashing artifacts: temp file + rename, so a failed run never leaves a partial file.

Bottom layer: the exporter (ONNX, engine, manifest, reports) and the runtimes' own CLI (yolo7-detect's
json) write through these, and the manifest, the engine sidecar and the check report hash with
:func:`sha256_file`. ``exporter.artifacts`` re-exports them next to the run manifest.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file, read in chunks (checkpoints and engines can be hundreds of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


PARTIAL = ".partial"
_PARTIAL_PID = re.compile(r"\.(\d+)\.[^.]+\.partial$")


def partial_prefix(name: str) -> str:
    """Temp names carry the writer's pid (``.<name>.<pid>.<random>.partial``), so a later run can tell
    the debris of a killed writer (pid gone) from a concurrent writer's file (pid alive) and remove it."""
    return f".{name}.{os.getpid()}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def clean_stale_partials(folder: Path) -> list[Path]:
    """Remove ``.*.partial`` files and folders left in ``folder`` by a writer that no longer runs (kill -9,
    power loss); a ``.partial`` without a pid (older versions) counts as stale. Returns what was removed."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for entry in entries:
        if not (entry.name.startswith(".") and entry.name.endswith(PARTIAL)):
            continue
        m = _PARTIAL_PID.search(entry.name)
        if m and _alive(int(m.group(1))):
            continue
        try:
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
            removed.append(entry)
        except OSError:
            pass  # raced with another cleaner, or not ours to remove
    return removed


@contextmanager
def scratch_in(folder: Path) -> Iterator[Path]:
    """Route every ``tempfile`` scratch folder of a command (calibration, AutoCast, Q/DQ placement, TensorRT
    parsing) into one ``.scratch.<pid>.<random>.partial`` folder inside ``folder``, removed at the end.

    The stages use plain ``tempfile.TemporaryDirectory``, which cleans up on errors but not after kill -9:
    the system temp dir then kept ``yolo7_qdq_*`` / ``yolo7_calib_*`` folders forever. Inside the output
    folder they are ``.partial`` debris that the next run there removes (clean_stale_partials); they also
    land on the output's filesystem instead of a possibly small /tmp. Process-wide (``tempfile.tempdir``):
    for the CLIs, one command per process. A folder created here and left empty is removed again.
    """
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    clean_stale_partials(folder)
    scratch = Path(tempfile.mkdtemp(prefix=partial_prefix("scratch"), suffix=PARTIAL, dir=folder))
    previous = tempfile.tempdir
    tempfile.tempdir = str(scratch)
    try:
        yield scratch
    finally:
        tempfile.tempdir = previous
        shutil.rmtree(scratch, ignore_errors=True)
        if created and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temp path beside ``final``; rename it into place only if the block succeeds.

    A failure (or Ctrl-C) never leaves a partial file at ``final``.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_partials(final.parent)
    fd, tmp = tempfile.mkstemp(prefix=partial_prefix(final.name), suffix=PARTIAL, dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; artifacts are ordinary files
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes_atomic(final: Path, data: bytes) -> None:
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(final: Path, obj) -> None:
    write_bytes_atomic(final, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())

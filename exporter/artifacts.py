"""Atomic artifact writes and the run manifest (what was made, from what, with which versions)."""
from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from . import __version__
from .checkpoint import sha256_file


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temp path beside ``final``; rename it into place only if the block succeeds.

    A failure (or Ctrl-C) never leaves a partial file at ``final``.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent)
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


def versions() -> dict[str, str]:
    """Versions of everything that can change an artifact's bytes or numbers."""
    out = {"yolo7-export": __version__, "python": sys.version.split()[0], "platform": platform.platform()}
    for mod in ("torch", "onnx", "onnxruntime", "onnxslim", "numpy", "tensorrt", "modelopt"):
        module = sys.modules.get(mod)
        if module is not None and getattr(module, "__version__", None):
            out[mod] = str(module.__version__)
    return out


@dataclass
class Manifest:
    """manifest.json beside the outputs: input hash, flags, versions, every output with sha256 and size."""

    input_path: str
    input_sha256: str
    flags: dict
    outputs: list[dict] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def add_output(self, path: Path, kind: str, name: str | None = None, **details) -> None:
        """Record an output; ``name`` is its path relative to the manifest (default: the file name)."""
        path = Path(path)
        name = name or path.name
        self.outputs = [o for o in self.outputs if o["path"] != name]
        self.outputs.append({"path": name, "kind": kind, "sha256": sha256_file(path),
                             "bytes": path.stat().st_size, **details})

    def write(self, out_dir: Path) -> Path:
        final = Path(out_dir) / "manifest.json"
        write_json_atomic(final, {"tool": "yolo7-export", "input": {"path": self.input_path, "sha256": self.input_sha256},
                                  "flags": self.flags, "versions": versions(), "outputs": self.outputs, **self.extra})
        return final

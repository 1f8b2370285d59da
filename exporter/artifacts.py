"""The run manifest (what was made, from what, with which versions); the atomic writes and sha256 it uses
live in the bottom layer (runtimes/files.py) and are re-exported here."""
from __future__ import annotations

import json
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path


from runtimes.files import atomic_path, sha256_file, write_bytes_atomic, write_json_atomic  # noqa: F401 - re-exported

from . import __version__
from .errors import UserError


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
    previous: dict | None = None  # the folder's manifest before this run (invalidate_manifest), for earlier_outputs

    def add_output(self, path: Path, kind: str, name: str | None = None, **details) -> None:
        """Record an output; ``name`` is its path relative to the manifest (default: the file name)."""
        path = Path(path)
        name = name or path.name
        self.outputs = [o for o in self.outputs if o["path"] != name]
        self.outputs.append({"path": name, "kind": kind, "sha256": sha256_file(path),
                             "bytes": path.stat().st_size, **details})

    def write(self, out_dir: Path) -> Path:
        final = Path(out_dir) / "manifest.json"
        earlier = self.earlier_outputs(Path(out_dir))
        write_json_atomic(final, {"tool": "yolo7-export", "input": {"path": self.input_path, "sha256": self.input_sha256},
                                  "flags": self.flags, "versions": versions(), "outputs": self.outputs, **self.extra,
                                  **({"earlier_outputs": earlier} if earlier else {})})
        return final

    def earlier_outputs(self, out_dir: Path) -> list[dict]:
        """Artifacts of earlier runs into this folder (other precisions or checkpoints) that are still there,
        byte for byte, each with the input and flags of the run that made it: every file of the folder stays
        in its manifest, and an entry whose file changed or vanished is dropped rather than kept wrong."""
        prev = self.previous or {}
        mine = {o["path"] for o in self.outputs}
        candidates = [dict(o, input=prev.get("input"), flags=prev.get("flags")) for o in prev.get("outputs", [])]
        candidates += prev.get("earlier_outputs", [])
        kept = []
        for entry in candidates:
            path = Path(out_dir) / str(entry.get("path", ""))
            if entry.get("path") in mine or not path.is_file() or any(k["path"] == entry["path"] for k in kept):
                continue
            if sha256_file(path) == entry.get("sha256"):
                kept.append(entry)
        return kept


SETTINGS_KEYS = ("imgsz", "batch", "dynamic_hw", "nms", "nms_params", "precision", "task")


def refuse_replacing(path: Path, settings: dict, overwrite: bool = False) -> None:
    """Stop (exit 2) before replacing ``path`` with an artifact made with other settings.

    Decision: names stay ``<stem>[.fp16|.int8].onnx`` (what docs, Triton model names, workflows and the
    engine sidecar use), and one output folder holds one export configuration: re-exporting into the same
    folder with the same settings replaces the file (a retrained checkpoint, a new version), while other
    settings (input size, batch, NMS tail and its thresholds) would silently swap the model under every
    command that uses the path, so they are refused unless ``--overwrite``. The settings are read from the
    existing ONNX's own metadata (complete, unlike a manifest that a later run may have rewritten).
    """
    if overwrite or not Path(path).is_file():
        return
    import onnx

    from runtimes.metadata import read_info

    try:
        old = read_info(onnx.load(str(path), load_external_data=False)).__dict__
    except Exception:  # noqa: BLE001 - not ours / unreadable: nothing to compare, the user named this folder
        return

    def norm(v):
        return json.loads(json.dumps(v, sort_keys=True, default=list))

    diff = [k for k in SETTINGS_KEYS if k in settings and norm(old.get(k)) != norm(settings[k])]
    if diff:
        detail = ", ".join(f"{k} {norm(old.get(k))} -> {norm(settings[k])}" for k in diff)
        raise UserError(f"{path} was exported with other settings ({detail}); use another -o folder, or pass "
                        f"--overwrite to replace it")


def invalidate_manifest(out_dir: Path) -> dict | None:
    """Remove the folder's manifest.json before the first output is renamed into place.

    The manifest is written last; a run killed between its outputs' renames and the manifest's would
    otherwise leave the previous run's manifest describing files that are no longer there. No manifest
    is honest (the run did not finish); a wrong one is not. Returns the previous manifest (its still
    intact outputs are carried over as ``earlier_outputs``).
    """
    path = Path(out_dir) / "manifest.json"
    try:
        previous = json.loads(path.read_text())
    except (OSError, ValueError):
        previous = None
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    return previous if isinstance(previous, dict) else None

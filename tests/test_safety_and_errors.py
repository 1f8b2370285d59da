"""Hostile and wrong inputs: refused before anything runs, one clear line, non-zero exit, nothing left behind."""
from __future__ import annotations

import builtins
import os
import shutil
import subprocess
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from exporter.checkpoint import UnsafeCheckpointError, load_checkpoint
from exporter.cli import export_command, main
from exporter.errors import UserError
from exporter.model import build_model
from tests.conftest import OFFICIAL, TRAINED


class _Payload:
    """Pickles as a call of `func(*args)`: what a malicious checkpoint does."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _hostile(path: Path, func, args) -> Path:
    torch.save({"epoch": -1, "model": _Payload(func, args)}, path)
    return path


@pytest.mark.parametrize("kind", ["os.system", "builtins.exec", "subprocess.Popen"])
def test_hostile_pickle_is_refused_and_runs_nothing(tmp_path, kind):
    marker = tmp_path / "pwned"
    cmd = f"touch {marker}"
    func, args = {
        "os.system": (os.system, (cmd,)),
        "builtins.exec": (builtins.exec, (f"open({str(marker)!r}, 'w').close()",)),
        "subprocess.Popen": (subprocess.Popen, (["touch", str(marker)],)),
    }[kind]
    ckpt = _hostile(tmp_path / "evil.pt", func, args)
    with pytest.raises(UnsafeCheckpointError, match="refused to load"):
        load_checkpoint(ckpt)
    assert not marker.exists(), "the pickle's payload must never run"
    # the CLI path: one line, exit 2, no traceback, no output files
    result = CliRunner().invoke(export_command, [str(ckpt), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "refused to load" in result.output and "Traceback" not in result.output
    assert not marker.exists()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def _cli(args: list[str]):
    return CliRunner().invoke(export_command, args)


def test_missing_file(tmp_path):
    r = _cli([str(tmp_path / "nope.pt")])
    assert r.exit_code == 2 and "checkpoint not found" in r.output


def test_not_a_checkpoint(tmp_path):
    p = tmp_path / "notes.pt"
    p.write_text("hello, I am text")
    r = _cli([str(p)])
    assert r.exit_code == 2 and "not a PyTorch checkpoint" in r.output and "Traceback" not in r.output


def test_truncated_checkpoint(tmp_path):
    p = tmp_path / "truncated.pt"
    data = TRAINED.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    r = _cli([str(p), "-o", str(tmp_path / "out")])
    assert r.exit_code == 2, r.output  # checked on its own: `A and B or C` let any exit code pass with C
    assert "corrupt" in r.output.lower() or "not a PyTorch" in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_plain_state_dict_is_explained(tmp_path):
    p = tmp_path / "weights.pt"
    torch.save(OrderedDict(w=torch.zeros(2, 2)), p)
    with pytest.raises(UserError, match="plain state dict"):
        load_checkpoint(p)


def test_foreign_ultralytics_class_refused(tmp_path):
    """A YOLOv8 checkpoint pickles ultralytics.nn.tasks.DetectionModel: refused by name, nothing imported."""
    import pickle
    import zipfile

    p = tmp_path / "yolov8n.pt"
    payload = b"\x80\x02cultralytics.nn.tasks\nDetectionModel\nq\x00)\x81q\x01."
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/version", "3\n")
        z.writestr("archive/byteorder", "little")
    with pytest.raises(UnsafeCheckpointError, match="ultralytics.nn.tasks.DetectionModel"):
        load_checkpoint(p)
    del pickle


def test_yolov5_like_yaml_is_refused_with_module_name():
    """Same pickled class names as YOLOv5 (models.yolo.Model), but a module we do not implement."""
    ckpt = load_checkpoint(OFFICIAL / "dev_yolov7x_w00625_nc3.pt")
    ckpt.yaml = dict(ckpt.yaml)
    ckpt.yaml["backbone"] = [[-1, 1, "Focus", [64, 3]]] + list(ckpt.yaml["backbone"][1:])
    with pytest.raises(UserError, match="unsupported module 'Focus'"):
        build_model(ckpt)


def test_weights_not_matching_yaml_are_refused():
    ckpt = load_checkpoint(OFFICIAL / "dev_yolov7x_w00625_nc3.pt")
    ckpt.yaml = dict(ckpt.yaml, width_multiple=0.125)
    with pytest.raises(UserError, match="do not fit|shape"):
        build_model(ckpt)


@pytest.mark.parametrize("img,expect", [("330", "nearest valid sizes: 320 or 352"), ("16", "nearest valid sizes: 32")])
def test_bad_image_size_names_valid_sizes(tmp_path, img, expect):
    r = _cli([str(TRAINED), "--img", img, "-o", str(tmp_path)])
    assert r.exit_code == 2 and expect in r.output
    assert not list(tmp_path.glob("*.onnx"))


def test_img_h_w_form_and_debug_flag(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([str(TRAINED), "--img", "320", "350", "-o", str(tmp_path)])
    assert e.value.code == 2
    assert "350" in capsys.readouterr().err
    with pytest.raises(UserError):  # --debug shows the real exception (traceback) instead of one line
        main([str(tmp_path / "missing.pt"), "--debug"])


def test_no_partial_file_when_export_fails(tmp_path, monkeypatch):
    """The failure comes after the ONNX bytes are on disk (in the temp file), at the rename: nothing may stay."""
    import runtimes.files as files

    written = []

    def boom(src, dst):
        written.append((Path(src).stat().st_size, Path(dst).name))  # the temp file holds the whole artifact
        raise OSError("simulated failure after writing, before the rename")

    monkeypatch.setattr(files.os, "replace", boom)
    r = _cli([str(TRAINED), "--img", "320", "-o", str(tmp_path)])
    assert r.exit_code == 1 and "internal error" in r.output and "Traceback" not in r.output
    assert written and written[0][1] == "yolov7-tiny-shapes.onnx" and written[0][0] > 1_000_000
    assert list(tmp_path.iterdir()) == []


def test_directory_and_empty_file(tmp_path):
    assert "directory" in _cli([str(tmp_path)]).output
    empty = tmp_path / "empty.pt"
    empty.touch()
    r = _cli([str(empty)])
    assert r.exit_code == 2 and "empty" in r.output
    shutil.rmtree(tmp_path)


def test_malformed_img_value_is_a_usage_error(tmp_path):
    r = _cli([str(TRAINED), "--img", "abc", "-o", str(tmp_path)])
    assert r.exit_code == 2 and "expected H or H W" in r.output and "internal error" not in r.output

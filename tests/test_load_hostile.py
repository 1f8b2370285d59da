"""Issue 14: hostile and damaged checkpoints are refused by the loader and by all three CLIs, at a bounded cost.

Every hostile file is made here (``torch.jit``, ``tarfile``, ``zipfile``, raw pickle edits, or a re-pickled copy of
the small trained fixture with one thing changed). Anything that could hang or exhaust memory on a regression
(FIFO tar, memo/bytearray bombs, yaml bombs, shared-submodule DAG) runs in a child process under RLIMIT_AS and
a timeout, so a regression fails the test instead of taking the test machine down.
"""
from __future__ import annotations

import collections
import copy
import importlib
import io
import json
import os
import pickle
import pickletools
import resource
import subprocess
import sys
import tarfile
import textwrap
import types
import zipfile
from pathlib import Path

import pytest
import torch

from exporter.checkpoint import load_checkpoint
from exporter.checkpoint_zip import open_torch_zip
from exporter.errors import UserError
from exporter.model import build_model
from exporter.safe_pickle import InertNumpy, PickledObject, UnsafeCheckpointError, prescan, unpickle
from tests.conftest import DATA, TRAINED

ROOT = Path(__file__).resolve().parents[1]
MEM_LIMIT = 2 << 30  # every refusal must fit in this (the fuzz bombs took 6-21 GB)
SHAPES_JSON = DATA / "shapes" / "annotations" / "instances_val.json"


# ----------------------------------------------------------------------------------------------- helpers

def _rezip(src: Path, dst: Path, replace: dict[str, bytes] | None = None, add: dict[str, bytes] | None = None,
           compress: tuple[str, ...] = ()) -> Path:
    """Copy a torch zip member by member (fresh CRCs), replacing/adding members (names relative to the prefix)."""
    replace, add = replace or {}, add or {}
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        prefix = zin.namelist()[0].split("/")[0]
        for info in zin.infolist():
            rest = info.filename.split("/", 1)[1]
            data = replace.get(rest, zin.read(info))
            kind = zipfile.ZIP_DEFLATED if rest in compress else zipfile.ZIP_STORED
            zout.writestr(zipfile.ZipInfo(info.filename, date_time=info.date_time), data, compress_type=kind)
        for rest, data in add.items():
            zout.writestr(f"{prefix}/{rest}", data)
    return dst


def _data_pkl(path: Path) -> bytes:
    with zipfile.ZipFile(path) as z:
        return z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))


def _to_real(obj, fake: dict[str, types.ModuleType], memo: dict[int, object]):
    """Placeholder tree -> picklable objects with the same class paths (real torch.nn classes, fake models.*)."""
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, PickledObject):
        module, name = obj.class_path.rsplit(".", 1)
        if module.startswith("torch."):
            cls = getattr(importlib.import_module(module), name)
        else:
            mod = fake.setdefault(module, types.ModuleType(module))
            cls = getattr(mod, name, None) or type(name, (), {"__module__": module})
            setattr(mod, name, cls)
        inst = cls.__new__(cls)
        memo[id(obj)] = inst
        inst.__dict__.update(_to_real(obj.__dict__.get("state", {}), fake, memo))
        return inst
    if isinstance(obj, dict):
        out = type(obj)()
        memo[id(obj)] = out
        for k, v in obj.items():
            out[k] = _to_real(v, fake, memo)
        return out
    if isinstance(obj, (list, tuple)):
        items = [_to_real(v, fake, memo) for v in obj]
        return items if isinstance(obj, list) else tuple(items)
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, InertNumpy):  # best_fitness & co.: not needed by the loader
        return None
    return obj


@pytest.fixture
def craft(tmp_path, monkeypatch):
    """craft(name, edit) -> path: the trained fixture re-pickled with `edit(ckpt_dict)` applied."""
    archive = open_torch_zip(TRAINED)
    try:
        tree = unpickle(archive.pickle, archive.read_record)
    finally:
        archive.close()

    def make(name: str, edit=None) -> Path:
        fake: dict[str, types.ModuleType] = {}
        ckpt = _to_real(tree, fake, {})
        for module in fake:
            for i in range(1, module.count(".") + 2):
                parent = ".".join(module.split(".")[:i])
                monkeypatch.setitem(sys.modules, parent, fake.get(parent) or sys.modules.get(parent)
                                    or types.ModuleType(parent))
            monkeypatch.setitem(sys.modules, module, fake[module])
        if edit is not None:
            edit(ckpt)
        path = tmp_path / name
        torch.save(ckpt, path)
        return path

    return make


def _seq(ckpt) -> collections.OrderedDict:
    return ckpt["model"].__dict__["_modules"]["model"]._modules


def _yaml(ckpt) -> dict:
    return ckpt["model"].__dict__["yaml"]


def _head(ckpt):
    return list(_seq(ckpt).values())[-1]


class _Payload:
    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


_TS_SOURCE = '''
import sys
from typing import Tuple

import torch


class Evil(torch.nn.Module):
    """TorchScript whose __setstate__ (run by torch.jit.load) writes a file: the issue's code-execution hole."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    @torch.jit.export
    def __getstate__(self) -> Tuple[str, bool]:
        return (self.path, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[str, bool]) -> None:
        self.path = state[0]
        t = torch.from_file(self.path, True, 8, dtype=torch.uint8)
        t.fill_(65)
        self.training = state[1] and t.numel() > 0

    def forward(self, x):
        return x


torch.jit.save(torch.jit.script(Evil(sys.argv[1])), sys.argv[2])
'''


def _torchscript(tmp_path: Path, marker: Path) -> Path:
    script = tmp_path / "make_ts.py"
    script.write_text(_TS_SOURCE)
    out = tmp_path / "evil_ts.pt"
    subprocess.run([sys.executable, str(script), str(marker), str(out)], check=True, timeout=300,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.exists() and not marker.exists()
    return out


def _fifo_tar(tmp_path: Path) -> Path:
    """A legacy-tar checkpoint whose `storages` member is a FIFO: torch's legacy loader blocks on it forever."""
    path = tmp_path / "fifo_tar.pt"
    with tarfile.open(path, "w") as tar:
        for name, data in (("sys_info", pickle.dumps({"protocol_version": 1001, "little_endian": True})),
                           ("pickle", pickle.dumps({"model": None}))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        fifo = tarfile.TarInfo("storages")
        fifo.type = tarfile.FIFOTYPE
        tar.addfile(fifo)
    return path


def _memo_bomb(tmp_path: Path) -> Path:
    """6 changed bytes: one LONG_BINPUT memo index becomes 1.4e9 (the C unpickler sized its memo to it)."""
    data = bytearray(_data_pkl(TRAINED))
    pos = next(p for op, _, p in pickletools.genops(bytes(data)) if op.name == "LONG_BINPUT")
    data[pos + 1:pos + 5] = (1_400_000_000).to_bytes(4, "little")
    return _rezip(TRAINED, tmp_path / "memo_bomb.pt", replace={"data.pkl": bytes(data)})


def _bytearray_bomb(tmp_path: Path) -> Path:
    path = tmp_path / "bytearray_bomb.pt"
    torch.save({"model": _Payload(bytearray, (6_000_000_000,))}, path)
    return path


def _runner(cases: list[list], timeout: int = 300) -> tuple[list[dict], int]:
    """Run [tool, argv] cases in ONE child process under RLIMIT_AS + timeout; per case: exit code, stdout, stderr."""
    code = textwrap.dedent('''
        import contextlib, io, json, resource, sys, time
        from exporter.checkpoint import load_checkpoint
        from exporter.model import build_model
        from exporter.errors import UserError

        def load(argv):
            try:
                build_model(load_checkpoint(argv[0]))
            except UserError as exc:
                print(f"error: {exc}", file=sys.stderr)
                raise SystemExit(2)

        tools = {"load": load}
        for tool, module in (("export", "exporter.cli"), ("detect", "runtimes.cli"), ("bench", "exporter.check.cli")):
            tools[tool] = __import__(module, fromlist=["main"]).main
        for tool, argv in json.loads(sys.argv[1]):
            out, err, t0 = io.StringIO(), io.StringIO(), time.perf_counter()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    tools[tool](argv)
                    rc = 0
                except SystemExit as exc:
                    rc = exc.code
                except BaseException as exc:  # what a regression would look like
                    rc, err = -1, io.StringIO(f"{type(exc).__name__}: {exc}")
            print(json.dumps({"tool": tool, "argv": argv, "rc": rc, "out": out.getvalue(), "err": err.getvalue(),
                              "secs": time.perf_counter() - t0}), flush=True)
        print(json.dumps({"maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
    ''')

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (MEM_LIMIT, MEM_LIMIT))

    proc = subprocess.run([sys.executable, "-c", code, json.dumps(cases)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, preexec_fn=limit, stdin=subprocess.DEVNULL,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    assert lines and "maxrss_kb" in lines[-1], f"runner died (rc {proc.returncode}): {proc.stderr[-2000:]}"
    return lines[:-1], lines[-1]["maxrss_kb"]


def _assert_refused(result: dict, expect: str, max_secs: float = 20.0) -> None:
    err = result["err"].strip()
    where = f"{result['tool']} {result['argv'][0]}"
    assert result["rc"] == 2, f"{where}: exit {result['rc']}, stderr {err[:500]!r}"
    assert len(err.splitlines()) == 1 and err.startswith("error: "), f"{where}: not one line: {err[:500]!r}"
    assert expect.lower() in err.lower(), f"{where}: {expect!r} not in {err!r}"
    assert "Traceback" not in err and "internal error" not in err
    assert result["secs"] < max_secs, f"{where}: took {result['secs']:.1f} s"


# ------------------------------------------------------------------ item 1: TorchScript never reaches a loader

def test_torchscript_payload_runs_nothing_in_any_command(tmp_path):
    marker = tmp_path / "written_by_torchscript"
    evil = _torchscript(tmp_path, marker)
    with pytest.raises(UserError, match="TorchScript archive"):
        load_checkpoint(evil)
    assert not marker.exists()
    out = tmp_path / "out"
    results, _ = _runner([
        ["export", [str(evil), "-o", str(out)]],
        ["detect", [str(evil), str(DATA / "images" / "bus.jpg"), "-o", str(out)]],
        ["bench", [str(evil), "--data", str(SHAPES_JSON), "-o", str(out)]],
    ])
    for result in results:
        _assert_refused(result, "TorchScript archive")
    assert not marker.exists(), "the archive's TorchScript __setstate__ ran"
    assert not out.exists() or not any(out.iterdir())


def test_torchscript_members_inside_a_checkpoint_zip_are_refused(tmp_path):
    for extra in ("constants.pkl", "code/__torch__/evil.py", ".data/version"):
        path = _rezip(TRAINED, tmp_path / "mixed.pt", add={extra: b"x"})
        with pytest.raises(UnsafeCheckpointError, match="TorchScript"):
            load_checkpoint(path)


def test_unexpected_zip_members_are_refused(tmp_path):
    for extra in ("notes.txt", "data/abc", "../evil"):
        path = _rezip(TRAINED, tmp_path / "extra.pt", add={extra: b"x"})
        with pytest.raises(UserError, match="unexpected zip member|outside the single top folder"):
            load_checkpoint(path)


# --------------------------------------------------------------- item 2: legacy tar (FIFO), pipes, old format

def test_legacy_tar_with_fifo_and_fifo_path_are_refused_without_hanging(tmp_path):
    tar = _fifo_tar(tmp_path)
    fifo = tmp_path / "pipe.pt"
    os.mkfifo(fifo)
    results, _ = _runner([["load", [str(tar)]], ["export", [str(tar), "-o", str(tmp_path / "o")]],
                          ["load", [str(fifo)]]], timeout=180)
    _assert_refused(results[0], "tar archive")
    _assert_refused(results[1], "tar archive")
    _assert_refused(results[2], "not a regular file")


def test_pre_1_6_legacy_format_is_refused_with_a_way_out(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"model": torch.zeros(2)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(UserError, match="torch < 1.6"):
        load_checkpoint(path)


# --------------------------------------------------------------------- item 3: bounded cost of small files

def test_allocation_bombs_are_refused_fast_and_small(tmp_path, craft):
    def deep_repeats(ckpt):
        _yaml(ckpt)["backbone"][1][1] = 100_000_000

    def huge_depth(ckpt):
        _yaml(ckpt)["depth_multiple"] = 1e6
        _yaml(ckpt)["backbone"][1][1] = 2

    def wide(ckpt):  # within the channel bound, but 16000x16000x3x3 convs would need ~9 GB
        for row in _yaml(ckpt)["backbone"][1:3]:
            row[3][0] = 16000

    def million_channels(ckpt):
        _yaml(ckpt)["backbone"][1][3][0] = 1_000_000

    def dag(ckpt):  # 2**60 paths through 61 modules
        node = torch.nn.Identity()
        for _ in range(60):
            seq = torch.nn.Sequential()
            seq._modules["a"] = node
            seq._modules["b"] = node
            node = seq
        _seq(ckpt)["0"].__dict__["_modules"]["dag"] = node

    def names_dag(ckpt):
        node = ["x"]
        for _ in range(60):
            node = [node, node]
        ckpt["model"].__dict__["names"] = node

    def views(ckpt):  # 2,000 views of one 2 MB fp16 record: 8 GB of fp32 copies
        big = torch.zeros(1_000_000, dtype=torch.float16)
        _seq(ckpt)["0"].__dict__["_modules"]["conv"].__dict__["_buffers"].update({f"v{i}": big[:] for i in range(2000)})

    cases = {
        "memo index": _memo_bomb(tmp_path),
        "bytearray'": _bytearray_bomb(tmp_path),
        "repeat count": craft("repeats.pt", deep_repeats),
        "depth_multiple": craft("depth.pt", huge_depth),
        "do not fit": craft("wide.pt", wide),
        "output channels": craft("channels.pt", million_channels),
        "shared references": craft("dag.pt", dag),  # refused by the prescan; the walk budget is tested below
        "shared references ": craft("names_dag.pt", names_dag),
        "more elements than the file holds": craft("views.pt", views),
    }
    runs = [["load", [str(p)]] for p in cases.values()]
    # every bomb through every command once more: they all share the loader, but the CLIs add their own steps
    out = str(tmp_path / "out")
    for expect, p in list(cases.items())[:4]:
        runs += [["export", [str(p), "-o", out]], ["detect", [str(p), str(DATA / "images" / "bus.jpg"), "-o", out]],
                 ["bench", [str(p), "--data", str(SHAPES_JSON), "-o", out]]]
    results, maxrss_kb = _runner(runs)
    expects = list(cases) + [e for e in list(cases)[:4] for _ in range(3)]
    assert len(results) == len(expects)
    for result, expect in zip(results, expects):
        _assert_refused(result, expect.strip())
    assert maxrss_kb < 1_200_000, f"peak RSS {maxrss_kb / 1e3:.0f} MB"


def test_memo_prescan_refuses_before_unpickling():
    data = bytearray(_data_pkl(TRAINED))
    prescan(bytes(data))  # the real pickle passes
    with pytest.raises(UserError, match="not a valid pickle"):
        prescan(bytes(data[: len(data) // 2]))
    pos = next(p for op, _, p in pickletools.genops(bytes(data)) if op.name == "LONG_BINPUT")
    data[pos + 1:pos + 5] = (1_400_000_000).to_bytes(4, "little")
    with pytest.raises(UserError, match="memo index 1400000000"):
        prescan(bytes(data))
    with pytest.raises(UserError, match="opcode EXT1"):
        prescan(b"\x80\x02\x82\x01.")


def test_compressed_member_and_oversized_declarations_are_refused(tmp_path):
    path = _rezip(TRAINED, tmp_path / "deflated.pt", compress=("data/0",))
    with pytest.raises(UserError, match="compressed"):
        load_checkpoint(path)
    # a central directory that declares more bytes than the file holds (a zip-bomb-shaped record)
    raw = bytearray(TRAINED.read_bytes())
    entry = _central_entry(raw, TRAINED, "0")
    for offset in (20, 24):  # compressed and uncompressed size
        raw[entry + offset:entry + offset + 4] = (4_000_000_000).to_bytes(4, "little")
    bomb = tmp_path / "declared.pt"
    bomb.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="more than the file"):
        load_checkpoint(bomb)


def _central_entry(raw: bytes, path: Path, key: str) -> int:
    """Byte offset of the central-directory entry of record `key`."""
    with zipfile.ZipFile(path) as z:
        name = next(n for n in z.namelist() if n.endswith(f"/data/{key}")).encode()
    entry = raw.find(b"PK\x01\x02")
    while raw[entry + 46:entry + 46 + len(name)] != name:
        entry = raw.find(b"PK\x01\x02", entry + 4)
    return entry


def test_tensor_records_are_bounded_by_the_bytes_present(tmp_path):
    with zipfile.ZipFile(TRAINED) as z:
        prefix = z.namelist()[0].split("/")[0]
        rec = z.read(f"{prefix}/data/0")
    path = _rezip(TRAINED, tmp_path / "short.pt", replace={"data/0": rec[: len(rec) // 2]})
    with pytest.raises(UserError, match="storage record '0' holds"):
        load_checkpoint(path)


# --------------------------------------------------------------- item 4: damaged bytes and impossible values

def _record_offset(path: Path, key: str) -> int:
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(next(n for n in z.namelist() if n.endswith(f"/data/{key}")))
    raw = path.read_bytes()
    start = info.header_offset
    name_len, extra_len = int.from_bytes(raw[start + 26:start + 28], "little"), int.from_bytes(raw[start + 28:start + 30], "little")
    return start + 30 + name_len + extra_len


def test_stale_crc_is_refused(tmp_path):
    raw = bytearray(TRAINED.read_bytes())
    raw[_record_offset(TRAINED, "0") + 3] ^= 0x40  # edit a weight in place, keep the old CRC
    path = tmp_path / "stale_crc.pt"
    path.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="CRC"):
        load_checkpoint(path)


def test_damaged_central_directory_is_refused(tmp_path):
    raw = bytearray(TRAINED.read_bytes())
    with zipfile.ZipFile(TRAINED) as z:
        other = z.getinfo(next(n for n in z.namelist() if n.endswith("/data/1")))
    entry = _central_entry(raw, TRAINED, "0")
    raw[entry + 42:entry + 46] = other.header_offset.to_bytes(4, "little")  # record 0 now points at record 1
    path = tmp_path / "bad_cd.pt"
    path.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="truncated or corrupt"):
        load_checkpoint(path)


def test_recrafted_fixture_is_identical(craft):
    """The crafting helper itself changes nothing: the refusals below come from the one edit each makes."""
    a, b = load_checkpoint(TRAINED), load_checkpoint(craft("same.pt"))
    assert a.names == b.names and a.stride == b.stride and a.yaml == b.yaml and a.anchors_px == b.anchors_px
    assert a.state_dict.keys() == b.state_dict.keys()
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
    build_model(b)


def _set(ckpt, key: str, index, value) -> None:
    parts = key.split(".")
    module = ckpt["model"]
    for p in parts[:-1]:
        module = module.__dict__["_modules"][p] if not isinstance(module, torch.nn.Module) else module._modules[p]
    store = module.__dict__["_parameters"] if parts[-1] in module.__dict__["_parameters"] else module.__dict__["_buffers"]
    tensor = store[parts[-1]]
    tensor.view(-1)[index] = value


@pytest.mark.parametrize("key,value,expect", [
    ("model.0.conv.weight", float("nan"), "tensor model.0.conv.weight holds 1 NaN/Inf"),
    ("model.0.bn.bias", float("inf"), "tensor model.0.bn.bias holds 1 NaN/Inf"),
    ("model.3.bn.running_var", -0.5, "BatchNorm variance model.3.bn.running_var is negative"),
])
def test_impossible_weights_are_named(craft, key, value, expect):
    path = craft("bad_weight.pt", lambda c: _set(c, key, 0, value))
    with pytest.raises(UserError, match=expect.replace(".", r"\.")):
        load_checkpoint(path)


@pytest.mark.parametrize("stride", [[-8.0, -16.0, -32.0], [0.0, 0.0, 0.0], [8.0, 16.0, 33.0]])
def test_impossible_strides_are_refused(craft, stride):
    def edit(c):
        assert "stride" in _head(c).__dict__  # a plain attribute of the official Detect module
        _head(c).__dict__["stride"] = torch.tensor(stride)
        c["model"].__dict__["stride"] = torch.tensor(stride)

    with pytest.raises(UserError, match="stride"):
        load_checkpoint(craft("stride.pt", edit))


def test_names_and_nc_must_agree(craft):
    path = craft("names.pt", lambda c: c["model"].__dict__.__setitem__("names", ["a", "b"]))
    with pytest.raises(UserError, match="2 class names for nc=5"):
        load_checkpoint(path)


# ------------------------------------------------------------ item 6 (yaml/stride part): exit 2, not exit 1

def test_yaml_without_nc_and_conv_stride_zero_exit_2(tmp_path, craft):
    no_nc = craft("no_nc.pt", lambda c: _yaml(c).pop("nc"))

    def stride0(c):
        _yaml(c)["backbone"][1][3][2] = 0  # [-1, 1, Conv, [c2, k, s=0, ...]]

    zero = craft("stride0.pt", stride0)
    out = str(tmp_path / "out")
    results, _ = _runner([["export", [str(no_nc), "-o", out]], ["export", [str(zero), "-o", out]],
                          ["detect", [str(zero), str(DATA / "images" / "bus.jpg"), "-o", out]]])
    _assert_refused(results[0], "'nc'")
    for result in results[1:]:
        _assert_refused(result, "yaml")
    assert not Path(out).exists() or not any(Path(out).iterdir())


@pytest.mark.parametrize("row,args,expect", [
    (8, [4], "head input 0 is downsampled by 16, but the Detect stride is 8"),  # pooling factor off the graph
    (39, ["None", 1000, "nearest"], "stride/factor 1000"),  # an upsampling bomb
    (22, [1], r"layer 41 \(Concat\) joins inputs of different resolutions"),
])
def test_yaml_downsampling_must_match_the_pickled_strides(row, args, expect):
    ckpt = load_checkpoint(TRAINED)
    ckpt.yaml = copy.deepcopy(ckpt.yaml)
    nb = len(ckpt.yaml["backbone"])
    part, index = ("backbone", row) if row < nb else ("head", row - nb)
    ckpt.yaml[part][index][3] = args
    with pytest.raises(UserError, match=expect):
        build_model(ckpt)


# ------------------------------------------------------------------ item 5: MemoryError with an empty message

def test_memory_error_while_unpickling_is_one_clear_line(monkeypatch):
    import exporter.safe_pickle as sp

    def boom(self):
        raise MemoryError()

    monkeypatch.setattr(sp.SafeUnpickler, "load", boom)
    with pytest.raises(UserError, match="ran out of memory"):
        load_checkpoint(TRAINED)


def test_cli_reports_an_empty_message_exception_without_index_error():
    from click.testing import CliRunner
    import click

    from exporter.cli import run_cli

    @click.command()
    def cmd():
        def body():
            raise MemoryError()
        run_cli(body, debug=False)

    r = CliRunner().invoke(cmd, [])
    assert r.exit_code == 1 and "MemoryError" in r.output and "IndexError" not in r.output


# ------------------------------------------------------------------------------------- getattr: one pair only

def _raw_pickle_ckpt(tmp_path: Path, body: bytes) -> Path:
    """A checkpoint zip whose data.pkl is `body` (protocol 2, ends with STOP)."""
    return _rezip(TRAINED, tmp_path / "raw.pt", replace={"data.pkl": b"\x80\x02" + body})


@pytest.mark.parametrize("name,body", [
    ("getattr(os, 'system')", b"c__builtin__\ngetattr\ncos\nsystem\nX\x06\x00\x00\x00systemq\x00\x86R."),
    ("getattr(builtins.eval)", b"c__builtin__\ngetattr\nc__builtin__\neval\nX\x04\x00\x00\x00evalq\x00\x86R."),
    ("getattr(OrderedDict, 'fromkeys')",
     b"c__builtin__\ngetattr\nccollections\nOrderedDict\nX\x08\x00\x00\x00fromkeys\x86R."),
    ("getattr(IDetect, '__init__')", b"c__builtin__\ngetattr\ncmodels.yolo\nIDetect\nX\x08\x00\x00\x00__init__\x86R."),
    ("getattr(Detect, 'forward')", b"c__builtin__\ngetattr\ncmodels.yolo\nDetect\nX\x07\x00\x00\x00forward\x86R."),
    ("getattr(str, 'format')", b"c__builtin__\ngetattr\nc__builtin__\nstr\nX\x06\x00\x00\x00format\x86R."),
    ("calling IDetect.forward", b"c__builtin__\ngetattr\ncmodels.yolo\nIDetect\nX\x07\x00\x00\x00forward\x86R)R."),
])
def test_getattr_is_only_the_one_seg_pair(tmp_path, name, body):
    with pytest.raises(UserError, match="refused to load|could not be unpickled"):
        load_checkpoint(_raw_pickle_ckpt(tmp_path, body))


def test_getattr_idetect_forward_is_an_inert_marker(tmp_path):
    from exporter.safe_pickle import PickledFunction

    archive = open_torch_zip(_raw_pickle_ckpt(
        tmp_path, b"c__builtin__\ngetattr\ncmodels.yolo\nIDetect\nX\x07\x00\x00\x00forward\x86R."))
    try:
        value = unpickle(archive.pickle, archive.read_record)
    finally:
        archive.close()
    assert value == PickledFunction("models.yolo.IDetect.forward") and not callable(value)


def test_numpy_objects_stay_inert(tmp_path):
    """numpy's ndarray.__setstate__ allocates from a declared shape (and crashed on object arrays): never called."""
    body = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85C\x01b\x87R"
            b"(K\x01J\x00\xca\x9a;\x85cnumpy\ndtype\nX\x02\x00\x00\x00O8\x89\x88\x87R]\x89]tb.")
    archive = open_torch_zip(_raw_pickle_ckpt(tmp_path, body))
    try:
        value = unpickle(archive.pickle, archive.read_record)
    finally:
        archive.close()
    assert type(value).__name__ == "InertNumpy"


def test_bytes_builtins_that_allocate_from_an_int_are_refused(tmp_path):
    for name in (b"bytearray", b"bytes"):
        body = b"c__builtin__\n" + name + b"\nJ\x00\xca\x9a;\x85R."
        with pytest.raises(UnsafeCheckpointError, match=name.decode()):
            load_checkpoint(_raw_pickle_ckpt(tmp_path, body))


# ----------------------------------------------------------------------------- item 9: noise and environment

def test_torch_force_weights_only_env_does_not_break_a_valid_checkpoint(monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "1")
    ckpt = load_checkpoint(TRAINED)
    assert ckpt.names == ["circle", "square", "triangle", "star", "cross"]


def test_refusals_print_exactly_one_line_on_the_real_stderr(tmp_path):
    """fd-level stderr of a real process: no torch/zipfile warning before the one-line error."""
    raw = bytearray(TRAINED.read_bytes())
    raw[_record_offset(TRAINED, "0") + 3] ^= 0x40
    bad = tmp_path / "stale.pt"
    bad.write_bytes(bytes(raw))
    proc = subprocess.run([sys.executable, "-c", "from exporter.cli import main; main()", str(bad), "-o",
                           str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "default"})
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_hash_bomb_of_shared_tuples_is_refused_before_unpickling(tmp_path):
    """{t60: 1} where t_k = (t_k-1, t_k-1): 200 bytes whose dict-key hash visits 2**60 tuples inside the C
    unpickler (no global involved, so the allowlist cannot help); the prescan's unrolled size refuses it."""
    body = bytearray(b"}q\x00K\x01q\x010")  # EMPTY_DICT (memo 0); the int 1 as level 0 (memo 1), popped
    for level in range(1, 61):  # t_level = (t_level-1, t_level-1) in memo level+1; all but the last popped
        body += b"h" + bytes([level]) + b"h" + bytes([level]) + b"\x86q" + bytes([level + 1]) + (b"0" if level < 60 else b"")
    body += b"K\x01s."  # value 1, SETITEM, STOP
    path = _raw_pickle_ckpt(tmp_path, bytes(body))
    results, _ = _runner([["load", [str(path)]]], timeout=180)
    _assert_refused(results[0], "shared references")


def test_module_walk_and_plain_data_have_budgets_of_their_own(tmp_path):
    """Second line behind the prescan: a DAG of modules or of yaml lists that reached us is walked within a budget."""
    from exporter.checkpoint import _check_plain, _flatten_state
    from exporter.safe_pickle import placeholder

    node = placeholder("torch.nn.modules.linear.Identity")()
    node.__setstate__({"_modules": collections.OrderedDict(), "_parameters": {}, "_buffers": {}})
    for _ in range(60):
        parent = placeholder("torch.nn.modules.container.Sequential")()
        parent.__setstate__({"_modules": collections.OrderedDict(a=node, b=node), "_parameters": {}, "_buffers": {}})
        node = parent
    with pytest.raises(UserError, match="module tree is larger"):
        _flatten_state(node, "model.", TRAINED)
    plain = ["x"]
    for _ in range(60):
        plain = [plain, plain]
    with pytest.raises(UserError, match="too large or nested too deeply"):
        _check_plain(plain, "class names", TRAINED)

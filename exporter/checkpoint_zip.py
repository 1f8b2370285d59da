"""Read a torch zip checkpoint ourselves, so no file ever reaches a loader that can execute it.

``torch.load`` picks a loader from the file's shape: a TorchScript archive (``constants.pkl``, ``code/``) goes to
``torch.jit.load``, which runs the archive's TorchScript before any unpickler of ours is consulted; a tar goes
to the legacy loader, which extracts members (a FIFO member hangs it forever). We therefore accept exactly the
layout ``torch.save`` (torch >= 1.6) writes, one top-level folder ``<prefix>/`` holding:

* ``data.pkl`` (required) and ``version`` (required, a small integer);
* optional metadata of newer torch: ``byteorder`` (must be ``little``), ``.format_version``,
  ``.storage_alignment``, ``.data/serialization_id``;
* ``data/<key>``: one raw little-endian storage record per key (decimal keys, as torch writes them).

Anything else is refused with one line before any member is unpickled: TorchScript members, other names,
duplicate names, encrypted or compressed members (torch never compresses; a 6 GB zip bomb is a compressed
member), declared sizes that do not fit in the file. Every member we use is read to the end, so :mod:`zipfile`
verifies its CRC-32 (an in-place edit with a stale CRC, or a damaged central directory that points a record
at the wrong bytes, is refused). Member count, the pickle size and the total are bounded by the file itself.

Legacy formats: the tar format (torch < 0.4) is refused outright; the pre-1.6 non-zip pickle stream is
refused with a line saying how to convert it (no fixture or official release uses either: all official
YOLOv7 weights are zip checkpoints).
"""
from __future__ import annotations

import re
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError
from .safe_pickle import MAX_PICKLE_BYTES, UnsafeCheckpointError

MAX_MEMBERS = 200_000  # a full yolov7-e6e training checkpoint has ~1,500; optimizer state about triples it
_META_MEMBERS = {"byteorder", ".format_version", ".storage_alignment", ".data/serialization_id"}
_TORCHSCRIPT_HINTS = ("constants.pkl", "code/", ".data/version", "extra/", "attributes.pkl")
_RECORD_RE = re.compile(r"data/([0-9]{1,12})")
# The pickle protocol-2 header torch's legacy (< 1.6) format starts with, then its magic number.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


@dataclass
class TorchZip:
    """The checked member table of one checkpoint; records are read (and CRC-checked) on demand."""

    path: Path
    prefix: str
    pickle: bytes
    records: dict[str, zipfile.ZipInfo]
    _zip: zipfile.ZipFile = field(repr=False)
    _read: set[str] = field(default_factory=set)

    def read_record(self, key: str) -> bytes:
        """Bytes of ``data/<key>``, read fully (CRC verified); each record at most once."""
        info = self.records.get(key)
        if info is None:
            raise UserError(f"corrupt checkpoint: the pickle refers to storage record {key!r}, which is not in the "
                            f"zip: {self.path}")
        if key in self._read:
            raise UserError(f"corrupt checkpoint: storage record {key!r} is read twice: {self.path}")
        self._read.add(key)
        return _read_member(self._zip, info, self.path)

    def close(self) -> None:
        self._zip.close()


def _read_member(z: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path) -> bytes:
    try:
        with z.open(info) as f:
            data = f.read()  # a full read makes zipfile compare the CRC-32 at EOF
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
        msg = str(exc).strip().splitlines()
        raise UserError(f"truncated or corrupt PyTorch checkpoint: {path} (member {info.filename}: "
                        f"{msg[0][:120] if msg else type(exc).__name__})") from exc
    if len(data) != info.file_size:
        raise UserError(f"truncated or corrupt PyTorch checkpoint: {path} (member {info.filename} is short)")
    return data


def _refuse_non_zip(path: Path) -> None:
    with open(path, "rb") as f:
        head = f.read(512)
    if len(head) >= 262 and head[257:262] == b"ustar" or _is_tar(path):
        raise UserError(f"refused to load: {path} is a tar archive (torch's legacy < 0.4 checkpoint format); it is "
                        "not read (re-save it with a current torch in a trusted environment)")
    if head.startswith(_LEGACY_MAGIC):
        raise UserError(f"unsupported checkpoint format: {path} was written by torch < 1.6 (legacy non-zip "
                        "format); re-save it with torch >= 1.6 (torch.save(...)) in a trusted environment")
    raise UserError(f"not a PyTorch checkpoint: {path} (not a zip archive)")


def _is_tar(path: Path) -> bool:
    try:  # tarfile only parses headers here; nothing is extracted or opened
        return tarfile.is_tarfile(path)
    except Exception:  # noqa: BLE001 - any failure means "not a tar" for this purpose
        return False


def open_torch_zip(path: Path) -> TorchZip:
    """Validate the member layout and sizes of a torch zip checkpoint; read ``data.pkl``."""
    size = path.stat().st_size
    if not zipfile.is_zipfile(path):
        _refuse_non_zip(path)
    try:
        z = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise UserError(f"truncated or corrupt PyTorch checkpoint: {path} ({type(exc).__name__})") from exc
    try:
        return _check_layout(z, path, size)
    except BaseException:
        z.close()
        raise


def _check_layout(z: zipfile.ZipFile, path: Path, size: int) -> TorchZip:
    infos = z.infolist()
    if not infos:
        raise UserError(f"not a PyTorch checkpoint: {path} is an empty zip")
    if len(infos) > MAX_MEMBERS:
        raise UserError(f"refused to load: {path} has {len(infos)} zip members (limit {MAX_MEMBERS})")
    prefix = infos[0].filename.split("/", 1)[0]
    names: dict[str, zipfile.ZipInfo] = {}
    total = 0
    for info in infos:
        name = info.filename
        head, sep, rest = name.partition("/")
        if head != prefix or not sep or not rest:
            raise UserError(f"refused to load: {path} holds zip member {name!r} outside the single top folder "
                            f"'{prefix}/' of a torch.save checkpoint")
        if any(rest == h or rest.startswith(h) for h in _TORCHSCRIPT_HINTS):
            raise UnsafeCheckpointError(f"refused to load: {path} is a TorchScript archive (member {name!r}), not a training "
                            "checkpoint; TorchScript code is never loaded (nothing was executed)")
        if rest in names:
            raise UserError(f"refused to load: {path} holds zip member {name!r} twice")
        if rest not in _META_MEMBERS and rest not in ("data.pkl", "version") and not _RECORD_RE.fullmatch(rest):
            raise UserError(f"refused to load: {path} holds an unexpected zip member {name!r} (a torch.save "
                            "checkpoint has only data.pkl, version, byteorder and data/<n> records)")
        if info.flag_bits & 0x1:
            raise UserError(f"refused to load: zip member {name!r} of {path} is encrypted")
        if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
            raise UserError(f"refused to load: zip member {name!r} of {path} is compressed (torch.save never "
                            "compresses; compressed members can expand without bound)")
        total += info.file_size
        if info.file_size > size or total > size:
            raise UserError(f"truncated or corrupt PyTorch checkpoint: {path} (zip members declare {total} bytes, "
                            f"more than the file's {size})")
        names[rest] = info
    for required in ("data.pkl", "version"):
        if required not in names:
            raise UserError(f"not a PyTorch checkpoint: {path} has no '{prefix}/{required}' (is it a torch.save file?)")
    if names["data.pkl"].file_size > MAX_PICKLE_BYTES:
        raise UserError(f"refused to load: {path}: data.pkl is {names['data.pkl'].file_size} bytes "
                        f"(limit {MAX_PICKLE_BYTES}; official checkpoints hold well under 1 MB of pickle)")
    version = _read_member(z, names["version"], path).strip()
    if not version.isdigit() or not 1 <= int(version) <= 99:
        raise UserError(f"not a PyTorch checkpoint: {path} has an unreadable format version {version[:16]!r}")
    if "byteorder" in names:
        order = _read_member(z, names["byteorder"], path).strip()
        if order != b"little":
            raise UserError(f"unsupported checkpoint: {path} was saved on a {order[:16].decode('latin1')!r}-endian "
                            "machine (only little-endian is read)")
    for meta in _META_MEMBERS - {"byteorder"}:
        if meta in names:
            _read_member(z, names[meta], path)  # small; read so its CRC is checked too
    records = {_RECORD_RE.fullmatch(k).group(1): v for k, v in names.items() if _RECORD_RE.fullmatch(k)}
    return TorchZip(path=path, prefix=prefix, pickle=_read_member(z, names["data.pkl"], path),
                    records=records, _zip=z)

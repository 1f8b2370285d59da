"""A restricted unpickler for ``data.pkl`` of a torch zip checkpoint: nothing named in the pickle is executed.

Why not ``torch.load(pickle_module=...)``: torch decides by itself which loader gets the file (a zip holding
``constants.pkl`` goes to ``torch.jit.load``, which runs TorchScript ``__setstate__`` code before any
``find_class`` of ours is asked; a tar goes to the legacy loader, which extracts members). We therefore read
the zip ourselves (:mod:`exporter.checkpoint_zip`) and unpickle ``data.pkl`` here; torch only receives
finished bytes (``torch.frombuffer``).

What the pickle may name (``find_class``), by exact ``(module, name)`` pair, never by pattern for callables:

* classes of the official tree (``models.*``) and ``torch.nn.modules.*`` / ``torch.nn.parameter.*`` become
  inert :class:`PickledObject` placeholders that only record their pickled ``__dict__``;
* ``torch.<X>Storage`` become dtype markers, only usable inside a persistent id (not callable);
* a short list of callables that only rebuild data from arguments bounded by the pickle's own bytes
  (``collections.OrderedDict``, ``set``, ``list``, ... ``torch.Size``). ``bytes``/``bytearray`` are *not*
  allowed: ``bytearray(6_000_000_000)`` allocates 6 GB from a 30-byte pickle;
* tensor rebuilds are our own functions: they check offset/size/stride against the storage record that is
  actually present and return a view of it, so a tensor can never claim more memory than the file holds;
* numpy objects (``best_fitness``...) become inert placeholders: numpy's own ``ndarray.__setstate__`` can
  allocate from a declared shape and crashes on crafted object arrays, and we never need their values;
* ``getattr`` is allowed for exactly one pair, ``getattr(models.yolo.IDetect, 'forward')`` (the u7 seg
  tree pickles ``ISegment.detect = IDetect.forward``); it returns an inert marker. Any other pair is refused.

Before unpickling, :func:`prescan` walks the opcodes with :mod:`pickletools` (pure Python, runs nothing) and
refuses opcodes torch never writes, memo indices that are not the next free slot (a 6-byte edit that sets a
memo index of 1.4e9 made the C unpickler allocate 21 GB), and a pickle larger than :data:`MAX_PICKLE_BYTES`.
"""
from __future__ import annotations

import builtins
import codecs
import collections
import io
import math
import pickle
import pickletools
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .errors import UserError

MAX_PICKLE_BYTES = 32 << 20  # data.pkl of the full yolov7-e6e is ~0.4 MB; 80x headroom
MAX_TENSOR_DIMS = 8


class UnsafeCheckpointError(UserError):
    """The pickle names a global outside the allowlist, or uses it in a way we never allow."""


def _refuse(what: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"refused to load: the checkpoint's pickle references {what}, which is not part of an official YOLOv7 "
        "checkpoint (nothing was executed)")


class PickledObject:
    """Inert stand-in for a pickled class: keeps the pickled ``__dict__`` state, runs nothing."""

    _pickled_path = "?"

    def __setstate__(self, state: Any) -> None:
        # nn.Module pickles its __dict__; some objects pickle (dict, slots) pairs.
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict):
            state = state[0]
        self.__dict__["state"] = state if isinstance(state, dict) else {"_value": state}

    @property
    def class_path(self) -> str:
        return type(self)._pickled_path

    @property
    def class_name(self) -> str:
        return type(self)._pickled_path.rsplit(".", 1)[-1]

    def get(self, key: str, default: Any = None) -> Any:
        state = self.__dict__.get("state", {})
        return state.get(key, default) if isinstance(state, dict) else default

    def children(self) -> "collections.OrderedDict[str, PickledObject]":
        kids = self.get("_modules")
        return kids if isinstance(kids, dict) else collections.OrderedDict()


_placeholder_types: dict[str, type] = {}


def placeholder(path: str) -> type:
    """The (cached) placeholder class for a pickled class path."""
    if path not in _placeholder_types:
        _placeholder_types[path] = type(path.rsplit(".", 1)[-1], (PickledObject,), {"_pickled_path": path})
    return _placeholder_types[path]


class InertNumpy:
    """Stand-in for numpy's ``ndarray``/``dtype``/``scalar``: accepts its arguments and state, builds nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


@dataclass(frozen=True)
class PickledFunction:
    """Inert marker for a function the pickle refers to by name (never called)."""

    path: str


@dataclass(frozen=True)
class StorageType:
    """``torch.FloatStorage`` & co. inside a persistent id: only says which dtype the record holds."""

    name: str
    dtype: torch.dtype


class Storage:
    """One ``data/<key>`` record as a flat tensor of its dtype (a view of exactly the bytes in the file)."""

    def __init__(self, flat: torch.Tensor):
        self.flat = flat


_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "DoubleStorage": torch.float64,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


def _int(value: Any, what: str) -> int:
    if type(value) is not int:  # bool is an int subclass; neither belongs here
        raise UserError(f"corrupt checkpoint: tensor {what} is a {type(value).__name__}, not an int")
    return value


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *_: Any) -> torch.Tensor:
    """``torch._utils._rebuild_tensor(_v2)``, checked: the view must lie inside the storage record."""
    if not isinstance(storage, Storage):
        raise UserError("corrupt checkpoint: a tensor is rebuilt from something that is not a storage record")
    if not isinstance(size, (tuple, list)) or not isinstance(stride, (tuple, list)) or len(size) != len(stride) \
            or len(size) > MAX_TENSOR_DIMS:
        raise UserError("corrupt checkpoint: a tensor has a malformed size/stride")
    offset = _int(offset, "offset")
    size = [_int(s, "size") for s in size]
    stride = [_int(s, "stride") for s in stride]
    if offset < 0 or min(size, default=0) < 0 or min(stride, default=0) < 0:
        raise UserError("corrupt checkpoint: a tensor has a negative offset, size or stride")
    numel = storage.flat.numel()
    if math.prod(size) > 0:
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= numel:
            raise UserError(f"corrupt checkpoint: a tensor of size {tuple(size)} reaches element {last} of a storage "
                            f"record holding {numel}")
    elif offset > numel:
        raise UserError("corrupt checkpoint: a tensor's offset lies outside its storage record")
    return storage.flat.as_strided(size, stride, offset)


def _rebuild_parameter(data: Any, *_: Any) -> torch.Tensor:
    """``torch._utils._rebuild_parameter``: we only need the data (no grad, no hooks)."""
    if not isinstance(data, torch.Tensor):
        raise UserError("corrupt checkpoint: a parameter holds no tensor")
    return data


def _encode(text: Any, encoding: Any = "utf-8", errors: Any = "strict") -> bytes:
    """``_codecs.encode`` as numpy's protocol-2 pickles use it (str -> latin1 bytes); no other codec."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise _refuse(f"'_codecs.encode' with codec {encoding!r}")
    return codecs.encode(text, "latin1")


# (module, name) of the official tree's class whose attribute may be fetched with getattr, and the attribute.
_GETATTR_ALLOWED = {("models.yolo.IDetect", "forward")}


def _restricted_getattr(obj: Any, name: Any, *default: Any) -> PickledFunction:
    """``getattr`` for the one pair official seg checkpoints need; returns an inert marker, never the attribute."""
    path = getattr(obj, "_pickled_path", None) if isinstance(obj, type) and issubclass(obj, PickledObject) else None
    if default or path is None or not isinstance(name, str) or (path, name) not in _GETATTR_ALLOWED:
        shown = path or type(obj).__name__
        raise _refuse(f"'getattr({shown}, {name[:40]!r})'" if isinstance(name, str) else f"'getattr({shown}, ...)'")
    return PickledFunction(f"{path}.{name}")


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("_codecs", "encode"): _encode,
    ("numpy", "ndarray"): InertNumpy,
    ("numpy", "dtype"): InertNumpy,
}
for _mod in ("numpy.core.multiarray", "numpy._core.multiarray"):  # numpy-1 and numpy-2 pickles
    _ALLOWED[(_mod, "_reconstruct")] = InertNumpy
    _ALLOWED[(_mod, "scalar")] = InertNumpy
for _mod in ("builtins", "__builtin__"):  # py3 / py2-protocol names
    for _name in ("set", "frozenset", "dict", "list", "tuple", "int", "float", "bool", "str", "slice", "complex"):
        _ALLOWED[(_mod, _name)] = getattr(builtins, _name)
    _ALLOWED[(_mod, "getattr")] = _restricted_getattr
for _dt in ("float16", "float32", "float64", "bfloat16", "int8", "int16", "int32", "int64", "uint8", "bool"):
    _ALLOWED[("torch", _dt)] = getattr(torch, _dt)
for _name, _dtype in _STORAGE_DTYPES.items():
    _ALLOWED[("torch", _name)] = StorageType(_name, _dtype)

# Class paths that become placeholders: the official tree and torch's own module classes.
_PLACEHOLDER_PREFIXES = ("models.", "torch.nn.modules.", "torch.nn.parameter.")

# Every opcode torch.save (protocol 2) and older pickles of checkpoints use; anything else is refused.
# Not here on purpose: EXT1/2/4 (copyreg registry), INST/OBJ (protocol-0/1 calls), PERSID (text persistent id),
# NEXT_BUFFER/READONLY_BUFFER (out-of-band data).
_ALLOWED_OPS = frozenset("""
    PROTO FRAME STOP MARK POP POP_MARK DUP GLOBAL STACK_GLOBAL REDUCE BUILD NEWOBJ NEWOBJ_EX BINPERSID
    PUT BINPUT LONG_BINPUT MEMOIZE GET BINGET LONG_BINGET
    NONE NEWTRUE NEWFALSE INT BININT BININT1 BININT2 LONG LONG1 LONG4 FLOAT BINFLOAT
    STRING BINSTRING SHORT_BINSTRING UNICODE BINUNICODE SHORT_BINUNICODE BINUNICODE8 BINBYTES SHORT_BINBYTES
    BINBYTES8 BYTEARRAY8
    EMPTY_TUPLE TUPLE TUPLE1 TUPLE2 TUPLE3 EMPTY_LIST APPEND APPENDS LIST EMPTY_DICT DICT SETITEM SETITEMS
    EMPTY_SET ADDITEMS FROZENSET
""".split())


def _arg_end(data: bytes, pos: int, op: pickletools.OpcodeInfo) -> int:
    """Where the argument of ``op`` (starting at ``pos``) ends; ValueError if it runs past the data."""
    arg = op.arg
    if arg is None:
        return pos
    n = arg.n
    if n >= 0:
        end = pos + n
    elif n == pickletools.UP_TO_NEWLINE:
        end = data.index(b"\n", pos) + 1
        if op.name in ("GLOBAL", "INST"):  # module and name: two lines
            end = data.index(b"\n", end) + 1
    else:
        width = {pickletools.TAKEN_FROM_ARGUMENT1: 1, pickletools.TAKEN_FROM_ARGUMENT4: 4,
                 pickletools.TAKEN_FROM_ARGUMENT4U: 4, pickletools.TAKEN_FROM_ARGUMENT8U: 8}[n]
        if pos + width > len(data):
            raise ValueError("truncated length field")
        length = int.from_bytes(data[pos:pos + width], "little", signed=n == pickletools.TAKEN_FROM_ARGUMENT4)
        if length < 0:
            raise ValueError("negative length")
        end = pos + width + length
    if end > len(data):
        raise ValueError(f"opcode {op.name} runs past the end of the data")
    return end


# How each opcode moves the (simulated) stack: how many items it pops, or MARK = pop to the last mark.
_MARK = -1
_PUSH, _SETMARK, _NEW, _ADD, _GET, _PUT, _POP, _DUP, _NONE = range(9)
_EFFECT: dict[str, tuple[int, int]] = {  # name -> (kind, pops)
    **{n: (_PUSH, 0) for n in ("NONE NEWTRUE NEWFALSE INT BININT BININT1 BININT2 LONG LONG1 LONG4 FLOAT BINFLOAT "
                               "STRING BINSTRING SHORT_BINSTRING UNICODE BINUNICODE SHORT_BINUNICODE BINUNICODE8 "
                               "BINBYTES SHORT_BINBYTES BINBYTES8 BYTEARRAY8 EMPTY_TUPLE EMPTY_LIST EMPTY_DICT "
                               "EMPTY_SET GLOBAL").split()},
    "MARK": (_SETMARK, 0),
    **{n: (_NEW, _MARK) for n in ("TUPLE", "LIST", "DICT", "FROZENSET")},
    "TUPLE1": (_NEW, 1), "TUPLE2": (_NEW, 2), "TUPLE3": (_NEW, 3),
    "STACK_GLOBAL": (_NEW, 2), "BINPERSID": (_NEW, 1), "REDUCE": (_NEW, 2), "NEWOBJ": (_NEW, 2),
    "NEWOBJ_EX": (_NEW, 3),
    "APPEND": (_ADD, 1), "SETITEM": (_ADD, 2), "BUILD": (_ADD, 1),
    **{n: (_ADD, _MARK) for n in ("APPENDS", "SETITEMS", "ADDITEMS")},
    **{n: (_GET, 0) for n in ("GET", "BINGET", "LONG_BINGET")},
    **{n: (_PUT, 0) for n in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE")},
    "POP": (_POP, 1), "POP_MARK": (_POP, _MARK), "DUP": (_DUP, 0),
    **{n: (_NONE, 0) for n in ("PROTO", "FRAME", "STOP")},
}
# opcode byte -> (OpcodeInfo, fixed argument width or -1 when read from the data, kind, pops); None: refused
_OP_TABLE: list[tuple[Any, int, int, int] | None] = [None] * 256
for _op in pickletools.opcodes:
    if _op.name in _EFFECT:
        _OP_TABLE[ord(_op.code)] = (_op, -1 if _op.arg is not None and _op.arg.n < 0 else (_op.arg.n if _op.arg else 0),
                                    *_EFFECT[_op.name])
assert set(_EFFECT) == _ALLOWED_OPS
MAX_EXPANDED = 4_000_000  # objects in the pickle with shared references unrolled (fixtures: < 130,000)


def prescan(data: bytes) -> None:
    """Walk the opcodes without executing them; refuse what could make the unpickler (or us) work unboundedly.

    Checks: only opcodes torch writes; declared lengths within the data; each memo index the next free slot
    (a memo index of 1.4e9 made the C unpickler allocate 21 GB); a STOP at the end. The stack is simulated
    with one number per object: its size with every shared (memo) reference unrolled. A pickle can
    reference a tuple twice at each of 60 levels in a few hundred bytes; hashing it as a dict key or set
    member (or printing it) then visits 2**60 nodes inside the C unpickler, where no budget of ours applies.
    Anything above :data:`MAX_EXPANDED` is refused. A lean loop (``pickletools.genops`` took ~0.6 s on a
    yolov7-e6e pickle, this about half).
    """
    if len(data) > MAX_PICKLE_BYTES:
        raise UserError(f"refused to load: the checkpoint's pickle is {len(data)} bytes (limit {MAX_PICKLE_BYTES}); "
                        "official checkpoints hold well under 1 MB of pickle")
    table = _OP_TABLE
    limit = max(MAX_EXPANDED, 2 * len(data))
    memo: list[list[int]] = []
    stack: list[list[int]] = []  # one mutable [expanded size] cell per object
    marks: list[int] = []
    pos, size = 0, len(data)
    try:
        while True:
            if pos >= size:
                raise ValueError("no STOP opcode")
            entry = table[data[pos]]
            if entry is None:
                info = pickletools.code2op.get(chr(data[pos]))
                if info is None:
                    raise ValueError(f"unknown opcode {data[pos]:#x} at byte {pos}")
                raise UserError(f"refused to load: the checkpoint's pickle uses opcode {info.name} at byte {pos}, "
                                "which torch.save never writes (nothing was executed)")
            op, width, kind, pops = entry
            start = pos + 1
            pos = start + width if width >= 0 else _arg_end(data, start, op)
            if pos > size:
                raise ValueError(f"opcode {op.name} runs past the end of the data")
            if kind == _PUSH:
                stack.append([1])
                continue
            if kind == _GET:
                stack.append(memo[int(data[start:pos]) if op.name == "GET" else int.from_bytes(data[start:pos], "little")])
                continue
            if kind == _PUT:
                if op.name == "MEMOIZE":
                    index = len(memo)
                else:
                    index = int(data[start:pos]) if op.name == "PUT" else int.from_bytes(data[start:pos], "little")
                if index > len(memo):  # torch's pickler always uses the next free slot
                    raise UserError(f"corrupt checkpoint: pickle memo index {index} at byte {start - 1} skips ahead "
                                    f"of {len(memo)} entries (damaged or crafted data.pkl)")
                if index == len(memo):
                    memo.append(stack[-1])
                else:
                    memo[index] = stack[-1]
                continue
            if kind == _SETMARK:
                marks.append(len(stack))
                continue
            if kind == _NONE:
                if op.name == "STOP":
                    break
                continue
            if pops == _MARK:
                cut = marks.pop()
                if cut > len(stack):
                    raise ValueError("mark above the stack")
            else:
                cut = len(stack) - pops
                if cut < 0 or (marks and cut < marks[-1]):
                    raise ValueError(f"stack underflow at {op.name}")
            weight = sum(cell[0] for cell in stack[cut:])
            del stack[cut:]
            if kind == _NEW:
                stack.append([1 + weight])
                cell = stack[-1]
            elif kind == _ADD:
                cell = stack[-1]
                cell[0] += weight
            elif kind == _DUP:
                stack.append(stack[-1])
                continue
            else:  # _POP
                continue
            if cell[0] > limit:
                raise UserError(f"refused to load: the checkpoint's pickle builds an object of more than "
                                f"{limit} nodes from shared references (at byte {start - 1}; crafted data.pkl)")
    except UserError:
        raise
    except Exception as exc:  # truncated or malformed opcodes, stack misuse
        raise UserError(f"corrupt checkpoint: data.pkl is not a valid pickle ({first_line(exc)})") from exc


def first_line(exc: BaseException, limit: int = 160) -> str:
    """``Type: first line of the message`` (an empty message is fine: MemoryError() has none)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:limit]}" if lines else type(exc).__name__


class SafeUnpickler(pickle.Unpickler):
    """``find_class`` from the allowlist above; ``persistent_load`` builds storages from the zip's records."""

    def __init__(self, file: io.BytesIO, read_record: Callable[[str], bytes]):
        super().__init__(file)
        self._read_record = read_record
        self._storages: dict[str, tuple[torch.dtype, Storage]] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        path = f"{module}.{name}"
        if path.startswith(_PLACEHOLDER_PREFIXES):
            return placeholder(path)
        raise _refuse(f"'{path}'")

    def persistent_load(self, pid: Any) -> Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise UserError(f"corrupt checkpoint: unexpected persistent id in data.pkl (a {type(pid).__name__})")
        _, stype, key, _location, numel = pid
        if not isinstance(stype, StorageType) or not isinstance(key, str) or type(numel) is not int or numel < 0:
            raise UserError("corrupt checkpoint: malformed storage reference in data.pkl")
        if key in self._storages:
            dtype, storage = self._storages[key]
            if dtype != stype.dtype:
                raise UserError(f"corrupt checkpoint: storage record {key!r} is referenced as two dtypes")
            return storage
        raw = self._read_record(key)
        itemsize = torch.empty((), dtype=stype.dtype).element_size()
        if len(raw) != numel * itemsize:
            raise UserError(f"corrupt checkpoint: storage record {key!r} holds {len(raw)} bytes, the pickle declares "
                            f"{numel} x {itemsize}")
        flat = torch.frombuffer(bytearray(raw), dtype=stype.dtype) if raw else torch.empty(0, dtype=stype.dtype)
        storage = Storage(flat)
        self._storages[key] = (stype.dtype, storage)
        return storage


def unpickle(data: bytes, read_record: Callable[[str], bytes]) -> Any:
    """Prescan, then unpickle ``data.pkl``; every failure is one :class:`UserError` line."""
    prescan(data)
    try:
        return SafeUnpickler(io.BytesIO(data), read_record).load()
    except UserError:
        raise
    except MemoryError as exc:  # empty message; say what happened
        raise UserError("refused to load: unpickling the checkpoint ran out of memory (damaged or crafted data.pkl)") \
            from exc
    except RecursionError as exc:
        raise UserError("corrupt checkpoint: data.pkl nests too deeply") from exc
    except Exception as exc:  # TypeError from a REDUCE on a marker, UnpicklingError, ... all mean a bad file
        raise UserError(f"corrupt checkpoint: data.pkl could not be unpickled ({first_line(exc)})") from exc

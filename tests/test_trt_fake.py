"""Strict stand-ins for TensorRT objects, checked against the REAL bindings that are importable.

Without TensorRT's native libraries no Builder/Runtime/engine can exist, but the real Python bindings (made
importable by the trt-stub, see .ci/trt_api.sh) still describe every class, method signature, property and
enum of their exact version. ``FakeTrt`` makes objects that refuse what those bindings would refuse:
unknown attributes (e.g. ``BuilderFlag.FP16`` on 11.x is refused by the real enum itself), wrong arity or
keyword names, wrong enum or TensorRT class arguments, read-only properties. Calls are recorded in order.

This file also tests the fake itself, so that passing API tests mean something. Skips without tensorrt.
"""
from __future__ import annotations

import enum
import inspect
import re

import pytest

pytestmark = pytest.mark.trt_api

_NS = re.compile(r"\b(?:tensorrt_bindings\.tensorrt|tensorrt\.tensorrt|tensorrt_bindings|tensorrt)\.")
_SIG = r"^\s*(?:\d+\.\s+)?{name}\((.*)\)\s*(?:->\s*(.+?))?\s*$"


def import_trt():
    """The real bindings (real TensorRT or the API stub), or skip."""
    return pytest.importorskip("tensorrt", reason="TensorRT Python bindings not importable (run .ci/trt_api.sh)")


def _split(params: str) -> list[str]:
    out, depth, cur = [], 0, ""
    for ch in params:
        depth += ch in "([{<"
        depth -= ch in ")]}>"
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return out + ([cur.strip()] if cur.strip() else [])


def signatures(name: str, doc: str | None) -> list[tuple[list[tuple[str, str, bool]], str]]:
    """[(params [(name, type, has_default)], return type)] of every overload in a pybind11 docstring."""
    found = []
    for line in (doc or "").splitlines():
        m = re.match(_SIG.format(name=re.escape(name)), line)
        if not m or m.group(1).strip() == "*args, **kwargs":
            continue
        params = []
        for p in _split(_NS.sub("", m.group(1))):
            head, _, default = p.partition("=")
            pname, _, ptype = head.partition(":")
            params.append((pname.strip(), ptype.strip(), bool(default)))
        found.append(([p for p in params if p[0] != "self"], _NS.sub("", m.group(2) or "None").strip()))
    return found


class FakeTrt:
    """Factory and call log for strict fakes of one imported tensorrt module."""

    def __init__(self, trt, impl: dict | None = None):
        self.trt = trt
        self.impl = dict(impl or {})  # "Class.member" -> value (property/return) or callable (method body)
        self.calls: list[tuple[str, tuple, dict, object]] = []
        self.real = {n: c for n, c in vars(trt).items() if inspect.isclass(c)}

    # -- construction
    def obj(self, cls_name: str, **values) -> "Fake":
        fake = Fake(self, self.real[cls_name])
        for k, v in values.items():
            fake._check_member(k)
            fake._values[k] = v
        return fake

    def install(self, monkeypatch, classes=("Builder", "Runtime", "OnnxParser")) -> "FakeTrt":
        for name in classes:
            monkeypatch.setattr(self.trt, name, self._constructor(self.real[name]))
        registry = self.obj("IPluginRegistry")
        monkeypatch.setattr(self.trt, "get_plugin_registry", lambda: registry)
        real_init = self.trt.init_libnvinfer_plugins

        def init_plugins(*args, **kwargs):
            self._check_call("init_libnvinfer_plugins", signatures("init_libnvinfer_plugins", real_init.__doc__),
                             args, kwargs)
            self.calls.append(("init_libnvinfer_plugins", args, kwargs, None))
            return self.impl.get("init_libnvinfer_plugins", True)

        monkeypatch.setattr(self.trt, "init_libnvinfer_plugins", init_plugins)
        return self

    def _constructor(self, cls):
        def ctor(*args, **kwargs):
            fake = Fake(self, cls)
            self._check_call(f"{cls.__name__}.__init__", signatures("__init__", cls.__init__.__doc__), args, kwargs)
            self.calls.append((f"{cls.__name__}.__init__", args, kwargs, fake))
            return fake

        return ctor

    # -- queries for assertions
    def names(self) -> list[str]:
        return [c[0] for c in self.calls]

    def args(self, qual: str) -> list[tuple]:
        return [c[1] for c in self.calls if c[0] == qual]

    # -- checking
    def type_ok(self, value, tname: str) -> bool:
        t = tname.replace("typing.", "").replace("typing_extensions.", "").replace("nvinfer1::", "").strip()
        if t.startswith("Optional["):
            return value is None or self.type_ok(value, t[9:-1])
        cls = self.real.get(t)
        if cls is not None:
            if isinstance(getattr(cls, "__members__", None), dict):  # pybind11 enum: exact type only
                return isinstance(value, cls)
            if isinstance(value, Fake):
                return issubclass(value._cls, cls)
            if cls.__name__ in ("Dims", "Dims2", "Dims3", "Dims4", "Permutation"):
                try:
                    cls(value)
                    return True
                except Exception:  # noqa: BLE001
                    return False
            return value is None or isinstance(value, cls)
        if t in ("int", "SupportsInt"):
            return isinstance(value, int) or hasattr(value, "__index__") and not isinstance(value, (str, float))
        if t in ("float", "SupportsFloat"):
            return isinstance(value, (int, float))
        if t == "bool":
            return isinstance(value, bool)
        if t == "str":
            return isinstance(value, str)
        if t in ("buffer", "Buffer"):
            try:
                memoryview(value)
                return True
            except TypeError:
                return False
        if t in ("tuple", "list"):
            return isinstance(value, (tuple, list)) and type(value).__name__ == t
        return True  # capsules, callables, containers: not checked

    def _check_call(self, qual: str, overloads, args, kwargs) -> str:
        errors = []
        for params, ret in overloads:
            sig = inspect.Signature([inspect.Parameter(
                n, inspect.Parameter.POSITIONAL_ONLY if re.fullmatch(r"arg\d+", n)
                else inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None if d else inspect.Parameter.empty)
                for n, _, d in params])
            try:
                bound = sig.bind(*args, **kwargs)
            except TypeError as exc:
                errors.append(str(exc))
                continue
            bad = [f"{n}={bound.arguments[n]!r} (expects {t})" for n, t, _ in params
                   if n in bound.arguments and not self.type_ok(bound.arguments[n], t)]
            if not bad:
                return ret
            errors.append(", ".join(bad))
        raise TypeError(f"{qual}: incompatible arguments for TensorRT {self.trt.__version__}: {'; '.join(errors)}")

    def default(self, tname: str):
        t = tname.replace("typing.", "").replace("nvinfer1::", "").strip()
        simple = {"None": None, "bool": True, "int": 0, "float": 0.0, "str": "", "object": None}
        if t in simple:
            return simple[t]
        if t.lower().startswith(("list", "tuple")):
            return []
        cls = self.real.get(t)
        if cls is None:
            return None
        if isinstance(getattr(cls, "__members__", None), dict):
            return next(iter(cls.__members__.values()))
        if cls.__name__ == "Dims":
            return cls()
        return Fake(self, cls)


class Fake:
    """An instance stand-in for TensorRT class ``cls``; see FakeTrt."""

    def __init__(self, ctx: FakeTrt, cls):
        object.__setattr__(self, "_ctx", ctx)
        object.__setattr__(self, "_cls", cls)
        object.__setattr__(self, "_values", {})

    def __repr__(self):
        return f"<fake {self._cls.__name__} of TensorRT {self._ctx.trt.__version__}>"

    def _check_member(self, name: str):
        try:
            return inspect.getattr_static(self._cls, name)
        except AttributeError:
            raise AttributeError(f"'{self._cls.__name__}' has no attribute '{name}' in TensorRT "
                                 f"{self._ctx.trt.__version__}") from None

    def __getattr__(self, name):
        raw = self._check_member(name)
        qual = f"{self._cls.__name__}.{name}"
        if isinstance(raw, property):
            if name in self._values:
                return self._values[name]
            if qual in self._ctx.impl:
                return self._ctx.impl[qual]
            doc = (raw.fget.__doc__ or "").strip().splitlines()
            m = re.search(r"->\s*(.+)$", doc[0]) if doc else None
            return self._ctx.default(_NS.sub("", m.group(1)) if m else "None")
        overloads = signatures(name, getattr(raw, "__doc__", ""))

        def method(*args, **kwargs):
            ret = self._ctx._check_call(qual, overloads, args, kwargs)
            self._ctx.calls.append((qual, args, kwargs, self))
            body = self._values.get(name, self._ctx.impl.get(qual, _MISSING))
            if body is _MISSING:
                return self._ctx.default(ret)
            return body(*args, **kwargs) if callable(body) and not isinstance(body, Fake) else body

        return method

    def __setattr__(self, name, value):
        raw = self._check_member(name)
        if not isinstance(raw, property) or raw.fset is None:
            raise AttributeError(f"'{self._cls.__name__}.{name}' is not a settable property")
        doc = (raw.fset.__doc__ or "").strip().splitlines()
        m = re.match(r"^\((.*)\)", doc[0]) if doc else None
        params = _split(_NS.sub("", m.group(1))) if m else []
        if len(params) >= 2 and ":" in params[1]:
            t = params[1].split(":", 1)[1].strip()
            if not self._ctx.type_ok(value, t):
                raise TypeError(f"{self._cls.__name__}.{name} = {value!r}: expects {t}")
        self._ctx.calls.append((f"{self._cls.__name__}.{name}=", (value,), {}, self))
        self._values[name] = value


_MISSING = object()


# ---------------------------------------------------------------- tests of the fake itself

def test_fake_refuses_what_the_real_bindings_refuse(monkeypatch):
    trt = import_trt()
    fakes = FakeTrt(trt).install(monkeypatch)
    builder = trt.Builder(trt.Logger())
    config = builder.create_builder_config()
    assert isinstance(config, Fake) and config._cls is fakes.real["IBuilderConfig"]
    with pytest.raises(TypeError):
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE)  # missing argument
    with pytest.raises(TypeError):
        config.set_flag(trt.MemoryPoolType.WORKSPACE)  # wrong enum
    with pytest.raises(TypeError):
        config.hardware_compatibility_level = 1  # an int is not the enum
    with pytest.raises(AttributeError):
        config.max_workspace_size = 1 << 30  # removed in TensorRT 10
    with pytest.raises(AttributeError):
        builder.build_engine(None, config)  # removed in TensorRT 10
    with pytest.raises(AttributeError):
        config.num_optimization_profiles = 2  # read-only
    with pytest.raises(TypeError):
        trt.OnnxParser(builder.create_network(0))  # logger missing
    with pytest.raises(TypeError):
        trt.init_libnvinfer_plugins(None)
    major = int(trt.__version__.split(".")[0])
    if major >= 11:
        assert not hasattr(trt.BuilderFlag, "FP16") and not hasattr(trt.BuilderFlag, "INT8")
        with pytest.raises(AttributeError):
            config.int8_calibrator = None
        with pytest.raises(AttributeError):
            fakes.obj("IPluginRegistry").get_plugin_creator("EfficientNMS_TRT", "1", "")
    else:
        config.set_flag(trt.BuilderFlag.FP16)
        assert fakes.args("IBuilderConfig.set_flag") == [(trt.BuilderFlag.FP16,)]


def test_fake_records_calls_and_returns_configured_values(monkeypatch):
    trt = import_trt()
    fakes = FakeTrt(trt, impl={"Builder.build_serialized_network": b"PLAN"}).install(monkeypatch)
    builder = trt.Builder(trt.Logger())
    network = builder.create_network(0)
    assert builder.build_serialized_network(network, builder.create_builder_config()) == b"PLAN"
    tensor = fakes.obj("ITensor", name="images", shape=trt.Dims([-1, 3, 64, 64]))
    assert tensor.name == "images" and tuple(tensor.shape) == (-1, 3, 64, 64)
    with pytest.raises(AttributeError):
        fakes.obj("ITensor", no_such_property=1)
    assert fakes.names() == ["Builder.__init__", "Builder.create_network", "Builder.create_builder_config",
                             "Builder.build_serialized_network"]


def test_real_objects_cannot_be_created_under_the_stub():
    trt = import_trt()
    if not getattr(trt, "__trt_stub__", False):
        pytest.skip("real TensorRT libraries present")
    with pytest.raises(TypeError, match="nullptr"):
        trt.Builder(trt.Logger())


def test_enum_types_are_distinct():
    trt = import_trt()
    assert isinstance(trt.BuilderFlag.VERSION_COMPATIBLE, trt.BuilderFlag)
    assert not isinstance(trt.BuilderFlag.VERSION_COMPATIBLE, trt.MemoryPoolType)
    assert isinstance(trt.BuilderFlag, enum.EnumMeta) or hasattr(trt.BuilderFlag, "__members__")

"""ONNX metadata <-> ModelInfo: the one reader and writer of our ``yolo7_export.*`` metadata_props.

Bottom layer, and duck-typed on purpose (anything with a ``metadata_props`` list of key/value entries,
i.e. an ``onnx.ModelProto``): the ONNX Runtime backend reads an artifact's facts without importing onnx,
torch or the exporter. The pipeline writes it once, at the end (``onnx_export.finalize``); the stages between
(FP16, the NMS/keypoint/mask tails) pass ModelInfo as a value and return graphs without it. Only INT8's Q/DQ
builder still uses :func:`copy_metadata`: recovery evaluates its graphs through the ONNX Runtime backend.
"""
from __future__ import annotations

from .contract import ModelInfo
from .errors import UserError

FOREIGN = ("this ONNX was not made by yolo7-export (no yolo7_export.* metadata); "
           "export it from the checkpoint with yolo7-export")


def info_from_props(props: dict[str, str]) -> ModelInfo:
    """Our metadata from a plain key/value dict (e.g. ONNX Runtime's custom_metadata_map)."""
    try:
        return ModelInfo.from_metadata(dict(props))
    except KeyError as exc:
        raise UserError(FOREIGN) from exc
    except (ValueError, TypeError) as exc:  # ours, but a value outside the contract (newer tool, edited file)
        raise UserError(f"unreadable yolo7-export metadata ({exc}); re-export it with this yolo7-export") from exc


def read_info(proto) -> ModelInfo:
    """Our metadata from an ONNX ModelProto; a clear error for a foreign ONNX."""
    return info_from_props({p.key: p.value for p in proto.metadata_props})


def write_metadata(proto, info: ModelInfo) -> None:
    """Replace the graph's metadata with ``info``, keys sorted (equal inputs give equal bytes)."""
    del proto.metadata_props[:]
    for key, value in sorted(info.to_metadata().items()):
        proto.metadata_props.add(key=key, value=value)


def copy_metadata(src, dst) -> None:
    """Carry our metadata over to a graph rebuilt by another tool (AutoCast, quantize_static and
    onnx-graphsurgeon all drop it); runtimes read the artifact's ModelInfo from it."""
    del dst.metadata_props[:]
    for prop in src.metadata_props:
        dst.metadata_props.add(key=prop.key, value=prop.value)

"""The report's artifact rows as dataclasses: built by the harness, read by attribute in report.py and the CLI.

Why typed: a row crosses three modules (harness -> report -> cli summary) and the gates; a misspelt key in
a dict would surface as a silent ``None`` in a table, a misspelt attribute fails at once. The measured
sections (mAP, parity, latency, masks) stay the JSON-ready dicts that ``evaluation/`` results give with
``to_dict()``: they are written to report.json as they are. ``to_json`` is the one place a row becomes a
dict, and it keeps report.json's layout: the keys that only some rows carry (a reference row has no
``delta_basis``, a skipped one no ``seconds``) are left out when unset, as before.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Literal

ArtifactKind = Literal["pytorch", "onnx", "tensorrt"]


@dataclass
class KeypointSection:
    """Pose artifacts: COCO keypoint AP (OKS) and, for non-reference artifacts, keypoint parity with PyTorch
    (``KeypointMapResult`` / ``KeypointParity`` from evaluation/keypoints.py, as dicts)."""

    ap: dict
    parity: dict | None = None


# Keys only some rows carry: left out of report.json when None (the layout report.json always had).
_OPTIONAL = ("delta_basis", "reference_map50_95", "mask_parity", "keypoints", "mask", "mem_kind", "seconds")


@dataclass
class ArtifactRow:
    """One artifact (or the PyTorch reference) in the report: what it is, then what was measured on it."""

    name: str  # the file name, or parent/name when two files share a name
    path: str = ""
    kind: ArtifactKind = "onnx"
    runtime: str = ""  # "PyTorch CPU", "ONNX Runtime CPU", "TensorRT"
    precision: str = "?"
    nms: str = "?"  # none | onnx | portable | efficient ("?" when the artifact could not be read)
    batch: int | None = None  # the artifact's fixed batch; None when dynamic
    size_mb: float | None = None
    sha256: str = ""
    reference: bool = False  # the PyTorch FP32 reference every other row is compared with
    skipped: str | None = None  # why it was not run here (no TensorRT, EfficientNMS_TRT in ONNX Runtime)
    map: dict | None = None  # MapResult.to_dict()
    delta_ap: float | None = None  # AP points (x100) against the PyTorch mAP named in delta_basis
    parity: dict | None = None  # ParityResult.to_dict(); None for the reference
    latency: list[dict] = field(default_factory=list)  # one LatencyResult.to_dict() per batch size
    peak_mem_mb: float | None = None
    delta_basis: str | None = None
    reference_map50_95: float | None = None
    mask_parity: dict | None = None  # segment artifacts: MaskParity.to_dict()
    keypoints: KeypointSection | None = None  # pose artifacts
    mask: dict | None = None  # segment artifacts: MaskMapResult.to_dict()
    mem_kind: str | None = None
    seconds: float | None = None

    def to_json(self) -> dict:
        out = asdict(self)
        for key in _OPTIONAL:
            if out[key] is None:
                del out[key]
        return out

    @classmethod
    def from_json(cls, data: dict) -> "ArtifactRow":
        """A row read back from a saved report.json (``write_report`` can re-render one)."""
        known = {f.name for f in fields(cls)}
        row = cls(**{k: v for k, v in data.items() if k in known})
        if isinstance(row.keypoints, dict):
            row.keypoints = KeypointSection(**row.keypoints)
        return row


def report_json(report: dict) -> dict:
    """The report dict with its rows as plain dicts: what report.json holds (the JSON boundary)."""
    return report | {"artifacts": [r.to_json() if isinstance(r, ArtifactRow) else r for r in report["artifacts"]]}


def artifact_rows(report: dict) -> list[ArtifactRow]:
    """The report's rows, typed, whether it came from the harness or from a saved report.json."""
    return [r if isinstance(r, ArtifactRow) else ArtifactRow.from_json(r) for r in report["artifacts"]]

"""Run every check over every artifact, write the report, then apply the CI gates.

Order matters for honesty: the PyTorch FP32 reference runs first on the same data, the same letterboxed
parity batch and the same protocol as every artifact; the report is written *before* a gate can fail, so a
red CI job still leaves the numbers that explain it. Artifacts that cannot run here (a TensorRT engine
without TensorRT or a GPU, an EfficientNMS_TRT graph in ONNX Runtime) are listed as skipped, with why.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from runtimes.base import Detector, open_backend
from runtimes.contract import ModelInfo
from runtimes.preprocess import preprocess, read_image

from ..errors import UserError
from ..evaluation.dataset import Dataset
from ..evaluation.evaluate import EVAL_CONFIG, evaluate_map
from ..evaluation.latency import MemoryPeak, measure_latency
from ..evaluation.parity import check_parity, reference_config
from ..evaluation.masks import evaluate_mask_map, has_masks, load_labels, mask_parity
from .environment import describe_device, ort_device, report_versions, trt_unavailable_reason
from .rows import ArtifactRow, KeypointSection

log = logging.getLogger("yolo7_export")
CHECK_SETTINGS: dict = {"runs": 20, "warmup": 3}  # `yolo7-export --check`: fewer runs than yolo7-bench's default
ENGINE_SUFFIXES = (".engine", ".plan", ".trt")


class GateFailure(UserError):
    """A CI gate failed (the report was written); its own exit code so CI can tell it from bad input."""

    exit_code = 3


@dataclass
class Gates:
    max_map_drop: float | None = None  # AP points (mAP50-95 x 100) below the PyTorch reference
    max_latency_ms: float | None = None  # model-only median at the smallest batch measured
    min_parity_cos: float | None = None  # raw-output cosine similarity with PyTorch


@dataclass
class BenchConfig:
    checkpoint: Path
    artifacts: list[Path]
    out_dir: Path
    data: Path | None = None
    imgsz: tuple[int, int] | None = None  # None: the artifacts' own size (they must agree)
    batches: tuple[int, ...] = (1, 8, 32)
    runs: int = 30
    warmup: int = 5
    device: str = "cpu"
    max_images: int | None = None  # evaluate on the first N images only (quick runs)
    parity_images: int = 8
    eval_batch: int = 8
    threads: int | None = None  # CPU threads for PyTorch and ONNX Runtime (None: their defaults)
    gates: Gates = field(default_factory=Gates)
    progress: bool = True
    reference: tuple | None = None  # (Checkpoint, fused model) already loaded from `checkpoint` (--check)



@dataclass
class _Planned:
    path: Path
    kind: str  # pytorch | onnx | tensorrt
    info: ModelInfo | None = None
    skipped: str | None = None
    name: str = ""  # shown in the report: the file name, or parent/name when two files share a name

    def __post_init__(self):
        self.name = self.name or self.path.name


def run_bench(cfg: BenchConfig) -> dict:
    """All checks -> report files in cfg.out_dir -> the report dict; raises GateFailure after writing."""
    from .report import write_report

    t0 = time.perf_counter()
    if cfg.data is None:
        raise UserError("a labelled set is needed for the check: pass --data (COCO json, or images with YOLO labels)")
    if cfg.runs < 1 or cfg.warmup < 0 or cfg.parity_images < 1 or any(b < 1 for b in cfg.batches):
        raise UserError("--runs, --parity-images and every --batches value must be >= 1, --warmup >= 0")
    if not Path(cfg.checkpoint).is_file():
        raise UserError(f"checkpoint not found: {cfg.checkpoint}")
    planned = [_plan(Path(p)) for p in cfg.artifacts]
    names = [p.path.name for p in planned] + [Path(cfg.checkpoint).name]
    for p in planned:
        if names.count(p.path.name) > 1:
            p.name = f"{p.path.parent.name}/{p.path.name}"
    imgsz = _resolve_imgsz(cfg.imgsz, planned)
    dataset = load_labels(cfg.data).subset(cfg.max_images)  # box labels, or YOLO-seg / COCO masks
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    ref = Detector(open_backend(cfg.checkpoint, device=cfg.device, imgsz=imgsz, loaded=cfg.reference))
    imgsz = tuple(ref.info.imgsz)  # the checkpoint's default when neither --img nor an artifact says
    live = [p for p in planned if not p.skipped and p.info is not None]
    rect = bool(live) and all(p.info.dynamic_hw for p in live)
    if rect:  # every artifact takes any stride multiple (--dynamic): all, PyTorch too, letterbox per batch
        ref.info.dynamic_hw, ref.info.min_imgsz = True, max(tuple(p.info.min_imgsz or (0, 0)) for p in live)
    dataset = dataset.for_model(ref.info.names)
    for p in planned:
        _check_same_model(p, ref.info, cfg.checkpoint)
    ref_batches = _preflight(planned, cfg)
    if ref.info.task == "pose":  # a set without keypoints (or another count) fails now, not after the timing
        from ..evaluation.keypoints import keypoint_gt

        keypoint_gt(dataset, ref.info.nkpt)

    parity_imgs = [read_image(r.path) for r in dataset.images[: cfg.parity_images]]
    parity_batch, _ = preprocess(parity_imgs, imgsz)
    ref_out = ref.run(parity_batch)
    rows = [_measure(_Planned(Path(cfg.checkpoint), "pytorch", ref.info), ref, replace(cfg, batches=ref_batches),
                     dataset, parity_imgs, None, None)]
    ref_maps = {None: rows[0].map["map50_95"]}  # NMS settings -> PyTorch mAP under them
    for p in planned:
        if p.skipped:
            rows.append(replace(_row(p, cfg), skipped=p.skipped))
            log.info("skipped %s: %s", p.name, p.skipped)
            continue
        with Detector(open_backend(p.path, device=_device(p, cfg), **_kwargs(p, cfg))) as det:
            rows.append(_measure(p, det, cfg, dataset, parity_imgs, (parity_batch, ref, ref_out), ref_maps))
    ref.close()

    gate_rows, failures = apply_gates(rows, cfg.gates)
    report = {
        "tool": "yolo7-bench", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": report_versions(), "device": describe_device(cfg.threads),
        "settings": {"checkpoint": str(cfg.checkpoint), "data": str(dataset.source), "n_images": len(dataset),
                     "n_labels": dataset.n_labels, "imgsz": list(imgsz), "batches": list(cfg.batches),
                     "runs": cfg.runs, "warmup": cfg.warmup, "device": cfg.device, "parity_images": len(parity_imgs),
                     "protocol": asdict(EVAL_CONFIG), "evaluator": "faster-coco-eval",
                     "threads_note": _threads_note(cfg.threads)},
        "artifacts": rows, "gates": [asdict(g) for g in gate_rows], "passed": not failures, "failures": failures,
        "notes": [*([f"peak memory {CPU_MEMORY_NOTE}"] if cfg.device == "cpu" else []),
                  ("rectangular letterbox (smallest stride multiple per batch) for every artifact: all are --dynamic"
                   if rect else
                   "square letterbox for every artifact (the official test.py pads rectangular batches instead, "
                   "so its mAP can differ by a few tenths of an AP point)")],
        "seconds": round(time.perf_counter() - t0, 1),
    }
    paths = write_report(report, cfg.out_dir)
    log.info("report: %s", ", ".join(str(p) for p in paths.values()))
    if failures:
        raise GateFailure(f"gate failed: {'; '.join(failures)} (report: {paths['report.md']})")
    return report


def _preflight(planned: list[_Planned], cfg: BenchConfig) -> tuple[int, ...]:
    """Before anything is measured: open every runnable artifact once (a broken one stops the run now, not
    after minutes of PyTorch timing), refuse a run where no artifact can run, and return the batch sizes
    the PyTorch reference must be timed at: only those some artifact is timed at."""
    runnable = [p for p in planned if not p.skipped]
    if planned and not runnable:
        raise UserError("nothing to check on this machine: " + "; ".join(f"{p.name}: {p.skipped}" for p in planned))
    batches: set[int] = set()
    for p in runnable:
        with Detector(open_backend(p.path, device=_device(p, cfg), **_kwargs(p, cfg))) as det:
            batches.update(_batches_for(det, cfg.batches))
    for p in planned:
        if p.skipped:
            log.warning("will skip %s: %s", p.name, p.skipped)
    return tuple(sorted(batches)) if batches else cfg.batches


def _plan(path: Path) -> _Planned:
    """What an artifact is, read from its file without running it; skips decided here."""
    if not path.is_file():
        raise UserError(f"artifact not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        import onnx

        from runtimes.metadata import read_info

        try:
            info = read_info(onnx.load(str(path), load_external_data=False))
        except UserError as exc:
            raise UserError(f"{path.name}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends
            raise UserError(f"not a valid ONNX file: {path} ({type(exc).__name__})") from None
        skipped = ("EfficientNMS_TRT tail: runs only in TensorRT (export --nms onnx or none for ONNX Runtime)"
                   if info.nms == "efficient" else None)
        return _Planned(path, "onnx", info, skipped)
    if suffix in ENGINE_SUFFIXES:
        return _Planned(path, "tensorrt", _engine_info(path), trt_unavailable_reason(_engine_library(path)))
    raise UserError(f"don't know how to check '{path.name}': expected .onnx or .engine/.plan artifacts "
                    f"(the .pt checkpoint is the first argument)")


def _engine_library(path: Path) -> str:
    """'tensorrt' or 'tensorrt-rtx' from the engine's sidecar (decides which library must be present here)."""
    from runtimes.trt_backend import read_sidecar

    try:
        return str(read_sidecar(path)["tensorrt"].get("library", "tensorrt"))
    except (UserError, KeyError, TypeError, AttributeError):
        return "tensorrt"


def _engine_info(path: Path) -> ModelInfo | None:
    """The engine's model info from its build sidecar (no TensorRT needed); None when there is none."""
    from runtimes.trt_backend import model_info, read_sidecar

    try:
        return model_info(read_sidecar(path))
    except (UserError, KeyError, ValueError, TypeError):
        return None  # opening the engine later says what is wrong; a skipped engine needs no info


def _resolve_imgsz(requested: tuple[int, int] | None, planned: list[_Planned]) -> tuple[int, int] | None:
    sizes = {p.name: tuple(p.info.imgsz) for p in planned if p.info is not None}
    if requested is not None:
        for name, size in sizes.items():
            if size != tuple(requested):
                raise UserError(f"{name} takes {size[0]}x{size[1]} input but --img is {requested[0]}x{requested[1]}; "
                                f"pass --img {size[0]} {size[1]} or re-export it at that size")
        return tuple(requested)
    if len(set(sizes.values())) > 1:
        detail = ", ".join(f"{n} {s[0]}x{s[1]}" for n, s in sizes.items())
        raise UserError(f"artifacts have different input sizes ({detail}); check each size in its own run with --img")
    return next(iter(sizes.values()), None)


def _check_same_model(p: _Planned, ref: ModelInfo, checkpoint: Path) -> None:
    if p.info is None:
        return
    if p.info.source_sha256 and ref.source_sha256 and p.info.source_sha256 != ref.source_sha256:
        raise UserError(f"{p.name} was exported from another checkpoint than {checkpoint.name} "
                        f"(sha256 {p.info.source_sha256[:12]} vs {ref.source_sha256[:12]}); parity would be meaningless")
    if p.info.nc != ref.nc:
        raise UserError(f"{p.name} predicts {p.info.nc} classes but {checkpoint.name} has {ref.nc}")
    if p.info.task != ref.task:
        raise UserError(f"{p.name} is a {p.info.task} model but {checkpoint.name} is a {ref.task} checkpoint; "
                        "check an artifact against the checkpoint it was exported from")


def _device(p: _Planned, cfg: BenchConfig) -> str:
    return {"onnx": ort_device(cfg.device), "tensorrt": "cuda"}.get(p.kind, cfg.device)


def _kwargs(p: _Planned, cfg: BenchConfig) -> dict:
    return {"threads": cfg.threads} if p.kind == "onnx" and cfg.threads else {}


_RUNTIMES = {"pytorch": "PyTorch", "onnx": "ONNX Runtime", "tensorrt": "TensorRT"}


def _row(p: _Planned, cfg: BenchConfig) -> ArtifactRow:
    from .. import checkpoint as ckpt_mod

    info = p.info
    return ArtifactRow(name=p.name, path=str(p.path), kind=p.kind,
                       runtime=_RUNTIMES[p.kind] + (f" {_device(p, cfg).upper()}" if p.kind != "tensorrt" else ""),
                       precision=info.precision if info else "?", nms=info.nms if info else "?",
                       batch=info.batch if info else None, size_mb=round(p.path.stat().st_size / 1e6, 3),
                       sha256=ckpt_mod.sha256_file(p.path), reference=p.kind == "pytorch")


def _measure(p: _Planned, det: Detector, cfg: BenchConfig, dataset: Dataset, images: list[np.ndarray],
             parity_ctx, ref_maps: dict | None) -> ArtifactRow:
    """mAP, parity (non-reference), latency sweep, peak memory of one artifact."""
    t0 = time.perf_counter()
    p.info = det.info
    row = _row(p, cfg)
    cuda = det.backend.describe().get("device", "").startswith("cuda") or p.kind == "tensorrt"
    with MemoryPeak(cuda) as mem:
        res = evaluate_map(det, dataset, batch_size=cfg.eval_batch, progress=cfg.progress, desc=f"{p.name} mAP",
                           imgsz=cfg.imgsz)
        row.map = res.to_dict()
        if parity_ctx is not None:
            batch, ref, ref_out = parity_ctx
            ref_map, row.delta_basis = _reference_map(p.info, ref, dataset, cfg, ref_maps)
            row.reference_map50_95 = ref_map
            row.delta_ap = round(100 * (res.map50_95 - ref_map), 3)
            row.parity = check_parity(ref, det, batch, ref_out).to_dict()
            if p.info.task == "segment":  # masks of matched detections vs PyTorch, same images
                row.mask_parity = mask_parity(ref, det, images).to_dict()
        if p.info.task == "pose":  # COCO keypoint AP (OKS) beside box mAP; keypoint parity vs PyTorch
            row.keypoints = _keypoints(det, cfg, dataset, parity_ctx)
        if p.info.task == "segment" and has_masks(dataset):  # COCO segm beside box mAP (seg val.py protocol)
            row.mask = evaluate_mask_map(det, dataset, batch_size=cfg.eval_batch, progress=cfg.progress).to_dict()
        for b in _batches_for(det, cfg.batches):
            lat = measure_latency(det, images, b, runs=cfg.runs, warmup=cfg.warmup, progress=cfg.progress,
                                  desc=f"{p.name} b{b}", cuda=cuda)
            row.latency.append(_attributable_memory(lat.to_dict()))
    row.peak_mem_mb, row.mem_kind = (mem.peak_mb, mem.kind) if cuda else (None, CPU_MEMORY_NOTE)
    row.seconds = round(time.perf_counter() - t0, 1)
    lat0 = row.latency[0] if row.latency else None
    log.info("%s: mAP50-95 %.4f mAP50 %.4f%s", p.name, res.map50_95, res.map50,
             f", b{lat0['batch']} p50 {lat0['model_ms']['p50']:.2f} ms" if lat0 else "")
    return row


def _keypoints(det: Detector, cfg: BenchConfig, dataset: Dataset, parity_ctx) -> KeypointSection:
    """Keypoint AP and (artifacts only) keypoint parity, as dicts of evaluation/keypoints.py's results."""
    from ..evaluation.keypoints import evaluate_keypoints, keypoint_parity

    out = KeypointSection(ap=evaluate_keypoints(det, dataset, batch_size=cfg.eval_batch,
                                                progress=cfg.progress).to_dict())
    if parity_ctx is not None:
        batch, ref, ref_out = parity_ctx
        out.parity = keypoint_parity(ref, det, batch, ref_out, reference_config(det.info)).to_dict()
    return out


CPU_MEMORY_NOTE = ("not reported on CPU: the process's peak-RSS growth cannot be attributed to one artifact "
                   "(memory freed by the PyTorch reference or the mAP pass is reused, so ONNX Runtime showed 0.0 MB "
                   "at batch 1 and 8)")


def _attributable_memory(lat: dict) -> dict:
    """Keep a peak-memory figure only where it measures this artifact (the CUDA allocator's peak)."""
    if not str(lat.get("mem_kind", "")).startswith("cuda"):
        lat["peak_mem_mb"], lat["mem_kind"] = None, CPU_MEMORY_NOTE
    return lat


def _reference_map(info: ModelInfo, ref: Detector, dataset: Dataset, cfg: BenchConfig, cache: dict):
    """PyTorch's mAP to compare with: the protocol's, or, for an NMS-tail artifact, PyTorch under that tail's
    own conf/IoU/top-k (a conf 0.25 top-100 tail must not be blamed for the NMS settings it was given)."""
    if info.nms == "none":
        return cache[None], "PyTorch, official protocol"
    nms = reference_config(info)
    key = tuple(sorted(asdict(nms).items()))
    if key not in cache:
        cache[key] = evaluate_map(ref, dataset, batch_size=cfg.eval_batch, progress=cfg.progress,
                                  desc="PyTorch mAP (same NMS)", config=nms).map50_95
    return cache[key], (f"PyTorch with the same NMS (conf {nms.conf:g}, IoU {nms.iou:g}, top-{nms.max_det}, "
                        f"{'multi-label' if nms.multi_label else 'best class'})")


def _batches_for(det: Detector, batches: tuple[int, ...]) -> list[int]:
    """A fixed-batch artifact is timed at its batch only; a dynamic one at each requested size it allows
    (a TensorRT engine: up to its profile's maximum, ``--max-batch`` at build time)."""
    fixed = det.backend.fixed_batch
    if fixed:
        return [fixed]
    limit = det.backend.max_batch
    return sorted({b for b in batches if not limit or b <= limit}) or [1]


@dataclass(frozen=True)
class GateResult:
    """One gate checked on one artifact: a row of the report's Gates table (``asdict`` in report.json)."""

    gate: str  # max-map-drop | max-latency-ms | min-parity-cos
    artifact: str  # the artifact's report name, "-" when the gate found nothing to check
    value: float | None  # AP points below PyTorch, median ms, or cosine; None when nothing was measured
    limit: float
    passed: bool


def apply_gates(rows: list[ArtifactRow], gates: Gates) -> tuple[list[GateResult], list[str]]:
    """One record per (gate, artifact) and one-line reasons for the failures. A gate that can check no
    artifact fails too: a CI gate that silently checks nothing is a broken gate."""
    out: list[GateResult] = []
    failures: list[str] = []
    ref = next((r for r in rows if r.reference), None)
    measured = [r for r in rows if not r.skipped and not r.reference]
    for r in rows:
        if r.parity and not r.parity["finite"]:
            failures.append(f"{r.name} produced NaN/Inf outputs")
        if r.map and r.map["map50_95"] < 0:  # COCO's -1: nothing to score, never a pass
            failures.append(f"{r.name}: mAP is undefined (-1: no labelled objects were scored)")
    if any(g is not None for g in asdict(gates).values()):
        for r in rows:
            if r.skipped:  # a gate must not pass on an artifact it never saw
                failures.append(f"{r.name} was not checked ({r.skipped}), so no gate covers it")

    def record(gate, artifact, value, limit, passed, reason):
        out.append(GateResult(gate, artifact, value, limit, passed))
        if not passed:
            failures.append(reason)

    if gates.max_map_drop is not None:
        for r in measured:
            drop = -r.delta_ap
            ref_map = r.reference_map50_95 if r.reference_map50_95 is not None else ref.map["map50_95"]
            record("max-map-drop", r.name, drop, gates.max_map_drop, drop <= gates.max_map_drop + 1e-9,
                   f"max-map-drop {gates.max_map_drop:g} AP: {r.name} is {drop:.2f} AP below PyTorch "
                   f"(mAP50-95 {ref_map:.4f} -> {r.map['map50_95']:.4f})")
        if not measured:
            record("max-map-drop", "-", None, gates.max_map_drop, False, "max-map-drop: no artifact besides the "
                   "PyTorch reference could be measured")
    if gates.max_latency_ms is not None:
        for r in measured or [ref]:
            lat = r.latency[0]
            p50 = lat["model_ms"]["p50"]
            record("max-latency-ms", r.name, p50, gates.max_latency_ms, p50 <= gates.max_latency_ms,
                   f"max-latency-ms {gates.max_latency_ms:g}: {r.name} median {p50:.2f} ms at batch {lat['batch']}")
    if gates.min_parity_cos is not None:
        raw = [r for r in measured if r.parity and r.parity["cosine"] is not None]
        for r in raw:
            cos = r.parity["cosine"]
            record("min-parity-cos", r.name, cos, gates.min_parity_cos, cos >= gates.min_parity_cos,
                   f"min-parity-cos {gates.min_parity_cos:g}: {r.name} cosine {cos:.6f} with PyTorch")
        if not raw:
            record("min-parity-cos", "-", None, gates.min_parity_cos, False, "min-parity-cos: no artifact with a raw "
                   "output to compare (NMS-tail artifacts have detections only, see the parity table)")
    return out, failures


def _threads_note(threads: int | None) -> str:
    return f"{threads} CPU thread(s) for PyTorch and ONNX Runtime" if threads else "default CPU threads"


def check_after_export(opts, result, reference: tuple | None = None) -> dict:
    """`yolo7-export ... --check`: bench what the pipeline just wrote, gates from ``opts.check``;
    ``reference``: the pipeline's loaded and fused ``(Checkpoint, model)``, the PyTorch reference (not reloaded)."""
    if opts.check.data is None:
        raise UserError("--check needs --data: a labelled set (COCO json, or images with YOLO labels)")
    artifacts = [result.onnx_path] + ([result.engine_path] if result.engine_path else [])
    cuda = result.engine_path is not None and not trt_unavailable_reason()
    cfg = BenchConfig(checkpoint=Path(opts.checkpoint), artifacts=[Path(a) for a in artifacts],
                      out_dir=Path(opts.out_dir) / "check", data=Path(opts.check.data),
                      imgsz=tuple(result.info.imgsz) if result.info else None,
                      batches=(1, 8, 32) if opts.dynamic_batch else (opts.batch,),
                      device="cuda" if cuda else "cpu", **CHECK_SETTINGS,
                      gates=Gates(opts.check.max_map_drop, opts.check.max_latency_ms, opts.check.min_parity_cos),
                      reference=reference)
    report = run_bench(cfg)
    return {"report_dir": str(cfg.out_dir), "passed": report["passed"],
            "artifacts": [{"name": a.name, "skipped": a.skipped, "delta_ap": a.delta_ap,
                           "map50_95": (a.map or {}).get("map50_95")} for a in report["artifacts"]]}

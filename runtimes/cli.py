"""`yolo7-detect`: run any artifact (checkpoint, ONNX, engine) on images; write annotated images + detections.json.

It goes through the same ``Detector`` as the check harness, so what you see drawn is what gets measured.
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import click
import cv2
import numpy as np

from .base import DetectConfig, Detections, Detector
from .cli_common import invoke, parse_imgsz, run_cli
from .cli_common import positive as _positive, unit_interval as _unit_interval
from .draw import draw_detections
from .errors import UserError
from .files import PARTIAL, clean_stale_partials, partial_prefix
from .preprocess import IMAGE_SUFFIXES, ImageReadError, list_images, read_image

log = logging.getLogger("yolo7_export")

EPILOG = """\b
Examples:
  yolo7-detect out/best.onnx images/              # every image in a folder -> out/detect/
  yolo7-detect best.pt bus.jpg --img 640 -o runs  # the PyTorch checkpoint itself (the reference)
  yolo7-detect out/best.onnx list.txt --conf 0.4  # images listed in a text file, one path per line
  yolo7-detect out/best.engine images/ --device cuda --batch 8
Writes <out>/<image name> with boxes drawn (.jpg/.png kept, other formats saved as .jpg) and
<out>/detections.json: per image its file, width, height and detections [{box [x1,y1,x2,y2] in the
image's own pixels, score, class_id, class_name}; pose models add keypoints [[x, y, visibility], ...]
(image pixels; the skeleton is drawn)].
"""

_KEEP_SUFFIXES = (".jpg", ".jpeg", ".png")


def collect_sources(sources) -> list[Path]:
    """The images of every SOURCE in order (a shell glob gives many), each path once."""
    sources = [Path(sources)] if isinstance(sources, (str, Path)) else [Path(s) for s in sources]
    if not sources:
        raise UserError("no SOURCE given: pass an image, a folder, or a .txt list of image paths")
    seen, paths = set(), []
    for source in sources:
        for p in collect_images(source):
            key = p.resolve()
            if key not in seen:
                seen.add(key)
                paths.append(p)
    return paths


def collect_images(source: Path) -> list[Path]:
    """The images of SOURCE, checked up front so a bad list fails before any work is done."""
    if not source.exists():
        raise UserError(f"source not found: {source}")
    paths = list_images(source)
    if not paths:
        what = "in folder" if source.is_dir() else "listed in" if source.suffix.lower() == ".txt" else "at"
        raise UserError(f"no images found {what} {source} (looked for {', '.join(IMAGE_SUFFIXES)})")
    missing = [p for p in paths if not p.is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"image not found: {missing[0]}{more}")
    # A header check only (cheap); a file that passes it but fails to decode is reported when read.
    unreadable = [p for p in paths if not cv2.haveImageReader(str(p))]
    if unreadable:
        more = f" (and {len(unreadable) - 1} more)" if len(unreadable) > 1 else ""
        raise UserError(f"cannot read image (not a supported image format): {unreadable[0]}{more}")
    return paths


def output_names(paths: list[Path], out_dir: Path) -> list[Path]:
    """Annotated image paths: same names (JPEG/PNG kept, others -> .jpg), unique, never a source file."""
    used: set[str] = set()
    result = []
    sources = {p.resolve() for p in paths}
    for p in paths:
        suffix = p.suffix if p.suffix.lower() in _KEEP_SUFFIXES else ".jpg"
        name, k = p.stem + suffix, 1
        while name.lower() in used:  # same file name from two folders of a .txt list
            name, k = f"{p.stem}_{k}{suffix}", k + 1
        used.add(name.lower())
        target = out_dir / name
        if target.resolve() in sources:
            raise UserError(f"output folder {out_dir} would overwrite the source image {p}; choose another -o")
        result.append(target)
    return result


@contextmanager
def _staging(out_dir: Path) -> Iterator[Path]:
    """A hidden folder in out_dir for the annotated images, moved into place only when every image went
    through: a run that fails half-way (e.g. an image that does not decode) leaves no partial output."""
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    clean_stale_partials(out_dir)  # a killed run's staging folder
    stage = Path(tempfile.mkdtemp(prefix=partial_prefix("detect"), suffix=PARTIAL, dir=out_dir))
    try:
        yield stage
        for f in sorted(stage.iterdir()):
            os.replace(f, out_dir / f.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if created and not any(out_dir.iterdir()):
            out_dir.rmdir()


def refilter(dets: Detections, conf: float | None, max_det: int | None) -> Detections:
    """Extra score / count limits on top of an in-graph NMS (which has its own, fixed at export)."""
    keep = np.argsort(-dets.scores, kind="stable")
    if conf is not None:
        keep = keep[dets.scores[keep] >= conf]
    if max_det is not None:
        keep = keep[:max_det]
    return Detections(dets.boxes[keep], dets.scores[keep], dets.classes[keep],
                      None if dets.masks is None else dets.masks[keep],
                      None if dets.keypoints is None else dets.keypoints[keep])


def _encode(image: np.ndarray, suffix: str) -> bytes:
    ok, data = cv2.imencode(suffix, image, [cv2.IMWRITE_JPEG_QUALITY, 90] if suffix.lower() != ".png" else [])
    if not ok:
        raise UserError(f"could not encode an image as {suffix}")
    return data.tobytes()


def _in_graph_nms_notes(detector: Detector, conf, iou, agnostic, multi_label) -> None:
    """Tell the user which options an in-graph NMS ignores instead of silently ignoring them."""
    params = detector.info.nms_params or {}
    baked_conf = params.get("conf")
    if conf is not None and baked_conf is not None and conf < baked_conf:
        log.warning("note: the artifact's NMS drops scores below %.3g (set at export); --conf %.3g cannot go lower",
                    baked_conf, conf)
    ignored = [flag for flag, given in (("--iou", iou is not None), ("--agnostic", agnostic),
                                        ("--multi-label", multi_label)) if given]
    if ignored:
        log.warning("note: %s ignored: %s has its NMS inside (nms=%s, %s); re-export to change them",
                    "/".join(ignored), detector.info.nms, detector.info.nms,
                    ", ".join(f"{k}={v}" for k, v in sorted(params.items())) or "settings fixed at export")


def detect_images(artifact: Path, source: Path | list[Path], out_dir: Path, conf: float | None, iou: float | None,
                  max_det: int | None, agnostic: bool, multi_label: bool, imgsz: tuple[int, int] | None,
                  device: str, batch: int | None, save_images: bool) -> dict:
    """The command's work; returns the detections.json content (also written to out_dir)."""
    from tqdm import tqdm

    from .files import write_json_atomic

    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"-o {out_dir} is an existing file; -o names the output folder")
    paths = collect_sources(source)
    targets = output_names(paths, out_dir) if save_images else [None] * len(paths)
    kwargs = {}
    if imgsz is not None:
        if artifact.suffix.lower() not in (".pt", ".pth"):
            raise UserError(f"--img applies to .pt checkpoints only; {artifact.name} has its input size fixed at "
                            "export (images are letterboxed to it)")
        kwargs["imgsz"] = imgsz
    defaults = DetectConfig()
    config = DetectConfig(conf=defaults.conf if conf is None else conf, iou=defaults.iou if iou is None else iou,
                          max_det=defaults.max_det if max_det is None else max_det, multi_label=multi_label,
                          agnostic=agnostic)
    detector = Detector.from_path(artifact, config, device=device, **kwargs)
    info = detector.info
    in_graph = info.nms != "none"
    if in_graph:
        _in_graph_nms_notes(detector, conf, iou, agnostic, multi_label)
    step = batch or info.batch or 1
    log.info("%s: %s backend, %dx%d input, nms=%s, %d image(s)", artifact.name, detector.backend.name,
             *info.imgsz, info.nms, len(paths))

    records, total, t0 = [], 0, time.perf_counter()
    with _staging(out_dir) as stage, tqdm(total=len(paths), unit="img", desc="detect", disable=None,
                                          file=sys.stderr) as bar:
        for start in range(0, len(paths), step):
            chunk = paths[start:start + step]
            try:
                images = [read_image(p) for p in chunk]
            except ImageReadError as exc:
                raise UserError(str(exc)) from exc
            results = detector.detect(images)
            for path, target, image, dets in zip(chunk, targets[start:start + step], images, results):
                if in_graph:
                    dets = refilter(dets, conf, max_det)
                total += len(dets)
                record = {"file": str(path), "width": int(image.shape[1]), "height": int(image.shape[0]),
                          "detections": dets.to_list(info.names)}
                if target is not None:
                    (stage / target.name).write_bytes(_encode(draw_detections(image, dets, info.names), target.suffix))
                    record["annotated"] = target.name
                records.append(record)
            bar.update(len(chunk))
    seconds = time.perf_counter() - t0
    result = {"artifact": str(artifact), "backend": detector.backend.describe(), "names": list(info.names),
              "input_size": list(info.imgsz),
              "settings": info.nms_params if in_graph else {"conf": config.conf, "iou": config.iou,
                                                            "max_det": config.max_det, "agnostic": agnostic,
                                                            "multi_label": multi_label},
              **({"filter": {"conf": conf, "max_det": max_det}} if in_graph else {}),  # applied on top of the graph's
              "images": records}
    write_json_atomic(out_dir / "detections.json", result)
    log.info("%d detections in %d image(s), %.1f ms/image (pre+infer+post)", total, len(paths),
             1000 * seconds / len(paths))
    return result


@click.command(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("artifact", type=click.Path(path_type=Path))
@click.argument("source", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--out", "out_dir", type=click.Path(path_type=Path), default=Path("out/detect"),
              show_default=True, help="Output folder for annotated images and detections.json.")
@click.option("--conf", type=float, default=None, callback=_unit_interval,
              help="Score threshold [default: 0.25; with an in-graph NMS, an extra filter above its own].")
@click.option("--iou", type=float, default=None, callback=_unit_interval,
              help="NMS IoU threshold for raw-output artifacts [default: 0.45].")
@click.option("--max-det", type=int, default=None, callback=_positive,
              help="Max detections per image [default: 300; in-graph NMS: its --topk].")
@click.option("--agnostic", is_flag=True, help="Class-agnostic NMS (raw-output artifacts).")
@click.option("--multi-label", is_flag=True, help="Keep a box once per class above --conf (raw-output artifacts).")
@click.option("--img", "--imgsz", "img", metavar="H [W]", default=None,
              help="(.pt only) Network input size, a multiple of the max stride. Default 640 (1280 for P6).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--batch", type=int, default=None, callback=_positive,
              help="Images per inference call [default: the artifact's fixed batch, else 1].")
@click.option("--save-images/--no-save-images", default=True, show_default=True,
              help="Write annotated images (detections.json is always written).")
@click.option("-v", "--verbose", is_flag=True, help="More log lines.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def detect_command(artifact, source, out_dir, conf, iou, max_det, agnostic, multi_label, img, device, batch,
                   save_images, verbose, debug):
    """Run ARTIFACT (a .pt checkpoint, our .onnx, or a TensorRT engine) on SOURCE... (images, folders of
    images, or .txt lists of image paths; several may be given, e.g. images/*.jpg) and write annotated
    images and detections.json. A .txt list holds one path per line (UTF-8); relative paths are relative to
    the list file's own folder, not to the current directory.
    """
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s")

    imgsz = parse_imgsz(img)  # a bad --img is a usage error, reported by click

    def body():
        result = detect_images(artifact, source, out_dir, conf, iou, max_det, agnostic, multi_label, imgsz,
                               device, batch, save_images)
        click.echo(f"done: {len(result['images'])} image(s) -> {out_dir} (detections.json)")

    run_cli(body, debug)


def main(argv: list[str] | None = None) -> None:
    invoke(detect_command, "yolo7-detect", argv)


if __name__ == "__main__":  # pragma: no cover
    main()

"""Calibration images: where they come from, which ones are used, and how they are fed.

Sources (``--calib``):
* a folder: its images, sorted by name (not recursive); a dataset root without images of its own is read
  like ``--data`` (``annotations/*.json`` or ``images/val``);
* a ``.txt`` list: one image path per line, relative paths relative to the list's folder;
* a COCO json: its ``images``, resolved exactly as ``--data`` resolves them (exporter.evaluation.dataset:
  ``<json dir>/../images/<split>``, ``<json dir>/images``, the json's own folder, ...).
When more images are available than asked for, an evenly spaced subset of the sorted list is used, so a
folder sorted by scene or class is still sampled across its whole range; the choice is deterministic.

Every image goes through ``runtimes.preprocess.preprocess`` at the model's input size: the same letterbox,
colour order and scaling as inference (calibrating on stretched images quantizes for inputs the deployed
model never sees).
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtimes.contract import INPUT_NAME
from runtimes.preprocess import (IMAGE_SUFFIXES, ImageReadError, list_images, preprocess, read_image,
                                 truncated_image)

from ..errors import UserError

log = logging.getLogger("yolo7_export")


@dataclass
class CalibImages:
    source: Path
    paths: list[Path]  # the images used, in feeding order
    available: int  # how many the source holds

    def fingerprint(self) -> str:
        """sha256 over the images' bytes in order: the cache key must change when any image does."""
        h = hashlib.sha256()
        for p in self.paths:
            h.update(hashlib.sha256(p.read_bytes()).digest())
        return h.hexdigest()


def check_source(source: Path | None, num_images: int) -> list[Path]:
    """All images of ``source``; a UserError for anything that would mean no real calibration.

    Cheap (lists files only): the pipeline calls it before export so a bad --calib fails at once.
    """
    if source is None:
        raise UserError("--int8 needs calibration images: pass --calib FOLDER, a .txt list of images, or a COCO json "
                        "(INT8 ranges are never made up from random data)")
    if num_images < 1:
        raise UserError(f"--calib-images must be >= 1 (got {num_images})")
    source = Path(source)
    if not source.exists():
        raise UserError(f"calibration source not found: {source}")
    paths = _list_source(source)
    if not paths:
        raise UserError(f"no calibration images in {source} (looked for {', '.join(IMAGE_SUFFIXES)} files)")
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise UserError(f"calibration list {source}: {len(missing)} image(s) not found, e.g. {missing[0]}")
    for p in paths:  # a cut-short JPEG decodes half gray with only a warning: it would skew the ranges
        problem = truncated_image(p)
        if problem:
            raise UserError(f"calibration image {p}: {problem}")
    return paths


def resolve_images(source: Path | None, num_images: int) -> CalibImages:
    """The calibration images of ``source`` (evenly spread if there are more than ``num_images``)."""
    paths = check_source(source, num_images)
    source = Path(source)
    if len(paths) < num_images:
        log.warning("calibration: only %d image(s) in %s, fewer than --calib-images %d; using all of them",
                    len(paths), source, num_images)
        chosen = paths
    else:
        index = np.unique(np.linspace(0, len(paths) - 1, num_images).round().astype(int))
        chosen = [paths[i] for i in index]
    return CalibImages(source=source, paths=chosen, available=len(paths))


def _list_source(source: Path) -> list[Path]:
    if source.is_file() and source.suffix.lower() == ".json":
        return _dataset_images(source)
    if source.is_file() and source.suffix.lower() not in IMAGE_SUFFIXES + (".txt",):
        raise UserError(f"calibration source {source}: expected a folder of images, a .txt list or a COCO .json")
    paths = list_images(source)
    if not paths and source.is_dir() and ((source / "annotations").is_dir() or (source / "images").is_dir()):
        return _dataset_images(source)
    return paths


def _dataset_images(path: Path) -> list[Path]:
    """Images of a COCO json or dataset root, through the one loader that --data uses too."""
    from ..evaluation.dataset import load_dataset

    return [rec.path for rec in load_dataset(path).images]


def load_batch(paths: list[Path], imgsz: tuple[int, int]) -> np.ndarray:
    """Images -> the network batch [B,3,H,W] float32, exactly as every runtime preprocesses them."""
    images = []
    for p in paths:
        try:
            images.append(read_image(p))
        except ImageReadError as exc:
            raise UserError(f"calibration: {exc}") from exc
    return preprocess(images, imgsz)[0]


class ImageFeed:
    """An ONNX Runtime ``CalibrationDataReader`` over images: one batch of the model's size per ``get_next``.

    Images are read lazily, so memory does not grow with the number of calibration images. A model with a
    fixed batch B > 1 gets its last, partial batch filled up with the first images again.
    """

    def __init__(self, paths: list[Path], imgsz: tuple[int, int], batch: int = 1):
        self.paths, self.imgsz, self.batch = list(paths), tuple(imgsz), batch
        self._next = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= len(self.paths):
            return None
        chunk = self.paths[self._next:self._next + self.batch]
        self._next += len(chunk)
        while len(chunk) < self.batch:
            chunk = chunk + self.paths[:self.batch - len(chunk)]
        return {INPUT_NAME: load_batch(chunk, self.imgsz)}

    def __len__(self) -> int:
        return len(self.paths)

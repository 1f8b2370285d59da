"""Labelled evaluation sets: a COCO-style json, or a folder of images with YOLO txt labels.

Both load into one ``Dataset`` whose ground truth is a COCO dict, so every artifact is scored by the same
COCO evaluator. For a COCO json the original dict is kept as is (iscrowd, area and ids included), so our
numbers are the ones pycocotools gives on the user's file. Class index <-> category id: the model's class
``i`` is the ``i``-th category id in ascending order (for COCO's 80 classes that is the official 80->91 map;
for the shapes fixtures ids 0..4 map to themselves).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np

from runtimes.preprocess import IMAGE_SUFFIXES

from ..errors import UserError


class DatasetError(UserError):
    """The labelled set is missing, inconsistent, or does not fit the model."""


@dataclass(frozen=True)
class ImageRecord:
    id: int
    path: Path
    width: int
    height: int


@dataclass
class Dataset:
    source: Path
    kind: str  # "coco" | "yolo"
    images: list[ImageRecord]
    category_ids: list[int]  # class index -> COCO category id
    gt: dict  # COCO-format ground truth (images, annotations, categories)
    names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def n_labels(self) -> int:
        return sum(1 for a in self.gt["annotations"] if not a.get("iscrowd", 0))

    def subset(self, n: int | None) -> "Dataset":
        """The first ``n`` images (sorted as loaded) and only their annotations; quick runs and tests."""
        if n is None or n >= len(self.images):
            return self
        images = self.images[:n]
        keep = {im.id for im in images}
        gt = dict(self.gt)
        gt["images"] = [im for im in self.gt["images"] if im["id"] in keep]
        gt["annotations"] = [a for a in self.gt["annotations"] if a["image_id"] in keep]
        return replace(self, images=images, gt=gt)

    def check_classes(self, nc: int) -> None:
        """Every labelled class must be one the model predicts; otherwise mAP silently means nothing."""
        if len(self.category_ids) > nc:
            raise DatasetError(f"dataset {self.source} has {len(self.category_ids)} classes but the model predicts "
                               f"only {nc}: class ids {nc}..{len(self.category_ids) - 1} are outside the model's "
                               f"classes (wrong --data for this checkpoint?)")

    def for_model(self, names: list[str]) -> "Dataset":
        """Checked against the model's classes; YOLO-label sets take the model's class names and count."""
        self.check_classes(len(names))
        if self.kind != "yolo":
            return self
        gt = dict(self.gt, categories=[{"id": i, "name": n} for i, n in enumerate(names)])
        return replace(self, gt=gt, category_ids=list(range(len(names))), names=list(names))

    def labels(self, image_id: int) -> tuple[np.ndarray, np.ndarray]:
        """(xyxy boxes in image pixels [n,4], class indices [n]) of one image, crowd boxes excluded."""
        index = {c: i for i, c in enumerate(self.category_ids)}
        rows = [a for a in self.gt["annotations"] if a["image_id"] == image_id and not a.get("iscrowd", 0)]
        boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in rows)], np.float32).reshape(-1, 4)
        return boxes, np.array([index[a["category_id"]] for a in rows], np.int64)


def load_dataset(path: str | Path) -> Dataset:
    """A COCO json, a dataset root holding ``annotations/*.json``, or an image folder with YOLO labels."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"dataset not found: {path}")
    if path.is_file():
        if path.suffix.lower() != ".json":
            raise DatasetError(f"dataset {path}: expected a COCO .json file or a folder of images with YOLO labels")
        return _load_coco(path)
    if _images_in(path):
        return _load_yolo(path)
    jsons = sorted((path / "annotations").glob("*.json")) if (path / "annotations").is_dir() else []
    vals = [j for j in jsons if "val" in j.name] or jsons
    if len(vals) == 1:
        return _load_coco(vals[0])
    if len(vals) > 1:
        raise DatasetError(f"dataset {path}: several annotation files ({', '.join(j.name for j in vals)}); "
                           f"pass the json you want")
    for sub in ("images/val", "images/val2017", "images"):
        if _images_in(path / sub):
            return _load_yolo(path / sub)
    raise DatasetError(f"dataset {path}: no images and no annotations/*.json found")


def _images_in(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


# ---------------------------------------------------------------------------------------------- COCO json
def _load_coco(json_path: Path) -> Dataset:
    try:
        gt = json.loads(json_path.read_text())
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot read COCO json {json_path}: {exc}") from exc
    if not isinstance(gt, dict) or not all(k in gt for k in ("images", "annotations", "categories")):
        raise DatasetError(f"{json_path} is not a COCO instances file (needs images, annotations, categories)")
    if not gt["images"]:
        raise DatasetError(f"{json_path} lists no images")
    category_ids = sorted(int(c["id"]) for c in gt["categories"])
    names_by_id = {int(c["id"]): str(c.get("name", c["id"])) for c in gt["categories"]}
    image_ids = {im["id"] for im in gt["images"]}
    for a in gt["annotations"]:
        if a["image_id"] not in image_ids:
            raise DatasetError(f"{json_path}: annotation {a.get('id')} refers to image_id {a['image_id']}, "
                               f"which is not in 'images' (labels do not match images)")
        if int(a["category_id"]) not in names_by_id:
            raise DatasetError(f"{json_path}: annotation {a.get('id')} has category_id {a['category_id']}, "
                               f"which is not in 'categories'")
    folder = _image_folder(json_path, gt["images"][0]["file_name"])
    images = []
    for im in sorted(gt["images"], key=lambda r: r["id"]):
        p = Path(im["file_name"])
        p = p if p.is_absolute() else folder / p
        if not p.is_file():
            raise DatasetError(f"{json_path}: image '{im['file_name']}' (id {im['id']}) not found in {folder} "
                               f"(labels do not match images)")
        images.append(ImageRecord(int(im["id"]), p, int(im["width"]), int(im["height"])))
    gt.setdefault("info", {})
    return Dataset(source=json_path, kind="coco", images=images, category_ids=category_ids, gt=gt,
                   names=[names_by_id[c] for c in category_ids])


def _image_folder(json_path: Path, first_file: str) -> Path:
    """Where the json's file_names live: <json dir>/../images/<split>, <json dir>/images, or the json's dir."""
    base = json_path.parent
    split = json_path.stem.split("_", 1)[1] if json_path.stem.startswith("instances_") else ""
    candidates = []
    if split:
        candidates += [base.parent / "images" / split, base.parent / split]
    candidates += [base.parent / "images" / "val", base / "images", base, base.parent / "images", base.parent]
    if Path(first_file).is_absolute():
        return Path("/")
    for folder in candidates:
        if (folder / first_file).is_file():
            return folder
    tried = ", ".join(str(c) for c in dict.fromkeys(candidates))
    raise DatasetError(f"{json_path}: cannot find image '{first_file}'; looked in {tried}")


# ------------------------------------------------------------------------------------- YOLO txt labels
def label_path(image: Path) -> Path:
    """images/…/x.jpg -> labels/…/x.txt (the last 'images' folder in the path), as the official loader does."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            return Path(*parts).with_suffix(".txt")
    return image.with_suffix(".txt")


def _load_yolo(folder: Path) -> Dataset:
    files = _images_in(folder)
    label_files = [label_path(f) for f in files]
    present = [lf.is_file() for lf in label_files]
    if not any(present):
        raise DatasetError(f"no YOLO labels for the images in {folder}: expected e.g. {label_files[0]} "
                           f"(images/…/x.jpg <-> labels/…/x.txt)")
    label_dir = label_files[0].parent
    if label_dir.is_dir() and label_dir != folder:
        orphans = sorted({p.stem for p in label_dir.glob("*.txt")} - {f.stem for f in files})
        if orphans:
            raise DatasetError(f"labels do not match images: {len(orphans)} label file(s) in {label_dir} have no "
                               f"image in {folder} (e.g. {orphans[0]}.txt)")
    numeric = all(f.stem.isdigit() for f in files) and len({int(f.stem) for f in files}) == len(files)
    images, annotations, classes_seen = [], [], set()
    for k, (img_path, lbl, has) in enumerate(zip(files, label_files, present)):
        shape = _image_shape(img_path)
        image_id = int(img_path.stem) if numeric else k + 1
        rec = ImageRecord(image_id, img_path, shape[1], shape[0])
        images.append(rec)
        for cls, box in _read_label_file(lbl) if has else []:
            classes_seen.add(cls)
            cx, cy, w, h = box[0] * rec.width, box[1] * rec.height, box[2] * rec.width, box[3] * rec.height
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cls,
                                "bbox": [cx - w / 2, cy - h / 2, w, h], "area": w * h, "iscrowd": 0})
    nc = max(classes_seen) + 1 if classes_seen else 1
    gt = {"info": {}, "images": [{"id": r.id, "file_name": r.path.name, "width": r.width, "height": r.height}
                                 for r in images],
          "annotations": annotations, "categories": [{"id": i, "name": str(i)} for i in range(nc)]}
    return Dataset(source=folder, kind="yolo", images=images, category_ids=list(range(nc)), gt=gt,
                   names=[str(i) for i in range(nc)])


def _image_shape(path: Path) -> tuple[int, int]:
    """(h, w); decoding is the only header reader OpenCV has, and it also proves the file is an image."""
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise DatasetError(f"cannot read image {path}")
    return img.shape[:2]


def _read_label_file(path: Path) -> list[tuple[int, tuple[float, float, float, float]]]:
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        try:
            if len(parts) != 5:
                raise ValueError
            cls, values = int(parts[0]), tuple(float(v) for v in parts[1:])
        except ValueError:
            raise DatasetError(f"{path}:{n}: expected 'class cx cy w h' (5 numbers), got {line.strip()!r}") from None
        if cls < 0 or not all(-0.01 <= v <= 1.01 for v in values):
            raise DatasetError(f"{path}:{n}: class must be >= 0 and cx cy w h normalised to 0..1, got {line.strip()!r}")
        rows.append((cls, values))
    return rows

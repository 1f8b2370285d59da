"""Labelled evaluation sets: a COCO-style json, or a folder of images with YOLO txt labels.

Both load into one ``Dataset`` whose ground truth is a COCO dict, so every artifact is scored by the same
COCO evaluator. For a COCO json the original dict is kept as is (iscrowd, area and ids included), so our
numbers are the ones pycocotools gives on the user's file. Class index <-> category id: the model's class
``i`` is the ``i``-th category id in ascending order (for COCO's 80 classes that is the official 80->91 map;
for the shapes fixtures ids 0..4 map to themselves).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np

from runtimes.preprocess import IMAGE_SUFFIXES, truncated_image

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
        """Checked against the model's classes; YOLO-label sets take the model's class names and count.

        A set without a single labelled object is refused: COCO mAP is then -1 (undefined), and a gate must
        never pass on it."""
        self.check_classes(len(names))
        if self.n_labels == 0:
            raise DatasetError(f"dataset {self.source}: no labelled objects in its {len(self.images)} image(s) "
                               f"(every label file empty / no annotations); mAP would be undefined")
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
        gt = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot read COCO json {json_path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if not isinstance(gt, dict) or not all(isinstance(gt.get(k), list) for k in ("images", "annotations", "categories")):
        raise DatasetError(f"{json_path} is not a COCO instances file (needs lists images, annotations, categories)")
    if not gt["images"]:
        raise DatasetError(f"{json_path} lists no images")
    _check_coco_fields(json_path, gt)
    category_ids = sorted(c["id"] for c in gt["categories"])
    names_by_id = {c["id"]: str(c.get("name", c["id"])) for c in gt["categories"]}
    image_ids = {im["id"] for im in gt["images"]}
    for a in gt["annotations"]:
        if a["image_id"] not in image_ids:
            raise DatasetError(f"{json_path}: annotation {a.get('id')} refers to image_id {a['image_id']}, "
                               f"which is not in 'images' (labels do not match images)")
        if a["category_id"] not in names_by_id:
            raise DatasetError(f"{json_path}: annotation {a.get('id')} has category_id {a['category_id']}, "
                               f"which is not in 'categories'")
    relative = [im["file_name"] for im in gt["images"] if not Path(im["file_name"]).is_absolute()]
    folder = _image_folder(json_path, relative[0]) if relative else json_path.parent
    images = []
    for im in sorted(gt["images"], key=lambda r: r["id"]):
        p = Path(im["file_name"])
        p = p if p.is_absolute() else folder / p  # absolute names as they are, relative ones in the found folder
        if not p.is_file():
            raise DatasetError(f"{json_path}: image '{im['file_name']}' (id {im['id']}) not found"
                               f"{'' if Path(im['file_name']).is_absolute() else f' in {folder}'} (labels do not match images)")
        _check_complete(p)
        images.append(ImageRecord(im["id"], p, im["width"], im["height"]))
    gt.setdefault("info", {})
    return Dataset(source=json_path, kind="coco", images=images, category_ids=category_ids, gt=gt,
                   names=[names_by_id[c] for c in category_ids])


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_coco_fields(json_path: Path, gt: dict) -> None:
    """Each record's fields present and of the right type, before anything is scored.

    A string category_id or image_id would not match the integer ids of the predictions (pycocotools
    compares with ==), silently dropping or moving labels; a NaN or negative box changes IoUs. One line
    names the first bad record instead.
    """
    def bad(kind: str, i: int, rec, why: str) -> DatasetError:
        rid = rec.get("id") if isinstance(rec, dict) else None
        return DatasetError(f"{json_path}: {kind}[{i}]{f' (id {rid!r})' if rid is not None else ''}: {why}")

    for i, c in enumerate(gt["categories"]):
        if not isinstance(c, dict) or not _is_int(c.get("id")):
            raise bad("categories", i, c, "needs an integer 'id'")
    for i, im in enumerate(gt["images"]):
        if not isinstance(im, dict) or not _is_int(im.get("id")):
            raise bad("images", i, im, "needs an integer 'id'")
        if not isinstance(im.get("file_name"), str) or not im["file_name"].strip():
            raise bad("images", i, im, "needs a 'file_name' string")
        if not all(_is_int(im.get(k)) and im[k] > 0 for k in ("width", "height")):
            raise bad("images", i, im, f"needs integer 'width' and 'height' > 0, got {im.get('width')!r} x {im.get('height')!r}")
    for i, a in enumerate(gt["annotations"]):
        if not isinstance(a, dict):
            raise bad("annotations", i, a, "is not an object")
        for key in ("image_id", "category_id"):
            if not _is_int(a.get(key)):
                raise bad("annotations", i, a, f"needs an integer '{key}', got {a.get(key)!r}")
        box = a.get("bbox")
        if not (isinstance(box, list) and len(box) == 4 and all(_is_number(v) for v in box)):
            raise bad("annotations", i, a, f"needs 'bbox' [x, y, w, h] of 4 finite numbers, got {box!r}")
        if box[2] < 0 or box[3] < 0:
            raise bad("annotations", i, a, f"bbox width and height must be >= 0, got {box!r}")


def _check_complete(path: Path) -> None:
    problem = truncated_image(path)
    if problem:
        raise DatasetError(f"image {path}: {problem}")


def _image_folder(json_path: Path, first_file: str) -> Path:
    """Where the json's relative file_names live: <json dir>/../images/<split>, <json dir>/images, or the json's dir."""
    base = json_path.parent
    split = json_path.stem.split("_", 1)[1] if json_path.stem.startswith("instances_") else ""
    candidates = []
    if split:
        candidates += [base.parent / "images" / split, base.parent / split]
    candidates += [base.parent / "images" / "val", base / "images", base, base.parent / "images", base.parent]
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
        for cls, box, kpts in _read_label_file(lbl) if has else []:
            classes_seen.add(cls)
            cx, cy, w, h = box[0] * rec.width, box[1] * rec.height, box[2] * rec.width, box[3] * rec.height
            ann = {"id": len(annotations) + 1, "image_id": image_id, "category_id": cls,
                   "bbox": [cx - w / 2, cy - h / 2, w, h], "area": w * h, "iscrowd": 0}
            if kpts:  # YOLO-pose row: COCO person-keypoints fields, pixels (an unlabelled point is 0, 0, 0)
                ann["keypoints"] = [v for j in range(0, len(kpts), 3) for v in (
                    (kpts[j] * rec.width, kpts[j + 1] * rec.height, kpts[j + 2]) if kpts[j + 2] > 0 else (0, 0, 0))]
                ann["num_keypoints"] = sum(1 for j in range(2, len(kpts), 3) if kpts[j] > 0)
            annotations.append(ann)
    nc = max(classes_seen) + 1 if classes_seen else 1
    gt = {"info": {}, "images": [{"id": r.id, "file_name": r.path.name, "width": r.width, "height": r.height}
                                 for r in images],
          "annotations": annotations, "categories": [{"id": i, "name": str(i)} for i in range(nc)]}
    return Dataset(source=folder, kind="yolo", images=images, category_ids=list(range(nc)), gt=gt,
                   names=[str(i) for i in range(nc)])


def _image_shape(path: Path) -> tuple[int, int]:
    """(h, w); decoding is the only header reader OpenCV has, and it also proves the file is an image."""
    _check_complete(path)
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise DatasetError(f"cannot read image {path}")
    return img.shape[:2]


def label_lines(path: Path):
    """(line number, whitespace-split fields, line) of each non-empty line of a YOLO label file (UTF-8);
    an unreadable file is one DatasetError line. Shared by the box/pose and the polygon (seg) readers."""
    try:
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read label file {path}: {type(exc).__name__}") from None
    for n, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if parts:
            yield n, parts, line


def _read_label_file(path: Path) -> list[tuple[int, tuple[float, ...], tuple[float, ...]]]:
    """(class, (cx, cy, w, h), keypoints) per row; keypoints () for detection rows, (x, y, v) * k for YOLO-pose
    rows (``cls cx cy w h x1 y1 v1 ...``, as the official pose branch trains on; v 0 = not labelled)."""
    rows = []
    for n, parts, line in label_lines(path):
        try:
            if len(parts) < 5 or (len(parts) - 5) % 3:
                raise ValueError
            cls, values = int(parts[0]), tuple(float(v) for v in parts[1:])
        except ValueError:
            raise DatasetError(f"{path}:{n}: expected 'class cx cy w h' (5 numbers) or a YOLO-pose row 'class cx cy "
                               f"w h x1 y1 v1 ...' (5 + 3 per keypoint), got {line.strip()[:80]!r}") from None
        box, kpts = values[:4], values[4:]
        if cls < 0 or not all(-0.01 <= v <= 1.01 for v in box) or box[2] <= 0 or box[3] <= 0:
            raise DatasetError(f"{path}:{n}: class must be >= 0 and cx cy w h normalised to 0..1 (w, h > 0), "
                               f"got {line.strip()[:80]!r}")
        # visibility exactly 0, 1 or 2: also what tells a pose row from a YOLO-seg polygon row of a fitting length
        # (polygon coordinates are fractions), so a seg set still falls through to the seg loader
        if not all(math.isfinite(v) for v in kpts) or not all(kpts[j] in (0.0, 1.0, 2.0) for j in range(2, len(kpts), 3)):
            raise DatasetError(f"{path}:{n}: keypoints must be finite with visibility 0, 1 or 2, got {line.strip()[:80]!r}")
        rows.append((cls, box, kpts))
    return rows

"""Run every README example, as written and in README order (CI step, after the set-up and the tests).

What runs: every line of every ```bash block of README.md after the first two (the set-up command and the
test command, which .ci/run runs itself). Blocks fenced with plain ``` are shown, not run; the README says
why next to each (GPU / TensorRT, or minutes of runtime). A line is also skipped when it matches SKIP below,
which gives the reason; every skip is printed.

Where: in a scratch folder whose names bind the README's placeholders to the bundled data, so the examples
read exactly as a user types them with their own files:
  best.pt      -> tests/data/yolov7-tiny-shapes.pt (the trained example checkpoint)
  images/      -> 16 shapes validation images (000151..000166), used for calibration and detection
  data/, val.json, val/images (+ val/labels) -> a labelled set of the first 24 validation images, in the
                  three --data layouts (dataset root with annotations/, COCO json, YOLO labels); disjoint
                  from images/, so nothing is calibrated on the images it is scored on
  bus.jpg, list.txt -> tests/data/images/bus.jpg, a .txt list of two images of images/
  out/         -> the repository's out/ (git-ignored), where the set-up step wrote its export
  tests/       -> the repository's tests/ (read only)
Everything else an example writes (report/, build/, calib.json, ...) stays in the scratch folder. At the end
the repository's `git status` must be what it was before: an example that writes into tracked files fails.
`--start-at TEXT` resumes at the first example containing TEXT (out/ keeps what earlier examples wrote).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ROOT / "tests" / "data" / "shapes"
# (regex on the command line, reason); keep this short: a plain ``` block is the normal way to show only
SKIP = [
    # --trt runs: CI installs TensorRT-RTX, which builds without a GPU. Not what needs TensorRT 10/11 (and a GPU):
    (r"(^|\s)--trt(\s|$).*(--trt-lib\s+tensorrt|--nms\s+efficient|--hardware-compat)|"
     r"(--trt-lib\s+tensorrt|--nms\s+efficient|--hardware-compat).*(^|\s)--trt(\s|$)",
     "builds a TensorRT 10/11 engine or EfficientNMS_TRT: needs TensorRT 10/11 and a GPU"),
    (r"\.(engine|plan)(\s|$)", "runs a TensorRT engine: needs a GPU and TensorRT"),
    (r"--device\s+cuda", "needs a CUDA GPU"),
    (r"^\s*pip\s", "changes the environment (the set-up step installs everything)"),
]


def bash_blocks(readme: str) -> list[list[str]]:
    """The command lines of each ```bash block (comments and blank lines dropped, `\\` continuations joined)."""
    blocks, current = [], None
    for line in readme.splitlines():
        if current is None and line.strip().startswith("```bash"):
            current = []
        elif current is not None and line.strip().startswith("```"):
            blocks.append(current)
            current = None
        elif current is not None:
            if current and current[-1].endswith("\\"):
                current[-1] = current[-1][:-1] + " " + line.strip()
            elif line.strip() and not line.strip().startswith("#"):
                current.append(line.strip())
    return blocks


def skip_reason(command: str) -> str | None:
    return next((why for pattern, why in SKIP if re.search(pattern, command)), None)


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.symlink_to(src)


def make_sandbox(base: Path) -> Path:
    """The scratch folder with the README's placeholder names (module docstring)."""
    gt = json.loads((SHAPES / "annotations" / "instances_val.json").read_text())
    images = sorted(gt["images"], key=lambda r: r["id"])
    labelled, calib = images[:24], images[150:166]
    _link(ROOT / "tests" / "data" / "yolov7-tiny-shapes.pt", base / "best.pt")
    _link(ROOT / "tests", base / "tests")
    (ROOT / "out").mkdir(exist_ok=True)
    _link(ROOT / "out", base / "out")
    _link(ROOT / "tests" / "data" / "images" / "bus.jpg", base / "bus.jpg")
    for im in calib:
        _link(SHAPES / "images" / "val" / im["file_name"], base / "images" / im["file_name"])
    (base / "list.txt").write_text("".join(f"images/{im['file_name']}\n" for im in calib[:2]))
    keep = {im["id"] for im in labelled}
    subset = dict(gt, images=labelled, annotations=[a for a in gt["annotations"] if a["image_id"] in keep])
    for im in labelled:
        stem = Path(im["file_name"]).stem
        for folder in (base / "data" / "images" / "val", base / "val" / "images"):
            _link(SHAPES / "images" / "val" / im["file_name"], folder / im["file_name"])
        _link(SHAPES / "labels" / "val" / f"{stem}.txt", base / "val" / "labels" / f"{stem}.txt")
    (base / "data" / "annotations").mkdir(parents=True)
    (base / "data" / "annotations" / "instances_val.json").write_text(json.dumps(subset))
    root_json = dict(subset, images=[dict(im, file_name=f"val/images/{im['file_name']}") for im in labelled])
    (base / "val.json").write_text(json.dumps(root_json))
    return base


def git_status() -> str:
    return subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout


def main(argv: list[str]) -> int:
    blocks = bash_blocks((ROOT / "README.md").read_text())[2:]  # 1: set-up, 2: tests (run by .ci/run)
    commands = [c for block in blocks for c in block]
    if argv[:1] == ["--start-at"] and len(argv) == 2:  # debugging: resume at the first line containing TEXT
        start = next((i for i, c in enumerate(commands) if argv[1] in c), None)
        if start is None:
            print(f"readme examples: no example contains {argv[1]!r}")
            return 1
        commands = commands[start:]
    if not commands:
        print("readme examples: no ```bash examples found after the set-up and test blocks")
        return 1
    before = git_status()
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    t_all = time.perf_counter()
    ran = skipped = 0
    with tempfile.TemporaryDirectory(prefix="yolo7_readme_") as tmp:
        sandbox = make_sandbox(Path(tmp))
        for command in commands:
            why = skip_reason(command)
            if why:
                print(f"- skip: {command}\n    ({why})", flush=True)
                skipped += 1
                continue
            print(f"+ {command}", flush=True)
            t0 = time.perf_counter()
            proc = subprocess.run(["bash", "-c", command], cwd=sandbox, env=env)
            print(f"  [{time.perf_counter() - t0:.1f} s, exit {proc.returncode}]", flush=True)
            if proc.returncode != 0:
                print(f"readme examples: FAILED (exit {proc.returncode}): {shlex.quote(command)}")
                return 1
            ran += 1
    after = git_status()
    if after != before:
        changed = sorted(set(after.splitlines()) - set(before.splitlines()))
        print("readme examples: FAILED: the examples changed the repository:\n  " + "\n  ".join(changed))
        return 1
    print(f"readme examples: {ran} ran, {skipped} skipped, {time.perf_counter() - t_all:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

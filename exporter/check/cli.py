"""`yolo7-bench`: check existing artifacts against their checkpoint and write the FPS-vs-mAP report."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from runtimes.cli_common import invoke, parse_imgsz, run_cli

from ..errors import UserError

EPILOG = """\b
Examples:
  yolo7-bench best.pt out/*.onnx --data coco/annotations/instances_val2017.json -o report
  yolo7-bench best.pt out/best.int8.onnx --data val/images --max-map-drop 1.0 --min-parity-cos 0.999
  yolo7-bench best.pt out/best.engine --data data.json --device cuda --max-latency-ms 5
Writes report.json, report.md and fps_vs_map.png. Exit codes: 0 ok, 2 bad input, 3 a gate failed.
"""


def parse_batches(value: str) -> tuple[int, ...]:
    """'1,8,32' -> (1, 8, 32); a UserError (exit 2) otherwise. Called inside run_cli, where click's own
    BadParameter would not be a usage error any more but an 'internal error'."""
    try:
        out = tuple(int(v) for v in value.replace(" ", "").split(",") if v)
    except ValueError:
        raise UserError(f"--batches: expected comma-separated integers such as 1,8,32, got {value!r}") from None
    if not out or any(b < 1 for b in out):
        raise UserError(f"--batches: batch sizes must be >= 1, got {value!r}")
    return out


def summary(report: dict, out_dir: Path) -> str:
    """The closing line: what was checked, what was skipped, and which gates held (never 'all gates
    passed' over an artifact that was not measured; such a run fails its gates in the harness)."""
    rows = [a for a in report["artifacts"] if not a.reference]
    checked = [a.name for a in rows if not a.skipped]
    skipped = [f"{a.name} ({a.skipped})" for a in rows if a.skipped]
    gates = sorted({g["gate"] for g in report.get("gates", [])})
    text = f"done: checked {len(checked)} artifact(s) against PyTorch"
    text += f" ({', '.join(checked)})" if checked else ""
    text += f"; skipped {len(skipped)}: {'; '.join(skipped)}" if skipped else ""
    text += f"; gates passed: {', '.join(gates)}" if gates else "; no gates set"
    return text + f" (report: {Path(out_dir) / 'report.md'})"


@click.command(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.argument("artifacts", nargs=-1, type=click.Path(path_type=Path))
@click.option("--data", type=click.Path(path_type=Path), required=True,
              help="Labelled set: a COCO json, a folder with annotations/*.json, or images/… with labels/… YOLO txt.")
@click.option("-o", "--out", "out_dir", type=click.Path(path_type=Path), default=Path("report"), show_default=True)
@click.option("--img", "--imgsz", "img", metavar="H [W]", default=None,
              help="Input size; every artifact must have it (default: the artifacts' own size).")
@click.option("--batches", default="1,8,32", show_default=True, help="Batch sizes to time (dynamic-batch artifacts).")
@click.option("--runs", type=int, default=30, show_default=True, help="Timed runs per batch size.")
@click.option("--warmup", type=int, default=5, show_default=True, help="Untimed warm-up runs per batch size.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Device for PyTorch (and ONNX Runtime with onnxruntime-gpu); TensorRT always runs on CUDA.")
@click.option("--threads", type=int, default=None, help="CPU threads for PyTorch and ONNX Runtime.")
@click.option("--max-images", type=int, default=None, help="Evaluate on the first N images only.")
@click.option("--parity-images", type=int, default=8, show_default=True, help="Images in the parity batch.")
@click.option("--max-map-drop", type=float, default=None, metavar="AP",
              help="Gate: max mAP50-95 drop vs PyTorch, in AP points (x100).")
@click.option("--max-latency-ms", type=float, default=None, help="Gate: max model-only median at the smallest batch.")
@click.option("--min-parity-cos", type=float, default=None, help="Gate: min raw-output cosine similarity with PyTorch.")
@click.option("--no-progress", is_flag=True, help="No progress bars (CI logs).")
@click.option("-v", "--verbose", is_flag=True)
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def bench_command(checkpoint, artifacts, data, out_dir, img, batches, runs, warmup, device, threads, max_images,
                  parity_images, max_map_drop, max_latency_ms, min_parity_cos, no_progress, verbose, debug):
    """Check ARTIFACTS (.onnx, .engine) against the PyTorch CHECKPOINT they came from: parity, COCO mAP under
    the official protocol, latency; write the report and apply the gates."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s")

    def body():
        from .harness import BenchConfig, Gates, run_bench

        if Path(out_dir).exists() and not Path(out_dir).is_dir():
            raise UserError(f"-o {out_dir} is an existing file; -o names the report folder")
        for name, value in (("--runs", runs), ("--parity-images", parity_images), ("--threads", threads),
                            ("--max-images", max_images)):
            if value is not None and value < 1:
                raise UserError(f"{name} must be >= 1, got {value}")
        cfg = BenchConfig(checkpoint=checkpoint, artifacts=list(artifacts), out_dir=out_dir, data=data,
                          imgsz=parse_imgsz(img), batches=parse_batches(batches), runs=runs, warmup=warmup,
                          device=device, max_images=max_images, parity_images=parity_images, threads=threads,
                          gates=Gates(max_map_drop, max_latency_ms, min_parity_cos), progress=not no_progress and sys.stderr.isatty())  # no bars in CI logs
        report = run_bench(cfg)
        click.echo(summary(report, out_dir))

    run_cli(body, debug)


def main(argv: list[str] | None = None) -> None:
    invoke(bench_command, "yolo7-bench", argv)


if __name__ == "__main__":  # pragma: no cover
    main()

"""The three report files from one report dict: report.json (everything), report.md (tables), fps_vs_map.png.

All three are written atomically; the json is the source of truth and the other two are views of it, so
``write_report`` can also re-render a saved report.json. Artifact rows are read by attribute
(``rows.ArtifactRow``); a saved report.json's plain-dict rows are turned back into rows first.
"""
from __future__ import annotations

import io
from pathlib import Path

from ..artifacts import write_bytes_atomic, write_json_atomic
from .rows import ArtifactRow, artifact_rows, report_json

FILES = ("report.json", "report.md", "fps_vs_map.png")


def write_report(report: dict, out_dir: Path) -> dict[str, Path]:
    out_dir = Path(out_dir)
    paths = {name: out_dir / name for name in FILES}
    write_json_atomic(paths["report.json"], report_json(report))
    write_bytes_atomic(paths["report.md"], render_markdown(report).encode())
    write_bytes_atomic(paths["fps_vs_map.png"], render_plot(report))
    return paths


def _f(value, fmt: str = ".3f", none: str = "–") -> str:
    return none if value is None else format(value, fmt)


def _first_latency(a: ArtifactRow) -> dict | None:
    return a.latency[0] if a.latency else None


def render_markdown(report: dict) -> str:
    s, dev = report["settings"], report["device"]
    lines = [f"# yolo7-bench report: {Path(s['checkpoint']).name}", "",
             f"Machine: {dev.get('summary', '?')}  ",
             f"Data: `{s.get('data')}` ({s.get('n_images', 0)} images, {s.get('n_labels', 0)} labels); input "
             f"{s['imgsz'][0]}x{s['imgsz'][1]} square letterbox; protocol: conf {s['protocol']['conf']}, "
             f"IoU {s['protocol']['iou']}, multi-label NMS, max {s['protocol']['max_det']} detections, "
             f"COCO mAP by {s.get('evaluator', 'faster-coco-eval')}  ",
             f"Latency: {s['warmup']} warm-up + {s['runs']} timed runs per batch size, median; "
             f"{s.get('threads_note', '')}", "",
             "| artifact | runtime | precision | size MB | mAP50-95 | Δ AP | mAP50 | p50 ms | FPS |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for a in artifact_rows(report):
        m, lat = a.map or {}, _first_latency(a)
        if a.skipped:
            lines.append(f"| {a.name} | {a.runtime} | {a.precision} | {_f(a.size_mb, '.2f')} "
                         f"| skipped: {a.skipped} |||||")
            continue
        p50 = f"{lat['model_ms']['p50']:.2f} (b{lat['batch']})" if lat else "–"
        lines.append(f"| {a.name} | {a.runtime} | {a.precision}{'' if a.nms == 'none' else ' +NMS'} | "
                     f"{_f(a.size_mb, '.2f')} | {_f(m.get('map50_95'))} | "
                     f"{'ref' if a.reference else _f(a.delta_ap, '+.2f')} | {_f(m.get('map50'))} | {p50} | "
                     f"{_f(lat['fps'] if lat else None, '.1f')} |")
    lines += ["", "Δ AP: mAP50-95 difference to the PyTorch reference in AP points (x100). p50 ms and FPS: model "
              "only (backend call on a letterboxed batch) at the smallest batch measured; FPS = images/s.", ""]
    lines += _latency_table(report) + _parity_table(report) + _mask_table(report) + _keypoint_table(report) + _gates(report) + _notes(report)
    return "\n".join(lines) + "\n"


def _mask_table(report: dict) -> list[str]:
    """Segmentation artifacts: mask mAP (COCO segm) beside box mAP from the same run, and mask parity."""
    rows = [a for a in artifact_rows(report) if a.mask or a.mask_parity]
    if not rows:
        return []
    out = ["## Instance masks", "",
           "| artifact | mask mAP50-95 | mask mAP50 | box mAP50-95 | box mAP50 | masks matched | mean mask IoU | "
           "min mask IoU | IoU >= 0.99 |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for a in rows:
        m, p = a.mask or {}, a.mask_parity or {}
        matched = f"{p['matched']}/{p['n_reference']}" if p else "ref" if a.reference else "–"
        share = p.get("share_iou_099")
        out.append(f"| {a.name} | {_f(m.get('mask_map50_95'))} | {_f(m.get('mask_map50'))} | "
                   f"{_f(m.get('box_map50_95'))} | {_f(m.get('box_map50'))} | {matched} | {_f(p.get('mean_iou'), '.4f')} | "
                   f"{_f(p.get('min_iou'), '.4f')} | {_f(None if share is None else 100 * share, '.1f')}{'%' if p else ''} |")
    return out + ["", "Mask mAP: COCO segm (faster-coco-eval) with the official seg val.py protocol (conf 0.001, "
                  "IoU 0.6, multi-label, 300 detections; NMS-tail artifacts keep their own NMS settings); masks cropped "
                  "at prototype resolution, upsampled, mapped to the image. Mask parity: IoU of the masks of detections matched to PyTorch's (same class, box "
                  "IoU >= 0.9).", ""]


def _keypoint_table(report: dict) -> list[str]:
    """Pose artifacts: COCO keypoint AP (OKS) and keypoint parity with PyTorch (evaluation/keypoints.py)."""
    rows = [a for a in artifact_rows(report) if a.keypoints]
    if not rows:
        return []
    out = ["## Keypoints", "",
           "| artifact | keypoint AP50-95 | keypoint AP50 | OKS sigmas | kpts matched | max px | mean px | "
           "visibility max abs |", "|---|---:|---:|---|---:|---:|---:|---:|"]
    for a in rows:
        ap, par = a.keypoints.ap or {}, a.keypoints.parity or {}
        matched = f"{par['matched']}/{par['n_reference']}" if par else "ref" if a.reference else "–"
        out.append(f"| {a.name} | {_f(ap.get('ap50_95'))} | {_f(ap.get('ap50'))} | {ap.get('sigmas', '–')} | "
                   f"{matched} | {_f(par.get('max_px'), '.4g')} | {_f(par.get('mean_px'), '.3g')} | "
                   f"{_f(par.get('visibility_max_abs'), '.3g')} |")
    return out + ["", "Keypoint AP: COCO keypoints evaluation (OKS) by faster-coco-eval on the labelled set's keypoints, "
                  "same NMS protocol as the box mAP. Parity: keypoints of detections matched to PyTorch's (same class, "
                  "box IoU >= 0.9) on the parity batch; position error in input pixels.", ""]


def _latency_table(report: dict) -> list[str]:
    out = ["## Latency (batch sweep)", "",
           "| artifact | batch | model p50 ms | p90 | p99 | FPS | end-to-end p50 ms | p99 | FPS e2e | peak mem MB |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for a in artifact_rows(report):
        for lat in a.latency:
            m, e = lat["model_ms"], lat["e2e_ms"]
            out.append(f"| {a.name} | {lat['batch']} | {m['p50']:.2f} | {m['p90']:.2f} | {m['p99']:.2f} | "
                       f"{lat['fps']:.1f} | {e['p50']:.2f} | {e['p99']:.2f} | {lat['fps_e2e']:.1f} | "
                       f"{_f(lat.get('peak_mem_mb'), '.1f')} |")
    return out + ["", "End-to-end: BGR images in, detections in image pixels out (letterbox + inference + NMS at "
                  "conf 0.25 / IoU 0.45 + rescale).", ""]


def _parity_table(report: dict) -> list[str]:
    out = ["## Parity with PyTorch (same letterboxed batch)", "",
           "| artifact | cosine | score cosine | max abs | mean abs | max rel | box max abs px | score max abs | "
           "boxes matched | score diff max | finite |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for a in artifact_rows(report):
        p = a.parity
        if not p:
            continue
        r, d = p.get("raw") or {}, p["detections"]
        out.append(f"| {a.name} | {_f(r.get('cosine'), '.6f')} | {_f(r.get('score_cosine'), '.6f')} | "
                   f"{_f(r.get('max_abs'), '.4g')} | "
                   f"{_f(r.get('mean_abs'), '.3g')} | {_f(r.get('max_rel'), '.3g')} | {_f(r.get('box_max_abs'), '.3g')} | "
                   f"{_f(r.get('score_max_abs'), '.3g')} | {d['matched']}/{d['n_reference']} "
                   f"({100 * d['matched_share']:.1f}%) | {d['score_max_abs']:.4f} | {'yes' if p['finite'] else 'NO'} |")
    return out + ["", "Boxes matched: reference detections (conf 0.25, IoU 0.45, or the artifact's own NMS settings) "
                  "reproduced with the same class at IoU >= 0.9. Relative errors are normalised by the reference's "
                  "magnitude. NMS-tail artifacts: detections only.", ""]


def _gates(report: dict) -> list[str]:
    gates = report.get("gates") or []
    if not gates:
        return ["## Gates", "", "none set", ""]
    out = ["## Gates", "", "| gate | artifact | value | limit | result |", "|---|---|---:|---:|---|"]
    for g in gates:
        out.append(f"| {g['gate']} | {g['artifact']} | {_f(g.get('value'), '.4g')} | {g['limit']:g} | "
                   f"{'pass' if g['passed'] else 'FAIL'} |")
    verdict = "all gates passed" if report.get("passed") else "FAILED: " + "; ".join(report.get("failures", []))
    return out + ["", f"**{verdict}**", ""]


def _notes(report: dict) -> list[str]:
    notes = [f"- {a.name}: {a.map['protocol_note']}; its Δ AP is against {a.delta_basis} "
             f"(mAP50-95 {a.reference_map50_95 or 0:.3f})" for a in artifact_rows(report)
             if (a.map or {}).get("protocol_note")]
    notes += [f"- {n}" for n in report.get("notes", [])]
    v = report.get("versions", {})
    notes.append("- versions: " + ", ".join(f"{k} {v[k]}" for k in sorted(v) if k != "platform"))
    return ["## Notes", "", *notes, ""]


def render_plot(report: dict) -> bytes:
    """FPS (x, log) vs mAP50-95 (y), one point per artifact and batch size, like the YOLOv7 paper's figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import ScalarFormatter

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=110)
    markers = "osD^vP*X"
    plotted, all_y = 0, []
    for k, a in enumerate(artifact_rows(report)):
        lat, m = a.latency, a.map
        if not lat or not m:
            continue
        xs, ys = [l["fps"] for l in lat], [100 * m["map50_95"]] * len(lat)
        ax.plot(xs, ys, marker=markers[k % len(markers)], linestyle="-", label=f"{a.name} ({a.runtime})")
        for lt, x, y in zip(lat, xs, ys):
            ax.annotate(f"b{lt['batch']}", (x, y), textcoords="offset points", xytext=(4, 5), fontsize=7)
        plotted += 1
        all_y += ys
    s, dev = report["settings"], report["device"]
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(ScalarFormatter())
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.yaxis.get_major_formatter().set_useOffset(False)
    if all_y:  # at least 2 AP points of range, so equal accuracies read as equal, not as a cliff
        mid, half = (max(all_y) + min(all_y)) / 2, max((max(all_y) - min(all_y)) / 2 + 0.5, 1.0)
        ax.set_ylim(mid - 1.2 * half, mid + 1.2 * half)
    ax.set_xlabel("FPS (images/s, model only; log scale)")
    ax.set_ylabel("COCO mAP50-95 (%)")
    ax.set_title(f"{Path(s['checkpoint']).name} @ {s['imgsz'][0]}x{s['imgsz'][1]}  —  {dev.get('short', '')}",
                 fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    if plotted:
        ax.legend(fontsize=7, loc="best")
    else:
        ax.text(0.5, 0.5, "no artifact with both mAP and latency", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()

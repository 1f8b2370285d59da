"""check/: measure artifacts before they ship: parity vs PyTorch, COCO mAP, latency, the report and CI gates.

Modules, one job each: harness (runs the evaluation library, exporter/evaluation/: dataset, mAP, parity,
latency, over every artifact, applies the gates), report (json/md/png), environment, cli (`yolo7-bench`).
Nothing here is imported by the exporter at module level: `--check` imports the harness lazily.
"""

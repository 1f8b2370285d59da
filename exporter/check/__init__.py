"""check/: measure artifacts before they ship: parity vs PyTorch, COCO mAP, latency, the report and CI gates.

Modules, one job each: dataset (labelled sets), evaluate (mAP under the official protocol), parity, latency,
report (json/md/png), harness (runs them over every artifact, applies the gates), cli (`yolo7-bench`).
Nothing here is imported by the exporter at module level: `--check` imports the harness lazily.
"""

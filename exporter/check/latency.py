"""Moved to exporter/evaluation/latency.py (the evaluation library below precision and the harness).

This name stays importable: the module object *is* exporter.evaluation.latency (same functions, same state,
monkeypatching either name patches both). New code imports exporter.evaluation.latency.
"""
import sys

from ..evaluation import latency as _moved

sys.modules[__name__] = _moved

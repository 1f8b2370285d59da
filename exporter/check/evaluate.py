"""Moved to exporter/evaluation/evaluate.py (the evaluation library below precision and the harness).

This name stays importable: the module object *is* exporter.evaluation.evaluate (same functions, same state,
monkeypatching either name patches both). New code imports exporter.evaluation.evaluate.
"""
import sys

from ..evaluation import evaluate as _moved

sys.modules[__name__] = _moved

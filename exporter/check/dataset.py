"""Moved to exporter/evaluation/dataset.py (the evaluation library below precision and the harness).

This name stays importable: the module object *is* exporter.evaluation.dataset (same functions, same state,
monkeypatching either name patches both). New code imports exporter.evaluation.dataset.
"""
import sys

from ..evaluation import dataset as _moved

sys.modules[__name__] = _moved

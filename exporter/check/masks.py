"""Moved to exporter/evaluation/masks.py (the evaluation library below precision and the harness).

This name stays importable: the module object *is* exporter.evaluation.masks (same functions, same state,
monkeypatching either name patches both). New code imports exporter.evaluation.masks.
"""
import sys

from ..evaluation import masks as _moved

sys.modules[__name__] = _moved

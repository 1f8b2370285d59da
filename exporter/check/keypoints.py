"""Moved to exporter/evaluation/keypoints.py (the evaluation library below precision and the harness).

This name stays importable: the module object *is* exporter.evaluation.keypoints (same functions, same state,
monkeypatching either name patches both). New code imports exporter.evaluation.keypoints.
"""
import sys

from ..evaluation import keypoints as _moved

sys.modules[__name__] = _moved

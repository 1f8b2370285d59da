"""Moved to exporter/evaluation/parity.py (the evaluation library below precision and the harness).

This name stays importable: the module object *is* exporter.evaluation.parity (same functions, same state,
monkeypatching either name patches both). New code imports exporter.evaluation.parity.
"""
import sys

from ..evaluation import parity as _moved

sys.modules[__name__] = _moved

"""The ``Backend`` face every runtime implements (PyTorch, ONNX Runtime, TensorRT), and its lifecycle.

Its own module, below ``base.py`` (Detector, open_backend), so that the backends import this and
``open_backend`` imports the backends without an import circle.

Lifecycle, as Polygraphy's runners: constructing a backend opens it (session, engine and context, or model
loaded), :meth:`Backend.close` releases those handles at once (GPU memory too) instead of whenever the
garbage collector gets to them, and ``with`` closes on the way out, also on an error::

    with OnnxBackend(path) as backend:
        out = backend.infer(batch)
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from .contract import ModelInfo


class Backend(ABC):
    """Runs a preprocessed float32 batch [B,3,H,W]; returns outputs by contract name."""

    name: str = "backend"
    info: ModelInfo
    closed: bool = False

    @abstractmethod
    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        ...

    @property
    def fixed_batch(self) -> int | None:
        """The batch size the artifact requires, or None if it takes several sizes."""
        return self.info.batch

    @property
    def max_batch(self) -> int | None:
        """The largest batch the artifact takes: its fixed batch, a TensorRT profile's maximum, or None when
        any size works (ONNX Runtime with a dynamic batch, PyTorch)."""
        return self.fixed_batch

    def close(self) -> None:
        """Release the session / engine / model now. Idempotent; ``infer`` afterwards is an error."""
        if not self.closed:
            self._release()
            self.closed = True

    def _release(self) -> None:
        """Drop the heavy handles (each backend knows which)."""

    def _ensure_open(self) -> None:
        if self.closed:
            raise RuntimeError(f"{self.name} backend used after close()")

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    def describe(self) -> dict:
        return {"backend": self.name, "precision": self.info.precision, "nms": self.info.nms}

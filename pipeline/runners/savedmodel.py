"""The reference: the exported SavedModel in TensorFlow, in this process.

Verify compares every converted model with what this runner says; ``--stress`` runs it again on
the usual preprocessing mistakes, so a loaded SavedModel is kept for the life of the runner.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.runners.base import Prediction
from pipeline.types import Runtime

BATCH = 32


class SavedModelRunner:
    """``serving_default`` of a SavedModel: ``images`` → ``probabilities``."""

    name = Runtime.TENSORFLOW.value

    def __init__(self):
        self._loaded: dict[str, object] = {}

    def unsupported(self, artifact: Path) -> str | None:
        return None

    def predict(self, artifact: Path, images: np.ndarray, timeout_s: float = 600.0,
                timing: bool = True) -> Prediction:
        """Probabilities in batches of :data:`BATCH`; then, with ``timing``, the mean latency of
        single-image calls after one warm-up call (NaN without)."""
        import tensorflow as tf

        key = str(artifact)
        if key not in self._loaded:
            self._loaded[key] = tf.saved_model.load(key).signatures["serving_default"]
        fn = self._loaded[key]
        probs = np.concatenate([
            fn(images=tf.constant(images[k:k + BATCH]))["probabilities"].numpy()
            for k in range(0, len(images), BATCH)
        ]) if len(images) else np.zeros((0, 0), np.float32)
        if not timing:
            return Prediction(probs.astype(np.float32), float("nan"))
        fn(images=tf.constant(images[:1]))  # warm-up for the latency figure
        start = time.perf_counter()
        for img in images:
            fn(images=tf.constant(img[None]))
        latency = 1000 * (time.perf_counter() - start) / max(len(images), 1)
        return Prediction(probs.astype(np.float32), latency)


def create(runtime: Runtime, labels: Sequence[str]) -> SavedModelRunner:
    return SavedModelRunner()

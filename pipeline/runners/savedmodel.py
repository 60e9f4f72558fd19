"""The reference: the exported SavedModel in TensorFlow, in this process.

Verify compares every converted model with what this runner says; ``--stress`` runs it again on
the usual preprocessing mistakes, so a loaded SavedModel is kept for the life of the runner.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.runners.base import Prediction, RunSettings
from pipeline.runners.feed import FeedFile
from pipeline.types import Runtime


class SavedModelRunner:
    """``serving_default`` of a SavedModel: ``images`` → ``probabilities``."""

    name = Runtime.TENSORFLOW.value

    def __init__(self):
        self._loaded: dict[str, object] = {}

    def unsupported(self, artifact: Path) -> str | None:
        return None

    def _function(self, artifact: Path):
        import tensorflow as tf

        key = str(artifact)
        if key not in self._loaded:
            self._loaded[key] = tf.saved_model.load(key).signatures["serving_default"]
        return self._loaded[key]

    def probabilities(self, artifact: Path, images: np.ndarray) -> np.ndarray:
        """float32 ``[k, classes]`` for one batch."""
        import tensorflow as tf

        return self._function(artifact)(images=tf.constant(images))["probabilities"].numpy().astype(np.float32)

    def predict(self, artifact: Path, images: np.ndarray | FeedFile, timeout_s: float = 600.0,
                settings: RunSettings = RunSettings()) -> Prediction:
        """Probabilities in batches of ``settings.batch``; then ``settings.latency_runs`` timed
        single-image calls after a warm-up call (TensorFlow's own thread pools: every core)."""
        import tensorflow as tf

        from pipeline.runners.base import timed_calls

        if isinstance(images, FeedFile):
            parts = [self.probabilities(artifact, x) for _, x in images.batches(settings.batch)]
            first = images.read(0, 1)
        else:
            parts = [self.probabilities(artifact, images[k:k + settings.batch])
                     for k in range(0, len(images), settings.batch)]
            first = np.asarray(images[:1], np.float32)
        probs = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
        fn, one = self._function(artifact), tf.constant(first)
        return Prediction(probs, tuple(timed_calls(lambda: fn(images=one), settings.latency_runs)))

    def close(self) -> None:
        self._loaded.clear()


def create(runtime: Runtime, labels: Sequence[str]) -> SavedModelRunner:
    return SavedModelRunner()

"""The one interface every runtime implements for the verify stage."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class Prediction:
    """What a runtime said about a batch of images.

    Attributes:
        probabilities: float32 ``[N, num_classes]``.
        latency_ms: mean wall time of one single-image inference, after one warm-up call.
    """

    probabilities: np.ndarray
    latency_ms: float


class RuntimeFailed(Exception):
    """The runtime crashed, hung or refused the artifact; verify reports it and goes on."""


class Runner(Protocol):
    """Runs an artifact on preprocessed images (float32 RGB ``[N, H, W, 3]`` in 0..255)."""

    name: str

    def predict(self, artifact: Path, images: np.ndarray, timeout_s: float = 600.0) -> Prediction:
        ...

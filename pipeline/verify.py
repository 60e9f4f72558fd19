"""Running the reference and every converted model on the holdout, and gating the drift.

The SavedModel is the reference. Every (artifact, runtime) pair is compared with it on the same
preprocessed images: top-1 agreement, |Δprobability|, KL divergence, and the usual metrics against
the true labels. Each artifact kind has an agreement gate; one failed gate fails the verify stage.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pipeline.metrics import classification_metrics
from pipeline.runners.base import Prediction, RuntimeFailed

# Minimum top-1 agreement with the reference. float16 keeps nearly every answer; int8 may move
# borderline images, so it gets more room. Override per artifact with --gate NAME=VALUE.
DEFAULT_GATES: dict[str, float] = {
    "savedmodel": 1.0,
    "tflite-float32": 0.99,
    "tflite-float16": 0.98,
    "tflite-dynamic": 0.95,
    "tflite-int8": 0.90,
    "tflite-int8-int8": 0.90,
    "tflite-int8-uint8": 0.90,
    "tflite-int16x8": 0.95,
    "tfjs-float32": 0.99,
    "tfjs-float16": 0.98,
    "tfjs-uint8": 0.90,
}


@dataclass
class Artifact:
    name: str          # e.g. "tflite-int8", the gate key
    path: Path
    size_bytes: int


@dataclass
class Result:
    artifact: str
    runtime: str
    top1_agreement: float | None
    accuracy: float | None
    macro_precision: float | None
    macro_recall: float | None
    macro_f1: float | None
    max_abs_diff: float | None
    mean_abs_diff: float | None
    kl_divergence: float | None
    size_bytes: int
    latency_ms: float | None
    gate: float
    passed: bool
    error: str | None = None
    confusion_matrix: list = field(default_factory=list)
    per_class_agreement: list = field(default_factory=list)
    flipped: list = field(default_factory=list)   # indices of test images whose top-1 changed
    flipped_to: list = field(default_factory=list)  # this artifact's top-1 class for each of them

    def to_dict(self) -> dict:
        return asdict(self)


def compare(reference: np.ndarray, probs: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
    """Drift and quality figures of one prediction against the reference and the truth."""
    if probs.shape != reference.shape:
        raise RuntimeFailed(f"output shape {probs.shape} differs from the reference {reference.shape}")
    diff = np.abs(probs - reference)
    eps = 1e-7
    p, q = np.clip(reference, eps, 1), np.clip(probs, eps, 1)
    # Clipping and rounding can make a near-zero KL slightly negative; it is never below 0.
    kl = max(0.0, float(np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=1))))
    pred = probs.argmax(1)
    flipped = np.nonzero(pred != reference.argmax(1))[0]
    m = classification_metrics(labels, pred, num_classes)
    same = pred == reference.argmax(1)
    per_class = [float(same[labels == k].mean()) if np.any(labels == k) else None for k in range(num_classes)]
    return {
        "per_class_agreement": per_class,
        "top1_agreement": float(1 - len(flipped) / max(len(pred), 1)),
        "accuracy": m["accuracy"],
        "macro_precision": m["macro_precision"],
        "macro_recall": m["macro_recall"],
        "macro_f1": m["macro_f1"],
        "max_abs_diff": float(diff.max()) if diff.size else 0.0,
        "mean_abs_diff": float(diff.mean()) if diff.size else 0.0,
        "kl_divergence": kl,
        "confusion_matrix": m["confusion_matrix"],
        "flipped": [int(i) for i in flipped],
        "flipped_to": [int(pred[i]) for i in flipped],
    }


def evaluate(
    artifact: Artifact, runtime: str, prediction: Prediction | None, reference: np.ndarray,
    labels: np.ndarray, num_classes: int, gate: float, error: str | None = None,
) -> Result:
    """One report row; a runtime failure is a failed row with the reason, not an exception."""
    if prediction is None:
        return Result(artifact.name, runtime, None, None, None, None, None, None, None, None,
                      artifact.size_bytes, None, gate, False, error or "no prediction")
    try:
        figures = compare(reference, prediction.probabilities, labels, num_classes)
    except RuntimeFailed as err:
        return evaluate(artifact, runtime, None, reference, labels, num_classes, gate, str(err))
    return Result(
        artifact=artifact.name, runtime=runtime, size_bytes=artifact.size_bytes,
        latency_ms=prediction.latency_ms, gate=gate,
        passed=figures["top1_agreement"] >= gate, **figures,
    )


class SavedModelRunner:
    """The reference: the exported SavedModel in TensorFlow, in this process."""

    name = "tensorflow"

    def __init__(self):
        self._loaded: dict[str, object] = {}

    def predict(self, artifact: Path, images: np.ndarray, timeout_s: float = 600.0,
                timing: bool = True) -> Prediction:
        import tensorflow as tf

        key = str(artifact)
        if key not in self._loaded:
            self._loaded[key] = tf.saved_model.load(key).signatures["serving_default"]
        fn = self._loaded[key]
        probs = np.concatenate([
            fn(images=tf.constant(images[k:k + 32]))["probabilities"].numpy()
            for k in range(0, len(images), 32)
        ]) if len(images) else np.zeros((0, 0), np.float32)
        if not timing:
            return Prediction(probs.astype(np.float32), float("nan"))
        fn(images=tf.constant(images[:1]))  # warm-up for the latency figure
        start = time.perf_counter()
        for img in images:
            fn(images=tf.constant(img[None]))
        latency = 1000 * (time.perf_counter() - start) / max(len(images), 1)
        return Prediction(probs.astype(np.float32), latency)


def run_one(runner, artifact: Artifact, images: np.ndarray, timeout_s: float):
    """(prediction, error) for one pair; runtime failures become an error string."""
    try:
        return runner.predict(artifact.path, images, timeout_s=timeout_s), None
    except RuntimeFailed as err:
        return None, str(err)

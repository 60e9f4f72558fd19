"""The classification head: dense layers on backbone features, and its training loss.

:class:`Head` is the trained head as arrays (what ``retrain/head.npz`` holds and export reads);
:func:`forward` and :func:`loss` are the same computation in TensorFlow for training, shared by
the head alone (``retrain.train_head``) and the head trained with the backbone's last blocks
(``finetune.fine_tune``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from pipeline.types import ClassWeights


@dataclass
class Head:
    """Dense layers, ReLU between them, softmax on the last: ``[(weights, bias), ...]``."""

    layers: list[tuple[np.ndarray, np.ndarray]]
    history: dict = field(default_factory=dict)

    def logits(self, features: np.ndarray) -> np.ndarray:
        x = features
        for i, (w, b) in enumerate(self.layers):
            x = x @ w + b
            if i < len(self.layers) - 1:
                x = np.maximum(x, 0)
        return x

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        z = self.logits(features)
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    def to_npz(self) -> dict[str, np.ndarray]:
        out = {}
        for i, (w, b) in enumerate(self.layers):
            out[f"w{i}"], out[f"b{i}"] = w, b
        return out

    @classmethod
    def from_npz(cls, data) -> "Head":
        n = len([k for k in data.keys() if k.startswith("w")])
        return cls([(data[f"w{i}"], data[f"b{i}"]) for i in range(n)])


def class_weight_vector(y: np.ndarray, num_classes: int, mode: str) -> np.ndarray:
    """Per-class loss weights: ones, or ``n / (classes * count)`` for ``"balanced"``."""
    if ClassWeights(mode) is ClassWeights.NONE:
        return np.ones(num_classes, np.float32)
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    return (len(y) / (num_classes * np.maximum(counts, 1))).astype(np.float32)


def forward(variables: list, x, dropout: float = 0.0, generator=None):
    """The head's logits in TensorFlow: ``variables`` are ``[w0, b0, w1, b1, ...]``; dropout (on the
    hidden layers, training only) draws its seeds from ``generator``."""
    import tensorflow as tf

    for i in range(0, len(variables), 2):
        x = tf.matmul(x, variables[i]) + variables[i + 1]
        if i + 2 < len(variables):
            x = tf.nn.relu(x)
            if generator is not None and dropout > 0:
                seed = generator.make_seeds(1)[:, 0]
                x = tf.nn.experimental.stateless_dropout(x, dropout, seed=seed)
    return x


def loss(logits, y, num_classes: int, weights, label_smoothing: float, l2: float, variables: list):
    """Class-weighted, label-smoothed softmax cross-entropy plus L2 on the head's weight matrices."""
    import tensorflow as tf

    target = tf.one_hot(y, num_classes) * (1 - label_smoothing) + label_smoothing / num_classes
    per_example = tf.nn.softmax_cross_entropy_with_logits(labels=target, logits=logits)
    w = tf.gather(weights, y)
    return tf.reduce_sum(per_example * w) / tf.reduce_sum(w) + l2 * tf.add_n([tf.nn.l2_loss(v) for v in variables[0::2]])


class Patience:
    """Early stopping on the validation loss: the best snapshot so far, and when to stop.

    Args:
        patience: evaluations without a lower loss before :meth:`update` says stop.
    """

    def __init__(self, patience: int):
        self.patience, self.waited, self.stopped = patience, 0, False
        self.loss, self.best, self.epoch = np.inf, None, 0

    def update(self, loss: float, epoch: int, take: Callable[[], Any]) -> bool:
        """Records an evaluation (``take`` makes the snapshot, only when it is the best); True: stop."""
        if loss < self.loss - 1e-6:
            self.loss, self.best, self.epoch, self.waited = loss, take(), epoch, 0
            return False
        self.waited += 1
        self.stopped = self.waited >= self.patience
        return self.stopped

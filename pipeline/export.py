"""Backbone + head (+ normalisation) as one SavedModel.

Serving signature ``serving_default``: ``images`` float32 ``[N, size, size, 3]`` RGB in 0..255 →
``probabilities`` and ``logits`` ``[N, classes]``. Apps decode and resize; the model normalises,
so no app re-implements mean/std.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.backbone import backbone_features
from pipeline.rundir import atomic_dir, atomic_write_text
from pipeline.types import BackboneSpec

SIGNATURE_KEY = "serving_default"
INPUT_KEY = "images"
OUTPUT_KEY = "probabilities"


def build_module(graph_def, spec: BackboneSpec, layers: list[tuple[np.ndarray, np.ndarray]]):
    """A ``tf.Module`` whose ``serve`` is the full classifier (see module docstring).

    Args:
        layers: the head's dense layers ``[(weights, bias), ...]``; ReLU between them.
    """
    import tensorflow as tf

    size = spec.preprocessing.size

    class Classifier(tf.Module):
        def __init__(self):
            super().__init__(name="edgepipe_classifier")
            # Plain tracked tf.Variables (not Keras layers): the TFLite converter folds them into
            # constants; Keras-3 layers here would leave VAR_HANDLE ops in the .tflite.
            self.head = [
                (tf.Variable(w.astype(np.float32), trainable=False),
                 tf.Variable(b.astype(np.float32), trainable=False))
                for w, b in layers
            ]

        @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32, name=INPUT_KEY)])
        def serve(self, images):
            x = backbone_features(graph_def, spec, images)
            for i, (w, b) in enumerate(self.head):
                x = tf.matmul(x, w) + b
                if i < len(self.head) - 1:
                    x = tf.nn.relu(x)
            logits = x
            return {"probabilities": tf.nn.softmax(logits), "logits": logits}

    return Classifier()


def export_savedmodel(
    graph_def, spec: BackboneSpec, layers: list[tuple[np.ndarray, np.ndarray]],
    classes: list[str], out_dir: Path,
) -> Path:
    """Writes ``out_dir/savedmodel``, ``labels.txt`` and ``preprocessing.json`` atomically.

    Returns:
        The SavedModel directory.
    """
    import tensorflow as tf

    module = build_module(graph_def, spec, layers)
    target = Path(out_dir) / "savedmodel"
    with atomic_dir(target) as tmp:
        tf.saved_model.save(module, str(tmp), signatures={SIGNATURE_KEY: module.serve})
    atomic_write_text(Path(out_dir) / "labels.txt", "\n".join(classes) + "\n")
    atomic_write_text(
        Path(out_dir) / "preprocessing.json",
        json.dumps({"input": INPUT_KEY, "dtype": "float32", "range": [0, 255],
                    **spec.preprocessing.to_dict()}, indent=2) + "\n",
    )
    return target


def load_labels(out_dir: Path) -> list[str]:
    return (Path(out_dir) / "labels.txt").read_text(encoding="utf-8").splitlines()

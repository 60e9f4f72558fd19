"""Backbone + head (+ normalisation) as one SavedModel.

Serving signature ``serving_default``: ``images`` float32 ``[N, size, size, 3]`` RGB in 0..255 →
``probabilities`` and ``logits`` ``[N, classes]``. Apps decode and resize; the model normalises,
so no app re-implements mean/std.

An adopted graph (``--model-graph``, :func:`build_adopted_module`) gets the same signature: its
own output is ``probabilities``, and ``logits`` is there only when the graph has them (the input of
its Softmax). Every later stage reads ``probabilities`` alone (quantize's metadata names whatever
outputs there are, the TF.js page and runners ask for ``probabilities`` by name), so a graph
without logits gets none rather than a made-up ``log(probabilities)``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.backbone import backbone_features
from pipeline.graph import ModelOutputs
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


def defaults_as_identities(graph_def):
    """The graph with every ``PlaceholderWithDefault`` made an ``Identity`` of its default.

    Nothing feeds them in an exported model (poets' graph has one, ``input_1/
    BottleneckInputPlaceholder``, between the backbone and its head), so each is its default. The
    TF.js converter keeps the op, and TF.js 4.22's wasm backend fails on it ("Cannot read
    properties of undefined (reading 'backend')": the executor passes the default tensor on and
    disposes it), so it goes before conversion. Returns a copy; ``graph_def`` is not modified.
    """
    import tensorflow as tf

    out = tf.compat.v1.GraphDef()
    out.CopyFrom(graph_def)
    for node in out.node:
        if node.op == "PlaceholderWithDefault":
            dtype = node.attr["dtype"].type
            node.op = "Identity"
            for key in list(node.attr):
                del node.attr[key]
            node.attr["T"].type = dtype
    return out


def build_adopted_module(graph_def, spec: BackboneSpec, outputs: ModelOutputs):
    """A ``tf.Module`` whose ``serve`` is a whole frozen classifier, normalisation in front.

    Args:
        graph_def: the frozen graph with its head (legacy ops already rewritten).
        spec: its input tensor and preprocessing (the catalog row it was recognised as, or the
            options); the bottleneck is not used.
        outputs: its output tensor and logits (``graph.model_outputs``).
    """
    import tensorflow as tf

    from pipeline.graphfix import feature_subgraph

    size, prep, classes = spec.preprocessing.size, spec.preprocessing, outputs.classes
    names = [outputs.probabilities] + ([outputs.logits] if outputs.logits else [])
    # Only what the output needs; a fixed batch of 1 in its reshapes becomes any batch, as for
    # a backbone (graphfix.feature_subgraph). Plain Python on protos: autograph leaves it alone.
    trimmed, _ = tf.autograph.experimental.do_not_convert(feature_subgraph)(
        graph_def, spec.input_tensor, outputs.probabilities)
    trimmed = tf.autograph.experimental.do_not_convert(defaults_as_identities)(trimmed)

    class AdoptedClassifier(tf.Module):
        def __init__(self):
            super().__init__(name="edgepipe_adopted_classifier")

        @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32, name=INPUT_KEY)])
        def serve(self, images):
            x = (images - prep.mean) / prep.std
            found = tf.graph_util.import_graph_def(trimmed, input_map={spec.input_tensor: x},
                                                   return_elements=names, name="model")
            # [N, C] whatever batch the graph was frozen with.
            found = [tf.reshape(t, [tf.shape(images)[0], classes]) for t in found]
            result = {"probabilities": found[0]}
            if outputs.logits:
                result["logits"] = found[1]
            return result

    return AdoptedClassifier()


def export_savedmodel(
    graph_def, spec: BackboneSpec, layers: list[tuple[np.ndarray, np.ndarray]] | None,
    classes: list[str], out_dir: Path, outputs: ModelOutputs | None = None,
) -> Path:
    """Writes ``out_dir/savedmodel``, ``labels.txt`` and ``preprocessing.json`` atomically.

    Args:
        graph_def: the backbone, or with ``outputs`` the whole adopted classifier.
        layers: the retrained head's dense layers; None for an adopted graph.
        classes: the labels, in output order.
        outputs: an adopted graph's output and logits (:func:`build_adopted_module`).

    Returns:
        The SavedModel directory.
    """
    import tensorflow as tf

    module = build_module(graph_def, spec, layers) if outputs is None else build_adopted_module(graph_def, spec, outputs)
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

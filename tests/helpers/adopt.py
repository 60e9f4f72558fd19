"""Tiny whole-classifier graphs for ``--model-graph``: a backbone with its head already in it.

Built like tensorflow-for-poets' retrain.py leaves its output: the backbone (here the tiny graph's
layers, under the real MobileNet v1 names), a ``PlaceholderWithDefault`` fed by the pooled
feature, ``final_training_ops`` and a Softmax named ``final_result``. The head is a
nearest-colour classifier, so on the tiny world's solid-colour images it is right.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.helpers.world import COLOURS, TINY_BOTTLENECK, TINY_SIZE

# The tiny world's classes in label order (normalised folder names, sorted).
TINY_LABELS = ("blue sky", "green leaf", "red")
POETS_OUTPUT = "final_result:0"
POETS_LOGITS = "final_training_ops/Wx_plus_b/add:0"


def build_tiny_model_graph(path: Path, size: int = TINY_SIZE, channels: int = 16, *, classes: int = 3,
                           order: tuple[str, ...] = TINY_LABELS, softmax: bool | str = True,
                           extra_output: bool = False, seed: int = 0) -> Path:
    """Writes a frozen whole classifier: ``input:0`` ``[1,size,size,3]`` (fixed batch of 1) →
    mean colour features → pooled ``[N,1,1,channels]`` at the MobileNet v1 bottleneck name →
    poets' head → ``final_result:0`` ``[N,classes]``.

    Args:
        channels: the pooled feature's size (256 with ``size`` 128 makes it look like the catalog's
            mobilenet_v1_0.25_128 by names and shapes).
        classes: outputs; the first three score the tiny world's colours, any more score nothing
            in particular.
        order: the classes of the first three outputs (:data:`TINY_LABELS` names), so the graph's
            output order can differ from the folders' label order.
        softmax: end in a Softmax (``final_result``); ``"manual"``: the same probabilities as
            exp / sum (so no logits can be told); False: end in the head's logits (an Add).
        extra_output: also leave a second terminal ``[N,classes]`` tensor (``aux_result``), so the
            output is ambiguous unless one is a Softmax.
    """
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [1, size, size, 3], name="input")  # normalised (x-127.5)/127.5
        # The first three channels pass the mean colour through; the rest are noise the head ignores.
        k = np.zeros((1, 1, 3, channels), np.float32)
        k[0, 0, :, :3] = np.eye(3)
        k[0, 0, :, 3:] = rng.normal(0, 0.1, (3, channels - 3))
        h = tf.nn.conv2d(x, tf.constant(k), strides=1, padding="SAME")
        pool = tf.nn.avg_pool2d(h, ksize=size, strides=1, padding="VALID", name=TINY_BOTTLENECK.split(":")[0])
        flat = tf.reshape(pool, [-1, channels], name="MobilenetV1/Predictions/Reshape")
        feed = tf.compat.v1.placeholder_with_default(flat, [None, channels], name="input_1/BottleneckInputPlaceholder")
        # Score each class by closeness to its colour: -|feature - centre|^2 up to a per-row constant.
        folder = {"blue sky": "Blue sky", "green leaf": "green_leaf", "red": "Red"}
        centres = np.array([COLOURS[folder[name]] for name in order], np.float32)
        centres = (centres - 127.5) / 127.5
        w = np.zeros((channels, classes), np.float32)
        b = np.zeros(classes, np.float32)
        w[:3, :3] = 2 * centres.T * 4
        b[:3] = -(centres ** 2).sum(1) * 4
        if classes > 3:
            b[3:] = -50.0
        with tf.name_scope("final_training_ops"):
            logits = tf.add(tf.matmul(feed, tf.constant(w)), tf.constant(b), name="Wx_plus_b/add")
        if softmax == "manual":
            e = tf.exp(logits - tf.reduce_max(logits, axis=1, keepdims=True))
            tf.math.divide(e, tf.reduce_sum(e, axis=1, keepdims=True), name="final_result")
        elif softmax:
            tf.nn.softmax(logits, name="final_result")
        if extra_output:
            tf.identity(tf.matmul(feed, tf.constant(w * 2.0)), name="aux_result")
    path.write_bytes(graph.as_graph_def().SerializeToString())
    return path

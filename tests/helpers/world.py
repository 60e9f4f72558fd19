"""The tiny world the fast tests run in, and the real data in ``../shared``.

The tiny graph reproduces the quirks that matter for the pipeline (an ``input:0`` placeholder
with a FIXED batch of 1, a pooled ``[N,1,1,C]`` bottleneck under the real MobileNet v1 name), so
the fast tests exercise the same code paths as the real backbone in a fraction of the time. The
images are solid-colour classes with noise: trivially separable, like TFLite Model Maker's tests.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
MIRROR = SHARED / "mirror"
FLOWERS = SHARED / "datasets" / "flowers8"
TINY_SIZE = 32
TINY_BOTTLENECK = "MobilenetV1/Logits/AvgPool_1a/AvgPool:0"
TINY_FEATURES = 16  # channels of the tiny graph's pooled bottleneck


def build_tiny_graph(path: Path, size: int = TINY_SIZE, channels: int = TINY_FEATURES, seed: int = 0) -> Path:
    """Writes a frozen GraphDef: input:0 [1,size,size,3] → conv → relu6 → avg-pool [N,1,1,C] → logits."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [1, size, size, 3], name="input")
        k = tf.constant(rng.normal(0, 0.5, (3, 3, 3, channels)).astype(np.float32))
        # A per-channel bias, as real graphs have: tfjs fuses conv+bias into FusedConv2D, whose
        # wasm kernel rejects a scalar (rank-0) bias.
        bias = tf.constant(np.full(channels, 1.0, np.float32))
        h = tf.nn.relu6(tf.nn.conv2d(x, k, strides=2, padding="SAME") + bias)
        k2 = tf.constant(rng.normal(0, 0.3, (3, 3, channels, channels)).astype(np.float32))
        h = tf.nn.relu6(tf.nn.conv2d(h, k2, strides=2, padding="SAME"))
        pool = tf.nn.avg_pool2d(h, ksize=size // 4, strides=1, padding="VALID",
                                name="MobilenetV1/Logits/AvgPool_1a/AvgPool")
        w = tf.constant(rng.normal(0, 0.3, (channels, 5)).astype(np.float32))
        logits = tf.reshape(tf.matmul(tf.reshape(pool, [-1, channels]), w), [-1, 5], name="MobilenetV1/Predictions/Reshape")
        tf.nn.softmax(logits, name="MobilenetV1/Predictions/Reshape_1")
    path.write_bytes(graph.as_graph_def().SerializeToString())
    return path


COLOURS = {"Red": (200, 40, 40), "green_leaf": (40, 180, 60), "Blue sky": (50, 70, 210)}


def make_image_folders(root: Path, per_class: int = 16, size: int = 40, seed: int = 0,
                       colours: dict = COLOURS) -> Path:
    """Solid-colour classes with noise: trivially separable, like TFLite Model Maker's tests."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name, rgb in colours.items():
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = np.clip(np.array(rgb) + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(d / f"{name.lower().replace(' ', '_')}_{i:03d}.png")
    return root


def tiny_cli_args(graph: Path) -> list[str]:
    """The command-line options that feed the tiny graph (:func:`tiny_graph_options` for the API)."""
    return ["--graph", str(graph), "--input-tensor", "input:0", "--bottleneck-tensor", TINY_BOTTLENECK,
            "--input-size", str(TINY_SIZE), "--mean", "127.5", "--std", "127.5"]


def tiny_graph_options(graph: Path) -> dict:
    """The same as :func:`tiny_cli_args`, as :func:`pipeline.resume` options."""
    return {"graph": graph, "input_tensor": "input:0", "bottleneck_tensor": TINY_BOTTLENECK,
            "input_size": TINY_SIZE, "mean": 127.5, "std": 127.5}


def needs_shared(path: Path):
    """Real data lives in ../shared; CI always has it, so a missing folder is a failure, not a skip."""
    import pytest

    if not path.exists():
        pytest.fail(f"{path} is missing: tests read ../shared in place (see README)")
    return path

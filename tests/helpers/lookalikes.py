"""Look-alikes of the catalog's official downloads, laid out as a mirror folder.

The official archives cannot be reached from tests, so each backbone other than MobileNet v1 gets a
SMALL frozen graph packed exactly like the real one: same archive name and member path, same
neighbouring files, same input and bottleneck tensor names and shapes, the same batch-1
placeholder and the same quirks:

- ``mobilenet_v2_1.4_224``: a ``.tgz`` of loose files (``./`` member paths, the frozen graph beside
  the ``.tflite``, checkpoint and eval graph); v1 ``FusedBatchNorm``, depthwise convs, ``Relu6``;
  the pooled feature ``MobilenetV2/Logits/AvgPool:0`` is ``[1,1,1,1792]``.
- ``inception_v3`` (2015-12-05): written by an old TensorFlow (``versions.producer`` 8) with
  ``BatchNormWithGlobalNormalization`` and ``CheckNumerics`` after its convolutions, the old
  ``Concat`` (axis first), a JPEG head (``DecodeJpeg/contents`` string placeholder → DecodeJpeg →
  Cast → ExpandDims → ResizeBilinear → Sub → ``Mul``) and ``pool_3/_reshape`` reshaping to a
  hard-coded ``[1, 2048]``.
- ``inception_v4`` (2016-09-09): a ``.pb.tar.gz`` holding the bare graph and the slim labels;
  TF-slim's unfused batch norm (``BatchNorm/batchnorm/...`` Rsqrt/Mul/Sub/Add), ``ConcatV2`` mixed
  blocks, and a ``[1,1,1,1536]`` ``InceptionV4/Logits/AvgPool_1a/AvgPool:0``.

Spatial work is a few strided 3x3 convolutions on 8 channels, then one cheap 1x1 convolution up
to the catalog's feature size, so a whole chain takes seconds. Weights after the
bottleneck (the ImageNet logits) are zeros: nothing the pipeline keeps depends on them.
"""
from __future__ import annotations

import functools
import io
import tarfile
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from pipeline.catalog import get_backbone
from pipeline.fetch import mirror_relpath

# GraphDef versions.producer: the 2015 Inception v3 graph was written before version 9, which
# removed BatchNormWithGlobalNormalization (TensorFlow still imports the op from such graphs).
# The other two are roughly the TensorFlow of their year (the exact numbers do not matter here).
OLD_PRODUCER = 8
PRODUCER_2016 = 17
PRODUCER_2018 = 26


class GraphBuilder:
    """Writes NodeDefs by hand, the way the old graphs were serialised, with no shape inference."""

    def __init__(self, seed: int = 0):
        import tensorflow as tf

        self._tf = tf
        self.graph_def = tf.compat.v1.GraphDef()
        self.rng = np.random.default_rng(seed)

    def node(self, name: str, op: str, inputs: list[str] = (), **attrs):
        tf = self._tf
        node = self.graph_def.node.add(name=name, op=op, input=list(inputs))
        for key, value in attrs.items():
            if isinstance(value, tf.dtypes.DType):
                node.attr[key].type = value.as_datatype_enum
            elif isinstance(value, bool):
                node.attr[key].b = value
            elif isinstance(value, int):
                node.attr[key].i = value
            elif isinstance(value, float):
                node.attr[key].f = value
            elif isinstance(value, str):
                node.attr[key].s = value.encode()
            elif isinstance(value, list):
                node.attr[key].list.i.extend(value)
            elif isinstance(value, tf.TensorShape):
                node.attr[key].shape.CopyFrom(value.as_proto())
            else:
                node.attr[key].tensor.CopyFrom(value)
        return name

    def const(self, name: str, value, dtype=None) -> str:
        tf = self._tf
        value = np.asarray(value, dtype)
        return self.node(name, "Const", dtype=tf.as_dtype(value.dtype),
                         value=tf.make_tensor_proto(value))

    def weights(self, name: str, shape: tuple[int, ...]) -> str:
        fan_in = int(np.prod(shape[:-1]))
        return self.const(name, self.rng.normal(0, 1 / np.sqrt(fan_in), shape).astype(np.float32))

    def placeholder(self, name: str, dtype, shape: list[int] | None) -> str:
        tf = self._tf
        return self.node(name, "Placeholder", dtype=dtype, shape=tf.TensorShape(shape))

    def conv(self, name: str, x: str, k: int, c_in: int, c_out: int, stride: int,
             padding: str = "SAME", weights: str | None = None) -> str:
        w = self.weights(weights or f"{name}/weights", (k, k, c_in, c_out))
        return self.node(name, "Conv2D", [x, w], T=self._tf.float32, strides=[1, stride, stride, 1],
                         padding=padding, data_format="NHWC", use_cudnn_on_gpu=True)

    def bias_add(self, name: str, x: str, channels: int, bias: str | None = None) -> str:
        b = self.const(bias or f"{name}/biases",
                       self.rng.uniform(0.2, 1.0, channels).astype(np.float32))
        return self.node(name, "BiasAdd", [x, b], T=self._tf.float32, data_format="NHWC")

    def pool(self, name: str, op: str, x: str, k: int, stride: int, padding: str = "VALID") -> str:
        return self.node(name, op, [x], T=self._tf.float32, ksize=[1, k, k, 1],
                         strides=[1, stride, stride, 1], padding=padding, data_format="NHWC")

    def unary(self, name: str, op: str, x: str) -> str:
        return self.node(name, op, [x], T=self._tf.float32)

    def binary(self, name: str, op: str, x: str, y: str) -> str:
        return self.node(name, op, [x, y], T=self._tf.float32)

    def positive(self, channels: int) -> np.ndarray:
        return self.rng.uniform(0.5, 1.5, channels).astype(np.float32)

    def serialized(self, producer: int | None = None) -> bytes:
        if producer is not None:
            self.graph_def.versions.producer = producer
        return self.graph_def.SerializeToString()


# --- MobileNet v2 1.4 224 (TF-slim checkpoint tarball, 2018) --------------------------------


def mobilenet_v2_graph(seed: int = 0) -> bytes:
    """input:0 [1,224,224,3] → ... → MobilenetV2/Logits/AvgPool:0 [1,1,1,1792] → logits."""
    import tensorflow as tf

    g = GraphBuilder(seed)
    f = tf.float32
    x = g.placeholder("input", f, [1, 224, 224, 3])
    c = 16
    h = g.conv("MobilenetV2/Conv/Conv2D", x, 3, 3, c, stride=2)  # [1,112,112,16]
    bn = "MobilenetV2/Conv/BatchNorm"
    # The v1 FusedBatchNorm of 2018's frozen graphs (TF 2 writes FusedBatchNormV3).
    h = g.node(f"{bn}/FusedBatchNorm", "FusedBatchNorm",
               [h, g.const(f"{bn}/gamma", g.positive(c)), g.const(f"{bn}/beta", g.positive(c) - 1),
                g.const(f"{bn}/moving_mean", g.positive(c) - 1),
                g.const(f"{bn}/moving_variance", g.positive(c))],
               T=f, epsilon=0.001, data_format="NHWC", is_training=False)
    h = g.unary("MobilenetV2/Conv/Relu6", "Relu6", h)
    # Only the stride-2 blocks, 3x3 depthwise each, as in the real network: 112 → 56 → 28 → 14 → 7.
    # (Bigger strides would be cheaper, but tfjs-wasm computes a SAME convolution wrongly where
    # TensorFlow's padding comes out negative, e.g. 3x3 stride 4 on 224; no real backbone has one.)
    for block in ("expanded_conv_1", "expanded_conv_3", "expanded_conv_6", "expanded_conv_13"):
        dw = f"MobilenetV2/{block}/depthwise"
        # Blurs (positive weights summing to about 1) with no offset: random kernels four deep
        # would wash out the colour that tells the test classes apart.
        blur = g.rng.uniform(0, 2 / 9, (3, 3, c, 1)).astype(np.float32)
        h = g.node(f"{dw}/depthwise", "DepthwiseConv2dNative",
                   [h, g.const(f"{dw}/depthwise_weights", blur)], T=f,
                   strides=[1, 2, 2, 1], padding="SAME", data_format="NHWC")
        h = g.unary(f"{dw}/Relu6", "Relu6", h)
    h = g.conv("MobilenetV2/expanded_conv_16/project/Conv2D", h, 1, c, c, stride=1)  # [1,7,7,16]
    h = g.conv("MobilenetV2/Conv_1/Conv2D", h, 1, c, 1792, stride=1)
    h = g.unary("MobilenetV2/Conv_1/Relu6", "Relu6",
                g.bias_add("MobilenetV2/Conv_1/BatchNorm/BiasAdd", h, 1792,
                           bias="MobilenetV2/Conv_1/BatchNorm/beta"))
    pool = g.pool("MobilenetV2/Logits/AvgPool", "AvgPool", h, 7, 1)  # [1,1,1,1792]
    logits = g.node("MobilenetV2/Logits/Conv2d_1c_1x1/Conv2D", "Conv2D",
                    [pool, g.const("MobilenetV2/Logits/Conv2d_1c_1x1/weights",
                                   np.zeros((1, 1, 1792, 1001), np.float32))],
                    T=f, strides=[1, 1, 1, 1], padding="SAME", data_format="NHWC")
    logits = g.node("MobilenetV2/Logits/Squeeze", "Squeeze", [logits], T=f, squeeze_dims=[1, 2])
    g.node("MobilenetV2/Logits/output", "Identity", [logits], T=f)
    flat = g.node("MobilenetV2/Predictions/Reshape", "Reshape",
                  [logits, g.const("MobilenetV2/Predictions/Reshape/shape", [-1, 1001], np.int32)],
                  T=f, Tshape=tf.int32)
    soft = g.node("MobilenetV2/Predictions/Softmax", "Softmax", [flat], T=f)
    g.node("MobilenetV2/Predictions/Reshape_1", "Reshape",
           [soft, g.node("MobilenetV2/Predictions/Shape", "Shape", [logits], T=f, out_type=tf.int32)],
           T=f, Tshape=tf.int32)
    return g.serialized(producer=PRODUCER_2018)


def mobilenet_v2_archive(graph: bytes) -> bytes:
    stem = "mobilenet_v2_1.4_224"
    return make_tgz([
        (f"./{stem}.ckpt.data-00000-of-00001", b"\0" * 64),
        (f"./{stem}.ckpt.index", b"\0" * 16),
        (f"./{stem}.ckpt.meta", b"\0" * 16),
        (f"./{stem}.tflite", b"TFL3" + b"\0" * 60),
        (f"./{stem}_eval.pbtxt", b'node {\n  name: "input"\n  op: "Placeholder"\n}\n'),
        (f"./{stem}_frozen.pb", graph),
        (f"./{stem}_info.txt", b"Model: mobilenet_v2_1.4_224\nInput: input\n"
                               b"Output: MobilenetV2/Predictions/Reshape_1\n"),
    ])


# --- Inception v3, 2015-12-05 (classify_image.py's graph) ------------------------------------


def _v3_conv(g: GraphBuilder, name: str, x: str, k: int, c_in: int, c_out: int, stride: int,
             padding: str = "VALID") -> str:
    """conv/Conv2D → conv/batchnorm (the removed op) → CheckNumerics → control_dependency → Relu."""
    import tensorflow as tf

    h = g.conv(f"{name}/Conv2D", x, k, c_in, c_out, stride, padding, weights=f"{name}/conv2d_params")
    bn = f"{name}/batchnorm"
    params = [g.const(f"{bn}/moving_mean", g.positive(c_out) - 1),
              g.const(f"{bn}/moving_variance", g.positive(c_out)),
              g.const(f"{bn}/beta", g.positive(c_out)),
              g.const(f"{bn}/gamma", g.positive(c_out))]
    h = g.node(bn, "BatchNormWithGlobalNormalization", [h, *params], T=tf.float32,
               variance_epsilon=0.001, scale_after_normalization=True)
    g.node(f"{name}/CheckNumerics", "CheckNumerics", [h], T=tf.float32,
           message="conv output has NaN or Inf")
    h = g.node(f"{name}/control_dependency", "Identity", [h, f"^{name}/CheckNumerics"],
               T=tf.float32)
    return g.unary(name, "Relu", h)


def inception_v3_2015_graph(seed: int = 0) -> bytes:
    """DecodeJpeg head → Mul:0 [1,299,299,3] → ... → pool_3/_reshape:0 [1,2048] → softmax."""
    import tensorflow as tf

    g = GraphBuilder(seed)
    f = tf.float32
    jpeg = g.placeholder("DecodeJpeg/contents", tf.string, [])
    img = g.node("DecodeJpeg", "DecodeJpeg", [jpeg], channels=3, ratio=1, fancy_upscaling=True,
                 try_recover_truncated=False, acceptable_fraction=1.0)
    img = g.node("Cast", "Cast", [img], SrcT=tf.uint8, DstT=f)
    img = g.node("ExpandDims", "ExpandDims", [img, g.const("ExpandDims/dim", 0, np.int32)],
                 T=f, Tdim=tf.int32)
    img = g.node("ResizeBilinear", "ResizeBilinear",
                 [img, g.const("ResizeBilinear/size", [299, 299], np.int32)], T=f,
                 align_corners=False)
    img = g.binary("Sub", "Sub", img, g.const("Sub/y", 128.0, np.float32))
    x = g.binary("Mul", "Mul", img, g.const("Mul/y", 1 / 128, np.float32))
    h = _v3_conv(g, "conv", x, 3, 3, 8, stride=4)                # [1,75,75,8]
    h = g.pool("pool", "MaxPool", h, 3, 2)                        # [1,37,37,8]
    h = _v3_conv(g, "conv_1", h, 3, 8, 8, stride=2)               # [1,18,18,8]
    h = g.pool("pool_1", "MaxPool", h, 3, 2)                      # [1,8,8,8]
    branch = g.unary("mixed_10/conv", "Relu", g.bias_add(
        "mixed_10/conv/batchnorm", g.conv("mixed_10/conv/Conv2D", h, 1, 8, 1024, 1,
                                       weights="mixed_10/conv/conv2d_params"), 1024))
    tower = g.unary("mixed_10/tower/conv", "Relu", g.bias_add(
        "mixed_10/tower/conv/batchnorm", g.conv("mixed_10/tower/conv/Conv2D", h, 1, 8, 1024, 1,
                                             weights="mixed_10/tower/conv/conv2d_params"), 1024))
    # The old Concat takes its axis first (ConcatV2 takes it last).
    h = g.node("mixed_10/join", "Concat", [g.const("mixed_10/join/concat_dim", 3, np.int32), branch, tower],
               N=2, T=f)                                          # [1,8,8,2048]
    pool = g.pool("pool_3", "AvgPool", h, 8, 1)                   # [1,1,1,2048]
    flat = g.node("pool_3/_reshape", "Reshape",
                  [pool, g.const("pool_3/_reshape/shape", [1, 2048], np.int32)], T=f, Tshape=tf.int32)
    logits = g.node("softmax/logits/MatMul", "MatMul",
                    [flat, g.const("softmax/weights", np.zeros((2048, 1008), np.float32))],
                    T=f, transpose_a=False, transpose_b=False)
    logits = g.binary("softmax/logits", "Add", logits,
                      g.const("softmax/biases", np.zeros(1008, np.float32)))
    g.unary("softmax", "Softmax", logits)
    return g.serialized(producer=OLD_PRODUCER)


def inception_v3_2015_archive(graph: bytes) -> bytes:
    return make_tgz([
        ("classify_image_graph_def.pb", graph),
        ("cropped_panda.jpg", b"\xff\xd8\xff\xe0" + b"\0" * 60),
        ("imagenet_2012_challenge_label_map_proto.pbtxt",
         b'entry {\n  target_class: 449\n  target_class_string: "n01440764"\n}\n'),
        ("imagenet_synset_to_human_label_map.txt", b"n00004475\torganism, being\n"),
        ("LICENSE", b"Apache License 2.0\n"),
    ])


# --- Inception v4, 2016-09-09 (TF-slim frozen graph) ----------------------------------------


def _slim_conv(g: GraphBuilder, scope: str, x: str, k: int, c_in: int, c_out: int, stride: int,
               padding: str = "SAME") -> str:
    """TF-slim conv + unfused BatchNorm (scale=False, as slim's inception arg scope) + Relu."""
    h = g.conv(f"{scope}/Conv2D", x, k, c_in, c_out, stride, padding)
    bn = f"{scope}/BatchNorm"
    eps = g.const(f"{bn}/batchnorm/add/y", 0.001, np.float32)
    var = g.const(f"{bn}/moving_variance", g.positive(c_out))
    inv = g.unary(f"{bn}/batchnorm/Rsqrt", "Rsqrt", g.binary(f"{bn}/batchnorm/add", "Add", var, eps))
    scaled = g.binary(f"{bn}/batchnorm/mul_1", "Mul", h, inv)
    shift = g.binary(f"{bn}/batchnorm/mul_2", "Mul",
                     g.const(f"{bn}/moving_mean", g.positive(c_out) - 1), inv)
    offset = g.binary(f"{bn}/batchnorm/sub", "Sub", g.const(f"{bn}/beta", g.positive(c_out)), shift)
    return g.unary(f"{scope}/Relu", "Relu", g.binary(f"{bn}/batchnorm/add_1", "Add", scaled, offset))


V4_POOL = "InceptionV4/Logits/AvgPool_1a/AvgPool"
# TF-slim named the same pooling after its kernel in other versions (as its Inception v3 still does).
V4_POOL_RENAMED = "InceptionV4/Logits/AvgPool_1a_8x8/AvgPool"


def inception_v4_graph(seed: int = 0, pool_name: str = V4_POOL) -> bytes:
    """input:0 [1,299,299,3] → ... → InceptionV4/Logits/AvgPool_1a/AvgPool:0 [1,1,1,1536]."""
    import tensorflow as tf

    g = GraphBuilder(seed)
    f = tf.float32
    body = "InceptionV4/InceptionV4"
    x = g.placeholder("input", f, [1, 299, 299, 3])
    h = _slim_conv(g, f"{body}/Conv2d_1a_3x3", x, 3, 3, 8, 4, "VALID")        # [1,75,75,8]
    h = g.pool(f"{body}/Mixed_3a/Branch_0/MaxPool_0a_3x3/MaxPool", "MaxPool", h, 3, 2)  # 37
    h = _slim_conv(g, f"{body}/Mixed_4a/Branch_0/Conv2d_1a_3x3", h, 3, 8, 8, 2, "VALID")  # 18
    h = g.pool(f"{body}/Mixed_6a/Branch_2/MaxPool_1a_3x3/MaxPool", "MaxPool", h, 3, 2)  # 8
    mixed = f"{body}/Mixed_7d"
    b0 = _slim_conv(g, f"{mixed}/Branch_0/Conv2d_0a_1x1", h, 1, 8, 768, 1)
    b1 = _slim_conv(g, f"{mixed}/Branch_1/Conv2d_0a_1x1", h, 1, 8, 768, 1)
    h = g.node(f"{mixed}/concat", "ConcatV2", [b0, b1, g.const(f"{mixed}/concat/axis", 3, np.int32)],
               N=2, T=f, Tidx=tf.int32)                                       # [1,8,8,1536]
    pool = g.pool(pool_name, "AvgPool", h, 8, 1)                             # [1,1,1,1536]
    flat = g.node("InceptionV4/Logits/PreLogitsFlatten/flatten/Reshape", "Reshape",
                  [pool, g.const("InceptionV4/Logits/PreLogitsFlatten/flatten/Reshape/shape",
                                 [-1, 1536], np.int32)], T=f, Tshape=tf.int32)
    logits = g.node("InceptionV4/Logits/Logits/MatMul", "MatMul",
                    [flat, g.const("InceptionV4/Logits/Logits/weights",
                                   np.zeros((1536, 1001), np.float32))],
                    T=f, transpose_a=False, transpose_b=False)
    logits = g.node("InceptionV4/Logits/Logits/BiasAdd", "BiasAdd",
                    [logits, g.const("InceptionV4/Logits/Logits/biases", np.zeros(1001, np.float32))],
                    T=f, data_format="NHWC")
    g.unary("InceptionV4/Logits/Predictions", "Softmax", logits)
    return g.serialized(producer=PRODUCER_2016)


def inception_v4_archive(graph: bytes) -> bytes:
    return make_tgz([
        ("inception_v4_2016_09_09_frozen.pb", graph),
        ("imagenet_slim_labels.txt", b"dummy\ntench\ngoldfish\n"),
    ])


# --- the catalog's look-alikes and the mirror serving them -----------------------------------

LOOKALIKES: dict[str, tuple[Callable[[], bytes], Callable[[bytes], bytes]]] = {
    "mobilenet_v2_1.4_224": (mobilenet_v2_graph, mobilenet_v2_archive),
    "inception_v3": (inception_v3_2015_graph, inception_v3_2015_archive),
    "inception_v4": (inception_v4_graph, inception_v4_archive),
}


def make_tgz(files: list[tuple[str, bytes]], extra: Iterable[tarfile.TarInfo] = ()) -> bytes:
    """A .tgz of ``files`` (name, bytes), mode 0644, then the bare members ``extra`` (links, FIFOs...)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info)
    return buf.getvalue()


@functools.cache
def lookalike_graph(name: str) -> bytes:
    """The serialized look-alike GraphDef of catalog backbone ``name``."""
    return LOOKALIKES[name][0]()


def lookalike_archive(name: str) -> bytes:
    """The look-alike packed as the official download of catalog backbone ``name``."""
    return LOOKALIKES[name][1](lookalike_graph(name))


def write_mirror(root: Path, archives: dict[str, bytes] | None = None) -> Path:
    """Lays archives out like ``EDGEPIPE_MIRROR``: ``<root>/<host>/<path of the catalog url>``.

    Args:
        archives: catalog name → the bytes to serve as its download; default every look-alike.
    """
    if archives is None:
        archives = {name: lookalike_archive(name) for name in LOOKALIKES}
    for name, data in archives.items():
        path = root / mirror_relpath(get_backbone(name).url)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root

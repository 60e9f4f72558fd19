"""A frozen backbone graph as a batched feature function.

The same :func:`backbone_features` builds the features for bottleneck extraction and inside the
exported SavedModel, so training and serving run one graph with one normalisation.
"""
from __future__ import annotations

import dataclasses
import functools
import threading
from pathlib import Path

import numpy as np

from pipeline.console import log
from pipeline.errors import GraphError
from pipeline.graph import best_bottleneck, bottleneck_candidates, closest_names, load_graph_def, node_name
from pipeline.graphfix import Fix, feature_subgraph, legacy_ops_rewritten
from pipeline.types import BackboneSpec


def graph_fixes(path: Path, spec: BackboneSpec) -> list[Fix]:
    """What :func:`load_graph_def` and :func:`backbone_features` change in this graph.

    For the manifest and the notes the fetch stage prints; ``spec`` must be resolved.
    """
    graph_def, fixes = legacy_ops_rewritten(load_graph_def(path, fix=False))
    _, trimmed = feature_subgraph(graph_def, spec.input_tensor, spec.bottleneck_tensor)
    return fixes + trimmed


def resolve_spec(graph_def, spec: BackboneSpec) -> BackboneSpec:
    """Checks the spec's tensors exist and fills in the feature size.

    The first of ``bottleneck_tensor`` and ``alternates`` that exists in the graph is used (some
    graphs renamed their pooled feature between TensorFlow versions). When none does and the
    feature size is known, the tensor shaped ``[N,1,1,C]`` or ``[N,C]`` with that ``C`` is used,
    pooling ops first (``graph.best_bottleneck``); the returned spec names it.

    Raises:
        GraphError: the input or bottleneck tensor is not in the graph (closest names suggested).
    """
    names = {node.name for node in graph_def.node}
    if node_name(spec.input_tensor) not in names:
        raise GraphError(
            f"input tensor {spec.input_tensor!r} is not in the graph; closest: "
            f"{closest_names(spec.input_tensor, graph_def)} (set --input-tensor)"
        )
    for candidate in (spec.bottleneck_tensor, *spec.alternates):
        if node_name(candidate) in names:
            break
    else:
        candidate = _bottleneck_by_shape(graph_def, spec)
        if candidate is None:
            raise GraphError(
                f"bottleneck tensor {spec.bottleneck_tensor!r} is not in the graph; closest: "
                f"{closest_names(spec.bottleneck_tensor, graph_def)} (set --bottleneck-tensor)"
            )
    spec = dataclasses.replace(spec, bottleneck_tensor=candidate)
    feature_size = _probe_feature_size(graph_def, spec)
    if spec.feature_size and spec.feature_size != feature_size:
        raise GraphError(
            f"bottleneck {candidate} has {feature_size} features, the catalog says "
            f"{spec.feature_size}; is this the right graph for {spec.name}?"
        )
    return dataclasses.replace(spec, feature_size=feature_size)


def _bottleneck_by_shape(graph_def, spec: BackboneSpec) -> str | None:
    """The pooled or flat tensor with ``spec.feature_size`` features computed from the input."""
    if not spec.feature_size:
        return None
    found = best_bottleneck(bottleneck_candidates(graph_def, spec.input_tensor),
                            spec.feature_size, like=spec.bottleneck_tensor)
    return found.name if found else None


def _probe_feature_size(graph_def, spec: BackboneSpec) -> int:
    import tensorflow as tf

    size = spec.preprocessing.size

    @tf.function
    def probe(x):
        return backbone_features(graph_def, spec, x)

    out = probe.get_concrete_function(tf.TensorSpec([None, size, size, 3], tf.float32))
    dim = out.structured_outputs.shape[-1]
    if dim is None:
        dim = int(probe(tf.zeros([1, size, size, 3])).shape[-1])
    return int(dim)


def backbone_features(graph_def, spec: BackboneSpec, images):
    """Normalises float32 RGB 0..255 images and runs the backbone; returns ``[N, features]``.

    Call inside a ``tf.function``: the graph is imported into the function being traced, with
    ``input_map`` replacing the input placeholder, whose batch is fixed to 1 in the MobileNet v1
    graphs, by the batched, normalised tensor.
    """
    import tensorflow as tf

    prep = spec.preprocessing
    x = (images - prep.mean) / prep.std
    # Only what the bottleneck needs: a preprocessing head in front of the input (Inception v3's
    # DecodeJpeg) and the logits after the bottleneck stay out of every exported model. It is
    # plain Python on protos, so autograph must leave it alone (its conversion broke it).
    graph_def, _ = tf.autograph.experimental.do_not_convert(feature_subgraph)(
        graph_def, spec.input_tensor, spec.bottleneck_tensor)
    (bottleneck,) = tf.graph_util.import_graph_def(
        graph_def,
        input_map={spec.input_tensor: x},
        return_elements=[spec.bottleneck_tensor],
        name="backbone",
    )
    # Pooled features come as [N,1,1,C] in TF-slim graphs and [N,C] elsewhere.
    return tf.reshape(bottleneck, [tf.shape(bottleneck)[0], -1])


class FeatureExtractor:
    """Loaded once per process (or Beam worker); maps image batches to features.

    Args:
        graph_path: the frozen graph.
        spec: the backbone spec (tensors, preprocessing).
    """

    engine = "tensorflow"

    def __init__(self, graph_path: Path, spec: BackboneSpec):
        import tensorflow as tf

        self.graph_def = load_graph_def(graph_path)
        self.spec = resolve_spec(self.graph_def, spec)
        size = self.spec.preprocessing.size
        graph_def, resolved = self.graph_def, self.spec

        @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)])
        def run(images):
            return backbone_features(graph_def, resolved, images)

        self._run = run

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """float32 ``[N, H, W, 3]`` in 0..255 → float32 ``[N, feature_size]``."""
        return self._run(np.asarray(images, np.float32)).numpy()


BATCH = 4  # images per LiteRT invoke: fewer hand-offs than 1, no slower per image than 8


class LiteRTFeatureExtractor(FeatureExtractor):
    """The same feature function, converted once to a float32 TFLite model and run in
    ai-edge-litert (XNNPACK), a few images per call.

    The work is split between ``threads`` interpreters of one thread each, every one taking its
    share of a call's images, rather than one interpreter with ``threads`` threads. A small model
    gives each XNNPACK thread little work per operator, so one interpreter's threads spend much of
    their time meeting at the end of each layer (and spinning there, which takes the core from
    the threads decoding the next images): measured on 2 cores with MobileNet v1 0.25, two
    one-thread interpreters run 1.1-1.3x as many images/s as one two-thread interpreter on
    decoded images, and about 1.3x during a cold extraction.
    Features agree with TensorFlow's to about 2e-5 (float32 rounding in other kernels), far below
    what moves a trained head, and are bit-identical whatever the batch size, batch position,
    interpreter or thread count, so a cached feature does not depend on which batch computed it.

    Args:
        threads: threads in all; default: one per core.
        interpreters: how many interpreters share them (default ``threads``: one thread each).
        batch: images per invoke.

    Raises:
        RuntimeError: the graph has ops TFLite cannot convert (callers fall back to TensorFlow).
    """

    engine = "litert"

    def __init__(self, graph_path: Path, spec: BackboneSpec, threads: int | None = None,
                 batch: int = BATCH, interpreters: int | None = None):
        import tensorflow as tf

        super().__init__(graph_path, spec)
        converter = tf.lite.TFLiteConverter.from_concrete_functions([self._run.get_concrete_function()])
        try:
            model = converter.convert()
        except Exception as err:  # ConverterError and friends
            raise RuntimeError(f"TFLite cannot convert this backbone for extraction: {err}") from err
        self._start(model, threads, batch, interpreters)

    @classmethod
    def from_model(cls, model: bytes, spec: BackboneSpec, threads: int | None = None, batch: int = BATCH,
                   interpreters: int | None = None) -> "LiteRTFeatureExtractor":
        """The extractor from a :attr:`model` converted elsewhere (on a Beam driver) and its resolved
        spec: no TensorFlow in this process, which saves a worker about 5 s and 850 MB."""
        self = cls.__new__(cls)
        self.spec = spec
        self._start(model, threads, batch, interpreters)
        return self

    def _start(self, model: bytes, threads: int | None, batch: int, interpreters: int | None) -> None:
        import os
        from concurrent.futures import ThreadPoolExecutor

        self.model = model
        self.batch = batch
        threads = max(1, threads or os.cpu_count() or 1)
        interpreters = max(1, min(threads, interpreters or threads))
        self._lanes = [_Lane(model, batch, self.spec.preprocessing.size, threads // interpreters)
                       for _ in range(interpreters)]
        # The calling thread runs the first share, these threads the others (invoke releases the GIL).
        self._pool = ThreadPoolExecutor(len(self._lanes) - 1) if len(self._lanes) > 1 else None
        self._lock = threading.Lock()

    def __call__(self, images) -> np.ndarray:
        """float32 ``[N, H, W, 3]`` in 0..255, or a list of ``[H, W, 3]`` float32 or uint8 arrays
        (not stacked: they are copied into the interpreter's input one by one) → float32
        ``[N, feature_size]``."""
        n, b = len(images), self.batch
        out = np.empty((n, self.spec.feature_size), np.float32)
        if n == 0:
            return out
        # Whole batches per interpreter: 9 images at batch 4 on 2 give 8 and 1 (three invokes),
        # not 5 and 4 (four, two of them padded).
        invokes = -(-n // b)
        per = -(-invokes // len(self._lanes)) * b
        shares = [(start, min(n, start + per)) for start in range(0, n, per)]
        with self._lock:  # one call at a time: each interpreter has one input buffer
            pending = [self._pool.submit(lane.run, images[lo:hi], out[lo:hi])
                       for lane, (lo, hi) in zip(self._lanes[1:], shares[1:])]
            self._lanes[0].run(images[shares[0][0]:shares[0][1]], out[shares[0][0]:shares[0][1]])
            for done in pending:
                done.result()
        return out


class _Lane:
    """One LiteRT interpreter at a fixed batch."""

    def __init__(self, model: bytes, batch: int, size: int, threads: int = 1):
        from ai_edge_litert.interpreter import Interpreter

        self._interpreter = Interpreter(model_content=model, num_threads=threads)
        self.batch = batch
        self._interpreter.resize_tensor_input(self._interpreter.get_input_details()[0]["index"],
                                              [batch, size, size, 3])
        self._interpreter.allocate_tensors()
        self._in = self._interpreter.get_input_details()[0]["index"]
        self._out = self._interpreter.get_output_details()[0]["index"]

    def run(self, images, out: np.ndarray) -> None:
        """Features of ``images`` into ``out`` (a view of the caller's result)."""
        b = self.batch
        for start in range(0, len(images), b):
            part = images[start:start + b]
            # Straight into the interpreter's input buffer (uint8 pixels are cast on the way),
            # so no float32 copy of an image is made; the view is gone before invoke(). A short
            # last batch is padded with zeros, whose outputs are dropped.
            view = self._interpreter.tensor(self._in)()
            for k, img in enumerate(part):
                view[k] = img
            view[len(part):] = 0
            del view
            self._interpreter.invoke()
            out[start:start + len(part)] = self._interpreter.get_tensor(self._out).reshape(b, -1)[:len(part)]


ENGINES = ("litert", "tensorflow")


@functools.lru_cache(maxsize=4)
def get_extractor(graph_path: str, spec: BackboneSpec, engine: str = "litert",
                  threads: int | None = None) -> FeatureExtractor:
    """The per-process extractor for a graph (what a Beam ``DoFn.setup`` holds).

    ``engine="litert"`` falls back to TensorFlow, with a note, for a graph TFLite cannot convert.
    ``threads``: LiteRT's threads (default one per core; features do not depend on it).
    """
    if engine == "litert":
        try:
            return LiteRTFeatureExtractor(Path(graph_path), spec, threads=threads)
        except RuntimeError as err:
            log.info(f"note: bottlenecks computed with TensorFlow: {str(err).splitlines()[0]}")
    return FeatureExtractor(Path(graph_path), spec)

"""``edgepipe inspect GRAPH.pb``: the tensor names to pass with ``--graph`` for your own graph.

Lists the graph's placeholders (name, dtype, shape), the image-shaped tensors inside it (for graphs
that decode their own JPEGs, like Inception v3 of 2015), and the tensors shaped like a pooled
feature, ``[N,1,1,C]`` or ``[N,C]``, largest ``C`` first. ``backbone.resolve_spec`` uses the same
search to find a catalog bottleneck whose name changed between TensorFlow versions.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import GraphError
from pipeline.graphfix import Fix

_SHOWN = 12


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a graph, with its statically known shape.

    Attributes:
        name: e.g. ``input:0``.
        op: the type of the op that makes it.
        dtype: e.g. ``float32``.
        shape: one entry per dimension (None where unknown); None when even the rank is unknown.
    """

    name: str
    op: str
    dtype: str
    shape: tuple[int | None, ...] | None

    @property
    def features(self) -> int | None:
        """``C`` when the tensor is ``[N,1,1,C]`` (pooled) or ``[N,C]`` (flat), else None."""
        s = self.shape
        if s is None or not s[-1] or s[-1] < 2:
            return None
        if len(s) == 2 or (len(s) == 4 and s[1] == 1 and s[2] == 1):
            return s[-1]
        return None

    def shape_text(self) -> str:
        if self.shape is None:
            return "unknown"
        return "[" + ", ".join("?" if d is None else str(d) for d in self.shape) + "]"


@dataclass(frozen=True)
class GraphSummary:
    """What :func:`inspect_graph` found; :func:`describe` prints it."""

    path: Path
    nodes: int
    producer: int
    placeholders: list[TensorInfo]
    images: list[TensorInfo]
    candidates: list[TensorInfo]
    fixes: list[Fix] = field(default_factory=list)


def bottleneck_candidates(graph_def, input_tensor: str | None = None) -> list[TensorInfo]:
    """Float tensors shaped like a pooled feature, largest feature size first.

    Args:
        graph_def: a frozen GraphDef (legacy ops already rewritten, so it imports).
        input_tensor: only tensors computed from this one; None means from any placeholder.

    Raises:
        GraphError: the graph does not import, or ``input_tensor`` is not in it.
    """
    graph = _imported(graph_def)
    if input_tensor is None:
        starts = [op for op in graph.get_operations() if op.type in ("Placeholder", "PlaceholderV2")]
    else:
        try:
            starts = [graph.get_tensor_by_name(input_tensor).op]
        except (KeyError, ValueError):
            raise GraphError(f"input tensor {input_tensor!r} is not in the graph") from None
    reached = _downstream(starts)
    found = [
        info for op in graph.get_operations() if op in reached and op not in starts
        for info in map(_info, op.outputs) if info.features and info.dtype.startswith("float")
    ]
    return sorted(found, key=lambda t: -t.features)


def best_bottleneck(candidates: list[TensorInfo], feature_size: int = 0, like: str = "") -> TensorInfo | None:
    """The candidate most likely to be the backbone's pooled feature.

    Pooling ops' names (``AvgPool``, ``pool_3``) first, then the name closest to ``like``, then the
    largest; ``feature_size`` (when not 0) must match.
    """
    pool = [t for t in candidates if not feature_size or t.features == feature_size]
    if not pool:
        return None

    def key(t: TensorInfo):
        similarity = difflib.SequenceMatcher(None, t.name, like).ratio() if like else 0.0
        return ("pool" not in t.name.lower(), -similarity, -t.features)

    return min(pool, key=key)


def inspect_graph(path: Path) -> GraphSummary:
    """Reads a frozen graph and finds its inputs and candidate bottlenecks.

    Raises:
        GraphError: the file is not a frozen GraphDef or does not import.
    """
    from pipeline.backbone import load_graph_def
    from pipeline.graphfix import legacy_ops_rewritten

    graph_def, fixes = legacy_ops_rewritten(load_graph_def(path, fix=False))
    graph = _imported(graph_def)
    ops = graph.get_operations()
    placeholders = [_info(op.outputs[0]) for op in ops if op.type in ("Placeholder", "PlaceholderV2")]
    images = [
        info for op in ops if op.type not in ("Placeholder", "PlaceholderV2", "Const")
        for info in map(_info, op.outputs)
        if info.dtype == "float32" and info.shape is not None and len(info.shape) == 4
        and info.shape[3] == 3 and None not in info.shape[1:3]
    ]
    return GraphSummary(Path(path), len(graph_def.node), graph_def.versions.producer, placeholders,
                        images, bottleneck_candidates(graph_def), fixes)


def describe(summary: GraphSummary) -> str:
    """The text ``edgepipe inspect`` prints."""
    lines = [f"{summary.path}: {summary.nodes} nodes, GraphDef producer {summary.producer}", "",
             "placeholders:"]
    lines += [f"  {t.name:40s} {t.dtype:8s} {t.shape_text()}" for t in summary.placeholders] or ["  none"]
    feeds = [t for t in summary.placeholders if t.dtype == "float32" and t.shape and len(t.shape) == 4]
    if not feeds and summary.images:
        lines += ["", "image tensors inside the graph (no placeholder takes float images; feed one "
                      "of these, e.g. the last before the first convolution):"]
        lines += [f"  {t.name:40s} {t.op:16s} {t.shape_text()}" for t in summary.images[-_SHOWN:]]
    lines += ["", "bottleneck candidates ([N,1,1,C] pooled or [N,C] flat, largest first):"]
    shown = summary.candidates[:_SHOWN]
    lines += [f"  {t.name:40s} {t.op:16s} {t.shape_text():18s} {t.features} features" for t in shown]
    if len(summary.candidates) > len(shown):
        lines.append(f"  ... and {len(summary.candidates) - len(shown)} more")
    if not shown:
        lines.append("  none")
    for fix in summary.fixes:
        lines.append(f"note: edgepipe rewrites {fix.note()}")
    feed = (feeds or summary.images[-1:] or [None])[-1]
    best = best_bottleneck(summary.candidates)
    if feed is not None and best is not None and feed.shape[1] and feed.shape[1] == feed.shape[2]:
        lines += ["", f"try: --graph {summary.path} --input-tensor {feed.name} "
                      f"--bottleneck-tensor {best.name} --input-size {feed.shape[1]}"]
    return "\n".join(lines)


def _imported(graph_def):
    import tensorflow as tf

    graph = tf.Graph()
    try:
        with graph.as_default():
            tf.graph_util.import_graph_def(graph_def, name="")
    except (ValueError, tf.errors.OpError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise GraphError(f"the graph does not import into TensorFlow: {first}") from None
    return graph


def _downstream(starts) -> set:
    seen: set = set()
    stack = list(starts)
    while stack:
        op = stack.pop()
        if op in seen:
            continue
        seen.add(op)
        stack += [c for out in op.outputs for c in out.consumers()]
        stack += op._control_outputs
    return seen


def _info(tensor) -> TensorInfo:
    shape = None if tensor.shape.rank is None else tuple(tensor.shape.as_list())
    return TensorInfo(tensor.name, tensor.op.type, tensor.dtype.name, shape)

"""``edgepipe inspect GRAPH.pb``: the tensor names to pass with ``--graph`` for your own graph.

Lists the graph's placeholders (name, dtype, shape), the image-shaped tensors inside it (for graphs
that decode their own JPEGs, like Inception v3 of 2015), and the tensors shaped like a pooled
feature, ``[N,1,1,C]`` or ``[N,C]``, largest ``C`` first. That search is
``graph.bottleneck_candidates``, which ``backbone.resolve_spec`` also uses to find a catalog
bottleneck whose name changed between TensorFlow versions. It also lists the graph's outputs
(``graph.output_candidates``: terminal float ``[N,C]`` tensors, Softmax first), the one
``--model-graph`` adopts when ``--output-tensor`` is not given.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipeline.catalog import recognise
from pipeline.graph import (
    PLACEHOLDER_OPS,
    TensorInfo,
    best_bottleneck,
    bottleneck_candidates,
    imported_graph,
    load_graph_def,
    output_candidates,
    tensor_info,
)
from pipeline.graphfix import Fix, legacy_ops_rewritten

_SHOWN = 12


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
    outputs: list[TensorInfo] = field(default_factory=list)
    recognised: list[str] = field(default_factory=list)  # catalog rows it matches by its tensors


def inspect_graph(path: Path) -> GraphSummary:
    """Reads a frozen graph and finds its inputs and candidate bottlenecks.

    Raises:
        GraphError: the file is not a frozen GraphDef or does not import.
    """
    graph_def, fixes = legacy_ops_rewritten(load_graph_def(path, fix=False))
    graph = imported_graph(graph_def)
    ops = graph.get_operations()
    placeholders = [tensor_info(op.outputs[0]) for op in ops if op.type in PLACEHOLDER_OPS]
    images = [
        info for op in ops if op.type not in (*PLACEHOLDER_OPS, "Const")
        for info in map(tensor_info, op.outputs)
        if info.dtype == "float32" and info.shape is not None and len(info.shape) == 4
        and info.shape[3] == 3 and None not in info.shape[1:3]
    ]
    recognised = [spec.name for spec, _ in recognise(graph_def)]
    return GraphSummary(Path(path), len(graph_def.node), graph_def.versions.producer, placeholders,
                        images, bottleneck_candidates(graph_def), fixes, output_candidates(graph_def), recognised)


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
    lines += ["", "outputs (terminal float [N,C] tensors, Softmax first; --model-graph adopts one):"]
    lines += [f"  {t.name:40s} {t.op:16s} {t.shape_text():18s} {t.features} classes"
              for t in summary.outputs[:_SHOWN]] or ["  none"]
    for fix in summary.fixes:
        lines.append(f"note: edgepipe rewrites {fix.note()}")
    feed = (feeds or summary.images[-1:] or [None])[-1]
    best = best_bottleneck(summary.candidates)
    if feed is not None and best is not None and feed.shape[1] and feed.shape[1] == feed.shape[2]:
        lines += ["", f"try: --graph {summary.path} --input-tensor {feed.name} "
                      f"--bottleneck-tensor {best.name} --input-size {feed.shape[1]}"]
    if len(summary.recognised) == 1:
        lines += [f"recognised as catalog backbone {summary.recognised[0]} by its tensor names and shapes, so "
                  f"--graph {summary.path} alone will do (or --model-graph to adopt it whole with its head)"]
    elif summary.recognised:
        lines += [f"matches catalog backbones {', '.join(summary.recognised)} by its tensors; add --input-size "
                  "(or the tensors) to choose"]
    return "\n".join(lines)


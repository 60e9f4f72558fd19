"""Rewrites that let old frozen graphs through today's TensorFlow, TFLite and TF.js converters.

Both kinds work on the GraphDef before it is imported, and each returns what it changed as
:class:`Fix` records, which the fetch stage prints and writes into the manifest.

- :func:`legacy_ops_rewritten`: ops of early graphs that today's TensorFlow refuses to run or a
  converter rejects, rewritten into plain ops. One function per op type, registered in
  ``LEGACY_OPS``; the 2015 Inception v3 graph needs them. (Its axis-first ``Concat`` needs none:
  TFLite and TF.js both still take it.)
- :func:`feature_subgraph`: only the nodes the bottleneck needs once the input tensor is fed. A
  graph fed in the middle (Inception v3's ``Mul:0``, after its JPEG-decoding head) would otherwise
  carry the head's placeholder and ``DecodeJpeg`` into the exported models, and the logits after
  the bottleneck would ride along unused. Reshapes that hard-code a batch of 1 on the way (again
  Inception v3: ``pool_3/_reshape`` to ``[1, 2048]``) are given a free batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class Fix:
    """One kind of change to a graph, with every node it touched.

    Attributes:
        what: the op type rewritten, or what was removed.
        into: what replaced it.
        why: the reason, for the note and the manifest.
        nodes: the names of the nodes changed or removed.
    """

    what: str
    into: str
    why: str
    nodes: tuple[str, ...]

    def note(self) -> str:
        shown = ", ".join(self.nodes[:3]) + (f" and {len(self.nodes) - 3} more" if len(self.nodes) > 3 else "")
        return f"{self.what} → {self.into} ({len(self.nodes)} node(s): {shown}); {self.why}"

    def to_dict(self) -> dict:
        return {"what": self.what, "into": self.into, "why": self.why, "nodes": list(self.nodes)}


# --- legacy ops --------------------------------------------------------------------------------

@dataclass(frozen=True)
class _LegacyOp:
    rewrite: Callable  # (node, unique_name) -> list of NodeDefs; the last one keeps node.name
    into: str
    why: str


LEGACY_OPS: dict[str, _LegacyOp] = {}


def _legacy(op: str, into: str, why: str):
    def register(fn):
        LEGACY_OPS[op] = _LegacyOp(fn, into, why)
        return fn

    return register


@_legacy("BatchNormWithGlobalNormalization", "Sub, AddV2, Rsqrt, Mul, AddV2",
         "removed in GraphDef version 9: today's TensorFlow will not run it, so nothing exports")
def _batch_norm_with_global_normalization(node, unique_name):
    """``(t - m) * rsqrt(v + eps) [* gamma] + beta``: what the op computed, in today's ops."""
    t, mean, variance, beta, gamma = node.input[:5]
    controls = [i for i in node.input[5:] if i.startswith("^")]
    dtype = node.attr["T"].type
    eps = node.attr["variance_epsilon"].f
    name = node.name
    eps_node = _const(unique_name(f"{name}/variance_epsilon"), eps, dtype)
    plus_eps = _op(unique_name(f"{name}/add_epsilon"), "AddV2", [variance, eps_node.name], dtype)
    scale = _op(unique_name(f"{name}/rsqrt"), "Rsqrt", [plus_eps.name], dtype)
    nodes = [eps_node, plus_eps, scale]
    if node.attr["scale_after_normalization"].b:
        scale = _op(unique_name(f"{name}/scale"), "Mul", [scale.name, gamma], dtype)
        nodes.append(scale)
    centered = _op(unique_name(f"{name}/centered"), "Sub", [t, mean, *controls], dtype)
    normalized = _op(unique_name(f"{name}/normalized"), "Mul", [centered.name, scale.name], dtype)
    return [*nodes, centered, normalized, _op(name, "AddV2", [normalized.name, beta], dtype)]


@_legacy("CheckNumerics", "Identity", "a NaN/Inf assertion that the TF.js converter rejects")
def _check_numerics(node, unique_name):
    return [_op(node.name, "Identity", list(node.input), node.attr["T"].type)]


def legacy_ops_rewritten(graph_def):
    """Rewrites every op in ``LEGACY_OPS`` into ops that today's TensorFlow and converters run.

    The rewritten node keeps its name, so its consumers and tensor names (``conv/batchnorm:0``)
    are unchanged; helper nodes are named under it. ``versions.producer`` is kept: it is what
    lets TensorFlow import the old ops that are not rewritten.

    Args:
        graph_def: a ``tf.compat.v1.GraphDef`` (not modified).

    Returns:
        ``(graph_def, fixes)``: the input itself when nothing needed a rewrite, else a new
        GraphDef; one :class:`Fix` per op type rewritten.
    """
    if not any(node.op in LEGACY_OPS for node in graph_def.node):
        return graph_def, []
    taken = {node.name for node in graph_def.node}

    def unique_name(base: str) -> str:
        name, k = base, 1
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        taken.add(name)
        return name

    out = _empty_like(graph_def)
    touched: dict[str, list[str]] = {}
    for node in graph_def.node:
        legacy = LEGACY_OPS.get(node.op)
        if legacy is None:
            out.node.add().CopyFrom(node)
            continue
        for new in legacy.rewrite(node, unique_name):
            if node.device:
                new.device = node.device
            out.node.add().CopyFrom(new)
        touched.setdefault(node.op, []).append(node.name)
    fixes = [Fix(op, LEGACY_OPS[op].into, LEGACY_OPS[op].why, tuple(names)) for op, names in touched.items()]
    return out, fixes


# --- the subgraph between input and bottleneck -------------------------------------------------

def feature_subgraph(graph_def, input_tensor: str, output_tensor: str):
    """The nodes ``output_tensor`` needs when ``input_tensor`` is fed, and nothing else.

    The input's node becomes a ``Placeholder`` of the same name and dtype (its inputs are gone),
    so ``import_graph_def(input_map={input_tensor: x})`` works as on the whole graph. Reshapes to a
    constant shape that starts with a batch of 1 get ``-1`` there instead: for the batch of 1 the
    graph was frozen with, the result is the same, and a batch of N now passes.

    Args:
        graph_def: a ``tf.compat.v1.GraphDef`` (not modified).
        input_tensor: e.g. ``Mul:0``; output 0 of its node, or the graph is only trimmed behind
            the output.
        output_tensor: e.g. ``pool_3/_reshape:0``.

    Returns:
        ``(graph_def, fixes)``: fixes name the nodes removed in front of the input (a
        preprocessing head) and the reshapes freed; nodes after the output leave silently.
        A graph without either tensor comes back unchanged, for ``resolve_spec`` to report.
    """
    nodes = {node.name: node for node in graph_def.node}
    in_name, in_index = _split(input_tensor)
    out_name, _ = _split(output_tensor)
    if in_name not in nodes or out_name not in nodes:
        return graph_def, []
    cut = in_index == 0 and nodes[in_name].op not in ("Placeholder", "PlaceholderV2")
    keep = _ancestors(nodes, [out_name], stop=in_name if cut else None)
    head = _ancestors(nodes, list(nodes[in_name].input), stop=None) - keep if cut else set()
    fed = _descendants(graph_def, in_name) & keep

    out = _empty_like(graph_def)
    consts = []
    freed = []
    for node in graph_def.node:
        if node.name not in keep:
            continue
        new = out.node.add()
        if node.name == in_name and cut:
            new.CopyFrom(_placeholder_for(node, in_index))
            continue
        new.CopyFrom(node)
        if node.op == "Reshape" and node.name in fed:
            shape = _batch_1_shape(nodes, node.input[1])
            if shape is not None:
                name, k = f"{node.name}/shape_any_batch", 1
                while name in nodes:
                    name, k = f"{node.name}/shape_any_batch_{k}", k + 1
                consts.append(_const(name, np.array([-1, *shape[1:]], shape.dtype)))
                new.input[1] = name
                freed.append(f"{node.name} {shape.tolist()}")
    for const in consts:
        out.node.add().CopyFrom(const)

    fixes = []
    if head:
        ops = sorted({nodes[n].op for n in head})
        fixes.append(Fix(
            f"the nodes that compute {input_tensor}", "removed",
            f"the pipeline feeds {input_tensor} itself; they hold {', '.join(ops)}",
            tuple(n.name for n in graph_def.node if n.name in head)))
    if freed:
        fixes.append(Fix("Reshape to a batch of 1", "Reshape to [-1, ...]",
                         "the graph was frozen for one image at a time; batches pass now",
                         tuple(freed)))
    return out, fixes


def _batch_1_shape(nodes, shape_input: str) -> np.ndarray | None:
    """The constant shape ``[1, d1, ...]`` (no -1) that ``shape_input`` names, else None."""
    import tensorflow as tf

    name, index = _split(shape_input)
    node = nodes.get(name)
    if node is None or node.op != "Const" or index != 0:
        return None
    shape = tf.make_ndarray(node.attr["value"].tensor)
    if shape.ndim != 1 or len(shape) < 2 or shape[0] != 1 or (shape == -1).any():
        return None
    return shape


def _placeholder_for(node, index: int):
    """A Placeholder standing in for output ``index`` of ``node`` (same name, same dtype)."""
    import tensorflow as tf

    # The registry of op signatures says which attr holds an output's dtype (T, dtype, DstT...).
    from tensorflow.python.framework import op_def_registry

    arg = op_def_registry.get(node.op).output_arg[index]
    dtype = arg.type or node.attr[arg.type_attr].type
    new = tf.compat.v1.NodeDef(name=node.name, op="Placeholder", device=node.device)
    new.attr["dtype"].type = dtype
    new.attr["shape"].shape.unknown_rank = True
    return new


def _ancestors(nodes, start: list[str], stop: str | None) -> set[str]:
    """Every node ``start`` depends on (data and control edges), not looking past ``stop``."""
    seen: set[str] = set()
    stack = [_split(s)[0] for s in start]
    while stack:
        name = stack.pop()
        if name in seen or name not in nodes:
            continue
        seen.add(name)
        if name != stop:
            stack += [_split(i)[0] for i in nodes[name].input]
    return seen


def _descendants(graph_def, start: str) -> set[str]:
    consumers: dict[str, list[str]] = {}
    for node in graph_def.node:
        for i in node.input:
            consumers.setdefault(_split(i)[0], []).append(node.name)
    seen: set[str] = set()
    stack = [start]
    while stack:
        name = stack.pop()
        if name not in seen:
            seen.add(name)
            stack += consumers.get(name, [])
    return seen


# --- NodeDef helpers ---------------------------------------------------------------------------

def _split(tensor: str) -> tuple[str, int]:
    """``"^a"``, ``"a"``, ``"a:1"`` → ``("a", 0)``, ``("a", 0)``, ``("a", 1)``."""
    name = tensor.lstrip("^")
    base, _, index = name.partition(":")
    return base, int(index) if index else 0


def _dtype_enum(np_dtype) -> int:
    import tensorflow as tf

    return tf.as_dtype(np_dtype).as_datatype_enum


def _op(name: str, op: str, inputs: list[str], dtype: int):
    import tensorflow as tf

    node = tf.compat.v1.NodeDef(name=name, op=op, input=inputs)
    node.attr["T"].type = dtype
    return node


def _const(name: str, value, dtype: int | None = None):
    import tensorflow as tf

    value = np.asarray(value, tf.as_dtype(dtype).as_numpy_dtype if dtype is not None else None)
    node = tf.compat.v1.NodeDef(name=name, op="Const")
    node.attr["dtype"].type = _dtype_enum(value.dtype)
    node.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(value))
    return node


def _empty_like(graph_def):
    import tensorflow as tf

    out = tf.compat.v1.GraphDef()
    out.versions.CopyFrom(graph_def.versions)
    out.library.CopyFrom(graph_def.library)
    return out

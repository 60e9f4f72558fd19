"""Frozen GraphDefs: reading them, naming their tensors, and finding their pooled features.

Everything here that needs TensorFlow imports it inside the function: the fetch stage checks a
download with :func:`graph_def_problem`, and a cache hit or a failed download should not pay the
seconds TensorFlow takes to load.

- :func:`parse_graph_def` is the one GraphDef parser; :func:`load_graph_def` (a graph to run,
  legacy ops rewritten) and :func:`graph_def_problem` (the fetch stage's check of a file) use it.
- :func:`node_name` and :func:`closest_names` turn tensor names into what an error message needs.
- :func:`bottleneck_candidates` and :func:`best_bottleneck` find the tensors shaped like a pooled
  feature, ``[N,1,1,C]`` or ``[N,C]``: ``edgepipe inspect`` lists them, and
  ``backbone.resolve_spec`` picks one when a catalog bottleneck was renamed between TensorFlow
  versions.
- :func:`output_candidates` and :func:`best_output` find a whole classifier's output (a graph
  adopted with ``--model-graph``, or a frozen-graph reference), :func:`tensor_shapes` the static
  shapes of named tensors (what catalog recognition compares).
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Collection

from pipeline.errors import GraphError, one_line
from pipeline.graphfix import feature_subgraph, legacy_ops_rewritten

PLACEHOLDER_OPS = ("Placeholder", "PlaceholderV2")


# --- reading a GraphDef ------------------------------------------------------------------------


def parse_graph_def(data: bytes):
    """The GraphDef serialized in ``data``.

    Args:
        data: the bytes of a frozen graph (``.pb``) file.

    Returns:
        a ``tf.compat.v1.GraphDef``. It has no nodes when ``data`` is empty: an empty byte string
        is a valid protobuf message.

    Raises:
        google.protobuf.message.DecodeError: ``data`` is not a serialized GraphDef.
    """
    import tensorflow as tf

    graph_def = tf.compat.v1.GraphDef()
    graph_def.ParseFromString(data)
    return graph_def


def load_graph_def(path: Path, *, fix: bool = True):
    """Reads a frozen GraphDef, with ops that TensorFlow or a converter rejects rewritten.

    Args:
        path: the frozen graph (``.pb``) file.
        fix: rewrite legacy ops (``graphfix.legacy_ops_rewritten``); False returns the file as is.

    Returns:
        the ``tf.compat.v1.GraphDef``.

    Raises:
        GraphError: the file is missing, is not a serialized GraphDef, or holds no nodes.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise GraphError(f"cannot read graph {path}: {err.strerror}") from None
    try:
        graph_def = parse_graph_def(data)
    except ImportError:
        raise  # a broken TensorFlow install is not a bad file
    except Exception:  # protobuf raises DecodeError or RuntimeWarning-like errors
        raise GraphError(
            f"{path} is not a frozen TensorFlow GraphDef (.pb); export your model with "
            "tf.compat.v1.graph_util.convert_variables_to_constants or pass a catalog --backbone"
        ) from None
    if not graph_def.node:
        raise GraphError(f"{path} holds an empty GraphDef; is it the right file?")
    if fix:
        graph_def, _ = legacy_ops_rewritten(graph_def)
    return graph_def


def graph_def_problem(path: Path) -> str | None:
    """Why ``path`` is not a frozen TensorFlow graph, or None if it parses as a GraphDef.

    Args:
        path: the file to check.

    Returns:
        None for a GraphDef with at least one node; otherwise the reason, worded to follow the
        file's name (``"is not a TensorFlow GraphDef (...)"``).

    Raises:
        OSError: the file cannot be read.
    """
    from google.protobuf.message import DecodeError

    data = Path(path).read_bytes()
    try:
        graph_def = parse_graph_def(data)
    except DecodeError as err:
        return f"is not a TensorFlow GraphDef ({one_line(err)})"
    if not graph_def.node:
        return "is not a TensorFlow GraphDef (it parses as an empty graph)"
    return None


# --- tensor names ------------------------------------------------------------------------------


def node_name(tensor: str) -> str:
    """The name of the node that makes ``tensor``: ``"input:0"`` → ``"input"``.

    Args:
        tensor: a tensor name, with or without its ``:index``.

    Returns:
        the part before the ``:``.
    """
    return tensor.split(":")[0]


def closest_names(name: str, graph_def, n: int = 5) -> str:
    """The graph's tensors named most like ``name``, for an error about a name that is not there.

    Args:
        name: the tensor name asked for.
        graph_def: the GraphDef to look in.
        n: how many names at most.

    Returns:
        e.g. ``"input:0, input_1:0"``, or ``"none similar"``.
    """
    names = [node.name for node in graph_def.node]
    close = difflib.get_close_matches(node_name(name), names, n=n, cutoff=0.4)
    return ", ".join(f"{c}:0" for c in close) or "none similar"


# --- tensors shaped like a pooled feature -----------------------------------------------------


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
        """The shape as ``edgepipe inspect`` prints it: ``[?, 224, 224, 3]``, or ``unknown``."""
        if self.shape is None:
            return "unknown"
        return "[" + ", ".join("?" if d is None else str(d) for d in self.shape) + "]"


def tensor_info(tensor) -> TensorInfo:
    """What :class:`TensorInfo` records of a ``tf.Tensor`` of an imported graph.

    Args:
        tensor: a tensor of a ``tf.Graph``.

    Returns:
        its name, op type, dtype and static shape.
    """
    shape = None if tensor.shape.rank is None else tuple(tensor.shape.as_list())
    return TensorInfo(tensor.name, tensor.op.type, tensor.dtype.name, shape)


def imported_graph(graph_def):
    """A new ``tf.Graph`` holding ``graph_def``, its node names unprefixed.

    Args:
        graph_def: a frozen GraphDef (legacy ops already rewritten, so it imports).

    Returns:
        the ``tf.Graph``.

    Raises:
        GraphError: TensorFlow refuses the graph (the first line of its reason is given).
    """
    import tensorflow as tf

    graph = tf.Graph()
    try:
        with graph.as_default():
            tf.graph_util.import_graph_def(graph_def, name="")
    except (ValueError, tf.errors.OpError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise GraphError(f"the graph does not import into TensorFlow: {first}") from None
    return graph


def downstream_ops(starts) -> set:
    """Every op that depends on one of ``starts``, through data or control edges.

    Args:
        starts: ops of one ``tf.Graph``.

    Returns:
        the set of ops reached, ``starts`` included.
    """
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


def bottleneck_candidates(graph_def, input_tensor: str | None = None) -> list[TensorInfo]:
    """Float tensors shaped like a pooled feature, largest feature size first.

    Args:
        graph_def: a frozen GraphDef (legacy ops already rewritten, so it imports).
        input_tensor: only tensors computed from this one; None means from any placeholder.

    Returns:
        the tensors, each with :attr:`TensorInfo.features` set; empty when there is none.

    Raises:
        GraphError: the graph does not import, or ``input_tensor`` is not in it.
    """
    graph = imported_graph(graph_def)
    if input_tensor is None:
        starts = [op for op in graph.get_operations() if op.type in PLACEHOLDER_OPS]
    else:
        try:
            starts = [graph.get_tensor_by_name(input_tensor).op]
        except (KeyError, ValueError):
            raise GraphError(f"input tensor {input_tensor!r} is not in the graph") from None
    reached = downstream_ops(starts)
    found = [
        info for op in graph.get_operations() if op in reached and op not in starts
        for info in map(tensor_info, op.outputs) if info.features and info.dtype.startswith("float")
    ]
    return sorted(found, key=lambda t: -t.features)


def best_bottleneck(candidates: list[TensorInfo], feature_size: int = 0, like: str = "") -> TensorInfo | None:
    """The candidate most likely to be the backbone's pooled feature.

    Pooling ops' names (``AvgPool``, ``pool_3``) first, then the name closest to ``like``, then the
    largest.

    Args:
        candidates: from :func:`bottleneck_candidates`.
        feature_size: when not 0, only candidates with this many features count.
        like: the name the tensor was expected to have, if any.

    Returns:
        the chosen candidate, or None when none has ``feature_size``.
    """
    pool = [t for t in candidates if not feature_size or t.features == feature_size]
    if not pool:
        return None

    def key(t: TensorInfo):
        similarity = difflib.SequenceMatcher(None, t.name, like).ratio() if like else 0.0
        return ("pool" not in t.name.lower(), -similarity, -t.features)

    return min(pool, key=key)


# --- a classifier's outputs --------------------------------------------------------------------

SOFTMAX_OPS = ("Softmax",)
# Ops that pass a tensor through unchanged: a Softmax behind one is still the probabilities.
_PASS_THROUGH_OPS = ("Identity", "Reshape", "Squeeze")


def _softmax_behind(op):
    """The Softmax op ``op`` is (or passes through unchanged), else None."""
    seen = 0
    while op.type in _PASS_THROUGH_OPS and op.inputs and seen < 8:
        op, seen = op.inputs[0].op, seen + 1
    return op if op.type in SOFTMAX_OPS else None


def _terminal_outputs(graph) -> list[tuple[TensorInfo, bool]]:
    """(tensor, is a Softmax) for every terminal float ``[N,C]`` tensor of ``graph``, Softmax first."""
    starts = [op for op in graph.get_operations() if op.type in PLACEHOLDER_OPS]
    reached = downstream_ops(starts)
    found = [
        (info, _softmax_behind(op) is not None) for op in graph.get_operations() if op in reached and op not in starts
        for out, info in ((o, tensor_info(o)) for o in op.outputs)
        if not out.consumers() and info.dtype.startswith("float") and info.shape is not None
        and len(info.shape) == 2 and info.features
    ]
    return sorted(found, key=lambda pair: not pair[1])


def output_candidates(graph_def) -> list[TensorInfo]:
    """The graph's terminal float ``[N,C]`` tensors (no op consumes them), Softmax ones first.

    A retrained classifier ends in one such tensor (tensorflow-for-poets' ``final_result:0``, a
    Softmax); a Softmax seen through an Identity, Reshape or Squeeze counts as one. Only tensors
    computed from a placeholder count, so a dangling constant is not an output.

    Args:
        graph_def: a frozen GraphDef (legacy ops already rewritten, so it imports).

    Returns:
        the tensors, each with ``C`` >= 2 classes (:attr:`TensorInfo.features`); Softmax ones first,
        then in graph order. Empty when there is none.

    Raises:
        GraphError: the graph does not import.
    """
    return [info for info, _ in _terminal_outputs(imported_graph(graph_def))]


def best_output(candidates: list[TensorInfo], softmax: Collection[str] | None = None) -> TensorInfo | None:
    """The output to adopt: the only Softmax among ``candidates``, else the only candidate.

    Args:
        candidates: from :func:`output_candidates`.
        softmax: the names of the candidates that are (or pass on) a Softmax; None: those whose op
            is ``Softmax``.

    Returns:
        the chosen tensor, or None when there is none or the choice is ambiguous (several Softmax
        outputs, or several outputs and no Softmax): the caller asks for ``--output-tensor``.
    """
    is_softmax = [t for t in candidates if (t.op in SOFTMAX_OPS if softmax is None else t.name in softmax)]
    if len(is_softmax) == 1:
        return is_softmax[0]
    if len(candidates) == 1:
        return candidates[0]
    return None


@dataclass(frozen=True)
class ModelOutputs:
    """What a whole classifier graph gives, found by :func:`model_outputs`.

    Attributes:
        probabilities: the output tensor adopted as the probabilities, e.g. ``final_result:0``.
        logits: the Softmax's input when ``probabilities`` is a Softmax (the graph has its logits),
            else None.
        classes: ``C`` of its ``[N,C]`` shape.
        found_by: ``given`` (``--output-tensor``) or ``search`` (:func:`output_candidates`).
        softmax: whether ``probabilities`` is made by a Softmax (else its values are taken as they are).
    """

    probabilities: str
    logits: str | None
    classes: int
    found_by: str
    softmax: bool

    def to_dict(self) -> dict:
        return {"probabilities": self.probabilities, "logits": self.logits, "classes": self.classes,
                "found_by": self.found_by, "softmax": self.softmax}

    @classmethod
    def from_dict(cls, d: dict) -> "ModelOutputs":
        return cls(**d)


def model_outputs(graph_def, output_tensor: str | None = None, flag: str = "--model-graph") -> ModelOutputs:
    """The output of a whole classifier graph: ``output_tensor``, or the one :func:`best_output` picks.

    Args:
        graph_def: a frozen GraphDef (legacy ops already rewritten).
        output_tensor: the tensor the user named (``--output-tensor``); None searches for it.
        flag: the option that named the graph, for messages.

    Returns:
        the output, its class count and its logits when it is a Softmax.

    Raises:
        GraphError: the named tensor is not in the graph or is not float ``[N,C]``; or no output
            (or more than one) was found and none was named. The message lists the candidates.
    """
    graph = imported_graph(graph_def)
    terminal = _terminal_outputs(graph)
    candidates = [info for info, _ in terminal]
    listed = ", ".join(f"{t.name} {t.shape_text()} ({t.op})" for t in candidates[:6]) or "none"
    if output_tensor is None:
        chosen = best_output(candidates, {info.name for info, soft in terminal if soft})
        if chosen is None:
            why = "no terminal float [N,C] tensor" if not candidates else "several candidates"
            raise GraphError(f"{flag}: cannot tell which tensor is the classifier's output ({why}: {listed}); "
                             "name it with --output-tensor (see `edgepipe inspect`)")
        name, found_by = chosen.name, "search"
    else:
        name = output_tensor if ":" in output_tensor else f"{output_tensor}:0"
        found_by = "given"
    try:
        tensor = graph.get_tensor_by_name(name)
    except (KeyError, ValueError):
        raise GraphError(f"--output-tensor {output_tensor}: not in the graph; closest: "
                         f"{closest_names(name, graph_def)}; terminal outputs: {listed}") from None
    info = tensor_info(tensor)
    if not (info.dtype.startswith("float") and info.shape is not None and len(info.shape) == 2 and info.features):
        raise GraphError(f"--output-tensor {name} is {info.dtype} {info.shape_text()}, not float [N,C] class "
                         f"scores with C >= 2; terminal outputs: {listed}")
    softmax = _softmax_behind(tensor.op)
    logits = None
    if softmax is not None:
        logits_info = tensor_info(softmax.inputs[0])
        if logits_info.shape is not None and logits_info.shape[-1:] == info.shape[-1:]:
            logits = logits_info.name
    return ModelOutputs(name, logits, int(info.features), found_by, softmax is not None)


def adopted_outputs(graph_def, input_tensor: str, output_tensor: str | None = None) -> tuple[ModelOutputs, list]:
    """The fetch stage's check of a graph to adopt whole: its input is there, its output found.

    Args:
        graph_def: the graph as read (``load_graph_def(path, fix=False)``); legacy ops are
            rewritten here and listed.
        input_tensor: where the normalised images go.
        output_tensor: ``--output-tensor``, or None to search (:func:`model_outputs`).

    Returns:
        ``(outputs, fixes)``: fixes are the rewrites (``graphfix.Fix``) the export will make.

    Raises:
        GraphError: the input is not in the graph (closest names given), or see :func:`model_outputs`.
    """
    graph_def, fixes = legacy_ops_rewritten(graph_def)
    if node_name(input_tensor) not in {node.name for node in graph_def.node}:
        raise GraphError(f"input tensor {input_tensor!r} is not in the graph; closest: "
                         f"{closest_names(input_tensor, graph_def)} (set --input-tensor)")
    outputs = model_outputs(graph_def, output_tensor)
    _, trimmed = feature_subgraph(graph_def, input_tensor, outputs.probabilities)
    return outputs, fixes + trimmed


def tensor_shapes(graph_def, names) -> dict[str, tuple[int | None, ...] | None]:
    """The static shapes of those ``names`` the graph has (tensors it lacks are left out).

    Args:
        graph_def: a frozen GraphDef (legacy ops already rewritten, so it imports).
        names: tensor names, e.g. ``input:0``.

    Returns:
        name → shape (None where even the rank is unknown).

    Raises:
        GraphError: the graph does not import.
    """
    present = {node.name for node in graph_def.node}
    wanted = [n for n in dict.fromkeys(names) if node_name(n) in present]
    if not wanted:
        return {}
    graph = imported_graph(graph_def)
    out = {}
    for name in wanted:
        try:
            out[name] = tensor_info(graph.get_tensor_by_name(name)).shape
        except (KeyError, ValueError):
            continue  # the node is there but has no such output index
    return out

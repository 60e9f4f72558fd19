"""Fine-tuning the last blocks of a frozen backbone with the head (``--fine-tune N``,
``--fine-tune-from TENSOR``).

The graph is cut at a tensor before those blocks (:func:`resolve_cut`). Everything before the cut
stays frozen: its output, the *cut activations*, is computed once per image and augmented copy
and cached exactly as bottlenecks are (:meth:`Cut.spec` is the backbone spec with the cut as its
"bottleneck", so ``bottlenecks.extract`` and the Beam engine do it unchanged). The part after the
cut, the :class:`Tail`, is the frozen graph's own nodes from the cut to the bottleneck, imported
with its weights mapped to variables (``import_graph_def``'s ``input_map``): before training it
computes exactly what the frozen graph computes. :func:`fine_tune` trains the head on the frozen
features first, as without fine-tuning, then tail and head together, streaming the activations
from the cache a batch at a time, so memory does not grow with the number of images. The trained
values go back into the graph's constants (:func:`with_constants`), and export, quantize, tfjs
and verify see a frozen graph like any other.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from pipeline.config import TrainConfig
from pipeline.console import log
from pipeline.console import progress as progress_bar
from pipeline.errors import ConfigError, one_line
from pipeline.graph import node_name
from pipeline.graphfix import feature_subgraph
from pipeline.head import Head, Patience, class_weight_vector, forward, loss
from pipeline.testhook import pause_point
from pipeline.types import BackboneSpec

# Batch-norm statistics stay constants, so batch norm stays in inference mode: a minibatch of a
# few dozen cached activations from a handful of classes is a poor estimate of the statistics the
# blocks were trained with on ImageNet, and updating them would shift every feature the frozen
# part feeds. Scale and offset (gamma, beta) train like the weights. Fused ops name the statistics
# by position (inputs 3 and 4), TF-slim's unfused batch norm by name.
BATCH_NORM_STATISTICS = {"FusedBatchNorm": (3, 4), "FusedBatchNormV2": (3, 4), "FusedBatchNormV3": (3, 4)}
STATISTICS_NAMES = ("moving_mean", "moving_variance")
HEAD_RATE = 0.1  # the head's learning rate while the blocks train, as a fraction of --learning-rate
READ_BATCH = 256  # activations per forward pass when only features are wanted


# --- the cut ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Cut:
    """Where the graph is cut, and what the cut activations are.

    Attributes:
        tensor: the cut tensor; the trained part starts at it.
        blocks: the catalog blocks trained (prefixes of their ops' names); empty for
            ``--fine-tune-from``.
        shape: one image's activations, e.g. ``(7, 7, 256)``.
        asked: the option that chose it, for messages (``--fine-tune 2``).
    """

    tensor: str
    blocks: tuple[str, ...]
    shape: tuple[int, ...]
    asked: str

    @property
    def values(self) -> int:
        return math.prod(self.shape)

    @property
    def bytes_per_image(self) -> int:
        return 4 * self.values

    def spec(self, backbone: BackboneSpec) -> BackboneSpec:
        """The backbone spec whose "bottleneck" is the cut: what the activations are cached as."""
        return dataclasses.replace(backbone, bottleneck_tensor=self.tensor, feature_size=self.values, alternates=())

    def to_dict(self) -> dict:
        return {"tensor": self.tensor, "blocks": list(self.blocks), "shape": list(self.shape), "asked": self.asked,
                "bytes_per_image": self.bytes_per_image}


def _edges(nodes: dict) -> tuple[dict, dict[str, list[str]]]:
    """The nodes by name and each node's consumers (data and control edges)."""
    consumers: dict[str, list[str]] = {}
    for n in nodes.values():
        for i in n.input:
            consumers.setdefault(node_name(i.lstrip("^")), []).append(n.name)
    return nodes, consumers


def _reach(start: str, step: Callable[[str], Sequence[str]], skip: str | None = None) -> set[str]:
    seen, stack = {start}, [start]
    while stack:
        for nxt in step(stack.pop()):
            if nxt != skip and nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen


def _between(graph_def, spec: BackboneSpec) -> tuple[dict, dict, set[str]]:
    """The nodes on some path from the input to the bottleneck (both included)."""
    nodes, consumers = _edges({n.name: n for n in graph_def.node})
    inp, out = node_name(spec.input_tensor), node_name(spec.bottleneck_tensor)
    after_input = _reach(inp, lambda n: consumers.get(n, ()))
    before_output = _reach(out, lambda n: [node_name(i.lstrip("^")) for i in nodes[n].input if
                                           node_name(i.lstrip("^")) in nodes])
    return nodes, consumers, after_input & before_output


def valid_cuts(graph_def, spec: BackboneSpec) -> list[str]:
    """Every tensor the graph can be cut at, in graph order: those every path from the input to
    the bottleneck passes through (so the trained part needs nothing else from the frozen one),
    the input and the bottleneck themselves excluded."""
    nodes, consumers, between = _between(graph_def, spec)
    inp, out = node_name(spec.input_tensor), node_name(spec.bottleneck_tensor)

    def step(n: str) -> list[str]:
        return [c for c in consumers.get(n, ()) if c in between]

    return [f"{n.name}:0" for n in graph_def.node
            if n.name in between and n.name not in (inp, out) and out not in _reach(inp, step, skip=n.name)]


# Ops whose output ends a block: what the nearest valid cuts are chosen among.
BLOCK_OUTPUTS = frozenset({"Relu", "Relu6", "ConcatV2", "Concat", "Add", "AddV2", "MaxPool", "AvgPool"})


def _nearest(name: str, cuts: list[str], nodes: dict, last: bool = False, n: int = 3) -> str:
    """The valid cuts named most like ``name`` (or, with ``last``, the last ones before the
    bottleneck), block outputs first."""
    outputs = [c for c in cuts if nodes[node_name(c)].op in BLOCK_OUTPUTS] or cuts
    close = [] if last else difflib.get_close_matches(name, outputs, n=n, cutoff=0.5)
    return ", ".join(close or outputs[-n:]) or "none (the graph has no tensor every path passes through)"


def resolve_cut(graph_def, spec: BackboneSpec, blocks: Sequence[str], fine_tune: int = 0,
                fine_tune_from: str | None = None) -> Cut:
    """The cut for ``--fine-tune N`` (the tensor that enters the catalog's last N ``blocks``) or
    ``--fine-tune-from TENSOR``.

    Args:
        graph_def: the backbone (legacy ops already rewritten, as ``graph.load_graph_def`` gives it).
        spec: the resolved backbone spec.
        blocks: the catalog's blocks for this backbone, last first (``catalog.fine_tune_blocks``).

    Raises:
        ConfigError: the tensor is not in the graph, is not between the input and the bottleneck,
            or is bypassed; a block is not in the graph. One line, naming the nearest valid cuts.
    """
    cuts = valid_cuts(graph_def, spec)
    nodes, _, between = _between(graph_def, spec)
    if fine_tune_from:
        asked = f"--fine-tune-from {fine_tune_from}"
        tensor = fine_tune_from if ":" in fine_tune_from else f"{fine_tune_from}:0"
        if tensor not in cuts:
            why, last = _why_not(tensor, spec, nodes, between)
            raise ConfigError(f"{asked}: {why}; nearest valid cuts: {_nearest(tensor, cuts, nodes, last)}")
        return Cut(tensor, (), _cut_shape(graph_def, spec, tensor), asked)
    asked = f"--fine-tune {fine_tune}"
    if not blocks:
        raise ConfigError(f"{asked}: the catalog names no blocks for {spec.name}; cut it yourself with "
                          f"--fine-tune-from TENSOR, e.g. {_nearest(spec.bottleneck_tensor, cuts, nodes, last=True)}")
    chosen = tuple(blocks[:fine_tune])
    inside = {name for name in between if any(name.startswith(p) for p in chosen)}
    missing = [p for p in chosen if not any(name.startswith(p) for name in inside)]
    if missing:
        raise ConfigError(f"{asked}: block {missing[0]!r} is not in this graph ({spec.name}); cut it yourself with "
                          f"--fine-tune-from TENSOR, e.g. {_nearest(missing[0], cuts, nodes, last=True)}")
    entering = sorted({f"{node_name(i)}:{i.partition(':')[2] or 0}" for name in inside for i in nodes[name].input
                       if not i.startswith("^") and node_name(i) in between and node_name(i) not in inside})
    if len(entering) != 1 or entering[0] not in cuts:
        raise ConfigError(f"{asked}: the last {fine_tune} blocks of {spec.name} are entered by "
                          f"{', '.join(entering) or 'no tensor'}, not by one the graph can be cut at; use "
                          f"--fine-tune-from TENSOR, e.g. {_nearest(chosen[-1], cuts, nodes, last=True)}")
    return Cut(entering[0], chosen, _cut_shape(graph_def, spec, entering[0]), asked)


def _why_not(tensor: str, spec: BackboneSpec, nodes: dict, between: set[str]) -> tuple[str, bool]:
    """Why ``tensor`` is no valid cut, and whether the cuts to suggest are the last ones."""
    name = node_name(tensor)
    if name not in nodes:
        return "is not in the graph", False
    if name == node_name(spec.input_tensor):
        return "is the input, with nothing before it to keep frozen", False
    if name == node_name(spec.bottleneck_tensor):
        return "is the bottleneck itself, with nothing after it to train", True
    if name not in between:
        _, consumers = _edges(nodes)
        after = _reach(node_name(spec.bottleneck_tensor), lambda n: consumers.get(n, ()))
        if name in after:
            return f"lies after the bottleneck {spec.bottleneck_tensor}", True
        return f"is not on the way from {spec.input_tensor} to the bottleneck {spec.bottleneck_tensor}", False
    return "is bypassed: other paths lead from the input to the bottleneck around it", False


def _cut_shape(graph_def, spec: BackboneSpec, tensor: str) -> tuple[int, ...]:
    """One image's activations at ``tensor`` (the frozen part run once on a black image)."""
    import tensorflow as tf

    size = spec.preprocessing.size
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, size, size, 3])
        trimmed, _ = feature_subgraph(graph_def, spec.input_tensor, tensor)
        (t,) = tf.graph_util.import_graph_def(trimmed, input_map={spec.input_tensor: x}, return_elements=[tensor])
        with tf.compat.v1.Session(graph=graph) as session:
            value = session.run(t, {x: np.zeros((1, size, size, 3), np.float32)})
    return tuple(int(d) for d in value.shape[1:])


# --- the trained part --------------------------------------------------------------------------

def _const_behind(nodes: dict, tensor: str) -> str:
    """The node behind ``tensor``, through Identity ops (TF-slim's ``weights/read``)."""
    name = node_name(tensor.lstrip("^"))
    while name in nodes and nodes[name].op == "Identity" and nodes[name].input:
        name = node_name(nodes[name].input[0])
    return name


def trainable_constants(graph_def) -> dict[str, np.ndarray]:
    """The trained part's weights: its float constants with more than one value (scalars are the
    graph's arithmetic, such as batch norm's epsilon), batch-norm statistics left out."""
    import tensorflow as tf

    nodes = {n.name: n for n in graph_def.node}
    statistics = {_const_behind(nodes, n.input[k]) for n in graph_def.node
                  for k in BATCH_NORM_STATISTICS.get(n.op, ()) if k < len(n.input)}
    out = {}
    for n in graph_def.node:
        if n.op != "Const" or n.attr["dtype"].type != tf.float32.as_datatype_enum:
            continue
        if n.name in statistics or n.name.endswith(STATISTICS_NAMES):
            continue
        value = tf.make_ndarray(n.attr["value"].tensor)
        if value.size > 1:
            out[n.name] = value
    return out


def with_constants(graph_def, values: dict[str, np.ndarray]):
    """A copy of ``graph_def`` whose constants named in ``values`` hold those values.

    Raises:
        ConfigError: a name is not a constant of the graph, or its shape differs (a ``tail.npz``
            trained on another graph).
    """
    import tensorflow as tf

    out = tf.compat.v1.GraphDef()
    out.CopyFrom(graph_def)
    left = dict(values)
    for n in out.node:
        if n.name in left:
            value = np.asarray(left.pop(n.name), np.float32)
            old = tuple(d.size for d in n.attr["value"].tensor.tensor_shape.dim)
            if n.op != "Const" or old != value.shape:
                raise ConfigError(f"fine-tuned constant {n.name}: shape {value.shape} does not fit the graph's {old}; "
                                  "retrain on this graph")
            n.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(value))
    if left:
        raise ConfigError(f"fine-tuned constants not in the graph: {', '.join(sorted(left)[:3])}; retrain on this graph")
    return out


class Tail:
    """The graph from the cut to the bottleneck, its weights as variables.

    Called on flattened cut activations ``[N, values]`` (inside or outside a ``tf.function``), it
    returns the features ``[N, feature_size]``; with the initial variables these are the frozen
    graph's own features.
    """

    def __init__(self, graph_def, spec: BackboneSpec, cut: Cut, values: dict[str, np.ndarray] | None = None):
        import tensorflow as tf

        self.spec, self.cut = spec, cut
        self.graph_def, _ = feature_subgraph(graph_def, cut.tensor, spec.bottleneck_tensor)
        initial = trainable_constants(self.graph_def)
        if values:
            initial.update({k: np.asarray(v, np.float32) for k, v in values.items() if k in initial})
        self.names = sorted(initial)
        self.variables = [tf.Variable(initial[k], name=f"tail_{i}") for i, k in enumerate(self.names)]

        @tf.function(input_signature=[tf.TensorSpec([None, cut.values], tf.float32)])
        def features(x):
            return self(x)

        self._features = features

    @property
    def parameters(self) -> int:
        return int(sum(np.prod(v.shape) for v in self.variables))

    def __call__(self, activations):
        import tensorflow as tf

        x = tf.reshape(activations, [-1, *self.cut.shape])
        mapped = {self.cut.tensor: x, **{f"{k}:0": tf.convert_to_tensor(v) for k, v in zip(self.names, self.variables)}}
        (out,) = tf.graph_util.import_graph_def(self.graph_def, input_map=mapped,
                                                return_elements=[self.spec.bottleneck_tensor], name="tail")
        return tf.reshape(out, [tf.shape(out)[0], -1])

    def features(self, activations: np.ndarray) -> np.ndarray:
        return self._features(np.asarray(activations, np.float32)).numpy()

    def values(self) -> dict[str, np.ndarray]:
        """The trained constants by node name (what ``retrain/tail.npz`` holds)."""
        return {k: v.numpy() for k, v in zip(self.names, self.variables)}


# --- training ----------------------------------------------------------------------------------

Reader = Callable[[Sequence[str]], np.ndarray]  # cache entry names → [N, values] activations


def features_of(tail: Tail, read: Reader, entries: Sequence[str], progress: bool = False,
                desc: str = "features") -> np.ndarray:
    """The tail's features for cached activations, :data:`READ_BATCH` at a time (the next batch is
    read while this one runs)."""
    out = np.zeros((len(entries), tail.spec.feature_size), np.float32)
    bar = progress_bar(total=len(entries), desc=desc, unit="img", disable=not progress, delay=0.5)
    with ThreadPoolExecutor(1) as pool:
        starts = range(0, len(entries), READ_BATCH)
        pending = pool.submit(read, entries[:READ_BATCH]) if len(entries) else None
        for k in starts:
            batch = pending.result()
            nxt = k + READ_BATCH
            pending = pool.submit(read, entries[nxt:nxt + READ_BATCH]) if nxt < len(entries) else None
            out[k:k + len(batch)] = tail.features(batch)
            bar.update(len(batch))
    bar.close()
    return out


@dataclass
class FineTuned:
    """What :func:`fine_tune` made: the head (its history covers both phases) and the tail."""

    head: Head
    tail: Tail
    head_only: dict  # the head trained on the frozen features: validation accuracy and loss
    seconds: float


class Progress:
    """The joint phase's state after its last finished epoch, in one ``.npz`` file written whole
    (:func:`pipeline.rundir.atomic_write_bytes`), for :func:`fine_tune` to resume from.

    The file is used only for the same job: its key hashes the entries, labels, training
    configuration and trained tensors, and a file with another key is ignored (and replaced).
    """

    def __init__(self, path: Path | None, job: list, variables: dict[str, list]):
        import hashlib
        import json

        self.path, self.variables = (None if path is None else Path(path)), variables
        self.key = hashlib.sha256(json.dumps(job, sort_keys=True, default=str).encode()).hexdigest()

    def save(self, epoch: int, rng: np.random.Generator, generator, history: dict, patience: Patience) -> None:
        import io
        import json

        from pipeline.rundir import atomic_write_bytes

        if self.path is None:
            return
        arrays = {f"{group}/{k}": v.numpy() for group, vs in self.variables.items() for k, v in enumerate(vs)}
        if patience.best is not None:
            best_head, best_tail = patience.best
            arrays |= {f"best_head/{k}": a for k, a in enumerate(a for layer in best_head.layers for a in layer)}
            arrays |= {f"best_tail/{name}": a for name, a in best_tail.items()}
        meta = {"key": self.key, "epoch": epoch, "rng": rng.bit_generator.state, "history": history,
                "patience": {"loss": patience.loss, "epoch": patience.epoch, "waited": patience.waited,
                             "stopped": patience.stopped}}
        buf = io.BytesIO()
        np.savez(buf, meta=np.array(json.dumps(meta, default=float)), generator=generator.state.numpy(), **arrays)
        atomic_write_bytes(self.path, buf.getvalue(), durable=False)

    def restore(self, rng: np.random.Generator, generator, history: dict, patience: Patience) -> int:
        """Loads the file's state into the arguments and the variables; returns the epochs it had
        finished (0: no file, or another job's)."""
        import json
        import zipfile

        if self.path is None or not self.path.is_file():
            return 0
        try:  # everything read before anything is assigned: a bad file changes nothing
            with np.load(self.path, allow_pickle=False) as f:
                meta = json.loads(str(f["meta"]))
                if meta["key"] != self.key:
                    return 0
                values = {group: [f[f"{group}/{k}"] for k in range(len(vs))] for group, vs in self.variables.items()}
                state = f["generator"]
                flat = [f[n] for _, n in sorted((int(n.split("/")[1]), n) for n in f.files if n.startswith("best_head/"))]
                best_tail = {n.split("/", 1)[1]: f[n] for n in f.files if n.startswith("best_tail/")}
            for group, vs in self.variables.items():
                for v, a in zip(vs, values[group]):
                    if tuple(v.shape) != a.shape:
                        raise ValueError(f"{group}: shape {a.shape}, not {tuple(v.shape)}")
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:  # torn or foreign: start again
            log.info(f"retrain: {self.path} cannot be resumed from ({one_line(err)}); fine-tuning starts again")
            return 0
        for group, vs in self.variables.items():
            for v, a in zip(vs, values[group]):
                v.assign(a)
        generator.reset(state)
        if flat:
            patience.best = (Head([(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]), best_tail)
        rng.bit_generator.state = meta["rng"]
        history.clear()
        history.update(meta["history"])
        p = meta["patience"]
        patience.loss, patience.epoch, patience.waited, patience.stopped = p["loss"], p["epoch"], p["waited"], p["stopped"]
        return int(meta["epoch"])


def fine_tune(tail: Tail, read: Reader, train: tuple[Sequence[str], np.ndarray],
              validation: tuple[Sequence[str], np.ndarray], num_classes: int, cfg: TrainConfig,
              train_head: Callable[..., Head], progress: bool = True, summaries_dir=None,
              checkpoint_dir=None, resume_path: Path | None = None) -> FineTuned:
    """Trains the head on the frozen features, then the tail and the head together.

    Args:
        tail: the trained part, at the frozen graph's values.
        read: cached activations for entry names.
        train, validation: entry names and labels.
        train_head: the head-only trainer (``retrain.train_head``), run on the frozen features.
        resume_path: after every epoch the joint phase's whole state (weights, both optimisers,
            the shuffling and dropout generators, history, early stopping) is written here, and a
            run killed mid-training continues from it (:class:`Progress`); the caller removes it
            once the result is saved.

    Returns:
        The head and the tail, trained; the head's history is the joint phase's, per epoch.
    """
    import tensorflow as tf

    started = time.perf_counter()
    names, y = list(train[0]), np.asarray(train[1], np.int64)
    val_names, y_val = list(validation[0]), np.asarray(validation[1], np.int64)
    x = features_of(tail, read, names + val_names, progress, desc="frozen features")
    head = train_head(x[:len(names)], y, num_classes, cfg, x[len(names):], y_val, progress=progress,
                      summaries_dir=summaries_dir, checkpoint_dir=checkpoint_dir)
    head_only = _evaluate(head, x[len(names):], y_val)
    log.info("retrain: head trained on the frozen features"
             + (f" (validation accuracy {head_only['accuracy']:.4f})" if len(val_names) else "")
             + f"; fine-tuning {tail.parameters:,} weights of the backbone with it for {cfg.fine_tune_epochs} epochs")

    tf.random.set_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed + 1)
    head_vars = [tf.Variable(a.astype(np.float32)) for layer in head.layers for a in layer]
    tail_vars = list(tail.variables)
    tail_opt = tf.keras.optimizers.Adam(cfg.fine_tune_learning_rate)
    head_opt = tf.keras.optimizers.Adam(cfg.learning_rate * HEAD_RATE)
    tail_opt.build(tail_vars)  # their slots exist now, to be restored into
    head_opt.build(head_vars)
    weights = tf.constant(class_weight_vector(y, num_classes, cfg.class_weights))
    generator = tf.random.Generator.from_seed(cfg.seed)

    @tf.function(input_signature=[tf.TensorSpec([None, tail.cut.values], tf.float32),
                                  tf.TensorSpec([None], tf.int64)])
    def step(a, labels):
        logits = forward(head_vars, tail(a), cfg.dropout, generator)
        value = loss(logits, labels, num_classes, weights, cfg.label_smoothing, cfg.l2, head_vars)
        # Symbolic gradients: a GradientTape does not see the ops import_graph_def adds.
        grads = tf.gradients(value, tail_vars + head_vars)
        tail_opt.apply_gradients(zip(grads[:len(tail_vars)], tail_vars))
        head_opt.apply_gradients(zip(grads[len(tail_vars):], head_vars))
        correct = tf.reduce_sum(tf.cast(tf.argmax(logits, 1) == labels, tf.int64))
        return value, correct

    def snapshot() -> tuple[Head, dict]:
        vs = [v.numpy() for v in head_vars]
        return Head([(vs[i], vs[i + 1]) for i in range(0, len(vs), 2)]), tail.values()

    history: dict = {"epoch": [], "train_loss": [], "train_accuracy": [], "val_loss": [], "val_accuracy": [],
                     "head_only": {"epochs": head.history.get("epoch", [])[-1:] or [cfg.epochs], **head_only}}
    patience = Patience(cfg.early_stopping)
    state = Progress(resume_path, [names, y.tolist(), val_names, y_val.tolist(), cfg.to_dict(), tail.names],
                     {"head": head_vars, "tail": tail_vars, "tail_opt": tail_opt.variables, "head_opt": head_opt.variables})
    done = state.restore(rng, generator, history, patience)
    if done:
        log.info(f"retrain: fine-tuning resumes after epoch {done} of {cfg.fine_tune_epochs} ({resume_path})")
    bar = progress_bar(total=cfg.fine_tune_epochs, initial=done, desc="fine-tuning", unit="epoch", disable=not progress)
    last = done if patience.stopped else cfg.fine_tune_epochs  # a run that had stopped early is done
    with ThreadPoolExecutor(1) as pool:
        for epoch in range(done + 1, last + 1):
            order = rng.permutation(len(names))
            batches = [order[k:k + cfg.batch_size] for k in range(0, len(order), cfg.batch_size)]
            pending = pool.submit(read, [names[i] for i in batches[0]]) if batches else None
            total, correct = 0.0, 0
            for b, idx in enumerate(batches):
                a = pending.result()
                if b + 1 < len(batches):
                    pending = pool.submit(read, [names[i] for i in batches[b + 1]])
                value, right = step(a, y[idx])
                total += float(value) * len(idx)
                correct += int(right)
            bar.update(1)
            history["epoch"].append(epoch)
            history["train_loss"].append(total / max(len(names), 1))
            history["train_accuracy"].append(correct / max(len(names), 1))
            if val_names:
                tuned, _ = snapshot()
                m = _evaluate(tuned, features_of(tail, read, val_names), y_val)
                history["val_loss"].append(m["loss"])
                history["val_accuracy"].append(m["accuracy"])
                if cfg.early_stopping:
                    patience.update(m["loss"], epoch, snapshot)
            state.save(epoch, rng, generator, history, patience)
            pause_point("fine-tune")
            if patience.stopped:
                break
    bar.close()
    if cfg.early_stopping and patience.best is not None:
        final, values = patience.best
        for v, k in zip(tail.variables, tail.names):
            v.assign(values[k])
    else:
        final, _ = snapshot()
    final.history = {**history, "best_epoch": patience.epoch if cfg.early_stopping else len(history["epoch"]),
                     "stopped_early": patience.stopped, "head_history": head.history}
    return FineTuned(final, tail, head_only, time.perf_counter() - started)


def _evaluate(head: Head, x: np.ndarray, y: np.ndarray) -> dict:
    if not len(x):
        return {"loss": None, "accuracy": None}
    logits = head.logits(x)
    z = logits - logits.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    return {"loss": float(-logp[np.arange(len(y)), y].mean()), "accuracy": float((logits.argmax(1) == y).mean())}

"""TensorFlow models in TensorFlow, in this process: a SavedModel, a Keras file or a frozen graph.

The reference of a run's verify is the exported SavedModel; ``edgepipe check`` also takes a Keras
``.keras``/``.h5`` file or a frozen GraphDef ``.pb`` as the reference or a candidate. Every model
loaded is kept for the life of the runner (``--stress`` runs the reference again on the usual
preprocessing mistakes). Which input and output are used: :class:`~pipeline.runners.base.Tensors`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from pipeline.runners.base import Prediction, RunSettings, RuntimeFailed, Tensors
from pipeline.runners.feed import FeedFile
from pipeline.types import Runtime


def _pick(names: Sequence[str], wanted: str | None, what: str, default: str | None = "probabilities") -> str:
    """``wanted`` if the model has it, else ``default`` if it has that, else its only one."""
    if wanted is not None:
        if wanted not in names:
            raise RuntimeFailed(f"no {what} named {wanted!r}; the model has: {', '.join(names)}")
        return wanted
    if default in names:
        return default
    if len(names) == 1:
        return names[0]
    flag = "--output NAME" if what == "output" else "--input-tensor NAME"
    raise RuntimeFailed(f"the model has {len(names)} {what}s ({', '.join(names)}); choose one with {flag}")


def _savedmodel(path: Path, tensors: Tensors) -> Callable[[np.ndarray], np.ndarray]:
    import tensorflow as tf

    loaded = tf.saved_model.load(str(path))
    signatures = dict(loaded.signatures)
    if not signatures:
        raise RuntimeFailed(f"{path} has no serving signature; save it with signatures=...")
    fn = signatures.get("serving_default") or next(iter(signatures.values()))
    _, kwargs = fn.structured_input_signature
    key = _pick(sorted(kwargs), tensors.input, "input", default=None)
    out = _pick(sorted(fn.structured_outputs), tensors.output, "output")

    def run(x):
        return fn(**{key: tf.constant(x, kwargs[key].dtype)})[out].numpy()

    run.keep = loaded  # the functions die with the loaded object
    return run


def _keras(path: Path, tensors: Tensors) -> Callable[[np.ndarray], np.ndarray]:
    """A Keras 3 file, or an older Keras 2 ``.h5`` (Teachable Machine's) through tf-keras when
    Keras 3 cannot read it."""
    errors = []
    for module in ("keras", "tf_keras"):
        try:
            mod = __import__(module)
            model = mod.models.load_model(str(path), compile=False)
            break
        except Exception as err:  # each Keras raises its own kinds
            errors.append(f"{module}: {str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}")
    else:
        raise RuntimeFailed(f"cannot load {path} with Keras ({'; '.join(errors)})")
    names = list(model.output_names) if len(model.outputs) > 1 else [model.output_names[0]]
    out = _pick(names, tensors.output, "output")
    index = names.index(out)

    def run(x):
        y = model(np.asarray(x, np.float32), training=False)
        y = y[index] if isinstance(y, (list, tuple)) else (y[out] if isinstance(y, dict) else y)
        return np.asarray(y)

    run.model = model
    return run


def _frozen_graph(path: Path, tensors: Tensors) -> Callable[[np.ndarray], np.ndarray]:
    """A frozen GraphDef imported with a batched input in place of its placeholder (TF-slim
    graphs fix the placeholder's batch at 1 and are batch-agnostic after it); a graph that is not
    runs image by image."""
    import tensorflow as tf

    from pipeline.graph import load_graph_def

    graph_def = load_graph_def(path)
    inp, out = graph_io(graph_def, tensors, path)
    shape = inp.shape

    def imported(batch):
        def body(x):
            (y,) = tf.graph_util.import_graph_def(graph_def, input_map={inp.name: x}, return_elements=[out.name],
                                                  name="model")
            return y

        return tf.compat.v1.wrap_function(body, [tf.TensorSpec([batch, *shape[1:]], tf.float32)])

    batched, single = imported(None), None

    def run(x):
        nonlocal batched, single
        x = tf.constant(x, tf.float32)
        if batched is not None:
            try:
                y = batched(x).numpy()
                if y.shape[:1] == (x.shape[0],):
                    return y
            except (tf.errors.InvalidArgumentError, ValueError):
                pass
            batched = None
        single = single or imported(1)
        return np.concatenate([single(x[k:k + 1]).numpy() for k in range(x.shape[0])])

    return run


def graph_io(graph_def, tensors, path: Path):
    """The input placeholder and the output tensor of a frozen classifier graph, as ``edgepipe
    inspect`` finds them: the float image placeholder, and the graph's last float ``[N, C]``
    tensor (:func:`pipeline.graph.model_outputs`: a Softmax first, as poets' ``final_result``),
    unless named.

    Raises:
        RuntimeFailed: a named tensor is not in the graph, or several candidates and none named.
    """
    from pipeline.errors import GraphError
    from pipeline.graph import PLACEHOLDER_OPS, closest_names, imported_graph, model_outputs

    graph = imported_graph(graph_def)

    def named(name: str, flag: str):
        name = name if ":" in name else f"{name}:0"
        try:
            return graph.get_tensor_by_name(name)
        except (KeyError, ValueError):
            raise RuntimeFailed(f"{path}: no tensor {name!r}; closest: {closest_names(name, graph_def)} (set {flag})") from None

    if tensors.input:
        inp = named(tensors.input, "--input-tensor")
    else:
        feeds = [op.outputs[0] for op in graph.get_operations()
                 if op.type in PLACEHOLDER_OPS and op.outputs[0].dtype.name == "float32"]
        if len(feeds) != 1:
            raise RuntimeFailed(f"{path}: {len(feeds)} float placeholders ({', '.join(t.name for t in feeds) or 'none'}); "
                             "name the image input with --input-tensor")
        inp = feeds[0]
    if tensors.output:
        return inp, named(tensors.output, "--output")
    try:
        found = model_outputs(graph_def, None, flag=str(path))
    except GraphError as err:
        raise RuntimeFailed(str(err).replace("--output-tensor", "--output-tensor (or --output)")) from None
    return inp, graph.get_tensor_by_name(found.probabilities)


class TensorFlowRunner:
    """Runs SavedModels, Keras files and frozen graphs (their kind told by the path)."""

    name = Runtime.TENSORFLOW.value

    def __init__(self):
        self._loaded: dict[tuple[str, Tensors], Callable[[np.ndarray], np.ndarray]] = {}

    def unsupported(self, artifact: Path) -> str | None:
        return None

    def _function(self, artifact: Path, tensors: Tensors = Tensors()):
        key = (str(artifact), tensors)
        if key not in self._loaded:
            path = Path(artifact)
            if path.is_dir():
                self._loaded[key] = _savedmodel(path, tensors)
            elif path.suffix.lower() in (".keras", ".h5", ".hdf5"):
                self._loaded[key] = _keras(path, tensors)
            else:
                self._loaded[key] = _frozen_graph(path, tensors)
        return self._loaded[key]

    def probabilities(self, artifact: Path, images: np.ndarray, tensors: Tensors = Tensors()) -> np.ndarray:
        """The chosen output, float32 ``[k, classes]``, for one batch."""
        return np.asarray(self._function(artifact, tensors)(images), np.float32)

    def predict(self, artifact: Path, images: np.ndarray | FeedFile, timeout_s: float = 600.0,
                settings: RunSettings = RunSettings(), tensors: Tensors = Tensors()) -> Prediction:
        """Outputs in batches of ``settings.batch``; then ``settings.latency_runs`` timed
        single-image calls after a warm-up call (TensorFlow's own thread pools: every core)."""
        from pipeline.runners.base import timed_calls

        if isinstance(images, FeedFile):
            parts = [self.probabilities(artifact, x, tensors) for _, x in images.batches(settings.batch)]
            first = images.read(0, 1)
        else:
            parts = [self.probabilities(artifact, images[k:k + settings.batch], tensors)
                     for k in range(0, len(images), settings.batch)]
            first = np.asarray(images[:1], np.float32)
        probs = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
        fn = self._function(artifact, tensors)
        return Prediction(probs, tuple(timed_calls(lambda: fn(first), settings.latency_runs)))

    def close(self) -> None:
        self._loaded.clear()


SavedModelRunner = TensorFlowRunner  # the name of a run's reference runner


def create(runtime: Runtime, labels: Sequence[str], **options) -> TensorFlowRunner:
    return TensorFlowRunner()


def status(runtime: Runtime, **options):
    from pipeline.runners.base import RuntimeStatus, package_version

    version = package_version("tensorflow")
    return RuntimeStatus(version is not None, f"tensorflow {version}", "" if version else "not installed", "make setup")

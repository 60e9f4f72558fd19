"""Any model file, read for what it says about itself: its format, its image input, its outputs, its
labels and the preprocessing it carries.

``edgepipe check`` and ``edgepipe classify`` take models made by any tool: a SavedModel folder,
a Keras ``.keras``/``.h5`` file, a frozen GraphDef ``.pb``, a ``.tflite`` file (float or
integer input and output, with or without TFLite metadata), a TF.js graph or layers model folder
(``model.json`` + shards, Teachable Machine's ``metadata.json`` beside it). :func:`read_card`
opens one without running it and returns a :class:`ModelCard`: where each preprocessing setting
it carries came from (TFLite metadata, TF.js ``userDefinedMetadata``, ``metadata.json``,
edgepipe's own ``preprocessing.json``, the catalog for a known frozen backbone, the input tensor's
shape), its labels and their source, and the gate its kind gets.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError
from pipeline.types import ArtifactKind

# The preprocessing settings a model may carry, in the order reports list them.
SETTINGS = ("size", "mean", "std", "channel_order", "resize")
LABEL_FILES = ("labels.txt", "retrained_labels.txt")
TEACHABLE_MACHINE_IMAGE = "@teachablemachine/image"


@dataclass(frozen=True)
class Carried:
    """One preprocessing setting a model carries, and where it says so."""

    value: Any
    source: str


@dataclass(frozen=True)
class InputInfo:
    name: str | None
    shape: tuple[int | None, ...] | None
    dtype: str
    quantization: tuple[float, int] | None = None

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": None if self.shape is None else list(self.shape), "dtype": self.dtype,
                "quantization": None if self.quantization is None else list(self.quantization)}


@dataclass(frozen=True)
class ModelCard:
    """What a model file says about itself (see the module docstring).

    Attributes:
        path: the file or folder.
        kind: what runs it.
        format: finer than ``kind``: ``tfjs-graph`` or ``tfjs-layers``, ``tflite``, ...
        input: its image input.
        outputs: its outputs: name (signature keys and tensor names) → (which tensor, its width).
        output: the chosen output's name (see :func:`choose_output`); ``classes`` its width.
        labels: its class names in output order, or None; ``labels_source`` says from where.
        carried: the preprocessing settings it carries, by name (:data:`SETTINGS`).
        gate_key: the ``DEFAULT_GATES`` entry its kind gets (``tflite-int8``, ``tfjs-float16``, ...).
        notes: what a reader should know (e.g. "softmax pruned"), for the report.
    """

    path: Path
    kind: ArtifactKind
    format: str
    input: InputInfo
    outputs: dict[str, tuple[Any, int | None]]
    labels: tuple[str, ...] | None = None
    labels_source: str = "not carried"
    carried: dict[str, Carried] = field(default_factory=dict)
    gate_key: str = "savedmodel"
    output: str | None = None
    classes: int | None = None


def _bad(path: Path, why: str) -> ConfigError:
    return ConfigError(f"{path}: {why}")


def kind_of(path: Path) -> tuple[ArtifactKind, str]:
    """The kind and format of the model at ``path``.

    Raises:
        ConfigError: no such file, or not a model format edgepipe reads (the formats are listed).
    """
    path = Path(path)
    if not path.exists():
        raise _bad(path, "no such file or folder")
    if path.is_dir():
        if (path / "saved_model.pb").is_file():
            return ArtifactKind.SAVEDMODEL, "savedmodel"
        if (path / "model.json").is_file():
            return ArtifactKind.TFJS, _tfjs_format(path / "model.json")
    elif path.name == "model.json":
        return ArtifactKind.TFJS, _tfjs_format(path)
    elif path.suffix.lower() in (".keras", ".h5", ".hdf5"):
        return ArtifactKind.KERAS, "keras"
    elif path.suffix.lower() == ".tflite" or _head(path, 8)[4:8] == b"TFL3":
        return ArtifactKind.TFLITE, "tflite"
    elif path.suffix.lower() == ".pb":
        return ArtifactKind.GRAPH, "frozen-graph"
    raise _bad(path, "not a model edgepipe reads; give a SavedModel folder, a .keras/.h5 file, a frozen .pb, "
                     "a .tflite file or a TF.js folder with model.json")


def _head(path: Path, n: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def _tfjs_format(model_json: Path) -> str:
    try:
        fmt = json.loads(model_json.read_text(encoding="utf-8")).get("format", "")
    except (OSError, ValueError) as err:
        raise _bad(model_json, f"is not valid JSON ({err}); is it a TF.js model?") from None
    if fmt not in ("graph-model", "layers-model"):
        raise _bad(model_json, f"format {fmt!r} is not a TF.js graph-model or layers-model")
    return "tfjs-" + fmt.split("-")[0]


def read_card(path: Path, input_name: str | None = None, output_name: str | None = None) -> ModelCard:
    """Opens the model at ``path`` (without running it) and reads what it carries.

    Args:
        input_name, output_name: the chosen tensors (``--input-tensor``, ``--output``), for a
            model with several.

    Raises:
        ConfigError: not a model edgepipe reads, or its input is not one image batch
            ``[N, H, W, 3]``.
    """
    import dataclasses

    path = Path(path)
    kind, fmt = kind_of(path)
    reader = {"savedmodel": _savedmodel, "keras": _keras, "frozen-graph": _frozen_graph, "tflite": _tflite,
              "tfjs-graph": _tfjs, "tfjs-layers": _tfjs}[fmt]
    card = reader(path, kind, fmt, input_name, output_name)
    chosen = choose_output(card, output_name)
    card = dataclasses.replace(card, output=chosen, classes=card.outputs[chosen][1] if chosen else None)
    shape = card.input.shape
    if shape is None or len(shape) != 4 or shape[3] not in (3, None):
        raise _bad(path, f"input {card.input.name or ''} has shape {list(shape) if shape else 'unknown'}, not an "
                         "image batch [N, H, W, 3]; edgepipe checks image classifiers")
    if shape[1] is not None and shape[2] is not None and shape[1] != shape[2]:
        raise _bad(path, f"input is {shape[1]}x{shape[2]}; edgepipe feeds square images only")
    if shape[1] is not None:
        card.carried.setdefault("size", Carried(int(shape[1]), "input tensor shape"))
    if card.labels is None:
        card = _labels_beside(card)
    return card


def choose_output(card: ModelCard, wanted: str | None) -> str | None:
    """The output a model is compared on: ``wanted`` (``--output NAME``, applied to every model
    that has an output of that name), else ``probabilities``, else its only output. None for a
    TF.js model that does not list its outputs (the runner then chooses).

    Raises:
        ConfigError: several outputs and none chosen, or ``wanted`` missing from a model with several.
    """
    names = card.outputs
    if wanted in names:
        return wanted
    if "probabilities" in names:
        return "probabilities"
    distinct = {ident for ident, _ in names.values()}
    if len(distinct) <= 1:
        return next(iter(names), None)
    listed = ", ".join(names)
    if wanted is not None:
        raise _bad(card.path, f"has no output {wanted!r}; it has {listed}; pass --output with one of them")
    raise _bad(card.path, f"has {len(distinct)} outputs ({listed}); choose one with --output NAME")


def _labels_beside(card: ModelCard) -> ModelCard:
    """``labels.txt`` beside the model (or, for a SavedModel, beside its folder as edgepipe's
    export writes it)."""
    import dataclasses

    folders = [card.path if card.path.is_dir() else card.path.parent]
    if card.path.is_dir():
        folders.append(card.path.parent)
    for folder in folders:
        for name in LABEL_FILES:
            f = folder / name
            if f.is_file():
                return dataclasses.replace(card, labels=tuple(read_labels(f)), labels_source=f"{f.name} beside the model")
    return card


def read_labels(path: Path) -> list[str]:
    """One label per non-empty line.

    Raises:
        ConfigError: the file cannot be read or is empty.
    """
    try:
        labels = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise _bad(Path(path), f"cannot read labels ({err})") from None
    if not labels:
        raise _bad(Path(path), "holds no labels; one class name a line")
    # TF-slim's labels.txt numbers its lines ("0:background"); the numbers are not part of the names.
    numbered = [line.partition(":") for line in labels]
    if all(head.isdigit() and int(head) == k for k, (head, _, _) in enumerate(numbered)):
        labels = [name.strip() for _, _, name in numbered]
    return labels


# --- edgepipe's own contract ---------------------------------------------------------------------

def _edgepipe_contract(prep: dict, source: str) -> dict[str, Carried]:
    """edgepipe's models normalise inside: they take RGB 0..255, so the mean and std an app
    applies are 0 and 1 (``preprocessing.json`` records the backbone's, applied in the model)."""
    out = {"mean": Carried(0.0, f"{source} (normalisation inside the model)"),
           "std": Carried(1.0, f"{source} (normalisation inside the model)")}
    if prep.get("size"):
        out["size"] = Carried(int(prep["size"]), source)
    if prep.get("channel_order"):
        out["channel_order"] = Carried(str(prep["channel_order"]), source)
    if prep.get("resize_method"):
        out["resize"] = Carried(str(prep["resize_method"]), source)
    return out


# --- TensorFlow formats --------------------------------------------------------------------------

def _savedmodel(path: Path, kind, fmt, input_name, output_name) -> ModelCard:
    import tensorflow as tf

    from pipeline.runners.savedmodel import _pick

    loaded = tf.saved_model.load(str(path))
    signatures = dict(loaded.signatures)
    if not signatures:
        raise _bad(path, "has no serving signature; save it with signatures=...")
    fn = signatures.get("serving_default") or next(iter(signatures.values()))
    _, kwargs = fn.structured_input_signature
    try:
        key = _pick(sorted(kwargs), input_name, "input", default=None)
    except Exception as err:
        raise _bad(path, str(err)) from None
    spec = kwargs[key]
    carried: dict[str, Carried] = {}
    prep_file = path.parent / "preprocessing.json"
    if prep_file.is_file():
        carried = _edgepipe_contract(json.loads(prep_file.read_text(encoding="utf-8")), "edgepipe preprocessing.json")
    outputs = {k: (k, _width(v.shape)) for k, v in sorted(fn.structured_outputs.items())}
    return ModelCard(path, kind, fmt, InputInfo(key, tuple(spec.shape.as_list()), spec.dtype.name),
                     outputs, carried=carried, gate_key="savedmodel")


def _width(shape) -> int | None:
    dims = list(shape) if shape is not None else []
    return int(dims[-1]) if dims and dims[-1] is not None else None


def _keras(path: Path, kind, fmt, input_name, output_name) -> ModelCard:
    from pipeline.runners.base import RuntimeFailed, Tensors
    from pipeline.runners.savedmodel import _keras as load

    try:
        run = load(path, Tensors())
    except RuntimeFailed as err:
        raise _bad(path, str(err)) from None
    model = run.model
    shape = tuple(model.inputs[0].shape)
    outputs = {name: (name, _width(t.shape)) for name, t in zip(model.output_names, model.outputs)}
    return ModelCard(path, kind, fmt, InputInfo(model.inputs[0].name, shape, "float32"), outputs, gate_key="savedmodel")


def _frozen_graph(path: Path, kind, fmt, input_name, output_name) -> ModelCard:
    from pipeline.graph import load_graph_def
    from pipeline.runners.base import RuntimeFailed, Tensors
    from pipeline.runners.savedmodel import graph_io

    graph_def = load_graph_def(path)
    try:
        inp, out = graph_io(graph_def, Tensors(input_name, output_name), path)
    except RuntimeFailed as err:
        raise ConfigError(str(err)) from None
    shape = tuple(inp.shape.as_list()) if inp.shape.rank is not None else None
    carried: dict[str, Carried] = {}
    backbone = _known_backbone(graph_def, inp.name)
    if backbone is not None:
        source = f"catalog: {backbone.name}"
        carried = {"size": Carried(backbone.preprocessing.size, source),
                   "mean": Carried(backbone.preprocessing.mean, source), "std": Carried(backbone.preprocessing.std, source),
                   "channel_order": Carried(str(backbone.preprocessing.channel_order), source),
                   "resize": Carried(str(backbone.preprocessing.resize_method), source)}
    width = out.shape[-1] if out.shape.rank else None
    return ModelCard(path, kind, fmt, InputInfo(inp.name, shape, inp.dtype.name), {out.name: (out.name, width)},
                     carried=carried, gate_key="savedmodel")


def _known_backbone(graph_def, input_tensor: str | None = None):
    """The catalog row this frozen graph is, recognised by its tensor names and shapes
    (:func:`pipeline.catalog.recognise`), or None when no row or rows that disagree match."""
    from pipeline.catalog import recognise
    from pipeline.errors import GraphError

    try:
        rows = [spec for spec, _ in recognise(graph_def, input_tensor=input_tensor)]
    except GraphError:
        return None
    return rows[0] if rows and all(r.preprocessing == rows[0].preprocessing for r in rows) else None


# --- TFLite --------------------------------------------------------------------------------------

def _tflite(path: Path, kind, fmt, input_name, output_name) -> ModelCard:
    from mediapipe.tasks.metadata import schema_py_generated as model_fb

    from pipeline.errors import ConversionError
    from pipeline.metadata import read_metadata

    data = path.read_bytes()
    if len(data) < 8 or not model_fb.Model.ModelBufferHasIdentifier(data, 0):
        raise _bad(path, "is not a TFLite flatbuffer (file identifier TFL3 missing)")
    model = model_fb.Model.GetRootAsModel(data, 0)
    graph = model.Subgraphs(0)
    types = {v: k.lower() for k, v in vars(model_fb.TensorType).items() if not k.startswith("_")}
    tensors = [graph.Tensors(i) for i in range(graph.TensorsLength())]
    inputs = {**{tensors[graph.Inputs(i)].Name().decode(): graph.Inputs(i) for i in range(graph.InputsLength())},
              **_signature(model, "Inputs")}
    outputs = {**_signature(model, "Outputs"),
               **{tensors[graph.Outputs(i)].Name().decode(): graph.Outputs(i) for i in range(graph.OutputsLength())}}
    try:
        from pipeline.runners.tflite import _Choice, choose

        index = choose(inputs, input_name, "input")
    except _Choice as err:
        raise _bad(path, str(err)) from None
    t = tensors[index]
    q = t.Quantization()
    quant = None
    if q is not None and q.ScaleLength():
        quant = (float(q.ScaleAsNumpy()[0]), int(q.ZeroPointAsNumpy()[0]))
    dtype = types.get(t.Type(), str(t.Type()))
    info = InputInfo(t.Name().decode(), tuple(int(d) for d in t.ShapeAsNumpy()), dtype, quant)
    carried: dict[str, Carried] = {}
    labels, labels_source = None, "not carried"
    try:
        meta = read_metadata(path)
    except ConversionError:
        meta = None
    if meta is not None:
        if meta.get("preprocessing"):
            carried = _edgepipe_contract(meta["preprocessing"], "edgepipe preprocessing.json in the TFLite metadata")
        elif meta["inputs"]:
            m = meta["inputs"][0]
            if m.get("normalization"):
                mean, std = m["normalization"]["mean"], m["normalization"]["std"]
                source = "TFLite metadata (NormalizationOptions)"
                carried["mean"], carried["std"] = Carried(_one(mean), source), Carried(_one(std), source)
            if m.get("color_space") in ("RGB", "GRAYSCALE"):
                carried["channel_order"] = Carried("RGB", "TFLite metadata (ImageProperties)")
        labels, labels_source = _metadata_labels(meta)
    out_types = {types.get(tensors[i].Type()) for i in set(outputs.values())}
    widths = {name: (i, int(tensors[i].ShapeAsNumpy()[-1]) if tensors[i].ShapeLength() else None)
              for name, i in outputs.items()}
    return ModelCard(path, kind, fmt, info, widths, None if labels is None else tuple(labels), labels_source,
                     carried, _tflite_gate(tensors, types, dtype, out_types, model))


def _one(values):
    values = [float(v) for v in values]
    return values[0] if len(set(values)) == 1 else values


def _signature(model, side: str) -> dict[str, int]:
    if model.SignatureDefsLength() == 0:
        return {}
    sig = model.SignatureDefs(0)
    n = getattr(sig, f"{side}Length")()
    return {getattr(sig, side)(i).Name().decode(): getattr(sig, side)(i).TensorIndex() for i in range(n)}


def _metadata_labels(meta: dict) -> tuple[list[str] | None, str]:
    """The output's TENSOR_AXIS_LABELS file (Model Maker and edgepipe write one)."""
    for out in meta.get("outputs", []):
        for f in out.get("associated_files", []):
            if f.get("type") == "TENSOR_AXIS_LABELS" and f.get("name") in meta["files"]:
                labels = [line.strip() for line in meta["files"][f["name"]].splitlines() if line.strip()]
                return labels, f"TFLite metadata ({f['name']})"
    return None, "not carried"


def _tflite_gate(tensors, types: dict, in_dtype: str, out_types: set, model) -> str:
    """The gate a .tflite file's quantisation gets, told from its tensors: integer I/O, 16-bit
    activations, int8 activations (full integer), int8 weights only (dynamic range), float16
    weights, else float32."""
    kinds = {types.get(t.Type()) for t in tensors}
    constant = {types.get(t.Type()) for t in tensors if t.Buffer() and model.Buffers(t.Buffer()).DataLength()}
    variable = {types.get(t.Type()) for t in tensors if not (t.Buffer() and model.Buffers(t.Buffer()).DataLength())}
    if "int16" in variable:
        return "tflite-int16x8"
    if in_dtype == "int8" or out_types & {"int8"}:
        return "tflite-int8-int8"
    if in_dtype == "uint8" or out_types & {"uint8"}:
        return "tflite-int8-uint8"
    if "int8" in variable:
        return "tflite-int8"
    if "int8" in constant:
        return "tflite-dynamic"
    if "float16" in kinds:
        return "tflite-float16"
    return "tflite-float32"


# --- TF.js ---------------------------------------------------------------------------------------

def _tfjs(path: Path, kind, fmt, input_name, output_name) -> ModelCard:
    folder = path if path.is_dir() else path.parent
    spec = json.loads((folder / "model.json").read_text(encoding="utf-8"))
    meta = spec.get("userDefinedMetadata") or {}
    carried: dict[str, Carried] = {}
    labels, labels_source = None, "not carried"
    if isinstance(meta.get("edgepipe"), dict):
        mine = meta["edgepipe"]
        if mine.get("preprocessing"):
            carried = _edgepipe_contract(mine["preprocessing"], "edgepipe metadata in model.json")
        if mine.get("labels"):
            labels, labels_source = list(mine["labels"]), "edgepipe metadata in model.json"
    tm = folder / "metadata.json"
    if tm.is_file():
        try:
            extra = json.loads(tm.read_text(encoding="utf-8"))
        except ValueError as err:
            raise _bad(tm, f"is not valid JSON ({err})") from None
        if extra.get("labels") and labels is None:
            labels, labels_source = [str(x) for x in extra["labels"]], "metadata.json"
        if extra.get("imageSize"):
            carried["size"] = Carried(int(extra["imageSize"]), "metadata.json (imageSize)")
        if extra.get("packageName") == TEACHABLE_MACHINE_IMAGE:
            # @teachablemachine/image feeds its models pixels / 127.5 - 1 (its predict()); the
            # metadata names the package, not the numbers.
            source = f"metadata.json ({TEACHABLE_MACHINE_IMAGE} normalises to [-1, 1])"
            carried.setdefault("mean", Carried(127.5, source))
            carried.setdefault("std", Carried(127.5, source))
    shape, name, outputs = _tfjs_io(spec, fmt)
    weights = {w.get("quantization", {}).get("dtype", w.get("dtype")) for g in spec.get("weightsManifest", [])
               for w in g.get("weights", [])}
    gate = "tfjs-uint8" if weights & {"uint8", "uint16"} else "tfjs-float16" if "float16" in weights else "tfjs-float32"
    return ModelCard(folder, kind, fmt, InputInfo(name, shape, "float32"), outputs,
                     None if labels is None else tuple(labels), labels_source, carried, gate)


def _dims(shape: dict) -> list[int | None]:
    return [None if int(d.get("size", -1)) < 0 else int(d["size"]) for d in shape.get("dim", [])]


def _first_input_shape(config) -> tuple[list, str | None] | None:
    """The first ``batch_input_shape`` in a Keras topology, depth first: Teachable Machine's
    models nest the MobileNet (which has it) as the first layer of a Sequential."""
    if isinstance(config, dict):
        shape = config.get("batch_input_shape") or config.get("batch_shape")
        if shape:
            return shape, config.get("name")
        values = config.values()
    elif isinstance(config, list):
        values = config
    else:
        return None
    for v in values:
        found = _first_input_shape(v)
        if found:
            return found
    return None


def _tfjs_io(spec: dict, fmt: str) -> tuple[tuple | None, str | None, dict]:
    if fmt == "tfjs-layers":
        topology = spec.get("modelTopology") or {}
        config = (topology.get("model_config") or topology).get("config", {})
        layers = config.get("layers", [])
        found = _first_input_shape(config)
        names = [o[0] for o in config.get("output_layers", [])] or ([layers[-1]["config"]["name"]] if layers else [])
        width = (layers[-1].get("config", {}).get("units") if layers and len(names) == 1 else None)
        outputs = {n: (n, width) for n in names}
        return (tuple(found[0]) if found else None), (found[1] if found else None), outputs
    sig = (spec.get("userDefinedMetadata") or {}).get("signature") or spec.get("signature") or {}
    inputs = list((sig.get("inputs") or {}).items())
    shape = tuple(_dims(inputs[0][1].get("tensorShape", {}))) if inputs else None
    outputs = {}
    for key, out in (sig.get("outputs") or {}).items():
        dims = _dims(out.get("tensorShape", {}))
        outputs[key] = (out.get("name", key), dims[-1] if dims else None)
    keys = (spec.get("userDefinedMetadata") or {}).get("structuredOutputKeys") or []
    if len(keys) == len(outputs):
        # Outputs of equal shape are keyed by tensor name; the structured keys name them in order.
        outputs = {**outputs, **{k: v for k, v in zip(keys, outputs.values())}}
    return shape, (inputs[0][0] if inputs else None), outputs


def output_lsb(path: Path, output: str | None = None) -> float | None:
    """One step of a .tflite file's quantised output, in output units: the output tensor's scale
    when it is an integer, else the scale of the integer tensor its final DEQUANTIZE reads (a
    full-integer file with float I/O); None for a float model. Drift between two runtimes of the
    same file reads as "LSBs" in this unit."""
    from mediapipe.tasks.metadata import schema_py_generated as model_fb

    data = Path(path).read_bytes()
    model = model_fb.Model.GetRootAsModel(data, 0)
    graph = model.Subgraphs(0)
    outputs = {**_signature(model, "Outputs"),
               **{graph.Tensors(graph.Outputs(i)).Name().decode(): graph.Outputs(i) for i in range(graph.OutputsLength())}}
    index = outputs.get(output) if output in outputs else outputs.get("probabilities", graph.Outputs(0))

    def scale(i: int) -> float | None:
        q = graph.Tensors(i).Quantization()
        return float(q.ScaleAsNumpy()[0]) if q is not None and q.ScaleLength() else None

    if graph.Tensors(index).Type() in (model_fb.TensorType.INT8, model_fb.TensorType.UINT8, model_fb.TensorType.INT16):
        return scale(index)
    for k in range(graph.OperatorsLength()):
        op = graph.Operators(k)
        if op.OutputsLength() and op.Outputs(0) == index:
            code = model.OperatorCodes(op.OpcodeIndex())
            builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
            if builtin == model_fb.BuiltinOperator.DEQUANTIZE and op.InputsLength():
                return scale(op.Inputs(0))
    return None

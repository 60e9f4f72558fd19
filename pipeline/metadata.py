"""TFLite model metadata: the labels and the preprocessing contract inside every .tflite file.

A .tflite file on its own says nothing about what its outputs mean or what its input expects.
TFLite metadata (the ``TFLITE_METADATA`` flatbuffer, schema ``metadata_schema.fbs``, identifier
``M001``) fixes that for every consumer that reads it — MediaPipe Tasks, the Android codegen, Model
Maker — and the associated files (here ``labels.txt`` and ``preprocessing.json``) ride along as a
zip archive appended to the model, where TFLite runtimes never look.

MediaPipe's own writer (``mediapipe.tasks.python.metadata.metadata_writers``) cannot be imported
from the wheel we pin (it needs ``mediapipe.tasks.cc``, which is not shipped), so this module does
what its ``MetadataPopulator`` does with the flatbuffer classes the wheel does ship:

1. build a ``ModelMetadata`` object and serialise it with file identifier ``M001``;
2. unpack the model, store that buffer in ``Model.buffers`` and point a ``Model.metadata`` entry
   named ``TFLITE_METADATA`` at it (replacing an earlier one), repack with identifier ``TFL3``;
3. append the associated files as an uncompressed zip.

Normalisation recorded for the input is mean 0, std 1: our models take float32 RGB 0..255 and
apply the backbone's ``(x - mean) / std`` themselves, so a reader that normalises by the metadata
must leave the pixels as they are. The full contract is in ``preprocessing.json``.
"""
from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np

from pipeline.errors import ConversionError

METADATA_NAME = "TFLITE_METADATA"
MODEL_IDENTIFIER = b"TFL3"
METADATA_IDENTIFIER = b"M001"
# Every field written here exists since schema 1.0.0 (no AssociatedFile.version, no tokenizers,
# no tensor groups, no custom metadata); see the history at the top of metadata_schema.fbs.
MIN_PARSER_VERSION = "1.0.0"
LABELS_FILE = "labels.txt"
PREPROCESSING_FILE = "preprocessing.json"
INPUT_NAME = "images"
PROBABILITIES = "probabilities"
LOGITS = "logits"
# The TFLite schema declares buffer data ``force_align: 16``. The generated Python packer aligns
# uint8 vectors to 1 byte (TF 2.19's converter output is not aligned either, and the runtimes
# accept that); since the model is repacked anyway, it is repacked the way the schema says.
BUFFER_ALIGNMENT = 16
# The zip entries get a fixed time stamp, so the same model and labels give the same bytes.
ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)


def _schemas():
    # Imported on use: the mediapipe package is only needed by the stages that write metadata.
    from mediapipe.tasks.metadata import metadata_schema_py_generated as meta_fb
    from mediapipe.tasks.metadata import schema_py_generated as model_fb

    return meta_fb, model_fb


def preprocessing_contract(preprocessing: dict) -> dict:
    """``export/preprocessing.json`` with what it leaves implicit spelled out for an app.

    Args:
        preprocessing: the export stage's contract (size, mean, std, resize_method, antialias,
            channel_order, dtype, range, input).

    Returns:
        A new dict: the same keys, plus ``crop`` (none), where the mean/std are applied (inside
        the model) and what an app must do itself (decode, resize, feed 0..255 float32).
    """
    return {
        **preprocessing,
        "crop": "none",
        "normalization": {
            "applied": "inside the model",
            "formula": "(x - mean) / std",
            "mean": preprocessing.get("mean"),
            "std": preprocessing.get("std"),
        },
        "app_steps": [
            "decode to RGB",
            f"resize to {preprocessing.get('size')}x{preprocessing.get('size')} "
            f"({preprocessing.get('resize_method', 'bilinear')}, "
            f"antialias {'on' if preprocessing.get('antialias') else 'off'}, no crop)",
            "feed float32 values in 0..255 (no mean/std: the model applies it)",
        ],
    }


def _associated_file(meta_fb, name: str, description: str, file_type: int):
    f = meta_fb.AssociatedFileT()
    f.name = name
    f.description = description
    f.type = file_type
    return f


def _stats(meta_fb, low: list[float], high: list[float]):
    s = meta_fb.StatsT()
    s.min, s.max = low, high
    return s


def _input_metadata(meta_fb, preprocessing: dict, normalization: tuple[float, float] | None = None):
    t = meta_fb.TensorMetadataT()
    t.name = INPUT_NAME
    size = preprocessing.get("size")
    if normalization is not None:
        t.description = f"RGB image, {size}x{size}; the app applies (x - {normalization[0]}) / {normalization[1]}."
    else:
        t.description = (
            f"RGB image, float32 values 0..255, resized to {size}x{size} "
            f"({preprocessing.get('resize_method', 'bilinear')}, no antialias, no crop); the model "
            f"applies (x - {preprocessing.get('mean')}) / {preprocessing.get('std')} itself. "
            f"Contract: {PREPROCESSING_FILE}."
        )
    t.content = meta_fb.ContentT()
    t.content.contentPropertiesType = meta_fb.ContentProperties.ImageProperties
    t.content.contentProperties = meta_fb.ImagePropertiesT()
    t.content.contentProperties.colorSpace = meta_fb.ColorSpaceType.RGB
    norm = meta_fb.ProcessUnitT()
    norm.optionsType = meta_fb.ProcessUnitOptions.NormalizationOptions
    norm.options = meta_fb.NormalizationOptionsT()
    # edgepipe's own: identity, the pixels go in as 0..255 (see the module docstring).
    mean, std = normalization or (0.0, 1.0)
    norm.options.mean = [float(mean)] * 3
    norm.options.std = [float(std)] * 3
    t.processUnits = [norm]
    low, high = (0.0 - mean) / std, (255.0 - mean) / std
    t.stats = _stats(meta_fb, [low] * 3, [high] * 3)
    return t


def _output_metadata(meta_fb, name: str, n_labels: int):
    t = meta_fb.TensorMetadataT()
    t.name = name  # MediaPipe reports this as the classification head's name
    t.content = meta_fb.ContentT()
    t.content.contentPropertiesType = meta_fb.ContentProperties.FeatureProperties
    t.content.contentProperties = meta_fb.FeaturePropertiesT()
    labels = _associated_file(meta_fb, LABELS_FILE, f"The {n_labels} class names, one per line, in output order.",
                              meta_fb.AssociatedFileType.TENSOR_AXIS_LABELS)
    t.associatedFiles = [labels]
    if name == PROBABILITIES:
        t.description = f"Softmax probabilities of the {n_labels} classes (sum 1), in the order of {LABELS_FILE}."
        t.stats = _stats(meta_fb, [0.0], [1.0])
    else:
        t.description = f"Logits of the {n_labels} classes (before softmax), in the order of {LABELS_FILE}."
    return t


def _output_names(model) -> dict[int, str]:
    """Output tensor index → its key in the first signature (``probabilities``, ``logits``).

    The converter names output tensors ``StatefulPartitionedCall:0/1`` and orders them by key;
    only the SignatureDef says which is which.
    """
    if model.SignatureDefsLength() == 0:
        return {}
    sig = model.SignatureDefs(0)
    return {sig.Outputs(i).TensorIndex(): sig.Outputs(i).Name().decode() for i in range(sig.OutputsLength())}


def _pack_aligned(model_fb, model) -> bytes:
    """``ModelT.Pack`` with every buffer's data 16-byte aligned (see :data:`BUFFER_ALIGNMENT`)."""
    import flatbuffers

    class AlignedBufferT(model_fb.BufferT):
        def Pack(self, builder):
            data = None
            if self.data is not None and len(self.data):
                payload = np.asarray(self.data, np.uint8).tobytes()
                builder.StartVector(1, len(payload), BUFFER_ALIGNMENT)
                builder.head -= len(payload)
                builder.Bytes[builder.head:builder.head + len(payload)] = payload
                data = builder.EndVector()
            model_fb.BufferStart(builder)
            if data is not None:
                model_fb.BufferAddData(builder, data)
            model_fb.BufferAddOffset(builder, self.offset)
            model_fb.BufferAddSize(builder, self.size)
            return model_fb.BufferEnd(builder)

    for i, buf in enumerate(model.buffers or []):
        aligned = AlignedBufferT()
        aligned.data, aligned.offset, aligned.size = buf.data, buf.offset, buf.size
        model.buffers[i] = aligned
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), MODEL_IDENTIFIER)
    return bytes(builder.Output())


def with_metadata(tflite_bytes: bytes, labels: list[str], preprocessing: dict, name: str,
                  description: str, normalization: tuple[float, float] | None = None) -> bytes:
    """The model with TFLite metadata and ``labels.txt`` + ``preprocessing.json`` packed in.

    Input tensor: ImageProperties (RGB), NormalizationOptions mean 0 / std 1 (the model
    normalises itself), stats 0..255. Outputs: named by the SignatureDef (``probabilities``,
    ``logits``), each with ``labels.txt`` as TENSOR_AXIS_LABELS; probabilities have stats 0..1.
    Metadata or associated files already in ``tflite_bytes`` are replaced. Tensors, ops and
    signatures are kept as they are.

    Args:
        tflite_bytes: a single-subgraph model with one image input ``[1, H, W, 3]``.
        labels: class names in output order; one per line in ``labels.txt``, so no newlines.
        preprocessing: the contract, stored verbatim as ``preprocessing.json`` (JSON-serialisable);
            see :func:`preprocessing_contract`.
        name, description: the model's name and description in the metadata.
        normalization: ``(mean, std)`` an app applies, for a model that does not normalise
            itself; the metadata then says so and carries no ``preprocessing.json``, the layout
            Model Maker writes (edgepipe's own models leave this None).

    Returns:
        The new .tflite bytes (flatbuffer followed by a zip of the associated files).

    Raises:
        ConversionError: the model is not a single-subgraph TFLite flatbuffer with one input
            and only label-sized outputs, a label holds a newline, or buffers live outside the
            flatbuffer (models over 2 GB).
    """
    import flatbuffers

    meta_fb, model_fb = _schemas()
    if len(tflite_bytes) < 8 or not model_fb.Model.ModelBufferHasIdentifier(tflite_bytes, 0):
        raise ConversionError("not a TFLite flatbuffer (file identifier TFL3 missing)")
    bad = [lab for lab in labels if "\n" in lab or "\r" in lab or not lab]
    if bad:
        raise ConversionError(f"labels must be non-empty single lines for {LABELS_FILE}: {bad!r}")
    view = model_fb.Model.GetRootAsModel(tflite_bytes, 0)
    if view.SubgraphsLength() != 1:
        raise ConversionError(f"expected one subgraph, found {view.SubgraphsLength()}")
    graph = view.Subgraphs(0)
    if graph.InputsLength() != 1:
        raise ConversionError(f"expected one image input, found {graph.InputsLength()}")
    out_names = _output_names(view)
    outputs = []
    for i in range(graph.OutputsLength()):
        index = graph.Outputs(i)
        shape = list(graph.Tensors(index).ShapeAsNumpy())
        if shape[-1:] != [len(labels)]:
            raise ConversionError(
                f"output {i} has shape {shape}; expected [..., {len(labels)}] for {len(labels)} labels")
        outputs.append(out_names.get(index, PROBABILITIES if graph.OutputsLength() == 1 else f"output_{i}"))

    subgraph = meta_fb.SubGraphMetadataT()
    subgraph.name = "image_classifier"
    subgraph.inputTensorMetadata = [_input_metadata(meta_fb, preprocessing, normalization)]
    subgraph.outputTensorMetadata = [_output_metadata(meta_fb, n, len(labels)) for n in outputs]
    meta = meta_fb.ModelMetadataT()
    meta.name = name
    meta.description = description
    meta.author = "edgepipe"
    meta.minParserVersion = MIN_PARSER_VERSION
    meta.subgraphMetadata = [subgraph]
    meta.associatedFiles = [] if normalization is not None else [_associated_file(
        meta_fb, PREPROCESSING_FILE, "The preprocessing contract (JSON): size, resize, range, normalisation.",
        meta_fb.AssociatedFileType.DESCRIPTIONS)]
    builder = flatbuffers.Builder(0)
    builder.Finish(meta.Pack(builder), METADATA_IDENTIFIER)
    metadata_buf = bytes(builder.Output())

    model = model_fb.ModelT.InitFromObj(view)
    outside = [b for b in model.buffers or [] if (b.offset or 0) > 1]
    if outside and len(tflite_bytes) > 2**31 - 2**20:  # a flatbuffer holds at most 2 GB
        raise ConversionError("the model keeps its buffers outside the flatbuffer (over 2 GB); "
                              "metadata cannot be added by repacking it")
    for b in outside:  # ai-edge-quantizer appends buffers after the flatbuffer; they fit inside it
        b.data = np.frombuffer(bytes(tflite_bytes[b.offset:b.offset + b.size]), np.uint8)
        b.offset = b.size = 0
    holder = model_fb.BufferT()
    holder.data = np.frombuffer(metadata_buf, np.uint8)
    model.metadata = model.metadata or []
    existing = [m for m in model.metadata if m.name and m.name.decode() == METADATA_NAME]
    if existing:
        model.buffers[existing[0].buffer] = holder
    else:
        model.buffers.append(holder)
        entry = model_fb.MetadataT()
        entry.name = METADATA_NAME
        entry.buffer = len(model.buffers) - 1
        model.metadata.append(entry)
    packed = _pack_aligned(model_fb, model)

    files = {LABELS_FILE: ("\n".join(labels) + "\n").encode("utf-8")}
    if normalization is None:
        files[PREPROCESSING_FILE] = (json.dumps(preprocessing, indent=2, sort_keys=True) + "\n").encode("utf-8")
    out = io.BytesIO()
    out.write(packed)
    # Appending to a non-zip stream writes a zip whose offsets count from the file's start, the
    # layout MetadataPopulator writes and MediaPipe / TFLite Support read. Stored, not deflated:
    # readers map the label file in place.
    with zipfile.ZipFile(out, "a", compression=zipfile.ZIP_STORED) as zf:
        for fname, data in files.items():
            zf.writestr(zipfile.ZipInfo(fname, date_time=ZIP_DATE_TIME), data)
    return out.getvalue()


def _file_dict(f) -> dict:
    return {"name": f.name.decode() if f.name else None,
            "description": f.description.decode() if f.description else None,
            "type": _enum_name("AssociatedFileType", f.type)}


def _enum_name(enum: str, value: int) -> str:
    meta_fb, _ = _schemas()
    names = {v: k for k, v in vars(getattr(meta_fb, enum)).items() if not k.startswith("_")}
    return names.get(value, str(value))


def _tensor_dict(t) -> dict:
    meta_fb, _ = _schemas()
    d = {"name": t.name.decode() if t.name else None,
         "description": t.description.decode() if t.description else None,
         "content": None, "color_space": None, "normalization": None, "stats": None,
         "associated_files": [_file_dict(f) for f in t.associatedFiles or []]}
    if t.content is not None:
        d["content"] = _enum_name("ContentProperties", t.content.contentPropertiesType)
        if t.content.contentPropertiesType == meta_fb.ContentProperties.ImageProperties:
            d["color_space"] = _enum_name("ColorSpaceType", t.content.contentProperties.colorSpace)
    for unit in t.processUnits or []:
        if unit.optionsType == meta_fb.ProcessUnitOptions.NormalizationOptions:
            d["normalization"] = {"mean": [float(v) for v in unit.options.mean],
                                  "std": [float(v) for v in unit.options.std]}
    if t.stats is not None:
        d["stats"] = {k: None if v is None else [float(x) for x in v]
                      for k, v in (("min", t.stats.min), ("max", t.stats.max))}
    return d


def read_metadata(path: Path | str) -> dict:
    """The TFLite metadata of a .tflite file as plain data, associated files included.

    Returns:
        ``{"name", "description", "author", "min_parser_version", "inputs": [tensor...],
        "outputs": [tensor...], "associated_files": [...], "files": {name: text},
        "labels": [...], "preprocessing": {...} | None}``; each tensor is ``{"name",
        "description", "content", "color_space", "normalization": {"mean", "std"} | None,
        "stats": {"min", "max"} | None, "associated_files"}``.

    Raises:
        ConversionError: not a TFLite file, or it carries no TFLite metadata.
    """
    meta_fb, model_fb = _schemas()
    data = Path(path).read_bytes()
    if len(data) < 8 or not model_fb.Model.ModelBufferHasIdentifier(data, 0):
        raise ConversionError(f"{path}: not a TFLite flatbuffer (file identifier TFL3 missing)")
    model = model_fb.Model.GetRootAsModel(data, 0)
    buf = None
    for i in range(model.MetadataLength()):
        if model.Metadata(i).Name().decode() == METADATA_NAME:
            b = model.Buffers(model.Metadata(i).Buffer())
            if b.DataLength():
                buf = b.DataAsNumpy().tobytes()
    if buf is None:
        raise ConversionError(f"{path}: no {METADATA_NAME} in the model")
    if not meta_fb.ModelMetadata.ModelMetadataBufferHasIdentifier(buf, 0):
        raise ConversionError(f"{path}: {METADATA_NAME} lacks the metadata identifier M001")
    meta = meta_fb.ModelMetadataT.InitFromObj(meta_fb.ModelMetadata.GetRootAs(buf, 0))
    files: dict[str, str] = {}
    if zipfile.is_zipfile(io.BytesIO(data)):
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            files = {n: zf.read(n).decode("utf-8") for n in zf.namelist()}
    sub = (meta.subgraphMetadata or [None])[0]
    return {
        "name": meta.name.decode() if meta.name else None,
        "description": meta.description.decode() if meta.description else None,
        "author": meta.author.decode() if meta.author else None,
        "min_parser_version": meta.minParserVersion.decode() if meta.minParserVersion else None,
        "inputs": [_tensor_dict(t) for t in (sub.inputTensorMetadata or [])] if sub else [],
        "outputs": [_tensor_dict(t) for t in (sub.outputTensorMetadata or [])] if sub else [],
        "associated_files": [_file_dict(f) for f in meta.associatedFiles or []],
        "files": files,
        "labels": files[LABELS_FILE].splitlines() if LABELS_FILE in files else [],
        "preprocessing": json.loads(files[PREPROCESSING_FILE]) if PREPROCESSING_FILE in files else None,
    }

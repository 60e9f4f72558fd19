"""Tiny Keras classifiers and their TF.js conversions, as other tools make them: a layers model in
Teachable Machine's layout and a graph model from ``tensorflowjs_converter``.

The weights are drawn from a seeded generator and the metadata is fixed, so the same arguments
give the same numbers (graph node names still carry Keras's per-process suffixes, ``classifier_1``).
Each builder takes well under a second once TensorFlow is imported.

tensorflowjs 4.22 converts a Keras 3 model to a layers model whose topology is written in Keras 3's
config format (``batch_shape``, dtype-policy objects, ``inbound_nodes`` as call arguments), which
tfjs-layers 4.22 cannot read ("An InputLayer should be passed either a `batchInputShape` or an
`inputShape`", then "Corrupted configuration, expected array for nodeData"). :func:`write_layers_model`
therefore rewrites that topology into the Keras 2 form tfjs-layers reads, and renames the weights
the way tfjs-layers scopes them; their values are the converter's, untouched.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

# The fields of a Teachable Machine image export's metadata.json; fixed values, for repeatable builds.
TM_METADATA = {
    "tfjsVersion": "4.22.0",
    "tmVersion": "2.4.10",
    "packageVersion": "0.8.5",
    "packageName": "@teachablemachine/image",
    "timeStamp": "2026-01-01T00:00:00.000Z",
    "userMetadata": {},
    "modelName": "tm-my-image-model",
}
QUANTIZATIONS = ("float16", "uint8", "uint16")  # tensorflowjs_converter's --quantize_* modes


def sample_inputs(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """``n`` float32 images ``[n, size, size, 3]`` in [-1, 1], the range the models here take."""
    return np.random.default_rng(seed).uniform(-1, 1, (n, size, size, 3)).astype(np.float32)


def keras_classifier(size: int = 32, classes: int = 3, seed: int = 0):
    """A tiny Keras 3 image classifier: Conv2D → GlobalAveragePooling2D → Dense softmax.

    Its layers are named ``image``, ``conv``, ``embedding`` and ``scores`` (not ``probabilities``: the
    runners must find the only output without that name). Weights are drawn from ``seed`` at a
    scale that keeps the softmax away from one-hot for inputs in [-1, 1].

    Args:
        size: input height and width; the input is float32 ``[None, size, size, 3]`` normalised to
            [-1, 1] (the model itself does no normalisation).
        classes: outputs of the softmax.
        seed: seeds the weights.

    Returns:
        An uncompiled ``keras.Model``.
    """
    import keras

    image = keras.Input((size, size, 3), name="image")
    features = keras.layers.Conv2D(8, 3, activation="relu", name="conv")(image)
    pooled = keras.layers.GlobalAveragePooling2D(name="embedding")(features)
    scores = keras.layers.Dense(classes, activation="softmax", name="scores")(pooled)
    model = keras.Model(image, scores, name="classifier")
    rng = np.random.default_rng(seed)
    model.set_weights([rng.normal(0, 0.5, w.shape).astype(np.float32) for w in model.get_weights()])
    return model


def keras_two_outputs(classifier):
    """``classifier`` (from :func:`keras_classifier`, weights shared) with its pooled features as a
    second output: ``{"scores": [N, classes], "embedding": [N, 8]}``, several outputs and none named
    ``probabilities``. The keys are the layers' names, so a layers model has the same output names
    as the graph model's signature."""
    import keras

    pooled = classifier.get_layer("embedding").output
    outputs = {"scores": classifier.output, "embedding": pooled}
    return keras.Model(classifier.input, outputs, name="two_outputs")


def keras_vector_model(features: int = 10, classes: int = 3, seed: int = 0):
    """A Dense softmax on a ``[None, features]`` vector: a classifier that takes no image."""
    import keras

    vector = keras.Input((features,), name="vector")
    scores = keras.layers.Dense(classes, activation="softmax", name="scores")(vector)
    model = keras.Model(vector, scores, name="vector_model")
    rng = np.random.default_rng(seed)
    model.set_weights([rng.normal(0, 0.5, w.shape).astype(np.float32) for w in model.get_weights()])
    return model


def write_layers_model(model, folder: Path, labels: Sequence[str], image_size: int) -> Path:
    """Writes ``model`` as a Teachable Machine export: a TF.js layers model in one folder.

    The folder holds ``model.json`` (``"format": "layers-model"``, one weights file), ``weights.bin``
    and ``metadata.json`` (``labels``, ``imageSize`` and TM's other fields, fixed values). The
    weights come from ``tensorflowjs.converters.save_keras_model``; the topology is rewritten from
    Keras 3's config format to the Keras 2 one tfjs-layers reads (see the module docstring).

    Args:
        model: a Keras 3 model built from layers tfjs-layers has (Conv2D, Dense, pooling, ...).
        folder: created if missing; files of the same names are replaced.
        labels: written to metadata.json as they are (not checked against the model's outputs, so
            tests can build a mismatch).
        image_size: metadata.json's ``imageSize``, as given.

    Returns:
        ``folder``.
    """
    # tensorflowjs imports TF-DF, which imports IPython for a banner when stdout is not a tty.
    os.environ.setdefault("TFDF_DISABLE_WELCOME_MESSAGE", "1")
    from tensorflowjs.converters.keras_h5_conversion import save_keras_model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgepipe-layers-") as tmp:
        # It prints a false alarm about the Keras version on every call; the output is right.
        with contextlib.redirect_stdout(io.StringIO()):
            # One shard whatever the size, so it can be TM's single weights.bin.
            save_keras_model(model, tmp, weight_shard_size_bytes=2**31 - 1)
        converted = json.loads((Path(tmp) / "model.json").read_text())
        (manifest,) = converted["weightsManifest"]
        (shard,) = manifest["paths"]
        shutil.copyfile(Path(tmp) / shard, folder / "weights.bin")
    model_json = {
        "format": "layers-model",
        "generatedBy": converted["generatedBy"],
        "convertedBy": converted["convertedBy"],
        "modelTopology": _keras2_config(converted["modelTopology"]),
        "weightsManifest": [{"paths": ["weights.bin"], "weights": _layer_scoped(manifest["weights"])}],
    }
    (folder / "model.json").write_text(json.dumps(model_json))
    metadata = {**TM_METADATA, "labels": list(labels), "imageSize": image_size}
    (folder / "metadata.json").write_text(json.dumps(metadata))
    return folder


def _layer_scoped(weights: list[dict]) -> list[dict]:
    """The converter's weight entries, named ``layer/weight`` as tfjs-layers names them.

    The converter names Keras 3 weights by their HDF5 path, which starts with the model's name in
    a Sequential (``sequential/dense/kernel``) and with the inner model's in a nested one; tfjs-layers
    scopes a weight by its own layer only.
    """
    renamed = [{**w, "name": "/".join(w["name"].split("/")[-2:])} for w in weights]
    names = [w["name"] for w in renamed]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise ValueError(
            f"weights {', '.join(clashes)} appear twice once scoped by layer; rename the layers"
        )
    return renamed


def _keras2_config(value):
    """Keras 3's serialised config, as Keras 2 (and so tfjs-layers) writes it."""
    if isinstance(value, list):
        return [_keras2_config(v) for v in value]
    if not isinstance(value, dict):
        return value
    if value.get("class_name") in ("DTypePolicy", "FloatDTypePolicy"):
        return value["config"]["name"]
    out = {}
    for key, item in value.items():
        if key in ("module", "registered_name"):
            continue
        if key == "batch_shape":
            key = "batch_input_shape"
        elif key == "inbound_nodes":
            item = [[[*t["config"]["keras_history"], {}] for t in _keras_tensors(node["args"])]
                    for node in item]
        elif key in ("input_layers", "output_layers"):
            # Keras 3 writes one tensor flat (["dense", 0, 0]) and dict outputs as a dict.
            item = list(item.values()) if isinstance(item, dict) else item
            item = [item] if item and isinstance(item[0], str) else item
        out[key] = _keras2_config(item)
    return out


def _keras_tensors(args) -> list[dict]:
    """The ``__keras_tensor__`` entries of a Keras 3 call's arguments, in order."""
    if isinstance(args, dict) and args.get("class_name") == "__keras_tensor__":
        return [args]
    if isinstance(args, (list, tuple)):
        return [t for arg in args for t in _keras_tensors(arg)]
    return []


def write_graph_model(model_or_savedmodel_dir, folder: Path, quantization: str | None = None, *,
                      structured_outputs: bool = False) -> Path:
    """Converts a SavedModel to a TF.js graph model, as ``tensorflowjs_converter
    --input_format tf_saved_model`` does (``serving_default``, the converter's defaults).

    Args:
        model_or_savedmodel_dir: a SavedModel folder, or a Keras 3 model, exported first with
            ``model.export`` (its signature input is keyed by the Input's name, a single output
            ``output_0``, dict outputs by their keys).
        folder: the graph model's folder (``model.json`` + ``group1-shard*``).
        quantization: None (float32 weights) or one of :data:`QUANTIZATIONS`, as
            ``--quantize_float16`` etc. (every weight).
        structured_outputs: ``--use_structured_outputs_names``: keeps the signature keys of
            outputs of equal shape, which otherwise get tensor names (``Identity:0``).

    Returns:
        ``folder``.

    Raises:
        ValueError: ``quantization`` is not one of :data:`QUANTIZATIONS`.
    """
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ValueError(
            f"quantization must be one of {', '.join(QUANTIZATIONS)} or None, got {quantization!r}"
        )
    os.environ.setdefault("TFDF_DISABLE_WELCOME_MESSAGE", "1")
    from tensorflowjs.converters.tf_saved_model_conversion_v2 import convert_tf_saved_model

    with tempfile.TemporaryDirectory(prefix="edgepipe-savedmodel-") as tmp:
        saved = model_or_savedmodel_dir
        if not isinstance(saved, (str, os.PathLike)):
            saved = Path(tmp) / "saved_model"
            model_or_savedmodel_dir.export(str(saved), verbose=False)
        convert_tf_saved_model(
            str(saved),
            str(folder),
            quantization_dtype_map={quantization: True} if quantization else None,
            use_structured_outputs_names=structured_outputs,
        )
    return Path(folder)

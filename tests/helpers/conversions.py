"""Models converted the way other tools convert them, for ``edgepipe check`` and ``classify``.

A tiny Keras classifier trained on the colour world (so a channel swap or a wrong normalisation
moves its answers), converted with plain ``tf.lite.TFLiteConverter`` and ``tensorflowjs``'s
converter, with Model Maker's TFLite metadata and with Teachable Machine's layout; and the poets
graph in ``../shared`` converted with ``TFLiteConverter.from_frozen_graph``, as its README advised.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from tests.helpers.world import SHARED, TINY_SIZE

POETS_GRAPH = SHARED / "graphs" / "poets_retrained_mobilenet_v1_1.0_224.pb"
# The check world: red and blue tell a channel swap, black and white a wrong normalisation (both are
# grey to a model fed [0, 1] or raw pixels instead of [-1, 1]).
CHECK_COLOURS = {"black": (25, 25, 25), "blue": (50, 70, 210), "red": (200, 40, 40), "white": (230, 230, 230)}
COLOUR_LABELS = sorted(CHECK_COLOURS)  # the class folders, as edgepipe names them


def check_world(root: Path, per_class: int = 12, seed: int = 0) -> Path:
    """``root/<colour>/*.png``: :data:`CHECK_COLOURS` with noise (tests/helpers/world.py)."""
    from tests.helpers.world import make_image_folders

    return make_image_folders(root, per_class=per_class, seed=seed, colours=CHECK_COLOURS)


def colour_images(folder: Path, size: int = TINY_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """The colour world's images as [-1, 1] floats at ``size`` and their labels (COLOUR_LABELS order)."""
    from PIL import Image

    from pipeline.dataset import normalise_class_name

    xs, ys = [], []
    for sub in sorted(Path(folder).iterdir()):
        label = COLOUR_LABELS.index(normalise_class_name(sub.name))
        for f in sorted(sub.iterdir()):
            img = np.asarray(Image.open(f).convert("RGB").resize((size, size), Image.BILINEAR), np.float32)
            xs.append((img - 127.5) / 127.5)
            ys.append(label)
    return np.stack(xs), np.array(ys)


def trained_colour_classifier(images: Path, seed: int = 0):
    """helpers.tfjs_models' tiny classifier, trained a few seconds on the colour world: it takes
    RGB normalised to [-1, 1] and tells red from blue, so feeding it BGR or [0, 1] changes answers."""
    import keras

    from tests.helpers.tfjs_models import keras_classifier

    x, y = colour_images(images)
    keras.utils.set_random_seed(seed)
    model = keras_classifier(TINY_SIZE, len(COLOUR_LABELS), seed)
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="sparse_categorical_crossentropy")
    model.fit(x, y, epochs=40, batch_size=16, verbose=0)
    return model


def channels_swapped(model):
    """The same classifier with a BGR flip baked in front: a conversion that swapped channels."""
    import keras

    inp = keras.Input((TINY_SIZE, TINY_SIZE, 3), name="image")
    flipped = keras.layers.Lambda(lambda t: t[..., ::-1], name="bgr")(inp)
    return keras.Model(inp, model(flipped), name="swapped")


def tflite_from_keras(model, path: Path, mode: str = "float32", calibration: np.ndarray | None = None) -> Path:
    """``TFLiteConverter.from_keras_model`` as a user runs it: ``float32``, ``float16``,
    ``dynamic``, ``int8`` (float I/O) or ``uint8`` (integer-only, uint8 I/O)."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    _set_mode(converter, mode, calibration)
    Path(path).write_bytes(converter.convert())
    return Path(path)


def _set_mode(converter, mode: str, calibration: np.ndarray | None) -> None:
    import tensorflow as tf

    if mode == "float32":
        return
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "float16":
        converter.target_spec.supported_types = [tf.float16]
    elif mode in ("int8", "uint8"):
        converter.representative_dataset = lambda: ([x[None]] for x in calibration)
        if mode == "uint8":
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            converter.inference_input_type = converter.inference_output_type = tf.uint8


def model_maker_style(tflite: Path, out: Path, labels: Sequence[str], mean: float = 127.5, std: float = 127.5) -> Path:
    """The file with TFLite metadata as Model Maker writes it: NormalizationOptions ``mean``/``std``
    (the app normalises) and a TENSOR_AXIS_LABELS file."""
    from pipeline.metadata import with_metadata

    data = with_metadata(Path(tflite).read_bytes(), list(labels), {"size": TINY_SIZE}, "image classifier",
                         "made with Model Maker (simulated)", normalization=(mean, std))
    Path(out).write_bytes(data)
    return Path(out)


def poets_tflite(path: Path, mode: str, calibration_images: Sequence[Path] = ()) -> Path:
    """The poets graph through ``TFLiteConverter.from_frozen_graph`` (``input`` → ``final_result``),
    calibrated for int8 on ``calibration_images`` normalised as the graph expects."""
    import tensorflow as tf
    from PIL import Image

    converter = tf.compat.v1.lite.TFLiteConverter.from_frozen_graph(
        str(POETS_GRAPH), input_arrays=["input"], output_arrays=["final_result"])
    x = np.stack([(np.asarray(Image.open(f).convert("RGB").resize((224, 224), Image.BILINEAR), np.float32) - 127.5)
                  / 127.5 for f in calibration_images]) if calibration_images else None
    _set_mode(converter, mode, x)
    Path(path).write_bytes(converter.convert())
    return Path(path)


def poets_savedmodel(folder: Path) -> Path:
    """The poets graph as a TF1 SavedModel (``simple_save`` of the imported graph, ``input`` →
    ``final_result``), the way a 2018 user handed it to ``tensorflowjs_converter``."""
    import tensorflow as tf

    from pipeline.graph import load_graph_def

    graph = tf.Graph()
    with graph.as_default(), tf.compat.v1.Session(graph=graph) as sess:
        tf.graph_util.import_graph_def(load_graph_def(POETS_GRAPH), name="")
        tf.compat.v1.saved_model.simple_save(sess, str(folder), inputs={"input": graph.get_tensor_by_name("input:0")},
                                             outputs={"final_result": graph.get_tensor_by_name("final_result:0")})
    return Path(folder)

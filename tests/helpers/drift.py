"""A model built to drift in int8, for the repair's and bias correction's tests: one convolution
whose every output channel has an outlier weight on an input channel that is always zero. In float
the outlier costs nothing; in int8 each channel's weight scale is set by it, so the channel's real
weights round to zero."""
from __future__ import annotations

from pathlib import Path

from pipeline.types import Preprocessing

SIZE = 32
PREP = Preprocessing(size=SIZE, mean=127.5, std=127.5)
DRIFTING = "drifting_conv"


def drifting_savedmodel(folder: Path, classes: int = 4) -> Path:
    """A SavedModel (0..255 pixels in, ``classes`` probabilities out) whose layer ``drifting_conv`` drifts in int8."""
    import tensorflow as tf

    tf.keras.utils.set_random_seed(0)
    inp = tf.keras.Input((SIZE, SIZE, 3))
    x = tf.keras.layers.Rescaling(1 / 127.5, offset=-1)(inp)
    first = tf.keras.layers.Conv2D(8, 3, activation="relu", name="first_conv")
    x = first(x)
    drifting = tf.keras.layers.Conv2D(16, 3, activation="relu", name=DRIFTING)
    x = drifting(x)
    x = tf.keras.layers.Conv2D(16, 3, activation="relu", name="third_conv")(x)
    x = tf.keras.layers.GlobalAveragePooling2D()(x)
    out = tf.keras.layers.Dense(classes, activation="softmax", name="head")(x)
    model = tf.keras.Model(inp, out)
    w, b = first.get_weights()
    b[7] = -1e4  # channel 7 of the first conv is always 0 after its ReLU
    first.set_weights([w, b])
    w, b = drifting.get_weights()
    w[:, :, 7, :] = 300.0  # the outlier weights, on the dead channel: harmless in float
    drifting.set_weights([w, b])
    head_w, head_b = model.get_layer("head").get_weights()
    model.get_layer("head").set_weights([head_w * 20, head_b])  # confident enough to have a top-1 to keep
    # The export stage's contract: serving_default takes ``images`` and gives ``probabilities``.
    module = tf.Module()
    module.model = model
    module.serve = tf.function(lambda images: {"probabilities": model(images)},
                               input_signature=[tf.TensorSpec([None, SIZE, SIZE, 3], tf.float32, name="images")])
    tf.saved_model.save(module, str(folder), signatures={"serving_default": module.serve})
    return folder

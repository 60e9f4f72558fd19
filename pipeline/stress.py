"""How apps get preprocessing wrong, and what each mistake costs.

An :class:`AppPreprocessing` describes how a deploying app turns a decoded photo into the model's
input. The contract (``export/preprocessing.json``) is RGB, bilinear resize without antialias, no
crop, float 0..255. ``edgepipe verify --stress`` runs the reference model with each usual mistake
(:data:`MISTAKES`) and reports how far accuracy and agreement move; ``--app-preprocessing`` makes
verify feed every converted model the way a given app does, so a wrong app fails the gates and the
report names the setting that differs from the contract.
"""
from __future__ import annotations

import numpy as np

from pipeline.config import AppPreprocessing, parse_app_preprocessing  # noqa: F401 (re-exported)
from pipeline.images import resize
from pipeline.types import ChannelOrder, Preprocessing, ResizeMethod, ValueRange

MISTAKES: dict[str, AppPreprocessing] = {
    "BGR channel order": AppPreprocessing(channel_order=ChannelOrder.BGR),
    "[0,1] input": AppPreprocessing(value_range=ValueRange.UNIT),
    "double normalisation ([-1,1] input)": AppPreprocessing(value_range=ValueRange.SIGNED),
    "nearest-neighbour resize": AppPreprocessing(resize=ResizeMethod.NEAREST),
    "bicubic resize": AppPreprocessing(resize=ResizeMethod.BICUBIC),
    "area resize": AppPreprocessing(resize=ResizeMethod.AREA),
    "antialiased bilinear resize": AppPreprocessing(antialias=True),
    "centre crop 87.5%": AppPreprocessing(crop=0.875),
}


def prepare(rgb: np.ndarray, contract: Preprocessing, app: AppPreprocessing) -> np.ndarray:
    """A decoded uint8 RGB photo → the float32 ``[size, size, 3]`` input that ``app`` would feed."""
    import tensorflow as tf

    if app.crop < 1.0:
        h, w = rgb.shape[:2]
        ch, cw = max(1, int(round(h * app.crop))), max(1, int(round(w * app.crop)))
        top, left = (h - ch) // 2, (w - cw) // 2
        rgb = rgb[top:top + ch, left:left + cw]
    if app.resize is ResizeMethod.BILINEAR and not app.antialias:
        x = resize(rgb, contract)  # the contract's own code path
    else:
        x = tf.image.resize(tf.cast(rgb, tf.float32), (contract.size, contract.size),
                            method=app.resize, antialias=app.antialias).numpy()
        x = np.clip(x, 0, 255)  # bicubic/lanczos overshoot; an app storing bytes would clip
    if app.channel_order is ChannelOrder.BGR:
        x = x[..., ::-1]
    if app.value_range is ValueRange.UNIT:
        x = x / 255.0
    elif app.value_range is ValueRange.SIGNED:
        x = (x - 127.5) / 127.5
    return np.ascontiguousarray(x, dtype=np.float32)


def prepare_batch(rgbs: list[np.ndarray], contract: Preprocessing, app: AppPreprocessing) -> np.ndarray:
    return np.stack([prepare(r, contract, app) for r in rgbs]) if rgbs else np.zeros(
        (0, contract.size, contract.size, 3), np.float32)

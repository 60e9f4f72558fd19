"""How apps get preprocessing wrong, and what each mistake costs.

An :class:`AppPreprocessing` describes how a deploying app turns a decoded photo into the model's
input. The contract (``export/preprocessing.json``) is RGB, bilinear resize without antialias, no
crop, float 0..255. ``edgepipe verify --stress`` runs the reference model with each usual mistake
(:data:`MISTAKES`) and reports how far accuracy and agreement move; ``--app-preprocessing`` makes
verify feed every converted model the way a given app does, so a wrong app fails the gates and the
report names the setting that differs from the contract.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from pipeline.errors import ConfigError
from pipeline.images import resize
from pipeline.types import Preprocessing

RANGES = ("0-255", "0-1", "-1-1")
RESIZES = ("bilinear", "nearest", "bicubic", "area", "lanczos3")


@dataclass(frozen=True)
class AppPreprocessing:
    """One way of preparing pixels. The defaults are the contract.

    Attributes:
        channel_order: "RGB" (contract) or "BGR" (OpenCV's default order).
        value_range: what the app feeds: "0-255" (contract), "0-1" (divided by 255) or "-1-1"
            (normalised by the app although the model normalises again: double normalisation).
        resize: tf.image resize method; "bilinear" is the contract.
        antialias: the contract has none; Pillow and browsers' canvas scaling antialias.
        crop: central fraction kept before the resize; 1.0 (no crop) is the contract, 0.875 is
            the Inception-style centre crop.
    """

    channel_order: str = "RGB"
    value_range: str = "0-255"
    resize: str = "bilinear"
    antialias: bool = False
    crop: float = 1.0

    def differences(self) -> list[str]:
        """Human-readable settings that differ from the contract."""
        contract = AppPreprocessing()
        out = []
        for f in dataclasses.fields(self):
            mine, theirs = getattr(self, f.name), getattr(contract, f.name)
            if mine != theirs:
                out.append(f"{f.name.replace('_', ' ')} {mine} (contract: {theirs})")
        return out

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


MISTAKES: dict[str, AppPreprocessing] = {
    "BGR channel order": AppPreprocessing(channel_order="BGR"),
    "[0,1] input": AppPreprocessing(value_range="0-1"),
    "double normalisation ([-1,1] input)": AppPreprocessing(value_range="-1-1"),
    "nearest-neighbour resize": AppPreprocessing(resize="nearest"),
    "bicubic resize": AppPreprocessing(resize="bicubic"),
    "area resize": AppPreprocessing(resize="area"),
    "antialiased bilinear resize": AppPreprocessing(antialias=True),
    "centre crop 87.5%": AppPreprocessing(crop=0.875),
}


def parse_app_preprocessing(items: list[str]) -> AppPreprocessing:
    """``["channel_order=BGR", "crop=0.875"]`` → AppPreprocessing.

    Raises:
        ConfigError: unknown key or value (all problems in one message).
    """
    values: dict = {}
    problems = []
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep:
            problems.append(f"--app-preprocessing {item!r}: expected KEY=VALUE")
        elif key == "channel_order" and value.upper() in ("RGB", "BGR"):
            values[key] = value.upper()
        elif key == "value_range" and value in RANGES:
            values[key] = value
        elif key == "resize" and value in RESIZES:
            values[key] = value
        elif key == "antialias" and value.lower() in ("true", "false"):
            values[key] = value.lower() == "true"
        elif key == "crop" and _fraction(value):
            values[key] = float(value)
        else:
            problems.append(
                f"--app-preprocessing {item!r}: use channel_order=RGB|BGR, value_range={'|'.join(RANGES)}, "
                f"resize={'|'.join(RESIZES)}, antialias=true|false or crop=FRACTION in (0,1]"
            )
    if problems:
        raise ConfigError("; ".join(problems))
    return AppPreprocessing(**values)


def _fraction(value: str) -> bool:
    try:
        return 0 < float(value) <= 1
    except ValueError:
        return False


def prepare(rgb: np.ndarray, contract: Preprocessing, app: AppPreprocessing) -> np.ndarray:
    """A decoded uint8 RGB photo → the float32 ``[size, size, 3]`` input that ``app`` would feed."""
    import tensorflow as tf

    if app.crop < 1.0:
        h, w = rgb.shape[:2]
        ch, cw = max(1, int(round(h * app.crop))), max(1, int(round(w * app.crop)))
        top, left = (h - ch) // 2, (w - cw) // 2
        rgb = rgb[top:top + ch, left:left + cw]
    if app.resize == "bilinear" and not app.antialias:
        x = resize(rgb, contract)  # the contract's own code path
    else:
        x = tf.image.resize(tf.cast(rgb, tf.float32), (contract.size, contract.size),
                            method=app.resize, antialias=app.antialias).numpy()
        x = np.clip(x, 0, 255)  # bicubic/lanczos overshoot; an app storing bytes would clip
    if app.channel_order == "BGR":
        x = x[..., ::-1]
    if app.value_range == "0-1":
        x = x / 255.0
    elif app.value_range == "-1-1":
        x = (x - 127.5) / 127.5
    return np.ascontiguousarray(x, dtype=np.float32)


def prepare_batch(rgbs: list[np.ndarray], contract: Preprocessing, app: AppPreprocessing) -> np.ndarray:
    return np.stack([prepare(r, contract, app) for r in rgbs]) if rgbs else np.zeros(
        (0, contract.size, contract.size, 3), np.float32)

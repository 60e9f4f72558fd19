"""Image augmentation whose results can be cached.

tensorflow-for-poets disabled its bottleneck cache as soon as any distortion was asked for and ran
the backbone on every step. Here each training image gets a fixed number of augmented copies, each
a deterministic function of (image content, copy index, augmentation settings), so their
bottlenecks are cached like the plain ones and a second run computes nothing.
"""
from __future__ import annotations

import hashlib

import numpy as np

from pipeline.config import AugmentConfig
from pipeline.images import decode_rgb
from pipeline.types import Preprocessing


def augmented_image(data: bytes, prep: Preprocessing, cfg: AugmentConfig, image_sha: str, copy: int,
                    source: str = "<bytes>") -> np.ndarray:
    """One augmented copy as the models' input (float32 ``[size, size, 3]`` in 0..255)."""
    import tensorflow as tf

    seed = int.from_bytes(hashlib.sha256(f"{image_sha}:{copy}:{cfg.key()}".encode()).digest()[:8], "little")
    rng = np.random.default_rng(seed)
    rgb = decode_rgb(data, source)
    size = prep.size
    grow = (1 + cfg.crop / 100) * (1 + rng.uniform(0, cfg.scale / 100))
    big = max(size, int(round(size * grow)))
    x = tf.image.resize(tf.cast(rgb, tf.float32), (big, big), method=prep.resize_method,
                        antialias=prep.antialias).numpy()
    top, left = rng.integers(0, big - size + 1, size=2)
    x = x[top:top + size, left:left + size]
    if cfg.flip and rng.random() < 0.5:
        x = x[:, ::-1]
    if cfg.brightness:
        x = x * rng.uniform(1 - cfg.brightness / 100, 1 + cfg.brightness / 100)
    return np.clip(x, 0, 255).astype(np.float32)

"""Decoding and resizing photos, the same way for training, calibration and verification.

Every stage gets pixels from :func:`load_image`, so the preprocessing contract (RGB, bilinear
resize without antialias, float32 in 0..255) cannot drift between training and the exported
models. Normalisation (mean/std) happens inside the models, never here.
"""
from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageOps

from pipeline.types import Preprocessing

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"})


class ImageError(ValueError):
    """An image that cannot be decoded; carries the reason for the skip list."""


def decode_rgb(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Decodes image bytes to uint8 RGB ``[H, W, 3]``.

    EXIF orientation is applied and grayscale, palette, CMYK and alpha images are converted to RGB,
    as phones and browsers display them. GIFs give their first frame.

    Raises:
        ImageError: the bytes are not a readable image.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.seek(0)
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                # 16-bit PNGs: scale to 8 bits rather than clipping everything to white.
                arr = np.asarray(im, dtype=np.float64)
                im = Image.fromarray((arr / max(arr.max(), 1) * 255).astype(np.uint8))
            rgb = im.convert("RGB")
            arr = np.asarray(rgb, dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as err:
        raise ImageError(f"{source}: not a readable image ({err})") from None
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ImageError(f"{source}: unexpected decoded shape {arr.shape}")
    return arr


_resize_fns: dict[tuple, object] = {}


def _resize_fn(prep: Preprocessing):
    # One traced function per (size, method): tf.function retracing per image shape would cost
    # more than the resize itself.
    key = (prep.size, prep.resize_method, prep.antialias)
    if key not in _resize_fns:
        import tensorflow as tf

        @tf.function(input_signature=[tf.TensorSpec([None, None, 3], tf.uint8)])
        def resize(img):
            out = tf.image.resize(
                tf.cast(img, tf.float32),
                (prep.size, prep.size),
                method=prep.resize_method,
                antialias=prep.antialias,
            )
            return out

        _resize_fns[key] = resize
    return _resize_fns[key]


def resize(rgb: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """Resizes uint8 RGB to float32 ``[size, size, 3]`` in 0..255 (bilinear, no antialias)."""
    return _resize_fn(prep)(rgb).numpy()


def load_image(data: bytes, prep: Preprocessing, source: str = "<bytes>") -> np.ndarray:
    """Bytes → the exported models' input: float32 RGB ``[size, size, 3]`` in 0..255."""
    return resize(decode_rgb(data, source), prep)


def load_batch(
    items: Sequence[bytes], prep: Preprocessing, sources: Sequence[str] | None = None,
    workers: int | None = None,
) -> np.ndarray:
    """Decodes and resizes many images in parallel threads (PIL and TF release the GIL).

    Raises:
        ImageError: for the first image that cannot be decoded.
    """
    sources = sources or [f"<image {i}>" for i in range(len(items))]
    workers = workers or min(8, (os.cpu_count() or 2) * 2)
    out = np.empty((len(items), prep.size, prep.size, 3), np.float32)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for i, arr in enumerate(pool.map(load_image, items, [prep] * len(items), sources)):
            out[i] = arr
    return out


def load_files(paths: Iterable[Path], prep: Preprocessing) -> np.ndarray:
    """Convenience: reads files and returns the batch (see :func:`load_batch`)."""
    paths = [Path(p) for p in paths]
    return load_batch([p.read_bytes() for p in paths], prep, [str(p) for p in paths])

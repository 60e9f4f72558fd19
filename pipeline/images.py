"""Decoding and resizing photos, the same way for training, calibration and verification.

Every stage gets pixels from :func:`load_image`, so the preprocessing contract (RGB, bilinear
resize without antialias, float32 in 0..255) cannot drift between training and the exported
models. Normalisation (mean/std) happens inside the models, never here.
"""
from __future__ import annotations

import errno
import functools
import io
import os
import re
import stat
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import ExifTags, Image, ImageOps

from pipeline.types import Preprocessing

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"})
# Decoding is refused above this many pixels: it covers 50 MP phone photos (8160x6144) and 61 MP
# full-frame cameras, while a decompression bomb (a 30000x30000 PNG of one colour is a few hundred
# KB on disk and 2.7 GB decoded) is stopped after reading its header.
MAX_PIXELS = 64_000_000
# PIL warns from 89 MP on; every such image is refused here with a clearer message anyway.
warnings.simplefilter("ignore", Image.DecompressionBombWarning)


class ImageError(ValueError):
    """An image that cannot be decoded or read; ``reason`` is the message without the file name."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason or message


def reason_of(err: Exception) -> str:
    """Why an image was skipped, without its file name: an :class:`ImageError`'s reason, or an
    ``OSError``'s ``cannot read (...)``."""
    if isinstance(err, ImageError):
        return err.reason
    return f"cannot read ({getattr(err, 'strerror', None) or err})"


def _too_big(pixels: int, dims: str = "") -> str:
    return (f"{dims or f'{pixels:,} pixels'} ({pixels / 1e6:.1f} MP) is over the {MAX_PIXELS / 1e6:.0f} MP "
            "limit; not decoded (a decompression bomb?)")


def read_image_file(path: Path | str) -> bytes:
    """The bytes of an image file, refusing what is not a regular file; a URL (``gs://``, ``s3://``)
    is read through Beam's filesystems (:mod:`pipeline.storage`).

    A FIFO or device named ``*.jpg`` would block or never end, so the file is opened without
    blocking and checked before reading.

    Raises:
        ImageError: a dangling symlink, symlink loop, FIFO/device, unreadable or empty file.
    """
    path = str(path)
    if "://" in path:  # a URL on a Beam filesystem (pipeline.storage)
        import pipeline.storage as storage

        try:
            data = storage.read(path)
        except OSError as err:
            why = f"cannot read ({str(err).removeprefix(path + ': ')})"
            raise ImageError(f"{path}: {why}", why) from None
        if not data:
            raise ImageError(f"{path}: empty file (0 bytes)", "empty file (0 bytes)")
        return data
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as err:
        if os.path.islink(path) and not os.path.exists(path):
            why = "symlink loop" if err.errno == errno.ELOOP else f"dangling symlink to {os.readlink(path)}"
        else:
            why = f"cannot read ({err.strerror or err})"
        raise ImageError(f"{path}: {why}", why) from None
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a FIFO" if stat.S_ISFIFO(mode) else "a device or socket"
            why = f"{kind}, not a regular file"
            raise ImageError(f"{path}: {why}", why)
        data = f.read()
    if not data:
        raise ImageError(f"{path}: empty file (0 bytes)", "empty file (0 bytes)")
    return data


def decode_rgb(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Decodes image bytes to uint8 RGB ``[H, W, 3]``.

    EXIF orientation is applied and grayscale, palette, CMYK and alpha images are converted to RGB,
    as phones and browsers display them. GIFs give their first frame.

    Raises:
        ImageError: the bytes are not a readable image.
    """
    def refuse(why: str) -> ImageError:
        return ImageError(f"{source}: {why}", why)

    if not data:
        raise refuse("empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            if width * height > MAX_PIXELS:
                raise refuse(_too_big(width * height, f"{width}x{height} pixels"))
            im.seek(0)
            fast = _decode_jpeg_fast(im, data)
            if fast is not None:
                return fast
            # In place: the default returns a copy even when there is nothing to rotate.
            ImageOps.exif_transpose(im, in_place=True)
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                # 16-bit greyscale PNGs: 0..65535 → 0..255 as browsers show them (not clipped to
                # white, and not stretched to the image's own maximum).
                arr = np.asarray(im, dtype=np.float64)
                im = Image.fromarray(np.clip(np.round(arr / 257.0), 0, 255).astype(np.uint8))
            rgb = im if im.mode == "RGB" else im.convert("RGB")
            # No dtype argument: with one, numpy converts through a much slower path (~0.1 ms).
            arr = np.asarray(rgb)
    except ImageError:
        raise
    except Image.DecompressionBombError as err:
        # PIL refuses the largest ones while reading the header, before our check sees the size.
        found = re.search(r"\((\d+) pixels\)", str(err))
        raise refuse(_too_big(int(found.group(1))) if found else f"not decoded ({err})") from None
    except Image.UnidentifiedImageError:
        raise refuse(f"not an image in a known format (the file starts with {data[:8]!r})") from None
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        raise refuse(f"not a readable image ({err})") from None
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise refuse(f"unexpected decoded shape {arr.shape}")
    return arr


@functools.cache
def _opencv():
    """OpenCV (installed with mediapipe), or None: its JPEG decoder is only a faster path."""
    try:
        import cv2
    except ImportError:
        return None
    return cv2 if hasattr(cv2, "IMREAD_COLOR_RGB") else None


def _decode_jpeg_fast(im: Image.Image, data: bytes) -> np.ndarray | None:
    """The pixels PIL would give, decoded by OpenCV's libjpeg-turbo in half PIL's time; or None.

    Both call libjpeg-turbo with its defaults (ISLOW IDCT, fancy upsampling, its own YCbCr and
    greyscale to RGB), so baseline and progressive YCbCr or greyscale JPEGs come out identical;
    ``tests/test_bottlenecks.py`` checks it on every subsampling. PIL's path stays for what the two
    treat differently: CMYK and YCCK (PIL's conversion), EXIF rotations (done by PIL here),
    MPO, and a file that does not end in an EOI marker (PIL refuses a truncated file, libjpeg
    would pad it with grey).
    """
    if im.format != "JPEG" or im.mode not in ("RGB", "L"):
        return None
    if im.getexif().get(ExifTags.Base.Orientation, 1) in range(2, 9):
        return None
    # The end marker, allowing a little padding after it (some writers and copies add zeros).
    if data.rfind(b"\xff\xd9", max(0, len(data) - 64)) < 0:
        return None
    cv2 = _opencv()
    if cv2 is None:
        return None
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION)
    if arr is None or arr.shape != (im.height, im.width, 3):
        return None
    return arr


@functools.lru_cache(maxsize=1024)
def _bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TensorFlow's ResizeBilinear sample positions (half-pixel centres), in its float32 steps:
    the lower and upper source index and the weight of the upper one, per output index."""
    scale = np.float32(in_size) / np.float32(out_size)
    pos = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    floor = np.floor(pos)
    lower = np.maximum(floor.astype(np.intp), 0)
    upper = np.minimum(np.ceil(pos).astype(np.intp), in_size - 1)
    return _frozen(lower), _frozen(upper), _frozen(pos - floor)


@functools.lru_cache(maxsize=1024)
def _column_taps(width: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_bilinear_taps` along a row of RGB pixels viewed flat (``x * 3 + channel``)."""
    lower, upper, lerp = _bilinear_taps(width, size)
    channel = np.arange(3)
    return (_frozen((lower[:, None] * 3 + channel).ravel()), _frozen((upper[:, None] * 3 + channel).ravel()),
            _frozen(np.repeat(lerp, 3)))


def _frozen(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False  # shared by every image of that size
    return a


def _resize_bilinear(rgb: np.ndarray, size: int) -> np.ndarray:
    """``tf.image.resize(bilinear, antialias=False)`` of uint8 RGB, bit for bit, in numpy.

    TensorFlow's CPU kernel computes each output as ``top + (bottom - top) * y_lerp`` with
    ``top = left + (right - left) * x_lerp`` in float32 without fused multiply-adds (its SSE path
    and its scalar one alike); the same float32 operations in the same order, a pass along the
    rows and then one down the columns, give the same values for a third of the time of a TF call.
    """
    height, width = rgb.shape[:2]
    ylo, yhi, ylerp = _bilinear_taps(height, size)
    left_cols, right_cols, xlerp = _column_taps(width, size)
    flat = rgb.reshape(height, width * 3)
    if height > 2 * size:  # a large photo: only the rows that are sampled
        rows, inverse = np.unique(np.concatenate([ylo, yhi]), return_inverse=True)
        flat, ylo, yhi = flat[rows], inverse[:size], inverse[size:]
    # np.take keeps the result contiguous (fancy indexing on axis 1 does not).
    left = np.take(flat, left_cols, axis=1).astype(np.float32)
    across = np.take(flat, right_cols, axis=1).astype(np.float32)
    across -= left
    across *= xlerp
    across += left
    top = np.take(across, ylo, axis=0)
    out = np.take(across, yhi, axis=0)
    out -= top
    out *= ylerp[:, None]
    out += top
    return out.reshape(size, size, 3)


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


def _resize_is_identity(rgb: np.ndarray, prep: Preprocessing) -> bool:
    # Half-pixel-centre bilinear at scale 1 samples every pixel exactly: the result is the input,
    # so the TF call (about 1 ms per image, a third of extraction time) can be skipped.
    return rgb.shape[0] == rgb.shape[1] == prep.size and prep.resize_method == "bilinear"


def resize(rgb: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """Resizes uint8 RGB to float32 ``[size, size, 3]`` in 0..255 (bilinear, no antialias)."""
    if _resize_is_identity(rgb, prep):
        return rgb.astype(np.float32)
    if prep.resize_method == "bilinear" and not prep.antialias:
        return _resize_bilinear(rgb, prep.size)
    return _resize_fn(prep)(rgb).numpy()


def load_image(data: bytes, prep: Preprocessing, source: str = "<bytes>") -> np.ndarray:
    """Bytes → the exported models' input: float32 RGB ``[size, size, 3]`` in 0..255."""
    return resize(decode_rgb(data, source), prep)


def load_pixels(data: bytes, prep: Preprocessing, source: str = "<bytes>") -> np.ndarray:
    """:func:`load_image`, except that an image already at the model's size stays uint8.

    The values are the same; a consumer that copies pixels into a float32 input buffer anyway
    (the LiteRT feature extractor) saves a 600 KB allocation and a pass over it per image.
    """
    rgb = decode_rgb(data, source)
    return rgb if _resize_is_identity(rgb, prep) else resize(rgb, prep)


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
    """Convenience: reads files (or URLs, see :func:`read_image_file`) and returns the batch (see
    :func:`load_batch`)."""
    paths = [str(p) for p in paths]
    return load_batch([read_image_file(p) for p in paths], prep, paths)

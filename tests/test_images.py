import io

import numpy as np
import pytest
from PIL import Image

from pipeline.images import ImageError, decode_rgb, load_image
from pipeline.types import Preprocessing


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P"])
def test_every_mode_becomes_rgb(mode):
    im = Image.new("RGB", (10, 6), (200, 100, 50)).convert(mode)
    fmt = "JPEG" if mode in ("L", "CMYK") else "PNG"
    arr = decode_rgb(_encode(im, fmt))
    assert arr.shape == (6, 10, 3) and arr.dtype == np.uint8


def test_exif_orientation_is_applied():
    im = Image.new("RGB", (20, 10), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    arr = decode_rgb(_encode(im, "JPEG", exif=exif))
    assert arr.shape[:2] == (20, 10)


def test_garbage_names_the_source():
    with pytest.raises(ImageError, match="photo.jpg"):
        decode_rgb(b"this is text, not a jpeg", "photo.jpg")


def test_load_image_is_float_0_255_at_model_size():
    im = Image.new("RGB", (64, 48), (255, 0, 10))
    x = load_image(_encode(im, "PNG"), Preprocessing(size=32))
    assert x.shape == (32, 32, 3) and x.dtype == np.float32
    np.testing.assert_allclose(x[0, 0], [255, 0, 10], atol=1e-3)

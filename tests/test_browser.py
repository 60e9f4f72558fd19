"""The demo page every TF.js bundle carries (index.html), in real headless Chromium.

The page of the session chain's float32 bundle (the tiny graph) decodes the holdout PNGs itself,
resizes them in tfjs and must agree with the reference SavedModel (``verify/reference.npz``). Chromium comes from
`make browser` (part of `make test`); a missing browser fails these tests rather than skipping them, as an untested page
would otherwise look tested. `pytest tests/test_browser.py --basetemp DIR` keeps the page's
screenshot in DIR/screenshot0/ (the source of docs/tfjs-demo-page.png).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.images import decode_rgb, load_image, read_image_file
from pipeline.runners.base import RuntimeFailed
from pipeline.runners.browser import PageRun, classify_in_page
from pipeline.types import Preprocessing
from pipeline.web import TFJS_LIBRARY
from tests.helpers.world import TINY_SIZE

pytestmark = pytest.mark.chain

# The page decodes lossless PNGs and resizes in float32 like TensorFlow: measured |Δp| ~1e-7. A
# contract break costs more: align_corners resizing moves these probabilities by ~6e-5, antialias
# by ~1e-4 (test_the_tolerance_catches_a_wrong_resize keeps this bound honest).
MAX_ABS_DIFF = 1e-5
MIN_AGREEMENT = 0.99


@pytest.fixture(scope="module")
def tiny_chain(session_chain) -> Path:
    return session_chain.out


@pytest.fixture(scope="module")
def holdout_page(tiny_chain, browser_ready, tmp_path_factory) -> tuple[PageRun, Path]:
    report = json.loads((tiny_chain / "report.json").read_text())
    shot = tmp_path_factory.mktemp("screenshot") / "tfjs-demo-page.png"
    page = classify_in_page(tiny_chain / "tfjs" / "float32", [Path(p) for p in report["test_images"]], shot)
    return page, shot


def _savedmodel_probabilities(run: Path, batch: np.ndarray) -> np.ndarray:
    import tensorflow as tf

    serve = tf.saved_model.load(str(run / "export" / "savedmodel")).signatures["serving_default"]
    return serve(images=tf.constant(batch, tf.float32))["probabilities"].numpy()


def test_every_bundle_carries_the_page_and_tfjs(tiny_chain):
    bundle = tiny_chain / "tfjs" / "float32"
    assert "window.edgepipe" in (bundle / "index.html").read_text()
    assert (bundle / "tf.min.js").read_bytes() == TFJS_LIBRARY.read_bytes()
    # The report's size is the model's, not the page's 1.5 MB of tfjs.
    row = next(r for r in json.loads((tiny_chain / "report.json").read_text())["results"]
               if r["artifact"] == "tfjs-float32")
    model_files = [bundle / "model.json", *bundle.glob("*.bin")]
    assert row["size_bytes"] == sum(p.stat().st_size for p in model_files)


@pytest.mark.browser
def test_page_agrees_with_the_reference_savedmodel(tiny_chain, holdout_page):
    page, _ = holdout_page
    report = json.loads((tiny_chain / "report.json").read_text())
    reference = np.load(tiny_chain / "verify" / "reference.npz")["probabilities"]
    assert page.labels == report["classes"]
    assert page.tfjs == "4.22.0"
    assert page.probabilities.shape == reference.shape == (18, 3)
    agreement = float(np.mean(page.probabilities.argmax(1) == reference.argmax(1)))
    max_diff = float(np.abs(page.probabilities - reference).max())
    assert agreement >= MIN_AGREEMENT, (agreement, page.backend)
    assert max_diff < MAX_ABS_DIFF, (max_diff, page.backend)
    # Offline: tfjs, model.json and shards all come from the bundle folder.
    assert page.blocked_requests == [] and page.page_errors == []


@pytest.mark.browser
def test_file_picker_shows_the_api_result_and_screenshots(holdout_page):
    page, shot = holdout_page
    labels = page.labels
    expected = sorted(zip(labels, page.probabilities[0].tolist()), key=lambda t: -t[1])
    assert [s["label"] for s in page.shown] == [label for label, _ in expected]
    np.testing.assert_allclose([s["probability"] for s in page.shown], [p for _, p in expected], atol=1e-6)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(shot) as im:
        assert im.width == 900 and im.height >= 600
        # Text, bars and the noisy preview: far more than a blank or single-colour page.
        assert len(im.convert("RGB").getcolors(maxcolors=1 << 20)) > 200


def _odd_images(folder: Path) -> list[Path]:
    """Shapes and formats the holdout PNGs do not cover; colours between the classes, so the
    probabilities are not saturated and a drift shows in them."""
    rng = np.random.default_rng(7)

    def noisy(w: int, h: int, rgb=(125, 110, 110)) -> Image.Image:
        return Image.fromarray(np.clip(np.array(rgb) + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8))

    folder.mkdir()
    noisy(57, 23).save(folder / "wide.png")                     # stretched, not cropped
    noisy(9, 13).save(folder / "upscaled.png")
    noisy(TINY_SIZE, TINY_SIZE).save(folder / "model_size.png")
    noisy(64, 48).save(folder / "photo.jpg", quality=90)
    noisy(48, 40).convert("L").save(folder / "grey.png")
    noisy(40, 40).quantize(64).save(folder / "palette.gif")
    rotated = noisy(60, 30, (120, 120, 120))
    exif = rotated.getexif()
    exif[0x0112] = 6  # EXIF orientation: rotate 90° clockwise to display
    rotated.save(folder / "rotated.jpg", exif=exif, quality=92)
    noisy(50, 50).save(folder / "lossless.webp", lossless=True)
    return sorted(folder.iterdir())


@pytest.mark.browser
def test_page_decodes_other_shapes_and_formats_like_the_pipeline(tiny_chain, browser_ready, tmp_path):
    images = _odd_images(tmp_path / "odd")
    page = classify_in_page(tiny_chain / "tfjs" / "float32", images)
    prep = Preprocessing(size=TINY_SIZE)
    batch = np.stack([load_image(read_image_file(p), prep) for p in images])
    reference = _savedmodel_probabilities(tiny_chain, batch)
    diffs = np.abs(page.probabilities - reference).max(axis=1)
    assert (diffs < MAX_ABS_DIFF).all(), dict(zip((p.name for p in images), diffs.tolist()))
    assert reference.max(axis=1).min() < 0.99  # not saturated: the comparison has something to see


def test_the_tolerance_catches_a_wrong_resize(tiny_chain):
    import tensorflow as tf

    report = json.loads((tiny_chain / "report.json").read_text())
    reference = np.load(tiny_chain / "verify" / "reference.npz")["probabilities"]
    pixels = [decode_rgb(read_image_file(p)).astype(np.float32) for p in report["test_images"]]
    size = (TINY_SIZE, TINY_SIZE)
    aligned = np.stack([tf.compat.v1.image.resize_bilinear(x[None], size, align_corners=True)[0] for x in pixels])
    assert np.abs(_savedmodel_probabilities(tiny_chain, aligned) - reference).max() > 2 * MAX_ABS_DIFF


def test_missing_chromium_says_to_run_make_browser(tiny_chain, tmp_path):
    with pytest.raises(RuntimeFailed) as caught:
        classify_in_page(tiny_chain / "tfjs" / "float32", [], chromium=tmp_path / "no-chromium")
    assert str(caught.value).endswith(
        f"Chromium not found at {tmp_path / 'no-chromium'}: run `make browser` "
        "(it installs Debian's chromium) and `make setup` (the npm packages)")


@pytest.mark.browser
def test_page_agrees_on_the_cpu_backend_too(tiny_chain, browser_ready):
    """Headless Chromium gets WebGL from SwiftShader; a browser without WebGL falls back to cpu."""
    report = json.loads((tiny_chain / "report.json").read_text())
    reference = np.load(tiny_chain / "verify" / "reference.npz")["probabilities"]
    page = classify_in_page(tiny_chain / "tfjs" / "float32", [Path(p) for p in report["test_images"]],
                            backend="cpu")
    assert page.backend == "cpu"
    assert np.abs(page.probabilities - reference).max() < MAX_ABS_DIFF

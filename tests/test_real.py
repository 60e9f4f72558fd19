"""The real MobileNet v1 graphs and photos from ../shared, reached through the mirror."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os

import pytest

from pipeline.backbone import FeatureExtractor
from pipeline.catalog import get_backbone
from pipeline.fetch import fetch
from pipeline.images import load_files
from tests.helpers.chain import run_chain
from tests.helpers.servers import serve_folder
from tests.helpers.world import FLOWERS, MIRROR, SHARED, needs_shared

pytestmark = pytest.mark.slow

# ../shared/images/GOLDEN.md: the unmodified 0.25_224 backbone's answers with correct preprocessing.
GOLDEN = [("parrot.jpg", 89, 0.964), ("bird.bmp", 20, 0.837), ("sunflower.bmp", 986, 0.970),
          ("dragonfly.bmp", 320, 0.691)]


def test_backbone_answers_match_golden(tmp_path):
    needs_shared(MIRROR)
    spec = get_backbone("mobilenet_v1_0.25_224")
    got = fetch(spec, cache_dir=tmp_path / "cache", mirror=str(MIRROR), progress=False)
    softmax = dataclasses.replace(spec, bottleneck_tensor="MobilenetV1/Predictions/Reshape_1:0", feature_size=0)
    probs = FeatureExtractor(got.graph_path, softmax)(
        load_files([SHARED / "images" / name for name, _, _ in GOLDEN], spec.preprocessing))
    for (name, index, p), row in zip(GOLDEN, probs):
        assert int(row.argmax()) == index, name
        assert abs(float(row[index]) - p) <= 0.02, (name, float(row[index]))


def test_litert_features_are_bit_identical_whatever_the_batch_and_input_dtype(tmp_path):
    """A cached feature must not depend on which batch (or how full a batch) computed it."""
    import numpy as np

    from pipeline.backbone import LiteRTFeatureExtractor
    from pipeline.images import decode_rgb

    needs_shared(MIRROR)
    needs_shared(FLOWERS)
    spec = get_backbone("mobilenet_v1_0.25_224")
    graph = fetch(spec, cache_dir=tmp_path / "cache", mirror=str(MIRROR), progress=False).graph_path
    paths = sorted((FLOWERS / "test").rglob("*.jpg"))[:7]
    pixels = [decode_rgb(p.read_bytes()) for p in paths]  # 224x224 photos: the model's size
    one = LiteRTFeatureExtractor(graph, spec, batch=1)(pixels)
    four = LiteRTFeatureExtractor(graph, spec, batch=4)
    np.testing.assert_array_equal(four(pixels), one)  # a full batch and a padded one
    np.testing.assert_array_equal(four([p.astype(np.float32) for p in pixels[::-1]]), one[::-1])
    np.testing.assert_allclose(one, FeatureExtractor(graph, spec)(np.stack(pixels)), atol=1e-4)


@pytest.mark.chain
@pytest.mark.parametrize("via", ["mirror folder", "local HTTP server"])
def test_whole_chain_on_real_mobilenet_v1_0_25_128(tmp_path, via, monkeypatch):
    needs_shared(FLOWERS)
    needs_shared(MIRROR)
    out = tmp_path / "run"
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    with contextlib.ExitStack() as stack:
        mirror = str(MIRROR) if via == "mirror folder" else stack.enter_context(serve_folder(MIRROR))
        monkeypatch.setenv("EDGEPIPE_MIRROR", mirror)  # found through the environment, as a user sets it
        run_chain(out, images=FLOWERS / "train", test_images=FLOWERS / "test", backbone="mobilenet_v1_0.25_128",
                  offline=True, cache_dir=tmp_path / "cache")
    report = json.loads((out / "report.json").read_text())
    assert report["n_test"] == 160 and len(report["classes"]) == 8
    rows = {(r["artifact"], r["runtime"]): r for r in report["results"]}
    tflite = {f"tflite-{m}" for m in ("float32", "float16", "dynamic", "int8", "int8-int8", "int8-uint8", "int16x8")}
    expected = {(a, rt) for a in tflite for rt in ("tflite-runtime", "ai-edge-litert")}
    expected |= {("tfjs-float32", "tfjs-wasm"), ("tfjs-float16", "tfjs-wasm"), ("savedmodel", "tensorflow")}
    assert set(rows) == expected
    assert all(r["passed"] for r in rows.values()), [k for k, r in rows.items() if not r["passed"]]
    assert rows[("savedmodel", "tensorflow")]["accuracy"] >= 0.88
    assert rows[("tflite-float32", "ai-edge-litert")]["max_abs_diff"] < 1e-4
    assert rows[("tfjs-float32", "tfjs-wasm")]["max_abs_diff"] < 1e-4
    # The SavedModel must say what the trained head said on the same test images.
    metrics = json.loads((out / "retrain" / "metrics.json").read_text())
    assert abs(metrics["test"]["accuracy"] - rows[("savedmodel", "tensorflow")]["accuracy"]) < 0.01
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stages"]["fetch"]["info"]["checksum"] == "pinned"
    source = manifest["stages"]["fetch"]["info"]["source"]
    assert source.startswith("http://127.0.0.1:") if via == "local HTTP server" else source.startswith(str(MIRROR))


def test_the_extraction_benchmark_runs_and_prints_every_figure(tmp_path):
    """scripts/bench_bottlenecks.py on the 160 holdout photos (speed itself is not asserted)."""
    import re
    import subprocess
    import sys

    from tests.helpers.world import REPO

    needs_shared(FLOWERS)
    needs_shared(MIRROR)
    done = subprocess.run(
        [sys.executable, "scripts/bench_bottlenecks.py", "--images", str(FLOWERS / "test"), "--backbone",
         "mobilenet_v1_0.25_128", "--repeat", "1", "--skip-runs", "--work", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "EDGEPIPE_MIRROR": str(MIRROR)})
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "160 images, mobilenet_v1_0.25_128" in out
    assert "LiteRT engine, the default (160 computed)" in out and "edgepipe warm (160 from cache)" in out
    assert re.search(r"cold / baseline: [\d.]+×   warm / cold: [\d.]+×", out), out
    assert re.search(r"\| 10× \| 1600 \| \d+ MB \| \d+ MB \| \d+ MB \|", out), out
    assert list(tmp_path.iterdir()) == []  # its scratch folder is removed

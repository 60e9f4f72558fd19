"""Verify's pieces for runtimes elsewhere: the class-stratified sample emulated runtimes run, the
drift of a row from its twin runtime in output LSBs, and the findings the report lists."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.runners.feed import FeedFile
from pipeline.types import ArtifactKind
from pipeline.verify import Artifact, Result, findings, stratified_sample, subset_feed, twin_drift


def test_the_sample_takes_every_class_in_turn_and_keeps_file_order():
    classes = np.array([0] * 10 + [1] * 2 + [2] * 6)
    picked = stratified_sample(classes, 7)
    assert list(picked) == sorted(picked) and len(set(picked)) == 7
    counts = np.bincount(classes[picked], minlength=3)
    assert list(counts) == [3, 2, 2]  # the small class is all in, the others take turns
    assert list(stratified_sample(classes, 0)) == list(range(18)) == list(stratified_sample(classes, 50))


def test_a_subset_feed_holds_the_sampled_images(tmp_path):
    images = np.arange(5 * 2 * 2 * 3, dtype=np.float32).reshape(5, 2, 2, 3)
    feed = FeedFile.from_array(tmp_path / "all.f32", images)
    sub = subset_feed(feed, np.array([1, 4]), tmp_path / "sub.f32")
    assert sub.shape == (2, 2, 2, 3) and np.array_equal(sub.read(0, 2), images[[1, 4]])


def _row(**kw) -> Result:
    base = dict(artifact="a", runtime="r", top1_agreement=1.0, accuracy=None, macro_precision=None, macro_recall=None,
                macro_f1=None, max_abs_diff=0.0, mean_abs_diff=0.0, kl_divergence=0.0, size_bytes=1, latency_ms=None,
                gate=0.9, passed=True)
    return Result(**{**base, **kw})


def test_drift_is_counted_in_steps_of_the_files_quantised_output(session_chain):
    art = Artifact("tflite-int8", session_chain.out / "quantize" / "int8.tflite", 1, ArtifactKind.TFLITE)
    own = np.array([[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]], np.float32)
    twin = np.array([[0.5 + 3 / 256, 0.5 - 3 / 256], [0.9, 0.1], [0.6, 0.4]], np.float32)
    row = _row()
    twin_drift(row, art, own, twin, "tflite-runtime")
    assert row.twin_runtime == "tflite-runtime" and row.twin_top1_agreement == 2 / 3
    assert np.isclose(row.twin_max_abs_diff, 0.4) and row.twin_max_lsb == 102.4
    float32 = Artifact("tflite-float32", session_chain.out / "quantize" / "float32.tflite", 1, ArtifactKind.TFLITE)
    row = _row()
    twin_drift(row, float32, own, own, "ai-edge-litert")
    assert row.twin_top1_agreement == 1.0 and row.twin_max_lsb is None  # a float output has no LSB


def test_findings_name_a_bundle_that_fails_only_on_f16_webgl_and_arm64_drift():
    rows = [_row(artifact="tfjs-float32", runtime="tfjs-wasm").to_dict(),
            _row(artifact="tfjs-float32", runtime="chromium-webgl-f16", top1_agreement=0.95, gate=0.97,
                 passed=False).to_dict(),
            _row(artifact="tflite-int8", runtime="tflite-runtime-arm64", twin_runtime="tflite-runtime",
                 twin_top1_agreement=0.96875, twin_max_abs_diff=0.027, twin_max_lsb=7.0, sample_size=32).to_dict()]
    assert findings(rows) == [
        "tfjs-float32 passes in tfjs-wasm but fails on f16 WebGL (agreement 0.9500 < 0.97): on GPUs that compute in "
        "16-bit floats, as many phones do, it changes answers; ship float32 WebGL only or a tfjs-wasm fallback",
        "tflite-int8 in tflite-runtime-arm64 moves top-1 against tflite-runtime on 3.1% of 32 test images "
        "(max |Δp| 0.027, 7 output LSBs)"]


@pytest.mark.slow
@pytest.mark.chain
@pytest.mark.browser
def test_verify_runs_the_pi_and_browser_rows_and_compares_each_with_its_twin(chain_copy, browser_ready):
    """The issue's command on the session chain: the emulated Pi runtimes on a sample, f16 WebGL in
    Chromium; each row against the same file on x86 (or in Node), and what ran it."""
    from pipeline.fetch import default_cache_dir
    from tests.helpers.chain import read_json, run_chain

    # The emulated tree `make setup-arm64` built in the default cache, seen from the chain's own cache.
    if not (chain_copy.cache / "arm64").exists():
        (chain_copy.cache / "arm64").symlink_to(default_cache_dir() / "arm64")
    run_chain(chain_copy.out, runtimes=["tflite-runtime-arm64", "ai-edge-litert-arm64", "chromium-webgl-f16"],
              arm64_sample=8, latency_runs=2, quant_modes=["float32", "int8"], cache_dir=chain_copy.cache)
    report = read_json(chain_copy.out / "report.json")
    rows = {(r["artifact"], r["runtime"]): r for r in report["results"]}
    for art in ("tflite-float32", "tflite-int8"):
        for rt, twin in (("tflite-runtime-arm64", "tflite-runtime"), ("ai-edge-litert-arm64", "ai-edge-litert")):
            row = rows[art, rt]
            assert row["passed"] and row["sample_size"] == 8 and row["twin_runtime"] == twin, row
            assert (twin and rows[art, twin]["sample_size"] is None)  # the x86 twin ran too, on every image
            assert row["ran_on"]["machine"] == "aarch64" and row["ran_on"]["cpu"] == "cortex-a72"
            assert row["twin_top1_agreement"] == 1.0 and row["latency_runs"] == 2
    assert rows["tflite-float32", "ai-edge-litert-arm64"]["twin_max_abs_diff"] < 1e-5
    assert rows["tflite-int8", "ai-edge-litert-arm64"]["twin_max_lsb"] <= 1
    f16 = rows["tfjs-float32", "chromium-webgl-f16"]
    assert f16["ran_on"]["backend"] == "webgl" and f16["ran_on"]["flags"]["WEBGL_FORCE_F16_TEXTURES"] is True
    assert f16["twin_runtime"] == "tfjs-wasm" and f16["gate"] == 0.97 and f16["passed"]
    md = (chain_copy.out / "report.md").read_text()
    assert "## Drift from the same file elsewhere" in md and "| tflite-int8 | tflite-runtime-arm64 | 8 |" in md

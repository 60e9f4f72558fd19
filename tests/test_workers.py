"""Verify's runtime workers: one process serves every artifact, a crash costs one row, and the
latency figure is its own measurement with its own settings."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.errors import ConfigError, VerificationFailed
from pipeline.runners.base import RunSettings, RuntimeFailed
from pipeline.runners.feed import FeedFile
from pipeline.runners.tflite import TfliteRunner
from tests.helpers.chain import edgepipe_log, report_rows, run_chain

VARIANTS = ("float32", "float16", "dynamic", "int8", "int8-uint8")


def _images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype(np.float32)


def _in_process(model, images: np.ndarray) -> np.ndarray:
    """The same file run image by image in this process, as the reference for the worker."""
    from ai_edge_litert.interpreter import Interpreter

    from pipeline.runners.tflite import dequantise, quantise

    runner = Interpreter(model_path=str(model)).get_signature_runner("serving_default")
    name, detail = next(iter(runner.get_input_details().items()))
    out = runner.get_output_details()["probabilities"]
    return np.concatenate([dequantise(runner(**{name: quantise(img[None], detail)})["probabilities"], out)
                           for img in images])


@pytest.mark.chain
def test_one_worker_runs_every_artifact_batched_as_the_files_run_alone(session_chain, tmp_path):
    quantize = session_chain.out / "quantize"
    size = json.loads((session_chain.out / "export" / "preprocessing.json").read_text())["size"]
    feed = FeedFile.from_array(tmp_path / "images.f32", _images(13, size))  # 13: a short last batch
    runner = TfliteRunner("ai-edge-litert")
    try:
        for variant in VARIANTS:
            got = runner.predict(quantize / f"{variant}.tflite", feed, timeout_s=120,
                                 settings=RunSettings(batch=4, threads=2, latency_runs=3))
            want = _in_process(quantize / f"{variant}.tflite", feed.read(0, len(feed)))
            np.testing.assert_allclose(got.probabilities, want, atol=1e-6, err_msg=variant)
            assert len(got.latencies_ms) == 3
        assert runner.worker.started == 1  # five artifacts, one process
    finally:
        runner.close()


@pytest.mark.chain
def test_every_file_takes_a_fixed_batch_of_one_but_int16x8(session_chain):
    from ai_edge_litert.interpreter import Interpreter

    for path in sorted((session_chain.out / "quantize").glob("*.tflite")):
        detail = Interpreter(model_path=str(path)).get_input_details()[0]
        batch = -1 if path.stem == "int16x8" else 1
        assert list(detail["shape_signature"]) == [batch, *detail["shape"][1:]], path.name


@pytest.mark.chain
def test_a_worker_that_crashes_on_one_artifact_is_replaced_for_the_rest(session_chain, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEPIPE_TEST_CRASH_ON", "int8.tflite")
    quantize = session_chain.out / "quantize"
    images = _images(3, json.loads((session_chain.out / "export" / "preprocessing.json").read_text())["size"])
    runner = TfliteRunner("tflite-runtime")
    try:
        first = runner.predict(quantize / "float32.tflite", images, timeout_s=120)
        with pytest.raises(RuntimeFailed, match=r"tflite-runtime failed on int8\.tflite \(killed by SIGABRT\)"):
            runner.predict(quantize / "int8.tflite", images, timeout_s=120)
        after = runner.predict(quantize / "float16.tflite", images, timeout_s=120)
        assert first.probabilities.shape == after.probabilities.shape == (3, first.probabilities.shape[1])
        assert runner.worker.started == 2
    finally:
        runner.close()


@pytest.mark.chain
def test_a_crash_in_verify_is_one_failed_row_and_every_other_row_reports(chain_copy, monkeypatch):
    monkeypatch.setenv("EDGEPIPE_TEST_CRASH_ON", "int8.tflite")
    with pytest.raises(VerificationFailed) as err:
        run_chain(chain_copy.out, runtimes=["tflite-runtime", "ai-edge-litert"], stress=False)
    assert err.value.exit_code == 3
    rows = report_rows(chain_copy.out)
    crashed = {k for k, r in rows.items() if not r["passed"]}
    assert crashed == {("tflite-int8", "tflite-runtime"), ("tflite-int8", "ai-edge-litert")}
    assert all("killed by SIGABRT" in rows[k]["error"] for k in crashed)
    others = [r for k, r in rows.items() if k not in crashed and k[0] != "savedmodel"]
    assert len(others) == 12 and all(r["passed"] and r["latency_ms"] > 0 for r in others)


@pytest.mark.chain
def test_latency_runs_set_how_many_calls_are_timed_and_p50_is_their_median(chain_copy):
    run_chain(chain_copy.out, runtimes=["ai-edge-litert"], latency_runs=7, stress=False)
    report = json.loads((chain_copy.out / "report.json").read_text())
    assert report["latency"]["runs"] == 7 and report["latency"]["threads"] == 1
    for row in report["results"]:
        assert row["latency_runs"] == 7, row["artifact"]
        assert row["latency_ms"] == row["latency_p50_ms"] <= row["latency_p90_ms"]
    md = (chain_copy.out / "report.md").read_text()
    assert "p50 / p90" in md
    # 0: no latency figures at all, and the agreement figures unchanged.
    before = {(r["artifact"], r["runtime"]): r["top1_agreement"] for r in report["results"]}
    with edgepipe_log() as lines:
        run_chain(chain_copy.out, latency_runs=0)
    assert any("latency: 0 single-image calls per row" in ln for ln in lines)
    report = json.loads((chain_copy.out / "report.json").read_text())
    assert all(r["latency_ms"] is None and r["latency_runs"] == 0 for r in report["results"])
    assert {(r["artifact"], r["runtime"]): r["top1_agreement"] for r in report["results"]} == before


def test_negative_latency_runs_is_a_config_error(tmp_path):
    import pipeline

    with pytest.raises(ConfigError, match=r"--latency-runs -1: must be 0"):
        pipeline.run(pipeline.RunConfig(out=tmp_path / "run", images=tmp_path, latency_runs=-1))

"""Preprocessing as a contract: wrong app preprocessing fails verify and says why; --stress
measures the usual mistakes; report.html is self-contained."""
from __future__ import annotations

import json
import re

import pytest

from pipeline.errors import ConfigError, VerificationFailed
from pipeline.stress import AppPreprocessing, parse_app_preprocessing
from tests.helpers.chain import edgepipe_log, run_chain
from tests.helpers.cli import edgepipe


@pytest.mark.chain
def test_stress_reproduces_a_measurable_drop(session_chain):
    out = session_chain.out
    report = json.loads((out / "report.json").read_text())
    stress = {s["mistake"]: s for s in report["stress"]}
    # Red and blue classes swap under BGR; [0,1] input collapses every image to one answer.
    assert stress["BGR channel order"]["accuracy_drop"] >= 0.3
    assert stress["[0,1] input"]["top1_agreement"] <= 0.5
    assert "Preprocessing stress" in (out / "report.html").read_text()


@pytest.mark.chain
def test_wrong_app_preprocessing_fails_verification_and_names_the_cause(chain_copy):
    out = chain_copy.out
    # One runtime keeps it short; every TFLite variant still runs the way the app feeds it.
    with pytest.raises(VerificationFailed) as err:
        run_chain(out, app_preprocessing=["channel_order=BGR"], runtimes=["ai-edge-litert"])
    assert err.value.exit_code == 3
    assert str(err.value).startswith("verification failed for tflite-float32/")
    assert "channel order BGR (contract: RGB)" in str(err.value) and "\n" not in str(err.value)
    report = json.loads((out / "report.json").read_text())
    assert report["app_preprocessing"]["differences"] == ["channel order BGR (contract: RGB)"]
    assert not report["passed"]
    # Back to the contract: the same run directory passes again.
    manifest = run_chain(out, app_preprocessing=["channel_order=RGB"])
    assert manifest["stages"]["verify"]["status"] == "done"
    assert json.loads((out / "report.json").read_text())["passed"]


@pytest.mark.slow
@pytest.mark.chain
def test_wrong_app_preprocessing_is_exit_3_and_one_error_line_on_the_command_line(chain_copy):
    """The same failure as a user sees it (a process that imports TensorFlow and runs verify)."""
    proc = edgepipe("verify", "--out", chain_copy.out, "--quiet", "--app-preprocessing", "channel_order=BGR",
                    "--runtime", "ai-edge-litert", "--no-stress", env={"EDGEPIPE_CACHE_DIR": str(chain_copy.cache)})
    assert proc.returncode == 3, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: verification failed for tflite-float32/")
    assert "channel order BGR (contract: RGB)" in last


@pytest.mark.chain
def test_uint8_io_model_is_fed_pixels_directly(session_chain):
    from ai_edge_litert.interpreter import Interpreter

    out = session_chain.out
    interp = Interpreter(model_path=str(out / "quantize" / "int8-uint8.tflite"))
    detail = interp.get_signature_runner().get_input_details()["images"]
    assert detail["dtype"].__name__ == "uint8"
    scale, zero = detail["quantization"]
    assert abs(scale - 1.0) < 0.02 and zero == 0
    rows = json.loads((out / "report.json").read_text())["results"]
    assert all(r["passed"] for r in rows if r["artifact"] == "tflite-int8-uint8")


@pytest.mark.chain
def test_report_html_is_self_contained(session_chain):
    out = session_chain.out
    page = (out / "report.html").read_text()
    assert "<table>" in page and "data:image/png;base64," in page
    assert not re.search(r"""(src|href)=['"](?!data:)""", page), "every picture is inlined"
    report = json.loads((out / "report.json").read_text())
    # The recommendation is one of this run's converted artifacts: the smallest that passes everywhere.
    rows = [r for r in report["results"] if r["artifact"] != "savedmodel"]
    passing = {r["artifact"]: r["size_bytes"] for r in rows
               if all(o["passed"] for o in rows if o["artifact"] == r["artifact"])}
    assert report["recommendation"]["artifact"] in passing
    assert passing[report["recommendation"]["artifact"]] == min(passing.values())


def test_app_preprocessing_parsing_lists_every_problem():
    assert parse_app_preprocessing(["channel_order=bgr", "crop=0.875"]) == AppPreprocessing(channel_order="BGR", crop=0.875)
    with pytest.raises(ConfigError) as err:
        parse_app_preprocessing(["channel_order=XYZ", "crop=2"])
    assert str(err.value).count("--app-preprocessing") == 2


@pytest.mark.chain
def test_tfjs_uint8_warns_and_shard_size_is_honoured(chain_copy):
    out = chain_copy.out
    with edgepipe_log() as lines:
        run_chain(out, until="tfjs", tfjs_modes=["uint8", "float32"], tfjs_shard_mb=0.001)
    assert any(ln.startswith("warning: TF.js uint8 weights are known to collapse MobileNet accuracy") for ln in lines)
    model = json.loads((out / "tfjs" / "float32" / "model.json").read_text())
    shards = [p for group in model["weightsManifest"] for p in group["paths"]]
    assert len(shards) > 1
    assert all((out / "tfjs" / "float32" / p).stat().st_size <= 1048 for p in shards)

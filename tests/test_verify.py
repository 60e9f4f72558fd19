"""Preprocessing as a contract: wrong app preprocessing fails verify and says why; --stress
measures the usual mistakes; report.html is self-contained."""
from __future__ import annotations

import json
import re

import pytest

from pipeline.stress import AppPreprocessing, parse_app_preprocessing
from pipeline.errors import ConfigError
from tests.conftest import tiny_cli_args
from tests.test_cli import edgepipe


@pytest.fixture(scope="module")
def small_run(tiny_graph, tiny_images, tiny_holdout, tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    env = {"EDGEPIPE_CACHE_DIR": str(root / "cache")}
    out = root / "run"
    proc = edgepipe("run", "--images", tiny_images, "--test-images", tiny_holdout, "--out", out, "--quiet",
                    "--epochs", "60", "--learning-rate", "0.05", "--quant", "float32", "--quant", "int8-uint8",
                    "--tfjs", "float32", "--stress", *tiny_cli_args(tiny_graph), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, env


def test_stress_reproduces_a_measurable_drop(small_run):
    out, _ = small_run
    report = json.loads((out / "report.json").read_text())
    stress = {s["mistake"]: s for s in report["stress"]}
    # Red and blue classes swap under BGR; [0,1] input collapses every image to one answer.
    assert stress["BGR channel order"]["accuracy_drop"] >= 0.3
    assert stress["[0,1] input"]["top1_agreement"] <= 0.5
    assert "Preprocessing stress" in (out / "report.html").read_text()


def test_wrong_app_preprocessing_fails_with_exit_3_and_names_the_cause(small_run):
    out, env = small_run
    proc = edgepipe("verify", "--out", out, "--quiet", "--app-preprocessing", "channel_order=BGR", env=env)
    assert proc.returncode == 3, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: verification failed for tflite-float32/")
    assert "channel order BGR (contract: RGB)" in last
    report = json.loads((out / "report.json").read_text())
    assert report["app_preprocessing"]["differences"] == ["channel order BGR (contract: RGB)"]
    assert not report["passed"]
    # Back to the contract: the same run directory passes again.
    proc = edgepipe("verify", "--out", out, "--quiet", "--app-preprocessing", "channel_order=RGB", env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_uint8_io_model_is_fed_pixels_directly(small_run):
    from ai_edge_litert.interpreter import Interpreter

    out, _ = small_run
    interp = Interpreter(model_path=str(out / "quantize" / "int8-uint8.tflite"))
    detail = interp.get_signature_runner().get_input_details()["images"]
    assert detail["dtype"].__name__ == "uint8"
    scale, zero = detail["quantization"]
    assert abs(scale - 1.0) < 0.02 and zero == 0
    rows = json.loads((out / "report.json").read_text())["results"]
    assert all(r["passed"] for r in rows if r["artifact"] == "tflite-int8-uint8")


def test_report_html_is_self_contained(small_run):
    out, _ = small_run
    page = (out / "report.html").read_text()
    assert "<table>" in page and "data:image/png;base64," in page
    assert not re.search(r"""(src|href)=['"](?!data:)""", page), "every picture is inlined"
    report = json.loads((out / "report.json").read_text())
    assert report["recommendation"]["artifact"] in {"tflite-float32", "tflite-int8-uint8", "tfjs-float32"}


def test_app_preprocessing_parsing_lists_every_problem():
    assert parse_app_preprocessing(["channel_order=bgr", "crop=0.875"]) == AppPreprocessing(channel_order="BGR", crop=0.875)
    with pytest.raises(ConfigError) as err:
        parse_app_preprocessing(["channel_order=XYZ", "crop=2"])
    assert str(err.value).count("--app-preprocessing") == 2


def test_tfjs_uint8_warns_and_shard_size_is_honoured(small_run, tmp_path):
    out, env = small_run
    proc = edgepipe("tfjs", "--out", out, "--quiet", "--tfjs", "uint8", "--tfjs", "float32",
                    "--tfjs-shard-mb", "0.001", env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "warning: TF.js uint8 weights are known to collapse MobileNet accuracy" in proc.stderr
    model = json.loads((out / "tfjs" / "float32" / "model.json").read_text())
    shards = [p for group in model["weightsManifest"] for p in group["paths"]]
    assert len(shards) > 1
    assert all((out / "tfjs" / "float32" / p).stat().st_size <= 1048 for p in shards)

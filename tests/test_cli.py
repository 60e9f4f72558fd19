"""The whole chain through the CLI on the tiny graph: stages, run directory, skips, exit codes."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

from tests.conftest import REPO, tiny_cli_args

REPORT_KEYS = {"artifact", "runtime", "top1_agreement", "accuracy", "macro_precision", "macro_recall",
               "macro_f1", "max_abs_diff", "mean_abs_diff", "size_bytes", "latency_ms", "passed"}


def edgepipe(*args, env=None, cwd=REPO) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *map(str, args)], capture_output=True,
                          text=True, env=full_env, cwd=cwd, timeout=900)


@pytest.fixture(scope="module")
def tiny_run(tiny_graph, tiny_images, tiny_holdout, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    cache = tmp_path_factory.mktemp("cache")
    env = {"EDGEPIPE_CACHE_DIR": str(cache)}
    args = ["run", "--images", tiny_images, "--test-images", tiny_holdout, "--out", out, "--quiet",
            "--epochs", "60", "--learning-rate", "0.05", *tiny_cli_args(tiny_graph)]
    first = edgepipe(*args, env=env)
    return out, args, env, first


def test_run_writes_every_stage_and_a_complete_report(tiny_run):
    out, _, _, proc = tiny_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    for stage in ("retrain", "export", "quantize", "tfjs", "verify"):
        assert (out / stage).is_dir(), stage
    report = json.loads((out / "report.json").read_text())
    pairs = {(r["artifact"], r["runtime"]) for r in report["results"]}
    for mode in ("float32", "float16", "dynamic", "int8"):
        assert {(f"tflite-{mode}", "tflite-runtime"), (f"tflite-{mode}", "ai-edge-litert")} <= pairs
    assert {("tfjs-float32", "tfjs-wasm"), ("tfjs-float16", "tfjs-wasm"), ("savedmodel", "tensorflow")} <= pairs
    for r in report["results"]:
        assert REPORT_KEYS <= set(r), r["artifact"]
        assert r["passed"], (r["artifact"], r["runtime"], r.get("error"))
    # Solid-colour classes are trivially separable: the head must get them right.
    assert report["results"][0]["accuracy"] == 1.0
    assert "| tflite-int8 | ai-edge-litert |" in (out / "report.md").read_text()
    assert (out / "verify" / "confusion_matrices.png").stat().st_size > 1000
    assert "| tfjs-float16 | tfjs-wasm |" in proc.stdout


def test_manifest_records_config_versions_hashes_and_timing(tiny_run):
    out = tiny_run[0]
    m = json.loads((out / "manifest.json").read_text())
    assert m["versions"]["tensorflow"] == "2.19.0" and m["versions"]["ai-edge-litert"] == "2.3.0"
    assert m["config"]["train"]["epochs"] == 60
    for name in ("fetch", "retrain", "export", "quantize", "tfjs", "verify"):
        st = m["stages"][name]
        assert st["status"] == "done" and st["seconds"] >= 0
        assert all(len(o["sha256"]) == 64 for o in st["outputs"].values())


def test_tflite_metadata_free_model_has_float_0_255_input(tiny_run):
    from ai_edge_litert.interpreter import Interpreter

    out = tiny_run[0]
    interp = Interpreter(model_path=str(out / "quantize" / "int8.tflite"))
    detail = interp.get_signature_runner().get_input_details()["images"]
    assert detail["dtype"].__name__ == "float32"


def test_rerun_skips_every_stage(tiny_run):
    out, args, env, _ = tiny_run
    before = (out / "report.json").read_bytes()
    again = edgepipe(*args, env=env)
    assert again.returncode == 0, again.stderr[-2000:]
    for stage in ("fetch", "retrain", "export", "quantize", "tfjs", "verify"):
        assert f"{stage}: up to date, skipped" in again.stderr
    assert (out / "report.json").read_bytes() == before


def test_changed_option_reruns_only_downstream(tiny_run):
    out, args, env, _ = tiny_run
    proc = edgepipe("tfjs", "--out", out, "--tfjs", "float32", "--quiet", env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "quantize: up to date, skipped" in proc.stderr
    assert "tfjs: running" in proc.stderr
    proc = edgepipe(*args, env=env)  # back to the default variants for the other tests
    assert proc.returncode == 0


def test_missing_folder_is_exit_2_with_one_line(tmp_path, tiny_graph):
    proc = edgepipe("run", "--images", tmp_path / "nope", "--out", tmp_path / "r", *tiny_cli_args(tiny_graph))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: --images {tmp_path / 'nope'}: no such folder"]
    assert not (tmp_path / "r").exists()


def test_all_configuration_problems_are_listed_at_once(tmp_path):
    proc = edgepipe("run", "--images", tmp_path / "nope", "--out", tmp_path / "r", "--backbone", "mobilenet_v9",
                    "--epochs", "0", "--validation-pct", "60", "--test-pct", "50")
    assert proc.returncode == 2
    line = proc.stderr.strip()
    for part in ("no such folder", "unknown backbone 'mobilenet_v9'", "--epochs 0", "add up to < 100"):
        assert part in line
    assert len(line.splitlines()) == 1


def test_bad_gate_value_is_rejected(tmp_path, tiny_images):
    proc = edgepipe("run", "--images", tiny_images, "--out", tmp_path / "r", "--gate", "tflite-int8=1.5")
    assert proc.returncode == 2 and "--gate 'tflite-int8=1.5'" in proc.stderr


def test_a_crashing_runtime_fails_the_gate_with_exit_3_and_keeps_the_report(tiny_run, tmp_path):
    out, args, env, _ = tiny_run
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    node = fake_bin / "node"
    node.write_text("#!/bin/sh\necho 'simulated crash' >&2\nexit 1\n")
    node.chmod(node.stat().st_mode | stat.S_IEXEC)
    proc = edgepipe("verify", "--out", out, "--runtime", "tfjs-wasm", "--runtime", "ai-edge-litert",
                    env={**env, "PATH": f"{fake_bin}:{os.environ['PATH']}"})
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "verification failed for tfjs-float32/tfjs-wasm" in proc.stderr
    report = json.loads((out / "report.json").read_text())
    rows = {(r["artifact"], r["runtime"]): r for r in report["results"]}
    assert "simulated crash" in rows[("tfjs-float32", "tfjs-wasm")]["error"]
    assert rows[("tflite-int8", "ai-edge-litert")]["passed"]


def test_same_folders_by_another_path_still_skip(tiny_run, tmp_path):
    out, args, env, _ = tiny_run
    images = args[args.index("--images") + 1]
    # Settle the run directory (earlier tests leave other options behind), then spell the same
    # folder relative to another working directory: it is the same input.
    settle = edgepipe(*args, "--runtime", "tflite-runtime", "--runtime", "ai-edge-litert",
                      "--runtime", "tfjs-wasm", env=env)
    assert settle.returncode == 0, settle.stderr[-2000:]
    rel = os.path.relpath(images, tmp_path)
    moved = [rel if a == images else a for a in args]
    proc = edgepipe(*moved, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "retrain: up to date, skipped" in proc.stderr and "verify: up to date, skipped" in proc.stderr

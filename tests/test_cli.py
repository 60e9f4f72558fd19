"""The whole chain on the tiny graph: stages, run directory, skips, exit codes.

What the run directory holds is read from the session chain (built in-process); the command
line itself (the table it prints, skips seen from the shell, exit code 2 and its one line) is run
as a user runs it, in a subprocess.
"""
from __future__ import annotations

import os
import stat

import pytest

import pipeline
from pipeline.errors import ConfigError, VerificationFailed
from tests.helpers.chain import edgepipe_log, run_chain
from tests.helpers.cli import cli_args, edgepipe
from tests.helpers.world import tiny_cli_args

REPORT_KEYS = {"artifact", "runtime", "top1_agreement", "accuracy", "macro_precision", "macro_recall",
               "macro_f1", "max_abs_diff", "mean_abs_diff", "size_bytes", "latency_ms", "passed"}
STAGES = ("fetch", "retrain", "export", "quantize", "tfjs", "verify")


@pytest.mark.chain
def test_run_writes_every_stage_and_a_complete_report(session_chain):
    out = session_chain.out
    for stage in ("retrain", "export", "quantize", "tfjs", "verify"):
        assert (out / stage).is_dir(), stage
    report = session_chain.report()
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


@pytest.mark.chain
def test_manifest_records_config_versions_hashes_and_timing(session_chain):
    m = session_chain.manifest()
    assert m["versions"]["tensorflow"] == "2.19.0" and m["versions"]["ai-edge-litert"] == "2.3.0"
    assert m["config"]["train"]["epochs"] == 60
    for name in STAGES:
        st = m["stages"][name]
        assert st["status"] == "done" and st["seconds"] >= 0
        assert all(len(o["sha256"]) == 64 for o in st["outputs"].values())


@pytest.mark.chain
def test_tflite_metadata_free_model_has_float_0_255_input(session_chain):
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(session_chain.out / "quantize" / "int8.tflite"))
    detail = interp.get_signature_runner().get_input_details()["images"]
    assert detail["dtype"].__name__ == "float32"


@pytest.mark.chain
def test_rerun_skips_every_stage_and_prints_the_table(chain_copy):
    """The same options on the command line as the API was given: every stage is up to date, in a
    run directory moved elsewhere too (the manifest records its files relative to it)."""
    out = chain_copy.out.parent / "moved"
    chain_copy.out.rename(out)
    before = (out / "report.json").read_bytes()
    proc = edgepipe("run", "--out", out, *cli_args(chain_copy.options), "--quiet",
                    env={"EDGEPIPE_CACHE_DIR": str(chain_copy.cache)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    for stage in STAGES:
        assert f"{stage}: up to date, skipped" in proc.stderr
    assert (out / "report.json").read_bytes() == before
    assert "| tfjs-float16 | tfjs-wasm |" in proc.stdout


@pytest.mark.chain
def test_changed_option_reruns_only_downstream(chain_copy):
    with edgepipe_log() as lines:
        run_chain(chain_copy.out, until="tfjs", tfjs_modes=["float32"])
    assert "quantize: up to date, skipped" in lines
    assert "tfjs: running" in lines
    assert chain_copy.manifest()["config"]["tfjs_modes"] == ["float32"]


def test_missing_folder_is_exit_2_with_one_line(tmp_path, tiny_graph):
    proc = edgepipe("run", "--images", tmp_path / "nope", "--out", tmp_path / "r", *tiny_cli_args(tiny_graph))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: --images {tmp_path / 'nope'}: no such folder"]
    assert not (tmp_path / "r").exists()


def test_all_configuration_problems_are_listed_at_once(tmp_path):
    cfg = pipeline.resume(tmp_path / "r", images=tmp_path / "nope", backbone="mobilenet_v9", epochs=0,
                          validation_pct=60, test_pct=50)
    with pytest.raises(ConfigError) as err:
        pipeline.validate(cfg)
    line = str(err.value)
    for part in ("no such folder", "unknown backbone 'mobilenet_v9'", "--epochs 0", "add up to < 100"):
        assert part in line
    assert len(line.splitlines()) == 1 and err.value.exit_code == 2
    assert not (tmp_path / "r").exists()


def test_bad_gate_value_is_rejected(tmp_path, tiny_images):
    with pytest.raises(ConfigError) as err:
        pipeline.resume(tmp_path / "r", images=tiny_images, gates=["tflite-int8=1.5"])
    assert err.value.exit_code == 2 and "--gate 'tflite-int8=1.5'" in str(err.value)


@pytest.mark.chain
def test_a_crashing_runtime_fails_the_gate_with_exit_3_and_keeps_the_report(chain_copy, tmp_path, monkeypatch):
    out = chain_copy.out
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    node = fake_bin / "node"
    node.write_text("#!/bin/sh\necho 'simulated crash' >&2\nexit 1\n")
    node.chmod(node.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{fake_bin}:{os.environ['PATH']}")
    with pytest.raises(VerificationFailed) as err:
        run_chain(out, runtimes=["tfjs-wasm", "ai-edge-litert"])
    assert err.value.exit_code == 3
    assert "verification failed for tfjs-float32/tfjs-wasm" in str(err.value)
    rows = chain_copy.rows()  # the report is written even though verification failed
    assert "simulated crash" in rows[("tfjs-float32", "tfjs-wasm")]["error"]
    assert rows[("tflite-int8", "ai-edge-litert")]["passed"]


@pytest.mark.slow  # a process of its own: 5-8 s
@pytest.mark.chain
def test_same_folders_by_another_path_still_skip(chain_copy, tmp_path):
    images = str(chain_copy.options["images"])
    args = ["run", "--out", chain_copy.out, *cli_args(chain_copy.options), "--quiet"]
    # The same folder spelled relative to another working directory: it is the same input.
    rel = os.path.relpath(images, tmp_path)
    moved = [rel if str(a) == images else a for a in args]
    assert rel in moved
    proc = edgepipe(*moved, env={"EDGEPIPE_CACHE_DIR": str(chain_copy.cache)}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "retrain: up to date, skipped" in proc.stderr and "verify: up to date, skipped" in proc.stderr


def test_a_run_started_with_relative_paths_resumes_from_another_directory(tiny_graph, tiny_images, tiny_holdout,
                                                                         tmp_path, monkeypatch):
    """Folders and the graph named relative to the working directory are saved absolute, so the
    run resumes (every stage up to date) from anywhere."""
    from pathlib import Path

    from tests.helpers.world import tiny_graph_options

    def relative(p: Path) -> str:
        return os.path.relpath(p, tmp_path)

    monkeypatch.chdir(tmp_path)
    options = {**tiny_graph_options(tiny_graph), "graph": relative(tiny_graph)}
    run_chain(Path("run"), until="retrain", images=relative(tiny_images), test_images=relative(tiny_holdout),
              cache_dir="cache", bottleneck_cache="features", epochs=5, **options)
    config = pipeline.resume(tmp_path / "run").to_dict()
    assert config["images"] == str(tiny_images) and config["graph"]["path"] == str(tiny_graph)
    assert config["bottleneck_cache"] == str(tmp_path / "features")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with edgepipe_log() as lines:
        run_chain(tmp_path / "run", until="retrain")
    assert "fetch: up to date, skipped" in lines and "retrain: up to date, skipped" in lines, lines

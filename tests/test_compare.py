"""``edgepipe compare``: the table and the recommendation from rows, bad input before any work, and
(slow) a real comparison of two MobileNet v1 backbones whose second run computes nothing."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

import pipeline
from pipeline.compare import (
    NOT_RUN,
    CompareResult,
    CompareRow,
    CompareSettings,
    compare,
    markdown_table,
    plan,
    read_row,
    recommend,
)
from pipeline.errors import ConfigError
from tests.helpers.chain import edgepipe_log, read_json, run_chain
from tests.helpers.cli import edgepipe
from tests.helpers.world import MIRROR, TINY_BOTTLENECK, needs_shared, tiny_graph_options

STAGES = ("fetch", "retrain", "export", "quantize", "tfjs", "verify")


def _row(name: str, accuracy: float | None, tflite_bytes: int | None, savedmodel_bytes: int = 1_000_000,
         **changes) -> CompareRow:
    row = CompareRow(
        name=name, backbone=name, fine_tune=0, run_dir=f"cmp/{name}", passed=True, failed=(), accuracy=accuracy,
        macro_precision=accuracy, macro_recall=accuracy, macro_f1=accuracy, feature_size=256,
        savedmodel_bytes=savedmodel_bytes, tflite="tflite-int8" if tflite_bytes else None, tflite_bytes=tflite_bytes,
        top1_agreement=0.99 if tflite_bytes else None, latency_p50_ms=0.5 if tflite_bytes else None,
        litert_note=None if tflite_bytes else "no TFLite file passed every gate", retrain_seconds=3.0,
        bottleneck_seconds=2.0, bottlenecks_computed=10, run_seconds=20.0, classes=("a", "b"),
        confusion_matrix=[[5, 0], [1, 4]])
    return dataclasses.replace(row, **changes)


# --- the table and the recommendation, from rows -------------------------------------------------

def test_the_recommendation_is_the_most_accurate_and_the_smallest_within_one_point():
    rows = [_row("mobilenet_v1_1.0_224", 0.975, 1_250_000), _row("mobilenet_v1_0.25_224", 0.96875, 312_000),
            _row("mobilenet_v1_0.25_128", 0.95, 300_000)]  # smaller still, but 2.5 points down
    rec = recommend(rows)
    assert rec["line"] == ("most accurate: mobilenet_v1_1.0_224 (0.9750); smallest within one point: "
                           "mobilenet_v1_0.25_224 (0.9688, tflite-int8 312 KB)")
    assert (rec["most_accurate"], rec["smallest"], rec["smallest_size_bytes"]) == (
        "mobilenet_v1_1.0_224", "mobilenet_v1_0.25_224", 312_000)


def test_without_a_passing_tflite_a_row_weighs_its_savedmodel_and_ties_go_to_the_smaller():
    rows = [_row("big", 0.90, 2_000_000), _row("no-tflite", 0.90, None, savedmodel_bytes=1_500_000)]
    rec = recommend(rows)
    assert rec["most_accurate"] == "no-tflite" and rec["smallest"] == "no-tflite"
    assert rec["line"].endswith("smallest within one point: no-tflite (0.9000, savedmodel 1.50 MB)")
    assert recommend([_row("x", None, 1000)]) is None


def test_the_table_has_a_row_each_and_says_when_ai_edge_litert_did_not_run():
    rows = [_row("a", 0.9, 312_000),
            _row("b+ft2", 0.8, 200_000, fine_tune=2, top1_agreement=None, latency_p50_ms=None, litert_note=NOT_RUN,
                 passed=False, failed=("tflite-float16/tflite-runtime",))]
    lines = markdown_table(rows).splitlines()
    assert lines[0] == ("| row | backbone | fine-tune blocks | test accuracy | macro P | macro R | macro F1 | features | "
                        "SavedModel | smallest passing TFLite | its size | agreement (ai-edge-litert) | "
                        "p50 ms (ai-edge-litert) | train s | of it bottlenecks s | gates |")
    assert len(lines) == 4
    assert lines[2] == ("| a | a | 0 | 0.9000 | 0.9000 | 0.9000 | 0.9000 | 256 | 1.00 MB | tflite-int8 | 312 KB | "
                        "0.9900 | 0.50 | 3.0 | 2.0 | PASS |")
    assert "| b+ft2 | b+ft2 | 2 |" in lines[3]
    assert "| not run | not run |" in lines[3] and lines[3].endswith("| FAIL (tflite-float16/tflite-runtime) |")


def test_the_comparison_files_are_written_and_the_page_is_self_contained(tmp_path):
    result = CompareResult([_row("a", 0.9, 312_000), _row("b", 0.95, 400_000)],
                           CompareSettings(out=tmp_path, backbones=("a", "b"), options={"images": tmp_path}))
    files = result.save(tmp_path)
    assert set(files) == {"compare", "compare_md", "compare_html", "confusion"}
    saved = read_json(files["compare"])
    assert [r["name"] for r in saved["rows"]] == ["a", "b"] and saved["classes"] == ["a", "b"]
    assert saved["options"] == {"out": str(tmp_path), "backbones": ["a", "b"], "fine_tune": [0],
                                "options": {"images": str(tmp_path)}}
    assert CompareRow.from_dict(saved["rows"][0]) == result.rows[0]
    md = files["compare_md"].read_text()
    assert "**Recommendation:** most accurate: b (0.9500); smallest within one point: b (0.9500, tflite-int8 400 KB)" in md
    page = files["compare_html"].read_text()
    assert "<table>" in page and "data:image/png;base64," in page and "src='http" not in page
    assert files["confusion"].stat().st_size > 1000


def _fake_run(root: Path, runtimes: list[str], int8_passes: bool = True) -> Path:
    """A finished run directory's files, as the stages write them, without running anything."""
    (root / "retrain").mkdir(parents=True)
    (root / "export" / "savedmodel" / "variables").mkdir(parents=True)
    (root / "export" / "savedmodel" / "saved_model.pb").write_bytes(b"x" * 600)
    (root / "export" / "savedmodel" / "variables" / "v.data").write_bytes(b"x" * 400)
    (root / "retrain" / "labels.txt").write_text("daisy\nrose\n")
    test = {"n": 10, "accuracy": 0.9, "macro_precision": 0.91, "macro_recall": 0.89, "macro_f1": 0.9,
            "confusion_matrix": [[5, 0], [1, 4]]}
    (root / "retrain" / "metrics.json").write_text(json.dumps({"validation": {**test, "accuracy": 1.0}, "test": test}))
    stages = {s: {"status": "done", "seconds": 1.0} for s in STAGES}
    stages["fetch"]["info"] = {"spec": {"name": "mobilenet_v1_0.25_224", "feature_size": 256}}
    stages["retrain"] = {"status": "done", "seconds": 4.5, "info": {"bottlenecks": {"computed": 90, "cached": 0,
                                                                                     "seconds": 3.25}}}
    (root / "manifest.json").write_text(json.dumps({"config": {"runtimes": runtimes}, "stages": stages}))

    def result(artifact, runtime, size, passed, agreement=1.0):
        return {"artifact": artifact, "runtime": runtime, "size_bytes": size, "passed": passed, "accuracy": 0.9,
                "top1_agreement": agreement, "latency_ms": 0.7, "latency_p50_ms": 0.7}

    results = [result("savedmodel", "tensorflow", 1000, True)]
    for rt in runtimes:
        results += [result("tflite-float32", rt, 900, True), result("tflite-int8", rt, 300, int8_passes, 0.95)]
    (root / "report.json").write_text(json.dumps({"results": results, "passed": int8_passes, "classes": ["daisy", "rose"]}))
    return root


def test_a_row_is_read_from_its_run_directory(tmp_path):
    row = read_row(_fake_run(tmp_path / "r", ["tflite-runtime", "ai-edge-litert"]))
    assert (row.name, row.backbone, row.fine_tune, row.feature_size, row.savedmodel_bytes) == (
        "r", "mobilenet_v1_0.25_224", 0, 256, 1000)
    assert (row.accuracy, row.macro_precision, row.macro_recall, row.macro_f1) == (0.9, 0.91, 0.89, 0.9)
    assert (row.tflite, row.tflite_bytes, row.top1_agreement, row.latency_p50_ms) == ("tflite-int8", 300, 0.95, 0.7)
    assert (row.retrain_seconds, row.bottleneck_seconds, row.bottlenecks_computed, row.run_seconds) == (4.5, 3.25, 90, 9.5)
    assert row.passed and row.classes == ("daisy", "rose") and row.confusion_matrix == [[5, 0], [1, 4]]


def test_a_row_without_ai_edge_litert_says_not_run_and_a_failed_gate_is_still_a_row(tmp_path):
    row = read_row(_fake_run(tmp_path / "r", ["tflite-runtime"], int8_passes=False))
    assert not row.passed and row.failed == ("tflite-int8/tflite-runtime",)
    assert (row.tflite, row.tflite_bytes) == ("tflite-float32", 900)  # the smallest that passed
    assert (row.top1_agreement, row.latency_p50_ms, row.litert_note) == (None, None, NOT_RUN)


def test_a_folder_without_a_finished_run_is_named(tmp_path):
    with pytest.raises(pipeline.PipelineError, match="holds no finished run"):
        read_row(tmp_path)


# --- the rows' configurations, validated before any work --------------------------------------

def test_every_row_is_validated_before_any_work_and_a_bad_second_backbone_is_one_line(tmp_path, tiny_images):
    from typer.testing import CliRunner

    from pipeline.cli import app

    out = tmp_path / "cmp"
    result = CliRunner().invoke(app, ["compare", "--backbone", "mobilenet_v1_0.25_224", "--backbone", "mobilenet_v9",
                                      "--images", str(tiny_images), "--out", str(out)])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown backbone 'mobilenet_v9'")
    assert not out.exists()


def test_compare_problems_are_reported_at_once(tmp_path):
    settings = CompareSettings(out=tmp_path / "cmp", backbones=("mobilenet_v1_0.25_224",) * 2, fine_tune=(-1,),
                               options={"images": tmp_path / "nope", "epochs": 0, "backbone": "x"})
    with pytest.raises(ConfigError) as err:
        plan(settings)
    text = str(err.value)
    for part in ("--backbone: not a compare option", "--backbone mobilenet_v1_0.25_224: given twice",
                 "--fine-tune -1: give a number of backbone blocks"):
        assert part in text
    with pytest.raises(ConfigError) as err:
        plan(CompareSettings(out=tmp_path / "cmp", backbones=("mobilenet_v1_0.25_224",),
                             options={"images": tmp_path / "nope", "epochs": 0}))
    assert str(err.value) == f"--images {tmp_path / 'nope'}: no such folder; --epochs 0: must be at least 1"
    with pytest.raises(ConfigError, match="nothing to compare"):
        plan(CompareSettings(out=tmp_path / "cmp", options={"images": tmp_path}))
    assert not (tmp_path / "cmp").exists()


def test_rows_are_backbones_times_fine_tuning_settings_and_a_graph_is_named_after_its_file(tmp_path, tiny_images,
                                                                                            tiny_graph):
    options = {"images": tiny_images, **tiny_graph_options(tiny_graph)}
    rows = plan(CompareSettings(out=tmp_path, backbones=("mobilenet_v1_0.25_128",), options=options))
    assert [(r.name, r.backbone, r.fine_tune) for r in rows] == [
        ("mobilenet_v1_0.25_128", "mobilenet_v1_0.25_128", 0), ("tiny_frozen", "tiny_frozen.pb", 0)]
    assert [r.config.out for r in rows] == [tmp_path / "mobilenet_v1_0.25_128", tmp_path / "tiny_frozen"]
    # The graph's tensors go to its own row only; the catalog row keeps the catalog's.
    assert rows[0].config.graph is None and rows[0].config.bottleneck_tensor is None
    assert rows[1].config.graph.bottleneck_tensor == TINY_BOTTLENECK
    settings = CompareSettings(out=tmp_path, backbones=("mobilenet_v1_0.25_128",), fine_tune=(0, 2),
                               options={"images": tiny_images})
    rows = plan(settings)
    assert [r.name for r in rows] == ["mobilenet_v1_0.25_128", "mobilenet_v1_0.25_128+ft2"]
    assert [r.config.train.fine_tune for r in rows] == [0, 2]
    assert rows[1].config.out == tmp_path / "mobilenet_v1_0.25_128+ft2"


def test_the_api_exports_compare():
    import subprocess
    import sys

    # In a fresh process: this one has imported pipeline.compare, the module, under the same name.
    probe = ("import pipeline; f = pipeline.compare; import pipeline.compare; "
             "print(callable(f), pipeline.compare is f, pipeline.CompareSettings.__module__)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["True", "True", "pipeline.compare"]


# --- a real comparison -------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.chain
def test_two_real_backbones_compared_then_compared_again_computing_nothing(tmp_path, tiny_images, tiny_holdout,
                                                                           cache_dir):
    needs_shared(MIRROR)
    backbones = ("mobilenet_v1_0.25_224", "mobilenet_v1_0.25_128")
    options = {"images": tiny_images, "test_images": tiny_holdout, "mirror": str(MIRROR), "epochs": 30,
               "quant_modes": ["float32", "int8"], "tfjs_modes": ["float32"], "runtimes": ["ai-edge-litert"],
               "latency_runs": 5, "progress": False}
    # A "+" in the folder's name, as a fine-tuned row's (BACKBONE+ftN) has: every stage writes under it.
    out = tmp_path / "cmp+ft"
    with edgepipe_log() as lines:
        result = compare(CompareSettings(out=out, backbones=backbones, options=options))
    assert [ln for ln in lines if ln.startswith("compare: row")] == [
        "compare: row 1/2 mobilenet_v1_0.25_224", "compare: row 2/2 mobilenet_v1_0.25_128"]
    assert [r.name for r in result.rows] == list(backbones)
    for row in result.rows:
        assert row.passed and row.accuracy == 1.0 and row.feature_size == 256
        assert row.tflite == "tflite-int8" and 200_000 < row.tflite_bytes < 400_000
        assert row.top1_agreement >= 0.9 and row.latency_p50_ms > 0 and row.litert_note is None
        assert row.savedmodel_bytes > row.tflite_bytes and row.retrain_seconds > 0 and row.bottlenecks_computed > 0
        manifest = read_json(out / row.name / "manifest.json")
        assert all(manifest["stages"][s]["status"] == "done" for s in STAGES), row.name
    # Both reach 1.0 on the solid colours: the smaller is the most accurate and the smallest.
    smallest = min(result.rows, key=lambda r: r.tflite_bytes).name
    assert result.recommendation["most_accurate"] == result.recommendation["smallest"] == smallest
    for name in ("compare.json", "compare.md", "compare.html", "confusion_matrices.png"):
        assert (out / name).is_file(), name
    saved = read_json(out / "compare.json")
    assert saved["recommendation"]["line"] == result.recommendation["line"]

    # Each row stays an ordinary run directory, up to date for `edgepipe verify --out OUT/<row>`.
    with edgepipe_log() as lines:
        run_chain(out / backbones[1], until="verify")
    assert all(f"{s}: up to date, skipped" in lines for s in STAGES)

    # Again, from the command line: nothing is computed, and the table is printed.
    args = ["compare", "--out", out, "--quiet", *sum((["--backbone", b] for b in backbones), []),
            "--images", tiny_images, "--test-images", tiny_holdout, "--mirror", MIRROR, "--epochs", "30",
            "--quant", "float32", "--quant", "int8", "--tfjs", "float32", "--runtime", "ai-edge-litert",
            "--latency-runs", "5"]
    proc = edgepipe(*args, env={"EDGEPIPE_CACHE_DIR": str(cache_dir)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    skipped = [ln for ln in proc.stderr.splitlines() if ln.endswith(": up to date, skipped")]
    assert len(skipped) == 2 * len(STAGES) and "running" not in proc.stderr
    assert proc.stdout.startswith("# edgepipe compare: 2 rows") and "| mobilenet_v1_0.25_128 |" in proc.stdout
    assert read_json(out / "compare.json")["rows"] == saved["rows"]


@pytest.mark.slow
def test_the_compare_benchmark_runs_and_prints_every_figure(tmp_path, tiny_images, tiny_holdout):
    """scripts/bench_compare.py on the tiny photos (speed itself is not asserted)."""
    import re
    import subprocess
    import sys

    from tests.helpers.world import REPO

    needs_shared(MIRROR)
    done = subprocess.run(
        [sys.executable, "scripts/bench_compare.py", "--images", str(tiny_images), "--test-images", str(tiny_holdout),
         "--backbone", "mobilenet_v1_0.25_128", "--backbone", "mobilenet_v1_0.25_224", "--runtime", "ai-edge-litert",
         "--quant", "float32", "--epochs", "5", "--mirror", str(MIRROR), "--tmp", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    out = done.stdout
    for label in ("edgepipe run --backbone mobilenet_v1_0.25_128, cold", "edgepipe run --backbone "
                  "mobilenet_v1_0.25_224, cold", "the runs one after the other", "edgepipe compare, cold"):
        assert re.search(rf"\| {re.escape(label)} \| \d+\.\d\d \| \d+\.\d\d \| (6|12) \| 0 \|", out), (label, out)
    assert re.search(r"\| edgepipe compare again, warm \| \d+\.\d\d \| \d+\.\d\d \| 0 \| 12 \|", out), out
    assert re.search(r"compare cold / \(run \+ run\): \d+\.\d\d× \(\d+\.\d\d s / \d+\.\d\d s", out), out
    assert "stages skipped: 12 of 12: met" in out
    assert list(tmp_path.iterdir()) == []  # its scratch folder is removed

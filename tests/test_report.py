"""report.md, report.html and the pictures read at 8 classes and at 101 (Caltech-101) with 17
result rows: per-class agreement as one row per class, worst first; figures that scale their
fonts and drop per-cell numbers; trade-off labels that do not overlap. Synthetic report dicts,
no model runs."""
from __future__ import annotations

import html
import re

import numpy as np
import pytest

from pipeline import report as rp
from pipeline.report_html import write_html_report

ROWS = [("savedmodel", "tensorflow", 1.03e6)] + [
    (f"tflite-{q}", rt, size) for q, size in (("float32", 0.87e6), ("float16", 0.45e6), ("dynamic", 0.28e6),
                                              ("int8", 0.31e6), ("int8-int8", 0.31e6), ("int8-uint8", 0.31e6),
                                              ("int16x8", 0.35e6))
    for rt in ("tflite-runtime", "ai-edge-litert")
] + [("tfjs-float32", "tfjs-wasm", 0.92e6), ("tfjs-float16", "tfjs-wasm", 0.50e6)]


REASON = "the test folder is a flat folder of images, with no class subfolders to take labels from."


def synthetic_report(n_classes: int, per_class: int = 13, seed: int = 0, p90: bool = True,
                     rows: list[tuple] = ROWS, labelled: bool = True) -> dict:
    """A report dict shaped like Report.to_dict: 17 rows, each converted row's predictions the
    reference's with a few flipped, so per-class agreement and the matrices are consistent.
    Unlabelled (``labelled=False``): no accuracy figures, no matrices, agreement grouped by the
    reference's top-1 class, which is never the last class."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_classes), per_class)
    ref = np.where(rng.random(len(labels)) < 0.85, labels, rng.integers(0, n_classes, len(labels)))
    if not labelled:
        ref = np.minimum(ref, n_classes - 2)
    by = labels if labelled else ref
    classes = [f"class {k:03d} {'x' * (k % 9)}".strip() for k in range(n_classes)]
    results = []
    for i, (artifact, runtime, size) in enumerate(rows):
        flip = rng.random(len(labels)) < (0.0 if "float" in artifact or i == 0 else 0.03)
        pred = np.where(flip, rng.integers(0, n_classes, len(labels)), ref)
        cm = np.zeros((n_classes, n_classes), int)
        np.add.at(cm, (labels, pred), 1)
        same = pred == ref
        p50 = float(rng.uniform(1, 60))
        results.append({
            "artifact": artifact, "runtime": runtime, "top1_agreement": float(same.mean()),
            "accuracy": float((pred == labels).mean()), "macro_precision": 0.9, "macro_recall": 0.9,
            "macro_f1": 0.9, "max_abs_diff": 0.1, "mean_abs_diff": 0.001, "kl_divergence": 1e-4,
            "size_bytes": int(size), "latency_ms": p50, "latency_p50_ms": p50 if p90 else None,
            "latency_p90_ms": p50 * 1.3 if p90 else None, "gate": 0.9, "passed": bool(same.mean() >= 0.9),
            "error": None, "confusion_matrix": cm.tolist(),
            "per_class_agreement": [float(same[by == k].mean()) if np.any(by == k) else None
                                    for k in range(n_classes)],
            "flipped": [], "flipped_to": [],
        })
        if not labelled:
            results[-1].update(dict.fromkeys(rp.LABEL_KEYS), confusion_matrix=[])
    report = {"backbone": "mobilenet_v1_0.25_224", "classes": classes, "n_test": len(labels),
              "test_images": [], "skipped_images": [], "warnings": [], "results": results, "passed": True,
              "app_preprocessing": {}, "stress": [], "reference_top1": [int(k) for k in ref],
              "recommendation": None}
    if not labelled:
        report |= {"labelled": False, "unlabelled_reason": REASON}
    return report


CHECK_ROWS = [("mobilenet_v1_1.0_224_frozen.pb", "tensorflow", 16.9e6),
              ("model_int8.tflite", "tflite-runtime", 4.3e6), ("model_int8.tflite", "ai-edge-litert", 4.3e6),
              ("model_float16.tflite", "tflite-runtime", 8.5e6), ("web_model", "tfjs-wasm", 16.8e6)]


def check_models() -> list[dict]:
    """An ``edgepipe check`` models section: a frozen-graph reference and two candidates, their
    preprocessing from different places, one with warnings."""
    def pre(mean, mean_src, **over):
        settings = {"size": {"value": [224, 224], "source": "input tensor shape"},
                    "mean": {"value": mean, "source": mean_src}, "std": {"value": 127.5, "source": mean_src},
                    "channel_order": {"value": "RGB", "source": "default (no model carries it)"},
                    "resize": {"value": "bilinear", "source": "default (no model carries it)"}}
        return settings | over
    return [
        {"name": "mobilenet_v1_1.0_224", "role": "reference", "path": "/models/mobilenet_v1_1.0_224_frozen.pb",
         "format": "frozen-graph", "kind": "savedmodel",
         "input": {"shape": [None, 224, 224, 3], "dtype": "float32", "quantization": None},
         "output": {"name": "MobilenetV1/Predictions/Reshape_1", "kind": "probabilities", "softmax_applied": False},
         "labels": {"count": 1001, "source": "labels.txt beside the model"},
         "preprocessing": pre([127.5, 127.5, 127.5], "catalog: mobilenet_v1_1.0_224"), "warnings": []},
        {"name": "model_int8.tflite", "role": "candidate", "path": "/models/model_int8.tflite",
         "format": "tflite", "kind": "tflite-int8",
         "input": {"shape": [1, 224, 224, 3], "dtype": "uint8", "quantization": [0.0078125, 128]},
         "output": {"name": "StatefulPartitionedCall:0", "kind": "logits", "softmax_applied": True},
         "labels": {"count": None, "source": "none in the model"},
         "preprocessing": pre(127.5, "TFLite metadata (NormalizationOptions)"),
         "warnings": ["its output is logits; softmax applied before comparing",
                      "no labels in the model; classes taken from the reference"]},
        {"name": "web_model", "role": "candidate", "path": "/models/web_model/model.json",
         "format": "tfjs-layers", "kind": "tfjs-float32",
         "input": {"shape": [-1, 224, 224, 3], "dtype": "float32", "quantization": None},
         "output": {"name": "dense_1", "kind": "probabilities", "softmax_applied": False},
         "labels": {"count": 1001, "source": "--labels"},
         "preprocessing": pre(127.5, "--mean", resize={"value": "area", "source": "--resize"}), "warnings": []},
    ]


def check_report(labelled: bool) -> dict:
    """An ``edgepipe check`` report: candidate file names as artifacts, a title, no backbone."""
    report = synthetic_report(8, per_class=10, seed=4, rows=CHECK_ROWS, labelled=labelled)
    report |= {"backbone": None, "title": "edgepipe check: mobilenet_v1_1.0_224", "models": check_models()}
    best = report["results"][1]
    report["recommendation"] = {
        "artifact": best["artifact"], "runtime": best["runtime"], "size_bytes": best["size_bytes"],
        "latency_ms": best["latency_ms"], "top1_agreement": best["top1_agreement"], "accuracy": best["accuracy"],
        "fastest": {"artifact": best["artifact"], "runtime": best["runtime"], "latency_ms": best["latency_ms"]},
        "why": "smallest of 3 artifacts that pass every gate in every runtime"}
    return report


def results_head(md: str) -> list[str]:
    """The results table's head cells (``\\|`` is a pipe inside a cell)."""
    line = next(ln for ln in md.splitlines() if ln.startswith("| artifact |"))
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]


def model_row(md: str, name: str) -> list[str]:
    section = md.split("## Models", 1)[1].split("\n## ", 1)[0]
    line = next(ln for ln in section.splitlines() if ln.startswith(f"| {name} |"))
    return [c.strip() for c in line.strip("|").split("|")]


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """The 101-class report written once: (report dict, run root)."""
    report = synthetic_report(101)
    root = tmp_path_factory.mktemp("big")
    rp.write_reports(root, report)
    return report, root


def agreement_lines(md: str) -> list[list[str]]:
    section = md.split("## Agreement per class", 1)[1].split("\n## ", 1)[0]
    rows = [ln for ln in section.splitlines() if ln.startswith("| ") and not ln.startswith("| class | images")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in rows]


def test_md_per_class_agreement_is_one_row_per_class_worst_first(big):
    report, root = big
    md = (root / "report.md").read_text()
    table = agreement_lines(md)
    worst = [float(cells[2].split()[0]) for cells in table]
    assert worst == sorted(worst) and worst[0] < 1
    expected = {c: min(r["per_class_agreement"][k] for r in report["results"][1:])
                for k, c in enumerate(report["classes"])}
    assert [cells[0] for cells in table] == [c for c, _ in sorted(expected.items(), key=lambda kv: (kv[1], kv[0]))
                                             if expected[c] < 1]
    perfect = [c for c, v in expected.items() if v >= 1]
    if perfect:
        assert f"The other {len(perfect)} classes agree on every image in every row" in md
    # The first line's figures: images, agreeing images, and where.
    first = report["classes"].index(table[0][0])
    assert table[0][1] == "13" and re.fullmatch(r"0\.\d{3} \(\d+/13\)", table[0][2])
    where = [f"{r['artifact']} / {r['runtime']}" for r in report["results"][1:]
             if r["per_class_agreement"][first] == expected[table[0][0]]]
    assert where[0].split(" / ")[0] in table[0][3]
    # No line as wide as the classes.
    assert max(ln.count("|") for ln in md.splitlines()) < 30   # results table: 13 columns (+ |Δp| pipes)
    assert "101 classes." in md and "class 100" not in md.split("\n\n")[1]


def test_md_at_eight_classes_and_p90_missing():
    report = synthetic_report(8, per_class=20, seed=3, p90=False)
    for r in report["results"]:
        del r["latency_p90_ms"], r["latency_p50_ms"]   # a report from before p50/p90
    md_lines = rp.class_agreement_markdown(report["results"], report["classes"])
    table = agreement_lines("\n".join(md_lines))
    named = {c for cells in table for c in [cells[0]]}
    tail = md_lines[-2] if md_lines[-1] == "" else md_lines[-1]
    assert named | set(tail.split(": ", 1)[1].rstrip(".").split(", ") if "agree on every" in tail else []) \
        == set(report["classes"])
    head = rp.markdown_table(report["results"]).splitlines()[0]
    assert "| ms/img |" in head and "p90" not in head
    assert f"| {report['results'][1]['latency_ms']:.2f} |" in rp.markdown_table(report["results"])


def test_latency_shows_p50_and_p90_when_present():
    row = {"latency_ms": 2.5, "latency_p50_ms": 2.5, "latency_p90_ms": 3.25}
    assert rp.latency_text(row) == "2.50 / 3.25"
    assert rp.latency_text({"latency_ms": 2.5, "latency_p90_ms": None}) == "2.50"
    assert rp.latency_text({"latency_ms": None}) == "—"
    report = synthetic_report(4, per_class=3)
    table = rp.markdown_table(report["results"])
    assert "ms/img p50 / p90" in table.splitlines()[0]
    r = report["results"][2]
    assert f"| {r['latency_ms']:.2f} / {r['latency_p90_ms']:.2f} |" in table


def test_worst_in_groups_artifacts_by_runtimes():
    c = rp.ClassAgreement("pansy", 20, (), 0.95, (
        "tflite-int8 / tflite-runtime", "tflite-int8 / ai-edge-litert",
        "tflite-int8-int8 / tflite-runtime", "tflite-int8-int8 / ai-edge-litert", "tfjs-float16 / tfjs-wasm"), 5)
    assert rp.worst_in_text(c, 16) == "tflite-int8, tflite-int8-int8 (tflite-runtime, ai-edge-litert); tfjs-float16 (tfjs-wasm)"
    assert rp.worst_in_text(c, 16, limit=1) == "tflite-int8 (tflite-runtime, ai-edge-litert); +2 more artifacts"
    assert rp.worst_text(c) == "0.950 (19/20)"


def test_class_axis_scales_fonts_and_drops_cell_numbers():
    few, many, huge = rp.class_axis(8), rp.class_axis(101), rp.class_axis(400)
    assert few.annotate and not many.annotate
    assert few.inches < many.inches <= 12 and huge.inches == 12
    assert many.fontsize >= rp.MIN_FONT and many.step == 1  # every one of 101 names, still readable
    assert huge.step > 1 and huge.fontsize >= rp.MIN_FONT    # thinned, not shrunk below legibility
    # The label font fits the space a class gets.
    assert many.fontsize / 72 <= many.inches / 101 * 1.01


def test_big_pictures_stay_legible_and_bounded(big, tmp_path):
    from PIL import Image

    report, root = big
    heat = root / "verify" / "class_agreement.png"
    assert "`verify/class_agreement.png`" in (root / "report.md").read_text()
    w, h = Image.open(heat).size
    assert h > w and 101 * 0.11 * 100 <= h < 4000    # one readable line per class
    # Four of the rows (a grid of 17 renders the same panels, in 4-8 s on 2 busy cores).
    rp.plot_confusion_matrices(tmp_path / "cm.png", report["results"][:4], report["classes"])
    w, h = Image.open(tmp_path / "cm.png").size
    assert 4 * 8 * 100 <= w <= 4 * 14 * 100 and 8 * 100 <= h <= 14 * 100
    rp.plot_tradeoffs(tmp_path / "tr.png", report["results"])
    assert (tmp_path / "tr.png").stat().st_size > 10_000


def test_tradeoff_labels_do_not_overlap():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(1)
    fig, ax = plt.subplots(figsize=(7, 5))
    xy = [(float(x), float(y)) for x, y in zip(rng.uniform(0.3, 0.4, 17), rng.uniform(1, 2, 17))]
    ax.scatter(*zip(*xy))
    ax.margins(0.3)
    fig.tight_layout()
    labels = [f"tflite-int8-uint8\nai-edge-litert {i}" for i in range(17)]
    anns = rp.place_labels(ax, xy, labels)
    renderer = fig.canvas.get_renderer()
    # Leader lines are part of an annotation's extent; compare the text boxes only.
    boxes = [matplotlib.text.Text.get_window_extent(a, renderer) for a in anns]
    overlaps = sum(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    plt.close(fig)
    assert overlaps == 0


def test_coinciding_points_share_one_label():
    pts = np.array([[10.0, 10.0], [12.0, 11.0], [200.0, 10.0]])
    assert rp._clusters(pts, radius=6) == [[0, 1], [2]]
    members = [{"artifact": "tflite-int8", "runtime": "tflite-runtime"}, {"artifact": "tflite-int8", "runtime": "ai-edge-litert"}]
    assert rp._merged_label(members) == "tflite-int8 (tflite-runtime, ai-edge-litert)"


def test_html_has_classes_as_rows_worst_first_and_p90(tmp_path):
    report = synthetic_report(101, rows=ROWS[:2] + ROWS[7:11])   # fewer matrices to draw
    page_path = tmp_path / "report.html"
    write_html_report(page_path, report, [])
    page = page_path.read_text()
    section = page.split("<h2>Agreement per class</h2>", 1)[1].split("<h2>", 1)[0]
    names = re.findall(r"<tr><td class=l>([^<]+)</td><td>13</td>", section)
    assert sorted(names) == sorted(report["classes"])   # every class a row
    worst = [float(w) for w in re.findall(r"<td>13</td><td>([\d.]+) \(", section)]
    assert worst == sorted(worst)
    assert section.count("<th class=v") == 5 and "<img class=plot" in section  # heat map at many classes
    assert "ms/img p50 / p90" in page
    r = report["results"][3]
    assert f"<td>{r['latency_ms']:.2f} / {r['latency_p90_ms']:.2f}</td>" in page
    assert "Identical to the reference: tflite-float32 / tflite-runtime" in page


def test_html_reads_at_eight_classes(tmp_path):
    report = synthetic_report(8, per_class=20, seed=2, p90=False)
    for r in report["results"]:
        r.pop("latency_p90_ms")
    write_html_report(tmp_path / "report.html", report, [])
    page = (tmp_path / "report.html").read_text()
    section = page.split("<h2>Agreement per class</h2>", 1)[1].split("<h2>", 1)[0]
    assert "<img" not in section    # the table is enough at few classes
    assert len(re.findall(r"<tr><td class=l>", section)) == 8
    assert ", ".join(report["classes"]) in page and "p90" not in page


def test_md_unlabelled_says_agreement_and_drift_only(tmp_path):
    report = synthetic_report(8, per_class=10, seed=5, labelled=False)
    rp.write_reports(tmp_path, report)
    md = (tmp_path / "report.md").read_text()
    drift = next(ln for ln in md.splitlines() if ln.startswith("Agreement and drift only: "))
    assert drift.startswith(f"Agreement and drift only: {REASON} ")
    assert md.index(drift) < md.index("| artifact |")   # near the top, before the table
    head = results_head(md)
    assert "agree" in head and not {"acc", "P", "R", "F1"} & set(head)
    assert len(head) == len(rp.COLUMNS) - 4 == md.split("| artifact |", 1)[1].splitlines()[1].count("---")
    rest = md.replace(drift, "")
    assert "accuracy" not in rest.lower() and "confusion" not in rest.lower()   # no claims, no matrix
    assert "## Agreement per class" not in md and "## Agreement per reference's top-1 class" in md
    assert "| reference's top-1 class | images |" in md
    # Images per class: how many the reference put there, not how many the truth has.
    counts = np.bincount(report["reference_top1"], minlength=8)
    section = md.split("## Agreement per reference's top-1 class", 1)[1]
    for cells in [[c.strip() for c in ln.strip("|").split("|")] for ln in section.splitlines()
                  if ln.startswith("| class ")]:
        assert int(cells[1]) == counts[report["classes"].index(cells[0])]
    assert f"The reference puts no image in 1 class, left out: {report['classes'][-1]}." in md
    assert "Pictures: `verify/class_agreement.png`, `verify/tradeoffs.png`." in md


def test_pngs_do_not_crash_when_unlabelled(tmp_path):
    report = synthetic_report(8, per_class=10, seed=5, labelled=False)
    results, classes = report["results"], report["classes"]
    stale = tmp_path / "confusion_matrices.png"
    stale.write_bytes(b"from an earlier labelled run")
    assert rp.plot_confusion_matrices(stale, results, classes) is False and not stale.exists()
    assert rp.plot_tradeoffs(tmp_path / "tradeoffs.png", results)
    assert (tmp_path / "tradeoffs.png").stat().st_size > 10_000
    fig = rp.tradeoffs_figure(results)
    assert fig.axes[1].get_ylabel() == "top-1 agreement with the reference"
    assert "accuracy" not in fig.axes[1].get_title()
    rp.pyplot_agg().close(fig)
    assert rp.plot_class_agreement(tmp_path / "agree.png", results, classes, report["reference_top1"])
    # Labelled rows draw the accuracy panel as before.
    fig = rp.tradeoffs_figure(synthetic_report(4, per_class=3)["results"])
    assert fig.axes[1].get_ylabel() == "test accuracy"
    rp.pyplot_agg().close(fig)


def test_md_check_report_lists_models_with_sources(tmp_path):
    report = check_report(labelled=True)
    rp.write_reports(tmp_path, report)
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# edgepipe check: mobilenet_v1_1.0_224\n") and "None" not in md.split("\n", 1)[0]
    assert "Reference: mobilenet_v1_1.0_224 (frozen-graph) in tensorflow." in md
    assert "acc" in results_head(md) and "Agreement and drift only" not in md   # labelled: as before
    assert "| model_int8.tflite | ai-edge-litert |" in md                     # candidates by file name
    head = [c.strip() for c in md.split("## Models", 1)[1].split("\n| ", 1)[1].split("\n", 1)[0].strip("|").split("|")]
    assert head == ["model", "role", "format", "kind", "input", "output", "labels",
                    "size", "mean", "std", "channel order", "resize"]
    assert model_row(md, "mobilenet_v1_1.0_224") == [
        "mobilenet_v1_1.0_224", "reference", "frozen-graph", "savedmodel", "float32 ?×224×224×3",
        "MobilenetV1/Predictions/Reshape_1: probabilities", "1001 (labels.txt beside the model)",
        "224×224 (input tensor shape)", "[127.5, 127.5, 127.5] (catalog: mobilenet_v1_1.0_224)",
        "127.5 (catalog: mobilenet_v1_1.0_224)", "RGB (default (no model carries it))",
        "bilinear (default (no model carries it))"]
    int8 = model_row(md, "model_int8.tflite")
    assert int8[1:7] == ["candidate", "tflite", "tflite-int8", "uint8 1×224×224×3, scale 0.0078125, zero point 128",
                         "StatefulPartitionedCall:0: logits, softmax applied", "none (none in the model)"]
    assert int8[8] == "127.5 (TFLite metadata (NormalizationOptions))"
    assert model_row(md, "web_model")[11] == "area (--resize)"
    assert "- web_model: `/models/web_model/model.json`" in md
    assert "Warnings about the models (2):" in md
    assert "- model_int8.tflite: no labels in the model; classes taken from the reference" in md
    assert "`verify/confusion_matrices.png`" in md


def test_unlabelled_check_report_html_and_md(tmp_path):
    report = check_report(labelled=False)
    rp.write_reports(tmp_path, report)
    md = (tmp_path / "report.md").read_text()
    assert f"Agreement and drift only: {REASON}" in md and "## Models" in md
    assert md.index("Agreement and drift only") < md.index("## Models")
    assert "acc" not in results_head(md) and "Warnings about the models (2):" in md
    assert rp.plot_confusion_matrices(tmp_path / "cm.png", report["results"], report["classes"]) is False
    assert rp.plot_tradeoffs(tmp_path / "tradeoffs.png", report["results"])
    write_html_report(tmp_path / "report.html", report, [], tmp_path / "tradeoffs.png")
    page = (tmp_path / "report.html").read_text()
    assert "<h1>edgepipe check: mobilenet_v1_1.0_224</h1>" in page
    assert f"Agreement and drift only: {html.escape(REASON)}" in page
    assert page.count("<img") == 1 and "<h2>Size, latency, agreement</h2><img" in page   # the trade-offs only
    assert "Confusion matrices" not in page and "confusion_matrices.png" not in page
    heads = re.findall(r"<th[^>]*>([^<]*)</th>", page.split("<h2>Results</h2>", 1)[1].split("</table>", 1)[0])
    assert "agreement" in heads and not {"accuracy", "macro P", "macro R", "macro F1"} & set(heads)
    banner = page.split("<b>Recommended:</b>", 1)[1].split("</div>", 1)[0]
    assert "model_int8.tflite" in banner and "accuracy" not in banner
    models = page.split("<h2>Models</h2>", 1)[1].split("<h2>", 1)[0]
    assert "<td class=l>127.5 <span class=src>(TFLite metadata (NormalizationOptions))</span></td>" in models
    assert "<td class=l>area <span class=src>(--resize)</span></td>" in models
    assert "<li>model_int8.tflite: its output is logits; softmax applied before comparing</li>" in models
    assert "<h2>Agreement per reference's top-1 class</h2>" in page


def test_old_reports_are_labelled():
    report = synthetic_report(4, per_class=3)
    assert "labelled" not in report and rp.is_labelled(report) and rp.reference_counts(report) is None
    assert rp.report_title(report) == "edgepipe verification: mobilenet_v1_0.25_224"
    assert rp.reference_text(report) == "Reference: the exported SavedModel in TensorFlow."
    assert rp.unlabelled_text(report) == ""

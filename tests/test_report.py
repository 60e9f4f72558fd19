"""report.md, report.html and the pictures read at 8 classes and at 101 (Caltech-101) with 17
result rows: per-class agreement as one row per class, worst first; figures that scale their
fonts and drop per-cell numbers; trade-off labels that do not overlap. Synthetic report dicts,
no model runs."""
from __future__ import annotations

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


def synthetic_report(n_classes: int, per_class: int = 13, seed: int = 0, p90: bool = True,
                     rows: list[tuple] = ROWS) -> dict:
    """A report dict shaped like Report.to_dict: 17 rows, each converted row's predictions the
    reference's with a few flipped, so per-class agreement and the matrices are consistent."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_classes), per_class)
    ref = np.where(rng.random(len(labels)) < 0.85, labels, rng.integers(0, n_classes, len(labels)))
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
            "per_class_agreement": [float(same[labels == k].mean()) for k in range(n_classes)],
            "flipped": [], "flipped_to": [],
        })
    return {"backbone": "mobilenet_v1_0.25_224", "classes": classes, "n_test": len(labels),
            "test_images": [], "skipped_images": [], "warnings": [], "results": results, "passed": True,
            "app_preprocessing": {}, "stress": [], "reference_top1": [int(k) for k in ref],
            "recommendation": None}


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

"""report.json, report.md and the pictures (confusion matrices, per-class agreement,
size/latency/accuracy).

Two kinds of report share these writers. A run's report (``edgepipe verify``) compares the
exported SavedModel with the run's conversions; a check report (``edgepipe check``) compares any
reference with candidates made by other tools, names them in a ``"models"`` section and carries
its own ``"title"``. Either may be unlabelled (``"labelled": false``): the test images have no true
labels matched to the classes, so the report shows agreement and drift only (no accuracy, no
confusion matrices) and groups per-class agreement by the reference's top-1 class.

Every layout here has to read at 8 classes and at 101 (Caltech-101) with 17+ result rows: the
per-class agreement is one row per class, worst first; figures grow with the number of classes up
to a cap and then shrink their fonts and thin their labels; point labels in the trade-off plot are
merged where points coincide and moved apart where they would overlap.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.rundir import atomic_write_bytes, atomic_write_json, atomic_write_text

MAX_LISTED = 50  # skipped images and warnings listed in report.md; report.json has them all
MAX_NAMED_CLASSES = 20  # the intro line names the classes up to this many; the per-class table has them all
ANNOTATE_MAX_CLASSES = 20  # per-cell numbers in the matrices up to this many classes (too small to read beyond)
MIN_FONT = 4.5  # points; labels smaller than this are thinned instead of shrunk further

COLUMNS = [
    ("artifact", "artifact", "{}"), ("runtime", "runtime", "{}"),
    ("top1_agreement", "agree", "{:.4f}"), ("accuracy", "acc", "{:.4f}"),
    ("macro_precision", "P", "{:.4f}"), ("macro_recall", "R", "{:.4f}"), ("macro_f1", "F1", "{:.4f}"),
    # Pipes in a head escaped: a bare one splits the cell, and GFM drops a table whose head row
    # has more cells than its rule.
    ("max_abs_diff", r"max\|Δp\|", "{:.2e}"), ("mean_abs_diff", r"mean\|Δp\|", "{:.2e}"),
    ("size_bytes", "size", "{}"), ("latency_ms", "ms/img", "{:.2f}"), ("gate", "gate", "{:.2f}"),
    ("passed", "ok", "{}"),
]
LABEL_KEYS = ("accuracy", "macro_precision", "macro_recall", "macro_f1")  # None in unlabelled reports
PREPROCESSING_KEYS = ("size", "mean", "std", "channel_order", "resize")  # the models table's order


def is_labelled(report: dict) -> bool:
    """Whether the report has figures against true labels; reports before ``edgepipe check``
    have no ``"labelled"`` key and all are."""
    return report.get("labelled", True) is not False


def report_title(report: dict) -> str:
    """The report's heading: a check report's own ``"title"``, else the run's backbone."""
    return report.get("title") or f"edgepipe verification: {report.get('backbone')}"


def reference_text(report: dict) -> str:
    """``Reference: …`` for the intro: the check's reference model, or the run's SavedModel."""
    models = report.get("models") or []
    ref = next((m for m in models if m.get("role") == "reference"), None)
    if ref is None:
        return "Reference: the exported SavedModel in TensorFlow."
    results = report.get("results") or []
    where = f" in {results[0]['runtime']}" if results and results[0].get("runtime") else ""
    return f"Reference: {ref.get('name')} ({ref.get('format')}){where}."


def unlabelled_text(report: dict) -> str:
    """The line near the top of an unlabelled report; "" for a labelled one."""
    if is_labelled(report):
        return ""
    reason = (report.get("unlabelled_reason") or "the test images have no true labels.").strip()
    reason = reason if reason.endswith((".", "!", "?")) else reason + "."
    return (f"Agreement and drift only: {reason} Each converted model is compared with the reference's "
            "predictions; without true labels there is no accuracy, precision, recall or confusion matrix.")


def reference_counts(report: dict) -> list[int] | None:
    """The reference's top-1 class of every test image when the per-class agreement is grouped
    by it (unlabelled reports), else None (grouped by true class)."""
    if is_labelled(report):
        return None
    return [int(k) for k in report.get("reference_top1") or []]


def has_confusion(results: list[dict]) -> bool:
    """Whether :func:`plot_confusion_matrices` draws anything (unlabelled rows have ``[]``)."""
    return any(r.get("confusion_matrix") for r in results)


def tradeoff_rows(results: list[dict]) -> list[dict]:
    """The rows :func:`plot_tradeoffs` draws: those with a latency and a size."""
    return [r for r in results if r.get("latency_ms") is not None and r.get("size_bytes") is not None]


def has_latency(results: list[dict]) -> bool:
    """Whether :func:`plot_tradeoffs` draws anything."""
    return bool(tradeoff_rows(results))


def latency_text(r: dict) -> str:
    """``p50 / p90`` when the row has a p90 (reports since issue 11), else the one figure."""
    p50, p90 = r.get("latency_p50_ms", r.get("latency_ms")), r.get("latency_p90_ms")
    if p50 is None:
        return "—"
    return f"{p50:.2f} / {p90:.2f}" if p90 is not None else f"{p50:.2f}"


def has_p90(results: list[dict]) -> bool:
    return any(r.get("latency_p90_ms") is not None for r in results)


def _fmt(key: str, fmt: str, value, row: dict) -> str:
    if key == "latency_ms":
        return latency_text(row)
    if value is None:
        return "—"
    if key == "size_bytes":
        return f"{value / 1e6:.2f} MB"
    if key == "passed":
        return "PASS" if value else "FAIL"
    return fmt.format(value)


def why_failed(r: dict) -> str:
    """Why a row that ran failed: its agreement under the gate, its accuracy too far below the reference's, or both."""
    reasons = []
    if r["top1_agreement"] is not None and r["top1_agreement"] < r["gate"]:
        reasons.append(f"top-1 agreement {r['top1_agreement']:.4f} < gate {r['gate']:.2f}")
    if r.get("accuracy_drop") is not None and r["accuracy_drop"] > r["max_accuracy_drop"] + 1e-9 \
            and (r.get("accuracy_drop_p") or 0.0) < 0.05:
        reasons.append(f"accuracy {r['accuracy']:.4f} is {r['accuracy_drop']:.1f} points below the reference's "
                       f"(at most {r['max_accuracy_drop']:g}, --max-accuracy-drop; McNemar p = {r['accuracy_drop_p']:.2g})")
    return "; ".join(reasons) or "failed"


def markdown_table(results: list[dict], labelled: bool = True) -> str:
    """The results table; unlabelled, without the accuracy, P, R and F1 columns (left out, not
    filled with dashes: there is nothing they could hold)."""
    columns = [c for c in COLUMNS if labelled or c[0] not in LABEL_KEYS]
    heads = [("ms/img p50 / p90" if k == "latency_ms" and has_p90(results) else h) for k, h, _ in columns]
    head = "| " + " | ".join(heads) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    rows = ["| " + " | ".join(_fmt(k, f, r.get(k), r) for k, _, f in columns) + " |" for r in results]
    return "\n".join([head, rule, *rows])


# --- per-class agreement ------------------------------------------------------------------------

@dataclass(frozen=True)
class ClassAgreement:
    """One class's agreement with the reference across the converted (artifact, runtime) rows.

    Attributes:
        name: the class.
        n_images: its test images, or in an unlabelled report the images the reference puts in it
            (None when the report has neither a reference confusion matrix nor reference_top1).
        per_row: its agreement in each of :func:`agreement_rows`' rows (None: no test image, or no value).
        worst: the lowest of ``per_row`` (None when every value is None).
        worst_in: ``"artifact / runtime"`` of every row at ``worst``.
        below_one: how many rows agree on fewer than all of its images.
    """

    name: str
    n_images: int | None
    per_row: tuple[float | None, ...]
    worst: float | None
    worst_in: tuple[str, ...]
    below_one: int


def agreement_rows(results: list[dict]) -> list[dict]:
    """The rows a per-class agreement is shown for: converted models that produced predictions
    (the reference, ``results[0]``, agrees with itself everywhere)."""
    return [r for r in results[1:] if r.get("per_class_agreement")]


def class_counts(results: list[dict], classes: list[str], reference_top1: list[int] | None = None) -> list:
    """Images per class: how many the reference puts in each when ``reference_top1`` is given
    (unlabelled reports group agreement by it), else the true-class counts from the reference's
    confusion matrix; None per class when neither is there."""
    if reference_top1:
        return [int(c) for c in np.bincount(np.asarray(reference_top1, dtype=int), minlength=len(classes))]
    if reference_top1 is not None:
        return [None] * len(classes)
    ref_cm = results[0].get("confusion_matrix") if results else None
    return [int(c) for c in np.asarray(ref_cm).sum(1)] if ref_cm else [None] * len(classes)


def class_agreement(results: list[dict], classes: list[str],
                    reference_top1: list[int] | None = None) -> list[ClassAgreement]:
    """Every class, worst agreement first; classes with no value at all (no test image) last.

    Args:
        results: the report rows, the reference first.
        classes: the class names, in the model's output order.
        reference_top1: given when the rows' per-class agreement is grouped by the reference's
            top-1 class (unlabelled reports, see :func:`reference_counts`); the image counts come
            from it.
    """
    rows = agreement_rows(results)
    counts = class_counts(results, classes, reference_top1)
    out = []
    for k, name in enumerate(classes):
        per_row = tuple(r["per_class_agreement"][k] if k < len(r["per_class_agreement"]) else None for r in rows)
        known = [v for v in per_row if v is not None]
        worst = min(known) if known else None
        worst_in = tuple(f"{r['artifact']} / {r['runtime']}" for r, v in zip(rows, per_row)
                         if worst is not None and v == worst)
        out.append(ClassAgreement(name, counts[k], per_row, worst, worst_in, sum(v < 1 for v in known)))
    return sorted(out, key=lambda c: (c.worst is None, c.worst if c.worst is not None else 0, c.name))


def worst_in_text(c: ClassAgreement, n_rows: int, limit: int = 4) -> str:
    """Where a class agrees least: ``tflite-int8, tflite-int8-int8 (tflite-runtime, ai-edge-litert)``,
    artifacts worst in the same runtimes together, at most ``limit`` artifacts and then ``+k more``."""
    if c.worst is None:
        return "—"
    if c.worst == 1 or len(c.worst_in) == n_rows:
        return "every row" if n_rows > 1 else c.worst_in[0]
    runtimes: dict[str, list[str]] = {}
    for label in c.worst_in:
        artifact, runtime = label.split(" / ", 1)
        runtimes.setdefault(artifact, []).append(runtime)
    # Artifacts that are worst in the same runtimes share one bracket.
    by_runtimes: dict[tuple[str, ...], list[str]] = {}
    for artifact, rts in runtimes.items():
        by_runtimes.setdefault(tuple(rts), []).append(artifact)
    parts, shown = [], 0
    for rts, artifacts in by_runtimes.items():
        if shown >= limit:
            break
        parts.append(f"{', '.join(artifacts[:limit - shown])} ({', '.join(rts)})")
        shown += len(artifacts[:limit - shown])
    more = len(runtimes) - shown
    return "; ".join(parts) + (f"; +{more} more artifacts" if more > 0 else "")


def worst_text(c: ClassAgreement) -> str:
    """``0.900 (18/20)``: the worst agreement and the images that agree in that row."""
    if c.worst is None:
        return "—"
    if c.n_images is None:
        return f"{c.worst:.3f}"
    return f"{c.worst:.3f} ({round(c.worst * c.n_images)}/{c.n_images})"


def unused_classes(table: list[ClassAgreement], reference_top1: list[int] | None) -> list[str]:
    """Unlabelled reports: the classes the reference puts no image in (no row has a value for
    them). They say nothing about agreement, and a 1001-class model would otherwise list some
    900 empty rows."""
    if reference_top1 is None:
        return []
    return [c.name for c in table if c.worst is None]


def no_image_text(names: list[str]) -> str:
    """The sentence after an unlabelled per-class table about the classes it leaves out, named
    up to MAX_NAMED_CLASSES of them."""
    n = len(names)
    text = f"The reference puts no image in {n} class{'es' if n != 1 else ''}"
    if n > MAX_NAMED_CLASSES:
        return text + "; they are left out."
    return text + f", left out: {', '.join(sorted(names))}."


def class_agreement_markdown(results: list[dict], classes: list[str],
                             reference_top1: list[int] | None = None) -> list[str]:
    """report.md's per-class section: one line per class that some row does not fully agree on,
    worst first; the classes every row agrees on are named in one sentence after it. With
    ``reference_top1`` (unlabelled) the classes are the reference's top-1 class, and those it
    puts no image in are left out and counted."""
    rows = agreement_rows(results)
    if not rows:
        return []
    table = class_agreement(results, classes, reference_top1)
    empty = set(unused_classes(table, reference_top1))
    table = [c for c in table if c.name not in empty]
    shown = [c for c in table if c.worst is None or c.worst < 1]
    perfect = [c.name for c in table if c.worst is not None and c.worst >= 1]
    if reference_top1 is None:
        head, what, col = "## Agreement per class", " per class,", "class"
    else:
        head, what, col = ("## Agreement per reference's top-1 class", ", the images grouped by the class the "
                           "reference gives them (there are no true labels),", "reference's top-1 class")
    lines = [head, "",
             f"Top-1 agreement with the reference{what} worst first, over the {len(rows)} converted "
             "(artifact, runtime) rows; `verify/class_agreement.png` shows every class in every row.", ""]
    if shown:
        lines += [f"| {col} | images | worst agreement | in | rows below 1 |", "|---|---|---|---|---|"]
        lines += [f"| {c.name} | {'—' if c.n_images is None else c.n_images} | {worst_text(c)} | "
                  f"{worst_in_text(c, len(rows))} | {c.below_one} of {len(rows)} |" for c in shown]
        lines.append("")
    if perfect:
        every = "All" if not shown else f"The other {len(perfect)}"
        lines.append(f"{every} classes agree on every image in every row: {', '.join(sorted(perfect))}.")
    if empty:
        lines.append(no_image_text(list(empty)))
    return lines + [""]


# --- the models of a check report ---------------------------------------------------------------

def value_text(key: str, value) -> str:
    """One preprocessing value: ``224×224``, ``[123.68, 116.78, 103.94]``, ``127.5``, ``RGB``."""
    if value is None:
        return "—"
    if isinstance(value, (list, tuple)):
        if key == "size" and all(isinstance(v, int) for v in value):
            return "×".join(str(v) for v in value)
        return "[" + ", ".join(value_text(key, v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def setting_cell(key: str, setting) -> tuple[str, str | None]:
    """A preprocessing setting as (value text, where it came from)."""
    if not isinstance(setting, dict):
        return value_text(key, setting), None
    return value_text(key, setting.get("value")), setting.get("source")


def cell_text(cell: tuple[str, str | None]) -> str:
    """``value (source)``, or the value alone when there is no source."""
    value, source = cell
    return f"{value} ({source})" if source else value


def input_text(m: dict) -> str:
    """``uint8 1×224×224×3, scale 0.0078125, zero point 128``; unknown dimensions as ``?``."""
    spec = m.get("input") or {}
    shape = spec.get("shape")
    dims = "×".join("?" if d is None or d == -1 else str(d) for d in shape) if shape else "shape unknown"
    text = f"{spec.get('dtype') or '?'} {dims}"
    q = spec.get("quantization")
    if q:
        text += f", scale {value_text('', float(q[0]))}, zero point {q[1]}"
    return text


def output_text(m: dict) -> str:
    """``probabilities`` or ``logits, softmax applied`` after the output's name."""
    spec = m.get("output") or {}
    kind = spec.get("kind") or "?"
    if kind == "logits":
        kind += ", softmax applied" if spec.get("softmax_applied") else ", no softmax applied"
    return f"{spec['name']}: {kind}" if spec.get("name") else kind


def labels_text(m: dict) -> str:
    """``1001 (labels.txt beside the model)``; ``none (…)`` without a count."""
    spec = m.get("labels") or {}
    count = spec.get("count")
    text = "none" if count is None else str(count)
    return text + (f" ({spec['source']})" if spec.get("source") else "")


def preprocessing_keys(models: list[dict]) -> list[str]:
    """The settings the models table has a column for: the usual five in order, then any other."""
    seen = [k for m in models for k in (m.get("preprocessing") or {})]
    others = dict.fromkeys(k for k in seen if k not in PREPROCESSING_KEYS)
    return [k for k in PREPROCESSING_KEYS if k in seen] + list(others)


MODEL_COLUMNS = [("model", lambda m: m.get("name") or "?"), ("role", lambda m: m.get("role") or "?"),
                 ("format", lambda m: m.get("format") or "?"), ("kind", lambda m: m.get("kind") or "—"),
                 ("input", input_text), ("output", output_text), ("labels", labels_text)]


def model_cells(models: list[dict]) -> tuple[list[str], list[list[tuple[str, str | None]]]]:
    """The models table, shared by report.md and report.html: heads and one row per model
    (reference first, as given), each cell (text, source): the source only for preprocessing
    settings, which are shown as ``value (source)``."""
    keys = preprocessing_keys(models)
    heads = [h for h, _ in MODEL_COLUMNS] + [k.replace("_", " ") for k in keys]
    rows = []
    for m in models:
        pre = m.get("preprocessing") or {}
        rows.append([(f(m), None) for _, f in MODEL_COLUMNS]
                    + [setting_cell(k, pre[k]) if k in pre else ("—", None) for k in keys])
    return heads, rows


def model_warnings(models: list[dict]) -> list[str]:
    """Every model's warnings, each after its model's name."""
    return [f"{m.get('name')}: {w}" for m in models for w in m.get("warnings") or []]


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def models_markdown(models: list[dict]) -> list[str]:
    """report.md's models section (check reports): a row per model, then the files and warnings."""
    if not models:
        return []
    heads, rows = model_cells(models)
    lines = ["## Models", "", "Preprocessing settings as value (where it came from).", "",
             "| " + " | ".join(heads) + " |", "|" + "|".join("---" for _ in heads) + "|"]
    lines += ["| " + " | ".join(_md_cell(cell_text(c)) for c in row) + " |" for row in rows]
    lines += ["", "Files:"] + [f"- {m.get('name')}: `{m.get('path')}`" for m in models]
    warnings = model_warnings(models)
    if warnings:
        lines += ["", f"Warnings about the models ({len(warnings)}):"] + [f"- {w}" for w in warnings[:MAX_LISTED]]
        if len(warnings) > MAX_LISTED:
            lines.append(f"- … and {len(warnings) - MAX_LISTED} more (report.json)")
    return lines + [""]


# --- report.md ----------------------------------------------------------------------------------

def classes_text(classes: list[str]) -> str:
    """``8 classes (a, b, …)``; beyond MAX_NAMED_CLASSES just the count."""
    if len(classes) <= MAX_NAMED_CLASSES:
        return f"{len(classes)} classes ({', '.join(classes)})"
    return f"{len(classes)} classes"


def ran_on_text(info: dict) -> str:
    """What ran a row, from its runner's own account: machine, CPU, Python, wheel, backend."""
    keys = ("machine", "cpu", "python", "runtime_version", "numpy", "backend", "browser", "tfjs")
    parts = [f"{k} {info[k]}" for k in keys if info.get(k) not in (None, "")]
    flags = info.get("flags")
    if isinstance(flags, dict) and flags:
        parts.append(", ".join(f"{k}={v}" for k, v in sorted(flags.items())))
    return "; ".join(parts) or "—"


def drift_rows(results: list[dict]) -> list[dict]:
    """Rows compared with the same file in another build of their runtime (arm64 with x86, a
    browser with Node), or run on a sample."""
    return [r for r in results if r.get("twin_runtime") or r.get("sample_size")]


def drift_markdown(results: list[dict]) -> list[str]:
    rows = drift_rows(results)
    if not rows:
        return []
    lines = ["## Drift from the same file elsewhere",
             "Each row against the same file in its twin runtime (arm64 against x86, Chromium against Node), on "
             "the same test images; LSBs are steps of the file's quantised output.", "",
             "| artifact | runtime | test images | vs | top-1 agreement | max\\|Δp\\| | LSBs | ran on |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def f(v, spec):
            return "—" if v is None else format(v, spec)
        lines.append(f"| {r['artifact']} | {r['runtime']} | {r.get('sample_size') or 'all'} | {r.get('twin_runtime') or '—'} "
                     f"| {f(r.get('twin_top1_agreement'), '.4f')} | {f(r.get('twin_max_abs_diff'), '.2e')} "
                     f"| {f(r.get('twin_max_lsb'), 'g')} | {ran_on_text(r.get('ran_on') or {})} |")
    return lines + [""]


REPAIR_COLUMNS = ("attempt", "layers in float", "size", "validation agreement", "validation accuracy", "test agreement",
                  "test accuracy", "p50 ms (ai-edge-litert)", "")


def repair_summary(repaired: dict) -> str:
    """A repair's target and result, one paragraph (report.md and report.html)."""
    goal = repaired["goal"]
    return (f"Target: top-1 agreement ≥ {goal['agreement']:.4f} on the {repaired['validation_images']} validation images"
            + ("" if goal["max_accuracy_drop"] is None else
               f", accuracy at most {100 * goal['max_accuracy_drop']:g} point(s) below the SavedModel's")
            + f", files up to {goal['max_size_bytes'] / 1e3:.0f} KB. Chosen on validation only; test figures are "
            f"for the record. Result: {'reached' if repaired['reached'] else 'NOT reached'}: {repaired['reason']}.")


def repair_rows(repaired: dict) -> list[list[str]]:
    """A repair's attempts as table cells, in :data:`REPAIR_COLUMNS`' order."""
    def f(v, fmt="{:.4f}"):
        return "–" if v is None else fmt.format(v)

    rows = []
    for a in repaired["attempts"]:
        mark = "chosen" if a["kept"] and repaired["reached"] else ("best within the limit" if a["kept"] else "")
        rows.append([a["step"], str(len(a["float_layers"])), f"{a['size_bytes'] / 1e3:.0f} KB",
                     f(a["validation_agreement"]), f(a["validation_accuracy"]), f(a["test_agreement"]),
                     f(a["test_accuracy"]), f(a["latency_ms"], "{:.2f}"), mark])
    return rows


def repair_markdown(repaired: dict | None) -> list[str]:
    """A repair's attempts (``quantize/repair-<mode>.json``) as a table, with its picture."""
    if not repaired:
        return []
    lines = ["", f"## {repaired['mode']} repair", "", repair_summary(repaired), "",
             "| " + " | ".join(REPAIR_COLUMNS) + " |", "|:---|---:|---:|---:|---:|---:|---:|---:|:---|"]
    lines += ["| " + " | ".join(row) + " |" for row in repair_rows(repaired)]
    chosen = repaired.get("chosen") or {}
    if chosen.get("float_layers"):
        lines += ["", "Layers kept in float: " + ", ".join(f"`{t}`" for t in chosen["float_layers"]) + "."]
    return lines + ["", f"![{repaired['mode']} repair](quantize/repair-{repaired['mode']}.png)"]


def write_reports(root: Path, report: dict) -> None:
    """Writes report.json and report.md at the run-directory root, and the per-class agreement
    picture report.md points to (``verify/class_agreement.png``)."""
    atomic_write_json(root / "report.json", report)
    classes, results = report["classes"], report["results"]
    labelled, reference_top1 = is_labelled(report), reference_counts(report)
    lines = [f"# {report_title(report)}", "",
             f"{report['n_test']} test images, {classes_text(classes)}. {reference_text(report)}", ""]
    if not labelled:
        lines += [unlabelled_text(report), ""]
    lines += [markdown_table(results, labelled), ""]
    failures = [r for r in results if not r["passed"]]
    if failures:
        lines.append("## Failed")
        for r in failures:
            why = r.get("error") or why_failed(r)
            lines.append(f"- {r['artifact']} in {r['runtime']}: {why}")
    else:
        lines.append("Every artifact passed its gate in every runtime.")
    if report.get("findings"):
        lines += ["", "## Findings"] + [f"- {f}" for f in report["findings"]]
    lines += ["", *drift_markdown(results)]
    for repaired in report.get("repairs") or []:
        lines += repair_markdown(repaired)
    lines += ["", *models_markdown(report.get("models") or [])]
    lines += class_agreement_markdown(results, classes, reference_top1)
    skipped, warnings = report.get("skipped_images") or [], report.get("warnings") or []
    lines += [f"Images skipped as unreadable: {len(skipped)}."]
    lines += [f"- `{s['path']}`: {s['reason']}" for s in skipped[:MAX_LISTED]]
    if len(skipped) > MAX_LISTED:
        lines.append(f"- … and {len(skipped) - MAX_LISTED} more (report.json)")
    if warnings:
        lines += ["", f"## Warnings ({len(warnings)})"] + [f"- {w}" for w in warnings[:MAX_LISTED]]
        if len(warnings) > MAX_LISTED:
            lines.append(f"- … and {len(warnings) - MAX_LISTED} more (report.json)")
    # The pictures Report.save draws after this: name only those that will be there.
    pictures = ["confusion_matrices.png"] if has_confusion(results) else []
    if plot_class_agreement(root / "verify" / "class_agreement.png", results, classes, reference_top1):
        pictures.append("class_agreement.png")
    if has_latency(results):
        pictures.append("tradeoffs.png")
    if pictures:
        lines += ["", "Pictures: " + ", ".join(f"`verify/{p}`" for p in pictures) + "."]
    atomic_write_text(root / "report.md", "\n".join(lines) + "\n")


# --- figure layout ------------------------------------------------------------------------------

@dataclass(frozen=True)
class ClassAxis:
    """How one axis of ``n`` classes is drawn: its length, label font and label step."""

    inches: float     # the matrix side (without labels)
    fontsize: float
    step: int         # every step-th class is labelled
    annotate: bool    # room for a number in each cell
    longest: int = 22  # characters in the longest label shown (longer ones are cut)

    @property
    def margin(self) -> float:
        """Inches the tick labels take (rotated on x)."""
        return 0.25 + self.longest * self.fontsize * 0.6 / 72


MAX_LABEL = 28  # characters of a class name in a picture; the tables have the whole name


def class_axis(n: int, cell: float = 0.45, min_cell: float = 0.085, cap: float = 12.0,
               names: list[str] | None = None) -> ClassAxis:
    """A class axis that is ``cell`` inches a class for few classes and shrinks towards
    ``min_cell`` (a 6-point label still fits) as classes grow; beyond ``cap`` inches the labels
    are thinned rather than shrunk below MIN_FONT."""
    n = max(n, 1)
    per = max(min_cell, min(cell, 4.0 / n))
    inches = min(per * n, cap)
    per = inches / n
    font = min(8.0, per * 72 * 0.8)
    step = 1 if font >= MIN_FONT else math.ceil(MIN_FONT / font)
    longest = min(MAX_LABEL, max((len(c) for c in names), default=1)) if names else 22
    return ClassAxis(inches, max(font, MIN_FONT), step, n <= ANNOTATE_MAX_CLASSES, longest)


def _short(name: str) -> str:
    return name if len(name) <= MAX_LABEL else name[:MAX_LABEL - 1] + "…"


def set_class_ticks(ax, classes: list[str], axis: ClassAxis, x: bool = True, y: bool = True) -> None:
    """Class names as tick labels (one axes with few ticks: the heat map)."""
    ticks = list(range(0, len(classes), axis.step))
    names = [_short(classes[i]) for i in ticks]
    if x:
        ax.set_xticks(ticks, names, rotation=90, fontsize=axis.fontsize)
    if y:
        ax.set_yticks(ticks, names, fontsize=axis.fontsize)


def label_classes(ax, classes: list[str], axis: ClassAxis, x: bool, y: bool) -> None:
    """Class names as plain text beside a matrix panel. Matplotlib ticks cost ~5 ms each to set
    up and measure: 17 panels × 2 × 101 of them took 28 s, plain text a fifth of that."""
    ax.set_xticks([])
    ax.set_yticks([])
    ty, tx = ax.get_yaxis_transform(), ax.get_xaxis_transform()
    for i in range(0, len(classes), axis.step):
        name = _short(classes[i])
        if y:
            ax.text(-0.01, i, name, transform=ty, ha="right", va="center", fontsize=axis.fontsize)
        if x:
            ax.text(i, -0.01, name, transform=tx, ha="center", va="top", rotation=90, fontsize=axis.fontsize)


@dataclass(frozen=True)
class MatrixGrid:
    """Square matrix panels laid out in inches: no tight_layout, which would measure every label."""

    fig: object
    axes: list
    colorbar_axes: list  # one per panel, empty when the cells carry numbers


def matrix_grid(n_panels: int, classes: list[str], axis: ClassAxis, cols: int, header: str) -> MatrixGrid:
    """A figure of ``n_panels`` matrices, ``cols`` a line, names on every panel up to 30 classes
    and on the outer ones beyond (the panels share one class order); ``header`` on top."""
    plt = pyplot_agg()
    title, top = 0.45, 0.35
    bar = 0.0 if axis.annotate else 0.55
    pw, ph = axis.margin + axis.inches + bar + 0.25, title + axis.inches + axis.margin
    nrows = (n_panels + cols - 1) // cols
    width, height = cols * pw, nrows * ph + top
    fig = plt.figure(figsize=(width, height))
    fig.text(0.5, 1 - 0.12 / height, header, ha="center", va="top", fontsize=9)
    axes, bars = [], []
    every = len(classes) <= 30
    for p in range(n_panels):
        r, c = divmod(p, cols)
        y0 = 1 - (top + r * ph + title + axis.inches) / height
        ax = fig.add_axes(((c * pw + axis.margin) / width, y0, axis.inches / width, axis.inches / height))
        label_classes(ax, classes, axis, x=every or p + cols >= n_panels, y=every or c == 0)
        axes.append(ax)
        if bar:
            bars.append(fig.add_axes(((c * pw + axis.margin + axis.inches + 0.08) / width, y0,
                                      0.12 / width, axis.inches / height)))
    return MatrixGrid(fig, axes, bars)


def annotate_cells(ax, matrix: np.ndarray, axis: ClassAxis, signed: bool = False, light_above=None) -> None:
    """Numbers in the non-zero cells, only where there is room for them."""
    if not axis.annotate:
        return
    size = min(7.0, axis.inches / max(len(matrix), 1) * 72 * 0.45)
    for (i, j), v in np.ndenumerate(matrix):
        if v:
            colour = "white" if light_above is not None and abs(v) > light_above else "black"
            ax.text(j, i, f"{v:+d}" if signed else str(v), ha="center", va="center", fontsize=size, color=colour)


def pyplot_agg():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def confusion_norm(cm: np.ndarray, axis: ClassAxis):
    """Linear colours where the cells carry numbers; a square-root scale where they do not, so
    that a single confusion among 101 classes still shows."""
    from matplotlib.colors import PowerNorm

    return None if axis.annotate else PowerNorm(0.5, vmin=0, vmax=max(1, int(cm.max())))


# --- pictures -----------------------------------------------------------------------------------

def plot_confusion_matrices(path: Path, results: list[dict], classes: list[str]) -> bool:
    """One panel per (artifact, runtime) that ran; False (nothing written) when no row has a
    matrix, as in an unlabelled report."""
    rows = [r for r in results if r.get("confusion_matrix")]
    if not rows or not classes:
        # A picture left from an earlier labelled run would contradict this report.
        Path(path).unlink(missing_ok=True)
        return False
    plt = pyplot_agg()
    axis = class_axis(len(classes), names=classes)
    grid = matrix_grid(len(rows), classes, axis, min(4, len(rows)), "rows: true class; columns: predicted")
    for k, (ax, r) in enumerate(zip(grid.axes, rows)):
        cm = np.asarray(r["confusion_matrix"])
        im = ax.imshow(cm, cmap="Blues", norm=confusion_norm(cm, axis), interpolation="nearest", aspect="auto")
        annotate_cells(ax, cm, axis, light_above=cm.max() / 2)
        if grid.colorbar_axes:
            grid.fig.colorbar(im, cax=grid.colorbar_axes[k]).ax.tick_params(labelsize=axis.fontsize)
        acc = f"\nacc {r['accuracy']:.3f}" if r.get("accuracy") is not None else ""
        ax.set_title(f"{r['artifact']} / {r['runtime']}{acc}", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    _savefig(grid.fig, path, dpi=100)
    plt.close(grid.fig)
    return True


def class_agreement_figure(results: list[dict], classes: list[str], reference_top1: list[int] | None = None):
    """Heat map: classes (rows, worst first, as in the tables) × converted (artifact, runtime)
    rows; None when no converted row has per-class figures. With ``reference_top1``
    (unlabelled) the rows are the reference's top-1 classes, those it puts no image in left out."""
    rows = agreement_rows(results)
    if not rows or not classes:
        return None
    table = class_agreement(results, classes, reference_top1)
    empty = set(unused_classes(table, reference_top1))
    table = [c for c in table if c.name not in empty]
    if not table:
        return None
    plt = pyplot_agg()
    classes = [c.name for c in table]
    values = np.array([[np.nan if v is None else v for v in c.per_row] for c in table], dtype=float)
    low = np.nanmin(values) if np.isfinite(values).any() else 1.0
    vmin = min(0.9, math.floor(low * 10) / 10)  # 0.1 steps: 0.99 and 1.0 still differ in colour
    y = class_axis(len(classes), cell=0.3, min_cell=0.11, cap=24.0, names=classes)
    x = class_axis(len(rows), cell=0.45, min_cell=0.2, cap=12.0)
    width = x.inches + y.margin + 1.6
    height = y.inches + x.margin + 1.6  # x labels: "artifact / runtime", up to ~35 characters
    fig, ax = plt.subplots(figsize=(max(4.5, width), max(3.0, height)))
    cmap = plt.get_cmap("RdYlGn").copy()
    cmap.set_bad("#d0d0d0")
    im = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=vmin, vmax=1, aspect="auto",
                   interpolation="nearest")
    if y.annotate and len(rows) <= 24:
        for (i, j), v in np.ndenumerate(values):
            if np.isfinite(v) and v < 1:
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=min(7, y.fontsize))
    set_class_ticks(ax, [c.name for c in table], y, x=False)
    ax.set_xticks(range(len(rows)), [f"{r['artifact']} / {r['runtime']}" for r in rows], rotation=90,
                  fontsize=min(8, max(MIN_FONT, x.fontsize)))
    what = "per class (worst first; grey: no test image)" if reference_top1 is None else \
        "per reference's top-1 class (worst first)"
    ax.set_title(f"top-1 agreement with the reference {what}", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.05, pad=0.02).ax.tick_params(labelsize=7)
    fig.tight_layout()
    return fig


def plot_class_agreement(path: Path, results: list[dict], classes: list[str],
                         reference_top1: list[int] | None = None) -> bool:
    """Writes :func:`class_agreement_figure` to ``path``; False (nothing written, an earlier
    picture removed) when there is nothing to show."""
    fig = class_agreement_figure(results, classes, reference_top1)
    if fig is None:
        Path(path).unlink(missing_ok=True)
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    _savefig(fig, path, dpi=100)
    pyplot_agg().close(fig)
    return True


def _clusters(points: np.ndarray, radius: float) -> list[list[int]]:
    """Indices of points (display pixels) grouped where they lie within ``radius`` of one another."""
    groups: list[list[int]] = []
    for i, p in enumerate(points):
        for g in groups:
            if np.min(np.hypot(*(points[g] - p).T)) <= radius:
                g.append(i)
                break
        else:
            groups.append([i])
    return groups


def _merged_label(members: list[dict], extra=None) -> str:
    """One label for coinciding points: one line per artifact, its runtimes in brackets."""
    by_artifact: dict[str, list[str]] = {}
    for r in members:
        tail = f" {extra(r)}" if extra else ""
        by_artifact.setdefault(r["artifact"], []).append(r["runtime"] + tail)
    return "\n".join(f"{a} ({', '.join(rts)})" if len(members) > 1 else f"{a}\n{rts[0]}"
                     for a, rts in by_artifact.items())


def place_labels(ax, xy: list[tuple[float, float]], labels: list[str], fontsize: float = 6.5) -> list:
    """Annotates each point with its label where the label overlaps no other label, no point and
    stays inside the axes: nearest free spot on rings of growing radius, a leader line when moved
    away. Call after the figure's layout is final (positions are in display pixels)."""
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    pts = ax.transData.transform(np.asarray(xy, dtype=float))
    frame = ax.get_window_extent(renderer)
    blocked = [(x - 4, y - 4, x + 4, y + 4) for x, y in pts]
    placed = []
    directions = [(1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1)]

    def overlap(a, b) -> float:
        w = min(a[2], b[2]) - max(a[0], b[0])
        h = min(a[3], b[3]) - max(a[1], b[1])
        return w * h if w > 0 and h > 0 else 0.0

    for (x, y), (px, py), text in zip(xy, pts, labels):
        best = None
        for radius in (5, 12, 22, 34, 48, 64, 84):
            for dx, dy in directions:
                ann = ax.annotate(text, (x, y), xytext=(dx * radius, dy * radius), textcoords="offset points",
                                  fontsize=fontsize, ha={1: "left", -1: "right", 0: "center"}[dx],
                                  va={1: "bottom", -1: "top", 0: "center"}[dy], annotation_clip=False)
                e = ann.get_window_extent(renderer)
                box = (e.x0, e.y0, e.x1, e.y1)
                cost = sum(overlap(box, b) for b in blocked)
                outside = (max(0, frame.x0 - box[0]) + max(0, box[2] - frame.x1)
                           + max(0, frame.y0 - box[1]) + max(0, box[3] - frame.y1))
                cost += outside * 50 + radius * 0.01  # nearer is better among free spots
                if best is None or cost < best[0]:
                    if best is not None:
                        best[1].remove()
                    best = (cost, ann, box, radius)
                else:
                    ann.remove()
                if cost < 1:
                    break
            if best[0] < 1:
                break
        _, ann, box, radius = best
        if radius > 12:  # moved away: a leader line says whose label it is (drawn after measuring)
            offset, ha, va = ann.xyann, ann.get_ha(), ann.get_va()
            ann.remove()
            ann = ax.annotate(text, (x, y), xytext=offset, textcoords="offset points", fontsize=fontsize,
                              ha=ha, va=va, annotation_clip=False,
                              arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.6, "shrinkA": 0, "shrinkB": 3})
        blocked.append(box)
        placed.append(ann)
    return placed


def tradeoffs_figure(results: list[dict]):
    """Size vs latency and size vs accuracy, one point per (artifact, runtime); green = passed.
    A vertical bar from p50 to p90 where the row has a p90; points that coincide share one label.
    When no row has an accuracy (an unlabelled report) the second panel is size vs top-1
    agreement instead. None when no row has a latency."""
    rows = tradeoff_rows(results)
    if not rows:
        return None
    plt = pyplot_agg()
    labelled = any(r.get("accuracy") is not None for r in rows)
    key = "accuracy" if labelled else "top1_agreement"
    fig, (a, b) = plt.subplots(1, 2, figsize=(14, max(5.2, 0.3 * len(rows))))
    for r in rows:
        colour = "tab:green" if r["passed"] else "tab:red"
        mb = r["size_bytes"] / 1e6
        a.scatter(mb, r["latency_ms"], c=colour, s=30, zorder=3)
        if r.get("latency_p90_ms") is not None:
            a.vlines(mb, r["latency_ms"], r["latency_p90_ms"], colors=colour, lw=1.2, alpha=0.6, zorder=2)
        if r.get(key) is not None:
            b.scatter(mb, r[key], c=colour, s=30, zorder=3)
    a.set_yscale("log")
    a.set_xlabel("size (MB)")
    a.set_ylabel("ms per image (1 thread" + ("; bar: p50 to p90)" if has_p90(rows) else ")"))
    a.set_title("size vs latency (green = passed its gate)")
    b.set_xlabel("size (MB)")
    if labelled:
        b.set_ylabel("test accuracy")
        b.set_title("size vs accuracy (label: top-1 agreement)")
    else:
        b.set_ylabel("top-1 agreement with the reference")
        b.set_title("size vs top-1 agreement (no true labels)")
    for ax in (a, b):
        ax.margins(x=0.25, y=0.2)  # room for the labels inside the axes
    fig.tight_layout()
    extra = (lambda r: f"{r['top1_agreement']:.3f}") if labelled else None
    with_key = [r for r in rows if r.get(key) is not None]
    for ax, k, lab, shown in ((a, "latency_ms", None, rows), (b, key, extra, with_key)):
        if not shown:
            continue
        xy = [(r["size_bytes"] / 1e6, r[k]) for r in shown]
        groups = _clusters(ax.transData.transform(np.asarray(xy, dtype=float)), radius=6)
        place_labels(ax, [xy[g[0]] for g in groups], [_merged_label([shown[i] for i in g], lab) for g in groups])
    return fig


def plot_tradeoffs(path: Path, results: list[dict]) -> bool:
    """Writes :func:`tradeoffs_figure` to ``path``; False (nothing written, an earlier picture
    removed: report.html inlines whatever is there) when no row has a latency."""
    fig = tradeoffs_figure(results)
    if fig is None:
        Path(path).unlink(missing_ok=True)
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    _savefig(fig, path, dpi=90)
    pyplot_agg().close(fig)
    return True


def plot_training(path: Path, history: dict) -> None:
    plt = pyplot_agg()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = history.get("epoch") or list(range(1, len(history["train_loss"]) + 1))
    for key, ax in (("loss", a), ("accuracy", b)):
        ax.plot(epochs, history[f"train_{key}"], label="train")
        if history.get(f"val_{key}"):
            ax.plot(epochs, history[f"val_{key}"], label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.legend()
    fig.tight_layout()
    _savefig(fig, path, dpi=100)
    plt.close(fig)


def _savefig(fig, path: Path, dpi: int) -> None:
    """PNG written atomically, like every other file in the run directory."""
    buf = io.BytesIO()
    # zlib level 1: a 101-class grid is 20 Mpx; level 6 (the default) took 2 s more for 1.3x smaller.
    fig.savefig(buf, dpi=dpi, format="png", pil_kwargs={"compress_level": 1})
    atomic_write_bytes(path, buf.getvalue())

"""report.json, report.md and the pictures (confusion matrices, size/latency/accuracy)."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from pipeline.rundir import atomic_write_bytes, atomic_write_json, atomic_write_text

MAX_LISTED = 50  # skipped images and warnings listed in report.md; report.json has them all

COLUMNS = [
    ("artifact", "artifact", "{}"), ("runtime", "runtime", "{}"),
    ("top1_agreement", "agree", "{:.4f}"), ("accuracy", "acc", "{:.4f}"),
    ("macro_precision", "P", "{:.4f}"), ("macro_recall", "R", "{:.4f}"), ("macro_f1", "F1", "{:.4f}"),
    ("max_abs_diff", "max|Δp|", "{:.2e}"), ("mean_abs_diff", "mean|Δp|", "{:.2e}"),
    ("size_bytes", "size", "{}"), ("latency_ms", "ms/img", "{:.2f}"), ("gate", "gate", "{:.2f}"),
    ("passed", "ok", "{}"),
]


def _fmt(key: str, fmt: str, value) -> str:
    if value is None:
        return "—"
    if key == "size_bytes":
        return f"{value / 1e6:.2f} MB"
    if key == "passed":
        return "PASS" if value else "FAIL"
    return fmt.format(value)


def markdown_table(results: list[dict]) -> str:
    head = "| " + " | ".join(h for _, h, _ in COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
    rows = ["| " + " | ".join(_fmt(k, f, r.get(k)) for k, _, f in COLUMNS) + " |" for r in results]
    return "\n".join([head, rule, *rows])


def write_reports(root: Path, report: dict) -> None:
    """Writes report.json and report.md at the run-directory root."""
    atomic_write_json(root / "report.json", report)
    lines = [
        f"# edgepipe verification: {report['backbone']}",
        "",
        f"{report['n_test']} test images, {len(report['classes'])} classes "
        f"({', '.join(report['classes'])}). Reference: the exported SavedModel in TensorFlow.",
        "",
        markdown_table(report["results"]),
        "",
    ]
    failures = [r for r in report["results"] if not r["passed"]]
    if failures:
        lines.append("## Failed")
        for r in failures:
            why = r.get("error") or f"top-1 agreement {r['top1_agreement']:.4f} < gate {r['gate']:.2f}"
            lines.append(f"- {r['artifact']} in {r['runtime']}: {why}")
    else:
        lines.append("Every artifact passed its gate in every runtime.")
    skipped, warnings = report.get("skipped_images") or [], report.get("warnings") or []
    lines += ["", f"Images skipped as unreadable: {len(skipped)}."]
    lines += [f"- `{s['path']}`: {s['reason']}" for s in skipped[:MAX_LISTED]]
    if len(skipped) > MAX_LISTED:
        lines.append(f"- … and {len(skipped) - MAX_LISTED} more (report.json)")
    if warnings:
        lines += ["", f"## Warnings ({len(warnings)})"] + [f"- {w}" for w in warnings[:MAX_LISTED]]
        if len(warnings) > MAX_LISTED:
            lines.append(f"- … and {len(warnings) - MAX_LISTED} more (report.json)")
    lines += ["", "Pictures: `verify/confusion_matrices.png`, `verify/tradeoffs.png`."]
    atomic_write_text(root / "report.md", "\n".join(lines) + "\n")


def plot_confusion_matrices(path: Path, results: list[dict], classes: list[str]) -> None:
    """One panel per (artifact, runtime) that ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results if r.get("confusion_matrix")]
    if not rows:
        return
    cols = min(4, len(rows))
    nrows = (len(rows) + cols - 1) // cols
    size = max(3.0, 0.45 * len(classes) + 1.5)
    fig, axes = plt.subplots(nrows, cols, figsize=(size * cols, size * nrows), squeeze=False)
    for ax in axes.flat[len(rows):]:
        ax.axis("off")
    for ax, r in zip(axes.flat, rows):
        cm = np.asarray(r["confusion_matrix"])
        ax.imshow(cm, cmap="Blues")
        for (i, j), v in np.ndenumerate(cm):
            if v:
                ax.text(j, i, str(v), ha="center", va="center", fontsize=7,
                        color="white" if v > cm.max() / 2 else "black")
        ax.set_title(f"{r['artifact']} / {r['runtime']}\nacc {r['accuracy']:.3f}", fontsize=9)
        ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=7)
        ax.set_yticks(range(len(classes)), classes, fontsize=7)
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_ylabel("true", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    _savefig(fig, path, dpi=100)
    plt.close(fig)


def plot_tradeoffs(path: Path, results: list[dict]) -> None:
    """Size vs latency and size vs accuracy, one point per (artifact, runtime); green = passed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results if r.get("latency_ms") is not None]
    if not rows:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.8))
    for r in rows:
        colour = "tab:green" if r["passed"] else "tab:red"
        label = f"{r['artifact']}\n{r['runtime']}"
        a.scatter(r["size_bytes"] / 1e6, r["latency_ms"], c=colour, s=40)
        a.annotate(label, (r["size_bytes"] / 1e6, r["latency_ms"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
        b.scatter(r["size_bytes"] / 1e6, r["accuracy"], c=colour, s=40)
        b.annotate(f"{label} ({r['top1_agreement']:.3f})", (r["size_bytes"] / 1e6, r["accuracy"]), fontsize=6,
                   xytext=(3, 3), textcoords="offset points")
    a.set_yscale("log")
    a.set_xlabel("size (MB)")
    a.set_ylabel("ms per image (1 thread)")
    a.set_title("size vs latency (green = passed its gate)")
    b.set_xlabel("size (MB)")
    b.set_ylabel("test accuracy")
    b.set_title("size vs accuracy (label: top-1 agreement)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    _savefig(fig, path, dpi=90)
    plt.close(fig)


def plot_training(path: Path, history: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.savefig(buf, dpi=dpi, format="png")
    atomic_write_bytes(path, buf.getvalue())

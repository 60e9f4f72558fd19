"""report.html: one self-contained page (pictures inlined), readable offline."""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np

from pipeline.report import (
    REPAIR_COLUMNS,
    agreement_rows,
    annotate_cells,
    class_agreement,
    class_agreement_figure,
    class_axis,
    classes_text,
    confusion_norm,
    has_confusion,
    has_p90,
    is_labelled,
    latency_text,
    matrix_grid,
    model_cells,
    model_warnings,
    no_image_text,
    pyplot_agg,
    reference_counts,
    reference_text,
    repair_rows,
    repair_summary,
    report_title,
    unlabelled_text,
    unused_classes,
    worst_in_text,
    worst_text,
)
from pipeline.rundir import atomic_write_text

CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1300px;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}.pass{color:#176b1b;font-weight:600}.fail{color:#b00020;font-weight:600}
.banner{padding:.8em 1em;border-radius:6px;margin:1em 0}.ok{background:#e6f4e6}.bad{background:#fde7ea}
.thumbs{display:flex;flex-wrap:wrap;gap:8px}.thumbs figure{margin:0;font-size:11px;width:100px}
.thumbs img{width:96px;height:96px;object-fit:cover;border:1px solid #ccc}img.plot{max-width:100%}
th.v{writing-mode:vertical-rl;transform:rotate(180deg);text-align:left;white-space:nowrap;font-weight:normal;padding:5px 2px}
td.a{font-size:11px;padding:2px 3px}td.one{color:#aaa}.wide{overflow-x:auto}.note{background:#fff6dd}
span.src{color:#777;font-size:11px}
"""


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _thumb(rgb: np.ndarray) -> str:
    from PIL import Image

    im = Image.fromarray(rgb)
    im.thumbnail((96, 96))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _confusion_figure(results: list[dict], classes: list[str]):
    """The reference's confusion matrix, then for each (artifact, runtime) whose matrix differs
    from it the difference; ``(picture, names of the rows identical to the reference)``.
    Each row's own matrix is in verify/confusion_matrices.png."""
    plt = pyplot_agg()
    rows = [r for r in results if r.get("confusion_matrix")]
    ref = np.asarray(rows[0]["confusion_matrix"])
    deltas = [(r, np.asarray(r["confusion_matrix"]) - ref) for r in rows[1:]]
    same = [f"{r['artifact']} / {r['runtime']}" for r, d in deltas if not d.any()]
    panels = [(rows[0], None)] + [(r, d) for r, d in deltas if d.any()]
    axis = class_axis(len(classes), cell=0.32, cap=10.0, names=classes)
    # Many classes: two panels a line, so the page (1300 px) still shows about 5 px a class.
    grid = matrix_grid(len(panels), classes, axis, min(len(panels), 4 if axis.annotate else 2),
                       "rows: true class; columns: predicted")
    for k, (ax, (r, delta)) in enumerate(zip(grid.axes, panels)):
        if delta is None:
            im = ax.imshow(ref, cmap="Blues", norm=confusion_norm(ref, axis), interpolation="nearest", aspect="auto")
            annotate_cells(ax, ref, axis, light_above=ref.max() / 2)
            ax.set_title(f"reference: {r['artifact']} / {r['runtime']}", fontsize=8)
        else:
            lim = max(1, np.abs(delta).max())
            im = ax.imshow(delta, cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest", aspect="auto")
            annotate_cells(ax, delta, axis, signed=True, light_above=lim / 2)
            ax.set_title(f"{r['artifact']} / {r['runtime']}: Δ vs reference", fontsize=8)
        if grid.colorbar_axes:
            grid.fig.colorbar(im, cax=grid.colorbar_axes[k]).ax.tick_params(labelsize=axis.fontsize)
    fig = grid.fig
    src = _png(fig)
    plt.close(fig)
    return src, same


def _agreement_section(results: list[dict], classes: list[str], reference_top1: list[int] | None = None) -> list[str]:
    """Classes as rows, worst first: images, worst agreement and where, then one narrow column per
    converted (artifact, runtime), shaded by how far below 1 it is. With ``reference_top1``
    (unlabelled) the classes are the reference's top-1 class; those it puts no image in are left
    out and named after the table."""
    e = html.escape
    rows = agreement_rows(results)
    if not rows:
        return []
    table = class_agreement(results, classes, reference_top1)
    empty = unused_classes(table, reference_top1)
    table = [c for c in table if c.name not in set(empty)] if empty else table
    if reference_top1 is None:
        out = ["<h2>Agreement per class</h2><p>Top-1 agreement with the reference, one row per class, worst first, "
               f"over the {len(rows)} converted (artifact, runtime) rows.</p>"]
        col = "class"
    else:
        out = ["<h2>Agreement per reference's top-1 class</h2><p>Top-1 agreement with the reference, the images "
               "grouped by the class the reference gives them, one row per class, worst first, over the "
               f"{len(rows)} converted (artifact, runtime) rows; images: how many the reference puts in the class.</p>"]
        col = "reference's top-1 class"
    if len(table) > 30:
        # At many classes the picture shows the pattern that the long table hides.
        fig = class_agreement_figure(results, classes, reference_top1)
        out.append(f"<img class=plot src='{_png(fig)}'>")
        pyplot_agg().close(fig)
    heads = "".join(f"<th class=v title='{e(r['artifact'])} / {e(r['runtime'])}'>{e(r['artifact'])} / "
                    f"{e(r['runtime'])}</th>" for r in rows)
    out.append(f"<div class=wide><table><tr><th class=l>{e(col)}</th><th>images</th><th>worst</th><th class=l>in</th>"
               f"{heads}</tr>")
    for c in table:
        cells = []
        for v in c.per_row:
            if v is None:
                cells.append("<td class=a>—</td>")
            elif v >= 1:
                cells.append("<td class='a one'>1</td>")
            else:
                # 1.0 white, 0.9 and below full red: the eye finds the bad cells in 101 rows.
                alpha = min(1.0, (1 - v) / 0.1) * 0.75 + 0.1
                cells.append(f"<td class=a style='background:rgba(214,39,40,{alpha:.2f})'>{v:.3f}</td>")
        n = "—" if c.n_images is None else str(c.n_images)
        out.append(f"<tr><td class=l>{e(c.name)}</td><td>{n}</td><td>{e(worst_text(c))}</td>"
                   f"<td class=l>{e(worst_in_text(c, len(rows)))}</td>{''.join(cells)}</tr>")
    out.append("</table></div>")
    if empty:
        out.append(f"<p>{e(no_image_text(empty))}</p>")
    return out


def _models_section(models: list[dict]) -> list[str]:
    """A check report's models: one row per model, reference first (the same cells as report.md),
    each preprocessing setting with where it came from; then every model's warnings."""
    if not models:
        return []
    e = html.escape
    heads, rows = model_cells(models)
    out = ["<h2>Models</h2><p>Preprocessing settings as value (where it came from).</p><div class=wide><table><tr>"
           + "".join(f"<th class=l>{e(h)}</th>" for h in heads) + "</tr>"]
    for row in rows:
        cells = "".join(f"<td class=l>{e(value)}" + (f" <span class=src>({e(source)})</span>" if source else "")
                        + "</td>" for value, source in row)
        out.append(f"<tr>{cells}</tr>")
    out.append("</table></div><p>Files:</p><ul>"
               + "".join(f"<li>{e(str(m.get('name')))}: <code>{e(str(m.get('path')))}</code></li>" for m in models)
               + "</ul>")
    warnings = model_warnings(models)
    if warnings:
        out.append(f"<div class='banner note'><b>Warnings about the models ({len(warnings)})</b><ul>"
                   + "".join(f"<li>{e(w)}</li>" for w in warnings[:200]) + "</ul></div>")
    return out


def _fmt(v, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def _mb(v) -> str:
    return "—" if v is None else f"{v / 1e6:.2f}"


def _why(r: dict) -> str:
    if r.get("error"):
        return r["error"]
    return f"top-1 agreement {r['top1_agreement']:.4f} < gate {r['gate']:.2f}"


def _ok(r: dict) -> str:
    return "<span class=pass>PASS</span>" if r["passed"] else "<span class=fail>FAIL</span>"


# The results table: (head, cell, shown only when labelled). Unlabelled reports leave the
# accuracy columns out rather than fill them with dashes.
RESULT_COLUMNS = [
    ("artifact", lambda r: html.escape(r["artifact"]), False),
    ("runtime", lambda r: html.escape(r["runtime"]), False),
    ("agreement", lambda r: _fmt(r["top1_agreement"], ".4f"), False),
    ("gate", lambda r: _fmt(r.get("gate"), ".2f"), False),
    ("accuracy", lambda r: _fmt(r.get("accuracy"), ".4f"), True),
    ("macro P", lambda r: _fmt(r.get("macro_precision"), ".4f"), True),
    ("macro R", lambda r: _fmt(r.get("macro_recall"), ".4f"), True),
    ("macro F1", lambda r: _fmt(r.get("macro_f1"), ".4f"), True),
    ("max |Δp|", lambda r: _fmt(r["max_abs_diff"], ".2e"), False),
    ("mean |Δp|", lambda r: _fmt(r["mean_abs_diff"], ".2e"), False),
    ("KL", lambda r: _fmt(r.get("kl_divergence"), ".2e"), False),
    ("size MB", lambda r: _mb(r.get("size_bytes")), False),
    ("ms/img", latency_text, False),
    ("result", _ok, False),
]
LEFT = {"artifact", "runtime"}


def _results_table(results: list[dict], labelled: bool) -> str:
    columns = [c for c in RESULT_COLUMNS if labelled or not c[2]]
    ms_head = "ms/img p50 / p90" if has_p90(results) else "ms/img"
    heads = "".join(f"<th class=l>{h}</th>" if h in LEFT else f"<th>{html.escape(ms_head if h == 'ms/img' else h)}</th>"
                    for h, _, _ in columns)
    out = [f"<h2>Results</h2><table><tr>{heads}</tr>"]
    for r in sorted(results, key=lambda r: (r.get("size_bytes") is None, r.get("size_bytes") or 0)):
        out.append("<tr>" + "".join(f"<td class=l>{f(r)}</td>" if h in LEFT else f"<td>{f(r)}</td>"
                                    for h, f, _ in columns) + "</tr>")
    out.append("</table>")
    return "".join(out)


def _recommendation(rec: dict) -> str:
    """The recommendation banner; its accuracy only where there is one (not in unlabelled reports)."""
    e = html.escape
    acc = f", accuracy {rec['accuracy']:.4f}" if rec.get("accuracy") is not None else ""
    return (f"<div class='banner ok'><b>Recommended:</b> {e(rec['artifact'])} — {_mb(rec.get('size_bytes'))} MB, "
            f"{_fmt(rec['latency_ms'], '.2f')} ms/image in {e(rec['runtime'])}{acc}, "
            f"agreement ≥ {rec['top1_agreement']:.4f} ({e(rec['why'])}). Fastest passing: "
            f"{e(rec['fastest']['artifact'])} in {e(rec['fastest']['runtime'])} "
            f"({_fmt(rec['fastest']['latency_ms'], '.2f')} ms).</div>")


def _drift_section(results: list[dict]) -> list[str]:
    from pipeline.report import drift_rows, ran_on_text

    rows = drift_rows(results)
    if not rows:
        return []

    def f(v, spec):
        return "—" if v is None else format(v, spec)

    out = ["<h2>Drift from the same file elsewhere</h2><p>Each row against the same file in its twin runtime "
           "(arm64 against x86, Chromium against Node), on the same test images; LSBs are steps of the file's "
           "quantised output.</p><table><tr><th class=l>artifact</th><th class=l>runtime</th><th>test images</th>"
           "<th class=l>vs</th><th>top-1 agreement</th><th>max |Δp|</th><th>LSBs</th><th class=l>ran on</th></tr>"]
    for r in rows:
        out.append(f"<tr><td class=l>{html.escape(r['artifact'])}</td><td class=l>{html.escape(r['runtime'])}</td>"
                   f"<td>{r.get('sample_size') or 'all'}</td><td class=l>{html.escape(r.get('twin_runtime') or '—')}</td>"
                   f"<td>{f(r.get('twin_top1_agreement'), '.4f')}</td><td>{f(r.get('twin_max_abs_diff'), '.2e')}</td>"
                   f"<td>{f(r.get('twin_max_lsb'), 'g')}</td><td class=l>{html.escape(ran_on_text(r.get('ran_on') or {}))}</td></tr>")
    return out + ["</table>"]


def _repair_section(repaired: dict, run_root: Path) -> list[str]:
    """A repair's attempts as report.md shows them (:func:`pipeline.report.repair_rows`), with its
    picture (``quantize/repair-<mode>.png``) inlined when it is there."""
    e = html.escape
    heads = "".join(f"<th{' class=l' if k in (0, len(REPAIR_COLUMNS) - 1) else ''}>{e(c)}</th>"
                    for k, c in enumerate(REPAIR_COLUMNS))
    out = [f"<h2>{e(repaired['mode'])} repair</h2><p>{e(repair_summary(repaired))}</p><table><tr>{heads}</tr>"]
    for row in repair_rows(repaired):
        cells = "".join(f"<td{' class=l' if k in (0, len(row) - 1) else ''}>{e(v)}</td>" for k, v in enumerate(row))
        out.append(f"<tr>{cells}</tr>")
    out.append("</table>")
    layers = (repaired.get("chosen") or {}).get("float_layers")
    if layers:
        out.append("<p>Layers kept in float: " + ", ".join(f"<code>{e(t)}</code>" for t in layers) + ".</p>")
    png = Path(run_root) / "quantize" / f"repair-{repaired['mode']}.png"
    if png.is_file():
        out.append(f"<img class=plot src='data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()}'>")
    return out


def write_html_report(path: Path, report: dict, images: list[np.ndarray],
                      tradeoffs_png: Path | None = None) -> None:
    """Writes the page; ``images`` are the decoded test images in report order (for thumbnails),
    ``tradeoffs_png`` the size/latency/accuracy plot written by the verify stage."""
    e = html.escape
    classes = report["classes"]
    results = report["results"]
    labelled = is_labelled(report)
    title = report_title(report)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title>"
             f"<style>{CSS}</style></head><body>"]
    parts.append(f"<h1>{e(title)}</h1>")
    parts.append(f"<p>{report['n_test']} test images, {e(classes_text(classes))}. {e(reference_text(report))}</p>")
    if not labelled:
        parts.append(f"<div class='banner note'>{e(unlabelled_text(report))}</div>")
    failed = [r for r in results if not r["passed"]]
    if failed:
        items = "".join(f"<li>{e(r['artifact'])} in {e(r['runtime'])}: {e(_why(r))}</li>" for r in failed)
        parts.append(f"<div class='banner bad'><b>{len(failed)} failed</b><ul>{items}</ul></div>")
    else:
        parts.append("<div class='banner ok'><b>Every artifact passed its gate in every runtime.</b></div>")
    app = report.get("app_preprocessing") or {}
    if app.get("differences"):
        parts.append("<div class='banner bad'>Converted models were fed as the app prepares images, which differs "
                     f"from the contract: {e('; '.join(app['differences']))}.</div>")
    rec = report.get("recommendation")
    if rec:
        parts.append(_recommendation(rec))

    parts.append(_results_table(results, labelled))
    if report.get("findings"):
        parts.append("<h2>Findings</h2><ul>" + "".join(f"<li>{e(f)}</li>" for f in report["findings"]) + "</ul>")
    parts += _drift_section(results)
    for repaired in report.get("repairs") or []:
        parts += _repair_section(repaired, Path(path).parent)
    parts += _models_section(report.get("models") or [])
    if tradeoffs_png is not None and Path(tradeoffs_png).is_file():
        # The same picture as verify/tradeoffs.png (pipeline.report.plot_tradeoffs), inlined.
        src = "data:image/png;base64," + base64.b64encode(Path(tradeoffs_png).read_bytes()).decode()
        heading = "Size, latency, accuracy" if labelled else "Size, latency, agreement"
        parts.append(f"<h2>{heading}</h2><img class=plot src='{src}'>")

    parts += _agreement_section(results, classes, reference_counts(report))

    parts.append("<h2>Images whose top-1 flipped</h2>")
    any_flip = False
    for r in results:
        if not r.get("flipped"):
            continue
        any_flip = True
        figs = []
        for idx, to in zip(r["flipped"], r.get("flipped_to", [])):
            name = Path(report["test_images"][idx]).name if idx < len(report.get("test_images", [])) else str(idx)
            thumb = _thumb(images[idx]) if idx < len(images) else ""
            was = report.get("reference_top1", [])
            before = e(classes[was[idx]]) + " → " if idx < len(was) else "→ "
            figs.append(f"<figure><img src='{thumb}' alt='{e(name)}'><figcaption>{e(name)}<br>{before}"
                        f"{e(classes[to])}</figcaption></figure>")
        parts.append(f"<h3>{e(r['artifact'])} / {e(r['runtime'])}: {len(r['flipped'])}</h3><div class=thumbs>{''.join(figs)}</div>")
    if not any_flip:
        parts.append("<p>None: every converted model gives the reference's top-1 on every test image.</p>")

    # Unlabelled rows have no matrix; a labelled one needs the reference's to show differences from.
    if labelled and has_confusion(results) and results[0].get("confusion_matrix"):
        src, same = _confusion_figure(results, classes)
        note = f" Identical to the reference: {e(', '.join(same))}." if same else ""
        parts.append("<h2>Confusion matrices</h2><p>Rows: true class; columns: predicted. First the reference's "
                     f"matrix, then each converted model's difference from it.{note} Each model's own matrix: "
                     f"verify/confusion_matrices.png.</p><img class=plot src='{src}'>")

    if report.get("stress"):
        acc_heads = "<th>accuracy</th><th>drop</th>" if labelled else ""
        parts.append("<h2>Preprocessing stress (reference model, the usual app mistakes)</h2><table><tr>"
                     f"<th class=l>mistake</th><th class=l>setting</th>{acc_heads}"
                     "<th>agreement</th><th>mean |Δp|</th></tr>")
        for s in report["stress"]:
            acc = (f"<td>{_fmt(s.get('accuracy'), '.4f')}</td><td>{_fmt(s.get('accuracy_drop'), '+.4f')}</td>"
                   if labelled else "")
            parts.append(f"<tr><td class=l>{e(s['mistake'])}</td><td class=l>{e(s['setting'])}</td>{acc}"
                         f"<td>{_fmt(s.get('top1_agreement'), '.4f')}</td>"
                         f"<td>{_fmt(s.get('mean_abs_diff'), '.3e')}</td></tr>")
        parts.append("</table>")
    skipped, warnings = report.get("skipped_images") or [], report.get("warnings") or []
    if skipped or warnings:
        parts.append("<h2>Data problems</h2><ul>"
                     + "".join(f"<li>skipped {e(s['path'])}: {e(s['reason'])}</li>" for s in skipped[:200])
                     + "".join(f"<li>warning: {e(w)}</li>" for w in warnings[:200]) + "</ul>")
    parts.append("</body></html>")
    atomic_write_text(path, "\n".join(parts))

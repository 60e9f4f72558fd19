"""``edgepipe compare``: the same images through several backbones (and fine-tuning settings), one table.

Each row is a whole run (fetch → retrain → export → quantize → tfjs → verify) in its own run
directory ``OUT/<row>/``, configured as ``edgepipe run`` configures one (the directory's saved
configuration with the options over it), so each stays usable by ``edgepipe verify --out OUT/<row>``
and a second comparison skips every stage that is up to date. The bottleneck cache is the usual one,
shared by the rows and by later runs.

The table reads only the rows' files (``retrain/metrics.json``, ``manifest.json``, ``report.json``,
``export/savedmodel``), so :func:`read_row` describes any finished run directory. Usage::

    import pipeline
    result = pipeline.compare(pipeline.CompareSettings(
        out="cmp", backbones=("mobilenet_v1_0.25_224", "mobilenet_v1_0.25_128"),
        options={"images": "photos/train", "test_images": "photos/test", "runtimes": ["ai-edge-litert"]}))
    print(result.recommendation["line"])
"""
from __future__ import annotations

import dataclasses
import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from pipeline.config import RunConfig, load_config
from pipeline.console import import_tensorflow_quietly, log
from pipeline.errors import ConfigError, PipelineError, VerificationFailed
from pipeline.types import Runtime

# What identifies a --graph row and how to feed it: these go to that row only.
GRAPH_OPTIONS = ("graph", "input_tensor", "bottleneck_tensor", "input_size", "mean", "std")
# RunConfig.with_options names compare takes otherwise: the rows name the backbone and the
# fine-tuning, and an adopted --model-graph is not trained, so it is no backbone to compare.
NOT_OPTIONS = {
    "backbone": "name each backbone in CompareSettings.backbones (--backbone NAME, repeat)",
    "fine_tune": "give the settings in CompareSettings.fine_tune (--fine-tune N, repeat)",
    "model_graph": "an adopted graph is not trained, so it has no backbone to compare; check it with "
                   "`edgepipe run --model-graph`",
    "output_tensor": "it goes with --model-graph, which compare does not take",
    "labels": "it goes with --model-graph, which compare does not take",
}
ONE_POINT = 0.01  # "within one accuracy point" of the most accurate row
# The runtime whose agreement and latency the table shows: the Pi's and Android's TFLite runtime.
TABLE_RUNTIME = Runtime.LITERT
NOT_RUN = "not run"


@dataclass(frozen=True)
class CompareSettings:
    """Everything ``edgepipe compare`` takes.

    Attributes:
        out: the comparison's folder: one run directory per row, compare.json/md/html and
            confusion_matrices.png.
        backbones: catalog backbones, one row (per fine-tuning setting) each.
        fine_tune: backbone blocks to fine-tune, one row per backbone and setting (0: the head
            only); a row with N > 0 is named ``<backbone>+ft<N>``.
        options: every other option, as :meth:`RunConfig.with_options` names them (``images``,
            ``test_images``, ``epochs``, ``quant_modes``, ``runtimes``, ...), the same for every
            row. ``graph`` (with ``input_tensor``, ``bottleneck_tensor``, ``input_size``,
            ``mean``, ``std``) adds your own frozen graph as one more backbone, named after the
            catalog row it is recognised as, else its file name's stem.
        verbose: show TensorFlow's and the converters' own output on the console.
    """

    out: Path
    backbones: tuple[str, ...] = ()
    fine_tune: tuple[int, ...] = (0,)
    options: Mapping[str, Any] = field(default_factory=dict)
    verbose: bool = False

    def __post_init__(self):
        object.__setattr__(self, "out", Path(self.out))
        object.__setattr__(self, "backbones", tuple(self.backbones))
        object.__setattr__(self, "fine_tune", tuple(self.fine_tune) or (0,))
        object.__setattr__(self, "options", dict(self.options))

    @property
    def given(self) -> set[str]:
        """The options set explicitly (as ``edgepipe run`` counts them: an empty list is not)."""
        return {k for k, v in self.options.items() if v not in (None, [], ())}

    def to_dict(self) -> dict:
        return {"out": str(self.out), "backbones": list(self.backbones), "fine_tune": list(self.fine_tune),
                "options": {k: _plain(v) for k, v in self.options.items() if v not in (None, [], ())}}


def _plain(value):
    """An option value as JSON holds it (paths and enums as text)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value if isinstance(value, (bool, int, float)) or value is None else str(value)


@dataclass(frozen=True)
class PlannedRow:
    """One row before it runs: its name (and run directory's), backbone, fine-tuning, configuration."""

    name: str
    backbone: str
    fine_tune: int
    config: RunConfig
    given: frozenset[str]


def row_name(backbone: str, fine_tune: int) -> str:
    """``mobilenet_v1_0.25_224``, or ``mobilenet_v1_0.25_224+ft2`` with two blocks fine-tuned."""
    return backbone if fine_tune == 0 else f"{backbone}+ft{fine_tune}"


def _row_config(out: Path, options: Mapping[str, Any], fine_tune: int) -> RunConfig:
    """What ``edgepipe run --out OUT ...`` would run: the saved configuration with ``options`` over it."""
    cfg = (load_config(out) or RunConfig(out=out)).with_options(**options)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, fine_tune=fine_tune))


def _graph_name(options: Mapping[str, Any], out: Path) -> tuple[str, str]:
    """A --graph row's name (the catalog row it is recognised as, else the file's stem) and its
    backbone column (the file's name)."""
    path = Path(options["graph"])
    try:
        graph = RunConfig(out=out).with_options(**options).resolved().graph
        return graph.recognised_as or path.stem, path.name
    except (PipelineError, OSError):
        return path.stem, path.name  # validation says what is wrong with it


def plan(settings: CompareSettings) -> list[PlannedRow]:
    """Every row's configuration, each validated as :func:`pipeline.run` validates one, before any work.

    Raises:
        ConfigError: every problem of every row at once (each said once).
    """
    problems: list[str] = []
    options = {k: v for k, v in settings.options.items() if v is not None}
    for key, why in NOT_OPTIONS.items():
        if key in options:
            problems.append(f"--{key.replace('_', '-')}: not a compare option; {why}")
    common = {k: v for k, v in options.items() if k not in NOT_OPTIONS}
    graph_options: dict[str, Any] = {}
    if "graph" in common:
        graph_options = {k: common.pop(k) for k in GRAPH_OPTIONS if k in common}
    twice = sorted({b for b in settings.backbones if settings.backbones.count(b) > 1})
    if twice:
        problems.append(f"--backbone {', '.join(twice)}: given twice; give each backbone once")
    bad_ft = [n for n in settings.fine_tune if not isinstance(n, int) or isinstance(n, bool) or n < 0]
    if bad_ft:
        problems.append(f"--fine-tune {', '.join(map(str, bad_ft))}: give a number of backbone blocks, 0 (the head "
                        "only) or more")
    if len(set(settings.fine_tune)) < len(settings.fine_tune):
        problems.append(f"--fine-tune {' '.join(map(str, settings.fine_tune))}: a setting is given twice")
    if not settings.backbones and not graph_options:
        problems.append("nothing to compare: give the backbones with --backbone NAME (repeat) and/or your own "
                        "frozen graph with --graph FILE.pb")
    if problems:
        raise ConfigError("; ".join(problems))

    # A graph's options are given to its own row only, so only that row counts them as given.
    given = settings.given - set(NOT_OPTIONS) - (set(graph_options) if graph_options else set())
    backbones = [(name, name, {**common, "backbone": name}, {"backbone"}) for name in settings.backbones]
    if graph_options:
        import_tensorflow_quietly(settings.verbose)  # recognising the graph reads it with TensorFlow
        name, column = _graph_name(graph_options, settings.out)
        if name in settings.backbones:
            problems.append(f"--graph {graph_options['graph']} is recognised as catalog backbone {name}, which "
                            f"--backbone {name} names too; give one of them")
        backbones.append((name, column, {**common, **graph_options}, set(graph_options)))
    rows: list[PlannedRow] = []
    for backbone, column, row_options, row_given in backbones:
        for n in settings.fine_tune:
            name = row_name(backbone, n)
            try:
                cfg = _row_config(settings.out / name, row_options, n)
            except PipelineError as err:  # a malformed gate or app-preprocessing item
                problems.append(str(err))
                continue
            rows.append(PlannedRow(name, column, n, cfg, frozenset(given | row_given)))
    for row in rows:
        problems += row.config.problems(needs_images=True, given=row.given)
    if not problems:
        from pipeline.runners import not_ready

        for row in rows:
            c = row.config
            problems += not_ready(c.runtimes, arm64_cpu=c.arm64_cpu, cache_dir=c.cache_dir)
    if problems:
        raise ConfigError("; ".join(dict.fromkeys(problems)))
    return rows


@dataclass(frozen=True)
class CompareRow:
    """One row of the table, read from its run directory (:func:`read_row`).

    Attributes:
        passed: every artifact passed its gate in every runtime (``failed`` names those that did not).
        accuracy, macro_precision, macro_recall, macro_f1: the head on the test split
            (``retrain/metrics.json``).
        feature_size: the bottleneck's width, as the fetch stage resolved it.
        savedmodel_bytes: the SavedModel folder's files together.
        tflite, tflite_bytes: the smallest TFLite file that passed every gate in every runtime
            verify ran it in (what ``edgepipe deploy`` ships); None when none passed.
        top1_agreement, latency_p50_ms: that file's in ai-edge-litert; None with ``litert_note``
            saying why (``not run``: ai-edge-litert was not among the runtimes).
        retrain_seconds: the retrain stage's time when it last ran (``bottleneck_seconds`` of it
            went to computing features; ``bottlenecks_computed`` of them were not in the cache).
        run_seconds: every stage's time when it last ran, together.
    """

    name: str
    backbone: str
    fine_tune: int
    run_dir: str
    passed: bool
    failed: tuple[str, ...]
    accuracy: float | None
    macro_precision: float | None
    macro_recall: float | None
    macro_f1: float | None
    feature_size: int | None
    savedmodel_bytes: int | None
    tflite: str | None
    tflite_bytes: int | None
    top1_agreement: float | None
    latency_p50_ms: float | None
    litert_note: str | None
    retrain_seconds: float | None
    bottleneck_seconds: float | None
    bottlenecks_computed: int | None
    run_seconds: float | None
    classes: tuple[str, ...] = ()
    confusion_matrix: list = field(default_factory=list)

    @property
    def size_bytes(self) -> int | None:
        """What the recommendation weighs: the smallest passing TFLite file, else the SavedModel."""
        return self.tflite_bytes if self.tflite is not None else self.savedmodel_bytes

    @property
    def size_artifact(self) -> str:
        return self.tflite or "savedmodel"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["failed"], d["classes"] = list(self.failed), list(self.classes)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "CompareRow":
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        return cls(**{**d, "failed": tuple(d.get("failed", ())), "classes": tuple(d.get("classes", ()))})


def read_row(run_dir: Path, name: str | None = None, backbone: str | None = None,
             fine_tune: int | None = None) -> CompareRow:
    """A finished run directory as one row of the table.

    Args:
        name, backbone, fine_tune: the row's; by default the folder's name, the fetch stage's
            backbone and the saved configuration's fine-tuning (0 without one).

    Raises:
        PipelineError: the folder holds no finished run (verify has not written report.json).
    """
    from pipeline.rundir import read_json
    from pipeline.verify import recommend_tflite

    run_dir = Path(run_dir)
    manifest = read_json(run_dir / "manifest.json", default={}) or {}
    report = read_json(run_dir / "report.json", default=None)
    if not manifest.get("stages") or report is None:
        raise PipelineError(f"{run_dir} holds no finished run (no report.json); run `edgepipe run --out {run_dir}` "
                            "first")
    stages = manifest["stages"]
    spec = ((stages.get("fetch") or {}).get("info") or {}).get("spec") or {}
    retrain = stages.get("retrain") or {}
    bottlenecks = (retrain.get("info") or {}).get("bottlenecks") or {}
    metrics = read_json(run_dir / "retrain" / "metrics.json", default={}) or {}
    test = metrics.get("test") or {}
    config = manifest.get("config") or {}
    results = report.get("results") or []
    best = recommend_tflite(results)
    agreement = latency = note = None
    if best is None:
        note = "no TFLite file passed every gate"
    elif TABLE_RUNTIME not in (config.get("runtimes") or []):
        note = NOT_RUN
    else:
        row = next((r for r in results if r["artifact"] == best["artifact"] and r["runtime"] == TABLE_RUNTIME), None)
        if row is None:
            note = NOT_RUN
        else:
            agreement = row.get("top1_agreement")
            latency = row.get("latency_p50_ms", row.get("latency_ms"))
            if latency is None:
                note = "latency not timed"
    savedmodel = run_dir / "export" / "savedmodel"
    labels = run_dir / "retrain" / "labels.txt"
    seconds = [s.get("seconds") for s in stages.values() if s.get("seconds") is not None]
    return CompareRow(
        name=name or run_dir.name, backbone=backbone or spec.get("name") or run_dir.name,
        fine_tune=fine_tune if fine_tune is not None else int((config.get("train") or {}).get("fine_tune") or 0),
        run_dir=str(run_dir), passed=bool(report.get("passed")),
        failed=tuple(f"{r['artifact']}/{r['runtime']}" for r in results if not r.get("passed")),
        accuracy=test.get("accuracy") if test.get("n") else None,
        macro_precision=test.get("macro_precision") if test.get("n") else None,
        macro_recall=test.get("macro_recall") if test.get("n") else None,
        macro_f1=test.get("macro_f1") if test.get("n") else None,
        feature_size=spec.get("feature_size") or None,
        savedmodel_bytes=sum(p.stat().st_size for p in savedmodel.rglob("*") if p.is_file()) if savedmodel.is_dir() else None,
        tflite=best["artifact"] if best else None, tflite_bytes=best["size_bytes"] if best else None,
        top1_agreement=agreement, latency_p50_ms=latency, litert_note=note,
        retrain_seconds=retrain.get("seconds"), bottleneck_seconds=bottlenecks.get("seconds"),
        bottlenecks_computed=bottlenecks.get("computed"), run_seconds=round(sum(seconds), 2) if seconds else None,
        classes=tuple(labels.read_text(encoding="utf-8").splitlines()) if labels.is_file() else tuple(report.get("classes") or ()),
        confusion_matrix=test.get("confusion_matrix") or [],
    )


def size_text(n: int | None) -> str:
    """``312 KB``, ``1.23 MB`` (decimal units, as the verify report's MB)."""
    if n is None:
        return "—"
    return f"{n / 1e3:.0f} KB" if n < 1e6 else f"{n / 1e6:.2f} MB"


def recommend(rows: Sequence[CompareRow]) -> dict | None:
    """The most accurate row, and the smallest within one accuracy point of it (by its smallest
    passing TFLite file, else its SavedModel); None when no row has a test accuracy."""
    scored = [(k, r) for k, r in enumerate(rows) if r.accuracy is not None]
    if not scored:
        return None

    def size(r: CompareRow) -> float:
        return float("inf") if r.size_bytes is None else r.size_bytes

    # Ties go to the smaller row, then to the earlier one.
    best = min(scored, key=lambda kr: (-kr[1].accuracy, size(kr[1]), kr[0]))[1]
    near = [(k, r) for k, r in scored if r.accuracy >= best.accuracy - ONE_POINT - 1e-12]
    small = min(near, key=lambda kr: (size(kr[1]), -kr[1].accuracy, kr[0]))[1]
    line = (f"most accurate: {best.name} ({best.accuracy:.4f}); smallest within one point: {small.name} "
            f"({small.accuracy:.4f}, {small.size_artifact} {size_text(small.size_bytes)})")
    return {"most_accurate": best.name, "accuracy": best.accuracy, "smallest": small.name,
            "smallest_accuracy": small.accuracy, "smallest_artifact": small.size_artifact,
            "smallest_size_bytes": small.size_bytes, "line": line}


def _f(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _litert_cells(r: CompareRow) -> tuple[str, str]:
    """The agreement and latency cells: the figures, else why there are none (``not run``)."""
    why = r.litert_note or "—"
    return (why if r.top1_agreement is None else f"{r.top1_agreement:.4f}",
            why if r.latency_p50_ms is None else f"{r.latency_p50_ms:.2f}")


# The table: (head, cell). One row per backbone and fine-tuning setting.
COLUMNS = (
    ("row", lambda r: r.name),
    ("backbone", lambda r: r.backbone),
    ("fine-tune blocks", lambda r: str(r.fine_tune)),
    ("test accuracy", lambda r: _f(r.accuracy, ".4f")),
    ("macro P", lambda r: _f(r.macro_precision, ".4f")),
    ("macro R", lambda r: _f(r.macro_recall, ".4f")),
    ("macro F1", lambda r: _f(r.macro_f1, ".4f")),
    ("features", lambda r: _f(r.feature_size, "d")),
    ("SavedModel", lambda r: size_text(r.savedmodel_bytes)),
    ("smallest passing TFLite", lambda r: r.tflite or "none passed"),
    ("its size", lambda r: size_text(r.tflite_bytes)),
    (f"agreement ({TABLE_RUNTIME})", lambda r: _litert_cells(r)[0]),
    (f"p50 ms ({TABLE_RUNTIME})", lambda r: _litert_cells(r)[1]),
    ("train s", lambda r: _f(r.retrain_seconds, ".1f")),
    ("of it bottlenecks s", lambda r: _f(r.bottleneck_seconds, ".1f")),
    ("gates", lambda r: "PASS" if r.passed else f"FAIL ({', '.join(r.failed)})"),
)
LEFT = {"row", "backbone", "smallest passing TFLite", "gates"}


def markdown_table(rows: Sequence[CompareRow]) -> str:
    heads = [h for h, _ in COLUMNS]
    rule = "|" + "|".join(":---" if h in LEFT else "---:" for h in heads) + "|"
    body = ["| " + " | ".join(cell(r).replace("|", "\\|") for _, cell in COLUMNS) + " |" for r in rows]
    return "\n".join(["| " + " | ".join(heads) + " |", rule, *body])


@dataclass
class CompareResult:
    """What :func:`compare` found: one row per backbone and fine-tuning setting, the
    recommendation, and (once saved) the files by name."""

    rows: list[CompareRow]
    settings: CompareSettings | None = None
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def recommendation(self) -> dict | None:
        return recommend(self.rows)

    @property
    def failed(self) -> list[CompareRow]:
        """The rows whose verify failed a gate (their reports say which and why)."""
        return [r for r in self.rows if not r.passed]

    @property
    def classes(self) -> list[str]:
        return list(next((r.classes for r in self.rows if r.classes), ()))

    def to_dict(self) -> dict:
        return {"rows": [r.to_dict() for r in self.rows], "recommendation": self.recommendation,
                "classes": self.classes, "options": self.settings.to_dict() if self.settings else None}

    def markdown(self) -> str:
        rec = self.recommendation
        lines = [f"# edgepipe compare: {len(self.rows)} rows", "", markdown_table(self.rows), ""]
        lines.append(f"**Recommendation:** {rec['line']}" if rec else "**Recommendation:** none (no row has a test "
                     "accuracy)")
        if self.failed:
            lines += ["", "Failed a gate (the row's report.md says why): "
                      + ", ".join(f"{r.name} ({', '.join(r.failed)})" for r in self.failed)]
        lines += ["", f"Agreement and p50 latency: the smallest passing TFLite file in {TABLE_RUNTIME}, single-image "
                  "calls on one thread; accuracy, P, R and F1: the head on the test split. Each row's run directory "
                  "holds its full report (report.md, report.html)."]
        return "\n".join(lines) + "\n"

    def html(self, confusion_png: Path | None = None) -> str:
        """The self-contained page: the table, the recommendation and the confusion matrices."""
        import base64

        from pipeline.report_html import CSS

        e = html.escape
        rec = self.recommendation
        title = f"edgepipe compare: {len(self.rows)} rows"
        parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>{CSS}</style>"
                 f"</head><body><h1>{e(title)}</h1>"]
        if self.classes:
            parts.append(f"<p>{len(self.classes)} classes; the same images and split in every row.</p>")
        if rec:
            parts.append(f"<div class='banner ok'><b>Recommendation:</b> {e(rec['line'])}</div>")
        if self.failed:
            items = "".join(f"<li>{e(r.name)}: {e(', '.join(r.failed))} (see {e(r.run_dir)}/report.html)</li>"
                            for r in self.failed)
            parts.append(f"<div class='banner bad'><b>{len(self.failed)} row(s) failed a gate</b><ul>{items}</ul></div>")
        heads = "".join(f"<th class=l>{e(h)}</th>" if h in LEFT else f"<th>{e(h)}</th>" for h, _ in COLUMNS)
        parts.append(f"<table><tr>{heads}</tr>")
        for r in self.rows:
            cells = []
            for h, cell in COLUMNS:
                text = e(cell(r))
                if h == "gates":
                    text = f"<span class={'pass' if r.passed else 'fail'}>{text}</span>"
                cells.append(f"<td class=l>{text}</td>" if h in LEFT else f"<td>{text}</td>")
            parts.append("<tr>" + "".join(cells) + "</tr>")
        parts.append("</table>")
        parts.append(f"<p>Agreement and p50 latency: the smallest passing TFLite file in {e(TABLE_RUNTIME)}, "
                     "single-image calls on one thread. Each row's full report: OUT/&lt;row&gt;/report.html.</p>")
        if confusion_png is not None and Path(confusion_png).is_file():
            src = "data:image/png;base64," + base64.b64encode(Path(confusion_png).read_bytes()).decode()
            parts.append("<h2>Confusion matrices (test split)</h2><p>Rows: true class; columns: predicted; "
                         f"one per row of the table.</p><img class=plot src='{src}'>")
        parts.append("</body></html>")
        return "\n".join(parts)

    def save(self, out: Path) -> dict[str, Path]:
        """Writes compare.json, compare.md, confusion_matrices.png and compare.html into ``out``.

        Returns:
            The files by name (``compare``, ``compare_md``, ``compare_html``, ``confusion``).
        """
        from pipeline.report import plot_confusion_matrices
        from pipeline.rundir import atomic_write_json, atomic_write_text

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        png = out / "confusion_matrices.png"
        panels = [{"artifact": r.name, "runtime": "test split", "accuracy": r.accuracy,
                   "confusion_matrix": r.confusion_matrix} for r in self.rows]
        drawn = plot_confusion_matrices(png, panels, self.classes)
        atomic_write_json(out / "compare.json", self.to_dict())
        atomic_write_text(out / "compare.md", self.markdown())
        atomic_write_text(out / "compare.html", self.html(png if drawn else None))
        self.files = {"compare": out / "compare.json", "compare_md": out / "compare.md",
                      "compare_html": out / "compare.html", **({"confusion": png} if drawn else {})}
        return self.files


def compare(settings: CompareSettings) -> CompareResult:
    """Runs every row (a whole :func:`pipeline.run` each, skipping what is up to date) and writes
    the comparison into ``settings.out``.

    Returns:
        The rows, the recommendation and the files written (:attr:`CompareResult.files`).

    Raises:
        ConfigError: any row's configuration problems, all at once, before the first row runs.
        PipelineError: bad input found by a stage; the comparison stops there. A row whose
            verification fails a gate does not stop it: the row is marked (:attr:`CompareRow.passed`).
    """
    import pipeline.stages as stages
    from pipeline.rundir import RunDir

    rows = plan(settings)
    found: list[CompareRow] = []
    with RunDir(settings.out).lock():  # one compare per --out (each row's run directory has its own lock)
        for k, row in enumerate(rows, 1):
            log.info(f"compare: row {k}/{len(rows)} {row.name}")
            try:
                # pipeline.run without its checks: plan() has made them for every row already.
                stages.run_stages(row.config, until="verify", verbose=settings.verbose)
            except VerificationFailed as err:
                log.info(f"compare: {row.name} failed a gate, kept as a row: {err}")
            found.append(read_row(row.config.out, row.name, row.backbone, row.fine_tune))
        result = CompareResult(found, settings)
        result.save(settings.out)
    return result

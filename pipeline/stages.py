"""The ordered table of stages and the runner that skips what is up to date.

Each stage reads what it needs from the run directory and the manifest (never from another
stage's memory), so any stage can be run alone on an existing run directory. A stage is skipped
when its fingerprint (everything it depends on: options, upstream output hashes) matches the
manifest and its recorded outputs still hash the same.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline import __version__
from pipeline.config import RunConfig
from pipeline.dataset import Dataset, build_dataset, leakage_warnings
from pipeline.errors import DatasetError, PipelineError, VerificationFailed, disk_error
from pipeline.rundir import (
    RunDir, atomic_write_bytes, atomic_write_json, atomic_write_text, read_json, sha256_tree,
)
from pipeline.testhook import pause_point
from pipeline.types import BackboneSpec, Preprocessing, TfjsMode
from pipeline.verify import DEFAULT_GATES

MAX_WARNING_LINES = 20
TFJS_LARGE_BYTES = 30 * 1000 * 1000
VERSIONED_PACKAGES = (
    "tensorflow", "tensorflowjs", "numpy", "keras", "tflite-runtime", "ai-edge-litert", "mediapipe",
    "protobuf", "pillow", "scikit-learn",
)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Context:
    cfg: RunConfig
    run: RunDir
    manifest: dict

    def stage_info(self, name: str) -> dict:
        info = self.manifest.get("stages", {}).get(name)
        if not info or info.get("status") != "done":
            raise PipelineError(f"stage {name!r} has not completed in {self.run.root}; run `edgepipe {name} --out {self.run.root}` first")
        return info

    def spec(self) -> BackboneSpec:
        d = dict(self.stage_info("fetch")["info"]["spec"])
        d["preprocessing"] = Preprocessing(**d["preprocessing"])
        d["alternates"] = tuple(d.get("alternates", ()))
        return BackboneSpec(**d)

    def graph_path(self) -> Path:
        return Path(self.stage_info("fetch")["outputs"]["graph"]["path"])

    def dataset(self) -> Dataset:
        return Dataset.from_dict(read_json(self.run.stage("retrain") / "split.json"))


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _listing_digest(folder: Path | None) -> str | None:
    """Cheap change detector for an image folder: names, sizes and modification times."""
    if folder is None:
        return None
    h = hashlib.sha256()
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(folder)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


# Outputs that describe a run (timings, counts) rather than feed the next stage: a change in them
# must not make the next stage re-run.
INFORMATIONAL_OUTPUTS = frozenset({"metrics"})


def _upstream(ctx: Context, *names: str) -> dict:
    return {n: {k: v["sha256"] for k, v in ctx.stage_info(n)["outputs"].items() if k not in INFORMATIONAL_OUTPUTS}
            for n in names}


def _folder_key(folder: Path | None) -> list:
    """A folder as a fingerprint: its absolute path (so ./a and /x/a are the same) and listing."""
    if folder is None:
        return [None, None]
    return [str(Path(folder).resolve()), _listing_digest(folder)]


# --- fetch -------------------------------------------------------------------------------------

def _fetch_fingerprint(ctx: Context) -> dict:
    return {"spec": ctx.cfg.backbone_spec().to_dict()}


def _fetch_run(ctx: Context) -> tuple[dict[str, Path], dict]:
    from pipeline.backbone import graph_fixes, load_graph_def, resolve_spec
    from pipeline.fetch import fetch

    spec = ctx.cfg.backbone_spec()
    got = fetch(spec, cache_dir=ctx.cfg.cache_dir, mirror=ctx.cfg.mirror,
                offline=ctx.cfg.offline, progress=ctx.cfg.progress)
    resolved = resolve_spec(load_graph_def(got.graph_path), spec)
    used = resolved.bottleneck_tensor
    found_by = "name" if used == spec.bottleneck_tensor else "alternate" if used in spec.alternates else "shape"
    if found_by != "name":
        log(f"note: bottleneck {spec.bottleneck_tensor} not in the graph; using {used} (found by {found_by})")
    fixes = graph_fixes(got.graph_path, resolved)
    for fix in fixes:
        log(f"note: graph rewritten: {fix.note()}")
    info = {"spec": resolved.to_dict(), "source": got.source, "checksum": got.checksum,
            "archive_sha256": got.archive_sha256,
            "bottleneck": {"requested": spec.bottleneck_tensor, "used": used, "found_by": found_by},
            "graph_fixes": [fix.to_dict() for fix in fixes]}
    return {"graph": Path(got.graph_path)}, info


# --- retrain -----------------------------------------------------------------------------------

def _retrain_fingerprint(ctx: Context) -> dict:
    c = ctx.cfg
    return {
        "fetch": _upstream(ctx, "fetch"), "spec": ctx.spec().to_dict(),
        "images": _folder_key(c.images),
        "test_images": _folder_key(c.test_images),
        "split": [c.validation_pct, c.test_pct], "train": c.train.to_dict(),
        "augment": c.augment.to_dict(),
    }


def _retrain_run(ctx: Context) -> tuple[dict[str, Path], dict]:
    from pipeline.bottlenecks import extract
    from pipeline.fetch import default_cache_dir
    from pipeline.report import plot_confusion_matrices, plot_training
    from pipeline.retrain import evaluate_head, train_head

    c, out = ctx.cfg, ctx.run.stage("retrain")
    if c.images is None:
        raise PipelineError("retrain needs --images DIR (one sub-folder per class)")
    ds = build_dataset(c.images, c.test_images, c.validation_pct, c.test_pct)
    spec, graph = ctx.spec(), ctx.graph_path()
    counts = ds.counts()
    for name, n in counts["train"].items():
        if n < 20:
            log(f"warning: class {name!r} has only {n} training images; 20 or more give a usable head")
    graph_sha = ctx.stage_info("fetch")["outputs"]["graph"]["sha256"]
    cache_root = Path(c.cache_dir or default_cache_dir()) / "bottlenecks"
    t0 = time.perf_counter()
    ext = extract([e.path for e in ds.examples], graph, spec, graph_sha, cache_root,
                  progress=c.progress, augment=c.augment,
                  augment_indices=[i for i, e in enumerate(ds.examples) if e.split == "train"])
    extract_s = time.perf_counter() - t0
    skipped = {ds.examples[i].path: why for i, why in sorted(ext.skipped.items())}
    for path, why in skipped.items():
        log(f"skipped {path}: {why}")
    warnings = leakage_warnings(ds, ext.hashes)
    for w in warnings[:MAX_WARNING_LINES]:
        log(f"warning: {w}")
    if len(warnings) > MAX_WARNING_LINES:
        log(f"warning: ... and {len(warnings) - MAX_WARNING_LINES} more duplicates (all in {out / 'metrics.json'})")
    ok = set(ext.ok)
    kept = [e for i, e in enumerate(ds.examples) if i in ok]
    ds = Dataset(ds.classes, tuple(kept))
    feats = ext.features
    y = np.array([e.label for e in kept], np.int64)
    split = np.array([e.split for e in kept])
    train = split == "train"
    missing = [name for k, name in enumerate(ds.classes) if not np.any(y[train] == k)]
    if missing:
        raise DatasetError(
            f"{c.images}: no readable training images in class(es) {', '.join(map(repr, missing))} "
            f"({len(skipped)} image(s) skipped, listed above); add readable images or remove the folder"
        )
    pause_point("train")
    x_train, y_train = feats[train], y[train]
    if ext.augmented is not None:
        # Augmented copies join the training set only; validation and test stay untouched.
        extra = ext.augmented[train]
        x_train = np.concatenate([x_train, extra.reshape(-1, extra.shape[-1])])
        y_train = np.concatenate([y_train, np.repeat(y[train], extra.shape[1])])
    summaries = None
    if c.summaries_dir:
        # One sub-folder per run, kept between runs, as TensorBoard expects.
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        summaries = Path(c.summaries_dir) / f"{Path(c.out).name}-{stamp}"
    head = train_head(x_train, y_train, len(ds.classes), c.train,
                      feats[split == "validation"], y[split == "validation"], progress=c.progress,
                      summaries_dir=summaries,
                      checkpoint_dir=out / "checkpoints" if c.train.checkpoint_every else None)
    metrics = {s: evaluate_head(head, feats[split == s], y[split == s], len(ds.classes))
               for s in ("train", "validation", "test")}
    test_idx = np.nonzero(split == "test")[0]
    test_pred = head.logits(feats[test_idx]).argmax(1) if len(test_idx) else np.zeros(0, int)
    misclassified = [
        {"path": kept[i].path, "true": ds.classes[y[i]], "predicted": ds.classes[p]}
        for i, p in zip(test_idx, test_pred) if p != y[i]
    ]
    if c.print_misclassified:
        for m in misclassified:
            log(f"misclassified: {m['path']} (true {m['true']!r}, predicted {m['predicted']!r})")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "split.json", ds.to_dict())
    atomic_write_text(out / "labels.txt", "\n".join(ds.classes) + "\n")
    import io

    buf = io.BytesIO()
    np.savez(buf, **head.to_npz())
    atomic_write_bytes(out / "head.npz", buf.getvalue())
    atomic_write_json(out / "metrics.json", {
        "counts": counts, "skipped": skipped, "warnings": warnings,
        "bottlenecks": {"computed": ext.computed, "cached": ext.cached, "seconds": round(extract_s, 2)},
        "history": head.history, "misclassified": misclassified,
        "augmented_training_examples": int(len(x_train) - train.sum()), **metrics,
    })
    plot_training(out / "training.png", head.history)
    plot_confusion_matrices(out / "confusion_matrix.png",
                            [{"artifact": "head", "runtime": "test split", **metrics["test"]}], list(ds.classes))
    for s in ("validation", "test"):
        m = metrics[s]
        if m["n"]:
            log(f"retrain: {s} accuracy {m['accuracy']:.4f}, macro F1 {m['macro_f1']:.4f} on {m['n']} images")
    outputs = {k: out / f for k, f in (("split", "split.json"), ("labels", "labels.txt"),
                                       ("head", "head.npz"), ("metrics", "metrics.json"))}
    return outputs, {"bottlenecks": {"computed": ext.computed, "cached": ext.cached,
                                     "skipped": len(ext.skipped), "seconds": round(extract_s, 2)}}


# --- export ------------------------------------------------------------------------------------

def _export_fingerprint(ctx: Context) -> dict:
    return {"fetch": _upstream(ctx, "fetch"), "retrain": _upstream(ctx, "retrain"), "spec": ctx.spec().to_dict()}


def _export_run(ctx: Context) -> tuple[dict[str, Path], dict]:
    from pipeline.backbone import load_graph_def
    from pipeline.export import export_savedmodel

    from pipeline.retrain import Head

    head = Head.from_npz(np.load(ctx.run.stage("retrain") / "head.npz"))
    classes = list(ctx.dataset().classes)
    out = ctx.run.stage("export")
    sm = export_savedmodel(load_graph_def(ctx.graph_path()), ctx.spec(), head.layers, classes, out)
    return {"savedmodel": sm, "labels": out / "labels.txt", "preprocessing": out / "preprocessing.json"}, {}


# --- quantize ----------------------------------------------------------------------------------

def _calibration_paths(ctx: Context) -> list[str]:
    """A fixed sample of the training split (never validation or test), spread over classes."""
    train = sorted(ctx.dataset().split("train"), key=lambda e: hashlib.sha1(e.path.encode()).hexdigest())
    return [e.path for e in train[: ctx.cfg.calibration_images]]


def _quantize_fingerprint(ctx: Context) -> dict:
    return {"export": _upstream(ctx, "export"), "modes": [m.value for m in ctx.cfg.quant_modes],
            "calibration": _calibration_paths(ctx), "golden": _golden_source(ctx)}


def _golden_source(ctx: Context) -> list[str]:
    """The test images golden vectors are picked from (``pipeline/golden.py``), for fingerprints."""
    return sorted(e.path for e in ctx.dataset().split("test"))


def _golden(ctx: Context):
    from pipeline.golden import build_golden

    return build_golden(ctx.run.stage("export") / "savedmodel", ctx.dataset().split("test"),
                        ctx.dataset().classes, ctx.spec().preprocessing)


def _quantize_run(ctx: Context) -> tuple[dict[str, Path], dict]:
    from pipeline.golden import GOLDEN_DIR, write_golden
    from pipeline.images import load_files
    from pipeline.metadata import preprocessing_contract, with_metadata
    from pipeline.quantize import convert_tflite, write_tflite

    sm = ctx.run.stage("export") / "savedmodel"
    labels = list(ctx.dataset().classes)
    contract = preprocessing_contract(read_json(ctx.run.stage("export") / "preprocessing.json"))
    prep = ctx.spec().preprocessing
    calib = _calibration_paths(ctx)

    def representative():
        for k in range(0, len(calib), 16):
            for img in load_files(calib[k:k + 16], prep):
                yield img[None]

    outputs = {}
    for mode in ctx.cfg.quant_modes:
        t0 = time.perf_counter()
        path = ctx.run.stage("quantize") / f"{mode.value}.tflite"
        # Every file carries its labels and preprocessing contract (TFLite metadata).
        about = (f"{ctx.spec().name} + retrained head, {len(labels)} classes, TFLite {mode.value}, by edgepipe "
                 f"{__version__}. Input float32 RGB 0..255 at {contract['size']}x{contract['size']}; "
                 "see preprocessing.json.")
        write_tflite(path, with_metadata(convert_tflite(sm, mode, representative), labels, contract,
                                         f"edgepipe {ctx.spec().name} {mode.value}", about))
        log(f"quantize: {path.name} {path.stat().st_size / 1e6:.2f} MB in {time.perf_counter() - t0:.1f} s")
        pause_point("quantize")
        outputs[f"tflite-{mode.value}"] = path
    outputs["golden"] = write_golden(ctx.run.stage("quantize") / GOLDEN_DIR, _golden(ctx)).parent
    return outputs, {"calibration_images": len(calib)}


# --- tfjs --------------------------------------------------------------------------------------

def _tfjs_fingerprint(ctx: Context) -> dict:
    from pipeline.web import page_fingerprint

    return {"export": _upstream(ctx, "export"), "modes": [m.value for m in ctx.cfg.tfjs_modes],
            "page": page_fingerprint(), "golden": _golden_source(ctx), "shard_mb": ctx.cfg.tfjs_shard_mb}


def _tfjs_run(ctx: Context) -> tuple[dict[str, Path], dict]:
    from pipeline.golden import GOLDEN_DIR, write_golden
    from pipeline.tfjs import bundle_size, convert_tfjs

    sm = ctx.run.stage("export") / "savedmodel"
    golden = _golden(ctx) if ctx.cfg.tfjs_modes else None
    meta = {
        "labels": list(ctx.dataset().classes),
        "preprocessing": read_json(ctx.run.stage("export") / "preprocessing.json"),
        "backbone": ctx.spec().name,
    }
    outputs, warnings = {}, []
    if TfjsMode.UINT8 in ctx.cfg.tfjs_modes:
        # tfjs-examples' quantization study: MobileNetV2 top-1 0.618 → 0.280 with 8-bit weights.
        warnings.append("TF.js uint8 weights are known to collapse MobileNet accuracy (tfjs-examples: "
                        "MobileNetV2 top-1 0.618 → 0.280); trust the verify figures, not the size")
    for mode in ctx.cfg.tfjs_modes:
        t0 = time.perf_counter()
        bundle = convert_tfjs(sm, ctx.run.stage("tfjs") / mode.value, mode, meta,
                              shard_size_bytes=int(ctx.cfg.tfjs_shard_mb * 1024 * 1024))
        write_golden(bundle / GOLDEN_DIR, golden)
        size = bundle_size(bundle)
        log(f"tfjs: {mode.value} bundle {size / 1e6:.2f} MB in {time.perf_counter() - t0:.1f} s")
        if size > TFJS_LARGE_BYTES:
            warnings.append(f"TF.js {mode.value} bundle is {size / 1e6:.1f} MB: over 30 MB, browsers on phones "
                            "download it slowly and may run out of memory; try --tfjs float16 or a smaller backbone")
        outputs[f"tfjs-{mode.value}"] = bundle
    for w in warnings:
        log(f"warning: {w}")
    return outputs, {"warnings": warnings}


# --- verify ------------------------------------------------------------------------------------

def _verify_fingerprint(ctx: Context) -> dict:
    c = ctx.cfg
    return {"upstream": _upstream(ctx, "retrain", "export", "quantize", "tfjs"),
            "runtimes": list(c.runtimes), "gates": {k: c.gate(k) for k in DEFAULT_GATES} | c.gates,
            "stress": c.stress, "app_preprocessing": c.app_preprocessing.to_dict()}


def _verify_run(ctx: Context) -> tuple[dict[str, Path], dict]:
    from pipeline.images import ImageError, decode_rgb, read_image_file
    from pipeline.report import plot_confusion_matrices, plot_tradeoffs, write_reports
    from pipeline.report_html import write_html_report
    from pipeline.stress import MISTAKES, AppPreprocessing, prepare_batch
    from pipeline.runners.mediapipe import MediapipeRunner, unsupported_input
    from pipeline.runners.tflite import TfliteRunner
    from pipeline.runners.tfjs_node import TfjsWasmRunner
    from pipeline.tfjs import bundle_size
    from pipeline.verify import Artifact, SavedModelRunner, evaluate, run_one

    ds = ctx.dataset()
    test = ds.split("test")
    if not test:
        raise DatasetError("the test split is empty: raise --test-pct or pass --test-images DIR")
    prep = ctx.spec().preprocessing
    images, labels, skipped = [], [], []
    for e in test:
        try:
            images.append(decode_rgb(read_image_file(e.path), e.path))
            labels.append(e.label)
        except (ImageError, OSError) as err:
            # Readable at retrain time (unreadable ones were dropped there), changed since.
            why = err.reason if isinstance(err, ImageError) else f"cannot read ({err.strerror or err})"
            skipped.append({"path": e.path, "reason": why})
            log(f"skipped {e.path}: {why}")
    if not images:
        raise DatasetError(f"none of the {len(test)} test images can be read (listed above); "
                           "restore them or run retrain again")
    x = prepare_batch(images, prep, AppPreprocessing())
    app = ctx.cfg.app_preprocessing
    app_differs = app != AppPreprocessing()
    # Converted models get their inputs the way the deploying app prepares them (the contract
    # unless --app-preprocessing says otherwise); the reference always gets the contract.
    x_app = prepare_batch(images, prep, app) if app_differs else x
    y = np.array(labels)
    n_cls = len(ds.classes)
    sm_dir = ctx.run.stage("export") / "savedmodel"
    sm = Artifact("savedmodel", sm_dir, sum(p.stat().st_size for p in sm_dir.rglob("*") if p.is_file()))
    log(f"verify: reference SavedModel on {len(x)} test images")
    reference = SavedModelRunner()  # loads the SavedModel once for the reference and --stress
    ref_pred = reference.predict(sm.path, x)
    ref = ref_pred.probabilities
    results = [evaluate(sm, "tensorflow", ref_pred, ref, y, n_cls, ctx.cfg.gate("savedmodel"))]
    pairs = []
    for name, o in ctx.stage_info("quantize")["outputs"].items():
        if not name.startswith("tflite-"):
            continue  # quantize/golden
        art = Artifact(name, Path(o["path"]), Path(o["path"]).stat().st_size)
        pairs += [(art, TfliteRunner(r)) for r in ("tflite-runtime", "ai-edge-litert") if r in ctx.cfg.runtimes]
        if "mediapipe-tasks" in ctx.cfg.runtimes:
            why = unsupported_input(art.path)
            if why:
                log(f"verify: {art.name:15s} mediapipe-tasks skipped: {why}")
            else:
                pairs.append((art, MediapipeRunner(ds.classes)))
    if "tfjs-wasm" in ctx.cfg.runtimes:
        for name, o in ctx.stage_info("tfjs")["outputs"].items():
            pairs.append((Artifact(name, Path(o["path"]), bundle_size(Path(o["path"]))), TfjsWasmRunner()))
    for art, runner in pairs:
        # MediaPipe prepares pixels itself from the TFLite metadata, so --app-preprocessing is not its.
        inputs = x if isinstance(runner, MediapipeRunner) else x_app
        pred, err = run_one(runner, art, inputs, ctx.cfg.runtime_timeout_s)
        row = evaluate(art, runner.name, pred, ref, y, n_cls, ctx.cfg.gate(art.name), err)
        results.append(row)
        status = "ok" if row.passed else "FAILED"
        detail = row.error or f"agreement {row.top1_agreement:.4f}, acc {row.accuracy:.4f}, {row.latency_ms:.2f} ms/img"
        log(f"verify: {art.name:15s} {runner.name:15s} {status}: {detail}")
    stress = []
    if ctx.cfg.stress:
        for name, mistake in MISTAKES.items():
            probs = reference.predict(sm.path, prepare_batch(images, prep, mistake), timing=False).probabilities
            agree = float((probs.argmax(1) == ref.argmax(1)).mean())
            acc = float((probs.argmax(1) == y).mean())
            stress.append({"mistake": name, "setting": mistake.differences()[0], "accuracy": acc,
                           "accuracy_drop": results[0].accuracy - acc, "top1_agreement": agree,
                           "mean_abs_diff": float(np.abs(probs - ref).mean())})
            log(f"verify --stress: {name:38s} accuracy {acc:.4f} ({acc - results[0].accuracy:+.4f}), agreement {agree:.4f}")
    out = ctx.run.stage("verify")
    out.mkdir(parents=True, exist_ok=True)
    rows = [r.to_dict() for r in results]
    # Images dropped by retrain (train, validation and test alike) belong in the report as well.
    retrain_metrics = read_json(ctx.run.stage("retrain") / "metrics.json", default={}) or {}
    retrain_skipped = [{"path": p, "reason": r} for p, r in retrain_metrics.get("skipped", {}).items()]
    report = {
        "backbone": ctx.spec().name, "classes": list(ds.classes), "n_test": int(len(x)),
        "test_images": [e.path for e in test if e.path not in {s["path"] for s in skipped}],
        "skipped_images": retrain_skipped + skipped, "warnings": retrain_metrics.get("warnings", []),
        "results": rows,
        "passed": all(r.passed for r in results),
        "app_preprocessing": {"settings": app.to_dict(), "differences": app.differences()},
        "stress": stress,
        "reference_top1": [int(k) for k in ref.argmax(1)],
        "recommendation": recommend(rows),
    }
    write_reports(ctx.run.root, report)
    plot_confusion_matrices(out / "confusion_matrices.png", rows, list(ds.classes))
    plot_tradeoffs(out / "tradeoffs.png", rows)
    write_html_report(ctx.run.root / "report.html", report, images, out / "tradeoffs.png")
    import io

    buf = io.BytesIO()
    np.savez_compressed(buf, probabilities=ref, labels=y)
    atomic_write_bytes(out / "reference.npz", buf.getvalue())
    outputs = {"report": ctx.run.root / "report.json", "report_md": ctx.run.root / "report.md"}
    outputs["report_html"] = ctx.run.root / "report.html"
    return outputs, {"passed": report["passed"], "failed": [f"{r.artifact}/{r.runtime}" for r in results if not r.passed],
                     "app_differences": app.differences()}


def recommend(rows: list[dict]) -> dict | None:
    """The smallest converted artifact that passes every gate in every runtime it ran in, the
    fastest (runtime, artifact) among the passing ones, and why."""
    by_artifact: dict[str, list[dict]] = {}
    for r in rows:
        if r["artifact"] != "savedmodel":
            by_artifact.setdefault(r["artifact"], []).append(r)
    passing = {a: rs for a, rs in by_artifact.items() if all(r["passed"] for r in rs)}
    if not passing:
        return None
    smallest = min(passing, key=lambda a: (passing[a][0]["size_bytes"], min(r["latency_ms"] for r in passing[a])))
    fastest = min((r for rs in passing.values() for r in rs), key=lambda r: (r["latency_ms"], r["size_bytes"]))
    best_rt = min(passing[smallest], key=lambda r: r["latency_ms"])
    return {
        "artifact": smallest, "runtime": best_rt["runtime"], "size_bytes": best_rt["size_bytes"],
        "latency_ms": best_rt["latency_ms"], "top1_agreement": min(r["top1_agreement"] for r in passing[smallest]),
        "accuracy": best_rt["accuracy"],
        "fastest": {"artifact": fastest["artifact"], "runtime": fastest["runtime"], "latency_ms": fastest["latency_ms"]},
        "why": f"smallest of {len(passing)} artifacts that pass every gate in every runtime",
    }


@dataclass(frozen=True)
class Stage:
    name: str
    fingerprint: Callable[[Context], dict]
    run: Callable[[Context], tuple[dict[str, Path], dict]]


STAGES: tuple[Stage, ...] = (
    Stage("fetch", _fetch_fingerprint, _fetch_run),
    Stage("retrain", _retrain_fingerprint, _retrain_run),
    Stage("export", _export_fingerprint, _export_run),
    Stage("quantize", _quantize_fingerprint, _quantize_run),
    Stage("tfjs", _tfjs_fingerprint, _tfjs_run),
    Stage("verify", _verify_fingerprint, _verify_run),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


def library_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version(), "edgepipe": __version__}
    for pkg in VERSIONED_PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    pkg_json = Path(__file__).parent / "runners" / "tfjs" / "package.json"
    if pkg_json.exists():
        out["@tensorflow/tfjs"] = json.loads(pkg_json.read_text())["dependencies"].get("@tensorflow/tfjs")
    return out


def _up_to_date(info: dict | None, fingerprint: str) -> bool:
    if not info or info.get("status") != "done" or info.get("fingerprint") != fingerprint:
        return False
    for o in info.get("outputs", {}).values():
        p = Path(o["path"])
        if not p.exists() or sha256_tree(p) != o["sha256"]:
            return False
    return True


def _remove_temporaries(folder: Path) -> None:
    """Removes what a killed run left half-written (``.NAME.*.tmp``, see rundir) before a rerun."""
    if folder.is_dir():
        for p in sorted(folder.rglob(".*.tmp"), reverse=True):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def run_stages(cfg: RunConfig, until: str = "verify") -> dict:
    """Runs the stages up to and including ``until``, skipping those that are up to date.

    Returns:
        The final manifest.

    Raises:
        PipelineError: bad input in any stage (the manifest records the failure).
        VerificationFailed: a converted model failed its gate (after the reports are written).
    """
    run = RunDir(cfg.out)
    run.root.mkdir(parents=True, exist_ok=True)
    manifest = run.load_manifest()
    manifest.update({"edgepipe": __version__, "config": cfg.to_dict(), "versions": library_versions()})
    manifest.setdefault("stages", {})
    ctx = Context(cfg, run, manifest)
    for stage in STAGES[: STAGE_NAMES.index(until) + 1]:
        fp = _digest(stage.fingerprint(ctx))
        info = manifest["stages"].get(stage.name)
        if _up_to_date(info, fp):
            log(f"{stage.name}: up to date, skipped")
            continue
        log(f"{stage.name}: running")
        started = time.perf_counter()
        manifest["stages"][stage.name] = {"status": "running", "fingerprint": fp}
        run.save_manifest(manifest)
        try:
            _remove_temporaries(run.stage(stage.name))
            outputs, extra = stage.run(ctx)
        except BaseException as err:
            mapped = disk_error(err, str(run.stage(stage.name)))
            manifest["stages"][stage.name].update(status="failed", error=str(mapped or err)[:500])
            with contextlib.suppress(OSError):
                # On a full disk the manifest may not fit either; the error raised below says why.
                run.save_manifest(manifest)
            if mapped:
                raise mapped from err
            raise
        entry = {
            "status": "done", "fingerprint": fp,
            "seconds": round(time.perf_counter() - started, 2),
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "outputs": {k: {"path": str(p), "sha256": sha256_tree(p)} for k, p in outputs.items()},
            "info": extra,
        }
        if stage.name == "verify" and not extra.get("passed", True):
            entry["status"] = "failed"
        manifest["stages"][stage.name] = entry
        run.save_manifest(manifest)
        log(f"{stage.name}: done in {entry['seconds']:.1f} s")
    verify = manifest["stages"].get("verify")
    if until == "verify" and verify and verify.get("status") == "failed":
        cause = ""
        if verify["info"].get("app_differences"):
            cause = (f"; the app preprocessing differs from the contract: {', '.join(verify['info']['app_differences'])}")
        raise VerificationFailed(
            f"verification failed for {', '.join(verify['info']['failed'])}{cause}; see {run.root / 'report.md'}"
        )
    return manifest

"""The ordered table of stages and the runner that skips what is up to date.

Each stage's work lives in the module named after it (``retrain.retrain``, ``verify.verify``, ...);
here each stage is a fingerprint (everything it depends on: options, upstream output hashes) and
a short adapter that reads the run directory and the manifest (never another stage's memory),
calls its module and writes the outputs. So any stage can be run alone on an existing run
directory. A stage is skipped when its fingerprint matches the manifest and its recorded outputs
still hash the same.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import platform
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.catalog import fine_tune_blocks
from pipeline.config import ADOPTED_SAVEDMODEL_GATE, DEFAULT_GATES, RunConfig
from pipeline.console import library_output, log
from pipeline.dataset import Dataset, build_dataset
from pipeline.errors import ConfigError, PipelineError, VerificationFailed, disk_error
from pipeline.graph import ModelOutputs
from pipeline.rundir import RunDir, read_json, sha256_tree
from pipeline.types import ArtifactKind, BackboneSpec, QuantMode
from pipeline.version import __version__

VERSIONED_PACKAGES = (
    "tensorflow", "tensorflowjs", "numpy", "keras", "tflite-runtime", "ai-edge-litert", "mediapipe",
    "protobuf", "pillow", "scikit-learn",
)
# Outputs that describe a run (timings, counts) rather than feed the next stage: a change in them
# must not make the next stage re-run.
INFORMATIONAL_OUTPUTS = frozenset({"metrics"})


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
        return BackboneSpec.from_dict(self.stage_info("fetch")["info"]["spec"])

    def graph_path(self) -> Path:
        return self.run.resolve(self.stage_info("fetch")["outputs"]["graph"]["path"])

    def dataset(self) -> Dataset:
        return Dataset.from_dict(read_json(self.run.stage("retrain") / "split.json"))

    def labels(self) -> list[str]:
        """The model's class names in output order (retrain/labels.txt): the class folders for a
        retrained head, the graph's labels for an adopted one."""
        return (self.run.stage("retrain") / "labels.txt").read_text(encoding="utf-8").splitlines()

    def model(self) -> ModelOutputs | None:
        """An adopted graph's output and logits, as the fetch stage found them; None for a backbone."""
        found = self.stage_info("fetch")["info"].get("model")
        return ModelOutputs.from_dict(found) if found else None

    def savedmodel(self) -> Path:
        return self.run.stage("export") / "savedmodel"

    def outputs(self, stage: str) -> dict[str, Path]:
        return {k: self.run.resolve(o["path"]) for k, o in self.stage_info(stage)["outputs"].items()}


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _listing_digest(folder: Path) -> str:
    """Cheap change detector for an image folder: names, sizes and modification times."""
    h = hashlib.sha256()
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(folder)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _folder_key(folder: Path | None) -> list:
    """A folder as a fingerprint: its absolute path (so ./a and /x/a are the same) and listing."""
    if folder is None:
        return [None, None]
    if "://" in str(folder):  # on a Beam filesystem: the listing's names, sizes and times
        import pipeline.storage as storage

        return [str(folder), _digest(storage.listing(storage.join(str(folder), "*", "*")))]
    return [str(Path(folder).resolve()), _listing_digest(folder)]


def _upstream(ctx: Context, *names: str) -> dict:
    return {n: {k: v["sha256"] for k, v in ctx.stage_info(n)["outputs"].items() if k not in INFORMATIONAL_OUTPUTS}
            for n in names}


# --- fetch -------------------------------------------------------------------------------------

def _fetch_fingerprint(ctx: Context) -> dict:
    fp = {"spec": ctx.cfg.backbone_spec().to_dict()}
    if ctx.cfg.adopt is not None:
        fp["output_tensor"] = ctx.cfg.adopt.output_tensor
    return fp


def _fetch_adopted(ctx: Context) -> tuple[dict[str, Path], dict]:
    """A graph with its head: checked as a local graph, its input and output found."""
    from pipeline.fetch import fetch
    from pipeline.graph import adopted_outputs, load_graph_def, tensor_shapes

    spec = ctx.cfg.backbone_spec()
    got = fetch(spec)
    graph_def = load_graph_def(got.graph_path, fix=False)
    outputs, fixes = adopted_outputs(graph_def, spec.input_tensor, ctx.cfg.adopt.output_tensor)
    shape = tensor_shapes(load_graph_def(got.graph_path), [spec.input_tensor]).get(spec.input_tensor)
    for fix in fixes:
        log.info(f"note: graph rewritten: {fix.note()}")
    kind = "a Softmax" if outputs.softmax else "not a Softmax: its values are taken as probabilities as they are"
    log.info(f"fetch: adopting {outputs.probabilities} of {got.graph_path.name} ({outputs.classes} classes, {kind}; "
             f"{'logits ' + outputs.logits if outputs.logits else 'no logits'})")
    return {"graph": Path(got.graph_path)}, {
        "spec": spec.to_dict(), "source": got.source, "checksum": got.checksum, "model": outputs.to_dict(),
        "input": {"name": spec.input_tensor, "shape": None if shape is None else list(shape)},
        "recognised_as": ctx.cfg.graph.recognised_as, "graph_fixes": [fix.to_dict() for fix in fixes]}


def _fetch_run(ctx: Context) -> tuple[dict[str, Path], dict]:
    from pipeline.fetch import fetch_backbone

    if ctx.cfg.adopt is not None:
        return _fetch_adopted(ctx)
    got = fetch_backbone(ctx.cfg.backbone_spec(), cache_dir=ctx.cfg.cache_dir, mirror=ctx.cfg.mirror,
                         offline=ctx.cfg.offline, progress=ctx.cfg.progress)
    return {"graph": Path(got.graph.graph_path)}, got.info()


# --- retrain -----------------------------------------------------------------------------------

def _retrain_fingerprint(ctx: Context) -> dict:
    c = ctx.cfg
    if c.adopt is not None:
        labels = c.adopt.labels
        return {"fetch": _upstream(ctx, "fetch"), "spec": ctx.spec().to_dict(), "model": ctx.model().to_dict(),
                "images": _folder_key(c.images), "test_images": _folder_key(c.test_images),
                "split": [c.validation_pct, c.test_pct],
                "labels": None if labels is None else [str(Path(labels).resolve()), _file_digest(labels)]}
    fp = {
        "fetch": _upstream(ctx, "fetch"), "spec": ctx.spec().to_dict(),
        "images": _folder_key(c.images), "test_images": _folder_key(c.test_images),
        "split": [c.validation_pct, c.test_pct], "train": c.train.to_dict(), "augment": c.augment.to_dict(),
    }
    if c.train.fine_tune:
        fp["fine_tune_blocks"] = list(fine_tune_blocks(c.catalog_row))
    return fp


def _file_digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None  # validation has said why; the stage reads it again and says so


def _retrain_adopted(ctx: Context) -> tuple[dict[str, Path], dict]:
    """No training: the split, the graph's labels and an empty history (``retrain.adopt``)."""
    from pipeline.config import read_labels
    from pipeline.retrain import adopt, numbered_labels

    c, model = ctx.cfg, ctx.model()
    if c.adopt.labels is not None:
        labels, source = read_labels(c.adopt.labels), str(c.adopt.labels)
    else:
        labels, source = numbered_labels(model.classes), f"numbered 0..{model.classes - 1}: no --labels given"
        log.info(f"retrain: no --labels given; the graph's {model.classes} outputs are labelled 0..{model.classes - 1} "
                 "(pass --labels FILE, one name per line in output order, to name them)")
    if len(labels) != model.classes:
        raise PipelineError(f"--labels {c.adopt.labels}: {len(labels)} labels, but the graph's output "
                            f"{model.probabilities} has {model.classes} classes; give one label per output")
    result = adopt(build_dataset(c.images, c.test_images, c.validation_pct, c.test_pct), labels, source,
                   images_dir=c.images)
    if result.labelled:
        log.info(f"retrain: adopted graph, nothing trained; the class folders name {len(result.dataset.classes)} "
                 f"of its labels, so verify scores the test images against them")
    else:
        log.info(f"retrain: adopted graph, nothing trained; verify runs unlabelled (agreement and drift only): "
                 f"{result.unlabelled_reason}")
    outputs = result.save(ctx.run.stage("retrain"))
    return outputs, {"adopted": True, "labels": source, "labelled": result.labelled,
                     "unlabelled_reason": result.unlabelled_reason, "skipped": len(result.skipped)}


def bottleneck_root(c: RunConfig):
    """Where the run's bottleneck entries live: ``--bottleneck-cache`` (a folder or a URL, kept as
    given) or CACHE_DIR/bottlenecks."""
    from pipeline.fetch import default_cache_dir

    return c.bottleneck_cache or Path(c.cache_dir or default_cache_dir()) / "bottlenecks"


FINE_TUNE_PROGRESS = "fine-tune-progress.npz"  # RUN/retrain/: the joint phase's state while it trains


def _retrain_run(ctx: Context) -> tuple[dict[str, Path], dict]:
    from pipeline.retrain import retrain

    c, out = ctx.cfg, ctx.run.stage("retrain")
    if c.images is None:
        raise PipelineError("retrain needs --images DIR (one sub-folder per class)")
    if c.adopt is not None:
        return _retrain_adopted(ctx)
    summaries = None
    if c.summaries_dir:
        # One sub-folder per run, kept between runs, as TensorBoard expects.
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        summaries = Path(c.summaries_dir) / f"{Path(c.out).name}-{stamp}"
    result = retrain(
        build_dataset(c.images, c.test_images, c.validation_pct, c.test_pct), ctx.graph_path(), ctx.spec(),
        ctx.stage_info("fetch")["outputs"]["graph"]["sha256"],
        bottleneck_root(c),
        c.train, c.augment, progress=c.progress, summaries_dir=summaries, images_dir=c.images, beam=c.beam,
        checkpoint_dir=out / "checkpoints" if c.train.checkpoint_every else None,
        fine_tune_blocks=fine_tune_blocks(c.catalog_row), resume_path=out / FINE_TUNE_PROGRESS)
    if c.print_misclassified:
        for m in result.misclassified:
            log.info(f"misclassified: {m['path']} (true {m['true']!r}, predicted {m['predicted']!r})")
    outputs = result.save(out)
    (out / FINE_TUNE_PROGRESS).unlink(missing_ok=True)  # saved: nothing left to resume
    if result.fine_tune:
        ft = result.fine_tune
        alone = ft["head_only_validation"]["accuracy"]
        log.info(f"retrain: fine-tuned {ft['trained_weights']:,} weights after {ft['tensor']} in {ft['seconds']:.1f} s"
                 + ("" if alone is None else f" (head alone: validation accuracy {alone:.4f})"))
    for s in ("validation", "test"):
        m = result.metrics[s]
        if m["n"]:
            log.info(f"retrain: {s} accuracy {m['accuracy']:.4f}, macro F1 {m['macro_f1']:.4f} on {m['n']} images")
    return outputs, {"bottlenecks": {**result.bottlenecks, "skipped": len(result.skipped)}}


# --- export ------------------------------------------------------------------------------------

def _export_fingerprint(ctx: Context) -> dict:
    fp = {"fetch": _upstream(ctx, "fetch"), "retrain": _upstream(ctx, "retrain"), "spec": ctx.spec().to_dict()}
    if ctx.model() is not None:
        fp["model"] = ctx.model().to_dict()
    return fp


def _export_run(ctx: Context) -> tuple[dict[str, Path], dict]:
    from pipeline.backbone import load_graph_def
    from pipeline.export import export_savedmodel
    from pipeline.retrain import Head

    out, model = ctx.run.stage("export"), ctx.model()
    layers = None if model else Head.from_npz(np.load(ctx.run.stage("retrain") / "head.npz")).layers
    graph_def = load_graph_def(ctx.graph_path())
    tail = ctx.outputs("retrain").get("tail")
    if tail is not None:
        from pipeline.finetune import with_constants

        # The fine-tuned blocks' weights go into the graph's constants: a frozen graph like any other.
        with np.load(tail) as values:
            graph_def = with_constants(graph_def, dict(values))
        log.info(f"export: the backbone carries the {len(values.files)} fine-tuned constants of {tail}")
    sm = export_savedmodel(graph_def, ctx.spec(), layers, ctx.labels(), out, outputs=model)
    if model:
        log.info(f"export: {ctx.graph_path().name} wrapped as the SavedModel: (images - {ctx.spec().preprocessing.mean:g}) "
                 f"/ {ctx.spec().preprocessing.std:g} → {model.probabilities} as probabilities"
                 f"{', ' + model.logits + ' as logits' if model.logits else ' (the graph has no logits)'}")
    return {"savedmodel": sm, "labels": out / "labels.txt", "preprocessing": out / "preprocessing.json"}, {}


# --- quantize ----------------------------------------------------------------------------------

def _calibration_paths(ctx: Context) -> list[str]:
    from pipeline.quantize import calibration_sample

    return calibration_sample(ctx.dataset().split("train"), ctx.cfg.calibration_images)


def _golden_source(ctx: Context) -> list[str]:
    """The test images golden vectors are picked from (``pipeline/golden.py``), for fingerprints."""
    return _split_paths(ctx, "test")


def _quantize_fingerprint(ctx: Context) -> dict:
    from pipeline.quantize import DYNAMIC_BATCH

    fp = {"export": _upstream(ctx, "export"), "modes": [m.value for m in ctx.cfg.quant_modes],
          "calibration": _calibration_paths(ctx), "golden": _golden_source(ctx),
          "dynamic_batch": sorted(m.value for m in DYNAMIC_BATCH)}
    if _repairs(ctx.cfg):
        import pipeline.repair as repair

        c = ctx.cfg
        fp["repair"] = {"mode": "auto" if c.int8_repair is None else "on", "max_size": c.int8_repair_max_size,
                        "max_accuracy_drop": c.max_accuracy_drop,
                        "gates": {m.value: [c.gate(f"tflite-{m.value}"), c.gates.get(f"tflite-{n}")]
                                  for m, n in repair.REPAIRED.items()},
                        "validation": _split_paths(ctx, "validation"), "more_calibration": _more_calibration(ctx)}
    return fp


def _repairs(c: RunConfig) -> bool:
    """The quantize stage may repair an int8 or dynamic-range file (adopted graphs are not retrained)."""
    return c.int8_repair is not False and c.adopt is None and bool({QuantMode.INT8, QuantMode.DYNAMIC} & set(c.quant_modes))


def _split_paths(ctx: Context, split: str) -> list[str]:
    return sorted(e.path for e in ctx.dataset().split(split))


def _more_calibration(ctx: Context) -> list[str]:
    from pipeline.quantize import calibration_sample
    from pipeline.repair import MORE_CALIBRATION

    return calibration_sample(ctx.dataset().split("train"), MORE_CALIBRATION * ctx.cfg.calibration_images)


def _repair(ctx: Context, files: dict, calibration: list[str], contract: dict) -> tuple[dict[str, Path], dict]:
    """The quantize stage's repair of its int8 and dynamic-range files (:func:`pipeline.repair.repair_run`);
    writes each repaired file with its metadata, and ``repair-<mode>.json`` / ``.png``. Returns the
    repaired files by row name and what the manifest records, by mode."""
    import pipeline.repair as repair
    from pipeline.metadata import with_metadata
    from pipeline.quantize import write_tflite

    c, ds, spec, out = ctx.cfg, ctx.dataset(), ctx.spec(), ctx.run.stage("quantize")
    labels = ctx.labels()
    drop = c.max_accuracy_drop / 100 if list(ds.classes) == labels else None
    settings = {mode: repair.RepairSettings(asked=bool(c.int8_repair), gate=c.gate(f"tflite-{mode.value}"),
                                            target=c.gates.get(f"tflite-{name}"), max_accuracy_drop=drop,
                                            max_size_pct=c.int8_repair_max_size)
                for mode, name in repair.REPAIRED.items()}
    found = repair.repair_run(ctx.savedmodel(), files, calibration, _more_calibration(ctx), ds.split("validation"),
                              ds.split("test"), spec.preprocessing, len(labels), settings)
    written, info = {}, {}
    for mode, (result, record) in found.items():
        info[mode.value] = record
        if result is None:
            continue
        record["report"] = ctx.run.stored(repair.write_report(result, out / f"repair-{mode.value}.json"))
        repair.plot_attempts(result, out / f"repair-{mode.value}.png")
        if not result.reached or result.chosen is result.attempts[0]:
            continue  # not reached, or the plain file itself: no second copy of it
        name = repair.REPAIRED[mode]
        about = (f"{spec.name} + retrained head, {len(labels)} classes, TFLite {mode.value} with "
                 f"{len(result.chosen.float_layers)} layer(s) kept in float, by edgepipe. Input float32 RGB 0..255 at "
                 f"{contract['size']}x{contract['size']}, batch 1; see preprocessing.json.")
        path = out / f"{name}.tflite"
        write_tflite(path, with_metadata(result.model, labels, contract, f"edgepipe {spec.name} {name}", about))
        written[f"tflite-{name}"] = path
    return written, info


def _quantize_run(ctx: Context) -> tuple[dict[str, Path], dict]:
    from pipeline.golden import GOLDEN_DIR, build_golden, write_golden
    from pipeline.metadata import preprocessing_contract
    from pipeline.quantize import quantize

    ds, spec, out = ctx.dataset(), ctx.spec(), ctx.run.stage("quantize")
    calibration = _calibration_paths(ctx)
    contract = preprocessing_contract(read_json(ctx.run.stage("export") / "preprocessing.json"))
    files = quantize(ctx.savedmodel(), ctx.cfg.quant_modes, calibration, spec.preprocessing, ctx.labels(),
                     contract, spec.name, out)
    outputs = {f"tflite-{mode.value}": path for mode, path in files.items()}
    extra = {"calibration_images": len(calibration)}
    for stale in [*out.glob("repair-*.json"), *out.glob("repair-*.png"), *out.glob("*-repaired.tflite")]:
        stale.unlink()
    if _repairs(ctx.cfg):
        repaired, extra["repair"] = _repair(ctx, files, calibration, contract)
        outputs.update(repaired)
    # The golden self-test set, built once per run: tfjs copies it into every bundle.
    labels = ctx.labels()
    golden = build_golden(ctx.savedmodel(), ds.split("test"), labels, spec.preprocessing,
                          true_classes=None if list(ds.classes) == labels else ds.classes)
    outputs["golden"] = write_golden(out / GOLDEN_DIR, golden).parent
    return outputs, extra


# --- tfjs --------------------------------------------------------------------------------------

def _tfjs_fingerprint(ctx: Context) -> dict:
    from pipeline.web import page_fingerprint

    return {"export": _upstream(ctx, "export"), "modes": [m.value for m in ctx.cfg.tfjs_modes],
            "page": page_fingerprint(), "golden": _golden_source(ctx), "shard_mb": ctx.cfg.tfjs_shard_mb}


def _tfjs_run(ctx: Context) -> tuple[dict[str, Path], dict]:
    from pipeline.tfjs import convert_all

    meta = {
        "labels": ctx.labels(),
        "preprocessing": read_json(ctx.run.stage("export") / "preprocessing.json"),
        "backbone": ctx.spec().name,
    }
    bundles, warnings = convert_all(ctx.savedmodel(), ctx.cfg.tfjs_modes, ctx.run.stage("tfjs"), meta,
                                    golden_dir=ctx.outputs("quantize")["golden"],
                                    shard_size_bytes=int(ctx.cfg.tfjs_shard_mb * 1024 * 1024))
    for w in warnings:
        log.warning(f"warning: {w}")
    return {f"tfjs-{mode.value}": path for mode, path in bundles.items()}, {"warnings": warnings}


# --- verify ------------------------------------------------------------------------------------

REFERENCE_GRAPH = "frozen-graph"  # the row name of an adopted graph, the reference of its run's verify


def _verify_gates(ctx: Context) -> dict[str, float]:
    """The user's gate overrides; an adopted graph's SavedModel, a candidate then, gets its own."""
    gates = dict(ctx.cfg.gates)
    if ctx.cfg.adopt is not None:
        gates.setdefault("savedmodel", ADOPTED_SAVEDMODEL_GATE)
    return gates


def _verify_fingerprint(ctx: Context) -> dict:
    c = ctx.cfg
    fp = {"upstream": _upstream(ctx, "retrain", "export", "quantize", "tfjs"),
          "runtimes": list(c.runtimes), "gates": {k: c.gate(k) for k in DEFAULT_GATES} | _verify_gates(ctx),
          "stress": c.stress, "app_preprocessing": c.app_preprocessing.to_dict(), "latency_runs": c.latency_runs,
          "max_accuracy_drop": c.max_accuracy_drop, **_arm64_key(c)}
    if ctx.model() is not None:
        fp["reference"] = {"fetch": _upstream(ctx, "fetch"), "model": ctx.model().to_dict()}
    return fp


def _arm64_key(c: RunConfig) -> dict:
    """The emulation settings, for runs that use an emulated runtime (others keep their fingerprint)."""
    from pipeline.runners import REGISTRY

    if not any(REGISTRY[rt].sampled for rt in c.runtimes if rt in REGISTRY):
        return {}
    return {"arm64_cpu": c.arm64_cpu, "arm64_sample": c.arm64_sample}


def _artifacts(ctx: Context) -> list:
    from pipeline.tfjs import bundle_size
    from pipeline.verify import Artifact

    arts = [Artifact(name, path, path.stat().st_size, ArtifactKind.TFLITE)
            for name, path in ctx.outputs("quantize").items() if name.startswith("tflite-")]
    return arts + [Artifact(name, path, bundle_size(path), ArtifactKind.TFJS)
                   for name, path in ctx.outputs("tfjs").items()]


def _graph_card(ctx: Context, reference, retrain_metrics: dict) -> dict:
    """The adopted graph as the report's models section describes a model (as ``edgepipe check``
    does): what it takes and gives, and where its preprocessing came from."""
    spec, model, info = ctx.spec(), ctx.model(), ctx.stage_info("fetch")["info"]
    recognised = (ctx.cfg.graph.recognised_as if ctx.cfg.graph is not None else None) or info.get("recognised_as")
    source = f"catalog {recognised}" if recognised else "options"
    prep = spec.preprocessing
    values = {"size": prep.size, "mean": prep.mean, "std": prep.std, "channel_order": str(prep.channel_order),
              "resize": str(prep.resize_method)}
    adopted = retrain_metrics.get("adopted") or {}
    return {
        "name": reference.name, "role": "reference", "path": str(reference.path), "format": "frozen GraphDef",
        "kind": None, "runtimes": ["tensorflow"],
        "input": {"shape": (info.get("input") or {}).get("shape"), "dtype": "float32", "quantization": None},
        "output": {"name": model.probabilities, "classes": model.classes,
                   "kind": "probabilities" if model.softmax else None},
        "labels": {"count": model.classes, "source": adopted.get("labels_source")},
        "preprocessing": {k: {"value": v, "source": source if k in ("size", "mean", "std") else "contract"}
                          for k, v in values.items()},
        "warnings": [],
    }


def _verify_run(ctx: Context) -> tuple[dict[str, Path], dict]:
    import tempfile

    from pipeline.runners.base import RunSettings, Tensors
    from pipeline.verify import Artifact, VerifySettings, load_holdout, verify

    c, ds, spec, model = ctx.cfg, ctx.dataset(), ctx.spec(), ctx.model()
    sm = ctx.savedmodel()
    savedmodel = Artifact("savedmodel", sm, sum(p.stat().st_size for p in sm.rglob("*") if p.is_file()),
                          ArtifactKind.SAVEDMODEL)
    retrain_metrics = read_json(ctx.run.stage("retrain") / "metrics.json", default={}) or {}
    unlabelled = (retrain_metrics.get("adopted") or {}).get("unlabelled_reason")
    if model is None:
        reference, candidates, feeds = savedmodel, _artifacts(ctx), {}
    else:
        # An adopted graph is its own reference, run in TensorFlow as it is (fed its normalised
        # pixels), so the export that wraps it is checked too: the SavedModel is a candidate.
        graph = ctx.graph_path()
        reference = Artifact(REFERENCE_GRAPH, graph, graph.stat().st_size, ArtifactKind.GRAPH,
                             tensors=Tensors(input=spec.input_tensor, output=model.probabilities), feed="graph")
        candidates, feeds = [savedmodel, *_artifacts(ctx)], {"graph": spec.preprocessing}
    stress = c.stress and not unlabelled
    if c.stress and unlabelled:
        log.info("verify: --stress skipped: it measures accuracy, and these test images have no labels")
    settings = VerifySettings(classes=tuple(ctx.labels()), contract=spec.preprocessing, runtimes=c.runtimes,
                              gates=_verify_gates(ctx), app=c.app_preprocessing, stress=stress,
                              timeout_s=c.runtime_timeout_s, run=RunSettings(latency_runs=c.latency_runs),
                              unlabelled_reason=unlabelled,
                              reference_input=None if model is None else spec.preprocessing,
                              runner_options={"arm64_cpu": c.arm64_cpu, "cache_dir": c.cache_dir}, sample=c.arm64_sample,
                              max_accuracy_drop=c.max_accuracy_drop)
    # The prepared test images live in a temporary folder for the length of the stage.
    with tempfile.TemporaryDirectory(prefix="edgepipe-holdout-") as tmp:
        passes = None
        if c.beam is not None:
            from pipeline.beam import holdout_pass

            holdout, passes = holdout_pass(ds.split("test"), reference, candidates, settings, Path(tmp), c.beam,
                                           feeds=feeds, labelled=unlabelled is None, progress=c.progress)
        else:
            holdout = load_holdout(ds.split("test"), settings.contract, Path(tmp), settings.app, feeds=feeds,
                                   labelled=unlabelled is None)
        report = verify(reference, candidates, holdout, settings, passes)
    # Images dropped by retrain (train, validation and test alike) belong in the report as well.
    extra = None if model is None else {"models": [_graph_card(ctx, reference, retrain_metrics)],
                                        "reference": reference.name}
    repairs = [read_json(ctx.run.stage("quantize") / f"repair-{mode}.json", default=None)
               for mode, r in ((ctx.stage_info("quantize").get("info") or {}).get("repair") or {}).items() if r.get("needed")]
    if any(repairs):
        extra = (extra or {}) | {"repairs": [r for r in repairs if r]}
    outputs = report.save(ctx.run.root, spec.name,
                          [{"path": p, "reason": r} for p, r in retrain_metrics.get("skipped", {}).items()],
                          retrain_metrics.get("warnings", []), extra)
    return outputs, {"passed": report.passed, "failed": report.failed,
                     "app_differences": c.app_preprocessing.differences(),
                     "reference": reference.name, "labelled": unlabelled is None}


@dataclass(frozen=True)
class Stage:
    name: str
    fingerprint: Callable[[Context], dict]
    run: Callable[[Context], tuple[dict[str, Path], dict]]


# --- deploy ------------------------------------------------------------------------------------

def _deploy_choice(ctx: Context) -> tuple[str | None, str]:
    """The TFLite artifact the Pi bundle ships, and why: ``--deploy-artifact``, else the smallest
    that passed every gate in every runtime verify ran it in."""
    if ctx.cfg.deploy_artifact:
        return ctx.cfg.deploy_artifact, "--deploy-artifact"
    from pipeline.verify import recommend_tflite

    results = (read_json(ctx.run.root / "report.json", default={}) or {}).get("results") or []
    best = recommend_tflite(results)
    if best is None:
        return None, "no TFLite file passed every gate"
    ran = [r["runtime"] for r in results[1:] if r["artifact"] == best["artifact"]]
    return best["artifact"], f"the smallest TFLite file that passed every gate in {', '.join(ran)}"


def _deploy_fingerprint(ctx: Context) -> dict:
    return {"quantize": _upstream(ctx, "quantize"), "export": _upstream(ctx, "export"),
            "verify": _upstream(ctx, "verify"), "artifact": _deploy_choice(ctx)[0]}


def _deploy_run(ctx: Context) -> tuple[dict[str, Path], dict]:
    from pipeline.deploy import write_pi_bundle
    from pipeline.metadata import preprocessing_contract

    name, why = _deploy_choice(ctx)
    files = ctx.outputs("quantize")
    if name is None:
        log.info(f"deploy: nothing to deploy: {why} (name one with --deploy-artifact)")
        return {}, {"artifact": None, "why": why}
    if name not in files:
        raise ConfigError(f"--deploy-artifact {name}: this run has no such file; it has "
                          f"{', '.join(k for k in files if k.startswith('tflite-'))}")
    contract = preprocessing_contract(read_json(ctx.run.stage("export") / "preprocessing.json"))
    out = write_pi_bundle(files[name], list(ctx.labels()), contract, files.get("golden"),
                          ctx.run.stage("deploy") / "raspberry-pi", source=f"{name} ({why})")
    log.info(f"deploy: {out} ships {name} ({why})")
    return {"raspberry-pi": out}, {"artifact": name, "why": why}


STAGES: tuple[Stage, ...] = (
    Stage("fetch", _fetch_fingerprint, _fetch_run),
    Stage("retrain", _retrain_fingerprint, _retrain_run),
    Stage("export", _export_fingerprint, _export_run),
    Stage("quantize", _quantize_fingerprint, _quantize_run),
    Stage("tfjs", _tfjs_fingerprint, _tfjs_run),
    Stage("verify", _verify_fingerprint, _verify_run),
    Stage("deploy", _deploy_fingerprint, _deploy_run),
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


def _up_to_date(info: dict | None, fingerprint: str, run: RunDir) -> bool:
    if not info or info.get("status") != "done" or info.get("fingerprint") != fingerprint:
        return False
    for o in info.get("outputs", {}).values():
        p = run.resolve(o["path"])
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


def run_stages(cfg: RunConfig, until: str = "verify", verbose: bool = False) -> dict:
    """Runs the stages up to and including ``until``, skipping those that are up to date.

    Library output (TensorFlow's C++ logs, the converters) of each stage goes to
    ``RUN/logs/<stage>.log``, and with ``verbose`` to the console as well.

    Returns:
        The final manifest.

    Raises:
        PipelineError: bad input in any stage (the manifest records the failure).
        VerificationFailed: a converted model failed its gate (after the reports are written).
    """
    cfg = cfg.resolved()  # a graph's tensors, found by recognising it, go into the manifest's config
    if cfg.graph is not None and cfg.graph.recognised_as:
        log.info(f"{cfg.graph_flag} {cfg.graph.path.name}: {cfg.graph.describe()}")
    run = RunDir(cfg.out)
    run.root.mkdir(parents=True, exist_ok=True)
    with run.lock():  # one edgepipe per run directory
        return _run_locked(cfg, run, until, verbose)


def _run_locked(cfg: RunConfig, run: RunDir, until: str, verbose: bool) -> dict:
    manifest = run.load_manifest()
    manifest.update({"edgepipe": __version__, "config": cfg.to_dict(), "versions": library_versions()})
    manifest.setdefault("stages", {})
    ctx = Context(cfg, run, manifest)
    for stage in STAGES[: STAGE_NAMES.index(until) + 1]:
        fp = _digest(stage.fingerprint(ctx))
        info = manifest["stages"].get(stage.name)
        if _up_to_date(info, fp, run):
            log.info(f"{stage.name}: up to date, skipped")
            continue
        log.info(f"{stage.name}: running")
        started = time.perf_counter()
        manifest["stages"][stage.name] = {"status": "running", "fingerprint": fp}
        run.save_manifest(manifest)
        try:
            _remove_temporaries(run.stage(stage.name))
            with library_output(run.root / "logs" / f"{stage.name}.log", verbose):
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
            "outputs": {k: {"path": run.stored(p), "sha256": sha256_tree(p)} for k, p in outputs.items()},
            "info": extra,
        }
        if stage.name == "verify" and not extra.get("passed", True):
            entry["status"] = "failed"
        manifest["stages"][stage.name] = entry
        run.save_manifest(manifest)
        log.info(f"{stage.name}: done in {entry['seconds']:.1f} s")
    verify = manifest["stages"].get("verify")
    failures = []
    if until == "verify" and verify and verify.get("status") == "failed":
        cause = ""
        if verify["info"].get("app_differences"):
            cause = f"; the app preprocessing differs from the contract: {', '.join(verify['info']['app_differences'])}"
        failures.append(f"verification failed for {', '.join(verify['info']['failed'])}{cause}; see {run.root / 'report.md'}")
    repaired = (manifest["stages"].get("quantize") or {}).get("info", {}).get("repair") or {}
    if STAGE_NAMES.index(until) >= STAGE_NAMES.index("quantize"):
        failures += [f"{mode} repair {r['reason']} (see {run.resolve(r['report'])})" for mode, r in repaired.items()
                     if r.get("needed") and not r.get("reached")]
    if failures:
        raise VerificationFailed("; ".join(failures))
    return manifest

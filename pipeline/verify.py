"""Running the reference and every converted model on the holdout, and gating the drift.

:func:`verify` is the whole stage as a function: the SavedModel is the reference, and every
(artifact, runtime) pair the runner registry (:data:`pipeline.runners.REGISTRY`) allows is
compared with it on the same images: top-1 agreement, |Δprobability|, KL divergence, and the usual
metrics against the true labels. Each artifact kind has an agreement gate; one failed gate fails
the report. :meth:`Report.save` writes report.json, report.md, report.html and the pictures.
"""
from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from pipeline.config import DEFAULT_GATES, AppPreprocessing  # noqa: F401 (DEFAULT_GATES re-exported)
from pipeline.console import log
from pipeline.errors import DatasetError
from pipeline.runners import REGISTRY, Feed, runtimes_for
from pipeline.runners.base import Prediction, RuntimeFailed
from pipeline.types import ArtifactKind, Preprocessing, Runtime


@dataclass
class Artifact:
    name: str          # e.g. "tflite-int8", the gate key
    path: Path
    size_bytes: int
    kind: ArtifactKind = ArtifactKind.TFLITE


@dataclass
class Result:
    artifact: str
    runtime: str
    top1_agreement: float | None
    accuracy: float | None
    macro_precision: float | None
    macro_recall: float | None
    macro_f1: float | None
    max_abs_diff: float | None
    mean_abs_diff: float | None
    kl_divergence: float | None
    size_bytes: int
    latency_ms: float | None
    gate: float
    passed: bool
    error: str | None = None
    confusion_matrix: list = field(default_factory=list)
    per_class_agreement: list = field(default_factory=list)
    flipped: list = field(default_factory=list)   # indices of test images whose top-1 changed
    flipped_to: list = field(default_factory=list)  # this artifact's top-1 class for each of them

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Holdout:
    """The decoded test images verify runs on.

    Attributes:
        images: uint8 RGB photos as decoded (any size; each runner's input is prepared from them).
        labels: their true class indices.
        paths: their files, in the same order.
        skipped: ``{"path", "reason"}`` for test images that could not be read.
    """

    images: list[np.ndarray]
    labels: np.ndarray
    paths: list[str]
    skipped: list[dict]


def load_holdout(examples: Sequence) -> Holdout:
    """Decodes the test examples (``pipeline.dataset.Example``); unreadable ones are skipped.

    Raises:
        DatasetError: there are no test examples, or none can be read.
    """
    from pipeline.images import ImageError, decode_rgb, read_image_file

    if not examples:
        raise DatasetError("the test split is empty: raise --test-pct or pass --test-images DIR")
    images, labels, paths, skipped = [], [], [], []
    for e in examples:
        try:
            images.append(decode_rgb(read_image_file(e.path), e.path))
            labels.append(e.label)
            paths.append(e.path)
        except (ImageError, OSError) as err:
            # Readable at retrain time (unreadable ones were dropped there), changed since.
            why = err.reason if isinstance(err, ImageError) else f"cannot read ({err.strerror or err})"
            skipped.append({"path": e.path, "reason": why})
            log.info(f"skipped {e.path}: {why}")
    if not images:
        raise DatasetError(f"none of the {len(examples)} test images can be read (listed above); "
                           "restore them or run retrain again")
    return Holdout(images, np.array(labels), paths, skipped)


@dataclass(frozen=True)
class VerifySettings:
    """How to verify.

    Attributes:
        classes: class names in output order.
        contract: the preprocessing the models were exported with.
        runtimes: where converted models run (the reference always runs in TensorFlow).
        gates: minimum top-1 agreement per artifact name (missing names: DEFAULT_GATES, else 1.0).
        app: how the deploying app prepares pixels; runners fed APP pixels get them this way.
        stress: also run the reference with each usual preprocessing mistake.
        timeout_s: wall-clock limit for one runtime on one artifact.
    """

    classes: tuple[str, ...]
    contract: Preprocessing
    runtimes: tuple[Runtime, ...]
    gates: Mapping[str, float] = field(default_factory=dict)
    app: AppPreprocessing = field(default_factory=AppPreprocessing)
    stress: bool = False
    timeout_s: float = 600.0

    def gate(self, artifact: str) -> float:
        return self.gates.get(artifact, DEFAULT_GATES.get(artifact, 1.0))


@dataclass
class Report:
    """What :func:`verify` found. ``results[0]`` is the reference."""

    results: list[Result]
    stress: list[dict]
    reference: np.ndarray  # the reference's probabilities, float32 [N, classes]
    holdout: Holdout
    settings: VerifySettings

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    @property
    def failed(self) -> list[str]:
        return [f"{r.artifact}/{r.runtime}" for r in self.results if not r.passed]

    def to_dict(self, backbone: str, earlier_skipped: Sequence[dict] = (), warnings: Sequence[str] = ()) -> dict:
        """report.json's contents.

        Args:
            backbone: the backbone's name, for the title.
            earlier_skipped: images retrain dropped (train, validation and test alike).
            warnings: dataset warnings (duplicates, leaks) to repeat in the report.
        """
        rows = [r.to_dict() for r in self.results]
        app = self.settings.app
        return {
            "backbone": backbone, "classes": list(self.settings.classes), "n_test": len(self.holdout.images),
            "test_images": list(self.holdout.paths),
            "skipped_images": list(earlier_skipped) + list(self.holdout.skipped), "warnings": list(warnings),
            "results": rows,
            "passed": self.passed,
            "app_preprocessing": {"settings": app.to_dict(), "differences": app.differences()},
            "stress": self.stress,
            "reference_top1": [int(k) for k in self.reference.argmax(1)],
            "recommendation": recommend(rows),
        }

    def save(self, run_root: Path, backbone: str, earlier_skipped: Sequence[dict] = (),
             warnings: Sequence[str] = ()) -> dict[str, Path]:
        """Writes report.json, report.md and report.html at ``run_root`` and the pictures and the
        reference's probabilities under ``run_root/verify``; returns the report files by name."""
        from pipeline.report import plot_confusion_matrices, plot_tradeoffs, write_reports
        from pipeline.report_html import write_html_report
        from pipeline.rundir import atomic_write_bytes

        run_root = Path(run_root)
        out = run_root / "verify"
        out.mkdir(parents=True, exist_ok=True)
        report = self.to_dict(backbone, earlier_skipped, warnings)
        write_reports(run_root, report)
        plot_confusion_matrices(out / "confusion_matrices.png", report["results"], list(self.settings.classes))
        plot_tradeoffs(out / "tradeoffs.png", report["results"])
        write_html_report(run_root / "report.html", report, self.holdout.images, out / "tradeoffs.png")
        buf = io.BytesIO()
        np.savez_compressed(buf, probabilities=self.reference, labels=self.holdout.labels)
        atomic_write_bytes(out / "reference.npz", buf.getvalue())
        return {"report": run_root / "report.json", "report_md": run_root / "report.md",
                "report_html": run_root / "report.html"}


def compare(reference: np.ndarray, probs: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
    """Drift and quality figures of one prediction against the reference and the truth."""
    from pipeline.metrics import classification_metrics

    if probs.shape != reference.shape:
        raise RuntimeFailed(f"output shape {probs.shape} differs from the reference {reference.shape}")
    diff = np.abs(probs - reference)
    eps = 1e-7
    p, q = np.clip(reference, eps, 1), np.clip(probs, eps, 1)
    # Clipping and rounding can make a near-zero KL slightly negative; it is never below 0.
    kl = max(0.0, float(np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=1))))
    pred = probs.argmax(1)
    flipped = np.nonzero(pred != reference.argmax(1))[0]
    m = classification_metrics(labels, pred, num_classes)
    same = pred == reference.argmax(1)
    per_class = [float(same[labels == k].mean()) if np.any(labels == k) else None for k in range(num_classes)]
    return {
        "per_class_agreement": per_class,
        "top1_agreement": float(1 - len(flipped) / max(len(pred), 1)),
        "accuracy": m["accuracy"],
        "macro_precision": m["macro_precision"],
        "macro_recall": m["macro_recall"],
        "macro_f1": m["macro_f1"],
        "max_abs_diff": float(diff.max()) if diff.size else 0.0,
        "mean_abs_diff": float(diff.mean()) if diff.size else 0.0,
        "kl_divergence": kl,
        "confusion_matrix": m["confusion_matrix"],
        "flipped": [int(i) for i in flipped],
        "flipped_to": [int(pred[i]) for i in flipped],
    }


def evaluate(
    artifact: Artifact, runtime: str, prediction: Prediction | None, reference: np.ndarray,
    labels: np.ndarray, num_classes: int, gate: float, error: str | None = None,
) -> Result:
    """One report row; a runtime failure is a failed row with the reason, not an exception."""
    if prediction is None:
        return Result(artifact.name, runtime, None, None, None, None, None, None, None, None,
                      artifact.size_bytes, None, gate, False, error or "no prediction")
    try:
        figures = compare(reference, prediction.probabilities, labels, num_classes)
    except RuntimeFailed as err:
        return evaluate(artifact, runtime, None, reference, labels, num_classes, gate, str(err))
    return Result(
        artifact=artifact.name, runtime=runtime, size_bytes=artifact.size_bytes,
        latency_ms=prediction.latency_ms, gate=gate,
        passed=figures["top1_agreement"] >= gate, **figures,
    )


def run_one(runner, artifact: Artifact, images: np.ndarray, timeout_s: float):
    """(prediction, error) for one pair; runtime failures become an error string."""
    try:
        return runner.predict(artifact.path, images, timeout_s=timeout_s), None
    except RuntimeFailed as err:
        return None, str(err)


def verify(reference: Artifact, artifacts: Sequence[Artifact], holdout: Holdout,
           settings: VerifySettings) -> Report:
    """Runs the reference and every (artifact, runtime) pair on the holdout and gates the drift.

    Args:
        reference: the SavedModel (kind SAVEDMODEL); its predictions are what the others must match.
        artifacts: converted models, in report order; each runs in every chosen runtime that
            takes its kind (registry order).
        holdout: the decoded test images (:func:`load_holdout`).
        settings: runtimes, gates, app preprocessing, stress, timeout.

    Returns:
        Every row, failed ones included (a runtime that crashes or hangs is a failed row with
        the reason); the caller decides what a failed report means.
    """
    from pipeline.stress import MISTAKES, prepare_batch

    prep, y, n_cls = settings.contract, holdout.labels, len(settings.classes)
    x = prepare_batch(holdout.images, prep, AppPreprocessing())
    app = settings.app
    # Converted models get their inputs the way the deploying app prepares them (the contract
    # unless settings.app says otherwise); the reference always gets the contract.
    x_app = prepare_batch(holdout.images, prep, app) if app != AppPreprocessing() else x
    log.info(f"verify: reference SavedModel on {len(x)} test images")
    ref_runner = REGISTRY[Runtime.TENSORFLOW].create(settings.classes)  # kept for --stress
    ref_pred = ref_runner.predict(reference.path, x)
    ref = ref_pred.probabilities
    results = [evaluate(reference, ref_runner.name, ref_pred, ref, y, n_cls, settings.gate(reference.name))]
    for art in artifacts:
        for info in runtimes_for(art.kind, settings.runtimes):
            runner = info.create(settings.classes)
            why = runner.unsupported(art.path)
            if why:
                log.info(f"verify: {art.name:15s} {runner.name} skipped: {why}")
                continue
            inputs = x if info.feed is Feed.CONTRACT else x_app
            pred, err = run_one(runner, art, inputs, settings.timeout_s)
            row = evaluate(art, runner.name, pred, ref, y, n_cls, settings.gate(art.name), err)
            results.append(row)
            status = "ok" if row.passed else "FAILED"
            detail = row.error or f"agreement {row.top1_agreement:.4f}, acc {row.accuracy:.4f}, {row.latency_ms:.2f} ms/img"
            log.info(f"verify: {art.name:15s} {runner.name:15s} {status}: {detail}")
    stress = []
    if settings.stress:
        for name, mistake in MISTAKES.items():
            probs = ref_runner.predict(reference.path, prepare_batch(holdout.images, prep, mistake),
                                       timing=False).probabilities
            agree = float((probs.argmax(1) == ref.argmax(1)).mean())
            acc = float((probs.argmax(1) == y).mean())
            stress.append({"mistake": name, "setting": mistake.differences()[0], "accuracy": acc,
                           "accuracy_drop": results[0].accuracy - acc, "top1_agreement": agree,
                           "mean_abs_diff": float(np.abs(probs - ref).mean())})
            log.info(f"verify --stress: {name:38s} accuracy {acc:.4f} ({acc - results[0].accuracy:+.4f}), "
                     f"agreement {agree:.4f}")
    return Report(results, stress, ref, holdout, settings)


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

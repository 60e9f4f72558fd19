"""Running the reference and every converted model on the holdout, and gating the drift.

:func:`verify` is the whole stage as a function: the SavedModel is the reference, and every
(artifact, runtime) pair the runner registry (:data:`pipeline.runners.REGISTRY`) allows is
compared with it on the same images: top-1 agreement, |Δprobability|, KL divergence, and the usual
metrics against the true labels. Each artifact kind has an agreement gate; one failed gate fails
the report. :meth:`Report.save` writes report.json, report.md, report.html and the pictures.

The test images are decoded once and prepared once per feed into files read a batch at a time
(:mod:`pipeline.runners.feed`), so memory stays flat in the number of test images. Each runtime
has one runner for every artifact (one worker process, restarted only after a crash). Per row,
the agreement pass runs batched on every core; the latency figure is its own measurement, single
images on one thread after a warm-up (:class:`~pipeline.runners.base.RunSettings`), taken while
nothing else runs.
"""
from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np

from pipeline.config import DEFAULT_GATES, AppPreprocessing  # noqa: F401 (DEFAULT_GATES re-exported)
from pipeline.console import log
from pipeline.errors import DatasetError
from pipeline.runners import REFERENCE_RUNTIME, REGISTRY, Feed, runtimes_for
from pipeline.runners.base import Prediction, RunSettings, RuntimeFailed, Tensors
from pipeline.runners.feed import FeedFile
from pipeline.types import ArtifactKind, Preprocessing, Runtime


@dataclass
class Artifact:
    """One model verify runs.

    Attributes:
        name: its row name, e.g. ``tflite-int8`` in a run, a file name in ``edgepipe check``.
        kind: what runs it (:data:`pipeline.runners.REGISTRY`).
        tensors: which input and output the runners use (default: the runner's choice).
        feed: the :attr:`Holdout.feeds` entry it takes, for a model with its own preprocessing:
            one name for every runtime, or a name per :class:`~pipeline.runners.Feed` (``edgepipe
            check`` gives MediaPipe, which normalises by the metadata itself, raw pixels). None:
            the contract's or the app's pixels, as the registry says.
        gate_key: the :data:`DEFAULT_GATES` entry for it when ``name`` is not one (check's files).
        columns: for each reference class, its output column in this model (labels in another
            order); None: the same order.
    """

    name: str
    path: Path
    size_bytes: int
    kind: ArtifactKind = ArtifactKind.TFLITE
    tensors: Tensors = field(default_factory=Tensors)
    feed: str | Mapping[Feed, str] | None = None
    gate_key: str | None = None
    columns: tuple[int, ...] | None = None


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
    latency_ms: float | None  # the p50 of latency_runs single-image calls
    gate: float
    passed: bool
    error: str | None = None
    confusion_matrix: list = field(default_factory=list)
    per_class_agreement: list = field(default_factory=list)
    flipped: list = field(default_factory=list)   # indices of test images whose top-1 changed
    flipped_to: list = field(default_factory=list)  # this artifact's top-1 class for each of them
    latency_p50_ms: float | None = None
    latency_p90_ms: float | None = None
    latency_runs: int = 0
    output_kind: str | None = None  # "probabilities", or "logits" (softmax applied before comparing)
    sample_size: int | None = None  # test images this row ran on, when a sample (emulated runtimes)
    twin_runtime: str | None = None  # the x86 (or Node) runtime of the same build this row is compared with
    twin_top1_agreement: float | None = None
    twin_max_abs_diff: float | None = None
    twin_max_lsb: float | None = None  # twin_max_abs_diff in steps of the file's quantised output
    ran_on: dict = field(default_factory=dict)  # what ran it, as the runner saw it (machine, versions, backend)
    accuracy_drop: float | None = None  # points of accuracy below the reference's on the same images
    max_accuracy_drop: float | None = None  # the bound this row was gated on (int8 and dynamic variants)
    accuracy_drop_p: float | None = None  # the chance of a loss this large from a file no worse (McNemar)

    def to_dict(self) -> dict:
        return asdict(self)


class DecodedImages(Sequence):
    """The test images decoded on access (uint8 RGB), for the few the report shows."""

    def __init__(self, paths: Sequence[str]):
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, k):
        from pipeline.images import decode_rgb, read_image_file

        return decode_rgb(read_image_file(self.paths[k]), self.paths[k])


@dataclass(frozen=True)
class Holdout:
    """The test images verify runs on, prepared once into feed files.

    Attributes:
        labels: their true class indices; None when they have none (agreement and drift only).
        paths: their files, in the same order.
        skipped: ``{"path", "reason"}`` for test images that could not be read.
        contract: the images as the preprocessing contract prepares them (what the reference gets).
        app: as the deploying app prepares them (the contract's file when they are the same).
        feeds: by name, the images as a model with its own preprocessing takes them (its
            ``(x - mean) / std`` applied), for :attr:`Artifact.feed`.
    """

    labels: np.ndarray | None
    paths: list[str]
    skipped: list[dict]
    contract: FeedFile
    app: FeedFile
    feeds: Mapping[str, FeedFile] = field(default_factory=dict)

    @property
    def images(self) -> DecodedImages:
        return DecodedImages(self.paths)

    def __len__(self) -> int:
        return len(self.paths)


DECODE_CHUNK = 32  # test images decoded and prepared at a time


def prepare_model_input(rgbs: list[np.ndarray], prep: Preprocessing) -> np.ndarray:
    """Decoded uint8 RGB photos → float32 ``[k, size, size, 3]`` as a model with this
    preprocessing takes them: resized, channels ordered, ``(x - mean) / std``."""
    from pipeline.stress import prepare_batch

    how = AppPreprocessing(channel_order=prep.channel_order, resize=prep.resize_method, antialias=prep.antialias)
    x = prepare_batch(rgbs, prep, how)
    return ((x - np.float32(prep.mean)) / np.float32(prep.std)).astype(np.float32)


CONTRACT, APP = "(contract)", "(app)"  # the feeds every holdout has (no model is named so)


def prepare_feed(rgbs: list[np.ndarray], name: str, contract: Preprocessing, app: AppPreprocessing,
                 feeds: Mapping[str, Preprocessing]) -> np.ndarray:
    """Decoded photos as feed ``name`` holds them: the contract's pixels (what the reference
    gets), the app's, or those of a model with its own preprocessing (``feeds[name]``)."""
    from pipeline.stress import prepare_batch

    if name == CONTRACT:
        return prepare_batch(rgbs, contract, AppPreprocessing())
    if name == APP:
        return prepare_batch(rgbs, contract, app)
    return prepare_model_input(rgbs, feeds[name])


def load_holdout(examples: Sequence, contract: Preprocessing, folder: Path,
                 app: AppPreprocessing = AppPreprocessing(), feeds: Mapping[str, Preprocessing] = {},
                 labelled: bool = True) -> Holdout:
    """Decodes each test example (``pipeline.dataset.Example``) once and writes it, prepared, into
    ``folder/contract.f32`` (and ``folder/app.f32`` when ``app`` differs from the contract, and
    ``folder/<name>.f32`` for each of ``feeds``, see :func:`prepare_model_input`); unreadable ones
    are skipped. Only :data:`DECODE_CHUNK` images are in memory at a time.

    Args:
        labelled: the examples' labels are classes of the models (else the holdout has none).

    Raises:
        DatasetError: there are no test examples, or none can be read.
    """
    from contextlib import ExitStack

    from pipeline.images import ImageError, decode_rgb, read_image_file, reason_of

    if not examples:
        raise DatasetError("the test split is empty: raise --test-pct or pass --test-images DIR")
    folder = Path(folder)
    labels, paths, skipped = [], [], []
    same = app == AppPreprocessing()

    def prepared(app_file, feed_files) -> Iterator[np.ndarray]:
        for k in range(0, len(examples), DECODE_CHUNK):
            chunk = []
            for e in examples[k:k + DECODE_CHUNK]:
                try:
                    chunk.append(decode_rgb(read_image_file(e.path), e.path))
                    labels.append(e.label)
                    paths.append(e.path)
                except (ImageError, OSError) as err:
                    # Readable at retrain time (unreadable ones were dropped there), changed since.
                    why = reason_of(err)
                    skipped.append({"path": e.path, "reason": why})
                    log.info(f"skipped {e.path}: {why}")
            if chunk:
                if app_file is not None:
                    np.ascontiguousarray(prepare_feed(chunk, APP, contract, app, feeds), "<f4").tofile(app_file)
                for name, f in feed_files.items():
                    np.ascontiguousarray(prepare_feed(chunk, name, contract, app, feeds), "<f4").tofile(f)
                yield prepare_feed(chunk, CONTRACT, contract, app, feeds)

    shape = (contract.size, contract.size, 3)
    with ExitStack() as files:
        app_file = None if same else files.enter_context(open(folder / "app.f32", "wb"))
        feed_files = {name: files.enter_context(open(folder / f"feed-{k}.f32", "wb")) for k, name in enumerate(feeds)}
        feed = FeedFile.write(folder / "contract.f32", prepared(app_file, feed_files), shape)
    if not paths:
        raise DatasetError(f"none of the {len(examples)} test images can be read (listed above); "
                           "restore them or run retrain again")
    app_feed = feed if same else FeedFile(folder / "app.f32", feed.shape)
    extra = {name: FeedFile(folder / f"feed-{k}.f32", (len(paths), prep.size, prep.size, 3))
             for k, (name, prep) in enumerate(feeds.items())}
    return Holdout(np.array(labels) if labelled else None, paths, skipped, feed, app_feed, extra)


# The variants whose gate also bounds the accuracy they lose against the reference
# (VerifySettings.max_accuracy_drop): a file that agrees 0.93 may still lose 2.5 points.
ACCURACY_BOUNDED = frozenset({"tflite-dynamic", "tflite-int8", "tflite-int8-int8", "tflite-int8-uint8",
                              "tflite-int8-repaired", "tflite-dynamic-repaired"})


ACCURACY_DROP_P = 0.05  # a drop past the bound fails the row only when it is this unlikely by chance


def loss_p(lost: int, gained: int) -> float:
    """The chance of losing ``lost`` images and gaining ``gained`` (those one model gets right and
    the other wrong) from a model no worse: the exact one-sided McNemar test."""
    from scipy.stats import binomtest

    return float(binomtest(lost, lost + gained, 0.5, alternative="greater").pvalue) if lost else 1.0


def bound_accuracy(row: Result, reference_pred: np.ndarray, labels: np.ndarray, bound: float | None) -> None:
    """Fails ``row`` when its accuracy is more than ``bound`` points below the reference's on the
    same images and the loss is not chance: an exact one-sided McNemar test on the images one of the
    two gets right and the other wrong (p < :data:`ACCURACY_DROP_P`). On 18 test images one flip is
    5.6 points; it takes several for a significant loss."""
    if bound is None or row.accuracy is None or not len(labels):
        return
    pred = np.array(reference_pred)
    pred[row.flipped] = row.flipped_to
    ref_right, row_right = reference_pred == labels, pred == labels
    lost, gained = int(np.sum(ref_right & ~row_right)), int(np.sum(~ref_right & row_right))
    row.accuracy_drop = round(100 * (lost - gained) / len(labels), 4)
    row.max_accuracy_drop = bound
    row.accuracy_drop_p = loss_p(lost, gained)
    if row.accuracy_drop > bound + 1e-9 and row.accuracy_drop_p < ACCURACY_DROP_P:
        row.passed = False


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
        run: batch size and threads of the agreement pass, single-image calls timed per row.
        unlabelled_reason: why the holdout has no true labels (the report says it).
        reference_input: when the reference takes normalised values (an adopted frozen graph), the
            preprocessing that makes them: ``--stress`` feeds it each mistake normalised this way.
        runner_options: what runtimes that take settings get (``arm64_cpu``, ``cache_dir``).
        sample: test images the emulated (``sampled``) runtimes run, class-stratified; 0 = all.
    """

    classes: tuple[str, ...]
    contract: Preprocessing
    runtimes: tuple[Runtime, ...]
    gates: Mapping[str, float] = field(default_factory=dict)
    app: AppPreprocessing = field(default_factory=AppPreprocessing)
    stress: bool = False
    timeout_s: float = 600.0
    run: RunSettings = field(default_factory=RunSettings)
    unlabelled_reason: str | None = None
    reference_input: Preprocessing | None = None
    runner_options: Mapping[str, object] = field(default_factory=dict)
    sample: int = 64
    max_accuracy_drop: float | None = None

    def accuracy_bound(self, artifact: str, key: str | None = None) -> float | None:
        """The points of accuracy the row may lose against the reference: ``max_accuracy_drop``
        for the int8 and dynamic-range variants (:data:`ACCURACY_BOUNDED`), else None."""
        return self.max_accuracy_drop if (key or artifact) in ACCURACY_BOUNDED else None

    def gate(self, artifact: str, key: str | None = None) -> float:
        """The gate of the row named ``artifact``: its own override, else that of its kind
        ``key`` (e.g. ``tflite-int8`` for a checked file), else the default."""
        for name in (artifact, key):
            if name is not None and name in self.gates:
                return self.gates[name]
        return DEFAULT_GATES.get(artifact if key is None else key, 1.0)


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

    def to_dict(self, backbone: str | None, earlier_skipped: Sequence[dict] = (), warnings: Sequence[str] = (),
                extra: Mapping | None = None) -> dict:
        """report.json's contents.

        Args:
            backbone: the backbone's name, for the title.
            earlier_skipped: images retrain dropped (train, validation and test alike).
            warnings: dataset warnings (duplicates, leaks) to repeat in the report.
            extra: more entries (``edgepipe check``: ``title``, ``models``).
        """
        rows = [r.to_dict() for r in self.results]
        app = self.settings.app
        return {
            "backbone": backbone, "classes": list(self.settings.classes), "n_test": len(self.holdout),
            "labelled": self.holdout.labels is not None, "unlabelled_reason": self.settings.unlabelled_reason,
            "test_images": list(self.holdout.paths),
            "skipped_images": list(earlier_skipped) + list(self.holdout.skipped), "warnings": list(warnings),
            "results": rows,
            "passed": self.passed,
            "app_preprocessing": {"settings": app.to_dict(), "differences": app.differences()},
            "stress": self.stress,
            "reference_top1": [int(k) for k in self.reference.argmax(1)],
            "latency": {"runs": self.settings.run.latency_runs, "threads": 1, "batch": 1,
                        "agreement_pass": {"batch": self.settings.run.batch, "threads": self.settings.run.threads}},
            "recommendation": recommend(rows),
            "findings": findings(rows),
            **(extra or {}),
        }

    def save(self, run_root: Path, backbone: str | None, earlier_skipped: Sequence[dict] = (),
             warnings: Sequence[str] = (), extra: Mapping | None = None) -> dict[str, Path]:
        """Writes report.json, report.md and report.html at ``run_root`` and the pictures and the
        reference's probabilities under ``run_root/verify``; returns the report files by name."""
        from pipeline.report import plot_confusion_matrices, plot_tradeoffs, write_reports
        from pipeline.report_html import write_html_report
        from pipeline.rundir import atomic_write_bytes

        run_root = Path(run_root)
        out = run_root / "verify"
        out.mkdir(parents=True, exist_ok=True)
        report = self.to_dict(backbone, earlier_skipped, warnings, extra)
        write_reports(run_root, report)
        plot_confusion_matrices(out / "confusion_matrices.png", report["results"], list(self.settings.classes))
        plot_tradeoffs(out / "tradeoffs.png", report["results"])
        write_html_report(run_root / "report.html", report, self.holdout.images, out / "tradeoffs.png")
        buf = io.BytesIO()
        labels = self.holdout.labels if self.holdout.labels is not None else np.full(len(self.holdout), -1)
        np.savez_compressed(buf, probabilities=self.reference, labels=labels)
        atomic_write_bytes(out / "reference.npz", buf.getvalue())
        return {"report": run_root / "report.json", "report_md": run_root / "report.md",
                "report_html": run_root / "report.html"}


def as_probabilities(outputs: np.ndarray) -> tuple[np.ndarray, str]:
    """A model's outputs as probabilities, and what they were: ``probabilities`` when every row
    is already a distribution (within the rounding of a quantised output), else ``logits``, to
    which softmax is applied, so a logits model and a softmax model compare on one scale."""
    x = np.asarray(outputs, np.float32)
    if x.size and x.min() >= -1e-3 and x.max() <= 1 + 1e-3 and np.all(np.abs(x.sum(1) - 1) <= 0.02 + x.shape[1] / 512):
        return x, "probabilities"
    z = np.exp(x - x.max(1, keepdims=True))
    return (z / z.sum(1, keepdims=True)).astype(np.float32), "logits"


def findings(rows: Sequence[dict]) -> list[str]:
    """What the rows say together that no one row does: a TF.js bundle that passes in wasm but
    fails on f16 WebGL, an arm64 row that drifts from the same wheel on x86."""
    out = []
    by = {(r["artifact"], r["runtime"]): r for r in rows}
    for (art, rt), r in by.items():
        wasm = by.get((art, Runtime.TFJS_WASM.value))
        if rt == Runtime.CHROMIUM_WEBGL_F16.value and not r["passed"] and wasm and wasm["passed"]:
            got = "did not run" if r["top1_agreement"] is None else f"agreement {r['top1_agreement']:.4f} < {r['gate']:.2f}"
            out.append(f"{art} passes in tfjs-wasm but fails on f16 WebGL ({got}): on GPUs that compute in 16-bit "
                       "floats, as many phones do, it changes answers; ship float32 WebGL only or a tfjs-wasm fallback")
        if r.get("twin_top1_agreement") is not None and r["twin_top1_agreement"] < 1.0:
            n = r.get("sample_size")
            out.append(f"{art} in {rt} moves top-1 against {r['twin_runtime']} on {1 - r['twin_top1_agreement']:.1%} of "
                       f"{n or 'the'} test images (max |Δp| {r['twin_max_abs_diff']:.3g}"
                       + (f", {r['twin_max_lsb']:g} output LSBs)" if r.get("twin_max_lsb") is not None else ")"))
    return out


def compare(reference: np.ndarray, probs: np.ndarray, labels: np.ndarray | None, num_classes: int) -> dict:
    """Drift and quality figures of one prediction against the reference and the truth (with no
    true labels: drift only, per-class agreement by the reference's top-1 class)."""
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
    if labels is None:
        m = dict.fromkeys(("accuracy", "macro_precision", "macro_recall", "macro_f1"), None) | {"confusion_matrix": []}
        by = reference.argmax(1)
    else:
        m, by = classification_metrics(labels, pred, num_classes), labels
    same = pred == reference.argmax(1)
    per_class = [float(same[by == k].mean()) if np.any(by == k) else None for k in range(num_classes)]
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
        probs, kind = model_probabilities(artifact, prediction.probabilities)
        figures = compare(reference, probs, labels, num_classes)
    except RuntimeFailed as err:
        return evaluate(artifact, runtime, None, reference, labels, num_classes, gate, str(err))
    return Result(
        artifact=artifact.name, runtime=runtime, size_bytes=artifact.size_bytes,
        latency_ms=prediction.latency_ms, gate=gate,
        passed=figures["top1_agreement"] >= gate, **figures,
        latency_p50_ms=prediction.percentile(50), latency_p90_ms=prediction.percentile(90),
        latency_runs=len(prediction.latencies_ms), output_kind=kind,
    )


def model_probabilities(artifact: Artifact, outputs: np.ndarray) -> tuple[np.ndarray, str]:
    """A model's raw outputs as probabilities in the reference's class order (see
    :func:`as_probabilities` and :attr:`Artifact.columns`), and whether they were logits.

    Raises:
        RuntimeFailed: the outputs are not ``[N, classes]``.
    """
    outputs = np.asarray(outputs, np.float32)
    if outputs.ndim != 2:
        raise RuntimeFailed(f"output of shape {outputs.shape} is not [images, classes]")
    if artifact.columns is not None:
        if outputs.shape[1] <= max(artifact.columns):
            raise RuntimeFailed(f"output has {outputs.shape[1]} columns, the labels name {len(artifact.columns)}")
        outputs = outputs[:, list(artifact.columns)]
    return as_probabilities(outputs)


def run_one(runner, artifact: Artifact, images: FeedFile, settings: VerifySettings, run: RunSettings):
    """(prediction, error) for one pair; runtime failures become an error string."""
    try:
        return runner.predict(artifact.path, images, timeout_s=settings.timeout_s, settings=run,
                              tensors=artifact.tensors), None
    except RuntimeFailed as err:
        return None, str(err)


def feed_name(artifact: Artifact, feed: Feed) -> str:
    """Which of the holdout's feeds ``artifact`` takes in a runtime fed ``feed`` (its own when it
    has one): :data:`CONTRACT`, :data:`APP` or one of :attr:`Holdout.feeds`."""
    if isinstance(artifact.feed, str):
        return artifact.feed
    if artifact.feed is not None and feed in artifact.feed:
        return artifact.feed[feed]
    return CONTRACT if feed is Feed.CONTRACT else APP


def feed_of(holdout: Holdout, artifact: Artifact, feed: Feed) -> FeedFile:
    """The images ``artifact`` takes in a runtime fed ``feed`` (its own feed when it has one)."""
    name = feed_name(artifact, feed)
    return {CONTRACT: holdout.contract, APP: holdout.app}.get(name) or holdout.feeds[name]


def _single(feed: FeedFile) -> FeedFile:
    return FeedFile(feed.path, (1, *feed.shape[1:]))


# Gates of a runtime, beside the artifact's: a row passes with the lower of the two. f16 WebGL (how
# many phone GPUs compute) rounds every activation to 11 bits; a user accepts a few borderline
# images moving there, not a changed model.
RUNTIME_GATES: dict[Runtime, float] = {Runtime.CHROMIUM_WEBGL_F16: 0.97}
SAMPLED_LATENCY_RUNS = 5
# What a runner says ran a row (the arm64 runner's last_info, a TF.js runner's summary): who, not how fast.
RAN_ON_KEYS = ("machine", "cpu", "cpu_part", "board", "qemu", "python", "runtime", "runtime_version", "numpy",
               "threads", "backend", "browser", "tfjs", "flags", "renderer", "adapter", "format", "input", "output")  # timed calls in an emulated runtime (a MobileNet takes seconds an image there)


def stratified_sample(classes: np.ndarray, n: int) -> np.ndarray:
    """``n`` indices (sorted) taken from each class in turn, in file order within a class, so every
    class is in the sample in proportion as far as ``n`` allows; all of them when ``n`` is 0 or
    not smaller."""
    classes = np.asarray(classes)
    if n <= 0 or n >= len(classes):
        return np.arange(len(classes))
    queues = [list(np.nonzero(classes == c)[0]) for c in np.unique(classes)]
    picked: list[int] = []
    while len(picked) < n:
        for q in queues:
            if q and len(picked) < n:
                picked.append(int(q.pop(0)))
    return np.array(sorted(picked))


def subset_feed(feed: FeedFile, index: np.ndarray, path: Path) -> FeedFile:
    """The images of ``feed`` at ``index``, in a feed file of their own."""
    return FeedFile.write(path, (feed.read(int(k), int(k) + 1) for k in index), feed.shape[1:])


def twin_drift(row: "Result", art: Artifact, own: np.ndarray, twin: np.ndarray, twin_runtime: str) -> None:
    """Fills ``row``'s drift from the same file in ``twin_runtime`` (probabilities on the same images)."""
    row.twin_runtime = twin_runtime
    row.twin_top1_agreement = float((own.argmax(1) == twin.argmax(1)).mean())
    row.twin_max_abs_diff = float(np.abs(own - twin).max()) if own.size else 0.0
    if art.kind is ArtifactKind.TFLITE:
        from pipeline.formats import output_lsb

        lsb = output_lsb(art.path, art.tensors.output)
        row.twin_max_lsb = None if not lsb else round(row.twin_max_abs_diff / lsb, 2)


def _latency_text(row: Result) -> str:
    if row.latency_p50_ms is None:
        return "latency not timed"
    return f"{row.latency_p50_ms:.2f} / {row.latency_p90_ms:.2f} ms p50/p90"


@dataclass(frozen=True)
class PassOutput:
    """A pair's agreement pass computed elsewhere (the Beam engine): its raw outputs on every
    holdout image, in holdout order, or why it failed, and what ran it (:data:`RAN_ON_KEYS`)."""

    outputs: np.ndarray | None
    error: str | None = None
    ran_on: Mapping[str, object] = field(default_factory=dict)


REFERENCE_PASS = "reference"  # the key of the reference's pass among the pairs' (artifact, runtime) keys


def plan(artifacts: Sequence[Artifact], settings: VerifySettings) -> tuple[list[Runtime], dict[Runtime, list[Artifact]]]:
    """The runtimes verify runs (the chosen ones and the twins they are compared with) and, for
    each, the artifacts it runs, in report order."""
    chosen = list(settings.runtimes)
    for rt in settings.runtimes:
        twin = REGISTRY[rt].twin
        if twin is not None and twin not in chosen:
            chosen.append(twin)
    pairs: dict[Runtime, list[Artifact]] = {}
    for art in artifacts:
        for info in runtimes_for(art.kind, chosen):
            pairs.setdefault(info.runtime, []).append(art)
    return chosen, pairs


def verify(reference: Artifact, artifacts: Sequence[Artifact], holdout: Holdout,
           settings: VerifySettings, passes: Mapping[tuple[str, str], PassOutput] | None = None) -> Report:
    """Runs the reference and every (artifact, runtime) pair on the holdout and gates the drift.

    Args:
        reference: the SavedModel (kind SAVEDMODEL); its predictions are what the others must match.
        artifacts: converted models, in report order; each runs in every chosen runtime that
            takes its kind (registry order).
        holdout: the prepared test images (:func:`load_holdout`, with ``settings.app``).
        settings: runtimes, gates, app preprocessing, stress, timeout, batch and latency runs.
        passes: the agreement passes already run elsewhere (:func:`pipeline.beam.holdout_pass`),
            by ``(artifact name, runtime)`` and ``(reference name, REFERENCE_PASS)``; then
            ``holdout``'s feeds need only hold the first image (latency is timed here) and every
            runtime's rows cover every image.

    Returns:
        Every row, failed ones included (a runtime that crashes or hangs is a failed row with
        the reason); the caller decides what a failed report means.
    """
    import dataclasses
    import time
    from concurrent.futures import ThreadPoolExecutor

    y, n_cls, run = holdout.labels, len(settings.classes), settings.run
    start = time.perf_counter()
    ref_info = REGISTRY[REFERENCE_RUNTIME[reference.kind]]
    log.info(f"verify: reference {reference.name} ({ref_info.runtime}) on {len(holdout)} test images")
    ref_runner = ref_info.create(settings.classes, **settings.runner_options)
    ref_feed = feed_of(holdout, reference, ref_info.feed)
    try:
        if passes is not None:
            done = passes[reference.name, REFERENCE_PASS]
            if done.error:
                raise RuntimeFailed(f"the reference {reference.name} failed in {ref_info.runtime}: {done.error}")
            ref_pred = Prediction(done.outputs)
        else:
            ref_pred = ref_runner.predict(reference.path, ref_feed, timeout_s=settings.timeout_s,
                                          settings=dataclasses.replace(run, latency_runs=0), tensors=reference.tensors)
        ref, ref_kind = model_probabilities(reference, ref_pred.probabilities)
    except BaseException:
        ref_runner.close()
        raise
    # Every pair's agreement pass, one task per runtime (its artifacts in turn, in one worker);
    # runtimes in parallel, each on its share of the cores; --stress beside them.
    chosen, pairs = plan(artifacts, settings)
    for twin in chosen[len(settings.runtimes):]:
        log.info(f"verify: {twin} runs too: it is compared with {next(r for r in settings.runtimes if REGISTRY[r].twin == twin)}")
    runners = {rt: REGISTRY[rt].create(settings.classes, **settings.runner_options) for rt in pairs}
    # Emulated runtimes run a class-stratified sample (by the true class, else the reference's);
    # passes run elsewhere cover every image.
    sample = stratified_sample(y if y is not None else ref.argmax(1), 0 if passes is not None else settings.sample)
    sampled_feeds: dict[Path, FeedFile] = {}

    def feed_for(art: Artifact, info) -> FeedFile:
        feed = feed_of(holdout, art, info.feed)
        if not info.sampled or len(sample) == len(holdout):
            return feed
        if feed.path not in sampled_feeds:
            sampled_feeds[feed.path] = subset_feed(feed, sample, feed.path.with_name(f"sample-{feed.path.name}"))
        return sampled_feeds[feed.path]

    if any(REGISTRY[rt].sampled for rt in pairs):
        log.info(f"verify: emulated runtimes run {len(sample)} of the {len(holdout)} test images (--arm64-sample)")
        for art in artifacts:  # written before the passes start, so no two threads write one
            for info in runtimes_for(art.kind, chosen):
                if info.sampled:
                    feed_for(art, info)
    ran_on: dict[tuple[str, Runtime], dict] = {}
    parallel = max(1, min(run.parallel, len(pairs) + settings.stress))
    agreement = dataclasses.replace(run, latency_runs=0, threads=max(1, run.threads // parallel))
    found: dict[tuple[str, Runtime], tuple[Prediction | None, str | None]] = {}

    def agree(rt: Runtime) -> None:
        runner = runners[rt]
        for art in pairs[rt]:
            why = runner.unsupported(art.path)
            if why:
                log.info(f"verify: {art.name:15s} {runner.name} skipped: {why}")
                continue
            t0 = time.perf_counter()
            if passes is not None:
                done = passes.get((art.name, str(rt)), PassOutput(None, "the pass run elsewhere gave no output"))
                found[art.name, rt] = (None if done.outputs is None else Prediction(done.outputs), done.error)
                info = done.ran_on
            else:
                found[art.name, rt] = run_one(runner, art, feed_for(art, REGISTRY[rt]), settings, agreement)
                info = getattr(runner, "last_info", None) or getattr(runner, "last_summary", None) or {}
            ran_on[art.name, rt] = {k: info[k] for k in RAN_ON_KEYS if k in info}
            pred, err = found[art.name, rt]
            expected = ref[sample] if REGISTRY[rt].sampled else ref
            try:
                detail = err or f"agreement {float((model_probabilities(art, pred.probabilities)[0].argmax(1) == expected.argmax(1)).mean()):.4f}"
            except RuntimeFailed as bad:
                detail = str(bad)
            log.info(f"verify: ran {art.name} in {runner.name}: {detail} ({time.perf_counter() - t0:.1f} s)")

    stress: list[dict] = []
    try:
        with ThreadPoolExecutor(parallel) as pool:
            jobs = [pool.submit(agree, rt) for rt in pairs]
            if settings.stress and y is not None:
                jobs.append(pool.submit(lambda: stress.extend(
                    _stress(ref_runner, reference, holdout, settings, ref, float((ref.argmax(1) == y).mean())))))
            for job in jobs:
                job.result()
        log.info(f"verify: agreement passes done in {time.perf_counter() - start:.1f} s; "
                 f"latency: {run.latency_runs} single-image calls per row, one at a time")
        # Latency, alone: one row at a time, nothing else running, one thread, one image a call.
        timing = dataclasses.replace(run, threads=1)
        ref_pred = Prediction(ref_pred.probabilities, _latencies(ref_runner, reference, _single(ref_feed), settings, timing))
        results = [evaluate(reference, ref_runner.name, ref_pred, ref, y, n_cls,
                            settings.gate(reference.name, reference.gate_key))]
        results[0].output_kind = ref_kind
        for art in artifacts:
            for info in runtimes_for(art.kind, chosen):
                if (art.name, info.runtime) not in found:
                    continue
                pred, err = found[art.name, info.runtime]
                if pred is not None:
                    one = _single(feed_for(art, info))
                    row_timing = dataclasses.replace(timing, latency_runs=min(timing.latency_runs, SAMPLED_LATENCY_RUNS)) \
                        if info.sampled else timing
                    pred = Prediction(pred.probabilities, _latencies(runners[info.runtime], art, one, settings, row_timing))
                index = sample if info.sampled else slice(None)
                row = evaluate(art, info.runtime.value, pred, ref[index], None if y is None else y[index], n_cls,
                               min(settings.gate(art.name, art.gate_key), RUNTIME_GATES.get(info.runtime, 1.0)), err)
                row.ran_on = ran_on.get((art.name, info.runtime), {})
                if y is not None and row.top1_agreement is not None:
                    bound_accuracy(row, ref[index].argmax(1), y[index], settings.accuracy_bound(art.name, art.gate_key))
                if info.sampled and len(sample) < len(holdout):
                    row.sample_size = len(sample)
                    row.flipped = [int(sample[i]) for i in row.flipped]  # as test-image indices
                twin = found.get((art.name, info.twin)) if info.twin else None
                if pred is not None and twin is not None and twin[0] is not None:
                    try:
                        own_p = model_probabilities(art, pred.probabilities)[0]
                        twin_p = model_probabilities(art, twin[0].probabilities)[0][index]
                        twin_drift(row, art, own_p, twin_p, str(info.twin))
                    except (RuntimeFailed, ValueError, IndexError) as bad:
                        log.info(f"verify: {art.name} {info.runtime}: no drift from {info.twin}: {bad}")
                results.append(row)
                status = "ok" if row.passed else "FAILED"
                acc = "" if row.accuracy is None else f"acc {row.accuracy:.4f}, "
                if row.accuracy_drop is not None and not row.passed and row.accuracy_drop > row.max_accuracy_drop:
                    acc += f"{row.accuracy_drop:.1f} points below the reference (at most {row.max_accuracy_drop:g}), "
                detail = row.error or f"agreement {row.top1_agreement:.4f}, {acc}{_latency_text(row)}"
                log.info(f"verify: {art.name:15s} {info.runtime.value:15s} {status}: {detail}")
    finally:
        for runner in [ref_runner, *runners.values()]:
            runner.close()
    return Report(results, stress, ref, holdout, settings)


def _latencies(runner, artifact: Artifact, one: FeedFile, settings: VerifySettings, timing: RunSettings) -> tuple:
    """The timed single-image calls of one pair (none when the runtime fails now: the agreement
    figures stand, the latency is left empty)."""
    if timing.latency_runs <= 0:
        return ()
    try:
        return runner.predict(artifact.path, one, timeout_s=settings.timeout_s, settings=timing,
                              tensors=artifact.tensors).latencies_ms
    except RuntimeFailed as err:
        log.info(f"verify: {artifact.name} {runner.name}: latency not measured: {err}")
        return ()


def _stress(ref_runner, reference: Artifact, holdout: Holdout, settings: VerifySettings, ref: np.ndarray,
            accuracy: float) -> list[dict]:
    """The reference on each usual preprocessing mistake, a chunk of decoded images at a time."""
    from pipeline.stress import MISTAKES, prepare_batch

    y, images, found = holdout.labels, holdout.images, []
    parts: dict[str, list[np.ndarray]] = {name: [] for name in MISTAKES}
    for k in range(0, len(images), DECODE_CHUNK):  # each image decoded once for every mistake
        chunk = [images[i] for i in range(k, min(k + DECODE_CHUNK, len(images)))]
        for name, mistake in MISTAKES.items():
            x = prepare_batch(chunk, settings.contract, mistake)
            if settings.reference_input is not None:
                x = (x - np.float32(settings.reference_input.mean)) / np.float32(settings.reference_input.std)
            out = ref_runner.probabilities(reference.path, x, reference.tensors)
            parts[name].append(model_probabilities(reference, out)[0])
    for name, mistake in MISTAKES.items():
        probs = np.concatenate(parts[name])
        agree = float((probs.argmax(1) == ref.argmax(1)).mean())
        acc = float((probs.argmax(1) == y).mean())
        found.append({"mistake": name, "setting": mistake.differences()[0], "accuracy": acc,
                      "accuracy_drop": accuracy - acc, "top1_agreement": agree,
                      "mean_abs_diff": float(np.abs(probs - ref).mean())})
        log.info(f"verify --stress: {name:38s} accuracy {acc:.4f} ({acc - accuracy:+.4f}), agreement {agree:.4f}")
    return found


def _latency(row: dict) -> float:
    return row["latency_ms"] if row["latency_ms"] is not None else float("inf")


def _fastest(rows: list[dict]) -> dict:
    return min(rows, key=lambda r: (_latency(r), r["size_bytes"]))


def recommend(rows: list[dict]) -> dict | None:
    """The smallest converted artifact that passes every gate in every runtime it ran in, the
    fastest (runtime, artifact) among the passing ones, and why."""
    by_artifact: dict[str, list[dict]] = {}
    for r in rows[1:]:  # rows[0] is the reference
        by_artifact.setdefault(r["artifact"], []).append(r)
    passing = {a: rs for a, rs in by_artifact.items() if all(r["passed"] for r in rs)}
    if not passing:
        return None
    smallest = min(passing, key=lambda a: (passing[a][0]["size_bytes"], _latency(_fastest(passing[a]))))
    fastest = _fastest([r for rs in passing.values() for r in rs])
    best_rt = _fastest(passing[smallest])
    return {
        "artifact": smallest, "runtime": best_rt["runtime"], "size_bytes": best_rt["size_bytes"],
        "latency_ms": best_rt["latency_ms"], "top1_agreement": min(r["top1_agreement"] for r in passing[smallest]),
        "accuracy": best_rt["accuracy"],
        "fastest": {"artifact": fastest["artifact"], "runtime": fastest["runtime"], "latency_ms": fastest["latency_ms"]},
        "why": f"smallest of {len(passing)} artifacts that pass every gate in every runtime",
    }


def recommend_tflite(results: list[dict]) -> dict | None:
    """:func:`recommend` among the TFLite files only: the smallest that passed every gate in every
    runtime verify ran it in (what the deploy stage ships, and what ``edgepipe compare`` lists);
    None when none passed. ``results`` as in report.json, the reference first."""
    return recommend(results[:1] + [r for r in results[1:] if r["artifact"].startswith("tflite-")])

"""TFLite models through MediaPipe Tasks' ``ImageClassifier``: a consumer that only has the file.

MediaPipe takes nothing from us but the .tflite file: it finds the labels (``labels.txt``,
TENSOR_AXIS_LABELS), the input normalisation (NormalizationOptions) and the head names in the
TFLite metadata written by :mod:`pipeline.metadata`. If that metadata were wrong — labels out of
order, a normalisation that rescales the pixels — this runner would disagree with the reference.

It runs the way an app runs it: a ``mp.Image`` of uint8 SRGB pixels, which MediaPipe resizes to
the model's size and normalises itself. We hand it images already at the model's size (the
verify stage's float32 0..255 inputs rounded to uint8), so its resize is an identity and the only
difference from the other runtimes is that rounding. One long-lived worker process for every
model, like :mod:`pipeline.runners.tflite`: MediaPipe's own TFLite build stays out of our address
space, and a crash or a hang becomes a failed row. ImageClassifier takes one image a call, so the
agreement pass is image by image; the latency figure is its own timed calls.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.runners.base import Prediction, RunSettings, Tensors, Worker, as_feed
from pipeline.runners.feed import FeedFile
from pipeline.types import Runtime

RUNTIME_NAME = Runtime.MEDIAPIPE.value
# The output tensor MediaPipe reports as a head named like its metadata: the model's other head is
# "logits", which MediaPipe would report as scores as they are (no softmax).
HEAD_NAME = "probabilities"


def unsupported_input(model: Path) -> str | None:
    """Why ImageClassifier cannot take this model's input (it takes float32 or uint8), or None.

    Checked before starting a worker, so an int8-input file (for integer-only accelerators) is
    left out of this runtime instead of failing its gate for a reason that is not drift.
    """
    from mediapipe.tasks.metadata import schema_py_generated as model_fb

    data = Path(model).read_bytes()
    root = model_fb.Model.GetRootAsModel(data, 0)
    if not any(root.Metadata(i).Name() == b"TFLITE_METADATA" for i in range(root.MetadataLength())):
        return "no TFLite metadata; MediaPipe's ImageClassifier needs it (labels, normalisation)"
    graph = root.Subgraphs(0)
    kind = graph.Tensors(graph.Inputs(0)).Type()
    names = {v: k for k, v in vars(model_fb.TensorType).items() if not k.startswith("_")}
    if kind in (model_fb.TensorType.FLOAT32, model_fb.TensorType.UINT8):
        return None
    return f"input tensor is {names.get(kind, kind)}; MediaPipe's ImageClassifier takes float32 or uint8"


def to_uint8(images: np.ndarray) -> np.ndarray:
    """float32 0..255 → the uint8 pixels an ``mp.Image`` holds (rounded, clipped)."""
    return np.clip(np.rint(images), 0, 255).astype(np.uint8)


class MediapipeRunner:
    """Classifies each image with ``mediapipe.tasks.python.vision.ImageClassifier``.

    Args:
        labels: our class names in output order; MediaPipe's ``category_name``s are mapped back
            through them, so probabilities come back in our column order whatever order
            MediaPipe lists categories in.
    """

    name = RUNTIME_NAME

    def __init__(self, labels: Sequence[str]):
        self.labels = list(labels)
        self.worker = Worker(self.name, "pipeline.runners.mediapipe")

    def unsupported(self, artifact: Path) -> str | None:
        return unsupported_input(artifact)

    def predict(self, artifact: Path, images: np.ndarray | FeedFile, timeout_s: float = 600.0,
                settings: RunSettings = RunSettings(), tensors: Tensors = Tensors()) -> Prediction:
        """Runs ``artifact`` on ``images`` (float32 RGB ``[N, H, W, 3]`` 0..255, at the model's size).
        MediaPipe chooses the input itself; ``tensors.output`` names the head (see
        :func:`scores_in_label_order`).

        Returns:
            The ``probabilities`` head, float32 ``[N, len(labels)]`` in label order, and the timed
            ``classify`` calls (after a warm-up call).

        Raises:
            RuntimeFailed: MediaPipe refused the model (e.g. no metadata, integer input it does not
                take), crashed, timed out, or named categories or heads we do not know.
        """
        artifact = Path(artifact)
        with as_feed(images) as feed, tempfile.TemporaryDirectory(prefix="edgepipe-mediapipe-") as tmp:
            out = Path(tmp) / "out.npy"
            answer = self.worker.run({"model": str(artifact), "feed": feed.to_dict(), "labels": self.labels,
                                      "out": str(out), "head": tensors.output, **settings.to_dict()}, timeout_s,
                                     artifact.name)
            return Prediction(np.load(out).astype(np.float32), tuple(answer["latencies_ms"]))

    def close(self) -> None:
        self.worker.close()


def create(runtime: Runtime, labels: Sequence[str], **options) -> MediapipeRunner:
    return MediapipeRunner(labels)


def status(runtime: Runtime, **options):
    from pipeline.runners.base import RuntimeStatus, package_version

    version = package_version("mediapipe")
    return RuntimeStatus(version is not None, f"mediapipe {version}", "" if version else "not installed", "make setup")


class _Mismatch(Exception):
    """MediaPipe's view of the model does not match our labels (printed as the failure reason)."""


def scores_in_label_order(result, labels: list[str], head: str | None = None) -> np.ndarray:
    """One head of an ``ImageClassifierResult`` as a vector in ``labels`` order: ``head``, else
    ``probabilities``, else the only head (a file from another tool names its head as it likes).

    Raises:
        _Mismatch: no such head, a category name not in ``labels`` or at another index than ours,
            or fewer categories than labels.
    """
    heads = {c.head_name: c for c in result.classifications}
    wanted = head if head in heads else HEAD_NAME if HEAD_NAME in heads or len(heads) != 1 else next(iter(heads))
    if wanted not in heads:
        raise _Mismatch(f"no classification head named {wanted!r}; MediaPipe reported {sorted(map(str, heads))}")
    head = wanted
    position = {name: i for i, name in enumerate(labels)}
    scores = np.full(len(labels), np.nan, np.float32)
    for cat in heads[head].categories:
        if cat.category_name not in position:
            raise _Mismatch(f"category {cat.category_name!r} (index {cat.index}) is not one of our labels")
        if position[cat.category_name] != cat.index:
            raise _Mismatch(f"category {cat.category_name!r} is output {cat.index} in the model, "
                            f"{position[cat.category_name]} in our labels")
        scores[position[cat.category_name]] = cat.score
    if np.isnan(scores).any():
        missing = [labels[i] for i in np.nonzero(np.isnan(scores))[0]]
        raise _Mismatch(f"MediaPipe returned no score for {missing[:5]}")
    return scores


def _run_job(job: dict) -> dict:
    import mediapipe as mp
    from mediapipe.tasks.python import BaseOptions
    from mediapipe.tasks.python.vision import ImageClassifier, ImageClassifierOptions

    from pipeline.runners.base import timed_calls
    from pipeline.testhook import crash_point

    crash_point(job["model"])
    feed, labels = FeedFile.from_dict(job["feed"]), job["labels"]
    options = ImageClassifierOptions(base_options=BaseOptions(model_asset_path=job["model"]),
                                     max_results=-1, score_threshold=0.0)

    def as_mp(img):
        return mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(to_uint8(img)))

    rows = []
    with ImageClassifier.create_from_options(options) as classifier:
        for _, images in feed.batches(int(job["batch"])):
            rows.extend(scores_in_label_order(classifier.classify(as_mp(img)), labels, job.get("head"))
                        for img in images)
        first = as_mp(feed.read(0, 1)[0])
        latencies = timed_calls(lambda: classifier.classify(first), int(job["latency_runs"]))
    np.save(job["out"], np.stack(rows).astype(np.float32))
    return {"latencies_ms": latencies}


def _main() -> None:
    from pipeline.runners.base import serve

    # mediapipe imports TensorFlow when it can (only for API-doc decorators); an app has no
    # TensorFlow, and keeping it out saves seconds and a second TFLite build in this process.
    sys.modules.setdefault("tensorflow", None)

    def handle(job):
        try:
            return _run_job(job)
        except _Mismatch as err:
            return {"error": f"LabelMismatchError: {err}"}

    serve(handle)


if __name__ == "__main__":
    _main()

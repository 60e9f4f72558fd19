"""``edgepipe classify``: the top labels of images with any model, the successor of poets'
``label_image.py``.

The model is read and fed as ``edgepipe check`` feeds it (:func:`pipeline.check.resolve_preprocessing`:
its own preprocessing, else the flags); images are decoded a chunk at a time and classified in
batches in the runtime chosen (by default where the model's kind deploys: TFLite in
ai-edge-litert, TF.js in Node on wasm, TensorFlow models in TensorFlow). The latency is timed
apart, as verify times it: single-image calls on one thread after a warm-up.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from pipeline.check import PrepFlags, resolve_preprocessing
from pipeline.config import BeamConfig
from pipeline.errors import ConfigError, DatasetError
from pipeline.formats import read_card, read_labels
from pipeline.runners import REFERENCE_RUNTIME, REGISTRY
from pipeline.types import ArtifactKind, Runtime

CHUNK = 64  # images decoded and classified at a time
LATENCY_RUNS = 10


@dataclass(frozen=True)
class Classification:
    """One image's answer: ``top`` is ``(label, probability)``, most probable first."""

    image: str
    top: tuple[tuple[str, float], ...] = ()
    error: str | None = None

    def to_dict(self) -> dict:
        if self.error:
            return {"image": self.image, "error": self.error}
        return {"image": self.image, "top": [{"label": lab, "probability": round(p, 6)} for lab, p in self.top]}

    def text(self) -> str:
        if self.error:
            return f"{self.image}: skipped: {self.error}"
        return f"{self.image}: " + ", ".join(f"{lab} {p:.4f}" for lab, p in self.top)


@dataclass(frozen=True)
class ClassifySettings:
    """Options of ``edgepipe classify`` (preprocessing flags as for ``check``)."""

    model: Path
    inputs: tuple[Path, ...]
    top_k: int = 5
    runtime: Runtime | None = None
    flags: PrepFlags = field(default_factory=PrepFlags)
    labels: Path | None = None
    output: str | None = None
    input_tensor: str | None = None
    latency_runs: int = LATENCY_RUNS
    beam: BeamConfig | None = None  # classify on Apache Beam (``--engine beam``); None: here
    progress: bool = True


def image_paths(inputs: Sequence[Path]) -> list[str]:
    """Every image file named or found (recursively, sorted) in a named folder.

    Raises:
        DatasetError: a path that does not exist, or no image at all.
    """
    from pipeline.images import IMAGE_SUFFIXES

    out: list[str] = []
    for p in map(Path, inputs):
        if p.is_dir():
            out += sorted(str(f) for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
                          and not any(part.startswith(".") for part in f.relative_to(p).parts))
        elif p.is_file():
            out.append(str(p))
        else:
            raise DatasetError(f"{p}: no such image or folder")
    if not out:
        raise DatasetError(f"no images (.jpg, .png, ...) in {', '.join(map(str, inputs))}")
    return out


class Classifier:
    """A model opened once for classifying (see the module docstring); close it when done."""

    def __init__(self, settings: ClassifySettings):
        if settings.top_k < 1:
            raise ConfigError(f"--top-k {settings.top_k}: must be at least 1")
        problems = settings.flags.problems() + (settings.beam.problems() if settings.beam is not None else [])
        if problems:
            raise ConfigError("; ".join(problems))
        self.card = read_card(settings.model, settings.input_tensor, settings.output)
        self.prep, self.sources, self.warnings = resolve_preprocessing(self.card, settings.flags, Path(settings.model).name)
        labels = self.card.labels
        if labels is None and settings.labels is not None:
            labels = tuple(read_labels(settings.labels))
        if labels is not None and self.card.classes is not None and len(labels) != self.card.classes:
            raise ConfigError(f"{settings.labels or settings.model}: {len(labels)} labels for {self.card.classes} "
                              f"outputs; give --labels FILE with {self.card.classes} lines")
        self.labels = labels
        runtime = settings.runtime or REFERENCE_RUNTIME[self.card.kind]
        info = REGISTRY[runtime]
        if self.card.kind not in info.accepts:
            takes = [str(rt) for rt, i in REGISTRY.items() if self.card.kind in i.accepts]
            raise ConfigError(f"--runtime {runtime}: it does not run {self.card.format} models; use {', '.join(takes)}")
        self.runtime = runtime
        self.runner = info.create(list(labels or ()))
        self.settings = settings
        self.latencies: tuple[float, ...] = ()

    def _predict(self, feed, latency_runs: int):
        from pipeline.runners.base import RunSettings, Tensors

        tensors = Tensors(self.card.input.name if self.card.kind is ArtifactKind.GRAPH else None, self.card.output)
        return self.runner.predict(self.card.path, feed, settings=RunSettings(latency_runs=latency_runs), tensors=tensors)

    def classify(self, paths: Sequence[str]) -> Iterator[Classification]:
        """Each image's top-k, in order, a chunk of :data:`CHUNK` images at a time; an unreadable
        image is an answer with its error.

        Raises:
            RuntimeFailed: the runtime refused the model.
        """
        from pipeline.images import ImageError, decode_rgb, read_image_file
        from pipeline.runners.feed import FeedFile
        from pipeline.verify import as_probabilities, prepare_model_input

        k = min(self.settings.top_k, self.card.classes or self.settings.top_k)
        if self.settings.beam is not None:
            yield from self._classify_on_beam(paths, k)
            return
        with tempfile.TemporaryDirectory(prefix="edgepipe-classify-") as tmp:
            for start in range(0, len(paths), CHUNK):
                rgbs, ok, answers = [], [], {}
                for p in paths[start:start + CHUNK]:
                    try:
                        rgbs.append(decode_rgb(read_image_file(p), p))
                        ok.append(p)
                    except (ImageError, OSError) as err:
                        answers[p] = Classification(p, error=err.reason if isinstance(err, ImageError) else str(err))
                if ok:
                    feed = FeedFile.from_array(Path(tmp) / "chunk.f32", prepare_model_input(rgbs, self.prep))
                    probs, _ = as_probabilities(self._predict(feed, 0).probabilities)
                    for p, row in zip(ok, probs):
                        answers[p] = self._answer(p, row, k)
                    if not self.latencies and self.settings.latency_runs > 0:
                        one = FeedFile(feed.path, (1, *feed.shape[1:]))
                        self.latencies = self._predict(one, self.settings.latency_runs).latencies_ms
                for p in paths[start:start + CHUNK]:
                    yield answers[p]

    def _answer(self, path: str, row: np.ndarray, k: int) -> Classification:
        order = np.argsort(-row, kind="stable")[:k]
        return Classification(path, tuple((self._label(int(i)), float(row[i])) for i in order))

    def _classify_on_beam(self, paths: Sequence[str], k: int) -> Iterator[Classification]:
        """:meth:`classify` with the model run on Beam's workers; the latency is timed here, on
        the first readable image."""
        from pipeline.beam import ModelJob, run_holdout
        from pipeline.config import AppPreprocessing
        from pipeline.images import decode_rgb, read_image_file
        from pipeline.runners.base import RunSettings, RuntimeFailed, Tensors
        from pipeline.runners.feed import FeedFile
        from pipeline.verify import as_probabilities, prepare_model_input

        tensors = Tensors(self.card.input.name if self.card.kind is ArtifactKind.GRAPH else None, self.card.output)
        job = ModelJob(("model", str(self.runtime)), str(self.card.path), str(self.runtime), "model", tensors)
        prep = {"contract": self.prep, "app": AppPreprocessing(), "feeds": {"model": self.prep},
                "classes": list(self.labels or ()), "runner_options": {}, "timeout_s": 600.0, "run": RunSettings()}
        readable, skipped, passes = run_holdout(list(paths), [job], prep, self.settings.beam, "classify",
                                                self.settings.progress)
        done = passes.get(job.key)
        if readable and (done is None or done.error):
            raise RuntimeFailed(done.error if done is not None else "the Beam pass gave no output")
        probs = as_probabilities(done.outputs)[0] if readable else np.zeros((0, 0), np.float32)
        rows = dict(zip(readable, probs))
        if readable and self.settings.latency_runs > 0:
            first = paths[readable[0]]
            with tempfile.TemporaryDirectory(prefix="edgepipe-classify-") as tmp:
                one = FeedFile.from_array(Path(tmp) / "one.f32",
                                          prepare_model_input([decode_rgb(read_image_file(first), first)], self.prep))
                self.latencies = self._predict(one, self.settings.latency_runs).latencies_ms
        for n, p in enumerate(paths):
            yield Classification(p, error=skipped[n]) if n in skipped else self._answer(p, rows[n], k)

    def _label(self, i: int) -> str:
        return self.labels[i] if self.labels is not None and i < len(self.labels) else str(i)

    @property
    def mean_latency_ms(self) -> float | None:
        return float(np.mean(self.latencies)) if self.latencies else None

    def close(self) -> None:
        self.runner.close()

    def __enter__(self) -> "Classifier":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

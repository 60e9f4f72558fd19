"""TFLite models in tflite-runtime and ai-edge-litert, one long-lived worker process per runtime.

The worker (:func:`_run_job`) keeps the two TFLite builds and TensorFlow out of one address space
and turns a crash or a hang into a failed row (:class:`~pipeline.runners.base.Worker`). Per
artifact it runs the agreement pass batched on every core, then times single-image calls on one
thread with the file's own batch-1 input, the way a deployed app calls it.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.runners.base import Prediction, RunSettings, Worker, as_feed
from pipeline.runners.feed import FeedFile
from pipeline.types import Runtime

RUNTIME_MODULES = {
    Runtime.TFLITE_RUNTIME.value: "tflite_runtime.interpreter",
    Runtime.LITERT.value: "ai_edge_litert.interpreter",
}


class TfliteRunner:
    """Runs .tflite files in one TFLite runtime (see :data:`RUNTIME_MODULES`), every file in the
    same worker process while it lives."""

    def __init__(self, name: str):
        if name not in RUNTIME_MODULES:
            raise ValueError(f"unknown TFLite runtime {name!r}; known: {sorted(RUNTIME_MODULES)}")
        self.name = name
        self.worker = Worker(name, "pipeline.runners.tflite", (name,))

    def unsupported(self, artifact: Path) -> str | None:
        return None

    def predict(self, artifact: Path, images: np.ndarray | FeedFile, timeout_s: float = 600.0,
                settings: RunSettings = RunSettings()) -> Prediction:
        with as_feed(images) as feed, tempfile.TemporaryDirectory(prefix="edgepipe-tflite-") as tmp:
            out = Path(tmp) / "out.npy"
            answer = self.worker.run({"model": str(artifact), "feed": feed.to_dict(), "out": str(out),
                                      **settings.to_dict()}, timeout_s, Path(artifact).name)
            return Prediction(np.load(out).astype(np.float32), tuple(answer["latencies_ms"]))

    def close(self) -> None:
        self.worker.close()


def create(runtime: Runtime, labels: Sequence[str]) -> TfliteRunner:
    return TfliteRunner(runtime.value)


def _quantise(x: np.ndarray, detail: dict) -> np.ndarray:
    dtype = np.dtype(detail["dtype"])
    if dtype.kind == "f":
        return x.astype(dtype)
    scale, zero = detail["quantization"]
    info = np.iinfo(dtype)
    return np.clip(np.round(x / scale + zero), info.min, info.max).astype(dtype)


def _dequantise(y: np.ndarray, detail: dict) -> np.ndarray:
    if np.dtype(detail["dtype"]).kind == "f":
        return y
    scale, zero = detail["quantization"]
    return (y.astype(np.float32) - zero) * scale


def _signature(interpreter_mod, model: str, threads: int):
    interp = interpreter_mod.Interpreter(model_path=model, num_threads=threads)
    runner = interp.get_signature_runner("serving_default")
    input_name, in_detail = next(iter(runner.get_input_details().items()))
    return runner, input_name, in_detail, runner.get_output_details()["probabilities"]


def _run_job(interpreter_mod, job: dict) -> dict:
    from pipeline.runners.base import timed_calls
    from pipeline.testhook import crash_point

    crash_point(job["model"])
    feed, batch = FeedFile.from_dict(job["feed"]), int(job["batch"])
    # Agreement pass: every core, `batch` images a call (a batch-1 file takes a resized input:
    # its outputs are bit-identical to single-image calls). Integer-I/O models take quantised
    # pixels and return quantised scores; an app converts with the file's scale and zero point,
    # and so do we. A short last batch is padded; its padding's outputs are dropped.
    runner, name, in_detail, out_detail = _signature(interpreter_mod, job["model"], int(job["threads"]))
    outputs = []
    for _, images in feed.batches(batch):
        padded = np.zeros((batch, *images.shape[1:]), np.float32)
        padded[:len(images)] = images
        y = runner(**{name: _quantise(padded, in_detail)})["probabilities"]
        outputs.append(_dequantise(y, out_detail)[:len(images)].astype(np.float32))
    probs = np.concatenate(outputs) if outputs else np.zeros((0, 0), np.float32)
    np.save(job["out"], probs)
    # Latency: the file as shipped (its own input shape), one thread, one image a call.
    runner, name, in_detail, _ = _signature(interpreter_mod, job["model"], 1)
    one = _quantise(feed.read(0, 1), in_detail)
    return {"latencies_ms": timed_calls(lambda: runner(**{name: one}), int(job["latency_runs"]))}


def _main(runtime: str) -> None:
    import importlib

    from pipeline.runners.base import serve

    interpreter_mod = importlib.import_module(RUNTIME_MODULES[runtime])
    serve(lambda job: _run_job(interpreter_mod, job))


if __name__ == "__main__":
    _main(sys.argv[1])

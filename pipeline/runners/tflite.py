"""TFLite models in tflite-runtime and ai-edge-litert, one long-lived worker process per runtime.

The worker (:func:`_run_job`) keeps the two TFLite builds and TensorFlow out of one address space
and turns a crash or a hang into a failed row (:class:`~pipeline.runners.base.Worker`). Per
artifact it runs the agreement pass batched on every core, then times single-image calls on one
thread with the file's own batch-1 input, the way a deployed app calls it. The Pi's arm64 wheels run this
same worker in an emulated Python (:mod:`pipeline.runners.arm64`): it imports only numpy, the TFLite
module and the light pipeline modules.
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

RUNTIME_MODULES = {
    Runtime.TFLITE_RUNTIME.value: "tflite_runtime.interpreter",
    Runtime.LITERT.value: "ai_edge_litert.interpreter",
    # The same wheels built for aarch64, run by the emulated Python of pipeline.arm64 (runners/arm64.py).
    Runtime.TFLITE_RUNTIME_ARM64.value: "tflite_runtime.interpreter",
    Runtime.LITERT_ARM64.value: "ai_edge_litert.interpreter",
}
X86_RUNTIMES = (Runtime.TFLITE_RUNTIME.value, Runtime.LITERT.value)


class TfliteRunner:
    """Runs .tflite files in one x86 TFLite runtime (``tflite-runtime`` or ``ai-edge-litert``), every file
    in the same worker process while it lives."""

    def __init__(self, name: str):
        if name not in X86_RUNTIMES:
            raise ValueError(f"unknown TFLite runtime {name!r}; known: {sorted(X86_RUNTIMES)}")
        self.name = name
        self.worker = Worker(name, "pipeline.runners.tflite", (name,))

    def unsupported(self, artifact: Path) -> str | None:
        return None

    def predict(self, artifact: Path, images: np.ndarray | FeedFile, timeout_s: float = 600.0,
                settings: RunSettings = RunSettings(), tensors: Tensors = Tensors()) -> Prediction:
        """The chosen output (see :class:`Tensors`) for ``images``, the model's real input values
        (quantised here with the file's own scale and zero point when its input is an integer)."""
        return run_in_worker(self.worker, artifact, images, timeout_s, settings, tensors)[0]

    def close(self) -> None:
        self.worker.close()


def run_in_worker(worker: Worker, artifact: Path, images: np.ndarray | FeedFile, timeout_s: float,
                  settings: RunSettings, tensors: Tensors) -> tuple[Prediction, dict]:
    """One job for a worker of this module (x86 or emulated): the prediction and the worker's answer."""
    with as_feed(images) as feed, tempfile.TemporaryDirectory(prefix="edgepipe-tflite-") as tmp:
        out = Path(tmp) / "out.npy"
        answer = worker.run({"model": str(artifact), "feed": feed.to_dict(), "out": str(out),
                             "tensors": tensors.to_dict(), **settings.to_dict()}, timeout_s, Path(artifact).name)
        return Prediction(np.load(out).astype(np.float32), tuple(answer["latencies_ms"])), answer


def create(runtime: Runtime, labels: Sequence[str], **options) -> TfliteRunner:
    return TfliteRunner(runtime.value)


WHEELS = {Runtime.TFLITE_RUNTIME: "tflite-runtime", Runtime.LITERT: "ai-edge-litert"}


def status(runtime: Runtime, **options):
    from pipeline.runners.base import RuntimeStatus, package_version

    version = package_version(WHEELS[runtime])
    return RuntimeStatus(version is not None, f"{WHEELS[runtime]} {version} (x86_64)",
                         "" if version else "not installed", "make setup")


def quantise(x: np.ndarray, detail: dict) -> np.ndarray:
    dtype = np.dtype(detail["dtype"])
    if dtype.kind == "f":
        return x.astype(dtype)
    scale, zero = detail["quantization"]
    info = np.iinfo(dtype)
    if not scale:  # an integer input without quantisation parameters takes the values as they are
        return np.clip(np.round(x), info.min, info.max).astype(dtype)
    return np.clip(np.round(x / scale + zero), info.min, info.max).astype(dtype)


def dequantise(y: np.ndarray, detail: dict) -> np.ndarray:
    if np.dtype(detail["dtype"]).kind == "f":
        return y
    scale, zero = detail["quantization"]
    if not scale:
        return y.astype(np.float32)
    return (y.astype(np.float32) - zero) * scale


class _Choice(Exception):
    """The model has no such input or output, or several and none was chosen."""


def choose(names: dict[str, int], wanted: str | None, what: str, default: str | None = None) -> int:
    """The tensor index of the input or output named ``wanted`` (a signature key or a tensor
    name), else of ``default`` when the model has it, else of the only one.

    Raises:
        _Choice: no tensor of that name, or several and none chosen (the names are listed).
    """
    if wanted is not None:
        if wanted in names:
            return names[wanted]
        raise _Choice(f"no {what} named {wanted!r}; the model has: {', '.join(names)}")
    if default in names:
        return names[default]
    indices = set(names.values())
    if len(indices) == 1:
        return indices.pop()
    flag = "--output NAME" if what == "output" else "--input-tensor NAME"
    raise _Choice(f"the model has {len(indices)} {what}s ({', '.join(names)}); choose one with {flag}")


def tensor_names(interp) -> tuple[dict[str, int], dict[str, int]]:
    """Inputs and outputs by name: the first signature's keys (``serving_default`` when there is
    one) and every tensor's own name, both mapping to tensor indices."""
    signatures = interp._get_full_signature_list()
    inputs = {d["name"]: d["index"] for d in interp.get_input_details()}
    outputs = {d["name"]: d["index"] for d in interp.get_output_details()}
    if signatures:
        signature = signatures.get("serving_default") or next(iter(signatures.values()))
        inputs = {**signature["inputs"], **inputs}
        outputs = {**signature["outputs"], **outputs}
    return inputs, outputs


class _Model:
    """One interpreter on a file, fed through tensor indices (by default the only input and the
    ``probabilities`` output, see :class:`~pipeline.runners.base.Tensors`). Not the signature
    runner: it resizes and re-allocates the input on every call, which costs tflite-runtime its
    XNNPACK speed (measured: 26 ms instead of 3 ms a call on the demo's float32 file)."""

    def __init__(self, interpreter_mod, model: str, threads: int, batch: int | None = None,
                 tensors: dict | None = None):
        tensors = tensors or {}
        self.interp = interpreter_mod.Interpreter(model_path=model, num_threads=threads)
        inputs, outputs = tensor_names(self.interp)
        self.input = choose(inputs, tensors.get("input"), "input")
        self.output = choose(outputs, tensors.get("output"), "output", default="probabilities")
        if batch is not None:
            shape = self.interp.get_input_details()[0]["shape"]
            self.interp.resize_tensor_input(self.input, [batch, *shape[1:]])
        self.interp.allocate_tensors()
        details = {d["index"]: d for d in self.interp.get_input_details() + self.interp.get_output_details()}
        self.in_detail, self.out_detail = details[self.input], details[self.output]

    def set(self, images: np.ndarray) -> None:
        self.interp.set_tensor(self.input, quantise(images, self.in_detail))

    def __call__(self) -> np.ndarray:
        self.interp.invoke()
        return dequantise(self.interp.get_tensor(self.output), self.out_detail)


def _batched(interpreter_mod, job: dict, batch: int) -> "_Model | None":
    """The file at ``batch`` images a call, or None when its graph cannot take a batch."""
    try:
        model = _Model(interpreter_mod, job["model"], int(job["threads"]), batch, job.get("tensors"))
        model.set(np.zeros((batch, *model.interp.get_tensor(model.input).shape[1:]), np.float32))
        rows = model().shape[0]
    except _Choice:
        raise
    except (RuntimeError, ValueError):
        return None
    return model if rows == batch else None


def _run_job(interpreter_mod, job: dict) -> dict:
    from pipeline.runners.base import timed_calls
    from pipeline.testhook import crash_point

    crash_point(job["model"])
    feed, batch = FeedFile.from_dict(job["feed"]), int(job["batch"])
    outputs = []
    if len(feed) > 1:
        # Agreement pass: `batch` images a call on the given threads (a batch-1 file takes a
        # resized input: its outputs are bit-identical to single-image calls). Integer-I/O models
        # take quantised pixels and return quantised scores; an app converts with the file's scale
        # and zero point, and so do we. A short last batch is padded; the padding's outputs dropped.
        model = _batched(interpreter_mod, job, batch)
        if model is None:
            # A file whose graph fixes the batch inside (a Reshape to [1, ...], common in files
            # converted from Keras elsewhere) cannot take a batch: image by image instead.
            batch, model = 1, _Model(interpreter_mod, job["model"], int(job["threads"]), None, job.get("tensors"))
        for _, images in feed.batches(batch):
            padded = np.zeros((batch, *images.shape[1:]), np.float32)
            padded[:len(images)] = images
            model.set(padded)
            outputs.append(model()[:len(images)].astype(np.float32))
    latencies: list[float] = []
    if len(feed) == 1 or int(job["latency_runs"]) > 0:
        # Latency: the file as shipped (its own input shape), one thread, one image a call.
        single = _Model(interpreter_mod, job["model"], 1, tensors=job.get("tensors"))
        single.set(feed.read(0, 1))
        if len(feed) == 1:
            outputs.append(single().astype(np.float32))
        latencies = timed_calls(single, int(job["latency_runs"]))
    np.save(job["out"], np.concatenate(outputs) if outputs else np.zeros((0, 0), np.float32))
    return {"latencies_ms": latencies}


def runtime_info(runtime: str) -> dict:
    """What this worker process runs: ``machine`` (``platform.machine()``), ``python``, ``runtime_version``
    (the TFLite wheel's), ``numpy``, and ``cpu_part``, the CPU id its ``/proc/cpuinfo`` shows (ARM only;
    what ai-edge-litert's CPU detection reads)."""
    import importlib
    import platform

    package = importlib.import_module(RUNTIME_MODULES[runtime].split(".")[0])
    parts = []
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            parts = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("CPU part")]
    except OSError:
        pass
    return {"machine": platform.machine(), "python": platform.python_version(),
            "runtime_version": getattr(package, "__version__", None), "numpy": np.__version__,
            "cpu_part": parts[0] if parts else None}


def _main(runtime: str) -> None:
    import importlib

    from pipeline.runners.base import serve

    interpreter_mod = importlib.import_module(RUNTIME_MODULES[runtime])
    info = runtime_info(runtime)

    def handle(job):
        try:
            return {**_run_job(interpreter_mod, job), "info": info}
        except _Choice as err:
            return {"error": str(err)}

    serve(handle)


if __name__ == "__main__":
    _main(sys.argv[1])

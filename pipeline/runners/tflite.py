"""TFLite models in tflite-runtime and ai-edge-litert, each in its own subprocess.

A subprocess per (model, runtime) keeps the two TFLite builds and TensorFlow out of one address
space, and turns a crash or a hang in a runtime into a reported failure instead of a dead verify.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.runners.base import Prediction, run_python_worker
from pipeline.types import Runtime

RUNTIME_MODULES = {
    Runtime.TFLITE_RUNTIME.value: "tflite_runtime.interpreter",
    Runtime.LITERT.value: "ai_edge_litert.interpreter",
}


class TfliteRunner:
    """Runs a .tflite file image by image in one TFLite runtime (see :data:`RUNTIME_MODULES`)."""

    def __init__(self, name: str):
        if name not in RUNTIME_MODULES:
            raise ValueError(f"unknown TFLite runtime {name!r}; known: {sorted(RUNTIME_MODULES)}")
        self.name = name

    def unsupported(self, artifact: Path) -> str | None:
        return None

    def predict(self, artifact: Path, images: np.ndarray, timeout_s: float = 600.0) -> Prediction:
        with tempfile.TemporaryDirectory(prefix="edgepipe-tflite-") as tmp:
            inp, out = Path(tmp) / "in.npy", Path(tmp) / "out.npy"
            np.save(inp, np.asarray(images, np.float32))
            return run_python_worker(self.name, Path(artifact), "pipeline.runners.tflite",
                                     [self.name, str(artifact), str(inp), str(out)], out, timeout_s)


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


def _worker(runtime: str, model: str, inp: str, out: str) -> None:
    import importlib
    import time

    interpreter_mod = importlib.import_module(RUNTIME_MODULES[runtime])
    interp = interpreter_mod.Interpreter(model_path=model, num_threads=1)
    runner = interp.get_signature_runner("serving_default")
    images = np.load(inp)
    input_name, in_detail = next(iter(runner.get_input_details().items()))
    out_detail = runner.get_output_details()["probabilities"]
    # Integer-I/O models take quantised pixels and return quantised scores; an app does the same
    # conversion with the scale and zero point stored in the file, and so do we.
    images = _quantise(images, in_detail)
    outputs = []
    runner(**{input_name: images[:1]})  # warm-up: first call allocates and prepares kernels
    start = time.perf_counter()
    for img in images:
        outputs.append(runner(**{input_name: img[None]})["probabilities"][0])
    elapsed = time.perf_counter() - start
    np.save(out, _dequantise(np.stack(outputs), out_detail).astype(np.float32))
    print(json.dumps({"latency_ms": 1000 * elapsed / max(len(images), 1)}))


if __name__ == "__main__":
    _worker(*sys.argv[1:5])

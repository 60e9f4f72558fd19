"""The one interface every runtime implements for the verify stage."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class Prediction:
    """What a runtime said about a batch of images.

    Attributes:
        probabilities: float32 ``[N, num_classes]``.
        latency_ms: mean wall time of one single-image inference, after one warm-up call.
    """

    probabilities: np.ndarray
    latency_ms: float


class RuntimeFailed(Exception):
    """The runtime crashed, hung or refused the artifact; verify reports it and goes on."""


class Runner(Protocol):
    """Runs an artifact on preprocessed images (float32 RGB ``[N, H, W, 3]`` in 0..255).

    Each runtime module also has ``create(runtime, labels) -> Runner`` for the registry
    (:data:`pipeline.runners.REGISTRY`).
    """

    name: str

    def predict(self, artifact: Path, images: np.ndarray, timeout_s: float = 600.0) -> Prediction:
        """Probabilities ``[N, classes]`` and the mean single-image latency.

        Raises:
            RuntimeFailed: the runtime crashed, hung or refused the artifact.
        """
        ...

    def unsupported(self, artifact: Path) -> str | None:
        """Why this runtime cannot take ``artifact`` at all (verify then leaves the pair out
        rather than failing it for a reason that is not drift), or None."""
        ...


def run_python_worker(runtime: str, artifact: Path, module: str, args: list[str], out: Path,
                      timeout_s: float) -> Prediction:
    """Runs ``python -m module *args`` and reads its prediction back.

    The worker writes probabilities to ``out`` (.npy) and prints ``{"latency_ms": ...}`` as its last
    stdout line. A subprocess per (model, runtime) keeps runtimes out of one address space and turns
    a crash or a hang into a reported failure.

    Raises:
        RuntimeFailed: non-zero exit (with the telling stderr line), timeout, unreadable output.
    """
    import json
    import subprocess
    import sys

    argv = [sys.executable, "-m", module, *args]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s,
                              cwd=Path(__file__).resolve().parents[2])
    except subprocess.TimeoutExpired:
        raise RuntimeFailed(f"{runtime} timed out after {timeout_s:.0f} s on {artifact.name}") from None
    if proc.returncode != 0:
        raise RuntimeFailed(f"{runtime} failed on {artifact.name} (exit {proc.returncode}): {stderr_reason(proc.stderr)}")
    try:
        info = json.loads(proc.stdout.strip().splitlines()[-1])
        probs = np.load(out)
    except (ValueError, IndexError, OSError) as err:
        raise RuntimeFailed(f"{runtime} gave unreadable output on {artifact.name}: {err}") from None
    return Prediction(probs.astype(np.float32), float(info["latency_ms"]))


def stderr_reason(stderr: str) -> str:
    """The most telling line of a runtime's stderr: the last exception message, else the last line."""
    lines = [ln.strip() for ln in stderr.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.split(":")[0].endswith(("Error", "Exception"))]
    return (errors or lines or ["no output"])[-1][:300]

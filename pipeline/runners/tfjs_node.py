"""TF.js graph models on the wasm backend, run by Node.js the way a web app runs them.

The work happens in ``tfjs/run.mjs``; this module checks that Node and the pinned npm packages
are there, hands the images over as a raw float32 file and turns every way the child process can
go wrong (crash, hang, nonsense on stdout) into :class:`RuntimeFailed`.
"""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.runners.base import Prediction, RunSettings, RuntimeFailed, as_feed, describe_exit
from pipeline.runners.feed import FeedFile
from pipeline.types import Runtime

NODE_DIR = Path(__file__).parent / "tfjs"
RUN_SCRIPT = NODE_DIR / "run.mjs"
REQUIRED_PACKAGES = ("@tensorflow/tfjs", "@tensorflow/tfjs-backend-wasm")
SETUP_HINT = "run `make setup` (or `npm ci --prefix pipeline/runners/tfjs`)"
STDERR_TAIL_LINES = 5


def _node_executable() -> str:
    node = shutil.which("node")
    if node is None:
        raise RuntimeFailed(
            f"`node` is not on PATH; install Node.js 20 or newer, then {SETUP_HINT}"
        )
    return node


def ensure_node_modules() -> None:
    """Checks that Node.js and the runner's npm packages are installed.

    Raises:
        RuntimeFailed: ``node`` is not on PATH or ``tfjs/node_modules`` lacks a package.
    """
    _node_executable()
    modules = NODE_DIR / "node_modules"
    missing = [pkg for pkg in REQUIRED_PACKAGES if not (modules / pkg / "package.json").is_file()]
    if missing:
        raise RuntimeFailed(f"{', '.join(missing)} not installed in {modules}; {SETUP_HINT}")


class TfjsWasmRunner:
    """Runs a TF.js graph-model folder (``model.json`` + shards) with tfjs 4.22 on wasm.

    Args:
        output_key: the SavedModel signature output to return (``probabilities`` or ``logits``).
    """

    name = Runtime.TFJS_WASM.value

    def __init__(self, output_key: str = "probabilities") -> None:
        self.output_key = output_key

    def unsupported(self, artifact: Path) -> str | None:
        return None

    def close(self) -> None:
        pass

    def predict(self, artifact: Path, images: np.ndarray | FeedFile, timeout_s: float = 600.0,
                settings: RunSettings = RunSettings()) -> Prediction:
        """Classifies ``images`` ``settings.batch`` at a time, then times single-image calls.

        One Node process per bundle (there are two; starting Node and the wasm backend costs about
        0.3 s): wasm has one thread whatever ``settings.threads`` says.

        Args:
            artifact: folder holding ``model.json`` and its weight shards.
            images: float32 RGB ``[N, H, W, 3]``, or a feed file of them.
            timeout_s: wall-clock limit for the whole Node process, model loading included.

        Returns:
            The output named ``output_key``, float32 ``[N, C]``, and the timed single-image calls.

        Raises:
            RuntimeFailed: Node is missing, or the process crashed, timed out or printed no result.
            ValueError: ``images`` is not a non-empty ``[N, H, W, 3]`` array.
        """
        shape = images.shape if isinstance(images, FeedFile) else np.shape(images)
        if len(shape) != 4 or shape[0] == 0 or shape[-1] != 3:
            raise ValueError(f"images must be [N, H, W, 3] with N >= 1, got {shape}")
        ensure_node_modules()
        artifact = Path(artifact)
        if not (artifact / "model.json").is_file():
            raise RuntimeFailed(
                f"{artifact} has no model.json; expected a TF.js graph-model folder"
            )

        with as_feed(images) as feed, tempfile.TemporaryDirectory(prefix="edgepipe-tfjs-") as tmp:
            output_path = Path(tmp) / "outputs.bin"
            # run.mjs reads little-endian float32 whatever the host byte order (FeedFile's format).
            argv = [
                _node_executable(), str(RUN_SCRIPT),
                "--model", str(artifact),
                "--input", str(feed.path),
                "--shape", ",".join(str(d) for d in feed.shape),
                "--output", str(output_path),
                "--output-key", self.output_key,
                "--batch", str(settings.batch),
                "--latency-runs", str(settings.latency_runs),
            ]  # fmt: skip
            try:
                done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
            except subprocess.TimeoutExpired:
                raise RuntimeFailed(
                    f"{self.name} timed out after {timeout_s:g} s on {artifact} "
                    f"({len(feed)} images); the Node process was killed"
                ) from None
            if done.returncode != 0:
                raise RuntimeFailed(
                    f"{self.name} failed on {artifact} ({describe_exit(done.returncode)}): "
                    f"{_tail(done.stderr)}"
                )
            summary = _parse_summary(done.stdout, expected_rows=len(feed))
            return Prediction(
                probabilities=_read_outputs(output_path, summary["shape"]),
                latencies_ms=tuple(float(v) for v in summary.get("latencies_ms", [])),
            )


def create(runtime: Runtime, labels: Sequence[str]) -> TfjsWasmRunner:
    return TfjsWasmRunner()


def _tail(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " | ".join(lines[-STDERR_TAIL_LINES:]) or "no message on stderr"


def _parse_summary(stdout: str, expected_rows: int) -> dict:
    """Reads run.mjs's one-line JSON result; anything else means the runner is broken."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    try:
        summary = json.loads(lines[-1])
        rows, columns = summary["shape"]
        latencies = [float(v) for v in summary.get("latencies_ms", [])]
    except (IndexError, ValueError, TypeError, KeyError):
        raise RuntimeFailed(
            f"tfjs-wasm printed no result line; stdout was {_tail(stdout)!r}"
        ) from None
    if rows != expected_rows or not isinstance(columns, int) or columns < 1:
        raise RuntimeFailed(
            f"tfjs-wasm reported shape {summary['shape']} for {expected_rows} images"
        )
    bad = [v for v in latencies if not math.isfinite(v) or v < 0]
    if bad:
        raise RuntimeFailed(f"tfjs-wasm reported a latency of {bad[0]} ms")
    return summary


def _read_outputs(path: Path, shape: list[int]) -> np.ndarray:
    rows, columns = shape
    if not path.is_file() or path.stat().st_size != rows * columns * 4:
        found = path.stat().st_size if path.is_file() else "no"
        raise RuntimeFailed(
            f"tfjs-wasm wrote {found} bytes of outputs, expected {rows}x{columns} float32"
        )
    return np.fromfile(path, dtype="<f4").astype(np.float32).reshape(rows, columns)

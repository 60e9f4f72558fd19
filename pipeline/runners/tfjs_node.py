"""TF.js models on the wasm backend, run by Node.js the way a web app runs them: graph models
(``tensorflowjs_converter``'s, edgepipe's bundles among them) and layers models (Teachable
Machine's exports, ``model.save`` in tfjs-layers).

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

from pipeline.runners.base import Prediction, RunSettings, RuntimeFailed, Tensors, as_feed, describe_exit
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
    """Runs a TF.js model folder (``model.json`` + weight files) with tfjs 4.22 on wasm.

    Args:
        output_key: the output to return when :meth:`predict` is given no ``tensors.output``
            (None: the one named ``probabilities``, else the only one).

    Attributes:
        last_summary: what run.mjs said about the last :meth:`predict` (None until one succeeds):
            ``format`` (``graph-model`` or ``layers-model``), ``input`` and ``output`` (the names
            it used), ``batch`` (images per call; 1 for a graph frozen with batch 1), ``shape``,
            ``latency_ms``, ``latencies_ms``, ``agreement_pass_ms``, ``backend``, ``tfjs``.
            :class:`Prediction` carries only what every runtime has; ``check`` reports these.
    """

    name = Runtime.TFJS_WASM.value

    def __init__(self, output_key: str | None = None) -> None:
        self.output_key = output_key
        self.last_summary: dict | None = None

    def unsupported(self, artifact: Path) -> str | None:
        return None

    def close(self) -> None:
        pass

    def predict(self, artifact: Path, images: np.ndarray | FeedFile, timeout_s: float = 600.0,
                settings: RunSettings = RunSettings(), *, tensors: Tensors | None = None) -> Prediction:
        """Classifies ``images`` ``settings.batch`` at a time, then times single-image calls.

        One Node process per model (starting Node and the wasm backend costs about 0.3 s): wasm
        has one thread whatever ``settings.threads`` says.

        Args:
            artifact: folder holding ``model.json`` and its weight files.
            images: float32 RGB ``[N, H, W, 3]``, or a feed file of them, already the values the
                model takes (normalised by the caller; they reach the model unchanged).
            timeout_s: wall-clock limit for the whole Node process, model loading included.
            tensors: the input and output to use, by name. A graph model's names are its signature
                keys, ``structuredOutputKeys`` or node names (``Identity:0``); a layers model's are
                its input and output layer names. ``tensors.output`` wins over ``output_key``.
                Default: the only input; the output named ``probabilities``, else the only one.

        Returns:
            The chosen output, float32 ``[N, C]``, and the timed single-image calls; the names used
            are in :attr:`last_summary`.

        Raises:
            RuntimeFailed: Node is missing; the model has no such input or output (the message
                lists those it has), several outputs and none chosen, or an input that is not a
                float32 ``[N, H, W, 3]`` image batch of this size; or the process crashed, timed
                out or printed no result.
            ValueError: ``images`` is not a non-empty ``[N, H, W, 3]`` array.
        """
        shape = images.shape if isinstance(images, FeedFile) else np.shape(images)
        if len(shape) != 4 or shape[0] == 0 or shape[-1] != 3:
            raise ValueError(f"images must be [N, H, W, 3] with N >= 1, got {shape}")
        ensure_node_modules()
        artifact = Path(artifact)
        if not (artifact / "model.json").is_file():
            raise RuntimeFailed(
                f"{artifact} has no model.json; expected a TF.js graph- or layers-model folder"
            )

        self.last_summary = None
        tensors = tensors or Tensors()
        output = tensors.output or self.output_key
        tensor_flags = [*(("--input-name", tensors.input) if tensors.input else ()),
                 *(("--output-key", output) if output else ())]

        with as_feed(images) as feed, tempfile.TemporaryDirectory(prefix="edgepipe-tfjs-") as tmp:
            output_path = Path(tmp) / "outputs.bin"
            # run.mjs reads little-endian float32 whatever the host byte order (FeedFile's format).
            argv = [
                _node_executable(), str(RUN_SCRIPT),
                "--model", str(artifact),
                "--input", str(feed.path),
                "--shape", ",".join(str(d) for d in feed.shape),
                "--output", str(output_path),
                *tensor_flags,
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
                    f"{_tail(done.stderr)}{_known_cause(artifact)}"
                )
            summary = _parse_summary(done.stdout, expected_rows=len(feed))
            prediction = Prediction(
                probabilities=_read_outputs(output_path, summary["shape"]),
                latencies_ms=tuple(float(v) for v in summary.get("latencies_ms", [])),
            )
        self.last_summary = summary
        return prediction


def create(runtime: Runtime, labels: Sequence[str], **options) -> TfjsWasmRunner:
    return TfjsWasmRunner()


def npm_version(package: str) -> str | None:
    """The installed version of an npm package of the runner's, or None."""
    try:
        return json.loads((NODE_DIR / "node_modules" / package / "package.json").read_text())["version"]
    except (OSError, ValueError, KeyError):
        return None


def status(runtime: Runtime, **options):
    from pipeline.runners.base import RuntimeStatus

    try:
        ensure_node_modules()
        node = subprocess.run([_node_executable(), "--version"], capture_output=True, text=True).stdout.strip()
    except RuntimeFailed as err:
        return RuntimeStatus(False, "", str(err), "make setup")
    return RuntimeStatus(True, f"@tensorflow/tfjs {npm_version('@tensorflow/tfjs')} on wasm, node {node}")


# Ops tfjs 4.22's wasm backend is known to fail on, and what to do (measured on poets' retrained
# graph: its PlaceholderWithDefault on the bottleneck fails with "Cannot read properties of
# undefined (reading 'backend')"; the same graph with an Identity there runs).
KNOWN_FAILING_OPS = {
    "PlaceholderWithDefault": "replace it with Identity in the graph before converting (tfjs 4.22's wasm "
                              "backend fails on it)",
}


def _known_cause(artifact: Path) -> str:
    """A hint for a graph model that holds an op tfjs is known to fail on, or ``""``."""
    try:
        nodes = json.loads((Path(artifact) / "model.json").read_text(encoding="utf-8"))["modelTopology"]["node"]
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    hints = []
    for op, fix in KNOWN_FAILING_OPS.items():
        names = [n.get("name") for n in nodes if n.get("op") == op]
        if names:
            hints.append(f"the graph has {op} ({', '.join(names[:3])}): {fix}")
    return f" ({'; '.join(hints)})" if hints else ""


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

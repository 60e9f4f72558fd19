"""TF.js models in real headless Chromium, on one backend each: wasm, WebGL (float32 textures, or
f16 as many phone GPUs compute) and WebGPU.

The work happens in ``tfjs/chromium_run.mjs`` (Playwright). One Node process per runner keeps one
Chromium for all its artifacts; each artifact runs in a fresh browser context on a page that loads
tfjs from ``node_modules``, fetches the model and the feed file (raw float32) from 127.0.0.1 and
does run.mjs's work: the batched agreement pass, then timed single-image calls. This module checks
the tools, hands the jobs over and turns every way that can go wrong into :class:`RuntimeFailed`;
a backend that does not start, or that tfjs quietly swapped for another, is one of them.
"""
from __future__ import annotations

import functools
import json
import math
import os
import queue
import signal
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.runners.base import (
    Prediction,
    RunSettings,
    RuntimeFailed,
    RuntimeStatus,
    Tensors,
    Worker,
    _pump,
    as_feed,
    describe_exit,
)
from pipeline.runners.browser import CHROMIUM, ensure_browser
from pipeline.runners.feed import FeedFile
from pipeline.runners.tfjs_node import NODE_DIR, _node_executable, ensure_node_modules, npm_version
from pipeline.types import Runtime

RUN_SCRIPT = NODE_DIR / "chromium_run.mjs"
WEBGPU_PACKAGE = "@tensorflow/tfjs-backend-webgpu"
# Seconds on top of the job's own limit (which chromium_run.mjs enforces, keeping its browser):
# a first Chromium launch, and the margin before this side kills the process.
LAUNCH_GRACE_S = 30.0
PROBE_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Backend:
    """How a ``chromium-*`` runtime runs: the tfjs backend and the textures it computes in.

    Attributes:
        f16: WebGL with ``WEBGL_FORCE_F16_TEXTURES`` (half-float textures, as on many phone GPUs).
        probe_key: the key of :func:`probe`'s ``backends`` that describes this one.
    """

    name: str
    f16: bool = False
    probe_key: str = ""


BACKENDS: dict[Runtime, Backend] = {
    Runtime.CHROMIUM_WASM: Backend("wasm", probe_key="wasm"),
    Runtime.CHROMIUM_WEBGL: Backend("webgl", probe_key="webgl"),
    Runtime.CHROMIUM_WEBGL_F16: Backend("webgl", f16=True, probe_key="webgl-f16"),
    Runtime.CHROMIUM_WEBGPU: Backend("webgpu", probe_key="webgpu"),
}


class _Driver(Worker):
    """``node chromium_run.mjs`` behind :class:`Worker`'s protocol (one JSON job a line, one
    answer a line; a crash or hang costs one artifact and the next job starts a new process).

    Node runs in a process group of its own, killed whole after a hang. Chromium, which
    Playwright starts in a group of its own, exits when its pipe to Node closes (checked: no
    Chromium process outlives a SIGKILL of Node).
    """

    def __init__(self, runtime: str, args: Sequence[str]):
        super().__init__(runtime, module="", args=tuple(args))

    def _start(self) -> None:
        self._stderr = tempfile.TemporaryFile(mode="w+b")
        self._proc = subprocess.Popen(
            [_node_executable(), str(RUN_SCRIPT), *self.args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self._stderr, cwd=NODE_DIR, text=True, bufsize=1, start_new_session=True)
        self.started += 1
        self._lines = queue.Queue()
        threading.Thread(target=_pump, args=(self._proc.stdout, self._lines), daemon=True).start()

    def _kill(self) -> None:
        if self._proc is not None:
            try:
                os.killpg(self._proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._proc.wait()
            self._proc = None


class ChromiumRunner:
    """Runs TF.js model folders (graph or layers models) in headless Chromium on one backend.

    Args:
        runtime: one of :data:`BACKENDS`' runtimes.
        chromium: the browser (Debian's, from ``make browser``).
        chromium_args: more Chromium flags (a GPU's, or ``--use-gl=disabled`` to see WebGL fail).

    Attributes:
        last_summary: what the page said about the last :meth:`predict` (None until one succeeds):
            run.mjs's fields (``format``, ``input``, ``output``, ``batch``, ``shape``,
            ``latency_ms``, ``latencies_ms``, ``agreement_pass_ms``, ``tfjs``), ``backend`` as
            ``tf.getBackend()`` says, ``flags`` (``WEBGL_FORCE_F16_TEXTURES``, ``WEBGL_VERSION``,
            ``WEBGL_RENDER_FLOAT32_ENABLED``, ...; ``WASM_HAS_SIMD_SUPPORT``, ... on wasm),
            ``renderer`` (WebGL) or ``adapter`` (WebGPU), ``browser`` (Chromium's version),
            ``launch_ms`` (Chromium's start, on the call that started it; else None),
            ``launches``, ``page_ms``, ``backend_ms``, ``load_ms``, ``blocked_requests``, ``page_errors``.
    """

    def __init__(self, runtime: Runtime, *, chromium: Path = CHROMIUM, chromium_args: Sequence[str] = ()):
        if runtime not in BACKENDS:
            raise ValueError(f"{runtime.value} is not a Chromium runtime; those are "
                             f"{', '.join(rt.value for rt in BACKENDS)}")
        self.name = runtime.value
        self.backend = BACKENDS[runtime]
        self.chromium = Path(chromium)
        args = ["--chromium", str(self.chromium), *(["--webgpu"] if self.backend.name == "webgpu" else [])]
        args += [f"--chromium-arg={flag}" for flag in chromium_args]
        self._driver = _Driver(self.name, args)
        self.last_summary: dict | None = None

    def unsupported(self, artifact: Path) -> str | None:
        return None

    def close(self) -> None:
        """Ends the Node process and its Chromium."""
        self._driver.close()

    def predict(self, artifact: Path, images: np.ndarray | FeedFile, timeout_s: float = 600.0,
                settings: RunSettings = RunSettings(), tensors: Tensors = Tensors()) -> Prediction:
        """Classifies ``images`` ``settings.batch`` at a time in the page, then times single-image calls.

        The first call starts Chromium (0.25 to 0.45 s, measured) and opens the page (tfjs
        parsed, the backend started: 0.9 to 1.5 s); later calls reuse both, so a call costs its
        model's loading and inference (a failed call costs its page: the next opens a new one).
        tfjs on wasm runs one thread, in a page that is not cross-origin isolated, as an app's
        usually is not; ``settings.threads`` is not used.

        Args:
            artifact: folder holding ``model.json`` and its weight files.
            images: float32 RGB ``[N, H, W, 3]``, or a feed file of them, already the values the
                model takes.
            timeout_s: wall-clock limit for the page's work (model loading included); a first
                call may take :data:`LAUNCH_GRACE_S` more to start Chromium.
            tensors: the input and output to use, by name, as for the tfjs-wasm runner.

        Returns:
            The chosen output, float32 ``[N, C]`` in the model's output order, and the timed
            single-image calls; the rest is in :attr:`last_summary`.

        Raises:
            RuntimeFailed: Chromium, Node or the npm packages are missing; the backend is not
                offered (WebGPU's tfjs package not installed, no WebGL) or tfjs runs another in
                its place; the model has no such input or output; or the page or the browser
                failed or timed out.
            ValueError: ``images`` is not a non-empty ``[N, H, W, 3]`` array.
        """
        shape = images.shape if isinstance(images, FeedFile) else np.shape(images)
        if len(shape) != 4 or shape[0] == 0 or shape[-1] != 3:
            raise ValueError(f"images must be [N, H, W, 3] with N >= 1, got {shape}")
        ensure_browser(self.chromium)
        ensure_node_modules()
        artifact = Path(artifact)
        if not (artifact / "model.json").is_file():
            raise RuntimeFailed(f"{artifact} has no model.json; expected a TF.js graph- or layers-model folder")
        self.last_summary = None
        tensors = tensors or Tensors()
        with as_feed(images) as feed, tempfile.TemporaryDirectory(prefix="edgepipe-chromium-") as tmp:
            output_path = Path(tmp) / "outputs.bin"
            job = {
                "model": str(artifact.resolve()), "input": str(Path(feed.path).resolve()),
                "shape": list(feed.shape), "output": str(output_path),
                "backend": self.backend.name, "f16": self.backend.f16,
                "input_name": tensors.input, "output_key": tensors.output,
                "batch": settings.batch, "latency_runs": settings.latency_runs,
                "timeout_ms": max(1, int(timeout_s * 1000)),
            }
            summary = self._driver.run(job, timeout_s + LAUNCH_GRACE_S, str(artifact))
            self._check(summary, len(feed))
            probabilities = _read_outputs(output_path, summary["shape"], self.name)
        self.last_summary = summary
        return Prediction(probabilities=probabilities,
                          latencies_ms=tuple(float(v) for v in summary["latencies_ms"]))

    def _check(self, summary: dict, rows: int) -> None:
        """The page's summary makes sense and names the backend asked for."""
        try:
            got_rows, columns = summary["shape"]
            latencies = [float(v) for v in summary["latencies_ms"]]
            backend = summary["backend"]
        except (KeyError, ValueError, TypeError):
            raise RuntimeFailed(f"{self.name} gave no usable summary: {json.dumps(summary)[:300]}") from None
        if backend != self.backend.name:
            raise RuntimeFailed(f"{self.name}: asked for {self.backend.name}, TF.js runs {backend}")
        if got_rows != rows or not isinstance(columns, int) or columns < 1:
            raise RuntimeFailed(f"{self.name} reported shape {summary['shape']} for {rows} images")
        bad = [v for v in latencies if not math.isfinite(v) or v < 0]
        if bad:
            raise RuntimeFailed(f"{self.name} reported a latency of {bad[0]} ms")


def _read_outputs(path: Path, shape: Sequence[int], name: str) -> np.ndarray:
    rows, columns = shape
    if not path.is_file() or path.stat().st_size != rows * columns * 4:
        found = path.stat().st_size if path.is_file() else "no"
        raise RuntimeFailed(f"{name} wrote {found} bytes of outputs, expected {rows}x{columns} float32")
    return np.fromfile(path, dtype="<f4").astype(np.float32).reshape(rows, columns)


def create(runtime: Runtime, labels: Sequence[str], **_) -> ChromiumRunner:
    return ChromiumRunner(runtime)


@functools.cache
def probe(chromium: Path = CHROMIUM) -> dict:
    """What this Chromium offers headless, asked once per process (about 3 s: one launch, two
    pages at once; f16 textures need a page of their own).

    Returns:
        ``{"browser", "tfjs", "launch_ms", "backends": {"wasm"|"webgl"|"webgl-f16"|"webgpu":
        {"ok", "backend", "flags", "renderer"|"adapter", "reason"}}}``; or ``{"error": why}``
        when the probe itself failed (a failure is kept too: it would fail the same way again).
    """
    try:
        ensure_browser(chromium)
        ensure_node_modules()
        done = subprocess.run([_node_executable(), str(RUN_SCRIPT), "--probe", "--chromium", str(chromium)],
                              capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, cwd=NODE_DIR)
    except RuntimeFailed as err:
        return {"error": str(err)}
    except subprocess.TimeoutExpired:
        return {"error": f"probing Chromium at {chromium} timed out after {PROBE_TIMEOUT_S:g} s"}
    if done.returncode != 0:
        lines = [ln for ln in done.stderr.splitlines() if ln.strip()] or ["no message on stderr"]
        return {"error": f"probing Chromium failed ({describe_exit(done.returncode)}): {lines[-1]}"}
    try:
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return {"error": f"chromium_run.mjs --probe printed no result: {done.stdout[-200:]!r}"}


def status(runtime: Runtime, **_) -> RuntimeStatus:
    """Ready when Chromium, Node and the npm packages are there and the backend starts headless;
    the version says what it runs on, e.g. ``Chromium 156, @tensorflow/tfjs 4.22.0 (webgl,
    WebGL 2 via SwiftShader)``."""
    backend = BACKENDS[runtime]
    found = probe()
    if "error" in found:
        return RuntimeStatus(False, "", found["error"], "make browser")
    entry = found["backends"][backend.probe_key]
    version = f"Chromium {found['browser'].split('.')[0]}, @tensorflow/tfjs {found['tfjs']}"
    if not entry["ok"]:
        missing = backend.name == "webgpu" and npm_version(WEBGPU_PACKAGE) is None
        setup = f"npm install --prefix pipeline/runners/tfjs {WEBGPU_PACKAGE}@{found['tfjs']}" if missing \
            else "make browser"
        return RuntimeStatus(False, version, entry["reason"], setup)
    return RuntimeStatus(True, f"{version} ({describe(entry)})")


def describe(entry: dict) -> str:
    """A backend as the probe or a run found it, in a few words: ``webgl, WebGL 2 via
    SwiftShader, f16 textures``; ``wasm, SIMD, 1 thread``."""
    flags = entry.get("flags") or {}
    words = [entry.get("backend") or "?"]
    if words[0] == "webgl":
        renderer = entry.get("renderer") or "an unnamed renderer"
        via = "SwiftShader" if "SwiftShader" in renderer else renderer
        words.append(f"WebGL {flags.get('WEBGL_VERSION', '?')} via {via}")
        if flags.get("WEBGL_FORCE_F16_TEXTURES"):
            words.append("f16 textures")
    elif words[0] == "wasm":
        if flags.get("WASM_HAS_SIMD_SUPPORT"):
            words.append("SIMD")
        words.append("threads" if flags.get("WASM_HAS_MULTITHREAD_SUPPORT") else "1 thread")
    elif entry.get("adapter"):
        words.append(f"adapter {entry['adapter']}")
    return ", ".join(words)

"""The one interface every runtime implements for the verify stage, and the long-lived worker
process the out-of-process runtimes share."""
from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Protocol, Sequence

import numpy as np

from pipeline.runners.feed import FeedFile

LATENCY_RUNS = 30  # single-image calls timed per (artifact, runtime), after one warm-up call
BATCH = 16         # images per call in the agreement pass (measured: 16 at 2 threads is as fast as any)


@dataclass(frozen=True)
class RunSettings:
    """How a runner runs one artifact.

    Attributes:
        batch: images per call in the agreement pass.
        threads: threads for the agreement pass (default: every core).
        latency_runs: single-image calls on one thread, timed after a warm-up call (0: none).
        parallel: runtimes whose agreement passes run at once (verify splits ``threads`` among them).
    """

    batch: int = BATCH
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    latency_runs: int = LATENCY_RUNS
    parallel: int = field(default_factory=lambda: os.cpu_count() or 1)

    def to_dict(self) -> dict:
        return {"batch": self.batch, "threads": self.threads, "latency_runs": self.latency_runs}


@dataclass(frozen=True)
class Prediction:
    """What a runtime said about the test images.

    Attributes:
        probabilities: float32 ``[N, num_classes]``.
        latencies_ms: wall time of each timed single-image call (one thread, after a warm-up).
    """

    probabilities: np.ndarray
    latencies_ms: tuple[float, ...] = ()

    @property
    def latency_ms(self) -> float | None:
        """The median single-image latency (p50), or None when nothing was timed."""
        return self.percentile(50)

    def percentile(self, q: float) -> float | None:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else None


@dataclass(frozen=True)
class Tensors:
    """Which input and output of a model a runner uses (by name; None: the runner's default).

    The default input is the model's only image input. The default output is the one named
    ``probabilities`` when the model has one (every edgepipe artifact does), else its only output;
    a model with several outputs and none named so needs ``output`` (``--output NAME``), and the
    runner raises :class:`RuntimeFailed` listing the names it has.
    """

    input: str | None = None
    output: str | None = None

    def to_dict(self) -> dict:
        return {"input": self.input, "output": self.output}


@dataclass(frozen=True)
class RuntimeStatus:
    """What ``edgepipe runtimes`` says of one runtime on this machine.

    Attributes:
        ready: it can run now.
        version: what runs it (wheel, npm package, Chromium, emulated CPU), as far as known.
        detail: why it is not ready, or a note.
        setup: the one command that sets it up (for a runtime that is not ready).
    """

    ready: bool
    version: str = ""
    detail: str = ""
    setup: str = ""

    def to_dict(self) -> dict:
        return {"ready": self.ready, "version": self.version, "detail": self.detail, "setup": self.setup}


class RuntimeFailed(Exception):
    """The runtime crashed, hung or refused the artifact; verify reports it and goes on."""


class Runner(Protocol):
    """Runs artifacts on prepared images (float32 RGB ``[N, H, W, 3]`` in 0..255).

    Each runtime module also has ``create(runtime, labels) -> Runner`` for the registry
    (:data:`pipeline.runners.REGISTRY`). One runner serves every artifact of its runtime in turn
    (its worker process, where it has one, is started once and restarted only after a failure);
    :meth:`close` ends it.
    """

    name: str

    def predict(self, artifact: Path, images: np.ndarray | FeedFile, timeout_s: float = 600.0,
                settings: RunSettings = RunSettings(), tensors: "Tensors" = ...) -> Prediction:
        """The chosen output ``[N, classes]`` (batched) and the timed single-image latencies;
        ``tensors`` says which input and output (:class:`Tensors`; default: the runner's choice).

        Raises:
            RuntimeFailed: the runtime crashed, hung or refused the artifact.
        """
        ...

    def unsupported(self, artifact: Path) -> str | None:
        """Why this runtime cannot take ``artifact`` at all (verify then leaves the pair out
        rather than failing it for a reason that is not drift), or None."""
        ...

    def close(self) -> None:
        ...


class as_feed:
    """``with as_feed(images) as feed``: a :class:`FeedFile` as it is, or an array written to a
    temporary one for the length of the block."""

    def __init__(self, images: np.ndarray | FeedFile):
        self.images, self._tmp = images, None

    def __enter__(self) -> FeedFile:
        if isinstance(self.images, FeedFile):
            return self.images
        self._tmp = tempfile.TemporaryDirectory(prefix="edgepipe-feed-")
        return FeedFile.from_array(Path(self._tmp.name) / "images.f32", self.images)

    def __exit__(self, *exc) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


class Worker:
    """A long-lived ``python -m module`` child that takes one JSON job per stdin line and answers
    one JSON line on stdout (:func:`serve` is the child's side).

    A Python error in a job comes back as ``{"error": ...}`` and the worker lives on; a crash or a
    hang ends this process (a hung one is killed at the timeout) and :meth:`run` raises
    :class:`RuntimeFailed`; the next job starts a new process. Runtimes stay out of verify's
    address space, and one bad artifact costs one row, not the rest.
    """

    def __init__(self, runtime: str, module: str, args: tuple[str, ...] = (), python: Sequence[str] | None = None,
                 env: Mapping[str, str] | None = None):
        """
        Args:
            python: the command that runs Python (default: this interpreter); the arm64 runtimes
                give QEMU and the emulated interpreter.
            env: the child's whole environment (default: this process's).
        """
        self.runtime, self.module, self.args = runtime, module, args
        self.python, self.env = list(python or [sys.executable]), None if env is None else dict(env)
        self._proc: subprocess.Popen | None = None
        self._lines: queue.Queue = queue.Queue()
        self._stderr = None
        self.started = 0  # processes started, for tests and the benchmark

    def _start(self) -> None:
        self._stderr = tempfile.TemporaryFile(mode="w+b")
        self._proc = subprocess.Popen(
            [*self.python, "-m", self.module, *self.args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self._stderr, cwd=Path(__file__).resolve().parents[2], text=True, bufsize=1, env=self.env)
        self.started += 1
        self._lines = queue.Queue()
        threading.Thread(target=_pump, args=(self._proc.stdout, self._lines), daemon=True).start()

    def run(self, job: dict, timeout_s: float, what: str) -> dict:
        """Sends ``job``; returns the worker's answer.

        Raises:
            RuntimeFailed: the job failed (the worker's error), or the worker crashed or hung on
                ``what`` (the artifact's name, for the message).
        """
        if self._proc is None or self._proc.poll() is not None:
            self._start()
        start_err = self._stderr.tell() if self._stderr else 0
        try:
            self._proc.stdin.write(json.dumps(job) + "\n")
            self._proc.stdin.flush()
        except OSError:
            pass  # it died already; the read below says how
        try:
            line = self._lines.get(timeout=timeout_s)
        except queue.Empty:
            self._kill()
            raise RuntimeFailed(f"{self.runtime} timed out after {timeout_s:g} s on {what}") from None
        if line is None:  # stdout closed: the process is gone
            code = self._proc.wait()
            reason = stderr_reason(self._read_stderr(start_err))
            self._proc = None
            raise RuntimeFailed(f"{self.runtime} failed on {what} ({describe_exit(code)}): {reason}")
        try:
            answer = json.loads(line)
        except ValueError:
            self._kill()
            raise RuntimeFailed(f"{self.runtime} gave unreadable output on {what}: {line[:200]!r}") from None
        if answer.get("error"):
            raise RuntimeFailed(f"{self.runtime} failed on {what}: {answer['error']}")
        return answer

    def _read_stderr(self, start: int) -> str:
        self._stderr.seek(start)
        text = self._stderr.read().decode(errors="replace")
        self._stderr.seek(0, os.SEEK_END)
        return text

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._kill()
        self._proc = None


def _pump(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def serve(handle: Callable[[dict], dict]) -> None:
    """The worker's side of :class:`Worker`: answers each job line with ``handle(job)``.

    Only answers go to stdout: the real stdout is kept for them and fd 1 is pointed at stderr, so
    a runtime library printing to stdout cannot corrupt the protocol.
    """
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            answer = handle(json.loads(line))
        except Exception as err:  # a refused model is an answer, not the end of the worker
            answer = {"error": f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"}
        answers.write(json.dumps(answer) + "\n")


def timed_calls(call: Callable[[], object], runs: int) -> list[float]:
    """Milliseconds of each of ``runs`` calls, after one untimed warm-up call."""
    import time

    if runs <= 0:
        return []
    call()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append(1000 * (time.perf_counter() - start))
    return times


def package_version(name: str) -> str | None:
    """The installed version of a Python distribution, or None."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def describe_exit(code: int) -> str:
    import signal

    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def stderr_reason(stderr: str) -> str:
    """The most telling line of a runtime's stderr: the last exception message, else the last line."""
    lines = [ln.strip() for ln in stderr.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.split(":")[0].endswith(("Error", "Exception"))]
    return (errors or lines or ["no output"])[-1][:300]

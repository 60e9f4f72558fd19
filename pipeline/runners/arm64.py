"""The Raspberry Pi's own TFLite runtimes, ``tflite-runtime-arm64`` and ``ai-edge-litert-arm64``: the Pi's
aarch64 wheels in Debian 12 arm64's Python under QEMU user-mode emulation (set up by ``edgepipe setup-arm64``,
:mod:`pipeline.arm64`).

The worker is the x86 runtimes' own (:mod:`pipeline.runners.tflite`), started by the emulated Python, so
the same job runs the same way in both and only the machine under it differs. Emulation is slow (a
MobileNetV2 at 224 px: about 3 s an image in float32, 0.4-0.5 s in int8): verify runs these runtimes on a
sample of the test images, with the caller's timeout.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.runners.base import Prediction, RunSettings, RuntimeFailed, RuntimeStatus, Tensors, Worker
from pipeline.runners.feed import FeedFile
from pipeline.types import Runtime

DEFAULT_CPU = "cortex-a72"  # pipeline.arm64.DEFAULT_CPU, without importing it for every runner


class Arm64Runner:
    """Runs .tflite files in one of the Pi's TFLite runtimes on one emulated CPU, every file in the same
    emulated worker process while it lives.

    Attributes:
        cpu: the CPU QEMU emulates: ``cortex-a72`` (Pi 4) or ``cortex-a76`` (Pi 5).
        last_info: what ran the last prediction (empty before the first): ``machine`` (the worker's
            ``platform.machine()``: ``aarch64``), ``python``, ``runtime``, ``runtime_version``, ``numpy``,
            ``cpu`` (the emulated model), ``cpu_part`` (the CPU id the runtime read from its
            ``/proc/cpuinfo``: ``0xd08`` for a Pi 4's Cortex-A72, ``0xd0b`` for a Pi 5's Cortex-A76),
            ``board``, ``qemu`` (its version) and ``threads``.
    """

    def __init__(self, runtime: Runtime, cpu: str | None = DEFAULT_CPU, cache_dir: Path | str | None = None):
        self.runtime, self.name, self.cpu, self.cache_dir = runtime, runtime.value, cpu or DEFAULT_CPU, cache_dir
        self.worker: Worker | None = None  # made on the first prediction: the set-up may come after create()
        self.last_info: dict = {}

    def unsupported(self, artifact: Path) -> str | None:
        return None

    def predict(self, artifact: Path, images: np.ndarray | FeedFile, timeout_s: float = 600.0,
                settings: RunSettings = RunSettings(), tensors: Tensors = Tensors()) -> Prediction:
        """As :meth:`pipeline.runners.tflite.TfliteRunner.predict`, on one thread: under QEMU 7.2 two
        threads gave no gain. ``timeout_s`` covers the emulated process's start (about 2-5 s) on the
        first call.

        Raises:
            RuntimeFailed: not set up (the message names ``edgepipe setup-arm64``), or the runtime
                crashed, hung or refused the artifact.
        """
        from pipeline.runners.tflite import run_in_worker

        worker = self._worker()
        artifact = Path(artifact).resolve()  # the worker's working folder is the repository, not ours
        if isinstance(images, FeedFile):
            images = dataclasses.replace(images, path=Path(images.path).resolve())
        prediction, answer = run_in_worker(worker, artifact, images, timeout_s,
                                           dataclasses.replace(settings, threads=1), tensors)
        self.last_info = {"runtime": self.name, **answer.get("info", {}), **self._cpu_info(), "threads": 1}
        return prediction

    def _worker(self) -> Worker:
        if self.worker is None:
            from pipeline.arm64 import NotSetUp, python_command

            try:
                python, env = python_command(self.runtime, self.cpu, self.cache_dir)
            except NotSetUp as err:
                raise RuntimeFailed(f"{self.name}: {err}") from None
            self.worker = Worker(self.name, "pipeline.runners.tflite", (self.name,), python=python, env=env)
        return self.worker

    def _cpu_info(self) -> dict:
        from pipeline.arm64 import CPUS, qemu_version

        return {"cpu": self.cpu, "board": CPUS[self.cpu].board, "qemu": qemu_version()}

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()


def create(runtime: Runtime, labels: Sequence[str], arm64_cpu: str = DEFAULT_CPU,
           cache_dir: Path | str | None = None, **_) -> Arm64Runner:
    return Arm64Runner(runtime, arm64_cpu, cache_dir)


def status(runtime: Runtime, arm64_cpu: str = DEFAULT_CPU, cache_dir: Path | str | None = None,
           **_) -> RuntimeStatus:
    """Ready once ``edgepipe setup-arm64`` has run in this cache and QEMU is installed; the version names the
    wheel, numpy, the emulated Python, CPU and QEMU."""
    from pipeline.arm64 import status as arm64_status

    return RuntimeStatus(**arm64_status(runtime, arm64_cpu or DEFAULT_CPU, cache_dir))

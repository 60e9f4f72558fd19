"""The Raspberry Pi's TFLite runtimes under QEMU user-mode emulation (being built: issue 13)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.runners.base import Prediction, RunSettings, RuntimeFailed, RuntimeStatus, Tensors
from pipeline.runners.feed import FeedFile
from pipeline.types import Runtime


class Arm64Runner:
    def __init__(self, runtime: Runtime):
        self.name = runtime.value

    def unsupported(self, artifact: Path) -> str | None:
        return None

    def predict(self, artifact: Path, images: np.ndarray | FeedFile, timeout_s: float = 600.0,
                settings: RunSettings = RunSettings(), tensors: Tensors = Tensors()) -> Prediction:
        raise RuntimeFailed(f"{self.name} is not set up")

    def close(self) -> None:
        pass


def create(runtime: Runtime, labels: Sequence[str], **options) -> Arm64Runner:
    return Arm64Runner(runtime)


def status(runtime: Runtime, **options) -> RuntimeStatus:
    return RuntimeStatus(False, "", "not set up", "edgepipe setup-arm64")

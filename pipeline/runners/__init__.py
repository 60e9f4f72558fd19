"""The runtimes verify runs models in, one module each, behind :class:`pipeline.runners.base.Runner`.

:data:`REGISTRY` is the table: for each :class:`~pipeline.types.Runtime`, the kind of artifact
its runner takes, how its input is prepared (:class:`Feed`) and the module that implements it.
Verify asks the table instead of branching on runtime names; adding a runtime is adding a module
with a ``create(runtime, labels)`` function and one row here. Row order is the report's order.
"""
from __future__ import annotations

import enum
import importlib
from dataclasses import dataclass
from typing import Sequence

from pipeline.runners.base import Runner
from pipeline.types import ArtifactKind, Runtime


class Feed(enum.StrEnum):
    """Which pixels a runner gets.

    CONTRACT: the preprocessing contract, always (the reference; MediaPipe, which prepares pixels
    itself from the TFLite metadata, so an app's preprocessing is not its own).
    APP: as the deploying app prepares them (``--app-preprocessing``; the contract by default).
    """

    CONTRACT = "contract"
    APP = "app"


@dataclass(frozen=True)
class RunnerInfo:
    """One registry row: what the runtime's runner takes and where it lives."""

    runtime: Runtime
    accepts: frozenset[ArtifactKind]
    feed: Feed
    module: str

    def create(self, labels: Sequence[str]) -> Runner:
        """The runner (its module imported only now: runtimes import heavy libraries lazily)."""
        return importlib.import_module(self.module).create(self.runtime, list(labels))


REGISTRY: dict[Runtime, RunnerInfo] = {info.runtime: info for info in (
    RunnerInfo(Runtime.TENSORFLOW, frozenset({ArtifactKind.SAVEDMODEL, ArtifactKind.KERAS, ArtifactKind.GRAPH}),
               Feed.CONTRACT, "pipeline.runners.savedmodel"),
    RunnerInfo(Runtime.TFLITE_RUNTIME, frozenset({ArtifactKind.TFLITE}), Feed.APP, "pipeline.runners.tflite"),
    RunnerInfo(Runtime.LITERT, frozenset({ArtifactKind.TFLITE}), Feed.APP, "pipeline.runners.tflite"),
    RunnerInfo(Runtime.MEDIAPIPE, frozenset({ArtifactKind.TFLITE}), Feed.CONTRACT, "pipeline.runners.mediapipe"),
    RunnerInfo(Runtime.TFJS_WASM, frozenset({ArtifactKind.TFJS}), Feed.APP, "pipeline.runners.tfjs_node"),
)}

# Where a model of each kind runs when it is the reference (a float TFLite file: the newer runtime).
REFERENCE_RUNTIME: dict[ArtifactKind, Runtime] = {
    ArtifactKind.SAVEDMODEL: Runtime.TENSORFLOW, ArtifactKind.KERAS: Runtime.TENSORFLOW,
    ArtifactKind.GRAPH: Runtime.TENSORFLOW, ArtifactKind.TFLITE: Runtime.LITERT, ArtifactKind.TFJS: Runtime.TFJS_WASM,
}


def runtimes_for(kind: ArtifactKind, chosen: Sequence[Runtime]) -> list[RunnerInfo]:
    """The registry rows among ``chosen`` that take ``kind``, in registry order. TensorFlow is
    never a ``--runtime`` choice: it runs every TensorFlow model (SavedModel, Keras, frozen graph)."""
    return [info for rt, info in REGISTRY.items()
            if kind in info.accepts and (rt in chosen or rt is Runtime.TENSORFLOW)]

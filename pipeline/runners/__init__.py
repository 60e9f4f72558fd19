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

from pipeline.runners.base import Runner, RuntimeStatus
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
    """One registry row: what the runtime's runner takes and where it lives.

    Attributes:
        twin: the x86 runtime of the same wheel; verify reports this runtime's drift from it.
        sampled: emulated and slow: verify runs it on a class-stratified sample of the test
            images (``--arm64-sample``).
    """

    runtime: Runtime
    accepts: frozenset[ArtifactKind]
    feed: Feed
    module: str
    twin: Runtime | None = None
    sampled: bool = False

    def create(self, labels: Sequence[str], **options) -> Runner:
        """The runner (its module imported only now: runtimes import heavy libraries lazily).

        Args:
            options: runtime settings a module may take (``arm64_cpu``, ``cache_dir``); each
                module's ``create`` ignores the ones it does not know.
        """
        return importlib.import_module(self.module).create(self.runtime, list(labels), **options)

    def status(self, **options) -> RuntimeStatus:
        """Whether the runtime is ready on this machine, its version, and how to set it up."""
        return importlib.import_module(self.module).status(self.runtime, **options)


REGISTRY: dict[Runtime, RunnerInfo] = {info.runtime: info for info in (
    RunnerInfo(Runtime.TENSORFLOW, frozenset({ArtifactKind.SAVEDMODEL, ArtifactKind.KERAS, ArtifactKind.GRAPH}),
               Feed.CONTRACT, "pipeline.runners.savedmodel"),
    RunnerInfo(Runtime.TFLITE_RUNTIME, frozenset({ArtifactKind.TFLITE}), Feed.APP, "pipeline.runners.tflite"),
    RunnerInfo(Runtime.LITERT, frozenset({ArtifactKind.TFLITE}), Feed.APP, "pipeline.runners.tflite"),
    RunnerInfo(Runtime.MEDIAPIPE, frozenset({ArtifactKind.TFLITE}), Feed.CONTRACT, "pipeline.runners.mediapipe"),
    RunnerInfo(Runtime.TFJS_WASM, frozenset({ArtifactKind.TFJS}), Feed.APP, "pipeline.runners.tfjs_node"),
    RunnerInfo(Runtime.TFLITE_RUNTIME_ARM64, frozenset({ArtifactKind.TFLITE}), Feed.APP, "pipeline.runners.arm64",
               twin=Runtime.TFLITE_RUNTIME, sampled=True),
    RunnerInfo(Runtime.LITERT_ARM64, frozenset({ArtifactKind.TFLITE}), Feed.APP, "pipeline.runners.arm64",
               twin=Runtime.LITERT, sampled=True),
    RunnerInfo(Runtime.CHROMIUM_WASM, frozenset({ArtifactKind.TFJS}), Feed.APP, "pipeline.runners.chromium",
               twin=Runtime.TFJS_WASM),
    RunnerInfo(Runtime.CHROMIUM_WEBGL, frozenset({ArtifactKind.TFJS}), Feed.APP, "pipeline.runners.chromium",
               twin=Runtime.TFJS_WASM),
    RunnerInfo(Runtime.CHROMIUM_WEBGL_F16, frozenset({ArtifactKind.TFJS}), Feed.APP, "pipeline.runners.chromium",
               twin=Runtime.TFJS_WASM),
    RunnerInfo(Runtime.CHROMIUM_WEBGPU, frozenset({ArtifactKind.TFJS}), Feed.APP, "pipeline.runners.chromium",
               twin=Runtime.TFJS_WASM),
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


def not_ready(runtimes: Sequence[Runtime], **options) -> list[str]:
    """A problem line for each of the emulated and browser runtimes among ``runtimes`` that is not
    set up here, naming the command that sets it up (the others are installed with edgepipe)."""
    out = []
    for rt in runtimes:
        info = REGISTRY.get(rt)
        if info is None or info.twin is None:
            continue
        st = info.status(**options)
        if not st.ready:
            out.append(f"--runtime {rt}: not ready on this machine ({st.detail}); set it up with `{st.setup}` "
                       "(`edgepipe runtimes` lists them all)")
    return out

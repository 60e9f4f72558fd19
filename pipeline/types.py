"""Frozen types and closed sets shared by every stage; this module imports nothing of edgepipe's.

Every closed set is a :class:`enum.StrEnum`: a member is its own value wherever a string is
expected (JSON, f-strings, ``==``), so the manifest and the fingerprints read as before.
"""
from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Any


class ResizeMethod(enum.StrEnum):
    """``tf.image.resize`` methods; the contract is BILINEAR."""

    BILINEAR = "bilinear"
    NEAREST = "nearest"
    BICUBIC = "bicubic"
    AREA = "area"
    LANCZOS3 = "lanczos3"


class ChannelOrder(enum.StrEnum):
    """Pixel channel order: RGB (the contract) or BGR (OpenCV's default)."""

    RGB = "RGB"
    BGR = "BGR"


class ValueRange(enum.StrEnum):
    """What an app feeds: 0..255 (the contract), 0..1 (divided by 255), or -1..1 (normalised by
    the app although the model normalises again)."""

    BYTE = "0-255"
    UNIT = "0-1"
    SIGNED = "-1-1"


class ClassWeights(enum.StrEnum):
    """Per-class loss weights: NONE (all ones) or BALANCED (``n / (classes * count)``)."""

    NONE = "none"
    BALANCED = "balanced"


@dataclass(frozen=True)
class Preprocessing:
    """How raw RGB pixels become the backbone's input.

    The exported models take float32 RGB in 0..255 at ``size``x``size`` and apply
    ``(x - mean) / std`` themselves, so apps only decode and resize.
    """

    size: int
    mean: float = 127.5
    std: float = 127.5
    resize_method: ResizeMethod = ResizeMethod.BILINEAR
    antialias: bool = False
    channel_order: ChannelOrder = ChannelOrder.RGB

    def __post_init__(self):
        object.__setattr__(self, "resize_method", ResizeMethod(self.resize_method))
        object.__setattr__(self, "channel_order", ChannelOrder(self.channel_order))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class BackboneSpec:
    """One row of the backbone catalog (``models/backbones.toml``) or a user's own graph."""

    name: str
    input_tensor: str
    bottleneck_tensor: str
    feature_size: int
    preprocessing: Preprocessing
    url: str | None = None
    sha256: str | None = None
    member: str | None = None
    local_path: str | None = None
    license: str = "unknown"
    notes: str = ""
    alternates: tuple[str, ...] = field(default_factory=tuple)

    @property
    def input_size(self) -> int:
        return self.preprocessing.size

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["alternates"] = list(self.alternates)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BackboneSpec":
        """Inverse of :meth:`to_dict` (the manifest stores resolved specs this way)."""
        d = dict(d)
        d["preprocessing"] = Preprocessing(**d["preprocessing"])
        d["alternates"] = tuple(d.get("alternates", ()))
        return cls(**d)


class QuantMode(enum.StrEnum):
    """TFLite variants written by the quantize stage (recipes in ``pipeline/quantize.py``).

    FLOAT32 plain conversion · FLOAT16 float16 weights · DYNAMIC int8 weights, float activations ·
    INT8 full-integer with float I/O · INT8_INT8_IO and INT8_UINT8_IO full-integer with integer
    I/O · INT16X8 16-bit activations, 8-bit weights.
    """

    FLOAT32 = "float32"
    FLOAT16 = "float16"
    DYNAMIC = "dynamic"
    INT8 = "int8"
    INT8_INT8_IO = "int8-int8"
    INT8_UINT8_IO = "int8-uint8"
    INT16X8 = "int16x8"


class TfjsMode(enum.StrEnum):
    """TF.js graph-model variants written by the tfjs stage (weights dtype)."""

    FLOAT32 = "float32"
    FLOAT16 = "float16"
    UINT8 = "uint8"


class ArtifactKind(enum.StrEnum):
    """What a runner takes: a SavedModel folder, a Keras file (``.keras``/``.h5``), a frozen
    GraphDef (``.pb``), a .tflite file or a TF.js model folder (graph or layers model)."""

    SAVEDMODEL = "savedmodel"
    KERAS = "keras"
    GRAPH = "frozen-graph"
    TFLITE = "tflite"
    TFJS = "tfjs"


class Runtime(enum.StrEnum):
    """Where the verify stage runs a model; ``pipeline.runners.REGISTRY`` maps each to its runner.

    TENSORFLOW runs the reference SavedModel and is not a ``--runtime`` choice. The ``-arm64`` ones are
    the Raspberry Pi's wheels under QEMU user-mode emulation; the ``chromium-`` ones run TF.js
    bundles in headless Chromium on that backend.
    """

    TENSORFLOW = "tensorflow"
    TFLITE_RUNTIME = "tflite-runtime"
    LITERT = "ai-edge-litert"
    MEDIAPIPE = "mediapipe-tasks"
    TFJS_WASM = "tfjs-wasm"
    TFLITE_RUNTIME_ARM64 = "tflite-runtime-arm64"
    LITERT_ARM64 = "ai-edge-litert-arm64"
    CHROMIUM_WASM = "chromium-wasm"
    CHROMIUM_WEBGL = "chromium-webgl"
    CHROMIUM_WEBGL_F16 = "chromium-webgl-f16"
    CHROMIUM_WEBGPU = "chromium-webgpu"

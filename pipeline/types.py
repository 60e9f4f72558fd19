"""Frozen types shared by every stage."""
from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Preprocessing:
    """How raw RGB pixels become the backbone's input.

    The exported models take float32 RGB in 0..255 at ``size``x``size`` and apply
    ``(x - mean) / std`` themselves, so apps only decode and resize.
    """

    size: int
    mean: float = 127.5
    std: float = 127.5
    resize_method: str = "bilinear"
    antialias: bool = False
    channel_order: str = "RGB"

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


class QuantMode(str, enum.Enum):
    """TFLite variants written by the quantize stage (see ``pipeline/quantize.py``)."""

    FLOAT32 = "float32"
    FLOAT16 = "float16"
    DYNAMIC = "dynamic"
    INT8 = "int8"
    INT8_INT8_IO = "int8-int8"
    INT8_UINT8_IO = "int8-uint8"
    INT16X8 = "int16x8"


class TfjsMode(str, enum.Enum):
    """TF.js graph-model variants written by the tfjs stage (weights dtype)."""

    FLOAT32 = "float32"
    FLOAT16 = "float16"
    UINT8 = "uint8"


class Runtime(str, enum.Enum):
    """Where a converted model is run by the verify stage."""

    SAVEDMODEL = "tensorflow"
    TFLITE_RUNTIME = "tflite-runtime"
    LITERT = "ai-edge-litert"
    TFJS_WASM = "tfjs-wasm"

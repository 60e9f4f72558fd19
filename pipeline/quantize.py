"""SavedModel → TFLite, one file per :class:`QuantMode`.

Modes (each a converter recipe registered below):
  float32  plain conversion, no optimisation; the reference for the other TFLite files.
  float16  weights stored as float16, computed in float32 (about half the size).
  dynamic  dynamic-range: int8 weights, activations quantised on the fly; float I/O.
  int8     full-integer: int8 weights and activations calibrated on the representative data
           (training split only, same preprocessing); only int8 builtin ops; float32 I/O so the
           model takes the same 0..255 input as every other variant.
  int8-int8   full-integer with int8 input and output tensors (for integer-only accelerators).
  int8-uint8  full-integer with uint8 input and output: the input scale comes out at 1.0 with zero
              point 0 for 0..255 calibration data, so an app feeds decoded pixels as they are.
  int16x8     16-bit activations, 8-bit weights: closer to float than int8, about int8's size;
              float32 I/O.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from pipeline.errors import ConversionError
from pipeline.rundir import atomic_write_bytes
from pipeline.types import QuantMode

_RECIPES: dict[QuantMode, Callable] = {}


def recipe(mode: QuantMode):
    def register(fn):
        _RECIPES[mode] = fn
        return fn

    return register


@recipe(QuantMode.FLOAT32)
def _float32(converter, representative):
    pass


@recipe(QuantMode.FLOAT16)
def _float16(converter, representative):
    import tensorflow as tf

    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.target_spec.supported_types = [tf.float16]


@recipe(QuantMode.DYNAMIC)
def _dynamic(converter, representative):
    import tensorflow as tf

    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    # Per-channel hybrid FULLY_CONNECTED is op version 12, which tflite-runtime 2.14 (and the
    # runtimes on many deployed devices) cannot load: "Didn't find op for builtin opcode
    # 'FULLY_CONNECTED' version '12'". Per-tensor dense weights keep the file loadable everywhere.
    converter._experimental_disable_per_channel_quantization_for_dense_layers = True


@recipe(QuantMode.INT8)
def _int8(converter, representative):
    import tensorflow as tf

    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]


def _full_integer(converter, representative, io_type):
    _int8(converter, representative)
    converter.inference_input_type = io_type
    converter.inference_output_type = io_type


@recipe(QuantMode.INT8_INT8_IO)
def _int8_int8_io(converter, representative):
    import tensorflow as tf

    _full_integer(converter, representative, tf.int8)


@recipe(QuantMode.INT8_UINT8_IO)
def _int8_uint8_io(converter, representative):
    import tensorflow as tf

    _full_integer(converter, representative, tf.uint8)


@recipe(QuantMode.INT16X8)
def _int16x8(converter, representative):
    import tensorflow as tf

    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [
        tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8
    ]


NEEDS_CALIBRATION = frozenset({QuantMode.INT8, QuantMode.INT8_INT8_IO, QuantMode.INT8_UINT8_IO, QuantMode.INT16X8})


def convert_tflite(
    saved_model_dir: Path, mode: QuantMode,
    representative_images: Callable[[], Iterable[np.ndarray]] | None = None,
) -> bytes:
    """Converts the SavedModel with one recipe and returns the .tflite bytes.

    Args:
        representative_images: yields float32 ``[1, H, W, 3]`` 0..255 batches; required for int8.

    Raises:
        ConversionError: the converter failed (its message is kept).
    """
    import tensorflow as tf

    if mode in NEEDS_CALIBRATION and representative_images is None:
        raise ConversionError("int8 quantisation needs representative images from the training split")
    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model_dir))

    def representative():
        for batch in representative_images():
            yield [np.asarray(batch, np.float32)]

    _RECIPES[mode](converter, representative)
    try:
        return converter.convert()
    except Exception as err:  # the converter raises ConverterError and assorted RuntimeErrors
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConversionError(f"TFLite {mode.value} conversion of {saved_model_dir} failed: {first}") from err


def write_tflite(path: Path, data: bytes) -> None:
    atomic_write_bytes(path, data)

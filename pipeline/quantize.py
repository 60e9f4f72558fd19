"""The quantize stage: SavedModel → TFLite, one file per :class:`QuantMode`.

:func:`quantize` is the stage as a function (every variant, each with its TFLite metadata);
:func:`convert_tflite` converts with one recipe and returns the bytes.

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

import hashlib
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from pipeline.console import log
from pipeline.errors import ConversionError
from pipeline.rundir import atomic_write_bytes
from pipeline.testhook import pause_point
from pipeline.types import Preprocessing, QuantMode
from pipeline.version import __version__

CALIBRATION_BATCH = 16  # images decoded at a time for the representative dataset

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


def calibration_sample(train_examples: Sequence, count: int) -> list[str]:
    """A fixed sample of the training split (never validation or test), spread over classes:
    the first ``count`` paths in the order of their SHA-1."""
    ordered = sorted(train_examples, key=lambda e: hashlib.sha1(e.path.encode()).hexdigest())
    return [e.path for e in ordered[:count]]


def quantize(
    saved_model_dir: Path, modes: Sequence[QuantMode], calibration: Sequence[str], prep: Preprocessing,
    labels: Sequence[str], contract: dict, backbone: str, out_dir: Path,
) -> dict[QuantMode, Path]:
    """Writes ``out_dir/<mode>.tflite`` for every mode, each carrying TFLite metadata (labels,
    normalisation, the preprocessing contract).

    Args:
        calibration: training images for the int8 and int16x8 recipes (decoded as the contract says).
        contract: ``preprocessing_contract(export/preprocessing.json)``, stored in every file.
        backbone: the backbone's name, for the metadata's description.

    Returns:
        The written file of each mode, in ``modes`` order.

    Raises:
        ConversionError: the converter or the metadata writer refused the model.
    """
    from pipeline.images import load_files
    from pipeline.metadata import with_metadata

    def representative():
        for k in range(0, len(calibration), CALIBRATION_BATCH):
            for img in load_files(calibration[k:k + CALIBRATION_BATCH], prep):
                yield img[None]

    written = {}
    for mode in modes:
        t0 = time.perf_counter()
        path = Path(out_dir) / f"{mode.value}.tflite"
        about = (f"{backbone} + retrained head, {len(labels)} classes, TFLite {mode.value}, by edgepipe "
                 f"{__version__}. Input float32 RGB 0..255 at {contract['size']}x{contract['size']}; "
                 "see preprocessing.json.")
        write_tflite(path, with_metadata(convert_tflite(saved_model_dir, mode, representative), list(labels),
                                         contract, f"edgepipe {backbone} {mode.value}", about))
        log.info(f"quantize: {path.name} {path.stat().st_size / 1e6:.2f} MB in {time.perf_counter() - t0:.1f} s")
        pause_point("quantize")
        written[mode] = path
    return written

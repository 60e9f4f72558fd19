"""The quantize stage: SavedModel → TFLite, one file per :class:`QuantMode`.

:func:`quantize` is the stage as a function (every variant, each with its TFLite metadata);
:func:`convert_tflite` converts with one recipe and returns the bytes.

Every file but int16x8 (:data:`DYNAMIC_BATCH`) takes a fixed batch of one image,
``[1, size, size, 3]``: the shape apps and the Pi bundle call it with. With a dynamic batch dimension tflite-runtime 2.14 runs the model without
XNNPACK (measured, demo model, one thread: 10.97 ms dynamic, 1.15 ms fixed); runtimes still
resize the input for batched work (verify does), with outputs bit-identical to single calls.

The integer variants share one calibration: the representative images run once through the
float model (the calibrate-only step TensorFlow's quantization debugger uses) and int8 with
float, int8 and uint8 I/O are quantised from that calibrated model, with outputs identical to
converting each from scratch. int16x8 (another quantiser) converts on its own, in a second
process beside the others when there is a second core.

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
import os
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


# Variants whose reference kernels run faster with a dynamic batch dimension: int16x8 was 10-20 %
# slower with a fixed one in both runtimes, in four back-to-back A/B runs here (0.25_224, one
# thread: 57/45, 45/41, 48/45, 56/47 ms fixed/dynamic). Every other variant is as fast or faster
# fixed (tflite-runtime float32 4.0 vs 25.4 ms), so it gets the shape apps call it with.
DYNAMIC_BATCH = frozenset({QuantMode.INT16X8})

INTEGER_IO = {QuantMode.INT8: "float32", QuantMode.INT8_INT8_IO: "int8", QuantMode.INT8_UINT8_IO: "uint8"}


class Source:
    """The SavedModel, loaded once, as the converter's input with a fixed batch of one.

    The serving signature is traced again with a ``[1, size, size, 3]`` input, so every shape in
    the converted graph is static.
    """

    def __init__(self, saved_model_dir: Path):
        import tensorflow as tf

        self.path = Path(saved_model_dir)
        self.loaded = tf.saved_model.load(str(self.path))
        serve = self.loaded.signatures["serving_default"]
        (name, spec), = serve.structured_input_signature[1].items()
        fixed_shape = [1, *spec.shape[1:]]

        @tf.function(input_signature=[tf.TensorSpec(fixed_shape, spec.dtype, name=name)])
        def fixed(images):
            return serve(**{name: images})

        self.function = fixed.get_concrete_function()

    def converter(self):
        import tensorflow as tf

        return tf.lite.TFLiteConverter.from_concrete_functions([self.function], self.loaded)


def _converted(converter, what: str) -> bytes:
    try:
        return converter.convert()
    except Exception as err:  # the converter raises ConverterError and assorted RuntimeErrors
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConversionError(f"TFLite {what} failed: {first}") from err


def _representative(representative_images):
    def representative():
        for batch in representative_images():
            yield [np.asarray(batch, np.float32)]

    return representative


def convert_tflite(
    source: Source | Path, mode: QuantMode,
    representative_images: Callable[[], Iterable[np.ndarray]] | None = None,
) -> bytes:
    """Converts the SavedModel (a :class:`Source` or its folder) with one recipe; returns the
    .tflite bytes.

    Args:
        representative_images: yields float32 ``[1, H, W, 3]`` 0..255 batches; required for int8.

    Raises:
        ConversionError: the converter failed (its message is kept).
    """
    if mode in NEEDS_CALIBRATION and representative_images is None:
        raise ConversionError("int8 quantisation needs representative images from the training split")
    if mode in DYNAMIC_BATCH:
        import tensorflow as tf

        path = source.path if isinstance(source, Source) else Path(source)
        converter, source = tf.lite.TFLiteConverter.from_saved_model(str(path)), None
    else:
        source = source if isinstance(source, Source) else Source(source)
        converter = source.converter()
        path = source.path
    _RECIPES[mode](converter, _representative(representative_images) if representative_images else None)
    return _converted(converter, f"{mode.value} conversion of {path}")


def calibrate(source: Source, representative_images: Callable[[], Iterable[np.ndarray]]) -> bytes:
    """The float model with every tensor's range recorded on the representative images (the int8
    recipe's calibration, without its quantisation step)."""
    converter = source.converter()
    _int8(converter, _representative(representative_images))
    converter._experimental_calibrate_only = True  # as tf.lite.experimental.QuantizationDebugger does
    return _converted(converter, f"int8 calibration of {source.path}")


def quantize_calibrated(calibrated: bytes, mode: QuantMode) -> bytes:
    """An int8 variant (float, int8 or uint8 I/O) from :func:`calibrate`'s model: the same
    quantiser call the converter makes after calibrating."""
    import tensorflow as tf
    from tensorflow.lite.python import convert as tfl_convert
    from tensorflow.lite.python import lite as tfl_lite

    io = getattr(tf, INTEGER_IO[mode])
    try:
        model = tfl_convert.mlir_quantize(calibrated, False, input_data_type=io, output_data_type=io)
        return tfl_lite._deduplicate_readonly_buffers(model)
    except Exception as err:
        raise ConversionError(f"TFLite {mode.value} quantisation from the calibrated model failed: {err}") from err


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
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from pipeline.metadata import with_metadata

    t_all = time.perf_counter()
    modes = list(modes)

    def finish(mode: QuantMode, data: bytes, seconds: float) -> Path:
        path = Path(out_dir) / f"{mode.value}.tflite"
        about = (f"{backbone} + retrained head, {len(labels)} classes, TFLite {mode.value}, by edgepipe "
                 f"{__version__}. Input float32 RGB 0..255 at {contract['size']}x{contract['size']}"
                 f"{'' if mode in DYNAMIC_BATCH else ', batch 1'}; "
                 "see preprocessing.json.")
        write_tflite(path, with_metadata(data, list(labels), contract, f"edgepipe {backbone} {mode.value}", about))
        log.info(f"quantize: {path.name} {path.stat().st_size / 1e6:.2f} MB in {seconds:.1f} s")
        pause_point("quantize")
        return path

    # int16x8 has its own quantiser and calibration; beside the rest when there is a core for it.
    aside = QuantMode.INT16X8 in modes and len(modes) > 1 and (os.cpu_count() or 1) > 1
    pool = ProcessPoolExecutor(1, mp_context=get_context("spawn")) if aside else None
    try:
        pending = pool.submit(_convert_alone, str(saved_model_dir), QuantMode.INT16X8, list(calibration),
                              prep) if aside else None
        source = Source(saved_model_dir)
        representative = _images(calibration, prep)
        calibrated, written = None, {}
        for mode in modes:
            if mode is QuantMode.INT16X8 and aside:
                continue
            t0 = time.perf_counter()
            if mode in INTEGER_IO:
                if calibrated is None:
                    calibrated = calibrate(source, representative)
                    log.info(f"quantize: calibrated on {len(calibration)} training images in "
                             f"{time.perf_counter() - t0:.1f} s")
                    t0 = time.perf_counter()
                data = quantize_calibrated(calibrated, mode)
            else:
                data = convert_tflite(source, mode, representative)
            written[mode] = finish(mode, data, time.perf_counter() - t0)
        if pending is not None:
            t0 = time.perf_counter()
            data, seconds = pending.result()
            written[QuantMode.INT16X8] = finish(QuantMode.INT16X8, data, seconds)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    log.info(f"quantize: {len(modes)} variants in {time.perf_counter() - t_all:.1f} s")
    return {mode: written[mode] for mode in modes}


def _images(calibration: Sequence[str], prep: Preprocessing):
    """The representative dataset: the calibration images, decoded as the contract says."""
    from pipeline.images import load_files

    def representative():
        for k in range(0, len(calibration), CALIBRATION_BATCH):
            for img in load_files(calibration[k:k + CALIBRATION_BATCH], prep):
                yield img[None]

    return representative


def _convert_alone(saved_model_dir: str, mode: QuantMode, calibration: list[str], prep: Preprocessing):
    """One conversion in a process of its own: (bytes, seconds)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    t0 = time.perf_counter()
    data = convert_tflite(Path(saved_model_dir), mode, _images(calibration, prep))
    return data, time.perf_counter() - t0

"""Empirical bias correction of an int8 TFLite file: the mean error each quantised layer adds to its
output channels, measured against the float32 file on calibration images, taken out of its bias.

Rounding weights and activations to int8 does not only add noise: it shifts the mean of a layer's
output channels, and the shifts add up from layer to layer. MobileNet's depthwise layers, with 9
weights per channel, shift most: on the MobileNet v1 1.0_224 graph and flowers8, the int8 file's
``Conv2d_1_depthwise`` channels are off by up to 0.25 on average (activations in 0..6) and the last
pointwise layer's by up to 0.42. This is the empirical bias correction of Nagel et al., "Data-Free
Quantization Through Weight Equalization and Bias Correction" (ICCV 2019, section 4.2), applied to
the file TensorFlow's converter wrote: the layers are corrected in order, each measured with every
earlier one already corrected, so a layer's correction also takes out what reaches it from above.
The file keeps its size, its ops and its speed; only bias values change.

Dynamic-range files are corrected the same way: their ops keep int8 weights and quantise their
inputs at run time, but add a float32 bias to a float32 output, and the mean error of the int8
weights goes out of that bias.

The error is measured only where neither output is clipped, by the fused activation (ReLU6's 0 and 6)
or by the int8 range: there the activation is the identity, so the mean error is the bias's; where
one side is clipped it says nothing of the bias (using every value corrected flowers8's int8 file to
0.9938 test agreement, against 1.0000 this way).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable

import numpy as np

WEIGHTED_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
# The fused activations whose output is the identity inside a range: schema ActivationFunctionType
# NONE, RELU, RELU_N1_TO_1, RELU6. A layer with another (TANH, SIGN_BIT) is left as it is.
IDENTITY_RANGE = {0: (-np.inf, np.inf), 1: (0.0, np.inf), 2: (-1.0, 1.0), 3: (0.0, 6.0)}
POSITIONS = 64      # output positions sampled per image and layer: memory is images × POSITIONS × channels
MIN_VALUES = 16     # a channel with fewer unclipped values keeps its bias


class BiasCorrectionError(ValueError):
    """The two files do not have the same layers, so one cannot be measured against the other."""


@dataclass(frozen=True)
class LayerCorrection:
    """What the correction did to one layer.

    Attributes:
        tensor: the layer's output tensor (as ``denylisted_nodes`` names it).
        op: its TFLite op.
        channels: output channels; ``corrected`` of them had enough unclipped values to measure.
        max_error: the largest channel's mean error before the correction, in the output's units.
        max_steps: the same in steps of the output's int8 scale; None for a float32 output.
    """

    tensor: str
    op: str
    channels: int
    corrected: int
    max_error: float
    max_steps: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def correct_biases(quantized: bytes, float32: bytes, images: Iterable[np.ndarray],
                   positions: int = POSITIONS) -> tuple[bytes, list[LayerCorrection]]:
    """``quantized`` (an int8 or dynamic-range file, from the same SavedModel as ``float32``) with
    the bias of each CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED with int8 weights corrected;
    layers left in float are passed over.

    Args:
        images: calibration images, each as the float32 file's input takes it (float32, batch 1).
        positions: output positions sampled per image and layer (every one for smaller outputs).

    Returns:
        The corrected file's bytes and, per corrected layer, what was measured.

    Raises:
        BiasCorrectionError: the files' weighted layers differ in order, kind or shape.
    """
    from tensorflow.lite.tools import flatbuffer_utils as fbu

    images = [np.asarray(img, np.float32) for img in images]
    model, reference = fbu.convert_bytearray_to_object(quantized), fbu.convert_bytearray_to_object(float32)
    _inline_buffers(model, quantized)
    layers, twins = _weighted(model), _weighted(reference)
    _check_twins(model, layers, reference, twins)
    tensors = model.subgraphs[0].tensors
    todo = [k for k, (_, op) in enumerate(layers) if _correctable(tensors, op)]
    rng = np.random.default_rng(0)
    rows: dict[int, list[np.ndarray]] = {k: [] for k in todo}
    expected: dict[int, list[np.ndarray]] = {k: [] for k in todo}
    for values in _outputs(float32, images, [twins[k][1].outputs[0] for k in todo]):
        for k, v in zip(todo, values):
            flat = v.reshape(-1, v.shape[-1])
            pick = rng.choice(len(flat), positions, replace=False) if len(flat) > positions else np.arange(len(flat))
            rows[k].append(pick)
            expected[k].append(flat[pick])
    done = []
    for k in todo:
        _, op = layers[k]
        out = tensors[op.outputs[0]]
        got = [v.reshape(-1, v.shape[-1])[pick] for (v,), pick in
               zip(_outputs(bytes(fbu.convert_object_to_bytearray(model)), images, [op.outputs[0]]), rows[k])]
        error, counts, step = _mean_error(np.concatenate(got), np.concatenate(expected[k]), out, _activation(op))
        measured = counts >= MIN_VALUES
        _shift_bias(model, op, np.where(measured, error, 0.0))
        worst = float(np.max(np.abs(error[measured]))) if measured.any() else 0.0
        done.append(LayerCorrection(_name(out), layers[k][0], len(error), int(measured.sum()), worst,
                                    None if step is None else worst / step))
    return bytes(fbu.convert_object_to_bytearray(model)), done


def _inline_buffers(model, data: bytes) -> None:
    """Moves buffers stored after the flatbuffer (``offset``/``size``, as ai-edge-quantizer writes
    some files) into it: written again, the flatbuffer would move and those offsets point elsewhere."""
    for buffer in model.buffers:
        if buffer.offset and buffer.offset > 1:
            buffer.data = np.frombuffer(data[buffer.offset:buffer.offset + buffer.size], np.uint8)
            buffer.offset, buffer.size = 0, 0


def _weighted(model) -> list[tuple[str, object]]:
    """The model's weighted ops in execution order, with their op names."""
    from tensorflow.lite.tools import flatbuffer_utils as fbu

    found = []
    for op in model.subgraphs[0].operators:
        name = fbu.opcode_to_name(model, op.opcodeIndex)
        if name in WEIGHTED_OPS:
            found.append((name, op))
    return found


def _check_twins(model, layers, reference, twins) -> None:
    q, f = model.subgraphs[0].tensors, reference.subgraphs[0].tensors
    if [n for n, _ in layers] != [n for n, _ in twins]:
        raise BiasCorrectionError(f"the int8 file's weighted layers ({len(layers)}) are not the float32 file's "
                                  f"({len(twins)}) in the same order")
    for (name, op), (_, twin) in zip(layers, twins):
        if list(q[op.outputs[0]].shape) != list(f[twin.outputs[0]].shape):
            raise BiasCorrectionError(f"{name} {_name(q[op.outputs[0]])} has shape {list(q[op.outputs[0]].shape)} "
                                      f"in the int8 file and {list(f[twin.outputs[0]].shape)} in the float32 file")


def _is_type(tensor, kind: str) -> bool:
    from tensorflow.lite.python import schema_py_generated as schema

    return tensor.type == getattr(schema.TensorType, kind)


def _correctable(tensors, op) -> bool:
    """A weighted op with a bias and an activation that is the identity somewhere, either quantised
    (int32 bias, int8 output) or dynamic-range (int8 weights, float32 bias and output)."""
    if len(op.inputs) < 3 or op.inputs[2] < 0 or _activation(op) not in IDENTITY_RANGE:
        return False
    weights, bias, out = (tensors[i] for i in (op.inputs[1], op.inputs[2], op.outputs[0]))
    return (_is_type(bias, "INT32") and _is_type(out, "INT8")) or \
        (_is_type(weights, "INT8") and _is_type(bias, "FLOAT32") and _is_type(out, "FLOAT32"))


def _activation(op) -> int:
    options = op.builtinOptions
    return getattr(options, "fusedActivationFunction", 0) if options is not None else 0


def _name(tensor) -> str:
    name = tensor.name
    return name.decode() if isinstance(name, bytes) else name


def _outputs(data: bytes, images: list[np.ndarray], indices: list[int]):
    """Per image, the float values of the tensors at ``indices`` (dequantised when integer), from
    ai-edge-litert's kernels as users run them (XNNPACK, which keeps every tensor when asked: 2.3 ms
    per image for the 1.0_224 int8 file against 12 ms with TFLite's own kernels)."""
    import warnings

    from ai_edge_litert.interpreter import Interpreter

    from pipeline.runners.tflite import dequantise, quantise

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "preserve_all_tensors is intended for debugging": as here
        interpreter = Interpreter(model_content=data, experimental_preserve_all_tensors=True)
    interpreter.allocate_tensors()
    feed = interpreter.get_input_details()[0]
    details = {d["index"]: d for d in interpreter.get_tensor_details()}
    for img in images:
        interpreter.set_tensor(feed["index"], quantise(img.reshape(feed["shape"]), feed))
        interpreter.invoke()
        yield [np.array(dequantise(interpreter.get_tensor(i), details[i]), np.float32) for i in indices]


def _mean_error(got: np.ndarray, expected: np.ndarray, out, activation: int) -> tuple[np.ndarray, np.ndarray, float | None]:
    """Per channel: the mean of ``got - expected`` where neither is clipped, the number of such
    values, and the output's int8 scale (None for a float output)."""
    low, high = IDENTITY_RANGE[activation]
    scale = None
    if out.quantization is not None and out.quantization.scale is not None and len(out.quantization.scale):
        scale, zero = float(out.quantization.scale[0]), int(out.quantization.zeroPoint[0])
        # Half a step inside the int8 range's ends: a value there may have been clipped to it.
        low, high = max(low, (-128 - zero + 0.5) * scale), min(high, (127 - zero - 0.5) * scale)
    inside = (got > low) & (got < high) & (expected > low) & (expected < high)
    counts = inside.sum(0)
    error = np.where(inside, got - expected, 0.0).sum(0) / np.maximum(counts, 1)
    return error.astype(np.float64), counts, scale


def _shift_bias(model, op, error: np.ndarray) -> None:
    """Takes ``error`` (per output channel, in the output's units) out of the op's bias: an int32
    one in steps of its own scale, a float32 one as it is. A bias buffer shared with another tensor
    is copied first."""
    from tensorflow.lite.python import schema_py_generated as schema

    tensors = model.subgraphs[0].tensors
    bias = tensors[op.inputs[2]]
    raw = np.asarray(model.buffers[bias.buffer].data, np.uint8).tobytes()
    if _is_type(bias, "FLOAT32"):
        values = (np.frombuffer(raw, np.float32) - error).astype(np.float32)
    else:
        scale = np.asarray(bias.quantization.scale, np.float64)
        info = np.iinfo(np.int32)
        values = np.clip(np.frombuffer(raw, np.int32).astype(np.int64) - np.round(error / scale).astype(np.int64),
                         info.min, info.max).astype(np.int32)
    if sum(t.buffer == bias.buffer for t in tensors) > 1:
        buffer = schema.BufferT()
        model.buffers.append(buffer)
        bias.buffer = len(model.buffers) - 1
    model.buffers[bias.buffer].data = np.frombuffer(values.tobytes(), np.uint8)

"""Bias correction (pipeline/bias_correction.py) on the real MobileNet v1 0.25_224 graph as an
ImageNet classifier (its 1001 logits, no head: nothing to train) and real flower photos: the int8
file's layers shift their outputs' means, and the corrected file has them taken out, keeps every
other byte of meaning, and agrees with the SavedModel more."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import pipeline.repair as repair
from pipeline.bias_correction import BiasCorrectionError, _mean_error, correct_biases
from pipeline.dataset import Example
from pipeline.quantize import Source, _images, calibrate, convert_tflite
from pipeline.types import QuantMode
from tests.helpers.drift import drifting_savedmodel
from tests.helpers.world import FLOWERS, MIRROR, needs_shared

LOGITS = "MobilenetV1/Predictions/Reshape:0"


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    needs_shared(MIRROR)
    needs_shared(FLOWERS)
    from pipeline.catalog import get_backbone
    from pipeline.export import export_savedmodel
    from pipeline.fetch import fetch
    from pipeline.graph import load_graph_def

    root = tmp_path_factory.mktemp("bias")
    spec = get_backbone("mobilenet_v1_0.25_224")
    graph = fetch(spec, cache_dir=root / "cache", mirror=str(MIRROR), progress=False).graph_path
    logits = dataclasses.replace(spec, bottleneck_tensor=LOGITS, feature_size=1001)
    sm = export_savedmodel(load_graph_def(graph), logits, [], [str(k) for k in range(1001)], root / "export")
    train = sorted(str(p) for p in (FLOWERS / "train").rglob("*.jpg"))
    test = sorted(str(p) for p in (FLOWERS / "test").rglob("*.jpg"))
    source, prep = Source(sm), spec.preprocessing
    calibration = train[::15]  # 32 photos, every class
    float32 = convert_tflite(source, QuantMode.FLOAT32)
    plain = repair.quantize_int8(calibrate(source, _images(calibration, prep)))
    judge = repair.Judge(sm, [Example(p, 0, "") for p in test[::2]], prep, root / "test", 1001, labelled=False)
    yield dict(source=source, prep=prep, calibration=calibration, float32=float32, plain=plain, judge=judge,
               images=[np.asarray(x, np.float32) for x in _images(calibration, prep)()])
    judge.close()


def _layer_errors(data: bytes, float32: bytes, images) -> list[float]:
    """Each weighted layer's largest channel mean error (unclipped values) in steps of its scale."""
    from tensorflow.lite.tools import flatbuffer_utils as fbu

    from pipeline.bias_correction import _activation, _outputs, _weighted

    model, reference = fbu.convert_bytearray_to_object(data), fbu.convert_bytearray_to_object(float32)
    layers, twins = _weighted(model), _weighted(reference)
    tensors = model.subgraphs[0].tensors
    got = list(zip(*_outputs(data, images, [op.outputs[0] for _, op in layers])))
    expected = list(zip(*_outputs(float32, images, [op.outputs[0] for _, op in twins])))
    steps = []
    for k, (_, op) in enumerate(layers):
        c = got[k][0].shape[-1]
        error, counts, scale = _mean_error(np.concatenate(got[k]).reshape(-1, c), np.concatenate(expected[k]).reshape(-1, c),
                                           tensors[op.outputs[0]], _activation(op))
        steps.append(float(np.max(np.abs(error[counts >= 16]))) / scale)
    return steps


def test_each_layer_s_mean_error_is_taken_out_of_its_bias_and_nothing_else_changes(imagenet):
    from tensorflow.lite.tools import flatbuffer_utils as fbu

    fixed, layers = correct_biases(imagenet["plain"], imagenet["float32"], imagenet["images"])
    assert len(layers) == 28 and [c.op for c in layers[:3]] == ["CONV_2D", "DEPTHWISE_CONV_2D", "CONV_2D"]
    assert layers[-1].op == "CONV_2D" and "Conv2d_1c_1x1" in layers[-1].tensor  # the logits: no activation
    assert max(c.max_steps for c in layers) > 5  # int8 shifts some channel by more than 5 steps on average

    before = _layer_errors(imagenet["plain"], imagenet["float32"], imagenet["images"])
    after = _layer_errors(fixed, imagenet["float32"], imagenet["images"])
    # Measured again on every output position (the correction sampled 64 per image): the worst
    # channel's mean error of each layer is within a step, or at least 80 % smaller (81 steps → 4
    # for the last pointwise layer).
    assert max(before) > 20 and all(a <= max(1.0, 0.2 * b) for a, b in zip(after, before)), (before, after)

    # Only int32 bias values changed: same ops, tensors, quantisation and every other buffer.
    a, b = fbu.convert_bytearray_to_object(imagenet["plain"]), fbu.convert_bytearray_to_object(fixed)
    ta, tb = a.subgraphs[0].tensors, b.subgraphs[0].tensors
    assert len(ta) == len(tb) and len(a.subgraphs[0].operators) == len(b.subgraphs[0].operators)
    biases = {op.inputs[2] for op in a.subgraphs[0].operators if len(op.inputs) > 2 and op.inputs[2] >= 0}
    changed = set()
    for k, (x, y) in enumerate(zip(ta, tb)):
        assert x.shape.tolist() == y.shape.tolist() and x.type == y.type
        if not np.array_equal(np.asarray(a.buffers[x.buffer].data), np.asarray(b.buffers[y.buffer].data)):
            changed.add(k)
    assert changed and changed <= biases


def test_the_corrected_file_agrees_with_the_savedmodel_more_on_photos_it_never_saw(imagenet):
    fixed, _ = correct_biases(imagenet["plain"], imagenet["float32"], imagenet["images"])
    plain, _ = imagenet["judge"].score(imagenet["plain"])
    corrected, _ = imagenet["judge"].score(fixed)
    # Measured: agreement 0.775 -> 0.9375 of 80 photos over 1,001 classes, KL 0.55 -> 0.33.
    assert corrected.kl < 0.7 * plain.kl, (plain.kl, corrected.kl)
    assert corrected.agreement >= plain.agreement + 0.1, (plain.agreement, corrected.agreement)
    assert abs(len(fixed) - len(imagenet["plain"])) < 1024


def test_layers_left_in_float_are_passed_over(imagenet):
    cal = calibrate(imagenet["source"], _images(imagenet["calibration"], imagenet["prep"]))
    ranking = repair.layer_errors(cal, _images(imagenet["calibration"][:4], imagenet["prep"]))
    kept = [r["tensor"] for r in ranking[:2]]
    fixed, layers = correct_biases(repair.quantize_int8(cal, kept), imagenet["float32"], imagenet["images"])
    assert len(layers) == 26 and not {c.tensor for c in layers} & set(kept)
    assert imagenet["judge"].score(fixed)[0].agreement > 0


def test_files_of_different_models_are_refused_in_one_line(imagenet, tmp_path):
    other = convert_tflite(Source(drifting_savedmodel(tmp_path / "sm")), QuantMode.FLOAT32)
    with pytest.raises(BiasCorrectionError, match=r"^the int8 file's weighted layers \(28\) are not the float32 "
                                                  r"file's \(4\) in the same order$"):
        correct_biases(imagenet["plain"], other, imagenet["images"][:1])


def test_only_values_neither_side_clipped_count():
    """ReLU6's 0 and 6 (and the int8 range's ends) clip: there the difference says nothing of the bias."""

    class Out:
        class quantization:
            scale, zeroPoint = [6 / 255], [-128]

    got = np.array([[0.0, 1.1], [3.2, 6.0], [2.1, 0.0]])
    expected = np.array([[0.5, 1.0], [3.0, 6.0], [2.0, 0.3]])
    error, counts, scale = _mean_error(got, expected, Out, activation=3)
    assert counts.tolist() == [2, 1] and scale == 6 / 255
    np.testing.assert_allclose(error, [0.15, 0.1])  # channel 0: (0.2 + 0.1) / 2, its clipped 0 left out


def test_the_repair_tries_bias_correction_before_any_float_layer(imagenet):
    """On this network bias correction alone is the best file without float layers, and the
    float-layer attempts after it are bias-corrected too."""
    cal = calibrate(imagenet["source"], _images(imagenet["calibration"], imagenet["prep"]))
    result = repair.repair_int8(imagenet["source"], cal, imagenet["calibration"], imagenet["calibration"],
                                imagenet["prep"], imagenet["judge"], repair.Goal(1.01, None, len(imagenet["plain"]) + 64),
                                None, imagenet["float32"])
    steps = [a.step for a in result.attempts]
    assert steps[:3] == ["plain int8", "per-tensor weights", "bias correction"], steps
    corrected = result.attempts[2]
    assert corrected.bias_corrected and corrected.validation_kl < result.attempts[0].validation_kl
    assert steps[3:] == ["1 layer(s) in float, bias-corrected"] and result.attempts[3].bias_corrected
    assert len(result.corrections) == 28 and result.to_dict()["bias_correction"][0]["tensor"].endswith("Conv2d_0/Relu6")
    assert not result.reached and result.reason.startswith("stopped at the size limit")


def test_a_dynamic_range_file_is_corrected_in_its_float_biases(imagenet):
    """Dynamic range keeps int8 weights and a float32 bias: the weights' mean error goes out of it."""
    plain = convert_tflite(imagenet["source"], QuantMode.DYNAMIC)
    fixed, layers = correct_biases(plain, imagenet["float32"], imagenet["images"])
    assert len(layers) == 19 and all(c.max_steps is None for c in layers)  # the ops with 1,024 weights or more
    before, after = imagenet["judge"].score(plain)[0], imagenet["judge"].score(fixed)[0]
    # Measured: agreement 0.85 -> 0.9625, KL 0.112 -> 0.0043.
    assert after.kl < 0.2 * before.kl and after.agreement >= before.agreement + 0.05, (before, after)
    assert abs(len(fixed) - len(plain)) < 1024

    # ai-edge-quantizer's files (the repair's, with layers in float) keep some buffers after the
    # flatbuffer, at offsets that a rewritten file would break ("out of range offset").
    one_float = repair.quantize_dynamic(imagenet["float32"], repair.dynamic_layers(imagenet["float32"])[:1])
    fixed, layers = correct_biases(one_float, imagenet["float32"], imagenet["images"])
    assert len(layers) == 18 and imagenet["judge"].score(fixed)[0].kl < 0.2 * imagenet["judge"].score(one_float)[0].kl

    result = repair.repair_dynamic(imagenet["float32"], plain, imagenet["judge"], repair.Goal(0.95, None, 10 ** 8), None,
                                   imagenet["calibration"], imagenet["prep"])
    assert [a.step for a in result.attempts] == ["plain dynamic-range", "ai-edge-quantizer's dynamic-range recipe",
                                                 "bias correction"]
    assert result.reached and result.chosen.bias_corrected and result.chosen.float_layers == []
    assert result.reason == "bias correction meets the target with every layer quantised"

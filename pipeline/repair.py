"""Repairing an int8 or dynamic-range TFLite file that drifts from its SavedModel: take each
layer's mean error out of its bias, then keep the layers that still drift in float.

:func:`repair_int8` is the int8 search, one attempt after another, each a whole .tflite file scored
in ai-edge-litert against the SavedModel on the **validation** split (never the test split):

1. the plain int8 file, as the quantize stage wrote it;
2. what costs no float layers: calibrating on :data:`MORE_CALIBRATION` times as many training
   images, per-tensor instead of per-channel weights, and bias correction (each layer's mean error
   against the float32 file on the calibration images taken out of its int32 bias,
   :mod:`pipeline.bias_correction`); each is kept only when it scores better, and a kept bias
   correction is made again on every file the next steps try;
3. TensorFlow Lite's quantization debugger (``tf.lite.experimental.QuantizationDebugger``) on the
   calibration images ranks the quantised layers by their error in steps of their own scale
   (RMSE / scale, as the debugger's guide does), and the layers are left in float one at a time,
   worst first, with the same calibration and quantiser as the plain file (``denylisted_nodes``),
   until the file reaches its target or grows past the size limit;
4. once there, each float layer but the last is put back to int8 if the target still holds and the
   file agrees on validation at least as well without it.

:func:`repair_dynamic` does the same for dynamic range, whose single layers TensorFlow's converter
cannot leave in float: ai-edge-quantizer makes those files, and with nothing calibrated there is no
debugger, so layers are ranked by the drift of a file with each one alone quantised. Its bias
correction measures on the calibration images too, and corrects float32 biases.

Why bias correction first: on the MobileNet v1 1.0_224 graph (flowers8) it alone takes the int8
file from 0.9688 to 1.0000 test agreement at the plain file's size and speed, where the best single
float layer reached 0.9875 and no set of float layers smaller than the float16 file did better.

An attempt meets the :class:`Goal` when its top-1 agreement reaches the target and its accuracy
is at most ``max_accuracy_drop`` below the SavedModel's. The test split is scored for the report
only (``test_agreement``), as is the latency of single-image calls.

Why TensorFlow's debugger and quantiser for int8: the repaired file comes from the same calibration
and the same MLIR quantiser as the plain int8 one, so the only difference between them is the layers
kept in float. ai-edge-quantizer's own default dynamic-range recipe agreed 0.921 on validation
against TensorFlow's 0.952 (Caltech-101, mobilenet_v1_0.25_224); its legacy recipe, used here,
matches TensorFlow's (0.950).
"""
from __future__ import annotations

import csv
import io
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

import pipeline.quantize as quantize
from pipeline.bias_correction import WEIGHTED_OPS, BiasCorrectionError
from pipeline.console import log
from pipeline.types import Preprocessing, QuantMode
from pipeline.verify import ACCURACY_DROP_P, loss_p

DEFAULT_TARGET = 0.99     # the target agreement when float16 does better (or was not built)
MORE_CALIBRATION = 4      # the "more calibration images" attempt: this many times the run's count
DEBUG_IMAGES = 100        # calibration images the debugger runs for its per-layer errors
BIAS_IMAGES = 100         # calibration images bias correction measures each layer's mean error on
FLIPS_TO_SEE = 3          # validation flips the target allows, below which the split is too small to tell
SEE_IMAGES = 1000         # validation inputs (photos and their augmented copies) the search wants at least:
#                           a 1 % flip rate shows as 10 flips. Copies of one photo are alike, so they
#                           count for less than photos: 6 copies of flowers8's 49 validation photos (343
#                           inputs) show 3 flips of an int8 file that flips 5 of 160 test photos, 15 copies
#                           (784) show 12.
MAX_COPIES = 15           # augmented copies of each validation image, at most, when there are fewer
LATENCY_RUNS = 20         # single-image calls timed per attempt (one thread, after a warm-up)
REPAIRED = {QuantMode.INT8: "int8-repaired", QuantMode.DYNAMIC: "dynamic-repaired"}  # each repairable mode's variant
MIN_DYNAMIC_WEIGHTS = 1024  # weighted ops (WEIGHTED_OPS) dynamic-range quantisation touches have this many weights


@dataclass(frozen=True)
class Goal:
    """What a repaired file must reach on the validation split.

    Attributes:
        agreement: top-1 agreement with the SavedModel.
        max_accuracy_drop: accuracy at most this far (a fraction: 0.01 is one point) below the
            SavedModel's; None when the images have no labels.
        max_size_bytes: the search stops when a file grows past this.
    """

    agreement: float
    max_accuracy_drop: float | None
    max_size_bytes: int


@dataclass
class Score:
    agreement: float
    accuracy: float | None
    kl: float
    reference_accuracy: float | None
    lost: int = 0    # images the reference gets right and this file wrong
    gained: int = 0  # and the other way round

    def meets(self, goal: Goal) -> bool:
        drop_ok = (goal.max_accuracy_drop is None or self.accuracy is None
                   or self.reference_accuracy - self.accuracy <= goal.max_accuracy_drop + 1e-9)
        return self.agreement >= goal.agreement and drop_ok

    def key(self, goal: Goal) -> tuple:
        """Ordering of attempts: meeting the goal, then agreement, then the smaller drift."""
        return (self.meets(goal), self.agreement, -(self.kl))


@dataclass
class Attempt:
    """One file the search tried, with its figures."""

    step: str
    float_layers: list[str]
    calibration_images: int
    per_channel: bool
    size_bytes: int
    validation_agreement: float
    validation_accuracy: float | None
    validation_kl: float
    met: bool
    kept: bool = False
    test_agreement: float | None = None
    test_accuracy: float | None = None
    latency_ms: float | None = None
    bias_corrected: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RepairResult:
    """What :func:`repair_int8` found.

    Attributes:
        model: the chosen file's bytes (no metadata yet), or None when the goal was missed.
        chosen: its attempt; when the goal was missed, the best attempt (not written).
        reason: why the search ended, one line.
    """

    mode: QuantMode
    goal: Goal
    attempts: list[Attempt]
    chosen: Attempt | None
    model: bytes | None
    reason: str
    validation_images: int = 0
    reference: dict = field(default_factory=dict)
    layers: list[dict] = field(default_factory=list)  # the ranking, worst first
    corrections: list[dict] = field(default_factory=list)  # what bias correction measured, per layer

    @property
    def reached(self) -> bool:
        return self.model is not None

    def to_dict(self) -> dict:
        return {"mode": self.mode.value, "variant": REPAIRED[self.mode], "reached": self.reached,
                "reason": self.reason, "goal": asdict(self.goal), "validation_images": self.validation_images,
                "reference": self.reference, "chosen": self.chosen.to_dict() if self.chosen else None,
                "attempts": [a.to_dict() for a in self.attempts], "layers": self.layers,
                "bias_correction": self.corrections}


class Judge:
    """Scores .tflite bytes against the SavedModel on one split's images, in ai-edge-litert.

    The images are decoded once into a feed file (read a batch at a time) and the SavedModel's
    probabilities computed once.
    """

    def __init__(self, savedmodel: Path, examples: Sequence, prep: Preprocessing, folder: Path,
                 num_classes: int, labelled: bool = True, runners: tuple | None = None, copies: int = 0):
        """``runners``: the (TensorFlow, ai-edge-litert) runners of another judge, to share its
        loaded SavedModel and worker process (:meth:`close` then leaves them to that judge).
        ``copies``: also judge this many augmented copies of each image (:func:`augmented_holdout`)."""
        from pipeline.runners.savedmodel import TensorFlowRunner
        from pipeline.runners.tflite import TfliteRunner
        from pipeline.verify import as_probabilities, load_holdout

        Path(folder).mkdir(parents=True, exist_ok=True)
        self.holdout = augmented_holdout(examples, prep, folder, copies, labelled) if copies else \
            load_holdout(examples, prep, folder, labelled=labelled)
        self.folder, self.num_classes, self.owns = Path(folder), num_classes, runners is None
        self.runners = runners or (TensorFlowRunner(), TfliteRunner("ai-edge-litert"))
        self.reference = as_probabilities(self.runners[0].predict(savedmodel, self.holdout.contract).probabilities)[0]
        self.runner = self.runners[1]

    def __len__(self) -> int:
        return len(self.holdout)

    @property
    def reference_accuracy(self) -> float | None:
        labels = self.holdout.labels
        return None if labels is None else float(np.mean(self.reference.argmax(1) == labels))

    def score(self, data: bytes, latency_runs: int = 0) -> tuple[Score, float | None]:
        """The file's :class:`Score` on these images, and its p50 single-image latency in ms when
        ``latency_runs``."""
        from pipeline.runners.base import RunSettings
        from pipeline.verify import as_probabilities, compare

        path = self.folder / "candidate.tflite"
        path.write_bytes(data)
        prediction = self.runner.predict(path, self.holdout.contract, settings=RunSettings(latency_runs=latency_runs))
        probs = as_probabilities(prediction.probabilities)[0]
        figures = compare(self.reference, probs, self.holdout.labels, self.num_classes)
        score = Score(figures["top1_agreement"], figures["accuracy"], figures["kl_divergence"], self.reference_accuracy)
        if self.holdout.labels is not None:
            ref_right = self.reference.argmax(1) == self.holdout.labels
            own_right = probs.argmax(1) == self.holdout.labels
            score.lost, score.gained = int(np.sum(ref_right & ~own_right)), int(np.sum(~ref_right & own_right))
        return score, prediction.latency_ms

    def close(self) -> None:
        if self.owns:
            for runner in self.runners:
                runner.close()


def augmented_holdout(examples: Sequence, prep: Preprocessing, folder: Path, copies: int, labelled: bool):
    """Each image as the contract prepares it and ``copies`` augmented copies of it (mirrored or not,
    cropped up to 10 %, scaled up to 10 %, brightness ±10 %; :func:`pipeline.augment.augmented_image`,
    the same for the same photo every time), as a :class:`pipeline.verify.Holdout` whose copies carry
    their photo's label and path. Unreadable images are skipped, as verify skips them."""
    import hashlib

    from pipeline.augment import augmented_image
    from pipeline.config import AugmentConfig
    from pipeline.images import ImageError, decode_rgb, read_image_file
    from pipeline.verify import CONTRACT, FeedFile, Holdout, prepare_feed

    cfg = AugmentConfig(copies=copies, flip=True, crop=10.0, scale=10.0, brightness=10.0)
    labels, paths = [], []

    def prepared():
        for e in examples:
            try:
                data = read_image_file(e.path)
                plain = prepare_feed([decode_rgb(data, e.path)], CONTRACT, prep, None, {})
            except (ImageError, OSError):
                continue
            sha = hashlib.sha256(data).hexdigest()
            batch = [plain[0], *(augmented_image(data, prep, cfg, sha, k, e.path) for k in range(copies))]
            labels.extend([e.label] * len(batch))
            paths.extend([e.path] * len(batch))
            yield np.stack(batch).astype(np.float32)

    Path(folder).mkdir(parents=True, exist_ok=True)
    feed = FeedFile.write(Path(folder) / "contract.f32", prepared(), (prep.size, prep.size, 3))
    return Holdout(np.array(labels) if labelled else None, paths, [], feed, feed, {})


def copies_to_see(n_images: int) -> int:
    """Augmented copies of each validation image the repair judges with, for about
    :data:`SEE_IMAGES` inputs: 0 for that many images or more, at most :data:`MAX_COPIES`."""
    if n_images <= 0 or n_images >= SEE_IMAGES:
        return 0
    return min(MAX_COPIES, -(-SEE_IMAGES // n_images) - 1)


def layer_errors(calibrated: bytes, images: Callable[[], Iterable[np.ndarray]]) -> list[dict]:
    """The quantization debugger's per-layer errors on ``images``, worst first: for each quantised
    layer its output tensor (the name ``denylisted_nodes`` takes), op and RMSE in steps of its scale."""
    from tensorflow.lite.python import convert as tfl_convert
    from tensorflow.lite.tools.optimize.debugging.python import debugger

    debug_model = tfl_convert.mlir_quantize(calibrated, enable_numeric_verify=True)

    def dataset():
        for img in images():
            yield [np.asarray(img, np.float32)]

    dbg = debugger.QuantizationDebugger(quant_debug_model_content=debug_model, debug_dataset=dataset)
    dbg.run()
    buf = io.StringIO()
    dbg.layer_statistics_dump(buf)
    buf.seek(0)
    rows = [{"tensor": r["tensor_name"], "op": r["op_name"],
             "rmse_per_scale": float(np.sqrt(float(r["mean_squared_error"])) / float(r["scale"]))}
            for r in csv.DictReader(buf) if float(r["scale"]) > 0]
    return sorted(rows, key=lambda r: -r["rmse_per_scale"])


def quantize_int8(calibrated: bytes, float_layers: Sequence[str] = (), per_channel: bool = True) -> bytes:
    """The int8 file (float32 I/O) from a calibrated model, the named layers left in float."""
    from tensorflow.lite.python import convert as tfl_convert
    from tensorflow.lite.python import lite as tfl_lite

    model = tfl_convert.mlir_quantize(calibrated, disable_per_channel=not per_channel,
                                      denylisted_nodes=list(float_layers) or None)
    return tfl_lite._deduplicate_readonly_buffers(model)


def short_name(tensor: str) -> str:
    """A layer's fused tensor name as people read it: its first component
    (``backbone/MobilenetV1/MobilenetV1/Conv2d_3_depthwise/Relu6;...`` → ``.../Conv2d_3_depthwise/Relu6``)."""
    return tensor.split(";")[0]


class _Search:
    """The attempts of one repair, scored as they are made, and the float-layer search they share."""

    def __init__(self, mode: QuantMode, judge: Judge, goal: Goal, test_judge: Judge | None):
        self.judge, self.goal, self.test_judge = judge, goal, test_judge
        self.result = RepairResult(mode, goal, [], None, None, "", len(judge),
                                   {"validation_accuracy": judge.reference_accuracy})
        self.files: dict[int, bytes] = {}

    @property
    def attempts(self) -> list[Attempt]:
        return self.result.attempts

    def attempt(self, step: str, data: bytes, float_layers: Sequence[str], n_cal: int = 0,
                per_channel: bool = True, bias_corrected: bool = False) -> tuple[Attempt, Score]:
        score, _ = self.judge.score(data)
        a = Attempt(step, [short_name(t) for t in float_layers], n_cal, per_channel, len(data), score.agreement,
                    score.accuracy, score.kl, score.meets(self.goal), bias_corrected=bias_corrected)
        if self.test_judge is not None:
            test, latency = self.test_judge.score(data, LATENCY_RUNS)
            a.test_agreement, a.test_accuracy, a.latency_ms = test.agreement, test.accuracy, latency
        self.attempts.append(a)
        self.files[id(a)] = data
        log.info(f"repair: {self.result.mode.value}: {step}: {len(data) / 1e3:.0f} KB, validation agreement "
                 f"{score.agreement:.4f}" + (f", accuracy {score.accuracy:.4f}" if score.accuracy is not None else "")
                 + (" (target met)" if a.met else ""))
        return a, score

    def finish(self, chosen: Attempt, reason: str, reached: bool) -> RepairResult:
        chosen.kept = True
        self.result.chosen, self.result.reason = chosen, reason
        self.result.model = self.files[id(chosen)] if reached else None
        log.info(f"repair: {self.result.mode.value}: {reason}")
        return self.result

    def float_layers(self, make: Callable[[Sequence[str]], bytes], ranking: Sequence[str], best: Attempt,
                     best_score: Score, n_cal: int = 0, per_channel: bool = True,
                     bias_corrected: bool = False) -> RepairResult:
        """Layers of ``ranking`` (worst first) left in float one at a time until the goal, then each
        put back when the file meets the goal and agrees as well without it; stops at the size limit."""
        goal, plain = self.goal, self.attempts[0]
        also = ", bias-corrected" if bias_corrected else ""
        kept_float: list[str] = []
        met = None
        for layer in ranking:
            kept_float.append(layer)
            data = make(kept_float)
            a, s = self.attempt(f"{len(kept_float)} layer(s) in float{also}", data, kept_float, n_cal, per_channel,
                                bias_corrected)
            if len(data) > goal.max_size_bytes:
                within = max((x for x in self.attempts if x.size_bytes <= goal.max_size_bytes),
                             key=lambda x: (x.met, x.validation_agreement, -x.validation_kl), default=plain)
                return self.finish(within, f"stopped at the size limit: {len(kept_float)} layer(s) in float make "
                                           f"{len(data) / 1e3:.0f} KB, over {goal.max_size_bytes / 1e3:.0f} KB, and "
                                           f"the best file within it agrees {within.validation_agreement:.4f} on "
                                           f"validation (target {goal.agreement:.4f}); raise --int8-repair-max-size "
                                           "or use the float16 file", False)
            if s.key(goal) > best_score.key(goal):
                best, best_score = a, s
            if a.met:
                met = a
                break
        if met is None:
            return self.finish(best, f"missed the target with every layer in float ({best.validation_agreement:.4f} "
                                     f"< {goal.agreement:.4f}); use the float16 or float32 file", False)
        # Put back each float layer the file does not need: it still meets the target, and agrees on
        # validation at least as well without the layer. (Putting back whatever keeps the target met
        # chose, among many files, the one that happened to land just over the target on validation:
        # on Caltech-101 the dynamic-range search then put back one layer for 2 KB, validation 0.9920
        # → 0.9907, and test agreement fell from 0.9925 to 0.9850.)
        for layer in list(kept_float[:-1]):
            trial = [t for t in kept_float if t != layer]
            a, s = self.attempt(f"{short_name(layer)} back to {self.result.mode.value}{also}", make(trial), trial,
                                n_cal, per_channel, bias_corrected)
            if a.met and a.validation_agreement >= met.validation_agreement:
                kept_float, met = trial, a
        names = [short_name(t) for t in kept_float]
        listed = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        return self.finish(met, f"{len(kept_float)} layer(s) in float meet the target: {listed}", True)


def repair_int8(
    source: "quantize.Source", calibrated: bytes, calibration: Sequence[str], more_calibration: Sequence[str],
    prep: Preprocessing, judge: Judge, goal: Goal, test_judge: Judge | None = None, float32: bytes | None = None,
) -> RepairResult:
    """Searches for an int8 file that meets ``goal`` on ``judge``'s (validation) images; see the
    module's docstring for the order of attempts.

    Args:
        calibrated: the plain int8 file's calibrated model (:func:`pipeline.quantize.calibrate`).
        calibration: the training images it was calibrated on.
        more_calibration: a larger sample of the training split, for the second attempt.
        test_judge: scores each attempt on the test split for the report (never for a choice).
        float32: the float32 file the bias correction measures against (converted when None).
    """
    search = _Search(QuantMode.INT8, judge, goal, test_judge)
    plain, best_score = search.attempt("plain int8", quantize_int8(calibrated), [], len(calibration), True)
    best, cal, per_channel = plain, calibrated, True
    if plain.met:
        return search.finish(plain, "the plain int8 file already meets the target", True)

    # Attempts that cost no float layers; each is kept only when it scores better.
    if len(more_calibration) > len(calibration):
        more = quantize.calibrate(source, quantize._images(more_calibration, prep))
        a, s = search.attempt(f"calibration on {len(more_calibration)} images", quantize_int8(more), [],
                              len(more_calibration), True)
        if s.key(goal) > best_score.key(goal):
            best, best_score, cal = a, s, more
    a, s = search.attempt("per-tensor weights", quantize_int8(cal, per_channel=False), [], best.calibration_images, False)
    if s.key(goal) > best_score.key(goal):
        best, best_score, per_channel = a, s, False
    n_cal = best.calibration_images
    images = more_calibration if n_cal > len(calibration) else calibration
    float32 = float32 if float32 is not None else quantize.convert_tflite(source, QuantMode.FLOAT32)
    correct, corrected = _bias_correction(float32, images[:BIAS_IMAGES], prep), None
    try:
        data, search.result.corrections = correct(quantize_int8(cal, per_channel=per_channel))
    except BiasCorrectionError as err:
        log.warning(f"warning: repair: int8: no bias correction: {err}")
    else:
        a, s = search.attempt("bias correction", data, [], n_cal, per_channel, True)
        if s.key(goal) > best_score.key(goal):
            best, best_score, corrected = a, s, correct
    if best.met:
        return search.finish(best, f"{best.step} meets the target with every layer in int8", True)

    # Layers left in float, worst first by the debugger's RMSE in steps of each layer's scale.
    # (Ranking by what each layer alone in float does to the validation drift was tried too: on
    # Caltech-101 with mobilenet_v1_0.25_224 it needed 25 float layers for a file that agreed 0.979
    # on test, against 23 layers and 0.990 in this order.)
    ranking = layer_errors(cal, quantize._images(images[:DEBUG_IMAGES], prep))
    search.result.layers = [{**r, "tensor": short_name(r["tensor"])} for r in ranking]
    log.info(f"repair: int8: the quantization debugger ranked {len(ranking)} layers; worst: "
             + ", ".join(f"{short_name(r['tensor'])} ({r['rmse_per_scale']:.2f} steps RMSE)" for r in ranking[:3]))

    def make(layers: Sequence[str]) -> bytes:
        data = quantize_int8(cal, layers, per_channel)
        return data if corrected is None else corrected(data)[0]

    return search.float_layers(make, [r["tensor"] for r in ranking], best, best_score, n_cal, per_channel,
                               corrected is not None)


def _bias_correction(float32: bytes, images: Sequence[str], prep: Preprocessing):
    """A function that bias-corrects an int8 or dynamic-range file against ``float32`` on ``images``
    (decoded once, here), giving the file and what was measured per layer."""
    from pipeline.bias_correction import correct_biases

    decoded = [np.asarray(img, np.float32) for img in quantize._images(images, prep)()]

    def correct(data: bytes) -> tuple[bytes, list[dict]]:
        fixed, layers = correct_biases(data, float32, decoded)
        return fixed, [{**c.to_dict(), "tensor": short_name(c.tensor)} for c in layers]

    return correct


def dynamic_layers(float32: bytes) -> list[str]:
    """The output tensors of the ops dynamic-range quantisation changes in a float .tflite file (ops
    with weights, at least :data:`MIN_DYNAMIC_WEIGHTS` of them), in graph order."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=float32)
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    return [tensors[op["outputs"][0]]["name"] for op in interpreter._get_ops_details()
            if op["op_name"] in WEIGHTED_OPS and int(np.prod(tensors[op["inputs"][1]]["shape"])) >= MIN_DYNAMIC_WEIGHTS]


def quantize_dynamic(float32: bytes, float_layers: Sequence[str] = ()) -> bytes:
    """The dynamic-range file from the float32 one, by ai-edge-quantizer's legacy recipe (int8
    weights per channel for ops with at least 1,024 weights, as TensorFlow's converter does), the
    named layers left in float."""
    import contextlib
    import re

    from ai_edge_quantizer import qtyping, quantizer, recipe

    qt = quantizer.Quantizer(bytearray(float32))
    qt.load_quantization_recipe(recipe.dynamic_legacy_wi8_afp32())
    # Per-tensor dense weights, as TensorFlow's dynamic-range file has them (pipeline/quantize.py):
    # tflite-runtime 2.14 runs a per-channel hybrid FULLY_CONNECTED from this file with per-tensor
    # kernels and wrong answers (measured: logits 13 off, another top-1).
    qt.add_dynamic_config(regex=".*", operation_name="FULLY_CONNECTED", num_bits=8,
                          granularity=qtyping.QuantGranularity.TENSORWISE)
    for layer in float_layers:
        # An op's scope is its output tensors' names, each followed by ";".
        qt.update_quantization_recipe(regex=f"^{re.escape(layer)};$", operation_name="*", algorithm_key="no_quantize")
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its size ratios
        return bytes(qt.quantize().quantized_model)


def repair_dynamic(float32: bytes, plain: bytes, judge: Judge, goal: Goal, test_judge: Judge | None = None,
                   calibration: Sequence[str] = (), prep: Preprocessing | None = None) -> RepairResult:
    """Searches for a dynamic-range file that meets ``goal`` on ``judge``'s (validation) images.

    TensorFlow's converter cannot leave single layers of a dynamic-range model in float, so the
    files come from ai-edge-quantizer: its legacy recipe first (no float layer), then, with
    ``calibration`` images, the plain file bias-corrected on them (kept when it scores better, and
    then made again on every later file), then layers left in float one at a time, worst first.
    There is no quantization debugger for dynamic range (nothing is calibrated): each layer's drift
    is measured as the validation KL divergence of a file with that layer alone quantised (and
    bias-corrected, as the search's files are) and every other one in float, so that no other
    layer's drift hides it. (Ranking by the drift left with each layer alone in float, the other way
    round, was tried first: on Caltech-101 with mobilenet_v1_0.25_224 a layer whose drift showed
    only with the others in float came last, and the search needed 17 float layers and 957 KB for a
    file that agreed 0.9873 on test, against 14, 833 KB and 0.9925 in this order, before bias
    correction. Ranked on uncorrected files, the bias-corrected search needed 2 other layers and
    374 KB for 0.9888 on test, against 311 KB and 0.9918 ranked as built.)
    """
    search = _Search(QuantMode.DYNAMIC, judge, goal, test_judge)
    first, best_score = search.attempt("plain dynamic-range", plain, [])
    if first.met:
        return search.finish(first, "the plain dynamic-range file already meets the target", True)
    best = first
    a, s = search.attempt("ai-edge-quantizer's dynamic-range recipe", quantize_dynamic(float32), [])
    if s.key(goal) > best_score.key(goal):
        best, best_score = a, s
    corrected = None
    if calibration and not best.met:
        correct = _bias_correction(float32, list(calibration)[:BIAS_IMAGES], prep)
        try:
            data, search.result.corrections = correct(plain)
        except BiasCorrectionError as err:
            log.warning(f"warning: repair: dynamic: no bias correction: {err}")
        else:
            a, s = search.attempt("bias correction", data, [], bias_corrected=True)
            if s.key(goal) > best_score.key(goal):
                best, best_score, corrected = a, s, correct
    if best.met:
        return search.finish(best, f"{best.step} meets the target with every layer quantised", True)

    def make(float_layers: Sequence[str]) -> bytes:
        data = quantize_dynamic(float32, float_layers)
        return data if corrected is None else corrected(data)[0]

    # Each layer's drift as the files are built: bias-corrected when the correction was kept.
    layers = dynamic_layers(float32)
    ranking = []
    for layer in layers:
        alone, _ = judge.score(make([x for x in layers if x != layer]))
        ranking.append({"tensor": layer, "alone_quantised_kl": alone.kl, "alone_quantised_agreement": alone.agreement})
    ranking.sort(key=lambda r: -r["alone_quantised_kl"])
    search.result.layers = [{**r, "tensor": short_name(r["tensor"])} for r in ranking]
    log.info(f"repair: dynamic: ranked {len(ranking)} layers by the validation drift of each alone quantised; worst: "
             + ", ".join(f"{short_name(r['tensor'])} (KL {r['alone_quantised_kl']:.4f})" for r in ranking[:3]))
    return search.float_layers(make, [r["tensor"] for r in ranking], best, best_score,
                               bias_corrected=corrected is not None)


def plot_attempts(result: RepairResult, path: Path) -> Path:
    """Size against validation agreement, one point per attempt, the target as a line."""
    from pipeline.report import pyplot_agg

    plt = pyplot_agg()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    xs = [a.size_bytes / 1e3 for a in result.attempts]
    ys = [a.validation_agreement for a in result.attempts]
    ax.plot(xs, ys, "o-", color="tab:blue", alpha=0.6, label="attempts, in order")
    if result.chosen is not None:
        ax.plot([result.chosen.size_bytes / 1e3], [result.chosen.validation_agreement], "*", ms=16,
                color="tab:green" if result.reached else "tab:red", label="chosen" if result.reached else "best within the limit")
    ax.axhline(result.goal.agreement, color="tab:green", ls="--", lw=1, label=f"target {result.goal.agreement:.4f}")
    ax.axvline(result.goal.max_size_bytes / 1e3, color="tab:red", ls=":", lw=1, label="size limit")
    ax.set_xlabel("file size (KB)")
    ax.set_ylabel("top-1 agreement, validation")
    ax.set_title(f"{result.mode.value} repair: layers kept in float until the target")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    from pipeline.rundir import atomic_write_bytes

    atomic_write_bytes(path, buf.getvalue())
    return path


@dataclass(frozen=True)
class RepairSettings:
    """When and toward what a run repairs its int8 file.

    Attributes:
        asked: repair even when the plain file meets its gate (``--int8-repair``).
        gate: the plain int8 file's agreement gate; missing it on validation starts a repair.
        target: the repaired file's agreement target; None: float16's on validation, at most
            :data:`DEFAULT_TARGET`.
        max_accuracy_drop: accuracy the files may lose (a fraction); None with no labels.
        max_size_pct: percent of the float32 file's size a repaired file may reach.
    """

    asked: bool = False
    gate: float = 0.90
    target: float | None = None
    max_accuracy_drop: float | None = 0.01
    max_size_pct: float = 100.0


def repair_run(savedmodel: Path, files: dict, calibration: Sequence[str], more_calibration: Sequence[str],
               validation: Sequence, test: Sequence, prep: Preprocessing, num_classes: int,
               settings: Mapping[QuantMode, RepairSettings]) -> dict[QuantMode, tuple[RepairResult | None, dict]]:
    """The quantize stage's repair of each of ``files``' int8 and dynamic-range files (see
    :func:`repair_int8`, :func:`repair_dynamic`), when asked or when the plain file misses its
    gate on ``validation``.

    Returns:
        For each repairable mode in ``files``: the search's result (None when no search ran) and what
        the manifest records of it.
    """
    modes = [m for m in REPAIRED if m in files and m in settings]
    if not validation:
        log.info("repair: no validation images (--validation-pct 0), so nothing is repaired")
        return {m: (None, {"skipped": "no validation images"}) for m in modes}
    out: dict[QuantMode, tuple[RepairResult | None, dict]] = {}
    with tempfile.TemporaryDirectory(prefix="edgepipe-repair-") as tmp:
        copies = copies_to_see(len(validation))
        if copies:
            # 49 validation photos (flowers8's default split) show no flip of an int8 file that flips
            # 5 of 160 test photos (3.1 %); with 15 copies each it flips 12 of 784 inputs (1.5 %).
            log.info(f"repair: {len(validation)} validation images cannot show a 1 % flip rate; each is also judged "
                     f"in {copies} augmented copies (mirror, crop, scale, brightness), {len(validation) * (copies + 1)} "
                     "inputs in all (--validation-pct raises the number of photos)")
        judge = Judge(savedmodel, validation, prep, Path(tmp) / "validation", num_classes,
                      any(settings[m].max_accuracy_drop is not None for m in modes), copies=copies)
        test_judge, source, f32, f16 = None, None, None, None
        try:
            for mode in modes:
                c = settings[mode]
                plain, _ = judge.score(Path(files[mode]).read_bytes())
                why = _missed(plain, c)
                if why is None and not c.asked:
                    log.info(f"repair: {mode.value} meets its gate on the {len(judge)} validation images (agreement "
                             f"{plain.agreement:.4f}), not repaired (--int8-repair repairs it anyway)")
                    out[mode] = (None, {"needed": False, "validation_agreement": plain.agreement})
                    continue
                source = source or quantize.Source(savedmodel)
                if f32 is None:
                    f32 = Path(files[QuantMode.FLOAT32]).read_bytes() if QuantMode.FLOAT32 in files else \
                        quantize.convert_tflite(source, QuantMode.FLOAT32)
                target = c.target
                if target is None:
                    target = DEFAULT_TARGET
                    if QuantMode.FLOAT16 in files:
                        f16 = f16 if f16 is not None else judge.score(Path(files[QuantMode.FLOAT16]).read_bytes())[0]
                        target = min(target, f16.agreement)
                goal = Goal(target, c.max_accuracy_drop, int(len(f32) * c.max_size_pct / 100))
                if len(judge) * (1 - target) < FLIPS_TO_SEE:
                    log.warning(f"warning: repair: one flip is {1 / len(judge):.1%} of the {len(judge)} validation "
                                f"images, too few to tell agreement {target:.2f} from less; raise --validation-pct "
                                "for a search that can see the drift")
                log.info(f"repair: {mode.value} {why or 'repair asked'}; target agreement {target:.4f} on {len(judge)} "
                         f"validation images, files up to {goal.max_size_bytes / 1e3:.0f} KB")
                if test_judge is None and test:
                    test_judge = Judge(savedmodel, test, prep, Path(tmp) / "test", num_classes,
                                       judge.holdout.labels is not None, runners=judge.runners)
                if mode is QuantMode.INT8:
                    calibrated = quantize.calibrate(source, quantize._images(calibration, prep))
                    result = repair_int8(source, calibrated, calibration, more_calibration, prep, judge, goal, test_judge,
                                         f32)
                else:
                    result = repair_dynamic(f32, Path(files[mode]).read_bytes(), judge, goal, test_judge, calibration,
                                            prep)
                out[mode] = (result, {"needed": True, "reached": result.reached, "reason": result.reason,
                                      "attempts": len(result.attempts)})
        finally:
            if test_judge is not None:
                test_judge.close()
            judge.close()
    return out


def _missed(plain: Score, settings: RepairSettings) -> str | None:
    """How the plain int8 file misses its gate on validation, or None."""
    if plain.agreement < settings.gate:
        return f"misses its gate on validation (agreement {plain.agreement:.4f} < {settings.gate:.2f})"
    drop = None if plain.accuracy is None or plain.reference_accuracy is None else plain.reference_accuracy - plain.accuracy
    # As verify gates it (pipeline.verify.bound_accuracy): past the bound, and not by chance.
    chance = loss_p(plain.lost, plain.gained)
    if settings.max_accuracy_drop is not None and drop is not None and drop > settings.max_accuracy_drop + 1e-9 \
            and chance < ACCURACY_DROP_P:
        return (f"loses {100 * drop:.1f} points of validation accuracy (at most "
                f"{100 * settings.max_accuracy_drop:g})")
    return None


def write_report(result: RepairResult, path: Path) -> Path:
    import json

    from pipeline.rundir import atomic_write_text

    atomic_write_text(path, json.dumps(result.to_dict(), indent=2))
    return path

"""The configuration of a run: every option, validated at once before any expensive work.

This module sits below the stages: it imports no stage module (nor TensorFlow or scikit-learn),
so ``import pipeline.cli`` stays fast. Each settings group validates itself (``problems()``) and
:func:`validate` reports every problem of every group in one :class:`ConfigError`.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Collection, Iterable, Mapping, Sequence

from pipeline.catalog import DEFAULT_BACKBONE, custom_backbone, fine_tune_blocks, get_backbone, load_catalog
from pipeline.errors import ConfigError, PipelineError
from pipeline.types import (
    BackboneSpec,
    ChannelOrder,
    ClassWeights,
    QuantMode,
    ResizeMethod,
    Runtime,
    TfjsMode,
    ValueRange,
)

# Minimum top-1 agreement with the reference. float16 keeps nearly every answer; int8 may move
# borderline images, so it gets more room. Override per artifact with --gate NAME=VALUE.
DEFAULT_GATES: dict[str, float] = {
    "savedmodel": 1.0,
    "tflite-float32": 0.99,
    "tflite-float16": 0.98,
    "tflite-dynamic": 0.95,
    "tflite-int8": 0.90,
    "tflite-int8-int8": 0.90,
    "tflite-int8-uint8": 0.90,
    "tflite-int16x8": 0.95,
    "tflite-int8-repaired": 0.90,
    "tflite-dynamic-repaired": 0.95,
    "tfjs-float32": 0.99,
    "tfjs-float16": 0.98,
    "tfjs-uint8": 0.90,
}

# The runtimes --runtime may name (the reference's TensorFlow is always run). mediapipe-tasks (the
# TFLite files through MediaPipe's ImageClassifier, reading their metadata) runs when asked for.
ALL_RUNTIMES = (Runtime.TFLITE_RUNTIME, Runtime.LITERT, Runtime.TFJS_WASM, Runtime.MEDIAPIPE,
                Runtime.TFLITE_RUNTIME_ARM64, Runtime.LITERT_ARM64, Runtime.CHROMIUM_WASM, Runtime.CHROMIUM_WEBGL,
                Runtime.CHROMIUM_WEBGL_F16, Runtime.CHROMIUM_WEBGPU)
# The Pi's CPUs QEMU emulates for the -arm64 runtimes: Pi 4 and Pi 5.
ARM64_CPUS = ("cortex-a72", "cortex-a76")
DEFAULT_RUNTIMES = (Runtime.TFLITE_RUNTIME, Runtime.LITERT, Runtime.TFJS_WASM)


def _enum_or_raw(kind, value):
    """``kind(value)`` when valid, else ``value`` as given, for ``problems()`` to name."""
    try:
        return kind(value)
    except ValueError:
        return value


@dataclass(frozen=True)
class TrainConfig:
    """Head-training knobs (defaults reach ≥0.97 on flowers8 with mobilenet_v1_0.25_224).

    ``steps`` (optimizer steps), when set, replaces ``epochs``. ``class_weights`` weighs classes
    inversely to their frequency when BALANCED (for imbalanced folders). ``early_stopping`` is a
    patience in evaluations without a lower validation loss (0 = off); the weights with the best
    validation loss are kept.

    ``fine_tune`` (blocks) or ``fine_tune_from`` (a tensor) also trains the last blocks of the
    backbone with the head (``pipeline/finetune.py``): first the head alone, as without them, then
    both for ``fine_tune_epochs`` epochs, the blocks at ``fine_tune_learning_rate`` and the head at
    a tenth of ``learning_rate``. Off, they are left out of :meth:`to_dict`, so a run that does
    not fine-tune keeps the fingerprint it had before they existed.
    """

    epochs: int = 200
    steps: int | None = None
    batch_size: int = 64
    validation_batch_size: int = 1024
    learning_rate: float = 0.01
    l2: float = 1e-4
    hidden_units: int = 0
    dropout: float = 0.0
    label_smoothing: float = 0.0
    class_weights: ClassWeights = ClassWeights.NONE
    early_stopping: int = 0
    eval_every: int = 1
    checkpoint_every: int = 0
    seed: int = 0
    fine_tune: int = 0
    fine_tune_from: str | None = None
    fine_tune_epochs: int = 20
    fine_tune_learning_rate: float = 1e-4

    def __post_init__(self):
        object.__setattr__(self, "class_weights", _enum_or_raw(ClassWeights, self.class_weights))

    @property
    def fine_tunes(self) -> bool:
        """Whether blocks of the backbone are trained with the head."""
        return bool(self.fine_tune or self.fine_tune_from)

    def problems(self) -> list[str]:
        out = []
        if self.epochs < 1:
            out.append(f"--epochs {self.epochs}: must be at least 1")
        if self.batch_size < 1:
            out.append(f"--batch-size {self.batch_size}: must be at least 1")
        if not self.learning_rate > 0:
            out.append(f"--learning-rate {self.learning_rate}: must be positive")
        if self.steps is not None and self.steps < 1:
            out.append(f"--steps {self.steps}: must be at least 1")
        if not 0 <= self.dropout < 1:
            out.append(f"--dropout {self.dropout}: must be in [0, 1)")
        if self.dropout and not self.hidden_units:
            out.append(f"--dropout {self.dropout} needs --hidden-units N (dropout applies to the hidden layer)")
        if not 0 <= self.label_smoothing < 1:
            out.append(f"--label-smoothing {self.label_smoothing}: must be in [0, 1)")
        if not isinstance(self.class_weights, ClassWeights):
            out.append(f"--class-weights {self.class_weights!r}: use 'none' or 'balanced'")
        if self.eval_every < 1:
            out.append(f"--eval-every {self.eval_every}: must be at least 1")
        if self.fine_tune < 0:
            out.append(f"--fine-tune {self.fine_tune}: must be 0 (the head only) or a number of blocks")
        if self.fine_tune and self.fine_tune_from:
            out.append(f"--fine-tune {self.fine_tune} and --fine-tune-from {self.fine_tune_from}: give one (blocks "
                       "counted from the end, or the tensor to cut the graph at)")
        if self.fine_tune_epochs < 1:
            out.append(f"--fine-tune-epochs {self.fine_tune_epochs}: must be at least 1")
        if not self.fine_tune_learning_rate > 0:
            out.append(f"--fine-tune-learning-rate {self.fine_tune_learning_rate}: must be positive")
        return out

    def to_dict(self) -> dict:
        d = asdict(self)
        if not self.fine_tunes:
            for key in ("fine_tune", "fine_tune_from", "fine_tune_epochs", "fine_tune_learning_rate"):
                del d[key]
        return d


@dataclass(frozen=True)
class AugmentConfig:
    """``copies`` augmented versions per training image (0 = off).

    Percentages as in poets' retrain.py: ``crop`` enlarges the image by up to that margin and crops
    back to the model size at a random place; ``scale`` enlarges by a random 0..scale %;
    ``brightness`` multiplies pixels by a random factor within ±brightness %; ``flip`` mirrors half
    of the copies left-right.
    """

    copies: int = 0
    flip: bool = False
    crop: float = 0.0
    scale: float = 0.0
    brightness: float = 0.0

    @property
    def enabled(self) -> bool:
        return self.copies > 0 and (self.flip or self.crop > 0 or self.scale > 0 or self.brightness > 0)

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]

    def problems(self) -> list[str]:
        out = []
        if self.copies < 0 or self.crop < 0 or self.scale < 0 or not 0 <= self.brightness < 100:
            out.append("augmentation: --augment-copies, --random-crop and --random-scale must be ≥ 0, "
                       "--random-brightness in [0, 100)")
        if (self.flip or self.crop or self.scale or self.brightness) and self.copies == 0:
            out.append("augmentation options need --augment-copies N (how many augmented copies to cache per image)")
        return out

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class AppPreprocessing:
    """How a deploying app prepares pixels. The defaults are the contract.

    Attributes:
        channel_order: RGB (contract) or BGR (OpenCV's default order).
        value_range: what the app feeds: 0-255 (contract), 0-1 (divided by 255) or -1-1
            (normalised by the app although the model normalises again: double normalisation).
        resize: tf.image resize method; bilinear is the contract.
        antialias: the contract has none; Pillow and browsers' canvas scaling antialias.
        crop: central fraction kept before the resize; 1.0 (no crop) is the contract, 0.875 is
            the Inception-style centre crop.
    """

    channel_order: ChannelOrder = ChannelOrder.RGB
    value_range: ValueRange = ValueRange.BYTE
    resize: ResizeMethod = ResizeMethod.BILINEAR
    antialias: bool = False
    crop: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "channel_order", ChannelOrder(self.channel_order))
        object.__setattr__(self, "value_range", ValueRange(self.value_range))
        object.__setattr__(self, "resize", ResizeMethod(self.resize))

    def differences(self) -> list[str]:
        """Human-readable settings that differ from the contract."""
        contract = AppPreprocessing()
        out = []
        for f in dataclasses.fields(self):
            mine, theirs = getattr(self, f.name), getattr(contract, f.name)
            if mine != theirs:
                out.append(f"{f.name.replace('_', ' ')} {mine} (contract: {theirs})")
        return out

    def to_dict(self) -> dict:
        return asdict(self)


def parse_app_preprocessing(items: Iterable[str]) -> AppPreprocessing:
    """``["channel_order=BGR", "crop=0.875"]`` → AppPreprocessing.

    Raises:
        ConfigError: unknown key or value (all problems in one message).
    """
    values: dict = {}
    problems = []
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep:
            problems.append(f"--app-preprocessing {item!r}: expected KEY=VALUE")
        elif key == "channel_order" and value.upper() in set(ChannelOrder):
            values[key] = ChannelOrder(value.upper())
        elif key == "value_range" and value in set(ValueRange):
            values[key] = ValueRange(value)
        elif key == "resize" and value in set(ResizeMethod):
            values[key] = ResizeMethod(value)
        elif key == "antialias" and value.lower() in ("true", "false"):
            values[key] = value.lower() == "true"
        elif key == "crop" and _fraction(value):
            values[key] = float(value)
        else:
            problems.append(
                f"--app-preprocessing {item!r}: use channel_order=RGB|BGR, value_range={'|'.join(ValueRange)}, "
                f"resize={'|'.join(ResizeMethod)}, antialias=true|false or crop=FRACTION in (0,1]"
            )
    if problems:
        raise ConfigError("; ".join(problems))
    return AppPreprocessing(**values)


def _fraction(value: str) -> bool:
    try:
        return 0 < float(value) <= 1
    except ValueError:
        return False


def parse_gates(items: Iterable[str], names: Collection[str] = (), expected: str | None = None) -> dict[str, float]:
    """``["tflite-int8=0.95", ...]`` → ``{"tflite-int8": 0.95}`` (overrides of the defaults).

    Args:
        names: row names that may be gated besides the :data:`DEFAULT_GATES` kinds (check's files).
        expected: what the error says a valid item is (default: the kinds).

    Raises:
        ConfigError: a malformed item, an unknown artifact or a value outside 0..1.
    """
    expected = expected or f"ARTIFACT=VALUE with VALUE in 0..1 and ARTIFACT one of {', '.join(DEFAULT_GATES)}"
    gates: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = -1.0
        if not sep or (name not in DEFAULT_GATES and name not in names) or not 0.0 <= number <= 1.0:
            raise ConfigError(f"--gate {item!r}: expected {expected}")
        gates[name] = number
    return gates


DEFAULT_NORMALISATION = 127.5  # mean and std of a --graph given with its tensors but no --mean/--std
# An adopted graph's SavedModel runs the same kernels as the graph itself with the normalisation
# moved inside; a tie between two classes may still fall the other way, so not 1.0.
ADOPTED_SAVEDMODEL_GATE = 0.99


@dataclass(frozen=True)
class CustomGraph:
    """A user's own frozen graph (``--graph``, or ``--model-graph`` with :class:`Adoption`) and how
    to feed it.

    Fields left None are filled by :meth:`resolved`, which recognises the graph as a catalog
    backbone by its tensor names and shapes (``catalog.match_backbones``): input, bottleneck, size
    and normalisation then come from that row, named in ``recognised_as``. With the input, the
    bottleneck (not needed for an adopted graph) and the size given, nothing is recognised and
    mean and std default to 127.5.
    """

    path: Path
    input_tensor: str | None = None
    bottleneck_tensor: str | None = None
    input_size: int | None = None
    mean: float | None = None
    std: float | None = None
    recognised_as: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "path", _absolute(self.path))

    def missing(self, needs_bottleneck: bool = True) -> list[str]:
        """The flags a graph that is not recognised needs, of those not given."""
        wanted = (("--input-tensor", self.input_tensor),
                  ("--bottleneck-tensor", self.bottleneck_tensor if needs_bottleneck else ""),
                  ("--input-size", self.input_size))
        return [flag for flag, value in wanted if value is None]

    def problems(self, flag: str = "--graph", needs_bottleneck: bool = True) -> list[str]:
        out = []
        if not self.path.is_file():
            out.append(f"{flag} {self.path}: no such file")
        if self.input_size is not None and self.input_size <= 0:
            out.append(f"--input-size {self.input_size}: must be a positive number of pixels")
        if self.std == 0:
            out.append("--std 0: would divide by zero; use 127.5 for [-1,1] or 255 for [0,1] inputs")
        if not out:
            try:
                self.resolved(flag, needs_bottleneck)
            except PipelineError as err:
                out.append(str(err))
        return out

    def resolved(self, flag: str = "--graph", needs_bottleneck: bool = True) -> "CustomGraph":
        """Every field filled: from the options, else from the catalog row the graph matches.

        Args:
            flag: the option that named the graph, for messages.
            needs_bottleneck: False for an adopted graph (no bottleneck is computed).

        Raises:
            ConfigError: a field is missing and the graph matches no catalog row, or rows that
                disagree on what is missing (the message names the flags to give).
            GraphError: the graph cannot be read (only when it has to be recognised).
        """
        missing = self.missing(needs_bottleneck)
        if not missing:
            return dataclasses.replace(self, mean=_or(self.mean, DEFAULT_NORMALISATION),
                                       std=_or(self.std, DEFAULT_NORMALISATION))
        rows = _recognised(self.path, self.input_tensor, self.bottleneck_tensor, self.input_size)
        if not rows:
            raise ConfigError(
                f"{flag} {self.path} also needs {', '.join(missing)}: it matches no catalog backbone "
                f"by its tensor names and shapes (see `edgepipe inspect {self.path}`)")
        feeds = {name: (spec.input_tensor, bottleneck, spec.input_size, _or(self.mean, spec.preprocessing.mean),
                        _or(self.std, spec.preprocessing.std)) for name, spec, bottleneck in rows}
        if len(set(feeds.values())) > 1:
            differ = [f for k, f in enumerate(("--input-tensor", "--bottleneck-tensor", "--input-size", "--mean",
                                               "--std")) if len({v[k] for v in feeds.values()}) > 1]
            raise ConfigError(
                f"{flag} {self.path} matches catalog backbones {', '.join(feeds)} by its tensor names and shapes, "
                f"and they differ in {', '.join(differ)}; give {', '.join(differ)} to choose")
        name, (input_tensor, bottleneck, size, mean, std) = next(iter(feeds.items()))
        return CustomGraph(self.path, input_tensor, bottleneck, size, mean, std, recognised_as=name)

    def describe(self) -> str:
        """One line for the log: what the graph was recognised as and what that gave."""
        return (f"recognised as catalog backbone {self.recognised_as} by its tensor names and shapes "
                f"(input {self.input_tensor} {self.input_size}x{self.input_size}, bottleneck "
                f"{self.bottleneck_tensor}; normalisation (x - {self.mean:g}) / {self.std:g}, from models/backbones.toml)")


def _or(value, default):
    return default if value is None else value


def _graph_key(path: Path) -> tuple:
    st = Path(path).stat()
    return str(Path(path).resolve()), st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=4)
def _graph_def(key: tuple):
    from pipeline.graph import load_graph_def

    return load_graph_def(Path(key[0]))


@functools.lru_cache(maxsize=16)
def _recognised_cached(key: tuple, input_tensor, bottleneck_tensor, input_size) -> tuple:
    from pipeline.catalog import recognise

    found = recognise(_graph_def(key), input_tensor=input_tensor, bottleneck_tensor=bottleneck_tensor,
                      input_size=input_size)
    return tuple((spec.name, spec, bottleneck) for spec, bottleneck in found)


def _recognised(path: Path, input_tensor, bottleneck_tensor, input_size) -> tuple:
    """(name, row, bottleneck found) of each catalog row the graph matches; read once per file."""
    return _recognised_cached(_graph_key(path), input_tensor, bottleneck_tensor, input_size)


@functools.lru_cache(maxsize=16)
def _model_outputs_cached(key: tuple, output_tensor):
    from pipeline.graph import model_outputs

    return model_outputs(_graph_def(key), output_tensor)


def read_labels(path: Path) -> list[str]:
    """The class names of a ``--labels`` file: one per line, in output order (poets'
    ``retrained_labels.txt``); surrounding spaces and trailing blank lines are dropped.

    Raises:
        ConfigError: the file cannot be read, is empty, or has a blank or repeated label.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(f"--labels {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        why = err.strerror if isinstance(err, OSError) else "not UTF-8 text"
        raise ConfigError(f"--labels {path}: cannot read it ({why}); give a text file, one class name per line") from None
    labels = [line.strip() for line in text.splitlines()]
    while labels and not labels[-1]:
        labels.pop()
    if not labels:
        raise ConfigError(f"--labels {path}: the file is empty; give one class name per line, in output order")
    blank = [k + 1 for k, label in enumerate(labels) if not label]
    if blank:
        raise ConfigError(f"--labels {path}: line {blank[0]} is blank; give one class name per line, in output order")
    seen: set[str] = set()
    for label in labels:
        if label in seen:
            raise ConfigError(f"--labels {path}: {label!r} is there twice; each output needs its own name")
        seen.add(label)
    return labels


@dataclass(frozen=True)
class Adoption:
    """``--model-graph``: the graph is the whole classifier, its head included; nothing is trained.

    The graph and how to feed it are :attr:`RunConfig.graph`. The retrain stage writes the split
    and the labels, the export stage wraps the graph (with its normalisation) into the SavedModel,
    and quantize, tfjs and verify run as usual.

    Attributes:
        output_tensor: the graph's probabilities (``--output-tensor``); None: found as
            ``edgepipe inspect`` lists outputs (the terminal Softmax, e.g. poets' ``final_result:0``).
        labels: one class name per line in output order (``--labels``); None: ``0`` .. ``C-1``.
    """

    output_tensor: str | None = None
    labels: Path | None = None

    def __post_init__(self):
        if self.labels is not None:
            object.__setattr__(self, "labels", _absolute(self.labels))

    def outputs(self, graph: CustomGraph):
        """The graph's output (``graph.ModelOutputs``), read once per file.

        Raises:
            GraphError: see ``graph.model_outputs``.
        """
        return _model_outputs_cached(_graph_key(graph.path), self.output_tensor)

    def problems(self, graph: CustomGraph) -> list[str]:
        """What stops adopting ``graph``: no output found, or labels that do not fit it."""
        try:
            outputs = self.outputs(graph)
        except PipelineError as err:
            return [str(err)]
        if self.labels is None:
            return []
        try:
            labels = read_labels(self.labels)
        except ConfigError as err:
            return [str(err)]
        if len(labels) != outputs.classes:
            return [f"--labels {self.labels}: {len(labels)} labels, but the graph's output {outputs.probabilities} "
                    f"has {outputs.classes} classes; give one label per output, in output order (or leave out "
                    f"--labels to name them 0..{outputs.classes - 1})"]
        return []

    def to_dict(self) -> dict:
        return {"output_tensor": self.output_tensor, "labels": None if self.labels is None else str(self.labels)}


# Options that train a head: given explicitly, they contradict --model-graph (whose head is kept).
_TRAINING_OPTIONS = ("epochs", "steps", "batch_size", "validation_batch_size", "learning_rate", "l2", "hidden_units",
                     "dropout", "label_smoothing", "class_weights", "early_stopping", "eval_every", "checkpoint_every",
                     "seed", "summaries_dir", "print_misclassified", "augment_copies", "flip_left_right",
                     "random_crop", "random_scale", "random_brightness", "fine_tune", "fine_tune_from",
                     "fine_tune_epochs", "fine_tune_learning_rate")
_ADOPT_OPTIONS = ("output_tensor", "labels")


ENGINES = ("local", "beam")
# Beam's runners by the names its --runner option takes (the portable ones run the same pipeline).
BEAM_RUNNERS = ("DirectRunner", "PrismRunner", "DataflowRunner", "FlinkRunner", "SparkRunner", "PortableRunner")
LOCAL_BEAM_RUNNERS = ("DirectRunner", "PrismRunner")  # their workers share this machine's folders


@dataclass(frozen=True)
class BeamConfig:
    """Where the ``--engine beam`` passes run.

    Attributes:
        runner: a Beam runner by name (``--beam-runner``).
        options: further Beam pipeline options, passed through as they are
            (``--beam-option=--flink_master=HOST:8081``, repeatable).
    """

    runner: str = "DirectRunner"
    options: tuple[str, ...] = ()

    def problems(self) -> list[str]:
        import importlib.util
        from difflib import get_close_matches

        out = []
        if importlib.util.find_spec("apache_beam") is None:
            out.append("--engine beam: Apache Beam is not installed; run `make setup-beam` "
                       "(pip install -c requirements.lock -e '.[beam]')")
        if self.runner not in BEAM_RUNNERS:
            near = get_close_matches(self.runner, BEAM_RUNNERS, 1, 0.5)
            hint = f"did you mean {near[0]}? " if near else ""
            out.append(f"--beam-runner {self.runner}: unknown; {hint}choose from {', '.join(BEAM_RUNNERS)}")
        bad = [o for o in self.options if not o.startswith("--") or o == "--"]
        if bad:
            out.append(f"--beam-option {bad[0]}: give a Beam pipeline option as Beam spells it, "
                       "e.g. --beam-option=--direct_num_workers=4")
        given = beam_option_values(self.options)
        if "runner" in given:
            out.append("--beam-option --runner: name the runner with --beam-runner")
        if self.runner in BEAM_RUNNERS and self.runner not in LOCAL_BEAM_RUNNERS and "temp_location" not in given:
            out.append(f"--beam-runner {self.runner}: give --beam-option=--temp_location=URL (gs://, s3://, hdfs://, "
                       "or a folder every worker and this machine share): the workers write their results there "
                       "for edgepipe to read")
        return out


def beam_option_values(options: Sequence[str]) -> dict[str, str | None]:
    """``--name=value`` Beam options by name (dashes as underscores, as Beam parses them)."""
    out: dict[str, str | None] = {}
    for opt in options:
        name, _, value = opt[2:].partition("=")
        out[name.replace("-", "_")] = value or None
    return out


def engine_problems(engine: str, beam: BeamConfig, given: Collection[str] = ()) -> list[str]:
    """Problems with ``--engine`` and, for Beam, its runner and options (``given``: the options
    set explicitly; Beam's given with the local engine would be ignored, so they are refused)."""
    if engine not in ENGINES:
        return [f"--engine {engine}: choose local (the default) or beam"]
    if engine == "beam":
        return beam.problems()
    stray = [f"--{k.replace('_', '-')}" for k in ("beam_runner", "beam_options") if k in given]
    return [f"{' and '.join(stray)} need --engine beam (the local engine is running)"] if stray else []


_PATH_FIELDS = ("out", "images", "test_images", "cache_dir", "summaries_dir")
_URL_FIELDS = ("images", "test_images", "bottleneck_cache")  # may name a URL on a Beam filesystem


def _is_url(value: object) -> bool:
    return "://" in str(value)


def _absolute(value) -> Path:
    """A path as given, made absolute against the working directory (not resolved: symlinks and
    the user's names stay), so a run started with ``--images ../photos`` resumes from anywhere."""
    return Path(os.path.abspath(value))


@dataclass(frozen=True)
class RunConfig:
    """Every option of a run. Paths may be given as strings and enums as their values.

    Build one directly, or take a run directory's saved configuration with changed options from
    :func:`resume`; :func:`pipeline.run` validates it and runs the stages.
    """

    out: Path
    images: Path | None = None
    test_images: Path | None = None
    backbone: str = DEFAULT_BACKBONE
    graph: CustomGraph | None = None
    adopt: Adoption | None = None  # set: `graph` is a whole classifier (--model-graph), not a backbone
    validation_pct: float = 10.0
    test_pct: float = 10.0
    train: TrainConfig = field(default_factory=TrainConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    bottleneck_tensor: str | None = None
    summaries_dir: Path | None = None
    print_misclassified: bool = False
    stress: bool = False
    tfjs_shard_mb: float = 4.0
    app_preprocessing: AppPreprocessing = field(default_factory=AppPreprocessing)
    quant_modes: tuple[QuantMode, ...] = tuple(QuantMode)
    tfjs_modes: tuple[TfjsMode, ...] = (TfjsMode.FLOAT32, TfjsMode.FLOAT16)
    runtimes: tuple[Runtime, ...] = DEFAULT_RUNTIMES
    gates: dict[str, float] = field(default_factory=dict)  # overrides of DEFAULT_GATES only
    calibration_images: int = 100
    int8_repair: bool | None = None  # None: repair only when plain int8 misses its gate on validation
    int8_repair_max_size: float = 100.0  # percent of the float32 file's size a repaired file may reach
    max_accuracy_drop: float = 1.0  # points of accuracy int8 and dynamic variants may lose against the reference
    runtime_timeout_s: float = 600.0
    latency_runs: int = 30
    arm64_cpu: str = ARM64_CPUS[0]
    arm64_sample: int = 64
    deploy_artifact: str | None = None
    engine: str = "local"
    beam_runner: str = BeamConfig.runner
    beam_options: tuple[str, ...] = ()
    bottleneck_cache: str | None = None  # default: <cache_dir>/bottlenecks; a URL with the Beam engine
    cache_dir: Path | None = None
    mirror: str | None = None
    offline: bool = False
    progress: bool = True

    def __post_init__(self):
        for key in _PATH_FIELDS:
            value = getattr(self, key)
            # Image folders may be URLs on a Beam filesystem (gs://...), which Path would mangle.
            if value is not None and not (key in _URL_FIELDS and _is_url(value)):
                object.__setattr__(self, key, _absolute(value))
        if self.bottleneck_cache is not None and not _is_url(self.bottleneck_cache):
            object.__setattr__(self, "bottleneck_cache", str(_absolute(self.bottleneck_cache)))
        object.__setattr__(self, "quant_modes", tuple(QuantMode(m) for m in self.quant_modes))
        object.__setattr__(self, "tfjs_modes", tuple(TfjsMode(m) for m in self.tfjs_modes))
        # Unknown runtime names stay strings so problems() can list them with the others.
        object.__setattr__(self, "runtimes", tuple(_enum_or_raw(Runtime, r) for r in self.runtimes))
        object.__setattr__(self, "beam_options", tuple(self.beam_options))

    @property
    def beam(self) -> BeamConfig | None:
        """Where the data-parallel passes run on Beam; None for the local engine."""
        return BeamConfig(self.beam_runner, self.beam_options) if self.engine == "beam" else None

    def gate(self, artifact: str) -> float:
        """Minimum top-1 agreement for an artifact: the user's override, else the default."""
        return self.gates.get(artifact, DEFAULT_GATES.get(artifact, 1.0))

    @property
    def graph_flag(self) -> str:
        """The option that names :attr:`graph`: ``--model-graph`` when adopted, else ``--graph``."""
        return "--model-graph" if self.adopt is not None else "--graph"

    def resolved(self) -> "RunConfig":
        """This configuration with :attr:`graph` resolved (:meth:`CustomGraph.resolved`).

        Raises:
            ConfigError, GraphError: the graph cannot be resolved (:func:`validate` reports it first).
        """
        if self.graph is None:
            return self
        return dataclasses.replace(self, graph=self.graph.resolved(self.graph_flag, self.adopt is None))

    def backbone_spec(self) -> BackboneSpec:
        if self.graph:
            g = self.resolved().graph
            features = get_backbone(g.recognised_as).feature_size if g.recognised_as else 0
            return custom_backbone(g.path, g.input_tensor, g.bottleneck_tensor or "", g.input_size, g.mean, g.std,
                                   features, recognised_as=g.recognised_as,
                                   prefix="adopted" if self.adopt is not None else "custom")
        spec = get_backbone(self.backbone)
        if self.bottleneck_tensor:
            # A catalog graph with another feature tensor (e.g. poets' 1001 logits for comparison).
            spec = dataclasses.replace(spec, bottleneck_tensor=self.bottleneck_tensor, feature_size=0, alternates=())
        return spec

    def problems(self, needs_images: bool = True, given: Collection[str] = ()) -> list[str]:
        """Every problem with these options, in the order the command line lists them.

        Args:
            needs_images: the stages to run read the image folders (all but fetch).
            given: names of the options set explicitly; an option given explicitly can
                contradict another one, a default cannot.
        """
        from pipeline.dataset import folder_problems

        problems: list[str] = []
        urls = [f"--{k.replace('_', '-')} {getattr(self, k)}" for k in _URL_FIELDS if _is_url(getattr(self, k))]
        if urls:
            import importlib.util

            import pipeline.storage as storage

            if importlib.util.find_spec("apache_beam") is None:
                problems.append(f"{', '.join(urls)}: a URL is read through Apache Beam's filesystems; run "
                                "`make setup-beam` (pip install -c requirements.lock -e '.[beam]')")
            storage.configure(self.beam_options)  # e.g. --s3_endpoint_url, for the listing below
        if _is_url(self.bottleneck_cache) and self.engine != "beam":
            problems.append(f"--bottleneck-cache {self.bottleneck_cache}: a cache on a URL is written by Beam's "
                            "workers; add --engine beam or give a local folder")
        if needs_images:
            if self.images is None:
                problems.append("--images DIR is required (one sub-folder per class)")
            elif not _is_url(self.images) and not self.images.is_dir():
                problems.append(f"--images {self.images}: no such folder")
            if self.test_images is not None and not _is_url(self.test_images) and not self.test_images.is_dir():
                problems.append(f"--test-images {self.test_images}: no such folder")
        if self.graph is None:
            try:
                get_backbone(self.backbone)
            except PipelineError as err:
                problems.append(str(err))
            if self.adopt is not None:
                problems.append("adopting a model needs its graph: pass --model-graph FILE.pb")
        else:
            graph_problems = self.graph.problems(self.graph_flag, needs_bottleneck=self.adopt is None)
            problems += graph_problems
            if self.adopt is not None and not graph_problems:
                problems += self.adopt.problems(self.graph)
        problems += self._adoption_contradictions(given)
        split_ok = self.validation_pct >= 0 and self.test_pct >= 0 and self.validation_pct + self.test_pct < 100
        if not split_ok:
            problems.append(
                f"--validation-pct {self.validation_pct} and --test-pct {self.test_pct} must be ≥ 0 and add up to < 100"
            )
        problems += self.train.problems()
        problems += self._fine_tune_problems()
        problems += self.augment.problems()
        unknown = [str(r) for r in self.runtimes if r not in ALL_RUNTIMES]
        if unknown:
            problems.append(f"--runtime {', '.join(unknown)}: unknown; choose from {', '.join(ALL_RUNTIMES)} "
                            "(see `edgepipe runtimes`)")
        if not self.tfjs_shard_mb > 0:
            problems.append(f"--tfjs-shard-mb {self.tfjs_shard_mb}: must be positive (4 is the converter's default)")
        if self.calibration_images < 1:
            problems.append(f"--calibration-images {self.calibration_images}: must be at least 1")
        if not 0 < self.int8_repair_max_size <= 100:
            problems.append(f"--int8-repair-max-size {self.int8_repair_max_size:g}: a percentage of the float32 "
                            "file's size, more than 0 and at most 100")
        if not 0 <= self.max_accuracy_drop <= 100:
            problems.append(f"--max-accuracy-drop {self.max_accuracy_drop:g}: points of accuracy, 0 to 100")
        if self.int8_repair and QuantMode.INT8 not in self.quant_modes:
            problems.append("--int8-repair repairs the int8 file: add --quant int8")
        if self.latency_runs < 0:
            problems.append(f"--latency-runs {self.latency_runs}: must be 0 (no latency figures) or more")
        if self.arm64_cpu not in ARM64_CPUS:
            problems.append(f"--arm64-cpu {self.arm64_cpu}: use {' (Pi 4) or '.join(ARM64_CPUS)} (Pi 5)")
        if self.deploy_artifact is not None and (not self.deploy_artifact.startswith("tflite-")
                                                 or self.deploy_artifact not in DEFAULT_GATES):
            problems.append(f"--deploy-artifact {self.deploy_artifact}: name a TFLite variant, one of "
                            f"{', '.join(k for k in DEFAULT_GATES if k.startswith('tflite-'))}")
        if self.arm64_sample < 0:
            problems.append(f"--arm64-sample {self.arm64_sample}: must be 0 (every test image) or more")
        if not self.runtime_timeout_s > 0:
            problems.append(f"--runtime-timeout {self.runtime_timeout_s:g}: must be a positive number of seconds")
        problems += engine_problems(self.engine, BeamConfig(self.beam_runner, self.beam_options), given)
        if self.test_images is not None and "test_pct" in given and self.test_pct != 0:
            # The holdout folder replaces the percentage split; silently ignoring the percentage
            # would leave the user believing part of --images is held out.
            problems.append(f"--test-pct {self.test_pct:g} contradicts --test-images {self.test_images} (that folder "
                            "is the test split); drop --test-pct")
        folders_ok = needs_images and self.images is not None and (_is_url(self.images) or self.images.is_dir()) and (
            self.test_images is None or _is_url(self.test_images) or self.test_images.is_dir())
        if folders_ok and split_ok:
            problems += folder_problems(self.images, self.test_images, self.validation_pct, self.test_pct)
        return problems

    @property
    def catalog_row(self) -> str | None:
        """The catalog backbone this run's graph is: ``backbone``, or the row ``graph`` was
        recognised as (None for a graph the catalog does not know)."""
        if self.graph is None:
            return self.backbone
        return self.graph.recognised_as

    def _fine_tune_problems(self) -> list[str]:
        """``--fine-tune N`` needs a backbone whose blocks the catalog names, and N of them."""

        n = self.train.fine_tune
        if not n or self.adopt is not None or (self.graph is None and self.backbone not in load_catalog()):
            return []
        try:
            row = self.resolved().catalog_row if self.graph is not None else self.backbone
        except PipelineError:
            return []  # the graph's own problem is reported
        blocks = fine_tune_blocks(row)
        if not blocks:
            what = f"catalog backbone {row}" if row else f"{self.graph_flag} {self.graph.path.name} (not a catalog architecture)"
            return [f"--fine-tune {n}: the catalog names no blocks for {what}; cut the graph at a tensor with "
                    "--fine-tune-from TENSOR instead"]
        if n > len(blocks):
            return [f"--fine-tune {n}: {row} has {len(blocks)} blocks to fine-tune; give 1..{len(blocks)}, or "
                    "--fine-tune-from TENSOR"]
        return []

    def _adoption_contradictions(self, given: Collection[str]) -> list[str]:
        """Options given explicitly that contradict adopting a graph, or need it."""
        out = []
        if "graph" in given and "model_graph" in given:
            out.append("--graph and --model-graph: give one (--graph trains a new head on a backbone, "
                       "--model-graph adopts a graph that already has its head)")
        if self.adopt is not None:
            where = f"--model-graph {self.graph.path}" if self.graph is not None else "--model-graph"
            if "backbone" in given:
                out.append(f"--backbone {self.backbone} contradicts {where}: the adopted graph is the whole model; "
                           "drop --backbone")
            training = [f"--{k.replace('_', '-')}" for k in _TRAINING_OPTIONS if k in given]
            if training:
                out.append(f"{', '.join(training)} contradict{'s' if len(training) == 1 else ''} {where}: its head is "
                           f"kept as it is and nothing is trained; drop {'it' if len(training) == 1 else 'them'}")
        else:
            orphans = [f"--{k.replace('_', '-')}" for k in _ADOPT_OPTIONS if k in given]
            if orphans:
                out.append(f"{', '.join(orphans)} need{'s' if len(orphans) == 1 else ''} --model-graph FILE.pb "
                           "(with --graph or --backbone the labels are the class folders' names)")
        return out

    def with_options(self, **options: Any) -> "RunConfig":
        """A copy with options changed, named as on the command line; None means "not given".

        Accepts every :class:`RunConfig` field plus the flat names of the nested settings:
        ``graph`` (a path; takes ``input_tensor``, ``bottleneck_tensor``, ``input_size``,
        ``mean``/``std``, all found by recognising the graph when it is a catalog architecture),
        ``model_graph`` (the same for a graph to adopt whole, with ``output_tensor`` and
        ``labels``), the :class:`TrainConfig` fields (``epochs``, ``seed``, ...),
        ``augment_copies``, ``flip_left_right``, ``random_crop``, ``random_scale``,
        ``random_brightness``, ``gates`` (a mapping or ``ARTIFACT=VALUE`` strings, merged over the
        saved ones) and ``app_preprocessing`` (an :class:`AppPreprocessing` or ``KEY=VALUE``
        strings; given at all, it replaces the saved setting).

        Options that contradict each other are kept for :meth:`problems` to report, all at once.

        Raises:
            ConfigError: a malformed gate or app-preprocessing item, or an unknown option name.
        """
        given = {k: v for k, v in options.items() if v is not None}
        graph_opts = {k: given.pop(k, None) for k in _GRAPH_KEYS}
        adopt_opts = {k: given.pop(k, None) for k in _ADOPT_OPTIONS}
        train = {k: given.pop(k) for k in _TRAIN_KEYS if k in given}
        augment = {_AUGMENT_KEYS[k]: given.pop(k) for k in list(given) if k in _AUGMENT_KEYS}
        gates = given.pop("gates", None)
        app = given.pop("app_preprocessing", None)
        unknown = sorted(set(given) - {f.name for f in dataclasses.fields(RunConfig)})
        if unknown:
            raise ConfigError(f"unknown option(s) {', '.join(unknown)}")
        for key in ("quant_modes", "tfjs_modes", "runtimes", "beam_options"):
            if key in given:
                given[key] = tuple(given[key])
                if not given[key]:
                    given.pop(key)  # an empty list on the command line means "not given"
        path = graph_opts["model_graph"] if graph_opts["model_graph"] is not None else graph_opts["graph"]
        if path is not None:
            # What is not given is found when the configuration is validated (CustomGraph.resolved).
            given["graph"] = CustomGraph(
                path=Path(path), input_tensor=graph_opts["input_tensor"],
                bottleneck_tensor=given.pop("bottleneck_tensor", None), input_size=graph_opts["input_size"],
                mean=graph_opts["mean"], std=graph_opts["std"],
            )
            given["adopt"] = Adoption(**adopt_opts) if graph_opts["model_graph"] is not None else None
        elif self.adopt is not None and any(v is not None for v in adopt_opts.values()):
            given["adopt"] = dataclasses.replace(self.adopt, **{k: v for k, v in adopt_opts.items() if v is not None})
        if "backbone" in given and "graph" not in given:
            given["graph"] = None
            given["adopt"] = None
        cfg = dataclasses.replace(self, **given)
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **train),
                                  augment=dataclasses.replace(cfg.augment, **augment))
        if gates:
            parsed = dict(gates) if isinstance(gates, Mapping) else parse_gates(gates)
            cfg = dataclasses.replace(cfg, gates={**cfg.gates, **parsed})
        if app is not None:
            # Given at all (even as contract values) replaces the saved setting: "--app-preprocessing
            # channel_order=RGB" brings a run directory back to the contract.
            if not isinstance(app, AppPreprocessing):
                app = parse_app_preprocessing(app)
            cfg = dataclasses.replace(cfg, app_preprocessing=app)
        return cfg

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["quant_modes"] = [m.value for m in self.quant_modes]
        d["tfjs_modes"] = [m.value for m in self.tfjs_modes]
        return _paths_as_text(d)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        """Inverse of :meth:`to_dict` (a run directory's saved configuration)."""
        d = dict(d)
        for key in _PATH_FIELDS:
            d[key] = d[key] if d.get(key) not in (None, "None") else None
        if d.get("graph"):
            d["graph"] = CustomGraph(**d["graph"])
        if d.get("adopt"):
            d["adopt"] = Adoption(**d["adopt"])
        d["train"] = TrainConfig(**d.get("train", {}))
        d["augment"] = AugmentConfig(**d.get("augment", {}))
        d["app_preprocessing"] = AppPreprocessing(**d.get("app_preprocessing", {}))
        d["quant_modes"] = tuple(d.get("quant_modes", tuple(QuantMode)))
        d["tfjs_modes"] = tuple(d.get("tfjs_modes", (TfjsMode.FLOAT32, TfjsMode.FLOAT16)))
        d["runtimes"] = tuple(d.get("runtimes", DEFAULT_RUNTIMES))
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def _paths_as_text(value):
    """``value`` with every Path (nested ones too: the graph's, the labels') as a string, so the
    manifest's configuration is the same in memory as in its JSON."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {k: _paths_as_text(v) for k, v in value.items()}
    return value


_TRAIN_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig))
_AUGMENT_KEYS = {"augment_copies": "copies", "flip_left_right": "flip", "random_crop": "crop",
                 "random_scale": "scale", "random_brightness": "brightness"}
_GRAPH_KEYS = ("graph", "model_graph", "input_tensor", "input_size", "mean", "std")


def validate(cfg: RunConfig, needs_images: bool = True, given: Collection[str] = ()) -> None:
    """Checks every option at once and raises one ConfigError listing all problems.

    The image folders are listed too (no image is read), so an empty class folder or a single
    class is reported here, before anything is downloaded or computed. See
    :meth:`RunConfig.problems` for the arguments.
    """
    problems = cfg.problems(needs_images, given)
    if problems:
        raise ConfigError("; ".join(problems))


def load_config(out: Path | str) -> RunConfig | None:
    """The configuration saved in a run directory's manifest, or None for a new directory."""
    from pipeline.rundir import read_json

    out = Path(out)
    saved = (read_json(out / "manifest.json", default={}) or {}).get("config")
    return RunConfig.from_dict({**saved, "out": str(out)}) if saved else None


def resume(out: Path | str, **options: Any) -> RunConfig:
    """A run directory's saved configuration (defaults for a new one) with ``options`` over it.

    Options are named as in :meth:`RunConfig.with_options`; None means "keep the saved value".
    """
    base = load_config(out) or RunConfig(out=Path(out))
    return base.with_options(**options)

"""The resolved configuration of a run, validated before any expensive work."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Collection

from pipeline.augment import AugmentConfig
from pipeline.catalog import DEFAULT_BACKBONE, custom_backbone, get_backbone
from pipeline.dataset import folder_problems
from pipeline.errors import ConfigError, PipelineError
from pipeline.retrain import TrainConfig
from pipeline.stress import AppPreprocessing
from pipeline.types import BackboneSpec, QuantMode, TfjsMode
from pipeline.verify import DEFAULT_GATES

ALL_RUNTIMES = ("tflite-runtime", "ai-edge-litert", "tfjs-wasm", "mediapipe-tasks")
# mediapipe-tasks (the TFLite files through MediaPipe's ImageClassifier, reading their metadata)
# runs when asked for with --runtime.
DEFAULT_RUNTIMES = ("tflite-runtime", "ai-edge-litert", "tfjs-wasm")


@dataclass(frozen=True)
class CustomGraph:
    """A user's own frozen graph (``--graph``) and how to feed it."""

    path: Path
    input_tensor: str
    bottleneck_tensor: str
    input_size: int
    mean: float = 127.5
    std: float = 127.5


@dataclass(frozen=True)
class RunConfig:
    out: Path
    images: Path | None = None
    test_images: Path | None = None
    backbone: str = DEFAULT_BACKBONE
    graph: CustomGraph | None = None
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
    runtimes: tuple[str, ...] = DEFAULT_RUNTIMES
    gates: dict[str, float] = field(default_factory=dict)  # overrides of DEFAULT_GATES only
    calibration_images: int = 100
    runtime_timeout_s: float = 600.0
    cache_dir: Path | None = None
    mirror: str | None = None
    offline: bool = False
    progress: bool = True

    def gate(self, artifact: str) -> float:
        """Minimum top-1 agreement for an artifact: the user's override, else the default."""
        return self.gates.get(artifact, DEFAULT_GATES.get(artifact, 1.0))

    def backbone_spec(self) -> BackboneSpec:
        if self.graph:
            g = self.graph
            return custom_backbone(g.path, g.input_tensor, g.bottleneck_tensor, g.input_size, g.mean, g.std)
        spec = get_backbone(self.backbone)
        if self.bottleneck_tensor:
            # A catalog graph with another feature tensor (e.g. poets' 1001 logits for comparison).
            spec = dataclasses.replace(spec, bottleneck_tensor=self.bottleneck_tensor, feature_size=0, alternates=())
        return spec

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["quant_modes"] = [m.value for m in self.quant_modes]
        d["tfjs_modes"] = [m.value for m in self.tfjs_modes]
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


def parse_gates(items: list[str]) -> dict[str, float]:
    """``["tflite-int8=0.95", ...]`` → ``{"tflite-int8": 0.95}`` (overrides of the defaults).

    Raises:
        ConfigError: a malformed item, an unknown artifact or a value outside 0..1.
    """
    gates: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = -1.0
        if not sep or name not in DEFAULT_GATES or not 0.0 <= number <= 1.0:
            raise ConfigError(
                f"--gate {item!r}: expected ARTIFACT=VALUE with VALUE in 0..1 and ARTIFACT one of "
                f"{', '.join(DEFAULT_GATES)}"
            )
        gates[name] = number
    return gates


def validate(cfg: RunConfig, needs_images: bool = True, given: Collection[str] = ()) -> None:
    """Checks every option at once and raises one ConfigError listing all problems.

    The image folders are listed too (no image is read), so an empty class folder or a single
    class is reported here, before anything is downloaded or computed.

    Args:
        given: names of the options given on the command line; an option given explicitly can
            contradict another one, a default cannot.
    """
    problems: list[str] = []
    if needs_images:
        if cfg.images is None:
            problems.append("--images DIR is required (one sub-folder per class)")
        elif not Path(cfg.images).is_dir():
            problems.append(f"--images {cfg.images}: no such folder")
        if cfg.test_images is not None and not Path(cfg.test_images).is_dir():
            problems.append(f"--test-images {cfg.test_images}: no such folder")
    if cfg.graph is None:
        try:
            get_backbone(cfg.backbone)
        except PipelineError as err:
            problems.append(str(err))
    else:
        if not Path(cfg.graph.path).is_file():
            problems.append(f"--graph {cfg.graph.path}: no such file")
        if cfg.graph.input_size <= 0:
            problems.append(f"--input-size {cfg.graph.input_size}: must be a positive number of pixels")
        if cfg.graph.std == 0:
            problems.append("--std 0: would divide by zero; use 127.5 for [-1,1] or 255 for [0,1] inputs")
    if cfg.validation_pct < 0 or cfg.test_pct < 0 or cfg.validation_pct + cfg.test_pct >= 100:
        problems.append(
            f"--validation-pct {cfg.validation_pct} and --test-pct {cfg.test_pct} must be ≥ 0 and add up to < 100"
        )
    t = cfg.train
    if t.epochs < 1:
        problems.append(f"--epochs {t.epochs}: must be at least 1")
    if t.batch_size < 1:
        problems.append(f"--batch-size {t.batch_size}: must be at least 1")
    if not t.learning_rate > 0:
        problems.append(f"--learning-rate {t.learning_rate}: must be positive")
    if t.steps is not None and t.steps < 1:
        problems.append(f"--steps {t.steps}: must be at least 1")
    if not 0 <= t.dropout < 1:
        problems.append(f"--dropout {t.dropout}: must be in [0, 1)")
    if t.dropout and not t.hidden_units:
        problems.append(f"--dropout {t.dropout} needs --hidden-units N (dropout applies to the hidden layer)")
    if not 0 <= t.label_smoothing < 1:
        problems.append(f"--label-smoothing {t.label_smoothing}: must be in [0, 1)")
    if t.class_weights not in ("none", "balanced"):
        problems.append(f"--class-weights {t.class_weights!r}: use 'none' or 'balanced'")
    if t.eval_every < 1:
        problems.append(f"--eval-every {t.eval_every}: must be at least 1")
    a = cfg.augment
    if a.copies < 0 or a.crop < 0 or a.scale < 0 or not 0 <= a.brightness < 100:
        problems.append("augmentation: --augment-copies, --random-crop and --random-scale must be ≥ 0, "
                        "--random-brightness in [0, 100)")
    if (a.flip or a.crop or a.scale or a.brightness) and a.copies == 0:
        problems.append("augmentation options need --augment-copies N (how many augmented copies to cache per image)")
    unknown = [r for r in cfg.runtimes if r not in ALL_RUNTIMES]
    if unknown:
        problems.append(f"--runtime {', '.join(unknown)}: unknown; choose from {', '.join(ALL_RUNTIMES)}")
    if not cfg.tfjs_shard_mb > 0:
        problems.append(f"--tfjs-shard-mb {cfg.tfjs_shard_mb}: must be positive (4 is the converter's default)")
    if cfg.calibration_images < 1:
        problems.append(f"--calibration-images {cfg.calibration_images}: must be at least 1")
    if not cfg.runtime_timeout_s > 0:
        problems.append(f"--runtime-timeout {cfg.runtime_timeout_s:g}: must be a positive number of seconds")
    if cfg.test_images is not None and "test_pct" in given and cfg.test_pct != 0:
        # The holdout folder replaces the percentage split; silently ignoring the percentage
        # would leave the user believing part of --images is held out.
        problems.append(f"--test-pct {cfg.test_pct:g} contradicts --test-images {cfg.test_images} (that folder is "
                        "the test split); drop --test-pct")
    folders_ok = needs_images and cfg.images is not None and Path(cfg.images).is_dir() and (
        cfg.test_images is None or Path(cfg.test_images).is_dir())
    if folders_ok and 0 <= cfg.validation_pct and 0 <= cfg.test_pct and cfg.validation_pct + cfg.test_pct < 100:
        problems += folder_problems(cfg.images, cfg.test_images, cfg.validation_pct, cfg.test_pct)
    if problems:
        raise ConfigError("; ".join(problems))




def from_dict(d: dict) -> RunConfig:
    """Inverse of :meth:`RunConfig.to_dict` (used to reuse a run directory's configuration)."""
    d = dict(d)
    for key in ("out", "images", "test_images", "cache_dir", "summaries_dir"):
        if d.get(key) not in (None, "None"):
            d[key] = Path(d[key])
        else:
            d[key] = None
    if d.get("graph"):
        g = dict(d["graph"])
        g["path"] = Path(g["path"])
        d["graph"] = CustomGraph(**g)
    d["train"] = TrainConfig(**d.get("train", {}))
    d["augment"] = AugmentConfig(**d.get("augment", {}))
    d["app_preprocessing"] = AppPreprocessing(**d.get("app_preprocessing", {}))
    d["quant_modes"] = tuple(QuantMode(m) for m in d.get("quant_modes", [m.value for m in QuantMode]))
    d["tfjs_modes"] = tuple(TfjsMode(m) for m in d.get("tfjs_modes", ["float32", "float16"]))
    d["runtimes"] = tuple(d.get("runtimes", DEFAULT_RUNTIMES))
    known = {f.name for f in dataclasses.fields(RunConfig)}
    return RunConfig(**{k: v for k, v in d.items() if k in known})

"""``edgepipe check``: the proof a run's verify gives, for conversions made by any tool.

:func:`check` compares candidate models (TFLite, TF.js, SavedModel, Keras) with a reference
(SavedModel, Keras, frozen graph or float TFLite) on a folder of images, in every runtime of the
registry that takes each candidate, with the same rows, gates, reports and exit codes as a run's
verify (:func:`pipeline.verify.verify` does the running).

Each model is fed as it expects (:func:`resolve_preprocessing`): its size, normalisation,
channel order and resize come from what the model carries (:mod:`pipeline.formats`), else from
the command line (:class:`PrepFlags`), else a model that carries no normalisation is an error
naming the flag. A flag that contradicts what a model carries is a warning in the report, and
the report says per model where each setting came from. Outputs that are logits get softmax
before comparison. A labelled folder (``DIR/<class>/...``) whose classes match the reference's
labels gives accuracy and confusion matrices; anything else gives agreement and drift only.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from pipeline.config import BeamConfig
from pipeline.console import log
from pipeline.errors import ConfigError, DatasetError
from pipeline.formats import SETTINGS, ModelCard, read_card, read_labels
from pipeline.types import ArtifactKind, ChannelOrder, Preprocessing, ResizeMethod, Runtime, ValueRange

# --value-range as the mean and std a model's input takes: 0..255 as is, 0..1, -1..1.
VALUE_RANGES: dict[ValueRange, tuple[float, float]] = {
    ValueRange.BYTE: (0.0, 1.0), ValueRange.UNIT: (0.0, 255.0), ValueRange.SIGNED: (127.5, 127.5),
}
FLAGS = {"size": "--size", "mean": "--mean", "std": "--std", "channel_order": "--channel-order",
         "resize": "--resize"}
# Settings a model that carries none gets without a flag: how nearly every app prepares images.
DEFAULTS = {"channel_order": ChannelOrder.RGB.value, "resize": ResizeMethod.BILINEAR.value}
CHECK_RUNTIMES = (Runtime.TFLITE_RUNTIME, Runtime.LITERT, Runtime.TFJS_WASM)
TENSORFLOW_KINDS = (ArtifactKind.SAVEDMODEL, ArtifactKind.KERAS, ArtifactKind.GRAPH)
# A TensorFlow candidate (a Keras file re-saved as a SavedModel, say) runs the same float kernels
# as its reference, so it gets float32's gate rather than a gate of its own.
TENSORFLOW_GATE_KEY = "tflite-float32"


class MissingPreprocessing(ConfigError):
    """A model carries no normalisation (or size) and no flag gives it."""

    def __init__(self, path: Path, missing: list[str]):
        self.path, self.missing = Path(path), missing
        super().__init__(f"{path}: the model carries no {' or '.join(missing)} for its input; give {flags_for(missing)}")


def flags_for(missing: Sequence[str]) -> str:
    hint = {"size": "--size PIXELS", "mean": "--mean M --std S (or --value-range 0-255|0-1|-1-1)",
            "std": "--mean M --std S (or --value-range 0-255|0-1|-1-1)"}
    return " and ".join(dict.fromkeys(hint[k] for k in missing))


@dataclass(frozen=True)
class PrepFlags:
    """Preprocessing from the command line, for every model that carries none (None: not given).

    ``value_range`` is a shorthand for a mean and std (:data:`VALUE_RANGES`).
    """

    size: int | None = None
    mean: float | None = None
    std: float | None = None
    channel_order: str | None = None
    value_range: str | None = None
    resize: str | None = None

    def problems(self) -> list[str]:
        out = []
        if self.size is not None and self.size < 1:
            out.append(f"--size {self.size}: must be a positive number of pixels")
        if self.std is not None and self.std == 0:
            out.append("--std 0: would divide by zero; use 127.5 for [-1,1] inputs or 255 for [0,1]")
        if self.channel_order is not None and self.channel_order.upper() not in set(ChannelOrder):
            out.append(f"--channel-order {self.channel_order}: use RGB or BGR")
        if self.resize is not None and self.resize not in set(ResizeMethod):
            out.append(f"--resize {self.resize}: use {', '.join(ResizeMethod)}")
        if self.value_range is not None:
            if self.value_range not in set(ValueRange):
                out.append(f"--value-range {self.value_range}: use {', '.join(ValueRange)}")
            else:
                mean, std = VALUE_RANGES[ValueRange(self.value_range)]
                clash = [f"{flag} {mine:g}" for flag, mine, implied in (("--mean", self.mean, mean), ("--std", self.std, std))
                         if mine is not None and mine != implied]
                if clash:
                    out.append(f"--value-range {self.value_range} means mean {mean:g}, std {std:g}; it contradicts "
                               f"{' and '.join(clash)}: give one or the other")
        return out

    def values(self) -> dict[str, object]:
        """The given settings by name (:data:`pipeline.formats.SETTINGS`), value range resolved."""
        out: dict[str, object] = {}
        if self.value_range in set(ValueRange):
            out["mean"], out["std"] = VALUE_RANGES[ValueRange(self.value_range)]
        for key in SETTINGS:
            value = getattr(self, key)
            if value is not None:
                out[key] = value.upper() if key == "channel_order" else value
        return out

    def source(self, key: str) -> str:
        if key in ("mean", "std") and getattr(self, key) is None and self.value_range is not None:
            return f"--value-range {self.value_range}"
        return FLAGS[key]


@dataclass(frozen=True)
class CheckSettings:
    """Everything ``edgepipe check`` takes.

    Attributes:
        reference: the model the candidates must agree with.
        candidates: the converted models.
        images: a labelled folder (``DIR/<class>/...``) or a flat folder of images.
        out: where the reports go.
        flags: preprocessing for models that carry none.
        labels: ``--labels FILE`` for models that carry none.
        no_labels: agreement and drift only, even on a labelled folder.
        input_tensor, output_tensor: the reference's (a frozen graph's) input and output.
        output: ``--output NAME`` for every model that has an output of that name.
        runtimes: where TFLite and TF.js candidates run (TensorFlow models run in TensorFlow).
        gates: ``--gate`` overrides by candidate name or kind (``tflite-int8``).
        beam: run the models on the images on Apache Beam (``--engine beam``); None: here.
    """

    reference: Path
    candidates: tuple[Path, ...]
    images: Path
    out: Path
    flags: PrepFlags = field(default_factory=PrepFlags)
    labels: Path | None = None
    no_labels: bool = False
    input_tensor: str | None = None
    output_tensor: str | None = None
    output: str | None = None
    runtimes: tuple[Runtime, ...] = CHECK_RUNTIMES
    gates: Mapping[str, float] = field(default_factory=dict)
    latency_runs: int = 30
    timeout_s: float = 600.0
    beam: BeamConfig | None = None

    def problems(self) -> list[str]:
        out = self.flags.problems()
        if self.beam is not None:
            out += self.beam.problems()
        if not self.candidates:
            out.append("--candidate PATH is required (repeat it for each converted model)")
        if not Path(self.images).is_dir():
            out.append(f"--images {self.images}: no such folder")
        if self.labels is not None and not Path(self.labels).is_file():
            out.append(f"--labels {self.labels}: no such file")
        if self.latency_runs < 0:
            out.append(f"--latency-runs {self.latency_runs}: must be 0 (no latency figures) or more")
        for path in (self.reference, *self.candidates):
            if not Path(path).exists():
                out.append(f"{path}: no such file or folder")
        return out


@dataclass
class Checked:
    """One model as check runs it: its card, the preprocessing resolved for it and why."""

    name: str
    role: str
    card: ModelCard
    prep: Preprocessing
    sources: dict[str, str]
    labels: tuple[str, ...] | None
    labels_source: str
    warnings: list[str] = field(default_factory=list)

    @property
    def gate_key(self) -> str:
        """The ``DEFAULT_GATES`` entry this model's rows are gated by."""
        if self.role == "reference":
            return "reference"
        return TENSORFLOW_GATE_KEY if self.card.kind in TENSORFLOW_KINDS else self.card.gate_key

    def to_dict(self, runtimes: Sequence[str] = ()) -> dict:
        values = {"size": self.prep.size, "mean": self.prep.mean, "std": self.prep.std,
                  "channel_order": str(self.prep.channel_order), "resize": str(self.prep.resize_method)}
        inp = self.card.input
        return {
            "name": self.name, "role": self.role, "path": str(self.card.path), "format": self.card.format,
            "kind": self.gate_key, "runtimes": list(runtimes),
            "input": {"shape": None if inp.shape is None else list(inp.shape), "dtype": inp.dtype,
                      "quantization": None if inp.quantization is None else list(inp.quantization)},
            "output": {"name": self.card.output, "classes": self.card.classes},
            "labels": {"count": None if self.labels is None else len(self.labels), "source": self.labels_source},
            "preprocessing": {k: {"value": values[k], "source": self.sources[k]} for k in SETTINGS},
            "warnings": list(self.warnings),
        }


def resolve_preprocessing(card: ModelCard, flags: PrepFlags, name: str) -> tuple[Preprocessing, dict[str, str], list[str]]:
    """How to feed one model: each setting from what it carries, else the flag, else the default.

    Returns:
        The preprocessing, the source of each setting, and warnings (a flag that contradicts
        what the model carries: the model's own setting is used).

    Raises:
        ConfigError: the model carries no normalisation (or size) and no flag gives it; the
            message names the setting and the flag.
    """
    given = flags.values()
    values: dict[str, object] = {}
    sources: dict[str, str] = {}
    warnings: list[str] = []
    for key in SETTINGS:
        carried = card.carried.get(key)
        if carried is not None:
            values[key], sources[key] = carried.value, carried.source
            if key in given and not _same(given[key], carried.value):
                warnings.append(f"{name}: {flags.source(key)} {given[key]} contradicts the model's {key} "
                                f"{carried.value} ({carried.source}); the model's is used")
        elif key in given:
            values[key], sources[key] = given[key], flags.source(key)
        elif key in DEFAULTS:
            values[key], sources[key] = DEFAULTS[key], "default (the model carries none)"
    missing = [key for key in ("size", "mean", "std") if key not in values]
    if missing:
        raise MissingPreprocessing(card.path, missing)
    if isinstance(values["mean"], list) or isinstance(values["std"], list):
        raise ConfigError(f"{card.path}: per-channel normalisation {values['mean']} / {values['std']} is not "
                          "supported yet; convert with one mean and std for all channels")
    prep = Preprocessing(size=int(values["size"]), mean=float(values["mean"]), std=float(values["std"]),
                         resize_method=ResizeMethod(values["resize"]), channel_order=ChannelOrder(values["channel_order"]))
    return prep, sources, warnings


def _same(a, b) -> bool:
    try:
        return abs(float(a) - float(b)) < 1e-6
    except (TypeError, ValueError):
        return str(a).upper() == str(b).upper()


# --- images --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Images:
    """The images checked: each file, and its folder's class when the folder is labelled."""

    paths: tuple[str, ...]
    folder_classes: tuple[str, ...] | None  # class folder names, sorted; None for a flat folder
    folder_of: tuple[int, ...] | None  # each image's index into folder_classes


def list_images(folder: Path) -> Images:
    """A flat folder of images, or ``DIR/<class>/...`` (image files in sub-folders).

    Raises:
        DatasetError: no images at all.
    """
    from pipeline.dataset import scan_classes
    from pipeline.images import IMAGE_SUFFIXES

    folder = Path(folder)
    flat = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower() in IMAGE_SUFFIXES)
    if flat:
        return Images(tuple(str(p) for p in flat), None, None)
    classes = {name: files for name, files in scan_classes(folder).items() if files}
    if not classes:
        raise DatasetError(f"{folder}: no images (.jpg, .png, ...) in it or in its sub-folders")
    names = tuple(classes)
    paths, owner = [], []
    for k, name in enumerate(names):
        paths += [str(p) for p in classes[name]]
        owner += [k] * len(classes[name])
    return Images(tuple(paths), names, tuple(owner))


def match_classes(images: Images, labels: Sequence[str], labels_source: str, folder: Path) -> list[int]:
    """Each image's class index in ``labels``, by folder name (compared as edgepipe names
    classes: lower case, punctuation as spaces).

    Raises:
        ConfigError: a class folder matches no label (both sides listed).
    """
    from pipeline.dataset import normalise_class_name

    index = {normalise_class_name(lab): k for k, lab in enumerate(labels)}
    unmatched = [c for c in images.folder_classes if normalise_class_name(c) not in index]
    if unmatched:
        raise ConfigError(f"{folder}: class folder(s) {', '.join(unmatched)} match no label of the reference "
                          f"({', '.join(labels)}; from {labels_source}); rename the folders, pass --labels FILE, "
                          "or --no-labels for agreement only")
    to_label = [index[normalise_class_name(c)] for c in images.folder_classes]
    return [to_label[k] for k in images.folder_of]


# --- the check -----------------------------------------------------------------------------------

@dataclass
class CheckResult:
    """What :func:`check` found: the verify report, the models as run, and the report files."""

    report: object  # pipeline.verify.Report
    models: list[Checked]
    files: dict[str, Path]
    warnings: list[str]

    @property
    def passed(self) -> bool:
        return self.report.passed

    def failures(self) -> str:
        """The failed rows and by how much, for one line: ``a.tflite/ai-edge-litert (agreement
        0.2500 < gate 0.99)``, or the runtime's reason when it produced nothing."""
        out = []
        for r in self.report.results:
            if not r.passed:
                why = "failed to run" if r.error else f"agreement {r.top1_agreement:.4f} < gate {r.gate:.2f}"
                out.append(f"{r.artifact}/{r.runtime} ({why})")
        return ", ".join(out)


def _names(paths: Sequence[Path]) -> list[str]:
    """Row names: the file or folder name, with its parent's when two would be the same."""
    names = [Path(p).name for p in paths]
    return [f"{Path(p).parent.name}/{n}" if names.count(n) > 1 else n for p, n in zip(paths, names)]


def open_models(settings: CheckSettings) -> tuple[Checked, list[Checked]]:
    """Reads the reference and every candidate and resolves how to feed each.

    Raises:
        ConfigError: an unreadable model, missing preprocessing, or candidates whose classes do
            not match the reference's (count or names).
    """
    problems: list[str] = []
    paths = [settings.reference, *settings.candidates]
    names = _names(paths)
    user_labels = read_labels(settings.labels) if settings.labels else None
    models: list[Checked] = []
    unnormalised: list[MissingPreprocessing] = []
    for k, (path, name) in enumerate(zip(paths, names)):
        try:
            card = read_card(path, settings.input_tensor if k == 0 else None,
                             settings.output_tensor if k == 0 and settings.output_tensor else settings.output)
            prep, sources, warnings = resolve_preprocessing(card, settings.flags, name)
        except MissingPreprocessing as err:
            unnormalised.append(err)
            continue
        except ConfigError as err:
            problems.append(str(err))
            continue
        labels, source = card.labels, card.labels_source
        if user_labels is not None:
            if labels is None:
                labels, source = tuple(user_labels), f"--labels {settings.labels}"
            elif list(labels) != user_labels:
                warnings.append(f"{name}: --labels {settings.labels} differs from the model's labels ({source}); "
                                "the model's are used")
        if labels is not None and card.classes is not None and len(labels) != card.classes:
            problems.append(f"{path}: {len(labels)} labels ({source}) for {card.classes} outputs; give --labels FILE "
                            f"with {card.classes} lines")
            continue
        models.append(Checked(name, "reference" if k == 0 else "candidate", card, prep, sources, labels, source,
                              warnings))
    if unnormalised:
        problems.append(_missing_text(unnormalised, models[0] if models and models[0].role == "reference" else None))
    if problems:
        raise ConfigError("; ".join(problems))
    reference, candidates = models[0], models[1:]
    for c in candidates:
        problems += _class_problems(reference, c)
    if problems:
        raise ConfigError("; ".join(problems))
    return reference, candidates


def _missing_text(errors: list[MissingPreprocessing], reference: Checked | None) -> str:
    """One sentence for every model that lacks the same settings, with the reference's values as
    the likely answer (a plain conversion keeps its original's input)."""
    missing = list(dict.fromkeys(k for e in errors for k in e.missing))
    names = ", ".join(e.path.name for e in errors)
    verb = "carries" if len(errors) == 1 else "carry"
    text = f"{names} {verb} no {' or '.join(missing)} for {'its' if len(errors) == 1 else 'their'} input; give {flags_for(missing)}"
    if reference is not None:
        p, src = reference.prep, reference.sources
        text += (f" (the reference takes size {p.size}, mean {p.mean:g}, std {p.std:g}, from {src['mean']}: "
                 f"--mean {p.mean:g} --std {p.std:g} if the conversion kept its input)")
    return text


def _class_problems(reference: Checked, candidate: Checked) -> list[str]:
    r, c = reference.card.classes, candidate.card.classes
    if r is not None and c is not None and r != c:
        return [f"{candidate.card.path}: {c} classes, the reference {reference.card.path} has {r}; "
                "check a conversion of the same classifier"]
    if reference.labels is not None and candidate.labels is not None and set(reference.labels) != set(candidate.labels):
        only_c = sorted(set(candidate.labels) - set(reference.labels))
        only_r = sorted(set(reference.labels) - set(candidate.labels))
        return [f"{candidate.card.path}: its labels differ from the reference's (only in the candidate: "
                f"{', '.join(only_c[:5])}; only in the reference: {', '.join(only_r[:5])}); pass the right files"]
    return []


def _feed_key(prep: Preprocessing) -> str:
    return f"{prep.size}px-m{prep.mean:g}-s{prep.std:g}-{prep.channel_order}-{prep.resize_method}"


def _pixels(prep: Preprocessing) -> Preprocessing:
    """Raw RGB pixels at a model's size, for MediaPipe, which normalises by the metadata itself."""
    return Preprocessing(size=prep.size, mean=0.0, std=1.0)


def _artifact(model: Checked):
    from pipeline.runners import Feed
    from pipeline.runners.base import Tensors
    from pipeline.verify import Artifact

    path = model.card.path
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size
    feed = {Feed.APP: _feed_key(model.prep), Feed.CONTRACT: _feed_key(model.prep)}
    if model.card.kind is ArtifactKind.TFLITE and model.role == "candidate":
        feed[Feed.CONTRACT] = _feed_key(_pixels(model.prep))
    tensors = Tensors(model.card.input.name if model.card.kind is ArtifactKind.GRAPH else None, model.card.output)
    return Artifact(model.name, path, size, model.card.kind, tensors, feed, model.gate_key)


def check(settings: CheckSettings) -> CheckResult:
    """Checks every candidate against the reference on ``settings.images``; writes
    report.json, report.md and report.html into ``settings.out``.

    Raises:
        ConfigError: bad input (see :func:`open_models`, :func:`match_classes`), before any model runs.
        DatasetError: no readable image.
    """
    from pipeline.dataset import Example
    from pipeline.runners import not_ready
    from pipeline.runners.base import RunSettings
    from pipeline.verify import VerifySettings, load_holdout, verify

    problems = settings.problems() + not_ready(settings.runtimes)
    if problems:
        raise ConfigError("; ".join(problems))
    reference, candidates = open_models(settings)
    images = list_images(settings.images)
    labels = reference.labels
    if labels is None:
        width = reference.card.classes or next((c.card.classes for c in candidates if c.card.classes), None)
        labels = tuple(str(k) for k in range(width or 0))
    reason = None
    if settings.no_labels:
        reason = "--no-labels was given"
    elif images.folder_classes is None:
        reason = f"{settings.images} is a flat folder of images (no class sub-folders)"
    elif reference.labels is None:
        reason = "the reference carries no labels (no metadata, no --labels FILE, no labels.txt beside it)"
    truth = None if reason else match_classes(images, reference.labels, reference.labels_source, settings.images)
    for c in candidates:
        if reference.labels is not None and c.labels is not None and list(c.labels) != list(reference.labels):
            c.warnings.append(f"{c.name}: its labels are in another order than the reference's; columns matched by name")
    warnings = [w for m in (reference, *candidates) for w in m.warnings]
    for w in warnings:
        log.warning(f"warning: {w}")
    if reason:
        log.info(f"check: agreement and drift only: {reason}")
    examples = [Example(p, truth[k] if truth else -1, "test") for k, p in enumerate(images.paths)]
    artifacts = [_artifact(m) for m in candidates]
    for m, art in zip(candidates, artifacts):
        if reference.labels is not None and m.labels is not None and list(m.labels) != list(reference.labels):
            art.columns = tuple(list(m.labels).index(lab) for lab in reference.labels)
    ref_art = _artifact(reference)
    feeds = {}
    for m in (reference, *candidates):
        feeds[_feed_key(m.prep)] = m.prep
        if m.card.kind is ArtifactKind.TFLITE and m.role == "candidate" and Runtime.MEDIAPIPE in settings.runtimes:
            feeds[_feed_key(_pixels(m.prep))] = _pixels(m.prep)
    verify_settings = VerifySettings(
        classes=tuple(labels), contract=reference.prep, runtimes=settings.runtimes, gates=dict(settings.gates),
        timeout_s=settings.timeout_s, run=RunSettings(latency_runs=settings.latency_runs), unlabelled_reason=reason)
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    log.info(f"check: {reference.name} against {len(candidates)} candidate(s) on {len(images.paths)} images")
    with tempfile.TemporaryDirectory(prefix="edgepipe-check-") as tmp:
        passes = None
        if settings.beam is not None:
            from pipeline.beam import holdout_pass

            holdout, passes = holdout_pass(examples, ref_art, artifacts, verify_settings, Path(tmp), settings.beam,
                                           feeds=feeds, labelled=reason is None)
        else:
            holdout = load_holdout(examples, reference.prep, Path(tmp), feeds=feeds, labelled=reason is None)
        report = verify(ref_art, artifacts, holdout, verify_settings, passes)
    ran: dict[str, list[str]] = {}
    for r in report.results:
        ran.setdefault(r.artifact, []).append(r.runtime)
    models = [m.to_dict(ran.get(m.name, [])) for m in (reference, *candidates)]
    for m, row in zip(models, [report.results[0], *[_first_row(report, c.name) for c in candidates]]):
        kind = getattr(row, "output_kind", None)
        m["output"].update(kind=kind, softmax_applied=kind == "logits")
    extra = {"title": f"edgepipe check: {reference.name}", "models": models, "reference": reference.name}
    files = report.save(out, None, warnings=warnings, extra=extra)
    return CheckResult(report, [reference, *candidates], files, warnings)


def _first_row(report, name: str):
    return next((r for r in report.results[1:] if r.artifact == name and r.output_kind), None)


def parse_runtimes(names: Sequence[str], allow_tensorflow: bool = False) -> tuple[Runtime, ...]:
    """``--runtime`` values → runtimes (default :data:`CHECK_RUNTIMES`).

    Raises:
        ConfigError: an unknown name (the known ones listed).
    """
    known = [rt for rt in Runtime if allow_tensorflow or rt is not Runtime.TENSORFLOW]
    bad = [n for n in names if n not in {str(rt) for rt in known}]
    if bad:
        raise ConfigError(f"--runtime {', '.join(bad)}: unknown; choose from {', '.join(known)}")
    return tuple(Runtime(n) for n in names) or CHECK_RUNTIMES


def parse_check_gates(items: Sequence[str], candidates: Sequence[Path]) -> dict[str, float]:
    """``--gate NAME=VALUE`` for a candidate (its row name) or a kind (``tflite-int8``).

    Raises:
        ConfigError: a malformed item, an unknown name or a value outside 0..1.
    """
    from pipeline.config import DEFAULT_GATES, parse_gates

    names = set(_names(candidates)) | {Path(c).name for c in candidates}
    return parse_gates(items, names, f"NAME=VALUE with VALUE in 0..1 and NAME a candidate ({', '.join(sorted(names))}) "
                                     f"or a kind ({', '.join(DEFAULT_GATES)})")

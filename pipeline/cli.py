"""The ``edgepipe`` command, a thin layer over the Python API (:func:`pipeline.run`).

Each command parses its options, builds a :class:`RunConfig` over the run directory's saved one
(:func:`pipeline.config.resume`), calls the library and maps :class:`PipelineError` to one line
and an exit code. A stage command lists only the options of its own stage (grouped in help
panels); ``run`` lists them all, and earlier stages keep the run directory's saved settings.
"""
from __future__ import annotations

import contextlib
import inspect
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer

from pipeline.catalog import DEFAULT_BACKBONE
from pipeline.errors import PipelineError, disk_error
from pipeline.types import ClassWeights, QuantMode, TfjsMode

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Labelled photos in; verified TFLite and TF.js image classifiers out.")

DATA, BACKBONE, TRAINING, AUGMENT = "Data", "Backbone", "Training", "Augmentation"
CONVERSION, VERIFICATION, CACHE, OUTPUT = "Conversion", "Verification", "Cache and downloads", "Output"
ENGINE = "Engine"


def _opt(kind, help_: str, panel: str, *names: str):
    return Annotated[kind, typer.Option(*names, help=help_, rich_help_panel=panel)]


# Every option once: name → (annotation, default). Panels say which stage an option belongs to.
OPTIONS: dict[str, tuple[object, object]] = {
    "out": (_opt(Path, "Run directory (one folder per stage, manifest.json, reports).", OUTPUT, "--out"), ...),
    "images": (_opt(Optional[str], "Training images: DIR/<class>/*.jpg (or a URL such as gs://BUCKET/photos, read "
                                   "through Beam's filesystems).", DATA), None),
    "test_images": (_opt(Optional[str], "Holdout images, same layout; replaces the test split.", DATA), None),
    "validation_pct": (_opt(Optional[float], "Validation percentage (default 10).", DATA), None),
    "test_pct": (_opt(Optional[float], "Test percentage when no --test-images (default 10).", DATA), None),
    "backbone": (_opt(Optional[str], f"Catalog backbone (default {DEFAULT_BACKBONE}); see `edgepipe fetch --list`.", BACKBONE), None),
    "graph": (_opt(Optional[Path], "Your own frozen graph (.pb) instead of a catalog backbone; alone when it is a "
                                   "catalog architecture (recognised by its tensors).", BACKBONE), None),
    "model_graph": (_opt(Optional[Path], "Adopt a frozen graph that already has its head (poets' retrained_graph.pb): "
                                         "no training; export, quantize, tfjs and verify it.", BACKBONE), None),
    "output_tensor": (_opt(Optional[str], "With --model-graph: its probabilities (default: the terminal Softmax, "
                                          "e.g. final_result:0).", BACKBONE), None),
    "labels": (_opt(Optional[Path], "With --model-graph: class names, one per line in output order (default 0..C-1).",
                    BACKBONE), None),
    "input_tensor": (_opt(Optional[str], "With --graph/--model-graph: the input tensor, e.g. input:0.", BACKBONE), None),
    "bottleneck_tensor": (_opt(Optional[str], "With --graph: the pooled feature tensor.", BACKBONE), None),
    "input_size": (_opt(Optional[int], "With --graph/--model-graph: input height = width in pixels.", BACKBONE), None),
    "mean": (_opt(Optional[float], "With --graph/--model-graph: subtracted from 0..255 pixels.", BACKBONE), None),
    "std": (_opt(Optional[float], "With --graph/--model-graph: divides after the mean.", BACKBONE), None),
    "epochs": (_opt(Optional[int], "Training epochs over the cached bottlenecks.", TRAINING), None),
    "steps": (_opt(Optional[int], "Optimizer steps; replaces --epochs.", TRAINING), None),
    "learning_rate": (_opt(Optional[float], "Adam learning rate.", TRAINING), None),
    "batch_size": (_opt(Optional[int], "Training batch size.", TRAINING), None),
    "validation_batch_size": (_opt(Optional[int], "Batch size for evaluation.", TRAINING), None),
    "hidden_units": (_opt(Optional[int], "Add one hidden ReLU layer of this width (0 = softmax only).", TRAINING), None),
    "dropout": (_opt(Optional[float], "Dropout rate on the hidden layer.", TRAINING), None),
    "label_smoothing": (_opt(Optional[float], "Label smoothing, 0..1.", TRAINING), None),
    "class_weights": (_opt(Optional[str], f"'{ClassWeights.BALANCED}' weighs classes inversely to their size; "
                                          f"'{ClassWeights.NONE}'.", TRAINING), None),
    "early_stopping": (_opt(Optional[int], "Stop after N evaluations without a lower validation loss (0 = off).", TRAINING), None),
    "eval_every": (_opt(Optional[int], "Evaluate (history, summaries, early stopping) every N epochs.", TRAINING), None),
    "checkpoint_every": (_opt(Optional[int], "Save the head every N epochs under retrain/checkpoints/.", TRAINING), None),
    "seed": (_opt(Optional[int], "Seed for initialisation, shuffling and dropout.", TRAINING), None),
    "fine_tune": (_opt(Optional[int], "Also train the backbone's last N blocks with the head (0 = the head only); "
                                      "the activations before them are cached.", TRAINING), None),
    "fine_tune_from": (_opt(Optional[str], "Fine-tune everything after this tensor (instead of --fine-tune N), "
                                           "e.g. MobilenetV1/MobilenetV1/Conv2d_11_pointwise/Relu6:0.", TRAINING), None),
    "fine_tune_epochs": (_opt(Optional[int], "Epochs of fine-tuning, after the head alone (default 20).", TRAINING), None),
    "fine_tune_learning_rate": (_opt(Optional[float], "Adam learning rate of the fine-tuned blocks (default 1e-4; the "
                                                      "head then trains at a tenth of --learning-rate).", TRAINING), None),
    "summaries_dir": (_opt(Optional[Path], "TensorBoard summaries; one sub-folder per run.", TRAINING), None),
    "print_misclassified": (_opt(Optional[bool], "List misclassified test images.", TRAINING, "--print-misclassified"), None),
    "augment_copies": (_opt(Optional[int], "Cache N augmented copies of each training image (0 = off).", AUGMENT), None),
    "flip_left_right": (_opt(Optional[bool], "Augment: mirror half of the copies.", AUGMENT, "--flip-left-right"), None),
    "random_crop": (_opt(Optional[float], "Augment: crop margin in percent.", AUGMENT), None),
    "random_scale": (_opt(Optional[float], "Augment: random enlargement up to this percent.", AUGMENT), None),
    "random_brightness": (_opt(Optional[float], "Augment: brightness factor within ±percent.", AUGMENT), None),
    "quant": (_opt(Optional[list[QuantMode]], "TFLite variants (repeat; default all).", CONVERSION, "--quant"), None),
    "calibration_images": (_opt(Optional[int], "Training images that calibrate the integer variants (default 100).",
                                CONVERSION), None),
    "int8_repair": (_opt(Optional[bool], "Keep the int8 and dynamic-range files' most drifting layers in float until they "
                                         "meet their target on the validation split, as tflite-int8-repaired and "
                                         "tflite-dynamic-repaired (default: only for a file that misses its gate there).", CONVERSION, "--int8-repair/--no-int8-repair"), None),
    "int8_repair_max_size": (_opt(Optional[float], "Stop a repair when a file would pass PCT percent of the "
                                                   "float32 file's size (default 100).", CONVERSION), None),
    "tfjs": (_opt(Optional[list[TfjsMode]], "TF.js variants (repeat; default float32, float16).", CONVERSION, "--tfjs"), None),
    "tfjs_shard_mb": (_opt(Optional[float], "TF.js weight shard size in MB (default 4).", CONVERSION), None),
    "runtime": (_opt(Optional[list[str]], "Runtimes to verify in (repeat): tflite-runtime, ai-edge-litert, tfjs-wasm "
                                          "(the default), mediapipe-tasks, tflite-runtime-arm64, ai-edge-litert-arm64, "
                                          "chromium-wasm, chromium-webgl, chromium-webgl-f16, chromium-webgpu (see "
                                          "`edgepipe runtimes`).", VERIFICATION, "--runtime"), None),
    "gate": (_opt(Optional[list[str]], "Minimum top-1 agreement, ARTIFACT=VALUE (repeat).", VERIFICATION, "--gate"), None),
    "max_accuracy_drop": (_opt(Optional[float], "Points of test accuracy the int8 and dynamic-range variants may "
                                                "lose against the reference and still pass (default 1; a larger loss fails only "
                                                "when McNemar's test says it is not chance).",
                               VERIFICATION), None),
    "runtime_timeout": (_opt(Optional[float], "Seconds one runtime may take on one artifact before verify reports "
                                              "it failed.", VERIFICATION), None),
    "latency_runs": (_opt(Optional[int], "Single-image calls timed per artifact and runtime, on one thread after a "
                                         "warm-up (default 30; 0 = no latency figures).", VERIFICATION), None),
    "arm64_cpu": (_opt(Optional[str], "The Pi CPU QEMU emulates for the -arm64 runtimes: cortex-a72 (Pi 4, default) "
                                      "or cortex-a76 (Pi 5).", VERIFICATION), None),
    "arm64_sample": (_opt(Optional[int], "Test images the emulated -arm64 runtimes run, a class-stratified sample "
                                         "(default 64; 0 = all).", VERIFICATION), None),
    "stress": (_opt(Optional[bool], "Also run the reference with the usual preprocessing mistakes and report the "
                                    "damage.", VERIFICATION, "--stress/--no-stress"), None),
    "app_preprocessing": (_opt(Optional[list[str]], "How your app prepares pixels, KEY=VALUE (repeat): channel_order=BGR, "
                                                    "value_range=0-1, resize=nearest, antialias=true, crop=0.875. "
                                                    "Converted models are verified with it.", VERIFICATION,
                               "--app-preprocessing"), None),
    "deploy_artifact": (_opt(Optional[str], "The TFLite variant the Raspberry Pi bundle ships (default: the smallest "
                                            "that passed every gate), e.g. tflite-int8.", "Deploy"), None),
    "engine": (_opt(Optional[str], "Where the bottleneck and holdout passes run: local (default) or beam "
                                   "(Apache Beam; `make setup-beam`).", ENGINE), None),
    "beam_runner": (_opt(Optional[str], "With --engine beam: DirectRunner (default; local processes), DataflowRunner, "
                                        "FlinkRunner, SparkRunner, PortableRunner or PrismRunner.", ENGINE), None),
    "beam_option": (_opt(Optional[list[str]], "With --engine beam: a Beam pipeline option as Beam spells it, passed "
                                              "through (repeat), e.g. --beam-option=--direct_num_workers=4.", ENGINE,
                         "--beam-option"), None),
    "bottleneck_cache": (_opt(Optional[str], "Where bottleneck entries live (default CACHE_DIR/bottlenecks); with "
                                             "--engine beam a URL every worker can write (gs://, s3://, hdfs://).",
                              ENGINE), None),
    "mirror": (_opt(Optional[str], "Mirror folder or base URL laid out <host>/<path> (default $EDGEPIPE_MIRROR).", CACHE), None),
    "cache_dir": (_opt(Optional[Path], "Cache folder (default $EDGEPIPE_CACHE_DIR or ~/.cache/edgepipe).", CACHE), None),
    "offline": (_opt(bool, "Use only the cache and the mirror.", CACHE), False),
    "quiet": (_opt(bool, "No progress bars.", OUTPUT), False),
    "verbose": (_opt(bool, "Also show TensorFlow's and the converters' own output (always kept in RUN/logs/).", OUTPUT), False),
}
# CLI names → RunConfig.with_options names.
RENAMED = {"quant": "quant_modes", "tfjs": "tfjs_modes", "runtime": "runtimes", "runtime_timeout": "runtime_timeout_s",
           "gate": "gates", "beam_option": "beam_options"}

_DATA = ("images", "test_images", "validation_pct", "test_pct")
_BACKBONE = ("backbone", "graph", "model_graph", "output_tensor", "labels", "input_tensor", "bottleneck_tensor",
             "input_size", "mean", "std")
_TRAINING = ("epochs", "steps", "learning_rate", "batch_size", "validation_batch_size", "hidden_units", "dropout",
             "label_smoothing", "class_weights", "early_stopping", "eval_every", "checkpoint_every", "seed",
             "fine_tune", "fine_tune_from", "fine_tune_epochs", "fine_tune_learning_rate",
             "summaries_dir", "print_misclassified")
_AUGMENT = ("augment_copies", "flip_left_right", "random_crop", "random_scale", "random_brightness")
_QUANTIZE = ("quant", "calibration_images", "int8_repair", "int8_repair_max_size", "gate", "max_accuracy_drop")
_TFJS = ("tfjs", "tfjs_shard_mb")
_VERIFY = ("runtime", "gate", "max_accuracy_drop", "runtime_timeout", "latency_runs", "arm64_cpu", "arm64_sample", "stress",
           "app_preprocessing")
_ENGINE = ("engine", "beam_runner", "beam_option")
_COMMON = ("mirror", "cache_dir", "offline", "quiet", "verbose")

# The options each command takes: its own stage's. `run` takes every stage's.
COMMAND_OPTIONS = {
    "retrain": _DATA + _BACKBONE + _TRAINING + _AUGMENT + _ENGINE + ("bottleneck_cache",),
    "export": (),
    "quantize": _QUANTIZE,
    "tfjs": _TFJS,
    "verify": _VERIFY + _ENGINE,
    "deploy": ("deploy_artifact",),
}
COMMAND_OPTIONS["run"] = tuple(dict.fromkeys(sum((v for k, v in COMMAND_OPTIONS.items() if k != "deploy"), ())))
NEEDS_SAVED_CONFIG = frozenset({"export", "quantize", "tfjs", "verify", "deploy"})  # they take no --images


def _fail(err: PipelineError) -> None:
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(code=err.exit_code) from None


@contextlib.contextmanager
def _one_line_errors(out: Path):
    """A :class:`PipelineError`, or a full or read-only disk outside a stage (the manifest, the run
    folder itself), as one line and its exit code."""
    try:
        yield
    except PipelineError as err:
        _fail(err)
    except OSError as err:
        mapped = disk_error(err, str(out))
        if mapped is None:
            raise
        _fail(mapped)


def _run(command: str, until: str, out: Path, quiet: bool, offline: bool, verbose: bool, **opts) -> None:
    import pipeline
    from pipeline.config import RunConfig, load_config

    opts = {RENAMED.get(k, k): v for k, v in opts.items()}
    given = {k for k, v in opts.items() if v not in (None, [], ())}
    with _one_line_errors(out):
        saved = load_config(out)
        if saved is None and command in NEEDS_SAVED_CONFIG:
            raise PipelineError(f"{out} holds no run yet; start it with `edgepipe run --images DIR --out {out}` "
                                f"(or `edgepipe retrain --images DIR --out {out}`)")
        # What pipeline.resume(out, **opts) does, with the manifest read once.
        cfg = (saved or RunConfig(out=out)).with_options(offline=offline or None,
                                                         progress=False if quiet else None, **opts)
        pipeline.run(cfg, until=until, verbose=verbose, explicit=given)
    if until == "verify":
        typer.echo((out / "report.md").read_text(encoding="utf-8"))
    elif until == "deploy":
        from pipeline.rundir import read_json

        info = (read_json(out / "manifest.json", default={}) or {}).get("stages", {}).get("deploy", {}).get("info", {})
        if info.get("artifact"):
            typer.echo(f"{out / 'deploy' / 'raspberry-pi'}: {info['artifact']} ({info['why']}); copy it to the Pi and "
                       "run `python classify.py --self-test` there")
        else:
            typer.echo(f"nothing deployed: {info.get('why', 'no TFLite file')} (name one with --deploy-artifact)")


def _stage_command(command: str, until: str, doc: str) -> Callable[..., None]:
    """A typer command taking ``out``, the command's own options and the common ones."""
    names = ("out", *COMMAND_OPTIONS[command], *_COMMON)

    def callback(**kwargs) -> None:
        _run(command, until, **kwargs)

    callback.__signature__ = inspect.Signature([
        inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, annotation=OPTIONS[n][0], default=OPTIONS[n][1])
        for n in names
    ])
    callback.__annotations__ = {}
    callback.__doc__ = doc
    callback.__name__ = command
    return callback


app.command("run")(_stage_command("run", "verify", "Chain every stage: fetch → retrain → export → quantize → tfjs → verify."))
app.command("retrain")(_stage_command("retrain", "retrain", "Split the images, cache bottlenecks and train the head (runs fetch if needed)."))
app.command("export")(_stage_command("export", "export", "Write backbone + head + normalisation as one SavedModel."))
app.command("quantize")(_stage_command("quantize", "quantize", "Convert the SavedModel to TFLite float32/float16/dynamic/int8."))
app.command("tfjs")(_stage_command("tfjs", "tfjs", "Convert the SavedModel to TF.js graph-model bundles."))
app.command("verify")(_stage_command("verify", "verify", "Run the reference and every converted model on the test split; gate the drift."))
app.command("deploy")(_stage_command("deploy", "deploy", "Write RUN/deploy/raspberry-pi/: the TFLite file, labels, contract, a "
                                     "classify.py with --self-test, pinned requirements, a README."))

# --- compare: several backbones (and fine-tuning settings) on the same images -----------------

# `run`'s options, but for those that name a row: a row per backbone and fine-tuning setting, so
# both repeat; an adopted --model-graph is not trained, so it has no backbone to compare.
COMPARE_ROWS: dict[str, tuple[object, object]] = {
    "out": (_opt(Path, "The comparison's folder: a run directory per row (OUT/<row>/), compare.md, compare.json, "
                       "compare.html, confusion_matrices.png.", OUTPUT, "--out"), ...),
    "backbones": (_opt(Optional[list[str]], "A catalog backbone to compare (repeat: one row each; see `edgepipe fetch "
                                            "--list`). --graph adds your own graph as one more row.", BACKBONE,
                       "--backbone"), None),
    "fine_tunes": (_opt(Optional[list[int]], "Backbone blocks to fine-tune (repeat: one row per backbone and setting, "
                                             "named BACKBONE+ftN; default 0, the head only).", TRAINING, "--fine-tune"),
                   None),
}
COMPARE_OPTIONS = tuple(n for n in COMMAND_OPTIONS["run"]
                        if n not in ("backbone", "fine_tune", "model_graph", "output_tensor", "labels"))


def _compare(out: Path, quiet: bool, offline: bool, verbose: bool, backbones: list[str] | None,
             fine_tunes: list[int] | None, **opts) -> None:
    from pipeline.compare import CompareSettings, compare
    from pipeline.errors import VerificationFailed

    opts = {RENAMED.get(k, k): v for k, v in opts.items()}
    with _one_line_errors(out):
        settings = CompareSettings(out=out, backbones=tuple(backbones or ()), fine_tune=tuple(fine_tunes or (0,)),
                                   options={**opts, "offline": offline or None, "progress": False if quiet else None},
                                   verbose=verbose)
        result = compare(settings)
        typer.echo(result.files["compare_md"].read_text(encoding="utf-8"))
        if result.failed:
            names = ", ".join(r.name for r in result.failed)
            raise VerificationFailed(f"verification failed in {len(result.failed)} row(s): {names}; see "
                                     f"{out}/<row>/report.md (the comparison is written: {result.files['compare_md']})")


def _compare_command() -> Callable[..., None]:
    """``edgepipe compare``: ``out``, ``run``'s options (the backbone and fine-tuning repeatable)."""
    table = {**OPTIONS, **COMPARE_ROWS}
    names = ("out", "backbones", "fine_tunes", *COMPARE_OPTIONS, *_COMMON)

    def callback(**kwargs) -> None:
        _compare(**kwargs)

    callback.__signature__ = inspect.Signature([
        inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, annotation=table[n][0], default=table[n][1])
        for n in names
    ])
    callback.__annotations__ = {}
    callback.__doc__ = ("Run every backbone (and fine-tuning setting) on the same images, each in OUT/<row>/, and "
                        "compare them in one table: OUT/compare.md, compare.json, compare.html.")
    callback.__name__ = "compare"
    return callback


app.command("compare")(_compare_command())

Backbone = OPTIONS["backbone"][0]
Mirror, CacheDir, Offline = OPTIONS["mirror"][0], OPTIONS["cache_dir"][0], OPTIONS["offline"][0]
Quiet, Verbose = OPTIONS["quiet"][0], OPTIONS["verbose"][0]


@app.command("fetch")
def fetch_command(
    backbone: Backbone = None, list_: Annotated[bool, typer.Option("--list", help="Show every catalog entry and whether it is cached.")] = False,
    mirror: Mirror = None, cache_dir: CacheDir = None, offline: Offline = False, quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Download (or find in the mirror) a backbone into the cache, checksum-verified."""
    from pipeline.catalog import get_backbone, load_catalog
    from pipeline.console import library_output
    from pipeline.fetch import cache_status, fetch

    try:
        if list_:
            for spec in load_catalog().values():
                st = cache_status(spec, cache_dir)
                size = f"{st['size_bytes'] / 1e6:7.1f} MB" if st.get("size_bytes") else "      ?   "
                typer.echo(f"{spec.name:24s} {size}  {'cached' if st['cached'] else '-':7s} {spec.url}")
            return
        with library_output(None, verbose):
            got = fetch(get_backbone(backbone or DEFAULT_BACKBONE), cache_dir=cache_dir, mirror=mirror,
                        offline=offline, progress=not quiet)
        typer.echo(f"{got.graph_path}  sha256 {got.graph_sha256}  ({got.source}, {got.checksum})")
    except PipelineError as err:
        _fail(err)


@app.command("inspect")
def inspect_command(
    graph: Annotated[Path, typer.Argument(help="A frozen graph (.pb).", show_default=False)],
    verbose: Verbose = False,
) -> None:
    """List a frozen graph's placeholders and candidate bottleneck tensors (for --graph)."""
    from pipeline.console import library_output
    from pipeline.inspect import describe, inspect_graph

    try:
        with library_output(None, verbose):
            summary = inspect_graph(graph)
        typer.echo(describe(summary))
    except PipelineError as err:
        _fail(err)


# --- check and classify: any model, not only a run's -------------------------------------------

MODELS = "Models"
PREPROCESSING = "Preprocessing (for models that carry none)"
Size = _opt(Optional[int], "Input height = width in pixels.", PREPROCESSING, "--size")
Mean = _opt(Optional[float], "Subtracted from 0..255 pixels.", PREPROCESSING, "--mean")
Std = _opt(Optional[float], "Divides after the mean.", PREPROCESSING, "--std")
ChannelOrderOpt = _opt(Optional[str], "RGB or BGR.", PREPROCESSING, "--channel-order")
ValueRangeOpt = _opt(Optional[str], "What the input takes: 0-255, 0-1 or -1-1 (a shorthand for --mean/--std).",
                     PREPROCESSING, "--value-range")
ResizeOpt = _opt(Optional[str], "Resize method: bilinear (default), nearest, bicubic, area, lanczos3.", PREPROCESSING,
                 "--resize")
Labels = _opt(Optional[Path], "Class names, one a line, for models that carry none.", MODELS, "--labels")
OutputName = _opt(Optional[str], "The output to compare, for models with several.", MODELS, "--output")
InputTensor = _opt(Optional[str], "A frozen graph's input tensor (default: its only float placeholder).", MODELS,
                   "--input-tensor")


def _flags(size, mean, std, channel_order, value_range, resize):
    from pipeline.check import PrepFlags

    return PrepFlags(size=size, mean=mean, std=std, channel_order=channel_order, value_range=value_range, resize=resize)


EngineOpt = _opt(str, "Where the models run on the images: local (default) or beam (Apache Beam; `make setup-beam`).",
                 ENGINE, "--engine")
BeamRunnerOpt = _opt(str, "With --engine beam: DirectRunner (default), DataflowRunner, FlinkRunner, SparkRunner, "
                          "PortableRunner or PrismRunner.", ENGINE, "--beam-runner")
BeamOptionOpt = _opt(Optional[list[str]], "With --engine beam: a Beam pipeline option, passed through (repeat).", ENGINE,
                     "--beam-option")


def _beam_config(engine: str, beam_runner: str, beam_option: list[str] | None):
    """The Beam settings of a command with --engine; None for the local engine.

    Raises:
        ConfigError: an unknown engine or runner, a malformed option, Beam not installed.
    """
    from pipeline.config import BeamConfig, engine_problems
    from pipeline.errors import ConfigError

    beam = BeamConfig(beam_runner, tuple(beam_option or ()))
    given = {k for k, v in (("beam_runner", beam_runner != BeamConfig.runner), ("beam_options", beam_option)) if v}
    problems = engine_problems(engine, beam, given)
    if problems:
        raise ConfigError("; ".join(problems))
    return beam if engine == "beam" else None


@app.command("check")
def check_command(
    reference: Annotated[Path, typer.Option("--reference", help="The original: SavedModel folder, .keras/.h5, frozen "
                                            ".pb or float .tflite.", rich_help_panel=MODELS, show_default=False)],
    candidate: Annotated[list[Path], typer.Option("--candidate", help="A conversion (repeat): .tflite, TF.js folder "
                                                  "(graph or layers model), SavedModel or Keras.", rich_help_panel=MODELS,
                                                  show_default=False)],
    images: Annotated[Path, typer.Option("--images", help="DIR/<class>/*.jpg (accuracy too) or a flat folder of "
                                         "images (agreement only).", rich_help_panel=DATA, show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="Where report.json/md/html go.", rich_help_panel=OUTPUT)] = Path("check"),
    input_tensor: InputTensor = None,
    output_tensor: _opt(Optional[str], "A frozen graph reference's output tensor (default: its last softmax).", MODELS,
                        "--output-tensor") = None,
    output: OutputName = None, labels: Labels = None,
    no_labels: _opt(bool, "Agreement and drift only, even on a labelled folder.", MODELS, "--no-labels") = False,
    size: Size = None, mean: Mean = None, std: Std = None, channel_order: ChannelOrderOpt = None,
    value_range: ValueRangeOpt = None, resize: ResizeOpt = None,
    runtime: _opt(Optional[list[str]], "Runtimes for TFLite and TF.js candidates (repeat): tflite-runtime, ai-edge-litert, "
                  "tfjs-wasm (the default), mediapipe-tasks.", VERIFICATION, "--runtime") = None,
    gate: _opt(Optional[list[str]], "Minimum top-1 agreement, CANDIDATE=VALUE or KIND=VALUE (tflite-int8=0.95; repeat).",
               VERIFICATION, "--gate") = None,
    latency_runs: _opt(int, "Single-image calls timed per candidate and runtime (0 = none).", VERIFICATION,
                       "--latency-runs") = 30,
    runtime_timeout: _opt(float, "Seconds one runtime may take on one model.", VERIFICATION, "--runtime-timeout") = 600.0,
    engine: EngineOpt = "local", beam_runner: BeamRunnerOpt = "DirectRunner", beam_option: BeamOptionOpt = None,
    verbose: Verbose = False,
) -> None:
    """Check conversions made by any tool against their original, in the runtimes they deploy to."""
    from pipeline.check import CheckSettings, check, parse_check_gates, parse_runtimes
    from pipeline.console import library_output
    from pipeline.errors import VerificationFailed

    try:
        settings = CheckSettings(
            reference=reference, candidates=tuple(candidate), images=images, out=out,
            flags=_flags(size, mean, std, channel_order, value_range, resize), labels=labels, no_labels=no_labels,
            input_tensor=input_tensor, output_tensor=output_tensor, output=output,
            runtimes=parse_runtimes(runtime or ()), gates=parse_check_gates(gate or (), candidate),
            latency_runs=latency_runs, timeout_s=runtime_timeout, beam=_beam_config(engine, beam_runner, beam_option))
        out.mkdir(parents=True, exist_ok=True)
        with library_output(out / "logs" / "check.log", verbose):
            result = check(settings)
        typer.echo(result.files["report_md"].read_text(encoding="utf-8"))
        if not result.passed:
            raise VerificationFailed(f"check failed for {result.failures()}; see {result.files['report_md']}")
    except PipelineError as err:
        _fail(err)


@app.command("classify")
def classify_command(
    model: Annotated[Path, typer.Argument(help="Any model check takes.", show_default=False)],
    inputs: Annotated[list[Path], typer.Argument(help="Images or folders of images.", show_default=False)],
    top_k: Annotated[int, typer.Option("--top-k", help="Labels shown per image.")] = 5,
    runtime: Annotated[Optional[str], typer.Option("--runtime", help="Where to run it (default: ai-edge-litert for "
                                                   "TFLite, tfjs-wasm for TF.js, tensorflow otherwise).")] = None,
    json_lines: Annotated[bool, typer.Option("--json", help="One JSON object a line per image (the summary on stderr).")] = False,
    labels: Labels = None, output: OutputName = None, input_tensor: InputTensor = None,
    size: Size = None, mean: Mean = None, std: Std = None, channel_order: ChannelOrderOpt = None,
    value_range: ValueRangeOpt = None, resize: ResizeOpt = None,
    engine: EngineOpt = "local", beam_runner: BeamRunnerOpt = "DirectRunner", beam_option: BeamOptionOpt = None,
    quiet: Quiet = False, verbose: Verbose = False,
) -> None:
    """Print the top labels of each image with any model (poets' label_image.py, for every artifact)."""
    import json

    from pipeline.check import parse_runtimes
    from pipeline.classify import Classifier, ClassifySettings, image_paths
    from pipeline.console import library_output, log, progress, results
    from pipeline.runners.base import RuntimeFailed

    try:
        rt = parse_runtimes([runtime], allow_tensorflow=True)[0] if runtime else None
        settings = ClassifySettings(model=model, inputs=tuple(inputs), top_k=top_k, runtime=rt,
                                    flags=_flags(size, mean, std, channel_order, value_range, resize), labels=labels,
                                    output=output, input_tensor=input_tensor,
                                    beam=_beam_config(engine, beam_runner, beam_option), progress=not quiet)
        paths = image_paths(inputs)
        with library_output(None, verbose), Classifier(settings) as classifier:
            for w in classifier.warnings:
                log.warning(f"warning: {w}")
            shown = progress(total=len(paths), unit="img", desc="classify", disable=quiet or len(paths) == 1)
            try:
                with shown:
                    for answer in classifier.classify(paths):
                        # Through the bar, which clears itself from the terminal first.
                        shown.write(json.dumps(answer.to_dict()) if json_lines else answer.text(), file=results())
                        shown.update()
            except RuntimeFailed as err:
                raise PipelineError(f"{model}: {err}") from None
            latency = classifier.mean_latency_ms
        summary = (f"{len(paths)} image(s), {classifier.card.format} in {classifier.runtime}; mean latency "
                   + (f"{latency:.2f} ms/image ({len(classifier.latencies)} single-image calls)"
                      if latency is not None else "not timed"))
        typer.echo(summary, err=json_lines)
    except PipelineError as err:
        _fail(err)


@app.command("runtimes")
def runtimes_command(
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object per runtime.")] = False,
    cache_dir: CacheDir = None,
) -> None:
    """List every runtime verify can use: ready here or not, its version, and how to set it up."""
    import json

    from pipeline.runners import REGISTRY

    for runtime, info in REGISTRY.items():
        st = info.status(cache_dir=cache_dir)
        if json_out:
            typer.echo(json.dumps({"runtime": str(runtime), "accepts": sorted(info.accepts), **st.to_dict()}))
            continue
        state = "ready" if st.ready else "not ready"
        line = f"{runtime:22s} {state:10s} {st.version or '-'}"
        if not st.ready:
            line += f"  ({st.detail}; set up with `{st.setup}`)" if st.setup else f"  ({st.detail})"
        typer.echo(line)


@app.command("setup-arm64")
def setup_arm64_command(cache_dir: CacheDir = None, quiet: Quiet = False) -> None:
    """Set up the Raspberry Pi's TFLite runtimes (Debian 12 arm64, Python 3.11, tflite-runtime 2.14.0 and
    ai-edge-litert 2.3.0) under QEMU user-mode emulation, in the cache; idempotent. Needs root for apt-get."""
    from pipeline.arm64 import setup_arm64

    try:
        root = setup_arm64(cache_dir=cache_dir, progress=not quiet)
    except PipelineError as err:
        _fail(err)
    typer.echo(f"arm64 runtimes ready in {root}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()

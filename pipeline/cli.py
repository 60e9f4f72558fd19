"""The ``edgepipe`` command: parse options, build a RunConfig, call the library, map errors."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.catalog import DEFAULT_BACKBONE, load_catalog
from pipeline.config import CustomGraph, RunConfig, from_dict, parse_gates, validate
from pipeline.errors import ConfigError, PipelineError, disk_error
from pipeline.stress import parse_app_preprocessing
from pipeline.rundir import read_json
from pipeline.types import QuantMode, TfjsMode

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Labelled photos in; verified TFLite and TF.js image classifiers out.")

Out = Annotated[Path, typer.Option("--out", help="Run directory (one folder per stage, manifest.json, reports).")]
Images = Annotated[Optional[Path], typer.Option(help="Training images: DIR/<class>/*.jpg.")]
TestImages = Annotated[Optional[Path], typer.Option(help="Holdout images, same layout; replaces the test split.")]
Backbone = Annotated[Optional[str], typer.Option(help=f"Catalog backbone (default {DEFAULT_BACKBONE}); see `edgepipe fetch --list`.")]
Graph = Annotated[Optional[Path], typer.Option(help="Your own frozen graph (.pb) instead of a catalog backbone.")]
InputTensor = Annotated[Optional[str], typer.Option(help="With --graph: the input tensor, e.g. input:0.")]
BottleneckTensor = Annotated[Optional[str], typer.Option(help="With --graph: the pooled feature tensor.")]
InputSize = Annotated[Optional[int], typer.Option(help="With --graph: input height = width in pixels.")]
Mean = Annotated[Optional[float], typer.Option(help="With --graph: subtracted from 0..255 pixels.")]
Std = Annotated[Optional[float], typer.Option(help="With --graph: divides after the mean.")]
ValPct = Annotated[Optional[float], typer.Option(help="Validation percentage (default 10).")]
TestPct = Annotated[Optional[float], typer.Option(help="Test percentage when no --test-images (default 10).")]
Epochs = Annotated[Optional[int], typer.Option(help="Training epochs over the cached bottlenecks.")]
LearningRate = Annotated[Optional[float], typer.Option(help="Adam learning rate.")]
BatchSize = Annotated[Optional[int], typer.Option(help="Training batch size.")]
Seed = Annotated[Optional[int], typer.Option(help="Seed for initialisation, shuffling and dropout.")]
Steps = Annotated[Optional[int], typer.Option(help="Optimizer steps; replaces --epochs.")]
ValBatchSize = Annotated[Optional[int], typer.Option(help="Batch size for evaluation.")]
HiddenUnits = Annotated[Optional[int], typer.Option(help="Add one hidden ReLU layer of this width (0 = softmax only).")]
Dropout = Annotated[Optional[float], typer.Option(help="Dropout rate on the hidden layer.")]
LabelSmoothing = Annotated[Optional[float], typer.Option(help="Label smoothing, 0..1.")]
ClassWeights = Annotated[Optional[str], typer.Option(help="'balanced' weighs classes inversely to their size; 'none'.")]
EarlyStopping = Annotated[Optional[int], typer.Option(help="Stop after N evaluations without a lower validation loss (0 = off).")]
EvalEvery = Annotated[Optional[int], typer.Option(help="Evaluate (history, summaries, early stopping) every N epochs.")]
CheckpointEvery = Annotated[Optional[int], typer.Option(help="Save the head every N epochs under retrain/checkpoints/.")]
SummariesDir = Annotated[Optional[Path], typer.Option(help="TensorBoard summaries; one sub-folder per run.")]
PrintMisclassified = Annotated[Optional[bool], typer.Option("--print-misclassified", help="List misclassified test images.")]
AugmentCopies = Annotated[Optional[int], typer.Option(help="Cache N augmented copies of each training image (0 = off).")]
FlipLeftRight = Annotated[Optional[bool], typer.Option("--flip-left-right", help="Augment: mirror half of the copies.")]
RandomCrop = Annotated[Optional[float], typer.Option(help="Augment: crop margin in percent.")]
RandomScale = Annotated[Optional[float], typer.Option(help="Augment: random enlargement up to this percent.")]
RandomBrightness = Annotated[Optional[float], typer.Option(help="Augment: brightness factor within ±percent.")]
RuntimeTimeout = Annotated[Optional[float], typer.Option(help="Seconds one runtime may take on one artifact before verify reports it failed.")]
TfjsShardMb = Annotated[Optional[float], typer.Option(help="TF.js weight shard size in MB (default 4).")]
Stress = Annotated[Optional[bool], typer.Option("--stress/--no-stress", help="Also run the reference with the usual preprocessing mistakes and report the damage.")]
AppPrep = Annotated[Optional[list[str]], typer.Option("--app-preprocessing", help="How your app prepares pixels, KEY=VALUE (repeat): channel_order=BGR, value_range=0-1, resize=nearest, antialias=true, crop=0.875. Converted models are verified with it.")]
Quant = Annotated[Optional[list[QuantMode]], typer.Option("--quant", help="TFLite variants (repeat; default all).")]
Tfjs = Annotated[Optional[list[TfjsMode]], typer.Option("--tfjs", help="TF.js variants (repeat; default float32, float16).")]
Runtime = Annotated[Optional[list[str]], typer.Option("--runtime", help="Runtimes to verify in (repeat): tflite-runtime, ai-edge-litert, tfjs-wasm (the default), mediapipe-tasks.")]
Gate = Annotated[Optional[list[str]], typer.Option("--gate", help="Minimum top-1 agreement, ARTIFACT=VALUE (repeat).")]
Mirror = Annotated[Optional[str], typer.Option(help="Mirror folder or base URL laid out <host>/<path> (default $EDGEPIPE_MIRROR).")]
CacheDir = Annotated[Optional[Path], typer.Option(help="Cache folder (default $EDGEPIPE_CACHE_DIR or ~/.cache/edgepipe).")]
Offline = Annotated[bool, typer.Option(help="Use only the cache and the mirror.")]
Quiet = Annotated[bool, typer.Option(help="No progress bars.")]


def _fail(err: PipelineError) -> None:
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(code=err.exit_code) from None


TRAIN_KEYS = ("epochs", "steps", "learning_rate", "batch_size", "validation_batch_size", "hidden_units",
              "dropout", "label_smoothing", "class_weights", "early_stopping", "eval_every",
              "checkpoint_every", "seed")
AUGMENT_KEYS = {"augment_copies": "copies", "flip_left_right": "flip", "random_crop": "crop",
                "random_scale": "scale", "random_brightness": "brightness"}
GRAPH_KEYS = ("graph", "input_tensor", "input_size", "mean", "std")


def _build_config(out: Path, **given) -> RunConfig:
    """Options given on the command line, over the run directory's saved configuration, over defaults."""
    base = read_json(out / "manifest.json", default={}) or {}
    cfg = from_dict({**base.get("config", {}), "out": str(out)}) if base.get("config") else RunConfig(out=out)
    graph_opts = {k: given.pop(k) for k in GRAPH_KEYS}
    train = {k: given.pop(k) for k in TRAIN_KEYS}
    augment = {AUGMENT_KEYS[k]: given.pop(k) for k in AUGMENT_KEYS}
    gates = given.pop("gate")
    app = given.pop("app_preprocessing")
    changes = {k: v for k, v in given.items() if v is not None}
    for key in ("quant_modes", "tfjs_modes", "runtimes"):
        if key in changes:
            changes[key] = tuple(changes[key])
            if not changes[key]:
                changes.pop(key)
    if graph_opts["graph"] is not None:
        bottleneck = changes.pop("bottleneck_tensor", None)
        missing = [flag for flag, v in (("--input-tensor", graph_opts["input_tensor"]),
                                        ("--bottleneck-tensor", bottleneck),
                                        ("--input-size", graph_opts["input_size"])) if v is None]
        if missing:
            raise ConfigError(f"--graph {graph_opts['graph']} also needs {', '.join(missing)} (see `edgepipe inspect`)")
        changes["graph"] = CustomGraph(
            path=Path(graph_opts["graph"]), input_tensor=graph_opts["input_tensor"],
            bottleneck_tensor=bottleneck, input_size=graph_opts["input_size"],
            mean=127.5 if graph_opts["mean"] is None else graph_opts["mean"],
            std=127.5 if graph_opts["std"] is None else graph_opts["std"],
        )
    if "backbone" in changes and "graph" not in changes:
        changes["graph"] = None
    cfg = dataclasses.replace(cfg, **changes)
    cfg = dataclasses.replace(
        cfg,
        train=dataclasses.replace(cfg.train, **{k: v for k, v in train.items() if v is not None}),
        augment=dataclasses.replace(cfg.augment, **{k: v for k, v in augment.items() if v is not None}),
    )
    if gates:
        cfg = dataclasses.replace(cfg, gates={**cfg.gates, **parse_gates(gates)})
    if app is not None:
        # Given at all (even as contract values) replaces the saved setting: "--app-preprocessing
        # channel_order=RGB" brings a run directory back to the contract.
        cfg = dataclasses.replace(cfg, app_preprocessing=parse_app_preprocessing(app))
    return cfg


def _run(until: str, out: Path, **opts) -> None:
    from pipeline.stages import run_stages

    given = {k for k, v in opts.items() if v not in (None, [], ())}
    try:
        cfg = _build_config(out, **opts)
        validate(cfg, needs_images=until != "fetch", given=given)
        run_stages(cfg, until=until)
    except PipelineError as err:
        _fail(err)
    except OSError as err:
        # A full or read-only disk outside a stage (the manifest, the run folder itself).
        mapped = disk_error(err, str(out))
        if mapped is None:
            raise
        _fail(mapped)
    if until == "verify":
        typer.echo((out / "report.md").read_text(encoding="utf-8"))


def _stage_command(until: str, doc: str):
    def command(
        out: Out, images: Images = None, test_images: TestImages = None, backbone: Backbone = None,
        graph: Graph = None, input_tensor: InputTensor = None, bottleneck_tensor: BottleneckTensor = None,
        input_size: InputSize = None, mean: Mean = None, std: Std = None,
        validation_pct: ValPct = None, test_pct: TestPct = None,
        epochs: Epochs = None, steps: Steps = None, learning_rate: LearningRate = None,
        batch_size: BatchSize = None, validation_batch_size: ValBatchSize = None,
        hidden_units: HiddenUnits = None, dropout: Dropout = None, label_smoothing: LabelSmoothing = None,
        class_weights: ClassWeights = None, early_stopping: EarlyStopping = None, eval_every: EvalEvery = None,
        checkpoint_every: CheckpointEvery = None, seed: Seed = None, summaries_dir: SummariesDir = None,
        print_misclassified: PrintMisclassified = None,
        augment_copies: AugmentCopies = None, flip_left_right: FlipLeftRight = None,
        random_crop: RandomCrop = None, random_scale: RandomScale = None, random_brightness: RandomBrightness = None,
        quant: Quant = None, tfjs: Tfjs = None, runtime: Runtime = None, gate: Gate = None,
        runtime_timeout: RuntimeTimeout = None, stress: Stress = None, app_preprocessing: AppPrep = None,
        tfjs_shard_mb: TfjsShardMb = None,
        mirror: Mirror = None, cache_dir: CacheDir = None, offline: Offline = False, quiet: Quiet = False,
    ) -> None:
        opts = dict(locals())
        renamed = {"quant": "quant_modes", "tfjs": "tfjs_modes", "runtime": "runtimes",
                   "runtime_timeout": "runtime_timeout_s"}
        opts = {renamed.get(k, k): v for k, v in opts.items()
                if k not in ("out", "quiet", "offline", "until", "doc")}
        _run(until, out, offline=offline or None, progress=False if quiet else None, **opts)

    command.__doc__ = doc
    return command


app.command("run")(_stage_command("verify", "Chain every stage: fetch → retrain → export → quantize → tfjs → verify."))
app.command("retrain")(_stage_command("retrain", "Split the images, cache bottlenecks and train the head (runs fetch if needed)."))
app.command("export")(_stage_command("export", "Write backbone + head + normalisation as one SavedModel."))
app.command("quantize")(_stage_command("quantize", "Convert the SavedModel to TFLite float32/float16/dynamic/int8."))
app.command("tfjs")(_stage_command("tfjs", "Convert the SavedModel to TF.js graph-model bundles."))
app.command("verify")(_stage_command("verify", "Run the reference and every converted model on the test split; gate the drift."))


@app.command("fetch")
def fetch_command(
    backbone: Backbone = None, list_: Annotated[bool, typer.Option("--list", help="Show every catalog entry and whether it is cached.")] = False,
    mirror: Mirror = None, cache_dir: CacheDir = None, offline: Offline = False, quiet: Quiet = False,
) -> None:
    """Download (or find in the mirror) a backbone into the cache, checksum-verified."""
    from pipeline.catalog import get_backbone
    from pipeline.fetch import cache_status, fetch

    try:
        if list_:
            for spec in load_catalog().values():
                st = cache_status(spec, cache_dir)
                size = f"{st['size_bytes'] / 1e6:7.1f} MB" if st.get("size_bytes") else "      ?   "
                typer.echo(f"{spec.name:24s} {size}  {'cached' if st['cached'] else '-':7s} {spec.url}")
            return
        got = fetch(get_backbone(backbone or DEFAULT_BACKBONE), cache_dir=cache_dir, mirror=mirror,
                    offline=offline, progress=not quiet)
        typer.echo(f"{got.graph_path}  sha256 {got.graph_sha256}  ({got.source}, {got.checksum})")
    except PipelineError as err:
        _fail(err)


@app.command("inspect")
def inspect_command(
    graph: Annotated[Path, typer.Argument(help="A frozen graph (.pb).", show_default=False)],
) -> None:
    """List a frozen graph's placeholders and candidate bottleneck tensors (for --graph)."""
    from pipeline.inspect import describe, inspect_graph

    try:
        typer.echo(describe(inspect_graph(graph)))
    except PipelineError as err:
        _fail(err)


def main() -> None:
    app()


if __name__ == "__main__":
    main()

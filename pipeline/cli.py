"""The ``edgepipe`` command: parse options, build a RunConfig, call the library, map errors."""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.catalog import DEFAULT_BACKBONE, load_catalog
from pipeline.config import CustomGraph, RunConfig, from_dict, parse_gates, validate
from pipeline.errors import ConfigError, PipelineError
from pipeline.retrain import TrainConfig
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
Seed = Annotated[Optional[int], typer.Option(help="Seed for initialisation and shuffling.")]
Quant = Annotated[Optional[list[QuantMode]], typer.Option("--quant", help="TFLite variants (repeat; default all).")]
Tfjs = Annotated[Optional[list[TfjsMode]], typer.Option("--tfjs", help="TF.js variants (repeat; default float32, float16).")]
Runtime = Annotated[Optional[list[str]], typer.Option("--runtime", help="Runtimes to verify in (repeat; default all).")]
Gate = Annotated[Optional[list[str]], typer.Option("--gate", help="Minimum top-1 agreement, ARTIFACT=VALUE (repeat).")]
Mirror = Annotated[Optional[str], typer.Option(help="Mirror folder or base URL laid out <host>/<path> (default $EDGEPIPE_MIRROR).")]
CacheDir = Annotated[Optional[Path], typer.Option(help="Cache folder (default $EDGEPIPE_CACHE_DIR or ~/.cache/edgepipe).")]
Offline = Annotated[bool, typer.Option(help="Use only the cache and the mirror.")]
Quiet = Annotated[bool, typer.Option(help="No progress bars.")]


def _fail(err: PipelineError) -> None:
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(code=err.exit_code) from None


def _build_config(out: Path, **given) -> RunConfig:
    """Options given on the command line, over the run directory's saved configuration, over defaults."""
    base = read_json(out / "manifest.json", default={}) or {}
    cfg = from_dict({**base.get("config", {}), "out": str(out)}) if base.get("config") else RunConfig(out=out)
    graph_opts = {k: given.pop(k) for k in ("graph", "input_tensor", "bottleneck_tensor", "input_size", "mean", "std")}
    train = {k: given.pop(k) for k in ("epochs", "learning_rate", "batch_size", "seed")}
    gates = given.pop("gate")
    changes = {k: v for k, v in given.items() if v is not None}
    for key in ("quant_modes", "tfjs_modes", "runtimes"):
        if key in changes:
            changes[key] = tuple(changes[key])
            if not changes[key]:
                changes.pop(key)
    if graph_opts["graph"] is not None:
        missing = [f"--{k.replace('_', '-')}" for k in ("input_tensor", "bottleneck_tensor", "input_size")
                   if graph_opts[k] is None]
        if missing:
            raise ConfigError(f"--graph {graph_opts['graph']} also needs {', '.join(missing)} (see `edgepipe inspect`)")
        changes["graph"] = CustomGraph(
            path=Path(graph_opts["graph"]), input_tensor=graph_opts["input_tensor"],
            bottleneck_tensor=graph_opts["bottleneck_tensor"], input_size=graph_opts["input_size"],
            mean=127.5 if graph_opts["mean"] is None else graph_opts["mean"],
            std=127.5 if graph_opts["std"] is None else graph_opts["std"],
        )
    if "backbone" in changes and "graph" not in changes:
        changes["graph"] = None
    cfg = dataclasses.replace(cfg, **changes)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **{k: v for k, v in train.items() if v is not None}))
    if gates:
        cfg = dataclasses.replace(cfg, gates=parse_gates(gates))
    return cfg


def _run(until: str, out: Path, **opts) -> None:
    from pipeline.stages import run_stages

    try:
        cfg = _build_config(out, **opts)
        validate(cfg, needs_images=until != "fetch")
        run_stages(cfg, until=until)
    except PipelineError as err:
        _fail(err)
    if until == "verify":
        typer.echo((out / "report.md").read_text(encoding="utf-8"))


def _stage_command(until: str, doc: str):
    def command(
        out: Out, images: Images = None, test_images: TestImages = None, backbone: Backbone = None,
        graph: Graph = None, input_tensor: InputTensor = None, bottleneck_tensor: BottleneckTensor = None,
        input_size: InputSize = None, mean: Mean = None, std: Std = None,
        validation_pct: ValPct = None, test_pct: TestPct = None, epochs: Epochs = None,
        learning_rate: LearningRate = None, batch_size: BatchSize = None, seed: Seed = None,
        quant: Quant = None, tfjs: Tfjs = None, runtime: Runtime = None, gate: Gate = None,
        mirror: Mirror = None, cache_dir: CacheDir = None, offline: Offline = False, quiet: Quiet = False,
    ) -> None:
        _run(until, out, images=images, test_images=test_images, backbone=backbone, graph=graph,
             input_tensor=input_tensor, bottleneck_tensor=bottleneck_tensor, input_size=input_size,
             mean=mean, std=std, validation_pct=validation_pct, test_pct=test_pct, epochs=epochs,
             learning_rate=learning_rate, batch_size=batch_size, seed=seed, quant_modes=quant,
             tfjs_modes=tfjs, runtimes=runtime, gate=gate, mirror=mirror, cache_dir=cache_dir,
             offline=offline or None, progress=False if quiet else None)

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


def main() -> None:
    app()


if __name__ == "__main__":
    main()

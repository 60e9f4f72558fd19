#!/usr/bin/env python3
"""Bottleneck extraction and retrain speed, against a poets-style baseline measured in the same run.

Prints images/s for:
  baseline   tensorflow-for-poets' loop: one image per session call, batch 1
  cold       edgepipe extraction into an empty cache (parallel decode, batched inference, cache writes)
  warm       the same images again, every bottleneck from the cache
then peak memory of a cold extraction on the image set and on the set replicated 10× (distinct
bytes, so the cache cannot dedupe them), wall time of a cold and a repeated `edgepipe retrain`
and `edgepipe run`, and the test accuracy of a head on the pooled feature vs poets' 1001 logits.

Usage: .venv/bin/python scripts/bench_bottlenecks.py [--images DIR] [--backbone NAME] [--skip-runs]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
SHARED = REPO.parent / "shared"
FLOWERS = SHARED / "datasets" / "flowers8"


def images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp"))


def poets_baseline(paths: list[Path], graph_path: Path, spec) -> float:
    """One session call per image at batch 1, decode and resize in TF, as poets' retrain.py did."""
    import tensorflow as tf

    graph = tf.Graph()
    with graph.as_default():
        gd = tf.compat.v1.GraphDef()
        gd.ParseFromString(graph_path.read_bytes())
        jpeg = tf.compat.v1.placeholder(tf.string)
        img = tf.image.decode_jpeg(jpeg, channels=3)
        size = spec.preprocessing.size
        resized = tf.image.resize(tf.cast(img, tf.float32)[None], (size, size))
        normalised = (resized - spec.preprocessing.mean) / spec.preprocessing.std
        (bottleneck,) = tf.graph_util.import_graph_def(gd, input_map={spec.input_tensor: normalised},
                                                        return_elements=[spec.bottleneck_tensor], name="")
    with tf.compat.v1.Session(graph=graph) as sess:
        sess.run(bottleneck, {jpeg: paths[0].read_bytes()})
        start = time.perf_counter()
        for p in paths:
            sess.run(bottleneck, {jpeg: p.read_bytes()})
        return len(paths) / (time.perf_counter() - start)


def edgepipe_extract(paths, graph_path, spec, cache: Path, engine: str = "litert") -> tuple[float, int, int]:
    import numpy as np

    from pipeline.bottlenecks import extract, get_extractor
    from pipeline.rundir import sha256_file

    sha = sha256_file(graph_path)
    # Loaded and warmed up before the clock starts, like the baseline's session (once per worker).
    size = spec.preprocessing.size
    get_extractor(str(graph_path), spec, engine)(np.zeros((1, size, size, 3), np.float32))
    start = time.perf_counter()
    res = extract(paths, graph_path, spec, sha, cache, progress=False, engine=engine)
    return len(paths) / (time.perf_counter() - start), res.computed, res.cached


def peak_rss_mb(folder: Path, backbone: str, cache: Path) -> float:
    """Peak RSS of a cold extraction in a fresh process (ru_maxrss of the child)."""
    code = (
        "import sys; sys.path.insert(0, %r)\n"
        "from pathlib import Path\n"
        "from scripts.bench_bottlenecks import images_in, load\n"
        "paths = images_in(Path(%r)); graph, spec = load(%r)\n"
        "from pipeline.bottlenecks import extract\n"
        "extract(paths, graph, spec, 'x', Path(%r), progress=False)\n"
    ) % (str(REPO), str(folder), backbone, str(cache))
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ})
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(after, before) / 1024


def replicate(paths: list[Path], dest: Path, times: int) -> Path:
    """Copies with distinct trailing bytes: same pixels, different content hashes."""
    for k in range(times):
        for i, p in enumerate(paths):
            d = dest / p.parent.name
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{k}_{i}{p.suffix}").write_bytes(p.read_bytes() + b"\0" * (k + 1))
    return dest


def load(backbone: str):
    from pipeline.backbone import load_graph_def, resolve_spec
    from pipeline.catalog import get_backbone
    from pipeline.fetch import fetch

    spec = get_backbone(backbone)
    got = fetch(spec, progress=False)
    return got.graph_path, resolve_spec(load_graph_def(got.graph_path), spec)


def timed_cli(*args) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipeline.cli", *map(str, args)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=Path, default=FLOWERS / "train")
    ap.add_argument("--test-images", type=Path, default=FLOWERS / "test")
    ap.add_argument("--backbone", default="mobilenet_v1_0.25_224")
    ap.add_argument("--skip-runs", action="store_true", help="only the extraction figures")
    a = ap.parse_args()
    if (SHARED / "mirror").is_dir():
        os.environ.setdefault("EDGEPIPE_MIRROR", str(SHARED / "mirror"))
    work = Path(tempfile.mkdtemp(prefix="edgepipe-bench-"))
    os.environ["EDGEPIPE_CACHE_DIR"] = str(work / "cache")
    try:
        graph, spec = load(a.backbone)
        paths = images_in(a.images)
        rows = []
        base = poets_baseline(paths, graph, spec)
        rows.append(("baseline (poets: batch 1, one call per image)", base))
        cold_tf, computed, _ = edgepipe_extract(paths, graph, spec, work / "bn-tf", engine="tensorflow")
        rows.append((f"edgepipe cold, TensorFlow engine ({computed} computed)", cold_tf))
        cold, computed, _ = edgepipe_extract(paths, graph, spec, work / "bn")
        rows.append((f"edgepipe cold, LiteRT engine, the default ({computed} computed)", cold))
        warm, _, cached = edgepipe_extract(paths, graph, spec, work / "bn")
        rows.append((f"edgepipe warm ({cached} from cache)", warm))
        print(f"\n{len(paths)} images, {a.backbone}, {os.cpu_count()} cores\n")
        print("| extraction | images/s | vs baseline |\n|---|---|---|")
        for name, ips in rows:
            print(f"| {name} | {ips:.1f} | {ips / base:.2f}× |")
        print(f"\nwarm / cold: {warm / cold:.1f}×")

        tenx = replicate(paths, work / "tenx", 10)
        one = replicate(paths, work / "onex", 1)
        rss1 = peak_rss_mb(one, a.backbone, work / "rss1")
        rss10 = peak_rss_mb(tenx, a.backbone, work / "rss10")
        print("\n| cold extraction | images | peak RSS |\n|---|---|---|")
        print(f"| 1× | {len(paths)} | {rss1:.0f} MB |\n| 10× | {10 * len(paths)} | {rss10:.0f} MB |")
        print(f"peak memory 10× / 1×: {rss10 / rss1:.2f}")

        if a.skip_runs:
            return
        os.environ["EDGEPIPE_CACHE_DIR"] = str(work / "cache-runs")
        common = ["--images", a.images, "--test-images", a.test_images, "--backbone", a.backbone, "--quiet"]
        t_cold = timed_cli("retrain", *common, "--out", work / "r1")
        t_warm = timed_cli("retrain", *common, "--out", work / "r2")
        t_run = timed_cli("run", *common, "--out", work / "r1")
        t_again = timed_cli("run", *common, "--out", work / "r1")
        poets = 132.0
        print("\n| command | wall s | vs poets' 2 min 12 s cold |\n|---|---|---|")
        print(f"| edgepipe retrain, cold cache | {t_cold:.1f} | {t_cold / poets:.2f} |")
        print(f"| edgepipe retrain, warm bottleneck cache (new run dir) | {t_warm:.1f} | {t_warm / poets:.2f} |")
        print(f"| edgepipe run (rest of the chain) | {t_run:.1f} | |")
        print(f"| edgepipe run again, nothing changed | {t_again:.1f} | |")

        timed_cli("retrain", *common, "--out", work / "logits", "--bottleneck-tensor",
                  "MobilenetV1/Predictions/Reshape:0")
        acc = lambda run: json.loads((run / "retrain" / "metrics.json").read_text())["test"]["accuracy"]  # noqa: E731
        print("\n| bottleneck | features | test accuracy |\n|---|---|---|")
        print(f"| {spec.bottleneck_tensor} (edgepipe) | {spec.feature_size} | {acc(work / 'r1'):.4f} |")
        print(f"| MobilenetV1/Predictions/Reshape:0 (poets' 1001 logits) | 1001 | {acc(work / 'logits'):.4f} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

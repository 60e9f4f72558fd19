#!/usr/bin/env python3
"""The whole chain against its floor and against the old shape, in one run (`make bench-chain`).

For each backbone (the catalog's mobilenet_v1_0.25_224 through the mirror, and the real MobileNet
v1 1.0_224 of ../shared/graphs via --graph) on flowers8, cold (empty cache, fresh run folder):
  new    `edgepipe run` as it is now: wall time per stage (the manifest's seconds) and in all
  floor  quantize: the converter's own time for one conversion of each variant from the SavedModel
         (TFLiteConverter.from_saved_model + convert(), each variant alone); verify: each row's
         batched inference time in its fastest configuration (batch 16 or 1, every core; images
         already in memory, model already loaded), summed over the rows, plus the reference's
  old    the chain as it was before (BASELINE commit, a git worktree): a process per (artifact,
         runtime) pair, image by image, each int8 variant calibrated from scratch, dynamic batch
then the report figures of new and old side by side (agreement, accuracy: equal for float
variants; int8 differences shown), single-image latency p50 of each TFLite file in both runtimes
(new: fixed batch of 1; old: dynamic batch), and verify's peak RSS on caltech101's test split and
on ten times as many test photos.

Usage: .venv/bin/python scripts/bench_chain.py [--backbones 0.25,1.0] [--skip-old] [--skip-memory]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared"
FLOWERS = SHARED / "datasets" / "flowers8"
CALTECH = SHARED / "datasets" / "caltech101"
BASELINE = "28c3baa"  # the last commit before the chain was reshaped for speed (issue 11)
POETS = SHARED / "graphs" / "poets_retrained_mobilenet_v1_1.0_224.pb"
BACKBONES = {
    "0.25": ["--backbone", "mobilenet_v1_0.25_224"],
    "1.0": ["--graph", str(POETS), "--input-tensor", "input:0",
            "--bottleneck-tensor", "MobilenetV1/Logits/AvgPool_1a/AvgPool:0", "--input-size", "224"],
}
STAGES = ("fetch", "retrain", "export", "quantize", "tfjs", "verify")
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "EDGEPIPE_MIRROR": str(SHARED / "mirror")}


def edgepipe(code: Path, *args: str, cache: Path) -> float:
    """`python -m pipeline.cli ARGS` from the checkout at ``code``; returns its wall time."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *args, "--quiet"], cwd=code,
                          env={**ENV, "EDGEPIPE_CACHE_DIR": str(cache), "PYTHONPATH": str(code)},
                          capture_output=True, text=True)
    if proc.returncode not in (0, 3):
        sys.exit(f"edgepipe {' '.join(args)} failed in {code} (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def old_checkout(work: Path) -> Path:
    """The BASELINE commit as a worktree, with this checkout's npm packages."""
    tree = work / "old"
    subprocess.run(["git", "worktree", "add", "--detach", "--force", str(tree), BASELINE], cwd=REPO, check=True,
                   capture_output=True)
    modules = REPO / "pipeline" / "runners" / "tfjs" / "node_modules"
    (tree / "pipeline" / "runners" / "tfjs" / "node_modules").symlink_to(modules)
    return tree


def run_chain(code: Path, out: Path, backbone: str, cache: Path) -> dict:
    wall = edgepipe(code, "run", "--out", str(out), "--images", str(FLOWERS / "train"),
                    "--test-images", str(FLOWERS / "test"), *BACKBONES[backbone], cache=cache)
    manifest = json.loads((out / "manifest.json").read_text())
    return {"wall": wall, **{s: manifest["stages"][s]["seconds"] for s in STAGES}}


PREP_KEYS = ("size", "mean", "std", "resize_method", "antialias", "channel_order")


def preprocessing_of(run: Path):
    from pipeline.types import Preprocessing

    d = json.loads((run / "export" / "preprocessing.json").read_text())
    return Preprocessing(**{k: d[k] for k in PREP_KEYS})


# --- floors ------------------------------------------------------------------------------------

def quantize_floor(run: Path) -> dict[str, float]:
    """Each variant converted once by TensorFlow's converter, from the SavedModel (in a process)."""
    code = f"""
import json, sys, time
sys.path.insert(0, {str(REPO)!r})
import tensorflow as tf
from pathlib import Path
from pipeline.quantize import _RECIPES, _images
from pipeline.types import QuantMode
from pipeline.types import Preprocessing
d = json.load(open({str(run / 'export' / 'preprocessing.json')!r}))
prep = Preprocessing(**{{k: d[k] for k in {PREP_KEYS!r}}})
calibration = sorted(str(p) for p in Path({str(FLOWERS / 'train')!r}).rglob("*.jpg"))[::4][:100]
rep = _images(calibration, prep)
def representative():
    for x in rep():
        yield [x]
out = {{}}
for mode in QuantMode:
    c = tf.lite.TFLiteConverter.from_saved_model({str(run / 'export' / 'savedmodel')!r})
    _RECIPES[mode](c, representative)
    t = time.perf_counter(); c.convert(); out[mode.value] = time.perf_counter() - t
print(json.dumps(out))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV)
    if proc.returncode != 0:
        sys.exit(f"quantize floor failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


FLOOR_WORKER = """
import json, sys, time, importlib, os
import numpy as np
sys.path.insert(0, {repo!r})
from pipeline.runners.feed import FeedFile
from pipeline.runners.tflite import _quantise
mod = importlib.import_module(sys.argv[1])
feed = FeedFile.from_dict(json.loads(sys.argv[2]))
x = feed.read(0, len(feed))
cores = os.cpu_count() or 1
out = {{}}
for model in sys.argv[3:]:
    best = None
    for batch in (16, 1):
        it = mod.Interpreter(model_path=model, num_threads=cores)
        d = it.get_input_details()[0]
        it.resize_tensor_input(d["index"], [batch, *x.shape[1:]]); it.allocate_tensors()
        q = _quantise(x, d)
        chunks = [q[k:k + batch] for k in range(0, len(q) - batch + 1, batch)]
        it.set_tensor(d["index"], chunks[0]); it.invoke()
        t = time.perf_counter()
        for c in chunks:
            it.set_tensor(d["index"], c); it.invoke()
        per_image = (time.perf_counter() - t) / (len(chunks) * batch)
        best = per_image if best is None else min(best, per_image)
    out[model] = best * len(x)
print(json.dumps(out))
"""


def verify_floor(run: Path) -> tuple[dict[str, float], float]:
    """Seconds of each row's batched inference in its fastest configuration, and the reference's."""
    from pipeline.verify import load_holdout

    report = json.loads((run / "report.json").read_text())
    prep = preprocessing_of(run)

    class E:  # what load_holdout reads of a dataset example
        def __init__(self, path, label):
            self.path, self.label = path, label

    floors: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-floor-") as tmp:
        holdout = load_holdout([E(p, 0) for p in report["test_images"]], prep, Path(tmp))
        feed = holdout.contract
        models = sorted(str(p) for p in (run / "quantize").glob("*.tflite"))
        for runtime, module in (("tflite-runtime", "tflite_runtime.interpreter"),
                                ("ai-edge-litert", "ai_edge_litert.interpreter")):
            proc = subprocess.run([sys.executable, "-c", FLOOR_WORKER.format(repo=str(REPO)), module,
                                   json.dumps(feed.to_dict()), *models], capture_output=True, text=True, env=ENV)
            if proc.returncode != 0:
                sys.exit(f"verify floor failed in {runtime}:\n{proc.stderr[-3000:]}")
            for model, seconds in json.loads(proc.stdout.strip().splitlines()[-1]).items():
                floors[f"tflite-{Path(model).stem}/{runtime}"] = seconds
        node = REPO / "pipeline" / "runners" / "tfjs" / "run.mjs"
        for bundle in sorted(p for p in (run / "tfjs").iterdir() if (p / "model.json").is_file()):
            best = None
            for batch in (16, 1):
                proc = subprocess.run(["node", str(node), "--model", str(bundle), "--input", str(feed.path),
                                       "--shape", ",".join(map(str, feed.shape)), "--output", f"{tmp}/o.bin",
                                       "--batch", str(batch), "--latency-runs", "0"], capture_output=True, text=True)
                ms = json.loads(proc.stdout.strip().splitlines()[-1])["agreement_pass_ms"]
                best = ms if best is None else min(best, ms)
            floors[f"tfjs-{bundle.name}/tfjs-wasm"] = best / 1000
        import tensorflow as tf

        fn = tf.saved_model.load(str(run / "export" / "savedmodel")).signatures["serving_default"]
        x = feed.read(0, len(feed))
        fn(images=tf.constant(x[:32]))
        t = time.perf_counter()
        for k in range(0, len(x), 32):
            fn(images=tf.constant(x[k:k + 32]))
        reference = time.perf_counter() - t
    rows = {f"{r['artifact']}/{r['runtime']}" for r in report["results"] if r["artifact"] != "savedmodel"}
    return {k: v for k, v in floors.items() if k in rows}, reference


# --- memory ------------------------------------------------------------------------------------

def peak_rss_mb(code: Path, *args: str, cache: Path) -> float:
    """Peak RSS of the largest process of `edgepipe ARGS` (verify and its workers), in MB."""
    wrapper = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:]); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    proc = subprocess.run([sys.executable, "-c", wrapper, sys.executable, "-m", "pipeline.cli", *args, "--quiet"],
                          cwd=code, env={**ENV, "EDGEPIPE_CACHE_DIR": str(cache), "PYTHONPATH": str(code)},
                          capture_output=True, text=True)
    return int(proc.stdout.strip().splitlines()[-1]) / 1024


def memory(work: Path, cache: Path, old_code: Path | None) -> None:
    """verify's peak RSS on caltech101's test split (the hash split: 1,337 photos) and on ten
    symlinked copies of each of those photos (a test folder of 13,370)."""
    def chain(run: Path, *data: str) -> None:
        edgepipe(REPO, "retrain", "--out", str(run), "--images", str(CALTECH), *data, cache=cache)
        edgepipe(REPO, "quantize", "--out", str(run), "--quant", "float32", cache=cache)
        edgepipe(REPO, "tfjs", "--out", str(run), "--tfjs", "float32", cache=cache)

    verify = ("verify", "--runtime", "ai-edge-litert", "--latency-runs", "5")
    print("\nverify peak RSS on caltech101 (0.25_224, float32 in ai-edge-litert and tfjs-wasm; the largest "
          "process, TensorFlow included):")
    one = work / "caltech-x1"
    chain(one)
    tests = json.loads((one / "report.json").read_text())["test_images"] if (one / "report.json").exists() else []
    for copies in (1, 10):
        run = one if copies == 1 else work / "caltech-x10"
        if copies == 10:
            folder = work / "caltech-test-x10"
            split = json.loads((one / "retrain" / "split.json").read_text())
            test_paths = tests or [p for p, s in split.items() if s == "test"]
            for p in map(Path, test_paths):
                (folder / p.parent.name).mkdir(parents=True, exist_ok=True)
                for k in range(copies):
                    (folder / p.parent.name / f"c{k}_{p.name}").symlink_to(p)
            chain(run, "--test-images", str(folder))
        start = time.perf_counter()
        rss = peak_rss_mb(REPO, *verify, "--out", str(run), cache=cache)
        seconds = time.perf_counter() - start
        report = json.loads((run / "report.json").read_text())
        tests = tests or report["test_images"]
        print(f"  new, {report['n_test']:6d} test photos: peak RSS {rss:7.0f} MB, verify {seconds:.1f} s")
        if copies == 1 and old_code is not None:
            old_run = work / "caltech-x1-old"
            shutil.copytree(one, old_run, symlinks=True)
            start = time.perf_counter()
            rss = peak_rss_mb(old_code, *verify[:3], "--out", str(old_run), cache=cache)
            print(f"  old, {report['n_test']:6d} test photos: peak RSS {rss:7.0f} MB, verify {time.perf_counter() - start:.1f} s "
                  "(its quantize and tfjs re-run first: their fingerprints differ)")


# --- output ------------------------------------------------------------------------------------

def rows_of(run: Path) -> dict[str, dict]:
    return {f"{r['artifact']}/{r['runtime']}": r for r in json.loads((run / "report.json").read_text())["results"]}


def show(backbone: str, new: dict, old: dict | None, qfloor: dict, vfloor: dict, reference: float,
         new_run: Path, old_run: Path | None) -> None:
    print(f"\n## {backbone} on flowers8 (160 test images), cold")
    print(f"{'stage':10s} {'new s':>8s} {'floor s':>8s} {'new/floor':>9s} {'old s':>8s} {'old/new':>8s}")
    floors = {"quantize": sum(qfloor.values()), "verify": sum(vfloor.values()) + reference}
    for stage in (*STAGES, "wall"):
        f = floors.get(stage)
        o = old[stage] if old else None
        print(f"{stage:10s} {new[stage]:8.1f} {f'{f:8.1f}' if f else '       -'} "
              f"{f'{new[stage] / f:9.2f}' if f else '        -'} {f'{o:8.1f}' if o else '       -'} "
              f"{f'{o / new[stage]:8.2f}' if o else '       -'}")
    print(f"verify floor: {len(vfloor)} rows, {sum(vfloor.values()):.1f} s + reference {reference:.1f} s; "
          "quantize floor: " + ", ".join(f"{k} {v:.1f}" for k, v in qfloor.items()))
    new_rows = rows_of(new_run)
    old_rows = rows_of(old_run) if old_run else {}
    print(f"\n{'row':34s} {'agree new':>9s} {'old':>7s} {'acc new':>8s} {'old':>7s} {'p50 new':>8s} {'p90':>7s} "
          f"{'p50 old':>8s} {'floor s':>8s}")
    for key, r in new_rows.items():
        o = old_rows.get(key, {})
        fl = vfloor.get(key)
        print(f"{key:34s} {r['top1_agreement']:9.4f} {o.get('top1_agreement', float('nan')):7.4f} "
              f"{r['accuracy']:8.4f} {o.get('accuracy', float('nan')):7.4f} {r['latency_ms'] or float('nan'):8.2f} "
              f"{r.get('latency_p90_ms') or float('nan'):7.2f} {o.get('latency_ms', float('nan')):8.2f} "
              f"{f'{fl:8.2f}' if fl else '       -'}")
    for variant in ("float32", "float16", "int8"):
        a, b = new_rows.get(f"tflite-{variant}/tflite-runtime"), new_rows.get(f"tflite-{variant}/ai-edge-litert")
        if a and b and a["latency_ms"] and b["latency_ms"]:
            print(f"tflite-{variant}: tflite-runtime p50 {a['latency_ms']:.2f} ms = "
                  f"{a['latency_ms'] / b['latency_ms']:.2f}x ai-edge-litert's {b['latency_ms']:.2f} ms")
    if old_rows:
        differ = [k for k in new_rows if k in old_rows and
                  (new_rows[k]["top1_agreement"], new_rows[k]["accuracy"]) !=
                  (old_rows[k]["top1_agreement"], old_rows[k]["accuracy"])]
        print("rows whose agreement or accuracy differ from the old shape: " + (", ".join(differ) or "none"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbones", default="0.25,1.0")
    ap.add_argument("--skip-old", action="store_true", help="no old-shape baseline (faster; no old/new ratios)")
    ap.add_argument("--skip-memory", action="store_true", help="no caltech101 peak-RSS runs")
    ap.add_argument("--work", type=Path, default=None, help="keep the run folders here")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="edgepipe-bench-chain-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"bench-chain: {os.cpu_count()} cores, work in {work}; baseline = commit {BASELINE}")
    old_code = None if args.skip_old else old_checkout(work)
    try:
        for backbone in args.backbones.split(","):
            new_run, old_run = work / f"new-{backbone}", work / f"old-{backbone}"
            new = run_chain(REPO, new_run, backbone, work / f"cache-new-{backbone}")
            old = None if old_code is None else run_chain(old_code, old_run, backbone, work / f"cache-old-{backbone}")
            qfloor = quantize_floor(new_run)
            vfloor, reference = verify_floor(new_run)
            show(backbone, new, old, qfloor, vfloor, reference, new_run, old_run if old else None)
        if not args.skip_memory:
            memory(work, work / "cache-caltech", old_code)
    finally:
        if old_code is not None:
            subprocess.run(["git", "worktree", "remove", "--force", str(old_code)], cwd=REPO, capture_output=True)


if __name__ == "__main__":
    main()

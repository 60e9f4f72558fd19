#!/usr/bin/env python3
"""Bottleneck extraction and retrain speed, against a poets-style baseline measured in the same run.

Prints images/s for:
  baseline   tensorflow-for-poets' retrain.py loop: per image a decode call and a backbone call at
             batch 1, and the bottleneck written as text (also shown: a lighter one-call loop)
  floor      the backbone alone: LiteRT/XNNPACK on the same images already decoded and resized to
             float32 batches (no file read, no decode, no cache), in its two thread layouts; the
             faster is the floor cold extraction is compared with
  cold       edgepipe extraction into an empty cache (parallel decode, batched inference, cache writes)
  warm       the same images again, every bottleneck from the cache (and without the file-hash
             index, when every image is read and hashed again)
then peak memory of a cold extraction on the image set and on the set replicated 10× (distinct
bytes, so the cache cannot dedupe them), wall time of a cold and a repeated `edgepipe retrain`
and `edgepipe run`, and the test accuracy of a head on the pooled feature vs poets' 1001 logits.

and, measured on one core in the same run, what a cold extraction does per image beside the
backbone (decode and resize, read and hash, create the cache file), hence the best it could reach
against the floor on these cores.

Usage: .venv/bin/python scripts/bench_bottlenecks.py [--images DIR] [--sample N] [--backbone NAME] [--repeat N]
       [--skip-runs]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
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

from pipeline.bottlenecks import HASH_INDEX_NAME  # noqa: E402


def images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp"))


def poets_baseline(paths: list[Path], graph_path: Path, spec, bottleneck_dir: Path) -> float:
    """tensorflow-for-poets-2's retrain.py loop, as it extracts a missing bottleneck: read the
    file, one session call to decode and resize it, a second to run the backbone on the result at
    batch 1, then the feature written as comma-joined text (``create_bottleneck_file``)."""
    import numpy as np
    import tensorflow as tf

    from pipeline.graph import load_graph_def

    graph = tf.Graph()
    with graph.as_default():
        gd = load_graph_def(graph_path, fix=False)  # the file as is, as poets read it
        bottleneck, resized_input = tf.graph_util.import_graph_def(
            gd, return_elements=[spec.bottleneck_tensor, spec.input_tensor], name="")
        jpeg = tf.compat.v1.placeholder(tf.string)
        img = tf.cast(tf.image.decode_jpeg(jpeg, channels=3), tf.float32)
        size = spec.preprocessing.size
        resized = tf.compat.v1.image.resize_bilinear(img[None], [size, size])
        decoded = (resized - spec.preprocessing.mean) / spec.preprocessing.std
    bottleneck_dir.mkdir(parents=True, exist_ok=True)
    with tf.compat.v1.Session(graph=graph) as sess:
        def one(path: Path, out: Path) -> None:
            values = sess.run(decoded, {jpeg: path.read_bytes()})
            feature = np.squeeze(sess.run(bottleneck, {resized_input: values}))
            out.write_text(",".join(str(x) for x in feature))

        one(paths[0], bottleneck_dir / "warm-up.txt")
        start = time.perf_counter()
        for p in paths:
            one(p, bottleneck_dir / f"{p.parent.name}_{p.name}.txt")
        return len(paths) / (time.perf_counter() - start)


def fused_baseline(paths: list[Path], graph_path: Path, spec) -> float:
    """A lighter batch-1 loop than poets': decode, resize and backbone in one session call per
    image, and no cache written."""
    import tensorflow as tf

    from pipeline.graph import load_graph_def

    graph = tf.Graph()
    with graph.as_default():
        gd = load_graph_def(graph_path, fix=False)  # the file as is, as poets read it
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


def decoded(paths: list[Path], spec):
    """The images as the backbone takes them: float32 ``[N, size, size, 3]``, decoded and resized."""
    import numpy as np

    from pipeline.images import load_pixels

    out = np.empty((len(paths), spec.preprocessing.size, spec.preprocessing.size, 3), np.float32)
    for i, p in enumerate(paths):
        out[i] = load_pixels(p.read_bytes(), spec.preprocessing, str(p))
    return out


def cpu_s() -> float:
    """This process's CPU seconds so far, user and system, all threads."""
    t = os.times()
    return t.user + t.system


def inference_floor(extractor, batch) -> tuple[float, float]:
    """The backbone alone on decoded float32 batches, the floor for cold extraction: images/s
    and CPU ms per image."""
    cpu, start = cpu_s(), time.perf_counter()
    for k in range(0, len(batch), 64):  # extract()'s batches
        extractor(batch[k:k + 64])
    return len(batch) / (time.perf_counter() - start), (cpu_s() - cpu) / len(batch) * 1e3


def per_image_costs(paths: list[Path], spec, folder: Path) -> dict[str, float]:
    """CPU ms per image, on one thread, of what a cold extraction does besides the backbone."""
    import hashlib

    import numpy as np

    from pipeline.bottlenecks import BottleneckCache
    from pipeline.images import load_pixels, read_image_file

    def cpu_ms(fn) -> float:
        before = cpu_s()
        fn()
        return (cpu_s() - before) / len(paths) * 1e3

    datas: list[bytes] = []

    def read_and_hash() -> None:
        for p in paths:
            datas.append(read_image_file(p))
            hashlib.sha256(datas[-1]).digest()

    read = cpu_ms(read_and_hash)
    cache = BottleneckCache(folder, "probe", spec.feature_size)
    feature = np.zeros(spec.feature_size, np.float32)
    return {
        "read": read,
        "decode": cpu_ms(lambda: [load_pixels(d, spec.preprocessing) for d in datas]),
        "write": cpu_ms(lambda: [cache.put(f"{k:064x}", feature) for k in range(len(paths))]),
    }


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


def peak_rss_mb(folder: Path, backbone: str, cache: Path) -> tuple[float, float, float]:
    """A cold extraction in a fresh process: (RSS once the model is loaded, highest RSS sampled
    every 5 ms during extraction, the process's lifetime peak ru_maxrss), in MB."""
    code = (
        "import resource, sys, threading, time; sys.path.insert(0, %r)\n"
        "from pathlib import Path\n"
        "import numpy as np\n"
        "from scripts.bench_bottlenecks import images_in, load\n"
        "paths = images_in(Path(%r)); graph, spec = load(%r)\n"
        "from pipeline.bottlenecks import extract, get_extractor\n"
        "s = spec.preprocessing.size\n"
        "get_extractor(str(graph), spec, 'litert')(np.zeros((1, s, s, 3), np.float32))\n"
        "rss = lambda: int(open('/proc/self/statm').read().split()[1]) * resource.getpagesize()\n"
        "before, peak, done = rss(), [0], threading.Event()\n"
        "def watch():\n"
        "    while not done.is_set():\n"
        "        peak[0] = max(peak[0], rss()); time.sleep(0.005)\n"
        "t = threading.Thread(target=watch); t.start()\n"
        "extract(paths, graph, spec, 'x', Path(%r), progress=False)\n"
        "done.set(); t.join()\n"
        "print(before, peak[0], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)\n"
    ) % (str(REPO), str(folder), backbone, str(cache))
    done = subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ},
                          stdout=subprocess.PIPE, text=True)
    before, during, lifetime = (int(x) / 2**20 for x in done.stdout.split()[-3:])
    return before, during, lifetime


def create_cost_us(folder: Path, n: int = 300) -> float:
    """Wall µs to create one 1 KB file atomically here, as a cache entry is written.

    On a journal-less ext4 (this VM's disk) inode allocation skips inodes freed in the last
    minutes, so right after many deletions each creation can cost ~1 ms instead of ~50 µs; both
    poets' text cache and edgepipe's cache pay it, edgepipe proportionally more.
    """
    from pipeline.rundir import atomic_write_bytes

    folder.mkdir(parents=True)
    start = time.perf_counter()
    for k in range(n):
        atomic_write_bytes(folder / f"{k}.npy", b"x" * 1152, durable=False)
    return (time.perf_counter() - start) / n * 1e6


def replicate(paths: list[Path], dest: Path, times: int) -> Path:
    """Copies with distinct trailing bytes: same pixels, different content hashes."""
    for k in range(times):
        for i, p in enumerate(paths):
            d = dest / p.parent.name
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{k}_{i}{p.suffix}").write_bytes(p.read_bytes() + b"\0" * (k + 1))
    return dest


def load(backbone: str):
    from pipeline.backbone import resolve_spec
    from pipeline.catalog import get_backbone
    from pipeline.fetch import fetch
    from pipeline.graph import load_graph_def

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
    ap.add_argument("--sample", type=int, default=0,
                    help="use N of the images, evenly spread over their sorted list (default: all)")
    ap.add_argument("--test-images", type=Path, default=FLOWERS / "test")
    ap.add_argument("--backbone", default="mobilenet_v1_0.25_224")
    ap.add_argument("--skip-runs", action="store_true", help="only the extraction and memory figures (no CLI runs)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per extraction figure (the median is shown)")
    ap.add_argument("--work", type=Path, default=None,
                    help="scratch folder, removed at the end (default: a new one beside edgepipe's cache, "
                         "on the disk real caches are written to)")
    a = ap.parse_args()
    if (SHARED / "mirror").is_dir():
        os.environ.setdefault("EDGEPIPE_MIRROR", str(SHARED / "mirror"))
    from pipeline.fetch import default_cache_dir

    parent = a.work or default_cache_dir().parent
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="edgepipe-bench-", dir=parent))
    os.environ["EDGEPIPE_CACHE_DIR"] = str(work / "cache")
    try:
        graph, spec = load(a.backbone)
        paths = images_in(a.images)
        if 0 < a.sample < len(paths):
            paths = [paths[k * len(paths) // a.sample] for k in range(a.sample)]
        from pipeline.backbone import LiteRTFeatureExtractor, get_extractor

        extractor = get_extractor(str(graph), spec, "litert")  # the one extract() uses
        one_interpreter = LiteRTFeatureExtractor(graph, spec, interpreters=1)  # all threads in one
        pixels = decoded(paths, spec)
        for warm_up in (extractor, one_interpreter):
            inference_floor(warm_up, pixels[:64])
        cpu_ms: dict[str, list[float]] = {"floor": [], "cold": []}
        # Every figure is the median of --repeat runs, the runs of all rows interleaved, so a slow
        # patch of this shared machine falls on every row alike.
        runs: dict[str, list[float]] = {k: [] for k in ("floor", "floor1", "poets", "lighter", "tf", "cold", "warm",
                                                         "unindexed")}
        costs: list[dict[str, float]] = []
        for r in range(a.repeat):
            ips, cpu = inference_floor(extractor, pixels)
            runs["floor"].append(ips)
            cpu_ms["floor"].append(cpu)
            runs["floor1"].append(inference_floor(one_interpreter, pixels)[0])
            costs.append(per_image_costs(paths, spec, work / f"costs-{r}"))
            runs["poets"].append(poets_baseline(paths, graph, spec, work / f"poets-{r}"))
            runs["lighter"].append(fused_baseline(paths, graph, spec))
            runs["tf"].append(edgepipe_extract(paths, graph, spec, work / f"bn-tf-{r}", engine="tensorflow")[0])
            cpu = cpu_s()
            ips, computed, _ = edgepipe_extract(paths, graph, spec, work / f"bn-{r}")
            cpu_ms["cold"].append((cpu_s() - cpu) / len(paths) * 1e3)
            runs["cold"].append(ips)
            ips, _, cached = edgepipe_extract(paths, graph, spec, work / f"bn-{r}")
            runs["warm"].append(ips)
            (work / f"bn-{r}" / HASH_INDEX_NAME).unlink()
            runs["unindexed"].append(edgepipe_extract(paths, graph, spec, work / f"bn-{r}")[0])
        med = {k: statistics.median(v) for k, v in runs.items()}
        probe = create_cost_us(work / "probe")
        cores = os.cpu_count() or 1
        rows = [
            ("floor", f"backbone alone, LiteRT: {cores} one-thread interpreters, batch 4, decoded float32 "
                      "batches (what extraction uses)"),
            ("floor1", f"backbone alone, LiteRT: one {cores}-thread interpreter, batch 4, decoded float32 batches"),
            ("poets", "baseline: poets' retrain.py loop (2 session calls per image, batch 1, text cache)"),
            ("lighter", "lighter batch-1 loop (1 session call per image, no cache)"),
            ("tf", f"edgepipe cold, TensorFlow engine ({computed} computed)"),
            ("cold", f"edgepipe cold, LiteRT engine, the default ({computed} computed)"),
            ("warm", f"edgepipe warm ({cached} from cache)"),
            ("unindexed", "edgepipe warm, no file-hash index (every image read and hashed)"),
        ]
        base = med["poets"]
        print(f"\n{len(paths)} images, {a.backbone}, {os.cpu_count()} cores, work folder {work}")
        print(f"images/s: median of {a.repeat} interleaved runs (slowest–fastest); creating a cache file "
              f"here costs {probe:.0f} µs now (~50 µs on a quiet disk)\n")
        print("| extraction | images/s | range | vs baseline |\n|---|---|---|---|")
        for k, name in rows:
            print(f"| {name} | {med[k]:.1f} | {min(runs[k]):.0f}–{max(runs[k]):.0f} | {med[k] / base:.2f}× |")
        print(f"\ncold / baseline: {med['cold'] / base:.1f}×   warm / cold: {med['warm'] / med['cold']:.1f}×")
        floor = max(med["floor"], med["floor1"])
        print(f"cold / floor (the faster backbone-alone row, {floor:.0f} images/s): {med['cold'] / floor:.0%}"
              f" (target ≥ 85%)   cold / baseline {med['cold'] / base:.1f}× (target ≥ 5×)")
        # Why not more: the floor keeps every core busy with the backbone alone, so cold extraction
        # can only approach it as far as its other per-image work leaves the backbone the cores.
        cost = {k: statistics.median(c[k] for c in costs) for k in costs[0]}
        backbone = statistics.median(cpu_ms["floor"])
        best = backbone / (backbone + sum(cost.values()))
        print(f"\nCPU ms per image (median of {a.repeat}): backbone alone {backbone:.2f} (the floor's "
              f"{cores} interpreters); besides it, on one thread: decode and resize {cost['decode']:.2f}, "
              f"read and SHA-256 {cost['read']:.2f}, create the cache file {cost['write']:.2f}; "
              f"cold extraction used {statistics.median(cpu_ms['cold']):.2f} in all")
        print(f"so with all {cores} cores busy and nothing lost between threads, cold extraction reaches "
              f"at most {best:.0%} of the floor here ({best * floor:.0f} images/s), "
              f"{backbone / (backbone + cost['decode'] + cost['read']):.0%} if creating a cache file cost nothing")

        tenx = replicate(paths, work / "tenx", 10)
        one = replicate(paths, work / "onex", 1)
        rss1 = peak_rss_mb(one, a.backbone, work / "rss1")
        rss10 = peak_rss_mb(tenx, a.backbone, work / "rss10")
        print("\n| cold extraction | images | RSS, model loaded | peak RSS during extraction | process peak |")
        print("|---|---|---|---|---|")
        for name, n, (before, during, life) in (("1×", len(paths), rss1), ("10×", 10 * len(paths), rss10)):
            print(f"| {name} | {n} | {before:.0f} MB | {during:.0f} MB | {life:.0f} MB |")
        print(f"growth during extraction: 1× {rss1[1] - rss1[0]:+.0f} MB, 10× {rss10[1] - rss10[0]:+.0f} MB; "
              f"peak during extraction 10× / 1×: {rss10[1] / rss1[1]:.2f}")

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

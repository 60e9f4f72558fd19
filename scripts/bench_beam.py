#!/usr/bin/env python3
"""Bottleneck extraction on Apache Beam against the local engine, measured in the same run (issue 14).

On caltech101 (8,677 JPEGs of many sizes) with mobilenet_v1_0.25_224, each in a fresh process of
its own so that every peak RSS is that run's alone:

  local      pipeline.bottlenecks.extract into an empty cache: seconds, images/s, peak RSS
  beam       pipeline.beam.extract on the DirectRunner in multi-process mode (--workers N), into
             another empty cache: seconds, images/s, peak RSS of each worker process and of the
             driver, and Beam time / local time (target ≤ 1.3×)
  same       both caches hold the same entries, byte for byte, and both features arrays are equal
  subset     Beam again, cold, on a quarter of the images or fewer (--subset, default 2,000): peak
             worker RSS on both sizes and their ratio (target: flat in the number of images)
  warm       both engines again on their full run's cache, every feature read from it (the
             difference is about Beam's fixed cost per pipeline)

Every run is repeated --repeat times (default 3), the rounds interleaved so that a busy patch of
this shared machine falls on every run alike: times are the medians, peaks the highest, and the
share of the machine's CPU that other processes took during each run is printed beside them.

Workers are the DirectRunner's ``python -m apache_beam.runners.worker.sdk_worker_main`` children of
the process running Beam; a thread there reads /proc every 0.2 s for every descendant and keeps
the highest VmHWM each one reached (VmHWM is the kernel's own peak, so a spike between two reads
is not missed). The local engine's and the driver's peaks are their own VmHWM at the end.

Seconds are the whole ``extract()`` call in a fresh process, model load included (on Beam each
worker imports TensorFlow and converts the graph in ``DoFn.setup``; locally the first call does).
Subsets are spread evenly over the sorted list of images, so every size has the same mix of
photo sizes as the whole set.

Usage: .venv/bin/python scripts/bench_beam.py [--limit N] [--workers N] [--subset N] [--repeat N]
       [--skip-warm] [--images DIR] [--backbone NAME] [--work DIR] [--keep]
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
SHARED = REPO.parent / "shared"
CALTECH = SHARED / "datasets" / "caltech101"
OVERHEAD_TARGET = 1.3  # Beam seconds / local seconds
FLAT_TARGET = 1.1      # peak worker RSS, all images / subset
POLL_S = 0.2
WORKER_CMD = "sdk_worker_main"
SHELLS = ("sh", "bash", "dash")  # Beam starts each worker through ``/bin/sh -c``


def is_worker(proc: dict) -> bool:
    argv = proc["cmd"].split()
    return WORKER_CMD in proc["cmd"] and bool(argv) and os.path.basename(argv[0]) not in SHELLS


def images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp"))


def spread(paths: list, n: int) -> list:
    """``n`` of ``paths``, evenly spaced over the list (all of them when ``n`` is 0 or too big)."""
    if n <= 0 or n >= len(paths):
        return list(paths)
    return [paths[k * len(paths) // n] for k in range(n)]


# --- measuring processes ------------------------------------------------------------------------

def _status_kb(pid: int | str) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmHWM:", "VmRSS:")):
                name, value = line.split(":", 1)
                out[name] = int(value.split()[0])
    return out


def busy_s() -> float:
    """CPU seconds every process of the machine has used since boot (all cores, idle and iowait
    left out): what this run used, subtracted from the change, is what others took from it."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def own_peak_mb() -> float:
    """This process's peak RSS (VmHWM), in MB."""
    return _status_kb("self")["VmHWM"] / 1024


class Watcher(threading.Thread):
    """Reads /proc every :data:`POLL_S` seconds for every descendant of this process and keeps,
    per pid, its command line, highest VmHWM and VmRSS and its CPU seconds (user and system)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.seen: dict[int, dict] = {}
        self._done = threading.Event()
        self._tick = os.sysconf("SC_CLK_TCK")

    def descendants(self) -> list[int]:
        children: dict[int, list[int]] = {}
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # gone between listdir and open
            children.setdefault(ppid, []).append(int(name))
        out, todo = [], [os.getpid()]
        while todo:
            kids = children.get(todo.pop(), [])
            out += kids
            todo += kids
        return out

    def sample(self) -> None:
        for pid in self.descendants():
            try:
                kb = _status_kb(pid)
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                cpu = (int(fields[11]) + int(fields[12])) / self._tick
                rec = self.seen.get(pid)
                if rec is None:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
                    rec = self.seen[pid] = {"pid": pid, "cmd": cmd, "hwm_mb": 0.0, "rss_mb": 0.0, "cpu_s": 0.0}
            except (OSError, IndexError, ValueError, KeyError):
                continue  # exited, or a kernel thread without Vm lines
            rec["hwm_mb"] = max(rec["hwm_mb"], kb.get("VmHWM", 0) / 1024)
            rec["rss_mb"] = max(rec["rss_mb"], kb.get("VmRSS", 0) / 1024)
            rec["cpu_s"] = max(rec["cpu_s"], cpu)

    def run(self) -> None:
        while not self._done.is_set():
            self.sample()
            self._done.wait(POLL_S)

    def stop(self) -> list[dict]:
        self._done.set()
        self.join()
        return sorted(self.seen.values(), key=lambda r: -r["cpu_s"])


# --- one engine, in its own process -------------------------------------------------------------

def one(a: argparse.Namespace) -> None:
    """``--one local|beam``: one cold or warm extraction; writes ``--report`` (JSON) and the
    features beside it (``.npy``)."""
    import numpy as np

    with open(a.backbone_file, "rb") as f:
        graph, spec, sha = pickle.load(f)  # resolved by the main run: no TensorFlow in the driver for it
    paths = spread(images_in(a.images), a.limit)
    cpu0, busy0 = os.times(), busy_s()
    watcher = Watcher()
    watcher.start()
    load_s = 0.0
    start = time.perf_counter()
    if a.one == "local":
        from pipeline.backbone import get_extractor
        from pipeline.bottlenecks import extract

        get_extractor(str(graph), spec, "litert")  # the extractor extract() then reuses (lru_cache)
        load_s = time.perf_counter() - start
        res = extract(paths, graph, spec, sha, a.cache, progress=False)
    else:
        from pipeline.beam import extract
        from pipeline.config import BeamConfig

        cfg = BeamConfig("DirectRunner", ("--direct_running_mode=multi_processing",
                                          f"--direct_num_workers={a.workers}"))
        res = extract(paths, graph, spec, sha, a.cache, cfg, progress=False)
    seconds = time.perf_counter() - start
    procs = watcher.stop()
    cpu1, busy1 = os.times(), busy_s()
    own_cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    np.save(a.report.with_suffix(".npy"), res.features)
    report = {
        "engine": a.one, "images": len(paths), "seconds": seconds, "load_s": load_s,
        "computed": res.computed, "cached": res.cached, "skipped": len(res.skipped), "ok": res.ok,
        "hashes": res.hashes, "peak_mb": own_peak_mb(),
        "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "cpu_s": own_cpu,
        # Descendants' CPU from their last sample (up to POLL_S old: a slight overestimate of others').
        "others_cpu_s": max(0.0, busy1 - busy0 - own_cpu - sum(p["cpu_s"] for p in procs)),
        "tensorflow_loaded": "tensorflow" in sys.modules,
        "workers": [p for p in procs if is_worker(p)],
        "others": [p for p in procs if not is_worker(p)],
    }
    a.report.write_text(json.dumps(report))


# --- the main run -------------------------------------------------------------------------------

def load(backbone: str):
    """The backbone through the library (the mirror when present): graph path, resolved spec, sha256."""
    from pipeline.backbone import resolve_spec
    from pipeline.catalog import get_backbone
    from pipeline.fetch import fetch
    from pipeline.graph import load_graph_def
    from pipeline.rundir import sha256_file

    spec = get_backbone(backbone)
    got = fetch(spec, progress=False)
    return got.graph_path, resolve_spec(load_graph_def(got.graph_path), spec), sha256_file(got.graph_path)


def measure(engine: str, name: str, limit: int, cache: Path, a: argparse.Namespace, work: Path,
            backbone_file: Path) -> dict:
    report = work / f"{name}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", engine, "--limit", str(limit),
           "--cache", str(cache), "--workers", str(a.workers), "--images", str(a.images),
           "--report", str(report), "--backbone-file", str(backbone_file)]
    logfile = work / f"{name}.log"
    print(f"  {name}: {engine}, {limit or 'all'} images, cache {cache.name} ...", flush=True)
    started = time.perf_counter()
    # cwd and PYTHONPATH: Beam's worker processes import this checkout's pipeline package too.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    with open(logfile, "w") as log:
        done = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        sys.exit(f"{name} failed (exit {done.returncode}); the end of {logfile}:\n"
                 + logfile.read_text()[-4000:])
    r = json.loads(report.read_text())
    r["process_s"] = time.perf_counter() - started
    print(f"    {r['seconds']:.1f} s ({r['images'] / r['seconds']:.1f} images/s), process {r['process_s']:.1f} s; "
          f"other processes on this machine took {r['others_cpu_s']:.0f} CPU s meanwhile", flush=True)
    return r


def npy_files(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in root.rglob("*.npy")}


def same_caches(a: Path, b: Path) -> tuple[int, int, list[str], list[str], list[str]]:
    """(entries in a, in b, only in a, only in b, in both but with other bytes)."""
    fa, fb = npy_files(a), npy_files(b)
    differ = [k for k in sorted(fa.keys() & fb.keys()) if fa[k].read_bytes() != fb[k].read_bytes()]
    return len(fa), len(fb), sorted(fa.keys() - fb.keys()), sorted(fb.keys() - fa.keys()), differ


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=Path, default=CALTECH)
    ap.add_argument("--limit", type=int, default=0,
                    help="use N of the images, evenly spread over their sorted list (default: all)")
    ap.add_argument("--workers", type=int, default=2, help="the DirectRunner's worker processes")
    ap.add_argument("--subset", type=int, default=2000,
                    help="images of the smaller cold Beam run (at most a quarter of the full run's)")
    ap.add_argument("--repeat", type=int, default=3,
                    help="rounds of every run, interleaved (times: the median; peaks: the highest)")
    ap.add_argument("--backbone", default="mobilenet_v1_0.25_224")
    ap.add_argument("--mirror", type=Path, default=SHARED / "mirror")
    ap.add_argument("--skip-warm", action="store_true", help="no warm runs")
    ap.add_argument("--work", type=Path, default=None,
                    help="scratch folder (default: a new one beside edgepipe's cache, on the disk real "
                         "caches are written to); removed at the end unless --keep")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    # One engine in this process (the main run starts these):
    ap.add_argument("--one", choices=("local", "beam"), help=argparse.SUPPRESS)
    ap.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--report", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--backbone-file", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        one(a)
        return

    if a.mirror.is_dir():
        os.environ.setdefault("EDGEPIPE_MIRROR", str(a.mirror))
    from pipeline.fetch import default_cache_dir

    parent = a.work or default_cache_dir().parent
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="edgepipe-bench-beam-", dir=parent))
    os.environ["EDGEPIPE_CACHE_DIR"] = str(work / "cache")
    try:
        bench(a, work)
    finally:
        if a.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def bench(a: argparse.Namespace, work: Path) -> None:
    import numpy as np

    backbone_file = work / "backbone.pkl"
    with open(backbone_file, "wb") as f:
        pickle.dump(load(a.backbone), f)
    all_images = images_in(a.images)
    n = len(spread(all_images, a.limit))
    subset = min(a.subset, max(1, n // 4))
    cores = os.cpu_count() or 1
    print(f"bench-beam: {n} of {len(all_images)} images in {a.images}, {a.backbone}, {cores} cores, "
          f"DirectRunner multi_processing × {a.workers} workers, {a.repeat} interleaved rounds; work folder {work}")

    # (run, engine, images, cache of round r). Caches are kept until the end: on this VM's
    # journal-less ext4, files created right after many deletions cost far more.
    plan = [("local-cold", "local", n, "local-{r}"), ("beam-cold", "beam", n, "beam-{r}"),
            ("beam-subset", "beam", subset, "subset-{r}")]
    if not a.skip_warm:
        plan += [("local-warm", "local", n, "local-{r}"), ("beam-warm", "beam", n, "beam-{r}")]
    runs: dict[str, list[dict]] = {name: [] for name, *_ in plan}
    for r in range(a.repeat):
        print(f"round {r + 1} of {a.repeat}", flush=True)
        for name, engine, images, cache in plan:
            got = measure(engine, f"{name}-{r}", images, work / f"cache-{cache.format(r=r)}", a, work, backbone_file)
            runs[name].append({**got, "round": r})

    # Every round: the same entries byte for byte, the same features, rows and hashes.
    checks = []
    for r in range(a.repeat):
        f_local, f_beam = np.load(work / f"local-cold-{r}.npy"), np.load(work / f"beam-cold-{r}.npy")
        lo, be = runs["local-cold"][r], runs["beam-cold"][r]
        checks.append({
            "caches": same_caches(work / f"cache-local-{r}", work / f"cache-beam-{r}"),
            "features": bool(np.array_equal(f_local, f_beam)), "shapes": (f_local.shape, f_beam.shape),
            "rows": lo["ok"] == be["ok"] and lo["hashes"] == be["hashes"],
            "warm": None if a.skip_warm else bool(
                np.array_equal(np.load(work / f"beam-warm-{r}.npy"), f_beam)
                and np.array_equal(np.load(work / f"local-warm-{r}.npy"), f_local)),
        })

    def med(name: str) -> float:
        return statistics.median(x["seconds"] for x in runs[name])

    def typical(name: str) -> dict:
        """The round whose time is the median (its CPU figures go with it)."""
        return sorted(runs[name], key=lambda x: x["seconds"])[(len(runs[name]) - 1) // 2]

    def worker_peaks(name: str) -> list[float]:
        """Each worker slot's highest peak over the rounds (workers sorted by peak in each round)."""
        per_round = [sorted((w["hwm_mb"] for w in x["workers"]), reverse=True) for x in runs[name]]
        return [max(col) for col in zip(*per_round)]

    local_s = med("local-cold")
    labels = {"local-cold": "local engine, cold", "beam-cold": f"Beam DirectRunner × {a.workers}, cold",
              "beam-subset": f"Beam DirectRunner × {a.workers}, cold, subset", "local-warm": "local engine, warm",
              "beam-warm": f"Beam DirectRunner × {a.workers}, warm"}
    print(f"\n## Bottleneck extraction, {a.backbone} on {a.images.name} ({n} images), {cores} cores, "
          f"median of {a.repeat} rounds\n")
    print("| run | images | computed | seconds | range | images/s | vs local cold | peak RSS, each worker | "
          "peak RSS, driver or process |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in runs:
        x, s = typical(name), med(name)
        times = [y["seconds"] for y in runs[name]]
        peaks = worker_peaks(name)
        vs = f"{s / local_s:.2f}×" if x["images"] == n else "-"
        print(f"| {labels[name]} | {x['images']} | {x['computed']} | {s:.1f} | {min(times):.1f}–{max(times):.1f} | "
              f"{x['images'] / s:.1f} | {vs} | {' / '.join(f'{p:.0f}' for p in peaks) + ' MB' if peaks else '-'} | "
              f"{max(y['peak_mb'] for y in runs[name]):.0f} MB |")

    print()
    for name in runs:
        x = typical(name)
        busy = statistics.median(y["others_cpu_s"] / (y["seconds"] * cores) for y in runs[name])
        line = f"{name} (round {x['round'] + 1}): "
        if x["engine"] == "local":
            line += f"model load {x['load_s']:.1f} s of {x['seconds']:.1f} s, CPU {x['cpu_s']:.0f} s"
        else:
            ws = ", ".join(f"{w['hwm_mb']:.0f} MB peak and {w['cpu_s']:.0f} s CPU" for w in x["workers"])
            line += (f"workers {ws or 'none found'}; driver {x['peak_mb']:.0f} MB peak, {x['cpu_s']:.0f} s CPU"
                     f"{', TensorFlow not imported' if not x['tensorflow_loaded'] else ''}")
        print(line + f"; {x['skipped']} unreadable; other processes took {busy:.0%} of the machine's CPU meanwhile "
              "(median of the rounds)")

    print()
    caches_same = features_same = True
    for r, c in enumerate(checks):
        in_local, in_beam, only_local, only_beam, differ = c["caches"]
        same = in_local == in_beam and not only_local and not only_beam and not differ
        caches_same &= same
        features_same &= c["features"] and c["rows"]
        print(f"round {r + 1}: caches local {in_local} .npy entries, Beam {in_beam}; only local {len(only_local)}, "
              f"only Beam {len(only_beam)}, other bytes {len(differ)}"
              + (f" (e.g. {(only_local + only_beam + differ)[0]})" if not same else "")
              + f"; features {c['shapes'][0]} and {c['shapes'][1]}, np.array_equal {c['features']}, "
              f"same rows and image hashes {c['rows']}"
              + ("" if c["warm"] is None else f", warm features equal the cold ones {c['warm']}"))

    ratio = med("beam-cold") / local_s
    peak_full, peak_small = max(worker_peaks("beam-cold")), max(worker_peaks("beam-subset"))
    flat = peak_full / peak_small
    paired = ", ".join(f"{b['seconds'] / lo['seconds']:.2f}×" for lo, b in zip(runs["local-cold"], runs["beam-cold"]))
    print(f"\nBeam / local time, cold: {ratio:.2f}× (target ≤ {OVERHEAD_TARGET}×): {verdict(ratio <= OVERHEAD_TARGET)}"
          f"; round by round {paired}")
    print(f"same cache entries, bit-identical (every .npy file of {a.repeat} pairs of caches): {verdict(caches_same)}")
    print(f"features arrays equal (np.array_equal, every round): {verdict(features_same)}")
    print(f"peak worker RSS flat in the number of images: {subset} images {peak_small:.0f} MB, {n} images "
          f"{peak_full:.0f} MB, ratio {flat:.2f} (target ≤ {FLAT_TARGET}): {verdict(flat <= FLAT_TARGET)}")
    if not a.skip_warm:
        print(f"warm: Beam {med('beam-warm'):.1f} s, local {med('local-warm'):.1f} s (Beam's fixed cost per "
              f"pipeline, about: {med('beam-warm') - med('local-warm'):.1f} s); cold Beam {med('beam-cold'):.1f} s")


if __name__ == "__main__":
    main()

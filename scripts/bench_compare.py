#!/usr/bin/env python3
"""`edgepipe compare` against the runs it replaces, measured in the same run (`make bench-compare`).

The target (README "Comparing backbones"): a cold `edgepipe compare` of two backbones on flowers8
takes no longer than the two runs one after the other, and a repeated one skips every stage.

  baseline   one cold `edgepipe run` per backbone, one after the other, each with a fresh cache
             folder (nothing fetched, no bottleneck cached) and a fresh run folder: wall seconds
  cold       `edgepipe compare` of the same backbones with the same options and another fresh
             cache folder: wall seconds, and compare / (the runs' sum) (target ≤ 1.00×)
  warm       the same comparison again, same folders: wall seconds, and how many of its stages
             were "up to date, skipped" (target: all of them; the script exits 1 otherwise)

Every command is `python -m pipeline.cli ... --quiet --offline --mirror MIRROR` in a fresh process;
its stage lines ("STAGE: running", "STAGE: up to date, skipped") are counted from its stderr. An
untimed `import tensorflow` first puts the libraries in the page cache, so the first timed run does
not pay for the disk alone. The share of the machine's CPU that other processes took during each
command is printed beside it (this machine is shared).

Usage: .venv/bin/python scripts/bench_compare.py [--images DIR] [--test-images DIR] [--backbone NAME ...]
       [--runtime NAME ...] [--quant MODE ...] [--tfjs MODE ...] [--epochs N] [--tmp DIR] [--keep]
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
FLOWERS = SHARED / "datasets" / "flowers8"
BACKBONES = ("mobilenet_v1_0.25_224", "mobilenet_v1_0.25_128")
RATIO_TARGET = 1.0  # cold compare seconds / the cold runs' seconds, summed
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
RUNNING, SKIPPED = ": running", ": up to date, skipped"


def busy_s() -> float:
    """CPU seconds every process of the machine has used since boot (idle and iowait left out)."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def children_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def edgepipe(name: str, args: list, work: Path) -> dict:
    """One edgepipe command in a fresh process: wall seconds, stage lines, others' CPU share."""
    cmd = [sys.executable, "-m", "pipeline.cli", *map(str, args), "--quiet"]
    log = work / f"{name}.log"
    print(f"  {name} ...", flush=True)
    busy0, own0, start = busy_s(), children_cpu_s(), time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    own = children_cpu_s() - own0
    others = max(0.0, busy_s() - busy0 - own)
    log.write_text(f"$ {' '.join(map(str, cmd))}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}")
    if done.returncode not in (0, 3):  # 3: a verify gate failed, everything written (not a speed matter)
        sys.exit(f"{name} failed (exit {done.returncode}); the end of its stderr ({log}):\n{done.stderr[-3000:]}")
    lines = done.stderr.splitlines()
    r = {"name": name, "seconds": seconds, "cpu_s": own, "rc": done.returncode,
         "others": others / (seconds * (os.cpu_count() or 1)),
         "ran": [ln for ln in lines if ln.endswith(RUNNING)], "skipped": [ln for ln in lines if ln.endswith(SKIPPED)]}
    print(f"    {seconds:.1f} s, {own:.0f} CPU s; stages run {len(r['ran'])}, skipped {len(r['skipped'])}"
          f"{'; exit 3 (a verify gate failed)' if r['rc'] == 3 else ''}; other processes took "
          f"{r['others']:.0%} of the machine's CPU meanwhile", flush=True)
    return r


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=Path, default=FLOWERS / "train")
    ap.add_argument("--test-images", type=Path, default=FLOWERS / "test")
    ap.add_argument("--backbone", action="append", default=None,
                    help=f"a row (repeat; default {' and '.join(BACKBONES)})")
    ap.add_argument("--runtime", action="append", default=[],
                    help="passed to every command (repeat; default: edgepipe's runtimes)")
    ap.add_argument("--quant", action="append", default=[], help="passed to every command (repeat)")
    ap.add_argument("--tfjs", action="append", default=[], help="passed to every command (repeat)")
    ap.add_argument("--epochs", type=int, default=None, help="passed to every command")
    ap.add_argument("--mirror", type=Path, default=SHARED / "mirror")
    ap.add_argument("--tmp", type=Path, default=None,
                    help="scratch folder's parent (default: beside edgepipe's cache, on the disk real caches "
                         "are written to); the scratch folder is removed at the end unless --keep")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    a = ap.parse_args()
    backbones = a.backbone or list(BACKBONES)
    if len(set(backbones)) != len(backbones):
        ap.error("each --backbone once (a comparison's rows are distinct)")

    if a.tmp is None:
        sys.path.insert(0, str(REPO))
        from pipeline.fetch import default_cache_dir

        parent = default_cache_dir().parent
    else:
        parent = a.tmp
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="edgepipe-bench-compare-", dir=parent))
    try:
        return bench(a, backbones, work)
    finally:
        if a.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def bench(a: argparse.Namespace, backbones: list[str], work: Path) -> int:
    common = ["--images", a.images, "--test-images", a.test_images, "--mirror", a.mirror, "--offline"]
    for flag, values in (("--runtime", a.runtime), ("--quant", a.quant), ("--tfjs", a.tfjs)):
        common += sum(([flag, v] for v in values), [])
    if a.epochs is not None:
        common += ["--epochs", a.epochs]
    cores = os.cpu_count() or 1
    load0 = os.getloadavg()
    print(f"bench-compare: {' vs '.join(backbones)} on {a.images} (test {a.test_images}), {cores} cores, "
          f"load average {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}; options {' '.join(map(str, common))}; "
          f"work folder {work}", flush=True)
    subprocess.run([sys.executable, "-c", "import tensorflow"], cwd=REPO, env=ENV, check=True,
                   capture_output=True)  # untimed: the libraries into the page cache

    runs = [edgepipe(f"run-{b}", ["run", "--out", work / f"run-{b}", "--cache-dir", work / f"cache-run-{b}",
                                  "--backbone", b, *common], work) for b in backbones]
    compare = ["compare", "--out", work / "cmp", "--cache-dir", work / "cache-cmp",
               *sum((["--backbone", b] for b in backbones), []), *common]
    cold = edgepipe("compare-cold", compare, work)
    warm = edgepipe("compare-warm", compare, work)

    base = sum(r["seconds"] for r in runs)
    ratio = cold["seconds"] / base
    n_skipped, n_stages = len(warm["skipped"]), len(warm["skipped"]) + len(warm["ran"])
    all_skipped = not warm["ran"] and n_skipped > 0 and n_stages == len(cold["ran"]) + len(cold["skipped"])
    load1 = os.getloadavg()

    print(f"\n## edgepipe compare vs the runs it replaces, {' and '.join(backbones)} on {a.images.name}, "
          f"{cores} cores\n")
    print("| command | wall s | CPU s | stages run | stages skipped | others' CPU share |")
    print("|---|---|---|---|---|---|")
    for r, label in [*((r, f"edgepipe run --backbone {b}, cold") for r, b in zip(runs, backbones)),
                     (None, "the runs one after the other"), (cold, "edgepipe compare, cold"),
                     (warm, "edgepipe compare again, warm")]:
        if r is None:
            print(f"| {label} | {base:.2f} | {sum(x['cpu_s'] for x in runs):.2f} | "
                  f"{sum(len(x['ran']) for x in runs)} | {sum(len(x['skipped']) for x in runs)} | |")
        else:
            print(f"| {label} | {r['seconds']:.2f} | {r['cpu_s']:.2f} | {len(r['ran'])} | {len(r['skipped'])} | "
                  f"{r['others']:.0%} |")
    print(f"\ncompare cold / (run + run): {ratio:.2f}× ({cold['seconds']:.2f} s / {base:.2f} s; target ≤ "
          f"{RATIO_TARGET:.2f}×): {verdict(ratio <= RATIO_TARGET)}")
    print(f"compare warm / compare cold: {warm['seconds'] / cold['seconds']:.2f}× ({warm['seconds']:.2f} s)")
    print(f"stages skipped: {n_skipped} of {n_stages}: {verdict(all_skipped)}")
    if warm["ran"]:
        print("re-ran on the warm compare: " + ", ".join(ln.rsplit(RUNNING, 1)[0] for ln in warm["ran"]))
    print(f"load average before {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}, after {load1[0]:.2f} "
          f"{load1[1]:.2f} {load1[2]:.2f}")
    return 0 if all_skipped else 1


if __name__ == "__main__":
    sys.exit(main())

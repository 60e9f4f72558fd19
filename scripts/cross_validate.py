#!/usr/bin/env python3
"""Choose training settings by k-fold cross-validation on the training folder, never the test photos.

On flowers8 the 160 test photos move accuracy in steps of 0.6 points, and trying settings until one
scores well on them fits the settings to those photos. This script scores each setting on the
training folder alone: the folder is split into K folds by the hash of each file's name that the
split uses, and each fold in turn is held out while a head (and the fine-tuned blocks) trains on
the other K-1, through edgepipe's own ``retrain`` and bottleneck cache. Every training photo is
then predicted once by a model that never saw it.

  per setting  held-out errors / photos (CV accuracy), the folds' errors, the seconds it took
  chosen       the setting with the fewest held-out errors (ties: the one listed first, so list
               the cheaper settings first); with --test-images, each setting also trains on the
               whole folder once and is scored on the test photos, shown beside, not used to choose

A setting is a name and options named as edgepipe's Python API names them (``RunConfig.with_options``;
values are read as JSON, else kept as text):

  .venv/bin/python scripts/cross_validate.py --graph ../shared/graphs/poets_retrained_mobilenet_v1_1.0_224.pb \\
      --images ../shared/datasets/flowers8/train --test-images ../shared/datasets/flowers8/test \\
      --try "head" --try "head, flips: augment_copies=2 flip_left_right=true" --try "ft2: fine_tune=2"

Writes ``OUT/cross-validation.json`` (every setting's folds, held-out mistakes by file, test scores).
Usage: .venv/bin/python scripts/cross_validate.py --images DIR [--graph PB | --backbone NAME]
       [--test-images DIR] [--folds 5] [--try "NAME: key=value ..."] ... [--option key=value] ...
       [--out DIR] [--offline]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def parse_try(text: str) -> tuple[str, dict]:
    """``"NAME: key=value key=value"`` → (NAME, options); ``"NAME"`` alone is the defaults."""
    name, _, rest = text.partition(":")
    options = {}
    for item in rest.split():
        key, eq, value = item.partition("=")
        if not eq:
            sys.exit(f"error: --try {text!r}: {item!r} is not key=value (e.g. fine_tune=2)")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return name.strip(), options


def fold_of(path: str, folds: int) -> int:
    """The fold of one training photo, from the hash of its name that the split uses (so
    ``_nohash_`` near-duplicates share a fold, as they share a split)."""
    from pipeline.dataset import name_hash

    return name_hash(path) % folds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", required=True)
    ap.add_argument("--test-images")
    ap.add_argument("--graph")
    ap.add_argument("--backbone")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--try", dest="tries", action="append", default=[],
                    help='a setting, "NAME: key=value ..." (repeat; list the cheaper ones first)')
    ap.add_argument("--option", action="append", default=[],
                    help="key=value for every setting, e.g. mirror=DIR, cache_dir=DIR, input_size=224 (repeat)")
    ap.add_argument("--out", default=str(REPO / "runs" / "cross-validation"))
    ap.add_argument("--offline", action="store_true")
    args = ap.parse_args()
    if args.folds < 2:
        sys.exit(f"error: --folds {args.folds}: must be at least 2")
    tries = [parse_try(t) for t in args.tries] or [("head", {})]
    common = parse_try("all: " + " ".join(args.option))[1]

    import pipeline
    from pipeline.catalog import fine_tune_blocks
    from pipeline.dataset import Dataset, Example, build_dataset
    from pipeline.retrain import retrain
    from pipeline.rundir import RunDir, read_json
    from pipeline.stages import Context, bottleneck_root

    out = Path(args.out)
    base = pipeline.RunConfig(out=out / "fetch").with_options(images=args.images, graph=args.graph,
                                                              backbone=args.backbone, offline=args.offline,
                                                              progress=False, **common)
    configs = []
    for name, options in tries:
        try:
            configs.append((name, options, base.with_options(**options)))
        except (TypeError, pipeline.ConfigError) as err:
            sys.exit(f"error: --try {name!r}: {err}")
    pipeline.run(base, until="fetch")
    run = RunDir(out / "fetch")
    ctx = Context(base, run, read_json(run.root / "manifest.json"))
    spec, graph = ctx.spec(), ctx.graph_path()
    sha = ctx.stage_info("fetch")["outputs"]["graph"]["sha256"]
    cache = bottleneck_root(base)
    blocks = fine_tune_blocks(pipeline.load_config(run.root).catalog_row)  # as fetch recognised the graph
    whole = build_dataset(Path(args.images), Path(args.test_images) if args.test_images else None, 0.0, 0.0)

    def train_and_score(ds: Dataset, cfg) -> tuple[list[dict], int, float]:
        r = retrain(ds, graph, spec, sha, cache, cfg.train, cfg.augment, progress=False, fine_tune_blocks=blocks)
        return r.misclassified, r.metrics["test"]["n"], r.metrics["test"]["accuracy"]

    rows = []
    print(f"{args.folds}-fold cross-validation on {args.images} "
          f"({sum(e.split == 'train' for e in whole.examples)} photos)", flush=True)
    for name, options, cfg in configs:
        t0 = time.perf_counter()
        folds, mistakes, n = [], [], 0
        for k in range(args.folds):
            # The held-out fold is the "test" split: retrain lists its mistakes, and no photo of it trains.
            ds = Dataset(whole.classes, tuple(Example(e.path, e.label, "test" if fold_of(e.path, args.folds) == k
                                                      else "train") for e in whole.examples if e.split == "train"))
            wrong, held, _ = train_and_score(ds, cfg)
            folds.append(len(wrong))
            mistakes += wrong
            n += held
        row = {"name": name, "options": options, "photos": n, "errors": len(mistakes), "folds": folds,
               "cv_accuracy": 1 - len(mistakes) / n, "seconds": round(time.perf_counter() - t0, 1),
               "mistakes": mistakes}
        if args.test_images:
            wrong, held, acc = train_and_score(Dataset(whole.classes, whole.examples), cfg)
            row.update(test_accuracy=acc, test_errors=len(wrong), test_photos=held, test_mistakes=wrong)
        rows.append(row)
        test = f"   test {row['test_accuracy']:.4f} ({row['test_errors']}/{row['test_photos']})" if args.test_images else ""
        print(f"{name:32s} CV {row['cv_accuracy']:.4f} ({row['errors']}/{n}, folds {folds}) "
              f"{row['seconds']:6.0f} s{test}", flush=True)
    chosen = min(rows, key=lambda r: r["errors"])  # the first of the fewest: list cheaper settings first
    print(f"chosen by cross-validation: {chosen['name']} (CV {chosen['cv_accuracy']:.4f})"
          + (f"; its test accuracy {chosen['test_accuracy']:.4f}" if args.test_images else ""))
    out.mkdir(parents=True, exist_ok=True)
    (out / "cross-validation.json").write_text(json.dumps({"folds": args.folds, "images": args.images,
                                                           "chosen": chosen["name"], "settings": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""`make demo`: the whole chain on the default backbone, through the Python API.

Uses ../shared/datasets/flowers8 when it exists (else a small generated image set) and points
EDGEPIPE_MIRROR at ../shared/mirror when that exists, then prints the verification table. The
same as `edgepipe run --images TRAIN --test-images TEST --backbone mobilenet_v1_0.25_224 --out runs/demo`.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
OUT = REPO / "runs" / "demo"


def generated_images(root: Path) -> tuple[Path, Path]:
    """Three classes of textured colour fields, 40 train and 12 test images each."""
    rng = np.random.default_rng(0)
    colours = {"red": (200, 50, 40), "green": (50, 170, 60), "blue": (40, 70, 200)}
    for split, n in (("train", 40), ("test", 12)):
        for name, rgb in colours.items():
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = np.clip(np.array(rgb) + rng.normal(0, 30, (224, 224, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(d / f"{name}_{split}_{i:03d}.jpg", quality=90)
    return root / "train", root / "test"


def main() -> int:
    if (SHARED / "mirror").is_dir():
        os.environ.setdefault("EDGEPIPE_MIRROR", str(SHARED / "mirror"))
    sys.path.insert(0, str(REPO))
    import pipeline

    flowers = SHARED / "datasets" / "flowers8"
    if flowers.is_dir():
        train, test = flowers / "train", flowers / "test"
    else:
        print("../shared/datasets/flowers8 not found: generating a small image set", file=sys.stderr)
        train, test = generated_images(REPO / "runs" / "demo-images")
    print(f"$ edgepipe run --images {train} --test-images {test} --backbone mobilenet_v1_0.25_224 --out {OUT}",
          file=sys.stderr)
    try:
        pipeline.run(pipeline.resume(OUT, images=train, test_images=test, backbone="mobilenet_v1_0.25_224"))
    except pipeline.PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    print((OUT / "report.md").read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Golden vectors: a few holdout images and what the reference says about them, in every bundle.

An app that ships one of our models can test itself on the device: load ``golden/<n>.png``
(already RGB at the model's size, so no resize is involved), feed its pixels as float32 0..255,
and compare the top-1 label with ``golden.json``. The expected values come from the exported
SavedModel run on exactly those PNG pixels (rounded to uint8), not on the float resize, so the
file is reproducible bit for bit from what is shipped.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.dataset import Example
from pipeline.rundir import atomic_dir
from pipeline.types import Preprocessing

GOLDEN_DIR = "golden"
GOLDEN_FILE = "golden.json"
DEFAULT_COUNT = 5
TOP_K = 3


@dataclass(frozen=True)
class Golden:
    """The chosen images (uint8 ``[K, size, size, 3]``) and the contents of ``golden.json``."""

    images: np.ndarray
    spec: dict


def choose(examples: Sequence[Example], count: int = DEFAULT_COUNT) -> list[Example]:
    """A deterministic, class-balanced order of test examples to take golden images from.

    Classes take turns in label order; within a class, by a hash of the file name, so the choice
    depends on the names alone (not on folder listing order) and adding images rarely moves it.
    All examples are returned in that order; the caller takes the first ``count`` readable ones.
    """
    by_class: dict[int, list[Example]] = {}
    for e in sorted(examples, key=lambda e: hashlib.sha1(os.path.basename(e.path).encode()).hexdigest()):
        by_class.setdefault(e.label, []).append(e)
    order, queues = [], [by_class[k] for k in sorted(by_class)]
    while any(queues):
        for q in queues:
            if q:
                order.append(q.pop(0))
    return order


def build_golden(savedmodel_dir: Path, examples: Sequence[Example], classes: Sequence[str],
                 prep: Preprocessing, count: int = DEFAULT_COUNT, top_k: int = TOP_K,
                 true_classes: Sequence[str] | None = None) -> Golden:
    """Picks ``count`` readable test images (see :func:`choose`) and runs the reference on them.

    Args:
        savedmodel_dir: the exported SavedModel (``serving_default``: ``images`` → ``probabilities``).
        examples: the test split.
        classes: the model's labels, in output order.
        true_classes: what the examples' label indices name when that is not ``classes`` (an
            adopted graph whose class folders are not its labels: the folder names); None: ``classes``.

    Returns:
        The uint8 images and the ``golden.json`` contents; fewer than ``count`` images when the
        test split has fewer readable ones.
    """
    import tensorflow as tf

    from pipeline.images import ImageError, load_image, read_image_file

    chosen, pixels = [], []
    for e in choose(examples):
        if len(chosen) == count:
            break
        try:
            img = load_image(read_image_file(e.path), prep, e.path)
        except (ImageError, OSError):
            continue  # verify reports unreadable test images; a golden image must be readable
        chosen.append(e)
        pixels.append(np.clip(np.rint(img), 0, 255).astype(np.uint8))
    images = np.stack(pixels) if pixels else np.zeros((0, prep.size, prep.size, 3), np.uint8)
    probs = np.zeros((0, len(classes)), np.float32)
    if len(images):
        fn = tf.saved_model.load(str(savedmodel_dir)).signatures["serving_default"]
        probs = fn(images=tf.constant(images.astype(np.float32)))["probabilities"].numpy()
    k = min(top_k, len(classes))
    entries = []
    for n, (e, p) in enumerate(zip(chosen, probs)):
        top = np.argsort(-p, kind="stable")[:k]
        entries.append({
            "file": f"{n}.png", "source": os.path.basename(e.path), "true_label": (true_classes or classes)[e.label],
            "expected": [{"label": classes[i], "index": int(i), "probability": round(float(p[i]), 6)} for i in top],
        })
    spec = {
        "about": "Self-test for apps: feed each PNG's pixels (RGB, already at the model's size) as float32 "
                 "0..255 (a uint8-input model takes them as they are) and compare the top-1 label. "
                 "Probabilities are the float32 reference (the exported SavedModel on these exact pixels); "
                 "quantised variants drift from them by up to a few hundredths.",
        "input": {"size": prep.size, "dtype": "float32", "range": [0, 255], "channel_order": "RGB",
                  "resize": "none (the PNGs are already resized: "
                            f"{prep.resize_method}, antialias {'on' if prep.antialias else 'off'}, no crop)"},
        "labels": list(classes),
        "top_k": k,
        "images": entries,
    }
    return Golden(images, spec)


def write_golden(folder: Path, golden: Golden) -> Path:
    """Writes ``folder/golden.json`` and ``folder/<n>.png`` (the folder replaced atomically).

    Returns:
        The path of ``golden.json``.
    """
    from PIL import Image

    with atomic_dir(Path(folder)) as tmp:
        for entry, img in zip(golden.spec["images"], golden.images):
            buf = io.BytesIO()
            Image.fromarray(img, "RGB").save(buf, format="PNG")
            (tmp / entry["file"]).write_bytes(buf.getvalue())
        (tmp / GOLDEN_FILE).write_text(json.dumps(golden.spec, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return Path(folder) / GOLDEN_FILE


def copy_golden(source: Path, folder: Path) -> Path:
    """Copies a golden folder written by :func:`write_golden` (the copy replaced atomically), so
    the reference runs once per run however many bundles carry it.

    Returns:
        The path of the copy's ``golden.json``.
    """
    import shutil

    with atomic_dir(Path(folder)) as tmp:
        for p in sorted(Path(source).iterdir()):
            if p.is_file():
                shutil.copyfile(p, tmp / p.name)
    return Path(folder) / GOLDEN_FILE


def read_golden(folder: Path) -> tuple[dict, np.ndarray]:
    """``golden.json`` and its PNGs as float32 ``[K, size, size, 3]`` 0..255 (what a model takes)."""
    from PIL import Image

    spec = json.loads((Path(folder) / GOLDEN_FILE).read_text(encoding="utf-8"))
    size = spec["input"]["size"]
    images = np.zeros((len(spec["images"]), size, size, 3), np.float32)
    for n, entry in enumerate(spec["images"]):
        with Image.open(Path(folder) / entry["file"]) as im:
            images[n] = np.asarray(im.convert("RGB"), np.float32)
    return spec, images

"""Bottleneck features: batched extraction with a content-addressed on-disk cache.

The per-batch work is a pure function of (graph, image bytes) → features
(:func:`features_from_bytes`), with the model loaded once per process, and cache writes are
idempotent (the file name is the hash of what it depends on). The same code can therefore run
inside an Apache Beam ``DoFn`` for millions of images.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from pipeline.augment import AugmentConfig, augmented_image
from pipeline.backbone import get_extractor
from pipeline.images import ImageError, load_image, read_image_file
from pipeline.rundir import atomic_write_bytes
from pipeline.testhook import pause_point
from pipeline.types import BackboneSpec


def backbone_key(graph_sha256: str, spec: BackboneSpec, engine: str = "tensorflow") -> str:
    """Identifies what a feature depends on besides the image: graph, tensors, preprocessing and
    the engine that ran the graph (engines round float32 differently)."""
    parts = [graph_sha256, spec.input_tensor, spec.bottleneck_tensor, spec.preprocessing.to_dict()]
    if engine != "tensorflow":
        parts.append(engine)
    blob = json.dumps(parts, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


class BottleneckCache:
    """``<root>/<backbone key>/<ab>/<image sha256>.npy``; writes are atomic and idempotent."""

    def __init__(self, root: Path, key: str):
        self.dir = Path(root) / key
        self._made: set[str] = set()

    def _path(self, image_sha: str) -> Path:
        return self.dir / image_sha[:2] / f"{image_sha}.npy"

    def get(self, image_sha: str) -> np.ndarray | None:
        path = self._path(image_sha)
        try:
            return np.load(path, allow_pickle=False)
        except FileNotFoundError:
            return None
        except (ValueError, OSError, EOFError):
            # A file that is not a valid .npy cannot come from our atomic writes; treat it as
            # missing and overwrite it rather than failing the run.
            return None

    def put(self, image_sha: str, feature: np.ndarray) -> None:
        import io

        buf = io.BytesIO()
        np.save(buf, np.asarray(feature, np.float32), allow_pickle=False)
        path = self._path(image_sha)
        if path.parent.name not in self._made:  # 256 sub-folders: mkdir once each, not per entry
            path.parent.mkdir(parents=True, exist_ok=True)
            self._made.add(path.parent.name)
        # Not fsynced: a torn entry after a power cut fails np.load and is recomputed.
        atomic_write_bytes(path, buf.getvalue(), durable=False)


def features_from_bytes(graph_path: str, spec: BackboneSpec, images: Sequence[bytes],
                        engine: str = "litert") -> np.ndarray:
    """The pure per-batch function: encoded images → float32 ``[N, feature_size]``.

    Raises:
        ImageError: an image cannot be decoded.
    """
    extractor = get_extractor(str(graph_path), spec, engine)
    batch = np.stack([load_image(b, extractor.spec.preprocessing) for b in images])
    return extractor(batch)


@dataclass
class ExtractionResult:
    features: np.ndarray            # [n_ok, F], rows in the order of `ok`
    ok: list[int]                   # indices of the inputs that decoded
    skipped: dict[int, str] = field(default_factory=dict)  # index → reason
    computed: int = 0
    cached: int = 0
    hashes: list[str] = field(default_factory=list)  # sha256 of each input's bytes ("" if unreadable)
    augmented: np.ndarray | None = None  # [n_ok, copies, F] for the paths in `augment_indices`


def extract(
    paths: Sequence[Path], graph_path: Path, spec: BackboneSpec, graph_sha256: str,
    cache_root: Path, batch_size: int = 64, progress: bool = True, workers: int | None = None,
    augment: AugmentConfig | None = None, augment_indices: Sequence[int] = (),
    engine: str = "litert",
) -> ExtractionResult:
    """Features for every path, from the cache where present, else computed in batches.

    Decoding of the next batch overlaps with inference on the current one; memory stays bounded
    by two batches whatever the number of images.

    Args:
        augment: when enabled, ``augment.copies`` augmented copies of each path in
            ``augment_indices`` (the training split) are extracted and cached too.
        engine: "litert" (default, about twice TensorFlow's speed on CPUs) or "tensorflow".
    """
    extractor = get_extractor(str(graph_path), spec, engine)
    prep = extractor.spec.preprocessing
    cache = BottleneckCache(cache_root, backbone_key(graph_sha256, extractor.spec, extractor.engine))
    copies = augment.copies if augment is not None and augment.enabled else 0
    aug_set = set(augment_indices) if copies else set()
    # An item is (path index, variant): variant 0 is the plain image, 1..copies augmented copies.
    result_rows: dict[tuple[int, int], np.ndarray] = {}
    skipped: dict[int, str] = {}
    hashes: list[str] = []
    misses: list[tuple[int, int]] = []

    def cache_key(i: int, v: int) -> str:
        return hashes[i] if v == 0 else f"{hashes[i]}-aug{augment.key()}-{v}"

    for i, p in enumerate(paths):
        try:
            data = read_image_file(p)
        except ImageError as err:
            skipped[i] = err.reason
            hashes.append("")
            continue
        hashes.append(hashlib.sha256(data).hexdigest())
        # Serial on purpose: with a warm cache this loop is all the work, and threads for
        # 0.1 ms lookups cost more in GIL hand-offs than they save (measured: 2.6k vs 6k img/s).
        for v in range(1 + (copies if i in aug_set else 0)):
            hit = cache.get(cache_key(i, v))
            if hit is not None:
                result_rows[(i, v)] = hit
            else:
                misses.append((i, v))
    pool = ThreadPoolExecutor(max_workers=workers or min(8, (os.cpu_count() or 2) * 2))
    n_cached = len(result_rows)

    def decode(item: tuple[int, int]):
        i, v = item
        try:
            data = read_image_file(paths[i])
            if v == 0:
                return load_image(data, prep, str(paths[i]))
            return augmented_image(data, prep, augment, hashes[i], v, str(paths[i]))
        except (ImageError, OSError) as err:
            return err

    bar = tqdm(total=len(misses), desc="bottlenecks", unit="img", disable=not progress or not misses,
               file=sys.stderr)
    chunks = [misses[k:k + batch_size] for k in range(0, len(misses), batch_size)]
    writes: list = []
    with pool:
        pending = [pool.submit(decode, i) for i in chunks[0]] if chunks else []
        for c, chunk in enumerate(chunks):
            decoded = [f.result() for f in pending]
            pending = [pool.submit(decode, i) for i in chunks[c + 1]] if c + 1 < len(chunks) else []
            good = [(item, arr) for item, arr in zip(chunk, decoded) if isinstance(arr, np.ndarray)]
            for (i, _), arr in zip(chunk, decoded):
                if not isinstance(arr, np.ndarray):
                    skipped[i] = arr.reason if isinstance(arr, ImageError) else f"cannot read ({arr.strerror or arr})"
            if good:
                feats = extractor([a for _, a in good])
                # The previous chunk's cache writes must have landed (errors such as a full disk
                # surface here); this chunk's go to the threads while the next one is computed.
                for w in writes:
                    w.result()
                writes = []
                for (item, _), f in zip(good, feats):
                    writes.append(pool.submit(cache.put, cache_key(*item), f))
                    result_rows[item] = f
            bar.update(len(chunk))
            if os.environ.get("EDGEPIPE_TEST_PAUSE_AT") == "bottlenecks":
                for w in writes:
                    w.result()
            pause_point("bottlenecks")
        for w in writes:
            w.result()
    bar.close()
    ok = sorted(i for (i, v) in result_rows if v == 0 and i not in skipped)
    dim = extractor.spec.feature_size
    feats = np.stack([result_rows[(i, 0)] for i in ok]).astype(np.float32) if ok else np.zeros((0, dim), np.float32)
    augmented = None
    if copies:
        augmented = np.zeros((len(ok), copies, dim), np.float32)
        for row, i in enumerate(ok):
            for v in range(1, copies + 1):
                if (i, v) in result_rows:
                    augmented[row, v - 1] = result_rows[(i, v)]
    computed = len(result_rows) - n_cached
    return ExtractionResult(feats, ok, skipped, computed=computed, cached=n_cached,
                            hashes=hashes, augmented=augmented)

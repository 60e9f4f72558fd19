"""Bottleneck features: batched extraction with a content-addressed on-disk cache.

The per-batch work is a pure function of (graph, image bytes) → features
(:func:`features_from_bytes`), with the model loaded once per process, and cache writes are
idempotent (the file name is the hash of what it depends on). The same code can therefore run
inside an Apache Beam ``DoFn`` for millions of images.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.augment import augmented_image
from pipeline.backbone import get_extractor
from pipeline.config import AugmentConfig
from pipeline.console import progress as progress_bar
from pipeline.hashindex import HashIndex
from pipeline.images import ImageError, load_image, load_pixels, read_image_file, reason_of
from pipeline.rundir import atomic_write_bytes, remove_orphaned_temporaries
from pipeline.testhook import pause_point
from pipeline.types import BackboneSpec

HASH_INDEX_NAME = "file-hashes.sqlite3"


def backbone_key(graph_sha256: str, spec: BackboneSpec, engine: str = "tensorflow") -> str:
    """Identifies what a feature depends on besides the image: graph, tensors, preprocessing and
    the engine that ran the graph (engines round float32 differently)."""
    parts = [graph_sha256, spec.input_tensor, spec.bottleneck_tensor, spec.preprocessing.to_dict()]
    if engine != "tensorflow":
        parts.append(engine)
    blob = json.dumps(parts, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


class BottleneckCache:
    """``<root>/<backbone key>/<a>/<image sha256>.npy``; writes are atomic and idempotent.

    Sixteen sub-folders (the hash's first hex digit) keep each folder small for the file systems
    that need it (62k entries each at a million images), while a new cache costs 16 folder
    creations rather than 256, which matters where creating an inode is slow (on a journal-less
    ext4, right after many deletions, each one costs about a millisecond).

    Entries are ordinary ``.npy`` files, but read without numpy's header parser: every entry of one
    backbone has the same header, so a read is one ``read()`` and a comparison (about 10 µs
    instead of 100 µs for ``np.load``), and anything else (torn, foreign, another shape) is a miss.
    """

    def __init__(self, root: Path, key: str, feature_size: int):
        self.dir = Path(root) / key
        self._size = 4 * feature_size
        buf = io.BytesIO()
        np.save(buf, np.zeros(feature_size, "<f4"), allow_pickle=False)
        self._header = buf.getvalue()[:-self._size]

    def _path(self, image_sha: str) -> Path:
        return self.dir / image_sha[:1] / f"{image_sha}.npy"

    def get(self, image_sha: str) -> np.ndarray | None:
        try:
            fd = os.open(self._path(image_sha), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:  # missing (or unreadable: recomputed and rewritten)
            return None
        try:
            data = os.read(fd, len(self._header) + self._size + 1)
        except OSError:
            return None
        finally:
            os.close(fd)
        return self._entry(data)

    def _entry(self, data: bytes) -> np.ndarray | None:
        """An entry's feature, or None for bytes not from our atomic writes (a copy cut short,
        another shape): recomputed and replaced."""
        if len(data) != len(self._header) + self._size or not data.startswith(self._header):
            return None
        return np.frombuffer(data, "<f4", offset=len(self._header))

    def remove_orphans(self) -> int:
        """Removes the temporary files of writers that were killed mid-entry."""
        return remove_orphaned_temporaries(self.dir)

    def put(self, image_sha: str, feature: np.ndarray) -> None:
        # Not fsynced: a torn entry after a power cut fails the check in get() and is recomputed.
        # atomic_write_bytes makes the sub-folder on the first entry that needs it.
        atomic_write_bytes(self._path(image_sha), self._header + np.asarray(feature, "<f4").tobytes(),
                           durable=False)


def features_from_bytes(graph_path: str, spec: BackboneSpec, images: Sequence[bytes],
                        engine: str = "litert") -> np.ndarray:
    """The pure per-batch function: encoded images → float32 ``[N, feature_size]``.

    Raises:
        ImageError: an image cannot be decoded.
    """
    extractor = get_extractor(str(graph_path), spec, engine)
    batch = np.stack([load_image(b, extractor.spec.preprocessing) for b in images])
    return extractor(batch)


def entry_name(image_sha: str, variant: int, augment: AugmentConfig | None) -> str:
    """The cache entry of an image (variant 0) or of its augmented copy ``variant`` (1..copies)."""
    return image_sha if variant == 0 else f"{image_sha}-aug{augment.key()}-{variant}"


def item_pixels(data: bytes, variant: int, prep, augment: AugmentConfig | None, image_sha: str,
                source: str) -> np.ndarray:
    """The pixels the backbone gets for an image or one of its augmented copies.

    Raises:
        ImageError: the image cannot be decoded.
    """
    if variant == 0:
        return load_pixels(data, prep, source)
    return augmented_image(data, prep, augment, image_sha, variant, source)


def variants(augment: AugmentConfig | None) -> int:
    """Augmented copies per training image (0 when augmentation is off)."""
    return augment.copies if augment is not None and augment.enabled else 0


@dataclass
class ExtractionResult:
    features: np.ndarray            # [n_ok, F], rows in the order of `ok`
    ok: list[int]                   # indices of the inputs that decoded
    skipped: dict[int, str] = field(default_factory=dict)  # index → reason
    computed: int = 0
    cached: int = 0
    hashes: list[str] = field(default_factory=list)  # sha256 of each input's bytes ("" if unreadable)
    augmented: np.ndarray | None = None  # [n_ok, copies, F] for the paths in `augment_indices`
    cache: "BottleneckCache | None" = None  # where the entries are (what `keep=False` reads back)


class Gathered:
    """What an extraction fills in, item by item, whichever engine ran it, and the result it makes.

    Attributes:
        skipped: path index → why it could not be read or decoded.
        hashes: each path's sha256 ("" when it could not be read).
        counts: items ``cached`` (read from the cache) and ``computed``.
    """

    def __init__(self, n: int, copies: int, dim: int, keep: bool = True):
        # keep=False: only what was found is recorded, for a caller that streams the entries
        # from the cache (fine-tuning's cut activations would not fit in memory).
        self.plain = np.zeros((n, dim if keep else 0), np.float32)
        self.augmented = np.zeros((n, copies, dim if keep else 0), np.float32) if copies else None
        self.keep = keep
        self.have = np.zeros(n, bool)
        self.skipped: dict[int, str] = {}
        self.hashes = [""] * n
        self.counts = {"cached": 0, "computed": 0}

    def store(self, i: int, v: int, feature: np.ndarray) -> None:
        """The feature of path ``i``'s variant ``v`` (0: the image, 1..copies: augmented copies)."""
        if v == 0:
            self.have[i] = True
        if not self.keep:
            return
        if v == 0:
            self.plain[i] = feature
        else:
            self.augmented[i, v - 1] = feature

    def result(self, cache: "BottleneckCache | None" = None) -> ExtractionResult:
        ok = [i for i in range(len(self.hashes)) if self.have[i] and i not in self.skipped]
        return ExtractionResult(self.plain[ok], ok, self.skipped, computed=self.counts["computed"],
                                cached=self.counts["cached"], hashes=self.hashes,
                                augmented=None if self.augmented is None else self.augmented[ok], cache=cache)


# A miss's bytes from the hashing read are kept for decoding up to this size; bigger files are
# read again by the decoder, so memory stays bounded by two batches of small files.
KEEP_BYTES = 1 << 20
DECODE_GROUP = 4


def extract(
    paths: Sequence[Path], graph_path: Path, spec: BackboneSpec, graph_sha256: str,
    cache_root: Path, batch_size: int = 64, progress: bool = True, workers: int | None = None,
    augment: AugmentConfig | None = None, augment_indices: Sequence[int] = (),
    engine: str = "litert", keep: bool = True,
) -> ExtractionResult:
    """Features for every path, from the cache where present, else computed in batches.

    Each batch of paths is looked up (stat-keyed content hashes from :class:`HashIndex`, else
    one read and a SHA-256), its misses are decoded by threads while the previous batch's misses
    run through the backbone, and one writer thread stores each batch's features while the next
    is computed. Memory stays bounded by two batches whatever the number of images.

    Args:
        augment: when enabled, ``augment.copies`` augmented copies of each path in
            ``augment_indices`` (the training split) are extracted and cached too.
        engine: "litert" (default, about twice TensorFlow's speed on CPUs) or "tensorflow".
        keep: False: the features are written to the cache but not gathered (the result's
            ``features`` are empty; read them back through its ``cache``).
    """
    extractor = get_extractor(str(graph_path), spec, engine)
    prep = extractor.spec.preprocessing
    dim = extractor.spec.feature_size
    cache = BottleneckCache(cache_root, backbone_key(graph_sha256, extractor.spec, extractor.engine), dim)
    cache.remove_orphans()  # what a run killed mid-write left
    index = HashIndex(Path(cache_root) / HASH_INDEX_NAME)
    copies = variants(augment)
    aug_set = set(augment_indices) if copies else set()
    n = len(paths)
    got = Gathered(n, copies, dim, keep)
    skipped, hashes, counts, store = got.skipped, got.hashes, got.counts, got.store

    # An item is (path index i, variant v): v == 0 is the plain image, 1..copies augmented copies.
    def key(i: int, v: int) -> str:
        return entry_name(hashes[i], v, augment)

    def look_up(rows: range) -> list[tuple[int, int, bytes | None]]:
        """Fills cache hits for ``rows``; returns the misses, with their bytes when kept."""
        names = [os.path.abspath(paths[i]) for i in rows]
        stats = []
        for name in names:
            try:
                stats.append(os.stat(name))
            except OSError:
                stats.append(None)  # read_image_file below says why
        known = index.lookup(names, stats)
        fresh, misses = [], []
        for i, name, st, sha in zip(rows, names, stats, known):
            data = None
            if sha is None:
                started = time.time_ns()
                try:
                    data = read_image_file(paths[i])
                except ImageError as err:
                    skipped[i] = err.reason
                    continue
                sha = hashlib.sha256(data).hexdigest()
                if st is not None:
                    fresh.append((name, st, started, sha))
            hashes[i] = sha
            for v in range(1 + (copies if i in aug_set else 0)):
                hit = cache.get(key(i, v))
                if hit is not None:
                    store(i, v, hit)
                    counts["cached"] += 1
                else:
                    misses.append((i, v, data if data is not None and len(data) <= KEEP_BYTES else None))
        index.record(fresh)
        return misses

    def decode(i: int, v: int, data: bytes | None):
        try:
            if data is None:
                data = read_image_file(paths[i])
                if hashlib.sha256(data).hexdigest() != hashes[i]:
                    why = "changed while being read; run again"
                    raise ImageError(f"{paths[i]}: {why}", why)
            return item_pixels(data, v, prep, augment, hashes[i], str(paths[i]))
        except (ImageError, OSError) as err:
            return err

    def decode_group(group: list[tuple[int, int, bytes | None]]) -> list[tuple[int, int, object]]:
        return [(i, v, decode(i, v, data)) for i, v, data in group]

    def put_all(entries: list[tuple[str, np.ndarray]]) -> None:
        for name, feature in entries:
            cache.put(name, feature)

    writing = None  # the previous batch's cache writes

    def infer(batch: list) -> None:
        """Runs the backbone on a batch's decoded misses (futures of :func:`decode_group`)."""
        nonlocal writing
        decoded = [item for f in batch for item in f.result()]
        good = [(i, v, arr) for i, v, arr in decoded if isinstance(arr, np.ndarray)]
        for i, _, arr in decoded:
            if not isinstance(arr, np.ndarray):
                skipped[i] = reason_of(arr)
        if good:
            feats = extractor([arr for _, _, arr in good])
            # The previous batch's cache writes must have landed (errors such as a full disk
            # surface here); this batch's go to the writer while the next one is computed.
            if writing is not None:
                writing.result()
            writing = writer.submit(put_all, [(key(i, v), f) for (i, v, _), f in zip(good, feats)])
            for (i, v, _), f in zip(good, feats):
                store(i, v, f)
            counts["computed"] += len(good)
        bar.update(len(decoded))
        if os.environ.get("EDGEPIPE_TEST_PAUSE_AT") == "bottlenecks" and writing is not None:
            writing.result()
        pause_point("bottlenecks")

    total = n + copies * len(aug_set)
    # delay: a warm cache answers in well under a second, with no bar flashing by.
    bar = progress_bar(total=total, desc="bottlenecks", unit="img", disable=not progress, delay=0.5)
    pool = ThreadPoolExecutor(max_workers=workers or min(8, (os.cpu_count() or 2) * 2))
    # One writer: concurrent creates in the cache's folders contend in the kernel (measured on
    # ext4: ~130 µs of system time per entry from 4 threads, ~50 µs from one).
    writer = ThreadPoolExecutor(max_workers=1)
    try:
        with pool, writer:
            decoding: list = []  # the previous batch's misses, decoding while this one is looked up
            for start in range(0, n, batch_size):
                rows = range(start, min(n, start + batch_size))
                misses = look_up(rows)
                bar.update(len(rows) + sum(copies for i in rows if i in aug_set) - len(misses))  # the hits
                # A few images per task: fewer thread hand-offs than one future per image.
                groups = [misses[k:k + DECODE_GROUP] for k in range(0, len(misses), DECODE_GROUP)]
                submitted = [pool.submit(decode_group, g) for g in groups]
                if decoding:
                    infer(decoding)
                decoding = submitted
            if decoding:
                infer(decoding)
            if writing is not None:
                writing.result()
    finally:
        bar.close()
        index.close()
    return got.result(cache)

import os
import shutil
import sqlite3
import time
from pathlib import Path

import numpy as np

from pipeline.bottlenecks import HASH_INDEX_NAME, BottleneckCache, backbone_key, extract, features_from_bytes
from pipeline.catalog import custom_backbone
from pipeline.hashindex import RACY_NS, HashIndex
from pipeline.rundir import sha256_file
from tests.helpers.world import TINY_BOTTLENECK, TINY_SIZE, make_image_folders


def _spec(graph):
    return custom_backbone(graph, "input:0", TINY_BOTTLENECK, TINY_SIZE, 127.5, 127.5)


def test_cache_is_used_and_gives_identical_features(tiny_graph, tiny_images, tmp_path):
    paths = sorted(tiny_images.rglob("*.png"))[:20]
    spec, sha = _spec(tiny_graph), sha256_file(tiny_graph)
    cold = extract(paths, tiny_graph, spec, sha, tmp_path / "c", batch_size=8, progress=False)
    warm = extract(paths, tiny_graph, spec, sha, tmp_path / "c", batch_size=8, progress=False)
    assert (cold.computed, cold.cached) == (20, 0)
    assert (warm.computed, warm.cached) == (0, 20)
    np.testing.assert_array_equal(cold.features, warm.features)


def test_pure_batch_function_matches_extraction(tiny_graph, tiny_images, tmp_path):
    paths = sorted(tiny_images.rglob("*.png"))[:6]
    spec = _spec(tiny_graph)
    direct = features_from_bytes(str(tiny_graph), spec, [p.read_bytes() for p in paths])
    cached = extract(paths, tiny_graph, spec, "x", tmp_path / "c", progress=False).features
    np.testing.assert_allclose(direct, cached, rtol=1e-6)


def test_unreadable_images_are_skipped_with_reason(tiny_graph, tiny_images, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    paths = sorted(tiny_images.rglob("*.png"))[:3] + [bad]
    res = extract(paths, tiny_graph, _spec(tiny_graph), "x", tmp_path / "c", progress=False)
    # The reason alone: the retrain stage prints it after the path (`skipped PATH: reason`).
    assert res.ok == [0, 1, 2] and res.skipped[3].startswith("not an image in a known format")


def test_corrupt_cache_entry_is_recomputed(tiny_graph, tiny_images, tmp_path):
    paths = sorted(tiny_images.rglob("*.png"))[:2]
    spec = _spec(tiny_graph)
    first = extract(paths, tiny_graph, spec, "x", tmp_path / "c", progress=False)
    entry = next((tmp_path / "c").rglob("*.npy"))
    entry.write_bytes(b"torn")
    again = extract(paths, tiny_graph, spec, "x", tmp_path / "c", progress=False)
    assert again.computed == 1
    np.testing.assert_allclose(first.features, again.features, atol=1e-6)


def test_key_changes_with_preprocessing(tiny_graph):
    import dataclasses

    spec = _spec(tiny_graph)
    other = dataclasses.replace(spec, preprocessing=dataclasses.replace(spec.preprocessing, mean=0.0))
    assert backbone_key("g", spec) != backbone_key("g", other)


def test_cache_entries_are_plain_npy_and_a_wrong_shape_is_a_miss(tmp_path):
    cache = BottleneckCache(tmp_path, "k", 16)
    cache.put("ab12", np.arange(16, dtype=np.float32))
    np.testing.assert_array_equal(np.load(tmp_path / "k" / "a" / "ab12.npy"), np.arange(16))
    np.testing.assert_array_equal(cache.get("ab12"), np.arange(16))
    np.save(tmp_path / "k" / "a" / "ab34.npy", np.zeros(17, np.float32))  # another backbone's size
    np.save(tmp_path / "k" / "a" / "ab56.npy", np.zeros(16, np.float64))
    assert cache.get("ab34") is None and cache.get("ab56") is None and cache.get("cd78") is None
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_writer_killed_mid_entry_leaves_nothing_after_the_next_run(tiny_graph, tiny_images, tmp_path):
    import subprocess
    import sys

    paths = sorted(tiny_images.rglob("*.png"))[:4]
    spec, sha = _spec(tiny_graph), sha256_file(tiny_graph)
    cache = extract(paths, tiny_graph, spec, sha, tmp_path, batch_size=4, progress=False).cache
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = cache.dir / "a" / f".abc.npy.{int(dead.stdout)}.1.tmp"  # a killed writer's half entry
    live = cache.dir / "a" / f".abd.npy.{os.getpid()}.1.tmp"  # one being written now
    for p in (orphan, live):
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(b"half")
    again = extract(paths, tiny_graph, spec, sha, tmp_path, batch_size=4, progress=False)
    assert again.cached == 4
    assert not orphan.exists() and live.exists()


def _aged(folder: Path, n: int) -> list[Path]:
    """n image files whose last change is more than RACY_NS in the past (recorded in the index)."""
    paths = sorted(folder.rglob("*.png"))[:n]
    newest = max(max(p.stat().st_mtime_ns, p.stat().st_ctime_ns) for p in paths)
    time.sleep(max(0.0, (newest + RACY_NS - time.time_ns()) / 1e9 + 0.05))
    return paths


def test_a_warm_run_reads_no_image_and_a_first_run_reads_each_once(tiny_graph, tiny_images, tmp_path, monkeypatch):
    import pipeline.bottlenecks as bn

    paths = _aged(tiny_images, 12)
    reads: list[str] = []
    real = bn.read_image_file
    monkeypatch.setattr(bn, "read_image_file", lambda p: reads.append(str(p)) or real(p))
    spec = _spec(tiny_graph)
    cold = extract(paths, tiny_graph, spec, "x", tmp_path / "c", progress=False)
    assert sorted(reads) == sorted(map(str, paths))  # hashed and decoded from one read
    reads.clear()
    warm = extract(paths, tiny_graph, spec, "x", tmp_path / "c", progress=False)
    assert reads == [] and warm.cached == 12 and warm.hashes == cold.hashes
    np.testing.assert_array_equal(cold.features, warm.features)


def test_a_file_rewritten_in_place_is_hashed_again(tiny_graph, tiny_images, tmp_path):
    folder = tmp_path / "imgs"
    shutil.copytree(tiny_images, folder)
    paths = _aged(folder, 4)
    spec = _spec(tiny_graph)
    first = extract(paths, tiny_graph, spec, "x", tmp_path / "c", progress=False)
    before = paths[0].stat()
    paths[0].write_bytes(paths[3].read_bytes())  # new content, same inode
    os.utime(paths[0], ns=(before.st_atime_ns, before.st_mtime_ns))  # even with the old mtime
    again = extract(paths, tiny_graph, spec, "x", tmp_path / "c", progress=False)
    assert again.hashes[0] == again.hashes[3] != first.hashes[0]
    np.testing.assert_array_equal(again.features[0], first.features[3])


def test_files_changed_just_before_reading_are_not_remembered(tiny_graph, tmp_path):
    folder = make_image_folders(tmp_path / "fresh", per_class=2, size=TINY_SIZE)
    paths = sorted(folder.rglob("*.png"))
    extract(paths, tiny_graph, _spec(tiny_graph), "x", tmp_path / "c", progress=False)
    with sqlite3.connect(tmp_path / "c" / HASH_INDEX_NAME) as db:
        assert db.execute("SELECT COUNT(*) FROM files").fetchone() == (0,)


def test_a_corrupt_or_unwritable_hash_index_never_fails_a_run(tiny_graph, tiny_images, tmp_path):
    paths = _aged(tiny_images, 3)
    spec = _spec(tiny_graph)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / HASH_INDEX_NAME).write_bytes(b"garbage, not SQLite" * 100)
    first = extract(paths, tiny_graph, spec, "x", tmp_path / "c", progress=False)
    assert first.computed == 3
    assert (tmp_path / "c" / f"{HASH_INDEX_NAME}.corrupt").is_file()
    with sqlite3.connect(tmp_path / "c" / HASH_INDEX_NAME) as db:
        assert db.execute("SELECT COUNT(*) FROM files").fetchone() == (3,)
    (tmp_path / "file").write_text("x")
    index = HashIndex(tmp_path / "file" / "under-a-file.sqlite3")  # cannot be created: remembers nothing
    index.record([("a", paths[0].stat(), time.time_ns() + 10**10, "ab")])
    assert index.lookup(["a"], [paths[0].stat()]) == [None]


def test_fast_decode_and_resize_give_the_pixels_of_pil_and_tensorflow():
    """The OpenCV JPEG path and the numpy resize are speed-ups only: cached features depend on
    these pixels, so they must be PIL's decode and ``tf.image.resize``'s values bit for bit."""
    import io

    import tensorflow as tf
    from PIL import Image, ImageOps

    from pipeline.images import decode_rgb, resize
    from pipeline.types import Preprocessing

    def pil_rgb(data: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(data)) as im:
            ImageOps.exif_transpose(im, in_place=True)
            return np.asarray(im.convert("RGB"))

    rng = np.random.default_rng(0)
    photo = Image.fromarray(np.clip(rng.normal(128, 60, (97, 131, 3)), 0, 255).astype(np.uint8))
    variants = [dict(subsampling=s, progressive=p) for s in (0, 1, 2) for p in (False, True)]
    for mode, kw in [("RGB", v) for v in variants] + [("L", {}), ("L", {"progressive": True})]:
        buf = io.BytesIO()
        photo.convert(mode).save(buf, "JPEG", quality=90, **kw)
        np.testing.assert_array_equal(decode_rgb(buf.getvalue()), pil_rgb(buf.getvalue()), err_msg=f"{mode} {kw}")
    for size, shape in [(224, (97, 131)), (224, (300, 200)), (224, (1000, 37)), (224, (224, 500)), (32, (5, 9))]:
        img = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
        expected = tf.image.resize(tf.cast(img, tf.float32), (size, size), method="bilinear").numpy()
        got = resize(img, Preprocessing(size=size))
        assert got.dtype == np.float32 and np.array_equal(got.view(np.uint32), expected.view(np.uint32)), shape

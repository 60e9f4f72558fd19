import numpy as np

from pipeline.bottlenecks import BottleneckCache, backbone_key, extract, features_from_bytes
from pipeline.catalog import custom_backbone
from pipeline.rundir import sha256_file
from tests.conftest import TINY_BOTTLENECK, TINY_SIZE


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
    assert BottleneckCache("/x", "k")._path("ab12")

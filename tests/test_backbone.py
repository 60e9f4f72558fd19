import dataclasses

import numpy as np
import pytest

from pipeline.backbone import FeatureExtractor, resolve_spec
from pipeline.catalog import custom_backbone, get_backbone, load_catalog
from pipeline.errors import ConfigError, GraphError
from pipeline.graph import load_graph_def
from tests.helpers.world import TINY_BOTTLENECK, TINY_SIZE


def _spec(graph, bottleneck=TINY_BOTTLENECK):
    return custom_backbone(graph, "input:0", bottleneck, TINY_SIZE, 127.5, 127.5)


def test_catalog_has_every_seed_backbone():
    names = set(load_catalog())
    assert {"mobilenet_v2_1.4_224", "inception_v3", "inception_v4"} <= names
    assert len([n for n in names if n.startswith("mobilenet_v1_")]) == 16
    assert get_backbone("mobilenet_v1_0.25_224").feature_size == 256


def test_unknown_backbone_suggests_close_names():
    with pytest.raises(ConfigError, match="did you mean mobilenet_v1_0.25_224"):
        get_backbone("mobilenet_v1_025_224")


def test_batch_goes_through_a_batch_1_placeholder(tiny_graph):
    ex = FeatureExtractor(tiny_graph, _spec(tiny_graph))
    x = np.random.default_rng(0).uniform(0, 255, (5, TINY_SIZE, TINY_SIZE, 3)).astype(np.float32)
    batched = ex(x)
    one_by_one = np.concatenate([ex(x[i:i + 1]) for i in range(5)])
    assert batched.shape == (5, 16) and ex.spec.feature_size == 16
    np.testing.assert_allclose(batched, one_by_one, rtol=1e-5, atol=1e-6)


def test_wrong_tensor_name_suggests_existing_ones(tiny_graph):
    gd = load_graph_def(tiny_graph)
    with pytest.raises(GraphError, match="MobilenetV1/Logits/AvgPool_1a/AvgPool:0") as err:
        resolve_spec(gd, _spec(tiny_graph, "MobilenetV1/Logits/AvgPool:0"))
    assert "--bottleneck-tensor" in str(err.value)


def test_alternate_bottleneck_name_is_used_when_primary_is_absent(tiny_graph):
    spec = dataclasses.replace(_spec(tiny_graph, "Renamed/AvgPool:0"), alternates=(TINY_BOTTLENECK,))
    assert resolve_spec(load_graph_def(tiny_graph), spec).bottleneck_tensor == TINY_BOTTLENECK


def test_not_a_graphdef_is_one_clear_error(tmp_path):
    bad = tmp_path / "model.pb"
    bad.write_bytes(b"\xff\xfe definitely not protobuf " * 10)
    with pytest.raises(GraphError, match="is not a frozen TensorFlow GraphDef"):
        load_graph_def(bad)

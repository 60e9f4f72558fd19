"""Every catalog backbone besides MobileNet v1, as a faithful look-alike, through the whole chain.

The look-alikes (``tests/helpers/lookalikes.py``) are packed like the official downloads and served by
``http.server`` on 127.0.0.1 as an ``EDGEPIPE_MIRROR`` base URL, so the catalog URLs are used
unchanged; ``--offline`` keeps the official hosts out of reach. Also here: the legacy-op rewrites
of ``pipeline/graphfix.py``, the bottleneck found by shape, and ``edgepipe inspect``.
"""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from pipeline.backbone import FeatureExtractor, resolve_spec
from pipeline.catalog import get_backbone
from pipeline.errors import GraphError
from pipeline.fetch import mirror_relpath
from pipeline.graph import load_graph_def
from pipeline.graphfix import feature_subgraph, legacy_ops_rewritten
from pipeline.inspect import describe, inspect_graph
from tests.helpers.chain import edgepipe_log, run_chain
from tests.helpers.cli import edgepipe
from tests.helpers.lookalikes import (
    LOOKALIKES,
    OLD_PRODUCER,
    V4_POOL_RENAMED,
    GraphBuilder,
    inception_v4_archive,
    inception_v4_graph,
    lookalike_graph,
    write_mirror,
)
from tests.helpers.servers import serve_folder

TFLITE_MODES = ("float32", "float16", "dynamic", "int8")
NO_PROXY = {"NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}


@pytest.fixture(scope="module", autouse=True)
def _no_proxy_for_the_local_mirror():
    """The mirror is on 127.0.0.1: a proxy from the environment must not be asked for it."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in NO_PROXY.items():
            patch.setenv(name, value)
        yield


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    """The base URL of a local server holding every look-alike at its catalog URL's path."""
    with serve_folder(write_mirror(tmp_path_factory.mktemp("mirror"))) as url:
        yield url


@pytest.fixture(scope="module", params=list(LOOKALIKES))
def chain(request, mirror, tiny_images, tiny_holdout, tmp_path_factory):
    """One whole chain per look-alike, in-process: (name, run directory, the lines it printed).

    The look-alike graphs take the real input sizes (224, 299), so these chains cost far more
    than the tiny graph's: they are ``slow``.
    """
    name = request.param
    out = tmp_path_factory.mktemp("run") / name
    with edgepipe_log() as lines:
        run_chain(out, backbone=name, images=tiny_images, test_images=tiny_holdout, mirror=mirror, offline=True,
                  epochs=30, learning_rate=0.05, cache_dir=tmp_path_factory.mktemp("cache"))
    return name, out, "\n".join(lines)


def _manifest(out) -> dict:
    return json.loads((out / "manifest.json").read_text())


# --- the whole chain -------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.chain
def test_every_artifact_passes_in_every_runtime(chain):
    name, out, stderr = chain
    report = json.loads((out / "report.json").read_text())
    assert report["backbone"] == name
    rows = {(r["artifact"], r["runtime"]): r for r in report["results"]}
    expected = {("savedmodel", "tensorflow"), ("tfjs-float32", "tfjs-wasm"), ("tfjs-float16", "tfjs-wasm")}
    expected |= {(f"tflite-{m}", rt) for m in TFLITE_MODES for rt in ("tflite-runtime", "ai-edge-litert")}
    assert expected <= set(rows)  # and any further variant the stages write by default
    for key, row in rows.items():
        assert row["passed"] and not row["error"], (key, row["error"], row["top1_agreement"])
    # Solid-colour classes: features that lost the colour would make every agreement trivial.
    assert rows[("savedmodel", "tensorflow")]["accuracy"] == 1.0
    assert rows[("tflite-float32", "ai-edge-litert")]["max_abs_diff"] < 1e-4
    assert rows[("tfjs-float32", "tfjs-wasm")]["max_abs_diff"] < 1e-4


@pytest.mark.slow
@pytest.mark.chain
def test_graph_came_from_the_mirror_and_its_hash_was_recorded(chain, mirror):
    name, out, stderr = chain
    spec = get_backbone(name)
    fetch = _manifest(out)["stages"]["fetch"]["info"]
    assert fetch["source"] == mirror + mirror_relpath(spec.url)
    assert fetch["checksum"] == "recorded"  # no sha256 in the catalog: the first download is locked
    assert fetch["bottleneck"] == {"requested": spec.bottleneck_tensor, "used": spec.bottleneck_tensor,
                                   "found_by": "name"}
    assert fetch["spec"]["feature_size"] == spec.feature_size
    features = json.loads((out / "retrain" / "metrics.json").read_text())["bottlenecks"]
    assert features["computed"] == 48 + 18


@pytest.mark.slow
@pytest.mark.chain
def test_only_inception_v3_needed_rewrites(chain):
    name, out, stderr = chain
    fixes = {f["what"]: f for f in _manifest(out)["stages"]["fetch"]["info"]["graph_fixes"]}
    if name != "inception_v3":
        assert fixes == {}
        assert "graph rewritten" not in stderr
        return
    assert fixes["BatchNormWithGlobalNormalization"]["nodes"] == ["conv/batchnorm", "conv_1/batchnorm"]
    assert fixes["CheckNumerics"]["into"] == "Identity"
    head = fixes["the nodes that compute Mul:0"]
    assert head["into"] == "removed"
    assert head["nodes"] == ["DecodeJpeg/contents", "DecodeJpeg", "Cast", "ExpandDims/dim", "ExpandDims",
                             "ResizeBilinear/size", "ResizeBilinear", "Sub/y", "Sub", "Mul/y"]
    assert fixes["Reshape to a batch of 1"]["nodes"] == ["pool_3/_reshape [1, 2048]"]
    notes = [line for line in stderr.splitlines() if line.startswith("note: graph rewritten:")]
    assert len(notes) == 4
    assert any("BatchNormWithGlobalNormalization → Sub, AddV2, Rsqrt, Mul, AddV2" in n for n in notes)


@pytest.mark.slow
@pytest.mark.chain
def test_exported_models_hold_only_the_feature_path(chain):
    """No JPEG head (Inception v3 decodes its own input), legacy op or ImageNet logits is exported."""
    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter

    name, out, stderr = chain
    unwanted = {"DecodeJpeg", "Cast", "ResizeBilinear", "BatchNormWithGlobalNormalization", "CheckNumerics"}
    logits = {1001, 1008}  # ImageNet classes after the bottleneck; the head replaces them
    for mode in TFLITE_MODES:
        interp = Interpreter(model_content=(out / "quantize" / f"{mode}.tflite").read_bytes())
        ops = {d["op_name"] for d in interp._get_ops_details()}
        assert "CONV_2D" in ops and not {"DECODE_JPEG", "CAST", "RESIZE_BILINEAR"} & ops, (mode, ops)
        shapes = [tuple(t["shape"]) for t in interp.get_tensor_details()]
        assert not any(logits & set(s) for s in shapes), mode
    loaded = tf.saved_model.load(str(out / "export" / "savedmodel"))
    graph = loaded.signatures["serving_default"].graph.as_graph_def()
    nodes = [*graph.node, *(n for f in graph.library.function for n in f.node_def)]
    assert "Conv2D" in {n.op for n in nodes} and not unwanted & {n.op for n in nodes}
    placeholders = [n for n in nodes if n.op == "Placeholder" and n.attr["dtype"].type == tf.string]
    assert not placeholders
    const_dims = {d.size for n in nodes if n.op == "Const" for d in n.attr["value"].tensor.tensor_shape.dim}
    assert not logits & const_dims
    for mode in ("float32", "float16"):
        bundle = out / "tfjs" / mode
        topology = json.loads((bundle / "model.json").read_text())
        tfjs_ops = {n["op"] for n in topology["modelTopology"]["node"]}
        assert not unwanted & tfjs_ops, (mode, tfjs_ops)
        inputs = [n for n in topology["modelTopology"]["node"] if n["op"] == "Placeholder"]
        assert len(inputs) == 1 and inputs[0]["attr"]["dtype"]["type"] == "DT_FLOAT"
        weights = [w for group in topology["weightsManifest"] for w in group["weights"]]
        assert not any(logits & set(w["shape"]) for w in weights), mode


# --- graphfix ---------------------------------------------------------------------------------


def _batch_norm_graph(scale_after_normalization: bool, producer: int = OLD_PRODUCER):
    """x [N,3,3,4] → BatchNormWithGlobalNormalization → y, as a 2015 TensorFlow wrote it."""
    import tensorflow as tf

    g = GraphBuilder(seed=3)
    rng = np.random.default_rng(3)
    params = {"m": rng.normal(0, 1, 4), "v": rng.uniform(0.5, 2, 4), "beta": rng.normal(0, 1, 4),
              "gamma": rng.uniform(0.5, 2, 4)}
    x = g.placeholder("x", tf.float32, [None, 3, 3, 4])
    inputs = [x] + [g.const(k, v.astype(np.float32)) for k, v in params.items()]
    g.node("y", "BatchNormWithGlobalNormalization", inputs, T=tf.float32, variance_epsilon=0.01,
           scale_after_normalization=scale_after_normalization)
    g.graph_def.versions.producer = producer
    return g.graph_def, params


def _expected_batch_norm(x, p, scale_after_normalization):
    scale = 1 / np.sqrt(p["v"] + 0.01) * (p["gamma"] if scale_after_normalization else 1)
    return (x - p["m"]) * scale + p["beta"]


def _function_of(graph_def):
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([None, 3, 3, 4], tf.float32)])
    def run(x):
        return tf.graph_util.import_graph_def(graph_def, input_map={"x:0": x}, return_elements=["y:0"])[0]

    return run.get_concrete_function()


@pytest.mark.parametrize("scale_after_normalization", [True, False])
def test_rewritten_batch_norm_computes_the_formula(scale_after_normalization):
    graph_def, params = _batch_norm_graph(scale_after_normalization)
    fixed, fixes = legacy_ops_rewritten(graph_def)
    assert [(f.what, f.nodes) for f in fixes] == [("BatchNormWithGlobalNormalization", ("y",))]
    assert {n.op for n in fixed.node} == {"Placeholder", "Const", "Sub", "AddV2", "Rsqrt", "Mul"}
    assert fixed.versions.producer == OLD_PRODUCER
    x = np.random.default_rng(0).normal(0, 2, (5, 3, 3, 4)).astype(np.float32)
    got = _function_of(fixed)(x).numpy()
    np.testing.assert_allclose(got, _expected_batch_norm(x, params, scale_after_normalization),
                               rtol=1e-5, atol=1e-5)


def test_old_graph_converts_to_tflite_only_after_the_rewrite():
    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter

    graph_def, params = _batch_norm_graph(True)
    with pytest.raises(Exception, match="BatchNormWithGlobalNormalization"):
        tf.lite.TFLiteConverter.from_concrete_functions([_function_of(graph_def)]).convert()
    fixed, _ = legacy_ops_rewritten(graph_def)
    model = tf.lite.TFLiteConverter.from_concrete_functions([_function_of(fixed)]).convert()
    interp = Interpreter(model_content=model)
    interp.resize_tensor_input(0, [2, 3, 3, 4])
    interp.allocate_tensors()
    x = np.random.default_rng(1).normal(0, 2, (2, 3, 3, 4)).astype(np.float32)
    interp.set_tensor(interp.get_input_details()[0]["index"], x)
    interp.invoke()
    got = interp.get_tensor(interp.get_output_details()[0]["index"])
    np.testing.assert_allclose(got, _expected_batch_norm(x, params, True), rtol=1e-5, atol=1e-5)


def test_graph_without_legacy_ops_is_returned_as_is(tiny_graph):
    graph_def = load_graph_def(tiny_graph, fix=False)
    assert legacy_ops_rewritten(graph_def) == (graph_def, [])


def test_feature_subgraph_cuts_the_jpeg_head_and_frees_the_batch(tmp_path):
    path = tmp_path / "classify_image_graph_def.pb"
    path.write_bytes(lookalike_graph("inception_v3"))
    graph_def = load_graph_def(path)
    sub, fixes = feature_subgraph(graph_def, "Mul:0", "pool_3/_reshape:0")
    ops = {n.name: n.op for n in sub.node}
    assert ops["Mul"] == "Placeholder"
    for gone in ("DecodeJpeg/contents", "DecodeJpeg", "ResizeBilinear", "Sub", "softmax"):
        assert gone not in ops
    assert [f.into for f in fixes] == ["removed", "Reshape to [-1, ...]"]
    # The graph reshapes to a hard-coded [1, 2048]; batches of any size must pass now.
    ex = FeatureExtractor(path, get_backbone("inception_v3"))
    x = np.random.default_rng(0).uniform(0, 255, (3, 299, 299, 3)).astype(np.float32)
    batched = ex(x)
    assert batched.shape == (3, 2048)
    np.testing.assert_allclose(batched, np.concatenate([ex(x[i:i + 1]) for i in range(3)]),
                               rtol=1e-4, atol=1e-4)


# --- bottleneck found by shape ----------------------------------------------------------------


def test_renamed_bottleneck_is_found_by_shape(tmp_path):
    path = tmp_path / "inception_v4_2016_09_09_frozen.pb"
    path.write_bytes(inception_v4_graph(pool_name=V4_POOL_RENAMED))
    spec = resolve_spec(load_graph_def(path), get_backbone("inception_v4"))
    # [1,1536] PreLogitsFlatten has the size too; the pooling op wins.
    assert spec.bottleneck_tensor == f"{V4_POOL_RENAMED}:0" and spec.feature_size == 1536


def test_bottleneck_found_by_shape_is_recorded_in_the_manifest(tmp_path, tiny_images, tiny_holdout):
    archive = inception_v4_archive(inception_v4_graph(pool_name=V4_POOL_RENAMED))
    with serve_folder(write_mirror(tmp_path / "mirror", {"inception_v4": archive})) as url, edgepipe_log() as lines:
        run_chain(tmp_path / "run", until="retrain", backbone="inception_v4", images=tiny_images,
                  test_images=tiny_holdout, mirror=url, offline=True, epochs=5, cache_dir=tmp_path / "cache")
    info = _manifest(tmp_path / "run")["stages"]["fetch"]["info"]
    used = f"{V4_POOL_RENAMED}:0"
    assert info["bottleneck"] == {"requested": "InceptionV4/Logits/AvgPool_1a/AvgPool:0", "used": used,
                                  "found_by": "shape"}
    assert info["spec"]["bottleneck_tensor"] == used
    assert (f"note: bottleneck InceptionV4/Logits/AvgPool_1a/AvgPool:0 not in the graph; using {used} "
            "(found by shape)") in "\n".join(lines)


# --- edgepipe inspect -------------------------------------------------------------------------


def _inspect(path) -> str:
    """What ``edgepipe inspect PATH`` prints."""
    return describe(inspect_graph(path))


def test_inspect_lists_placeholders_and_pooled_tensors(tmp_path):
    path = tmp_path / "mobilenet_v2_1.4_224_frozen.pb"
    path.write_bytes(lookalike_graph("mobilenet_v2_1.4_224"))
    stdout = _inspect(path)
    lines = stdout.splitlines()
    assert re.search(r"^  input:0 +float32 +\[1, 224, 224, 3\]$", stdout, re.M), stdout
    pooled = [line for line in lines if line.startswith("  MobilenetV2/Logits/AvgPool:0 ")]
    assert len(pooled) == 1 and "[1, 1, 1, 1792]" in pooled[0] and "1792 features" in pooled[0]
    candidates = lines[lines.index("bottleneck candidates ([N,1,1,C] pooled or [N,C] flat, largest first):") + 1:]
    assert candidates[0] == pooled[0]  # largest first
    assert (f"try: --graph {path} --input-tensor input:0 --bottleneck-tensor "
            "MobilenetV2/Logits/AvgPool:0 --input-size 224") in stdout


def test_inspect_shows_where_to_feed_a_graph_that_decodes_jpeg(tmp_path):
    path = tmp_path / "classify_image_graph_def.pb"
    path.write_bytes(lookalike_graph("inception_v3"))
    stdout = _inspect(path)
    assert re.search(r"^  DecodeJpeg/contents:0 +string ", stdout, re.M), stdout
    assert re.search(r"^  Mul:0 +Mul +\[1, 299, 299, 3\]$", stdout, re.M), stdout
    assert re.search(r"^  pool_3/_reshape:0 +Reshape +\[1, 2048\] +2048 features$", stdout, re.M)
    assert "note: edgepipe rewrites BatchNormWithGlobalNormalization" in stdout


def test_inspect_of_a_file_that_is_not_a_graph_is_one_line(tmp_path):
    bad = tmp_path / "model.pb"
    bad.write_bytes(b"\xff\xfe not protobuf " * 10)
    with pytest.raises(GraphError) as err:
        inspect_graph(bad)
    assert err.value.exit_code == 2 and "\n" not in str(err.value)
    assert str(err.value).startswith(f"{bad} is not a frozen TensorFlow GraphDef")


@pytest.mark.slow
def test_inspect_of_a_file_that_is_not_a_graph_is_exit_2_on_the_command_line(tmp_path):
    """Through the command line: exit code 2 and the `error:` line last."""
    bad = tmp_path / "model.pb"
    bad.write_bytes(b"\xff\xfe not protobuf " * 10)
    proc = edgepipe("inspect", bad)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {bad} is not a frozen TensorFlow GraphDef")

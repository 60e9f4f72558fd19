"""Fine-tuning the last blocks of a frozen graph (``pipeline/finetune.py``): the cut, the trained
part, the constants written back, bad cuts, and a fine-tuned model through every converter and
runtime. The real MobileNet v1 0.25_224 comes from the mirror; the other families are the
catalog's look-alikes (``tests/helpers/lookalikes.py``)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.backbone import FeatureExtractor, resolve_spec
from pipeline.catalog import fine_tune_blocks, get_backbone
from pipeline.config import RunConfig, TrainConfig
from pipeline.errors import ConfigError
from pipeline.fetch import fetch
from pipeline.finetune import Tail, resolve_cut, trainable_constants, valid_cuts, with_constants
from pipeline.graph import load_graph_def
from pipeline.images import load_image
from tests.helpers.chain import edgepipe_log, report_rows, run_chain
from tests.helpers.cli import edgepipe
from tests.helpers.lookalikes import LOOKALIKES, lookalike_graph
from tests.helpers.world import FLOWERS, MIRROR, needs_shared, tiny_graph_options

V1 = "mobilenet_v1_0.25_224"
LAST_BLOCK_CUT = "MobilenetV1/MobilenetV1/Conv2d_12_pointwise/Relu6:0"


@pytest.fixture(scope="module")
def v1(tmp_path_factory):
    """The real 0.25_224 graph: (path, graph_def, resolved spec), and eight flower photos."""
    needs_shared(MIRROR)
    needs_shared(FLOWERS)
    path = fetch(get_backbone(V1), cache_dir=tmp_path_factory.mktemp("cache"), mirror=str(MIRROR),
                 progress=False).graph_path
    graph_def = load_graph_def(path)
    spec = resolve_spec(graph_def, get_backbone(V1))
    files = sorted((FLOWERS / "test").glob("*/*.jpg"))[::20]
    images = np.stack([load_image(f.read_bytes(), spec.preprocessing) for f in files])
    return path, graph_def, spec, images


def _frozen_tensor(graph_def, spec, images, tensor):
    """``tensor`` of the whole frozen graph (nothing trimmed, its logits and all), an image at a
    time (its batch is fixed to 1)."""
    import tensorflow as tf

    @tf.function
    def run(x):
        (t,) = tf.graph_util.import_graph_def(graph_def, input_map={spec.input_tensor: (x - 127.5) / 127.5},
                                              return_elements=[tensor], name="whole")
        return tf.reshape(t, [tf.shape(x)[0], -1])

    return np.concatenate([run(tf.constant(img[None])).numpy() for img in images])


def test_the_catalog_names_thirteen_blocks_for_mobilenet_v1_and_the_cut_before_the_last(v1):
    _, graph_def, spec, _ = v1
    assert len(fine_tune_blocks(V1)) == 13
    cut = resolve_cut(graph_def, spec, fine_tune_blocks(V1), fine_tune=1)
    assert cut.tensor == LAST_BLOCK_CUT and cut.shape == (7, 7, 256) and cut.bytes_per_image == 7 * 7 * 256 * 4
    two = resolve_cut(graph_def, spec, fine_tune_blocks(V1), fine_tune=2)
    assert two.tensor == "MobilenetV1/MobilenetV1/Conv2d_11_pointwise/Relu6:0" and two.shape == (14, 14, 128)
    assert cut.tensor in valid_cuts(graph_def, spec)


def test_activations_before_the_cut_are_the_frozen_graphs(v1):
    """What is cached (the prefix, as LiteRT and as TensorFlow run it) is the graph's own tensor."""
    path, graph_def, spec, images = v1
    cut = resolve_cut(graph_def, spec, fine_tune_blocks(V1), fine_tune=1)
    frozen = _frozen_tensor(graph_def, spec, images, cut.tensor)
    prefix = FeatureExtractor(path, cut.spec(spec))
    np.testing.assert_array_equal(np.concatenate([prefix(img[None]) for img in images]), frozen)
    np.testing.assert_allclose(prefix(images), frozen, atol=1e-4)  # batched: other kernels' rounding
    from pipeline.backbone import LiteRTFeatureExtractor

    # What is cached: LiteRT (XNNPACK) rounds float32 its own way, by about 1e-4 at 12 blocks deep.
    np.testing.assert_allclose(LiteRTFeatureExtractor(path, cut.spec(spec))(images), frozen, atol=5e-4)


def test_the_trained_part_before_training_gives_the_frozen_graphs_features(v1):
    path, graph_def, spec, images = v1
    cut = resolve_cut(graph_def, spec, fine_tune_blocks(V1), fine_tune=2)
    tail = Tail(graph_def, spec, cut)
    frozen = FeatureExtractor(path, spec)(images)
    got = tail.features(_frozen_tensor(graph_def, spec, images, cut.tensor))
    np.testing.assert_allclose(got, frozen, atol=1e-5)
    # The weights and batch-norm scales and offsets train; the statistics stay constants.
    names = set(tail.names)
    assert "MobilenetV1/Conv2d_13_pointwise/weights" in names
    assert "MobilenetV1/Conv2d_12_depthwise/depthwise_weights" in names
    assert "MobilenetV1/Conv2d_13_pointwise/BatchNorm/gamma" in names
    assert not any(n.endswith(("moving_mean", "moving_variance")) for n in names)
    assert tail.parameters == sum(v.size for v in trainable_constants(tail.graph_def).values())


def test_trained_values_written_back_into_the_graph_are_what_it_computes(v1):
    path, graph_def, spec, images = v1
    cut = resolve_cut(graph_def, spec, fine_tune_blocks(V1), fine_tune=1)
    tail = Tail(graph_def, spec, cut)
    changed = {k: v * 1.5 for k, v in tail.values().items()}
    for var, k in zip(tail.variables, tail.names):
        var.assign(changed[k])
    acts = _frozen_tensor(graph_def, spec, images, cut.tensor)
    patched = with_constants(graph_def, changed)
    tmp = path.parent / "patched.pb"
    tmp.write_bytes(patched.SerializeToString())
    frozen_before = FeatureExtractor(path, spec)(images)
    after = FeatureExtractor(tmp, spec)(images)
    np.testing.assert_allclose(after, tail.features(acts), atol=1e-4)
    assert np.abs(after - frozen_before).max() > 0.1
    with pytest.raises(ConfigError, match="not in the graph"):
        with_constants(graph_def, {"no/such/const": np.zeros(3, np.float32)})


@pytest.mark.parametrize("asked, why", [
    ("no/such/tensor:0", "is not in the graph"),
    ("MobilenetV1/Predictions/Reshape:0", "lies after the bottleneck"),
    ("MobilenetV1/Logits/AvgPool_1a/AvgPool:0", "is the bottleneck itself"),
    ("MobilenetV1/Conv2d_13_pointwise/weights:0", "is not on the way from input:0"),
])
def test_a_bad_cut_is_one_line_naming_it_and_the_nearest_valid_cuts(v1, asked, why):
    _, graph_def, spec, _ = v1
    with pytest.raises(ConfigError) as err:
        resolve_cut(graph_def, spec, (), fine_tune_from=asked)
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"--fine-tune-from {asked}: {why}")
    suggested = text.split("nearest valid cuts: ")[1].split(", ")
    assert suggested and all(s in valid_cuts(graph_def, spec) for s in suggested)
    if "after" in why or "itself" in why:
        assert LAST_BLOCK_CUT.replace("12_pointwise", "13_pointwise") in suggested  # the last block's output


def test_blocks_asked_of_a_graph_the_catalog_names_none_for_are_one_line_naming_valid_cuts(v1):
    _, graph_def, spec, _ = v1
    with pytest.raises(ConfigError) as err:
        resolve_cut(graph_def, spec, (), fine_tune=2)
    text = str(err.value)
    assert "\n" not in text and text.startswith("--fine-tune 2: the catalog names no blocks for")
    suggested = text.split("e.g. ")[1].split(", ")
    assert suggested and all(s in valid_cuts(graph_def, spec) for s in suggested)


@pytest.mark.slow  # a process of its own: 5-8 s
def test_a_bad_cut_on_the_command_line_exits_2_before_any_extraction(tmp_path, monkeypatch):
    needs_shared(MIRROR)
    needs_shared(FLOWERS)
    monkeypatch.setenv("EDGEPIPE_MIRROR", str(MIRROR))  # the subprocess inherits it
    out = tmp_path / "run"
    result = edgepipe("retrain", "--images", FLOWERS / "train", "--out", out, "--backbone", V1,
                      "--fine-tune-from", "MobilenetV1/Predictions/Reshape:0", "--cache-dir", tmp_path / "cache",
                      "--quiet")
    assert result.returncode == 2, result.stderr
    line = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert len(line) == 1 and "lies after the bottleneck" in line[0] and "Conv2d_13_pointwise/Relu6:0" in line[0]
    assert not (tmp_path / "cache" / "bottlenecks").exists() or not any((tmp_path / "cache" / "bottlenecks").rglob("*.npy"))


def test_fine_tune_options_are_checked_before_any_work(tmp_path):
    images = tmp_path / "images"
    (images / "a").mkdir(parents=True)
    too_many = RunConfig(out=tmp_path / "r", images=images, backbone=V1, train=TrainConfig(fine_tune=20)).problems()
    assert any("--fine-tune 20: mobilenet_v1_0.25_224 has 13 blocks" in p for p in too_many)
    both = TrainConfig(fine_tune=1, fine_tune_from="x:0").problems()
    assert any("give one" in p for p in both)
    assert TrainConfig(fine_tune=-1).problems() and TrainConfig(fine_tune=1, fine_tune_epochs=0).problems()


def test_a_run_that_does_not_fine_tune_keeps_its_fingerprint():
    assert "fine_tune" not in TrainConfig().to_dict()
    assert TrainConfig(fine_tune=2).to_dict()["fine_tune"] == 2


@pytest.mark.parametrize("name", list(LOOKALIKES))
def test_the_last_block_of_every_catalog_family_cuts_and_trains(tmp_path, name):
    """The look-alike v2 and Inception graphs (old ops, a JPEG head, unfused batch norm) cut where
    the catalog's blocks say, and their trained part starts as the frozen graph."""
    path = tmp_path / "graph.pb"
    path.write_bytes(lookalike_graph(name))
    graph_def = load_graph_def(path)
    spec = resolve_spec(graph_def, get_backbone(name))
    cut = resolve_cut(graph_def, spec, fine_tune_blocks(name), fine_tune=1)
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (2, spec.input_size, spec.input_size, 3)).astype(np.float32)
    acts = FeatureExtractor(path, cut.spec(spec))(images)
    np.testing.assert_allclose(Tail(graph_def, spec, cut).features(acts), FeatureExtractor(path, spec)(images),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_a_fine_tuned_model_passes_every_converter_and_runtime(tmp_path):
    """flowers8 on the real 0.25_224, its last block fine-tuned: every TFLite variant in both
    runtimes and both TF.js bundles agree with the SavedModel, which says what training said."""
    needs_shared(MIRROR)
    needs_shared(FLOWERS)
    out = tmp_path / "run"
    with edgepipe_log() as lines:
        run_chain(out, images=FLOWERS / "train", test_images=FLOWERS / "test", backbone=V1, mirror=str(MIRROR),
                  offline=True, cache_dir=tmp_path / "cache", fine_tune=1, fine_tune_epochs=3,
                  runtimes=["tflite-runtime", "ai-edge-litert", "tfjs-wasm"])
    rows = report_rows(out)
    assert len([k for k in rows if k[0].startswith("tflite-")]) == 14
    assert ("tfjs-float32", "tfjs-wasm") in rows and ("tfjs-float16", "tfjs-wasm") in rows
    assert all(r["passed"] for r in rows.values()), [k for k, r in rows.items() if not r["passed"]]
    metrics = json.loads((out / "retrain" / "metrics.json").read_text())
    ft = metrics["fine_tune"]
    assert ft["tensor"] == LAST_BLOCK_CUT and ft["trained_weights"] > 60_000 and len(metrics["history"]["epoch"]) == 3
    assert abs(metrics["test"]["accuracy"] - rows[("savedmodel", "tensorflow")]["accuracy"]) < 0.01
    assert (out / "retrain" / "tail.npz").exists()
    assert any("fine-tuned" in line and "after " + LAST_BLOCK_CUT in line for line in lines)
    # The exported graph is not the frozen one: the trained blocks went in.
    with np.load(out / "retrain" / "tail.npz") as tail:
        assert "MobilenetV1/Conv2d_13_pointwise/weights" in tail.files
    # Head only again: the trained blocks are gone, and the run re-exports.
    with edgepipe_log() as lines:
        run_chain(out, until="export", fine_tune=0)
    assert not (out / "retrain" / "tail.npz").exists()
    assert "fine_tune" not in json.loads((out / "retrain" / "metrics.json").read_text())


def test_fine_tuning_a_users_own_graph_from_a_tensor(tiny_graph, tiny_images, tiny_holdout, tmp_path):
    """--graph with --fine-tune-from: the first convolution's output is cached, the second
    convolution trains, and the exported SavedModel is the trained graph."""
    out = tmp_path / "run"
    run_chain(out, until="export", images=tiny_images, test_images=tiny_holdout, cache_dir=tmp_path / "cache",
              fine_tune_from="Relu6:0", fine_tune_epochs=3, epochs=20, **tiny_graph_options(tiny_graph))
    metrics = json.loads((out / "retrain" / "metrics.json").read_text())
    assert metrics["fine_tune"]["tensor"] == "Relu6:0" and metrics["fine_tune"]["shape"] == [16, 16, 16]
    assert metrics["bottlenecks"]["computed"] > 0
    with np.load(out / "retrain" / "tail.npz") as tail:
        assert sorted(tail.files) == ["Const_2"]  # the second convolution's kernel (its bias-free ReLU6)
        trained = tail["Const_2"]
    frozen = load_graph_def(tiny_graph)
    before = trainable_constants(frozen)["Const_2"]
    assert np.abs(trained - before).max() > 0
    # The SavedModel computes the trained graph: its features are the patched graph's.
    import tensorflow as tf

    from pipeline.export import SIGNATURE_KEY

    serve = tf.saved_model.load(str(out / "export" / "savedmodel")).signatures[SIGNATURE_KEY]
    images = np.random.default_rng(1).uniform(0, 255, (3, 32, 32, 3)).astype(np.float32)
    patched = tmp_path / "patched.pb"
    patched.write_bytes(with_constants(frozen, {"Const_2": trained}).SerializeToString())
    spec = resolve_spec(load_graph_def(patched), RunConfig(out=out).with_options(**tiny_graph_options(tiny_graph)).backbone_spec())
    from pipeline.head import Head

    head = Head.from_npz(np.load(out / "retrain" / "head.npz"))
    np.testing.assert_allclose(serve(images=tf.constant(images))["probabilities"].numpy(),
                               head.probabilities(FeatureExtractor(patched, spec)(images)), atol=1e-5)


def test_without_validation_images_the_log_claims_no_validation_accuracy(tiny_graph, tiny_images, tiny_holdout,
                                                                        tmp_path):
    with edgepipe_log() as lines:
        run_chain(tmp_path / "run", until="retrain", images=tiny_images, test_images=tiny_holdout,
                  cache_dir=tmp_path / "cache", validation_pct=0, fine_tune_from="Relu6:0", fine_tune_epochs=1,
                  epochs=5, **tiny_graph_options(tiny_graph))
    tuned = [line for line in lines if line.startswith("retrain: fine-tuned")]
    assert len(tuned) == 1 and "validation" not in tuned[0], tuned


@pytest.mark.slow
def test_fine_tuning_on_beam_trains_the_same_blocks_from_the_same_entries(tiny_graph, tiny_images, tiny_holdout,
                                                                          tmp_path):
    options = dict(until="retrain", images=tiny_images, test_images=tiny_holdout, fine_tune_from="Relu6:0",
                   fine_tune_epochs=3, epochs=20, **tiny_graph_options(tiny_graph))
    run_chain(tmp_path / "local", cache_dir=tmp_path / "c1", **options)
    run_chain(tmp_path / "beam", cache_dir=tmp_path / "c2", engine="beam",
              beam_options=["--direct_running_mode=multi_processing", "--direct_num_workers=2"], **options)
    for name in ("tail.npz", "head.npz", "split.json"):
        assert (tmp_path / "local" / "retrain" / name).read_bytes() == (tmp_path / "beam" / "retrain" / name).read_bytes()


def test_a_torn_or_foreign_progress_file_changes_nothing_and_training_starts_again(tmp_path):
    import tensorflow as tf

    from pipeline.finetune import Progress
    from pipeline.head import Patience

    def fresh():
        return {"w": [tf.Variable(np.zeros((2, 3), np.float32)), tf.Variable(np.zeros(3, np.float32))]}

    path = tmp_path / "progress.npz"
    saved = fresh()
    for v in saved["w"]:
        v.assign(v + 1)
    rng, gen = np.random.default_rng(1), tf.random.Generator.from_seed(1)
    Progress(path, ["job"], saved).save(3, rng, gen, {"epoch": [1, 2, 3]}, Patience(0))

    back, history = fresh(), {}
    assert Progress(path, ["job"], back).restore(np.random.default_rng(0), gen, history, Patience(0)) == 3
    assert all(np.array_equal(v.numpy(), w.numpy()) for v, w in zip(back["w"], saved["w"])) and history["epoch"] == [1, 2, 3]
    other = fresh()
    assert Progress(path, ["another job"], other).restore(rng, gen, {}, Patience(0)) == 0
    path.write_bytes(path.read_bytes()[:200])  # torn
    torn = fresh()
    assert Progress(path, ["job"], torn).restore(rng, gen, {}, Patience(0)) == 0
    assert all(not v.numpy().any() for v in [*other["w"], *torn["w"]])

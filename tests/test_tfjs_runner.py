"""The TF.js wasm runner on tiny models converted by the real tensorflowjs converter: edgepipe-style
SavedModel bundles, and graph and layers models of a Keras classifier as other tools make them."""
from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.runners import tfjs_node
from pipeline.runners.base import RuntimeFailed, Tensors
from pipeline.runners.tfjs_node import TfjsWasmRunner
from tests.helpers import tfjs_models

LABELS = ["daisy", "rose", "tulip", "sunflower"]
SIZE = 8


@pytest.fixture(scope="module")
def node_ready() -> None:
    """Fails, saying what to install, where Node or the runner's npm packages are missing
    (`make test` installs them; a skip here would hide an untested runtime)."""
    try:
        tfjs_node.ensure_node_modules()
    except RuntimeFailed as err:
        pytest.fail(str(err))


def _tiny_classifier(tf, outputs: tuple[str, ...]):
    """Mean RGB -> fixed linear layer: deterministic, and logits differ visibly from softmax."""

    class Tiny(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            weights = np.linspace(-0.03, 0.03, 3 * len(LABELS), dtype=np.float32)
            self.kernel = tf.Variable(weights.reshape(3, len(LABELS)))
            self.bias = tf.Variable(np.array([0.1, -0.2, 0.3, 0.0], dtype=np.float32))

        @tf.function(input_signature=[tf.TensorSpec([None, SIZE, SIZE, 3], tf.float32, "images")])
        def serve(self, images):
            logits = tf.reduce_mean(images, axis=[1, 2]) @ self.kernel + self.bias
            named = {"probabilities": tf.nn.softmax(logits), "logits": logits}
            return {key: named[key] for key in outputs}

    return Tiny()


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    """SavedModels and their TF.js conversions, built once for the module."""
    import tensorflow as tf

    with pytest.MonkeyPatch.context() as patch:
        # tensorflowjs imports tensorflow_decision_forests, which imports IPython (not installed)
        # to show a welcome banner whenever sys.stdout is not the terminal, as under pytest.
        patch.setenv("TFDF_DISABLE_WELCOME_MESSAGE", "1")
        from tensorflowjs.converters.tf_saved_model_conversion_v2 import convert_tf_saved_model

    root = tmp_path_factory.mktemp("tfjs")
    made = {}
    heads = {"two_heads": ("probabilities", "logits"), "one_head": ("probabilities",)}
    for name, outputs in heads.items():
        module = _tiny_classifier(tf, outputs)
        made[f"saved_{name}"] = root / f"saved_{name}"
        signatures = {"serving_default": module.serve}
        tf.saved_model.save(module, str(made[f"saved_{name}"]), signatures=signatures)

    conversions = {
        "float32": ("two_heads", None, True),
        "float16": ("two_heads", {"float16": True}, True),
        "uint8": ("two_heads", {"uint8": True}, True),
        "unnamed": ("two_heads", None, False),
        "one_head": ("one_head", None, False),
    }
    for name, (saved, quantization, structured) in conversions.items():
        made[name] = root / f"tfjs_{name}"
        convert_tf_saved_model(
            str(made[f"saved_{saved}"]),
            str(made[name]),
            quantization_dtype_map=quantization,
            use_structured_outputs_names=structured,
            # The converter adds structuredOutputKeys to this dict in place: pass a fresh one.
            metadata={"labels": list(LABELS)},
        )
    return made


def _reference(saved: Path, images: np.ndarray) -> dict[str, np.ndarray]:
    import tensorflow as tf

    serve = tf.saved_model.load(str(saved)).signatures["serving_default"]
    return {key: value.numpy() for key, value in serve(images=tf.constant(images)).items()}


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, SIZE, SIZE, 3)).astype(np.float32)


@pytest.mark.parametrize(
    ("bundle", "atol"), [("float32", 1e-5), ("float16", 1e-3), ("uint8", 1e-2)]
)
def test_probabilities_match_saved_model(node_ready, bundles, bundle, atol):
    images = _images(6)
    got = TfjsWasmRunner().predict(bundles[bundle], images, timeout_s=60)
    want = _reference(bundles["saved_two_heads"], images)["probabilities"]
    assert got.probabilities.shape == (6, len(LABELS))
    assert got.probabilities.dtype == np.float32
    np.testing.assert_allclose(got.probabilities, want, atol=atol)
    assert 0 < got.latency_ms < 1000


def test_output_key_picks_logits_not_probabilities(node_ready, bundles):
    images = _images(3, seed=1)
    got = TfjsWasmRunner(output_key="logits").predict(bundles["float32"], images, timeout_s=60)
    want = _reference(bundles["saved_two_heads"], images)
    np.testing.assert_allclose(got.probabilities, want["logits"], atol=1e-4)
    assert not np.allclose(got.probabilities, want["probabilities"], atol=0.1)


def test_single_output_keeps_its_signature_key(node_ready, bundles):
    images = _images(2, seed=2)
    got = TfjsWasmRunner().predict(bundles["one_head"], images, timeout_s=60)
    want = _reference(bundles["saved_one_head"], images)["probabilities"]
    np.testing.assert_allclose(got.probabilities, want, atol=1e-5)


def test_unnamed_outputs_list_the_keys_that_exist(node_ready, bundles):
    # Without use_structured_outputs_names the converter keys equal-shaped outputs by tensor name.
    with pytest.raises(RuntimeFailed) as caught:
        TfjsWasmRunner().predict(bundles["unnamed"], _images(1), timeout_s=60)
    message = str(caught.value)
    assert "no signature output 'probabilities'" in message
    assert "Identity:0, Identity_1:0" in message
    assert "use_structured_outputs_names=True" in message


def test_truncated_shard_is_reported(node_ready, bundles, tmp_path):
    broken = shutil.copytree(bundles["float32"], tmp_path / "broken")
    shard = next(broken.glob("*.bin"))
    shard.write_bytes(shard.read_bytes()[:-8])
    expected = r"exit status 1\): run\.mjs: weight shards .* truncated"
    with pytest.raises(RuntimeFailed, match=expected):
        TfjsWasmRunner().predict(broken, _images(1), timeout_s=60)


def test_garbage_model_json_is_reported(node_ready, bundles, tmp_path):
    broken = shutil.copytree(bundles["float32"], tmp_path / "broken")
    (broken / "model.json").write_text('{"format": "graph-model", "modelTop')
    with pytest.raises(RuntimeFailed, match=r"model\.json is not valid JSON"):
        TfjsWasmRunner().predict(broken, _images(1), timeout_s=60)


def test_folder_without_model_json_fails_before_starting_node(node_ready, tmp_path):
    with pytest.raises(RuntimeFailed, match="has no model.json"):
        TfjsWasmRunner().predict(tmp_path, _images(1))


def test_tensors_output_wins_over_output_key(node_ready, bundles):
    images = _images(2, seed=3)
    runner = TfjsWasmRunner(output_key="logits")
    tensors = Tensors(output="probabilities")
    got = runner.predict(bundles["float32"], images, timeout_s=60, tensors=tensors)
    want = _reference(bundles["saved_two_heads"], images)["probabilities"]
    np.testing.assert_allclose(got.probabilities, want, atol=1e-5)
    assert runner.last_summary["output"] == "probabilities"


KERAS_LABELS = ["cat", "dog", "bird"]
KERAS_SIZE = 32


@pytest.fixture(scope="module")
def keras_models(tmp_path_factory) -> dict:
    """A Keras classifier, its two-output and non-image relatives, and their TF.js conversions."""
    root = tmp_path_factory.mktemp("keras_tfjs")
    classifier = tfjs_models.keras_classifier(KERAS_SIZE, len(KERAS_LABELS))
    two_outputs = tfjs_models.keras_two_outputs(classifier)
    vector = tfjs_models.keras_vector_model(classes=len(KERAS_LABELS))
    made = {"classifier": classifier, "two_outputs": two_outputs}
    for name, model in {"classifier": classifier, "two_outputs": two_outputs, "vector": vector}.items():
        made[f"layers_{name}"] = tfjs_models.write_layers_model(
            model, root / f"layers_{name}", KERAS_LABELS, KERAS_SIZE)
    for name, model in {"classifier": classifier, "two_outputs": two_outputs}.items():
        made[f"graph_{name}"] = tfjs_models.write_graph_model(model, root / f"graph_{name}")
    made["graph_float16"] = tfjs_models.write_graph_model(classifier, root / "graph_float16", "float16")
    return made


def _keras_outputs(model, images: np.ndarray) -> dict[str, np.ndarray]:
    outputs = model(images, training=False)
    if isinstance(outputs, dict):
        return {key: np.asarray(value) for key, value in outputs.items()}
    return {"scores": np.asarray(outputs)}


def test_layers_model_agrees_with_keras(node_ready, keras_models):
    images = tfjs_models.sample_inputs(5, KERAS_SIZE)
    runner = TfjsWasmRunner()
    got = runner.predict(keras_models["layers_classifier"], images, timeout_s=60)
    want = _keras_outputs(keras_models["classifier"], images)["scores"]
    np.testing.assert_allclose(got.probabilities, want, atol=1e-5)
    assert not np.allclose(want, want[:, :1], atol=0.05)  # the softmax is not flat: a real comparison
    used = {key: runner.last_summary[key] for key in ("format", "input", "output")}
    assert used == {"format": "layers-model", "input": "image", "output": "scores"}
    assert len(got.latencies_ms) == 30


def test_layers_model_has_teachable_machines_layout(keras_models):
    folder = keras_models["layers_classifier"]
    assert sorted(p.name for p in folder.iterdir()) == ["metadata.json", "model.json", "weights.bin"]
    metadata = json.loads((folder / "metadata.json").read_text())
    assert (metadata["labels"], metadata["imageSize"]) == (KERAS_LABELS, KERAS_SIZE)
    assert {"tfjsVersion", "modelName", "timeStamp"} <= metadata.keys()
    model_json = json.loads((folder / "model.json").read_text())
    assert model_json["format"] == "layers-model"
    assert model_json["weightsManifest"][0]["paths"] == ["weights.bin"]


@pytest.mark.parametrize(("bundle", "atol"), [("graph_classifier", 1e-5), ("graph_float16", 1e-3)])
def test_graph_model_agrees_with_keras(node_ready, keras_models, bundle, atol):
    images = tfjs_models.sample_inputs(5, KERAS_SIZE, seed=1)
    runner = TfjsWasmRunner()
    got = runner.predict(keras_models[bundle], images, timeout_s=60)
    want = _keras_outputs(keras_models["classifier"], images)["scores"]
    np.testing.assert_allclose(got.probabilities, want, atol=atol)
    used = {key: runner.last_summary[key] for key in ("format", "input", "output")}
    # model.export keys the signature by the Input's name and calls a lone output output_0.
    assert used == {"format": "graph-model", "input": "image", "output": "output_0"}


def test_graph_model_without_a_signature_uses_its_placeholder(node_ready, keras_models, tmp_path):
    # Older converters wrote no signature: the graph's placeholder and sink stand in for it.
    bundle = shutil.copytree(keras_models["graph_classifier"], tmp_path / "unsigned")
    model_json = json.loads((bundle / "model.json").read_text())
    del model_json["signature"]
    (bundle / "model.json").write_text(json.dumps(model_json))
    images = tfjs_models.sample_inputs(3, KERAS_SIZE, seed=2)
    runner = TfjsWasmRunner()
    got = runner.predict(bundle, images, timeout_s=60)
    want = _keras_outputs(keras_models["classifier"], images)["scores"]
    np.testing.assert_allclose(got.probabilities, want, atol=1e-5)
    assert (runner.last_summary["input"], runner.last_summary["output"]) == ("image", "Identity")


@pytest.mark.parametrize(
    ("bundle", "name", "want_key"),
    [
        ("layers_two_outputs", "embedding", "embedding"),
        ("layers_two_outputs", "scores", "scores"),
        ("graph_two_outputs", "embedding", "embedding"),
        ("graph_two_outputs", "Identity_1:0", "scores"),  # the converter's tensor name for it
    ],
)
def test_output_chosen_by_name(node_ready, keras_models, bundle, name, want_key):
    images = tfjs_models.sample_inputs(4, KERAS_SIZE, seed=3)
    runner = TfjsWasmRunner()
    got = runner.predict(keras_models[bundle], images, timeout_s=60, tensors=Tensors(output=name))
    want = _keras_outputs(keras_models["two_outputs"], images)[want_key]
    np.testing.assert_allclose(got.probabilities, want, atol=1e-5)
    assert runner.last_summary["output"] == name


@pytest.mark.parametrize(
    ("bundle", "kind"), [("layers_two_outputs", "output"), ("graph_two_outputs", "signature output")]
)
def test_several_outputs_and_none_chosen_lists_the_names(node_ready, keras_models, bundle, kind):
    runner = TfjsWasmRunner()
    with pytest.raises(RuntimeFailed) as caught:
        runner.predict(keras_models[bundle], tfjs_models.sample_inputs(1, KERAS_SIZE), timeout_s=60)
    message = str(caught.value)
    assert f"no {kind} 'probabilities' and 2 {kind}s to choose from: " in message
    assert "embedding" in message and "scores" in message
    assert "choose one with --output NAME" in message
    assert runner.last_summary is None


@pytest.mark.parametrize(
    ("bundle", "tensors", "expected"),
    [
        ("layers_classifier", Tensors(output="logits"), "no output 'logits'; the model has: scores"),
        ("layers_classifier", Tensors(input="pixels"), "no input 'pixels'; the model has: image"),
        ("graph_classifier", Tensors(output="logits"),
         "no signature output 'logits'; the model has: output_0"),
    ],
)
def test_unknown_name_lists_the_names(node_ready, keras_models, bundle, tensors, expected):
    with pytest.raises(RuntimeFailed, match=re.escape(expected)):
        TfjsWasmRunner().predict(keras_models[bundle], tfjs_models.sample_inputs(1, KERAS_SIZE),
                                 timeout_s=60, tensors=tensors)


def test_layers_model_with_a_non_image_input_fails_clearly(node_ready, keras_models):
    expected = "input 'vector' has shape [-1,10], not an image batch [N,H,W,3]"
    with pytest.raises(RuntimeFailed, match=re.escape(expected)):
        TfjsWasmRunner().predict(keras_models["layers_vector"], tfjs_models.sample_inputs(1, KERAS_SIZE),
                                 timeout_s=60)


def test_images_of_the_wrong_size_are_reported(node_ready, keras_models):
    with pytest.raises(RuntimeFailed, match="input 'image' takes 32x32 images, the feed holds 8x8"):
        TfjsWasmRunner().predict(keras_models["graph_classifier"], tfjs_models.sample_inputs(1, 8),
                                 timeout_s=60)


def _fake_runner(monkeypatch, tmp_path: Path, source: str) -> None:
    script = tmp_path / "fake_run.mjs"
    script.write_text(source)
    monkeypatch.setattr(tfjs_node, "RUN_SCRIPT", script)
    (tmp_path / "model.json").write_text("{}")


def test_hanging_node_is_killed_at_the_timeout(node_ready, monkeypatch, tmp_path):
    _fake_runner(monkeypatch, tmp_path, "setTimeout(() => {}, 60_000);\n")
    start = time.monotonic()
    with pytest.raises(RuntimeFailed, match=r"timed out after 1\.5 s"):
        TfjsWasmRunner().predict(tmp_path, _images(1), timeout_s=1.5)
    assert time.monotonic() - start < 10


def test_crash_reports_the_stderr_tail(node_ready, monkeypatch, tmp_path):
    crash = "console.error('noise'); console.error('boom: bad op'); process.exit(3);\n"
    _fake_runner(monkeypatch, tmp_path, crash)
    with pytest.raises(RuntimeFailed, match=r"exit status 3\): noise \| boom: bad op"):
        TfjsWasmRunner().predict(tmp_path, _images(1))


@pytest.mark.parametrize(
    "stdout",
    ["hello\n", '{"shape": [1], "latency_ms": 1}\n', '{"shape": [1, 4], "latency_ms": 1}\n'],
    ids=["not-json", "bad-shape", "no-output-file"],
)
def test_garbage_result_is_reported(node_ready, monkeypatch, tmp_path, stdout):
    _fake_runner(monkeypatch, tmp_path, f"process.stdout.write({stdout!r});\n")
    with pytest.raises(RuntimeFailed, match="tfjs-wasm (printed no result|wrote no bytes)"):
        TfjsWasmRunner().predict(tmp_path, _images(1))


def test_missing_node_modules_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(tfjs_node, "NODE_DIR", tmp_path)
    monkeypatch.setattr(tfjs_node.shutil, "which", lambda _: "/usr/bin/node")
    with pytest.raises(RuntimeFailed) as caught:
        tfjs_node.ensure_node_modules()
    assert "@tensorflow/tfjs, @tensorflow/tfjs-backend-wasm not installed" in str(caught.value)
    assert "npm ci --prefix pipeline/runners/tfjs" in str(caught.value)


def test_missing_node_says_so(monkeypatch):
    monkeypatch.setattr(tfjs_node.shutil, "which", lambda _: None)
    with pytest.raises(RuntimeFailed, match=r"`node` is not on PATH.*make setup"):
        tfjs_node.ensure_node_modules()

"""The TF.js wasm runner on a tiny SavedModel converted by the real tensorflowjs converter."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.runners import tfjs_node
from pipeline.runners.base import RuntimeFailed
from pipeline.runners.tfjs_node import TfjsWasmRunner

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

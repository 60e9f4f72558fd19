"""TF.js models in real headless Chromium on each backend (``pipeline.runners.chromium``): a tiny
Keras classifier as a graph model and as a layers model must agree with Keras on wasm, WebGL and
WebGL with f16 textures; WebGPU either runs or fails saying why; a backend tfjs quietly swaps for
another fails. Chromium comes from `make browser`; a missing one fails these tests (``browser_ready``).
"""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.runners import chromium
from pipeline.runners.base import RunSettings, RuntimeFailed, Tensors
from pipeline.runners.chromium import ChromiumRunner
from pipeline.runners.feed import FeedFile
from pipeline.runners.tfjs_node import TfjsWasmRunner, npm_version
from pipeline.types import Runtime
from tests.helpers import tfjs_models

# Slow: a Chromium per backend and real pages (about 45 s); still run by `make test` and CI.
pytestmark = [pytest.mark.browser, pytest.mark.slow]

LABELS = ["daisy", "rose", "tulip"]
SIZE = 32
IMAGES = 16
SETTINGS = RunSettings(batch=IMAGES, latency_runs=3)  # one batch: SwiftShader compiles shaders per shape
# Measured on Chromium 156 (SwiftShader's WebGL 2, float textures), four seeds of this model:
# wasm and webgl float32 within 5.4e-7 of Keras; webgl with f16 textures 4.0e-4 to 6.3e-4.
FLOAT_TOLERANCE = 1e-5
F16_TOLERANCE = 2e-3
FLOAT_RUNTIMES = (Runtime.CHROMIUM_WASM, Runtime.CHROMIUM_WEBGL)
RUNTIMES = (*FLOAT_RUNTIMES, Runtime.CHROMIUM_WEBGL_F16)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """The classifier, its graph and layers models, images in [-1, 1] and Keras's answers."""
    root = tmp_path_factory.mktemp("chromium")
    model = tfjs_models.keras_classifier(size=SIZE, classes=len(LABELS))
    images = tfjs_models.sample_inputs(IMAGES, size=SIZE)
    return {
        "graph": tfjs_models.write_graph_model(model, root / "graph"),
        "layers": tfjs_models.write_layers_model(model, root / "layers", LABELS, SIZE),
        "images": images,
        "feed": FeedFile.from_array(root / "images.f32", images),
        "expected": model.predict(images, verbose=0),
    }


@pytest.fixture(scope="module")
def runners(browser_ready):
    """One runner per runtime for the module: each keeps its Chromium and page across calls."""
    made = {rt: ChromiumRunner(rt) for rt in chromium.BACKENDS}
    yield made
    for runner in made.values():
        runner.close()


def _tolerance(runtime: Runtime) -> float:
    return F16_TOLERANCE if runtime is Runtime.CHROMIUM_WEBGL_F16 else FLOAT_TOLERANCE


@pytest.mark.parametrize("runtime", RUNTIMES, ids=lambda rt: rt.value)
def test_a_graph_model_agrees_with_keras_on_each_backend(runners, tiny, runtime):
    runner = runners[runtime]
    prediction = runner.predict(tiny["graph"], tiny["feed"], settings=SETTINGS)

    np.testing.assert_allclose(prediction.probabilities, tiny["expected"], rtol=0, atol=_tolerance(runtime))
    assert len(prediction.latencies_ms) == SETTINGS.latency_runs
    summary = runner.last_summary
    assert summary["backend"] == chromium.BACKENDS[runtime].name
    assert (summary["format"], summary["input"], summary["output"]) == ("graph-model", "image", "output_0")
    assert summary["browser"].split(".")[0].isdigit()
    assert summary["blocked_requests"] == [] and summary["page_errors"] == []
    if runtime is Runtime.CHROMIUM_WASM:
        assert "WASM_HAS_SIMD_SUPPORT" in summary["flags"]
    else:
        assert summary["flags"]["WEBGL_VERSION"] == 2
        f16 = runtime is Runtime.CHROMIUM_WEBGL_F16
        assert summary["flags"]["WEBGL_FORCE_F16_TEXTURES"] is f16
        assert summary["flags"]["WEBGL_RENDER_FLOAT32_ENABLED"] is not f16
        assert summary["renderer"]


@pytest.mark.parametrize("runtime", RUNTIMES, ids=lambda rt: rt.value)
def test_a_layers_model_agrees_on_the_same_page(runners, tiny, runtime):
    runner = runners[runtime]
    if runner.last_summary is None:  # run alone: the graph model's test has not used this runner
        runner.predict(tiny["graph"], tiny["feed"], settings=SETTINGS)
    prediction = runner.predict(tiny["layers"], tiny["images"], settings=SETTINGS)

    np.testing.assert_allclose(prediction.probabilities, tiny["expected"], rtol=0, atol=_tolerance(runtime))
    assert (runner.last_summary["format"], runner.last_summary["output"]) == ("layers-model", "scores")
    # One Chromium and one page served the graph model and this one.
    assert (runner.last_summary["launches"], runner.last_summary["pages"]) == (1, 1)
    assert runner.last_summary["launch_ms"] is None and runner.last_summary["page_ms"] is None
    assert runner.last_summary["tensors_left"] == 0


def test_f16_textures_change_the_numbers(runners, tiny):
    """The flag reached tfjs: f16 results differ from float32 WebGL's by more than float rounding."""
    float32 = runners[Runtime.CHROMIUM_WEBGL].predict(tiny["graph"], tiny["feed"], settings=SETTINGS)
    f16 = runners[Runtime.CHROMIUM_WEBGL_F16].predict(tiny["graph"], tiny["feed"], settings=SETTINGS)
    assert np.abs(f16.probabilities - float32.probabilities).max() > 10 * FLOAT_TOLERANCE


def test_chromium_wasm_matches_its_twin_in_node(runners, tiny, browser_ready):
    twin = TfjsWasmRunner()
    in_node = twin.predict(tiny["graph"], tiny["feed"], settings=SETTINGS)
    runner = runners[Runtime.CHROMIUM_WASM]
    in_page = runner.predict(tiny["graph"], tiny["feed"], settings=SETTINGS)

    np.testing.assert_allclose(in_page.probabilities, in_node.probabilities, rtol=0, atol=1e-6)
    for key in ("format", "input", "output", "batch", "tfjs"):
        assert runner.last_summary[key] == twin.last_summary[key], key


def test_webgpu_runs_or_says_why(runners, tiny):
    """Chromium 156 offers a WebGPU adapter headless (SwiftShader's, with --enable-unsafe-webgpu),
    but tfjs's webgpu backend is a package of its own that package-lock.json does not hold."""
    runner = runners[Runtime.CHROMIUM_WEBGPU]
    status = chromium.status(Runtime.CHROMIUM_WEBGPU)
    if npm_version(chromium.WEBGPU_PACKAGE) is None:
        with pytest.raises(RuntimeFailed, match=r"@tensorflow/tfjs-backend-webgpu is not installed .*"
                                                r"Chromium offers (a|no) WebGPU adapter"):
            runner.predict(tiny["graph"], tiny["feed"], settings=SETTINGS)
        assert not status.ready and "tfjs-backend-webgpu is not installed" in status.detail
        assert status.setup.startswith("npm install --prefix pipeline/runners/tfjs @tensorflow/tfjs-backend-webgpu@")
    else:
        prediction = runner.predict(tiny["graph"], tiny["feed"], settings=SETTINGS)
        np.testing.assert_allclose(prediction.probabilities, tiny["expected"], rtol=0, atol=FLOAT_TOLERANCE)
        assert runner.last_summary["backend"] == "webgpu" and status.ready


def test_a_backend_that_fell_back_fails_the_row(tiny, browser_ready):
    """Without WebGL tfjs quietly runs wasm instead (a console warning); the runner refuses that."""
    runner = ChromiumRunner(Runtime.CHROMIUM_WEBGL, chromium_args=["--use-gl=disabled"])
    try:
        with pytest.raises(RuntimeFailed, match=r"asked for webgl, TF\.js runs wasm \(WebGL is not supported"):
            runner.predict(tiny["graph"], tiny["images"], settings=SETTINGS)
    finally:
        runner.close()
    assert runner.last_summary is None


def test_a_wrong_output_name_lists_the_names_and_the_runner_recovers(runners, tiny):
    runner = runners[Runtime.CHROMIUM_WASM]
    with pytest.raises(RuntimeFailed, match=r"no signature output 'logits'; the model has: output_0"):
        runner.predict(tiny["graph"], tiny["images"], settings=SETTINGS, tensors=Tensors(output="logits"))
    with pytest.raises(RuntimeFailed, match=r"timed out after 0\.001 s in Chromium"):
        runner.predict(tiny["graph"], tiny["images"], timeout_s=0.001, settings=SETTINGS)

    prediction = runner.predict(tiny["graph"], tiny["images"], settings=SETTINGS, tensors=Tensors(output="output_0"))
    np.testing.assert_allclose(prediction.probabilities, tiny["expected"], rtol=0, atol=FLOAT_TOLERANCE)
    # A failed job costs its page, not the browser.
    assert runner.last_summary["launches"] == 1 and runner.last_summary["page_ms"] is not None


def test_a_folder_without_model_json_fails_before_chromium(runners, tmp_path):
    with pytest.raises(RuntimeFailed, match="has no model.json"):
        runners[Runtime.CHROMIUM_WASM].predict(tmp_path, np.zeros((1, SIZE, SIZE, 3), np.float32))
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        runners[Runtime.CHROMIUM_WASM].predict(tmp_path, np.zeros((SIZE, SIZE, 3), np.float32))


@pytest.mark.parametrize("runtime, words", [
    (Runtime.CHROMIUM_WASM, "(wasm, SIMD, 1 thread)"),
    (Runtime.CHROMIUM_WEBGL, "(webgl, WebGL 2 via SwiftShader)"),
    (Runtime.CHROMIUM_WEBGL_F16, "(webgl, WebGL 2 via SwiftShader, f16 textures)"),
], ids=lambda v: v.value if isinstance(v, Runtime) else "")
def test_status_says_what_each_backend_runs_on(browser_ready, runtime, words):
    status = chromium.status(runtime)
    assert status.ready, status.detail
    assert status.version.startswith("Chromium ") and "@tensorflow/tfjs 4.22.0" in status.version
    assert status.version.endswith(words)


def test_status_without_chromium_says_how_to_install_it(tmp_path):
    found = chromium.probe(tmp_path / "no-chromium")
    assert "Chromium not found" in found["error"] and "make browser" in found["error"]

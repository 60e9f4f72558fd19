"""The shape of the code, checked: a cheap CLI import, no import circles, a runner registry
that covers every runtime, per-command options, a quiet console with library output in the run's
logs, golden images built once, and the README's Python example."""
from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "pipeline"
# absl / TensorFlow C++ log lines: "W0000 00:00:1796154631.775518    9397 file.cc:365] ..." and the
# older "2026-12-01 19:50:00.123456: I tensorflow/core/..." form.
CPP_LOG = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:[\d.]+\s+\d+ \S+:\d+\]|^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IWEF] ")
TINY_GRAPH_ARGS = ["--input-tensor", "input:0", "--bottleneck-tensor", "MobilenetV1/Logits/AvgPool_1a/AvgPool:0",
                   "--input-size", "32"]


def test_importing_the_cli_imports_neither_tensorflow_nor_scikit_learn():
    probe = ("import sys, pipeline.cli, pipeline.config, pipeline.stages; "
             "print(sorted({m.split('.')[0] for m in sys.modules} & {'tensorflow', 'sklearn', 'keras', 'matplotlib'}))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, check=True)
    assert done.stdout.strip() == "[]", done.stdout


def _imports(path: Path, module: str) -> set[str]:
    """The pipeline modules ``path`` imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m.split(".")[0] == "pipeline" and m != module}


def test_no_module_imports_a_module_that_imports_it_back():
    modules = {}
    for p in PACKAGE.rglob("*.py"):
        if "node_modules" in p.parts:
            continue
        parts = p.relative_to(REPO).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    edges = {m: {t for t in _imports(p, m) if t in modules} for m, p in modules.items()}
    cycles = []

    def visit(node, stack, on_stack, done):
        stack.append(node)
        on_stack.add(node)
        for nxt in edges[node]:
            if nxt in on_stack:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in done:
                visit(nxt, stack, on_stack, done)
        on_stack.discard(stack.pop())
        done.add(node)

    done: set[str] = set()
    for m in sorted(modules):
        if m not in done:
            visit(m, [], set(), done)
    assert len(modules) > 30 and sum(map(len, edges.values())) > 80  # the scan saw the package
    assert not cycles, [" -> ".join(c) for c in cycles]


def test_every_runtime_has_one_registry_row_and_runner():
    from pipeline.config import ALL_RUNTIMES
    from pipeline.runners import REGISTRY, Feed
    from pipeline.types import ArtifactKind, Runtime

    assert set(REGISTRY) == set(Runtime)
    assert set(ALL_RUNTIMES) < set(REGISTRY) and Runtime.TENSORFLOW not in ALL_RUNTIMES
    assert REGISTRY[Runtime.TENSORFLOW].accepts == {ArtifactKind.SAVEDMODEL, ArtifactKind.KERAS, ArtifactKind.GRAPH}
    # Every kind of model has somewhere to run.
    assert set().union(*(info.accepts for info in REGISTRY.values())) == set(ArtifactKind)
    # MediaPipe prepares pixels itself from the metadata: an app's preprocessing is not its own.
    assert REGISTRY[Runtime.MEDIAPIPE].feed is Feed.CONTRACT and REGISTRY[Runtime.LITERT].feed is Feed.APP
    for runtime, info in REGISTRY.items():
        runner = info.create(["a", "b"])
        assert runner.name == runtime.value
        assert callable(runner.predict) and callable(runner.unsupported)


@pytest.mark.parametrize("command, present, absent", [
    ("verify", ["--runtime", "--gate", "--stress", "--app-preprocessing", "--out"], ["--epochs", "--quant", "--images"]),
    ("retrain", ["--images", "--epochs", "--augment-copies", "--graph"], ["--runtime", "--quant", "--tfjs-shard-mb"]),
    ("quantize", ["--quant"], ["--tfjs", "--epochs", "--runtime"]),
    ("tfjs", ["--tfjs", "--tfjs-shard-mb"], ["--quant", "--epochs"]),
    ("run", ["--images", "--epochs", "--quant", "--tfjs", "--runtime", "--verbose"], []),
])
def test_each_command_lists_only_the_options_of_its_stages(command, present, absent):
    from typer.testing import CliRunner

    from pipeline.cli import app

    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "250", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    shown = set(re.findall(r"(--[a-z][a-z0-9-]*)", result.output))
    assert set(present) <= shown, set(present) - shown
    assert not set(absent) & shown, set(absent) & shown
    panels = {"verify": "Verification", "retrain": "Training", "quantize": "Conversion", "run": "Augmentation"}
    if command in panels:
        assert panels[command] in result.output


def test_a_stage_command_on_a_new_folder_says_how_to_start(tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    result = CliRunner().invoke(app, ["verify", "--out", str(tmp_path / "new")])
    assert result.exit_code == 2
    assert "holds no run yet; start it with `edgepipe run --images DIR" in result.output


@pytest.fixture(scope="module")
def noisy_run(tiny_graph, tiny_images, tiny_holdout, tmp_path_factory):
    """One CLI chain with TensorFlow's C++ logging on, as a user's environment has it."""
    root = tmp_path_factory.mktemp("console")
    env = {**os.environ, "EDGEPIPE_CACHE_DIR": str(root / "cache"), "TF_CPP_MIN_LOG_LEVEL": "0"}
    out = root / "run"
    argv = [sys.executable, "-m", "pipeline.cli", "run", "--images", str(tiny_images), "--test-images",
            str(tiny_holdout), "--out", str(out), "--epochs", "60", "--learning-rate", "0.05",
            "--quant", "float32", "--quant", "int8", "--tfjs", "float32", "--tfjs", "float16",
            "--runtime", "ai-edge-litert", "--graph", str(tiny_graph), *TINY_GRAPH_ARGS]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, env, done


@pytest.mark.chain
def test_the_console_shows_edgepipe_lines_and_the_logs_keep_the_library_output(noisy_run):
    out, _, done = noisy_run
    console = (done.stdout + done.stderr).splitlines()
    assert not [ln for ln in console if CPP_LOG.search(ln)], [ln for ln in console if CPP_LOG.search(ln)][:5]
    assert not [ln for ln in console if "tensorflow/" in ln or "oneDNN" in ln or "absl::" in ln]
    for stage in ("fetch", "retrain", "quantize", "tfjs", "verify"):
        assert f"{stage}: running" in done.stderr and f"{stage}: done in" in done.stderr
    assert re.search(r"^verify: tflite-int8 +ai-edge-litert +ok: agreement", done.stderr, re.M)
    assert "| tfjs-float16 | tfjs-wasm |" not in done.stdout and "| tflite-int8 | ai-edge-litert |" in done.stdout
    logs = {p.name: p.read_text(errors="replace") for p in (out / "logs").iterdir()}
    assert set(logs) >= {f"{s}.log" for s in ("fetch", "retrain", "export", "quantize", "tfjs", "verify")}
    # The converter's C++ lines went to the log, so there was noise to keep off the console.
    assert any(CPP_LOG.search(ln) for ln in logs["quantize.log"].splitlines()), logs["quantize.log"][:2000]


@pytest.mark.slow  # a second CLI process that imports TensorFlow (10 s)
@pytest.mark.chain
def test_verbose_shows_the_library_output_on_the_console(noisy_run):
    out, env, _ = noisy_run
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "quantize", "--out", str(out), "--quant", "float16",
                           "--verbose", "--quiet"], capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "quantize: float16.tflite" in done.stderr
    assert any(CPP_LOG.search(ln) for ln in done.stderr.splitlines()), done.stderr[-2000:]
    assert any(CPP_LOG.search(ln) for ln in (out / "logs" / "quantize.log").read_text().splitlines())


@pytest.mark.chain
def test_golden_images_are_built_once_and_every_bundle_carries_the_same(noisy_run):
    out = noisy_run[0]
    reference = {p.name: p.read_bytes() for p in (out / "quantize" / "golden").iterdir()}
    assert "golden.json" in reference and len(reference) >= 2
    for mode in ("float32", "float16"):
        copy = {p.name: p.read_bytes() for p in (out / "tfjs" / mode / "golden").iterdir()}
        assert copy == reference, mode
    assert json.loads(reference["golden.json"])["labels"] == ["blue sky", "green leaf", "red"]


def _readme_python_example() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has a ```python example"
    return blocks[0]


def test_the_readme_example_is_short_and_uses_only_the_public_api():
    code = _readme_python_example()
    lines = [ln for ln in code.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    assert len(lines) <= 6, lines
    import pipeline

    used = set(re.findall(r"pipeline\.([a-zA-Z_]+)", code))
    assert used and used <= set(pipeline.__all__), used - set(pipeline.__all__)


@pytest.mark.slow
@pytest.mark.chain
def test_the_readme_example_runs(tmp_path):
    code = _readme_python_example().replace('"runs/api"', repr(str(tmp_path / "api")))
    env = {**os.environ, "EDGEPIPE_CACHE_DIR": str(tmp_path / "cache"),
           "EDGEPIPE_MIRROR": str(REPO.parent / "shared" / "mirror")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((tmp_path / "api" / "manifest.json").read_text())
    assert manifest["stages"]["verify"]["status"] == "done"
    assert "quantize: up to date, skipped" not in done.stderr  # the second call changed quantize's variants
    assert (tmp_path / "api" / "quantize" / "float16.tflite").is_file()


def test_the_api_validates_before_any_work_and_takes_plain_values(tmp_path):
    import pipeline
    from pipeline.types import QuantMode, Runtime

    cfg = pipeline.RunConfig(out=str(tmp_path / "r"), images=str(tmp_path / "nope"), quant_modes=["int8"],
                             runtimes=["ai-edge-litert", "tflite-runtime"])
    assert cfg.quant_modes == (QuantMode.INT8,) and cfg.runtimes == (Runtime.LITERT, Runtime.TFLITE_RUNTIME)
    with pytest.raises(pipeline.ConfigError) as err:
        pipeline.run(pipeline.resume(cfg.out, images=tmp_path / "nope", epochs=0, runtimes=["tensorflow"]))
    assert str(err.value) == (f"--images {tmp_path / 'nope'}: no such folder; --epochs 0: must be at least 1; "
                              "--runtime tensorflow: unknown; choose from tflite-runtime, ai-edge-litert, "
                              "tfjs-wasm, mediapipe-tasks, tflite-runtime-arm64, ai-edge-litert-arm64, chromium-wasm, "
                              "chromium-webgl, chromium-webgl-f16, chromium-webgpu (see `edgepipe runtimes`)")
    assert not (tmp_path / "r").exists()
    with pytest.raises(pipeline.ConfigError, match="until='bogus': choose one of fetch, retrain"):
        pipeline.run(cfg, until="bogus")
    with pytest.raises(pipeline.ConfigError, match="unknown option"):
        cfg.with_options(epoch=3)

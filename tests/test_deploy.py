"""The Raspberry Pi bundle: what ``write_pi_bundle`` writes, and its ``classify.py`` run as a Pi user runs it.

Bundles of the session chain's float32 and int8-uint8 files; ``classify.py`` runs in a subprocess of
the venv's Python in isolated mode (``-I``: neither the bundle folder nor the repository is on its path),
so it finds only numpy, Pillow and the TFLite runtimes. Its pixels are checked against edgepipe's
own decoder and resize, bit for bit, in-process.
"""
from __future__ import annotations

import ast
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import deploy_classify
from pipeline.deploy import CLASSIFY_TEMPLATE, PI_REQUIREMENTS, SELF_TEST_TOLERANCE, pi_contract, write_pi_bundle
from pipeline.errors import ConfigError
from pipeline.formats import read_card
from pipeline.golden import read_golden
from pipeline.images import load_image
from pipeline.metadata import preprocessing_contract
from pipeline.rundir import read_json, sha256_file
from pipeline.types import Preprocessing

# Slow: subprocesses of classify.py and the emulated Pi (about 60 s); still run by `make test` and CI.
pytestmark = [pytest.mark.chain, pytest.mark.slow]

MODES = ("float32", "int8-uint8")
BUNDLE_FILES = {"classify.py", "labels.txt", "preprocessing.json", "requirements.txt", "README.md", "bundle.json",
                "golden/golden.json"}


def _write_bundle(run: Path, artifact: str, out: Path) -> Path:
    """The call the deploy stage makes, as :func:`write_pi_bundle`'s docstring spells it."""
    files = read_json(run / "manifest.json")["stages"]["quantize"]["outputs"]
    return write_pi_bundle(run / files[artifact]["path"],
                           labels=(run / "export" / "labels.txt").read_text(encoding="utf-8").splitlines(),
                           contract=read_json(run / "export" / "preprocessing.json"),
                           golden_dir=run / files["golden"]["path"],
                           out=out, source=f"{artifact} of the edgepipe run {run.name}")


def _classify(bundle: Path, *args: str, prelude: str = "") -> subprocess.CompletedProcess:
    """``python -I classify.py ARGS`` in the bundle folder; ``prelude`` runs first (to hide a runtime)."""
    argv = [sys.executable, "-I", "classify.py", *args]
    if prelude:
        argv = [sys.executable, "-I", "-c", f"import runpy, sys; {prelude}; sys.argv = {['classify.py', *args]!r}; "
                                            "runpy.run_path('classify.py', run_name='__main__')"]
    return subprocess.run(argv, cwd=bundle, capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(bundle)})


@pytest.fixture(scope="module")
def bundles(session_chain, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pi")
    return {mode: _write_bundle(session_chain.out, f"tflite-{mode}", root / mode) for mode in MODES}


@pytest.fixture(scope="module")
def savedmodel_top1(session_chain) -> list[str]:
    """The run's SavedModel on the golden images, labels of its top-1."""
    import tensorflow as tf

    spec, images = read_golden(session_chain.out / "quantize" / "golden")
    fn = tf.saved_model.load(str(session_chain.out / "export" / "savedmodel")).signatures["serving_default"]
    probs = fn(images=tf.constant(images))["probabilities"].numpy()
    return [spec["labels"][i] for i in probs.argmax(axis=1)]


@pytest.mark.parametrize("mode", MODES)
def test_the_bundle_holds_the_model_its_contract_and_pinned_requirements(bundles, session_chain, mode):
    bundle, run = bundles[mode], session_chain.out
    names = {str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file()}
    assert BUNDLE_FILES | {f"{mode}.tflite"} <= names
    assert (bundle / f"{mode}.tflite").read_bytes() == (run / "quantize" / f"{mode}.tflite").read_bytes()
    assert (bundle / "classify.py").read_bytes() == CLASSIFY_TEMPLATE.read_bytes()
    assert (bundle / "labels.txt").read_text() == (run / "export" / "labels.txt").read_text()
    for p in (run / "quantize" / "golden").iterdir():
        assert (bundle / "golden" / p.name).read_bytes() == p.read_bytes(), p.name
    reqs = (bundle / "requirements.txt").read_text().splitlines()
    assert [r for r in reqs if not r.startswith("#")] == ["tflite-runtime==2.14.0", "numpy==1.26.4", "pillow==11.3.0"]

    contract = read_json(bundle / "preprocessing.json")
    exported = read_json(run / "export" / "preprocessing.json")
    assert {k: contract[k] for k in exported} == exported
    assert contract["normalization"]["applied"] == "inside the model" and contract["crop"] == "none"
    card = read_card(bundle / f"{mode}.tflite")
    if mode == "float32":
        assert contract["input_quantization"] is None
    else:  # the app quantises the 0..255 values with the file's own scale and zero point
        scale, zero = card.input.quantization
        assert contract["input_quantization"]["dtype"] == "uint8" == card.input.dtype
        assert (contract["input_quantization"]["scale"], contract["input_quantization"]["zero_point"]) == (scale, zero)
        assert any("uint8" in step and f"{scale:g}" in step for step in contract["app_steps"])

    info = read_json(bundle / "bundle.json")
    assert info["model"] == f"{mode}.tflite" and info["source"] == f"tflite-{mode} of the edgepipe run run"
    assert info["self_test"]["tolerance"] == SELF_TEST_TOLERANCE[f"tflite-{mode}"]
    assert info["requirements"] == PI_REQUIREMENTS
    assert info["sha256"] == {n: sha256_file(bundle / n) for n in sorted(names - {"bundle.json"})}
    readme = (bundle / "README.md").read_text()
    for command in ("scp -r", "pip install -r requirements.txt", "python classify.py --self-test"):
        assert command in readme, command
    assert f"±{info['self_test']['tolerance']:g}" in readme and "64-bit" in readme


@pytest.mark.parametrize("mode", MODES)
def test_self_test_passes_with_only_the_bundle_and_its_packages(bundles, mode):
    done = _classify(bundles[mode], "--self-test")
    assert done.returncode == 0, done.stderr
    assert "self-test passed: 5 golden images" in done.stderr
    assert f"{mode}.tflite in tflite_runtime 2.14.0" in done.stderr


def test_self_test_falls_back_to_ai_edge_litert_and_says_what_to_install_without_either(bundles):
    bundle = bundles["int8-uint8"]
    done = _classify(bundle, "--self-test", prelude="sys.modules['tflite_runtime'] = None")
    assert done.returncode == 0, done.stderr
    assert "in ai_edge_litert 2.3.0" in done.stderr
    done = _classify(bundle, "--self-test",
                     prelude="sys.modules['tflite_runtime'] = sys.modules['ai_edge_litert'] = None")
    assert done.returncode == 2
    assert "error: no TFLite runtime: run `pip install -r requirements.txt` beside classify.py" in done.stderr


@pytest.mark.parametrize("mode", MODES)
def test_top1_on_the_golden_images_is_the_savedmodels(bundles, savedmodel_top1, mode):
    done = _classify(bundles[mode], "--json", "golden")
    assert done.returncode == 0, done.stderr
    answers = {Path(a["image"]).name: a for a in map(json.loads, done.stdout.splitlines())}
    assert [answers[f"{n}.png"]["top"][0]["label"] for n in range(len(savedmodel_top1))] == savedmodel_top1


def _corrupt(bundle: Path, tmp_path: Path, change) -> Path:
    copy = shutil.copytree(bundle, tmp_path / bundle.name)
    spec_path = copy / "golden" / "golden.json"
    spec = json.loads(spec_path.read_text())
    change(spec["images"][2])
    spec_path.write_text(json.dumps(spec))
    return copy


def test_a_wrong_golden_label_fails_the_self_test_with_one_line(bundles, tmp_path):
    def other_label(entry):
        entry["expected"][0], entry["expected"][1] = entry["expected"][1], entry["expected"][0]

    bundle = _corrupt(bundles["float32"], tmp_path, other_label)
    entry = json.loads((bundle / "golden" / "golden.json").read_text())["images"][2]
    done = _classify(bundle, "--self-test")
    assert done.returncode == 1, done.stderr
    failures = [ln for ln in done.stderr.splitlines() if ln.startswith("self-test: ")]
    assert len(failures) == 1
    assert re.fullmatch(re.escape(f"self-test: golden/2.png ({entry['source']}): top-1 is {entry['expected'][1]['label']!r} ")
                        + r"0\.\d{4}" + re.escape(f", expected {entry['expected'][0]['label']!r} "
                                                    f"{entry['expected'][0]['probability']:.4f}"), failures[0]), failures
    assert "self-test FAILED: 1 golden image(s) of float32.tflite in tflite_runtime 2.14.0" in done.stderr


def test_a_probability_past_the_tolerance_fails_the_self_test_and_says_by_how_much(bundles, tmp_path):
    def lower(entry):
        entry["expected"][0]["probability"] = 0.5

    bundle = _corrupt(bundles["int8-uint8"], tmp_path, lower)
    done = _classify(bundle, "--self-test")
    assert done.returncode == 1, done.stderr
    label = json.loads((bundle / "golden" / "golden.json").read_text())["images"][2]["expected"][0]["label"]
    line = next(ln for ln in done.stderr.splitlines() if ln.startswith("self-test: golden/2.png"))
    assert f"probability of {label!r} is " in line and "expected 0.5000 ± 0.15 (off by 0.4" in line
    assert _classify(bundle, "--self-test", "--tolerance", "0.6").returncode == 0


def test_classify_prints_one_line_per_image_of_a_folder(bundles, session_chain, tmp_path):
    holdout = Path(session_chain.options["test_images"])
    photos = tmp_path / "photos"
    shutil.copytree(holdout, photos / "holdout")
    (photos / "broken.jpg").write_bytes(b"not a jpeg")
    (photos / ".hidden.png").write_bytes(b"not looked at")
    (photos / "notes.txt").write_text("not an image")
    images = sorted(p for p in (photos / "holdout").rglob("*.png"))
    bundle = bundles["int8-uint8"]
    labels = (bundle / "labels.txt").read_text().splitlines()
    done = _classify(bundle, str(photos))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == len(images) + 1
    assert lines[0].startswith(f"{photos / 'broken.jpg'}: skipped: not an image in a known format")
    hits = []
    for image, line in zip(images, lines[1:]):
        name, answer = line.split(": ", 1)
        assert name == str(image)
        top = [part.rsplit(" ", 1) for part in answer.split(", ")]
        assert [lab for lab, _ in top] and {lab for lab, _ in top} == set(labels)  # top-5 of 3 labels: all three
        assert all(0 <= float(p) <= 1 for _, p in top)
        hits.append(top[0][0].replace(" ", "_") in image.name)  # blue_sky_003.png is a "blue sky"
    assert np.mean(hits) >= 0.9
    assert f"{len(images)} of {len(images) + 1} image(s) classified with int8-uint8.tflite" in done.stderr
    top2 = _classify(bundle, "--top-k", "2", str(images[0]))
    assert top2.stdout.count(", ") == 1


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _photos(tmp_path: Path) -> list[Path]:
    """Photos of every kind edgepipe's decoder treats specially, at sizes that shrink and grow."""
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (300, 200, 3), np.uint8), "RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90° clockwise
    wide = np.linspace(0, 65535, 90 * 50).reshape(50, 90).astype(np.uint16)
    made = {
        "big.jpg": _encode(noise, "JPEG", quality=90),  # more than twice the size: the sampled-rows path
        "small.png": _encode(noise.resize((20, 13)), "PNG"),  # upscaled
        "exif.jpg": _encode(noise.resize((120, 40)), "JPEG", exif=exif),
        "grey16.png": _encode(Image.fromarray(wide), "PNG"),
        "palette.gif": _encode(noise.convert("P"), "GIF"),
        "alpha.png": _encode(noise.convert("RGBA"), "PNG"),
        "grey.jpg": _encode(noise.convert("L"), "JPEG"),
        "exact.png": _encode(noise.resize((32, 32)), "PNG"),  # already the model's size
    }
    for name, data in made.items():
        (tmp_path / name).write_bytes(data)
    return [tmp_path / name for name in made]


@pytest.mark.parametrize("size", [32, 224])
def test_classify_py_prepares_the_pixels_edgepipe_verified_with_bit_for_bit(tmp_path, size):
    for path in _photos(tmp_path):
        ours = deploy_classify.load_pixels(path, size)
        theirs = load_image(path.read_bytes(), Preprocessing(size=size), str(path))
        assert ours.dtype == np.float32
        np.testing.assert_array_equal(ours, theirs, err_msg=path.name)


def test_classify_py_imports_only_the_standard_library_numpy_pillow_and_a_tflite_runtime():
    tree = ast.parse(CLASSIFY_TEMPLATE.read_text(encoding="utf-8"))
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported - set(sys.stdlib_module_names) == {"numpy", "PIL"}
    assert deploy_classify.RUNTIMES == ("tflite_runtime.interpreter", "ai_edge_litert.interpreter")


def test_bad_arguments_are_refused_all_at_once_and_nothing_is_replaced(session_chain, tmp_path):
    run = session_chain.out
    quantize = tmp_path / "quantize"
    quantize.mkdir()
    tflite = Path(shutil.copy(run / "quantize" / "float32.tflite", quantize))
    contract = read_json(run / "export" / "preprocessing.json")
    with pytest.raises(ConfigError) as err:
        write_pi_bundle(tflite, ["a", "b"], {**contract, "antialias": True}, run / "quantize" / "golden", quantize, "x")
    message = str(err.value)
    assert message.startswith("Pi bundle of float32.tflite: 2 labels for the 3 outputs of float32.tflite; ")
    assert "the contract says 'bilinear', antialias True" in message
    assert "labels ['blue sky', 'green leaf', 'red'] are not ['a', 'b']" in message
    assert "would replace the folder holding its own inputs" in message
    assert tflite.is_file()

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("keep me")
    labels = (run / "export" / "labels.txt").read_text().splitlines()
    with pytest.raises(ConfigError, match="exists and is not a bundle written before; not replaced"):
        write_pi_bundle(tflite, labels, contract, None, mine, "x")
    assert (mine / "thesis.tex").read_text() == "keep me"
    with pytest.raises(ConfigError, match="no such .tflite file"):
        write_pi_bundle(tmp_path / "none.tflite", labels, contract, None, tmp_path / "pi", "x")


def test_a_bundle_is_replaced_whole_and_may_go_without_golden_images(session_chain, tmp_path):
    run = session_chain.out
    labels = (run / "export" / "labels.txt").read_text().splitlines()
    contract = read_json(run / "export" / "preprocessing.json")
    out = _write_bundle(run, "tflite-int8-uint8", tmp_path / "pi")
    # The contract as the deploy stage passes it, through preprocessing_contract already.
    again = write_pi_bundle(run / "quantize" / "float32.tflite", labels, preprocessing_contract(contract), None, out,
                            "float32, no golden")
    names = {str(p.relative_to(again)) for p in again.rglob("*") if p.is_file()}
    assert "int8-uint8.tflite" not in names and not (again / "golden").exists() and "float32.tflite" in names
    assert read_json(again / "bundle.json")["self_test"]["golden"] is None
    assert read_json(again / "preprocessing.json") == pi_contract(contract, read_card(run / "quantize" / "float32.tflite"))
    assert "--self-test" not in (again / "README.md").read_text()
    done = _classify(again, "--self-test")
    assert done.returncode == 2 and "error: golden.json is missing beside classify.py" in done.stderr


@pytest.mark.parametrize("mode", MODES)
def test_self_test_passes_on_the_pi_runtime_under_emulation(bundles, mode):
    """The bundle as a Pi user runs it: Debian 12 arm64's Python 3.11 with the bundle's own
    requirements (tflite-runtime 2.14.0, numpy 1.26.4, Pillow 11.3.0), on an emulated Cortex-A72."""
    from pipeline.arm64 import SITES, python_command
    from pipeline.deploy import PI_REQUIREMENTS
    from pipeline.types import Runtime

    site = {w.name: w.version for w in SITES[Runtime.TFLITE_RUNTIME_ARM64].wheels}
    assert PI_REQUIREMENTS.items() <= site.items()  # the emulated site holds exactly the bundle's pins
    argv, env = python_command(Runtime.TFLITE_RUNTIME_ARM64)
    done = subprocess.run([*argv, "classify.py", "--self-test"], cwd=bundles[mode], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "self-test" in done.stdout.lower() + done.stderr.lower()


def test_the_deploy_stage_ships_the_smallest_file_that_passed_and_its_self_test_passes(chain_copy):
    from tests.helpers.chain import run_chain

    manifest = run_chain(chain_copy.out, until="deploy", cache_dir=chain_copy.cache)
    info = manifest["stages"]["deploy"]["info"]
    report = read_json(chain_copy.out / "report.json")
    passing = {r["artifact"] for r in report["results"][1:] if r["artifact"].startswith("tflite-")} - {
        r["artifact"] for r in report["results"] if not r["passed"]}
    sizes = {r["artifact"]: r["size_bytes"] for r in report["results"]}
    assert info["artifact"] in passing and sizes[info["artifact"]] == min(sizes[a] for a in passing)
    bundle = chain_copy.out / "deploy" / "raspberry-pi"
    assert _classify(bundle, "--self-test").returncode == 0
    again = run_chain(chain_copy.out, until="deploy", cache_dir=chain_copy.cache)
    assert again["stages"]["deploy"]["fingerprint"] == manifest["stages"]["deploy"]["fingerprint"]

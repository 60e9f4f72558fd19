"""The preprocessing contract travels with every artifact: TFLite metadata, MediaPipe, golden vectors.

The session chain on the tiny graph (every TFLite variant, float32 and float16 TF.js), verified in
tflite-runtime, ai-edge-litert and MediaPipe Tasks. The metadata is read back by MediaPipe's own code (its
``MetadataDisplayer`` and its ``ImageClassifier``, in subprocesses without TensorFlow), not only by
``pipeline.metadata.read_metadata``.
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import ConversionError
from pipeline.golden import GOLDEN_DIR, GOLDEN_FILE, read_golden
from pipeline.metadata import LABELS_FILE, PREPROCESSING_FILE, read_metadata, with_metadata
from pipeline.runners.base import RuntimeFailed
from pipeline.runners.mediapipe import MediapipeRunner
from tests.helpers.world import REPO, TINY_SIZE

pytestmark = pytest.mark.chain

MODES = ("float32", "int8")  # the variants checked file by file in every runtime
RUNTIMES = ("tflite-runtime", "ai-edge-litert", "mediapipe-tasks")

# MediaPipe's metadata module imports a compiled version helper the wheel does not ship
# (mediapipe.tasks.cc); it is only used when *writing* metadata, so a stand-in lets its reader,
# MetadataDisplayer (flatc's JSON printer inside libmediapipe), run.
MEDIAPIPE_DISPLAYER = """
import json, sys, types
sys.modules["tensorflow"] = None
for name in ("mediapipe.tasks.cc", "mediapipe.tasks.cc.metadata", "mediapipe.tasks.cc.metadata.python",
             "mediapipe.tasks.cc.metadata.python._pywrap_metadata_version"):
    sys.modules[name] = types.ModuleType(name)
from mediapipe.tasks.python.metadata.metadata import MetadataDisplayer
out = {}
for path in sys.argv[1:]:
    d = MetadataDisplayer.with_model_file(path)
    out[path] = {"metadata": json.loads(d.get_metadata_json()),
                 "packed": d.get_packed_associated_file_list(),
                 "files": {n: d.get_associated_file_buffer(n).decode() for n in d.get_packed_associated_file_list()}}
print(json.dumps(out))
"""

MEDIAPIPE_HEADS = """
import json, sys
import numpy as np
from PIL import Image
sys.modules["tensorflow"] = None
import mediapipe as mp
from mediapipe.tasks.python import BaseOptions
from mediapipe.tasks.python.vision import ImageClassifier, ImageClassifierOptions
opts = ImageClassifierOptions(base_options=BaseOptions(model_asset_path=sys.argv[1]), max_results=-1)
with ImageClassifier.create_from_options(opts) as clf:
    pixels = np.asarray(Image.open(sys.argv[2]).convert("RGB"))
    result = clf.classify(mp.Image(image_format=mp.ImageFormat.SRGB, data=pixels))
print(json.dumps({c.head_name: [[k.index, k.category_name, k.score] for k in c.categories]
                  for c in result.classifications}))
"""


def _python(script: str, *args) -> dict:
    proc = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def run(session_chain):
    return session_chain.out


@pytest.fixture(scope="module")
def labels(run) -> list[str]:
    return (run / "export" / "labels.txt").read_text(encoding="utf-8").splitlines()


@pytest.fixture(scope="module")
def rows(session_chain) -> dict:
    return session_chain.rows()


def test_every_tflite_file_carries_metadata_that_mediapipe_reads(run, labels):
    files = sorted((run / "quantize").glob("*.tflite"))
    quant_modes = json.loads((run / "manifest.json").read_text())["config"]["quant_modes"]
    assert set(MODES) <= set(quant_modes)
    assert sorted(f.stem for f in files) == sorted(quant_modes)  # one file per variant asked for, no more
    shown = _python(MEDIAPIPE_DISPLAYER, *files)
    contract = json.loads((run / "export" / "preprocessing.json").read_text())
    for f in files:
        got = shown[str(f)]
        meta = got["metadata"]
        assert meta["name"] == f"edgepipe custom:tiny_frozen.pb {f.stem}"
        assert f"TFLite {f.stem}" in meta["description"] and "0..255" in meta["description"]
        assert meta["min_parser_version"] == "1.0.0"
        (sub,) = meta["subgraph_metadata"]
        (image,) = sub["input_tensor_metadata"]
        assert image["content"] == {"content_properties_type": "ImageProperties",
                                    "content_properties": {"color_space": "RGB"}}
        # The model normalises itself: the metadata's normalisation must leave 0..255 alone.
        (norm,) = image["process_units"]
        assert norm == {"options_type": "NormalizationOptions",
                        "options": {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}}
        assert image["stats"] == {"min": [0.0] * 3, "max": [255.0] * 3}
        heads = {t["name"]: t for t in sub["output_tensor_metadata"]}
        assert set(heads) == {"probabilities", "logits"}
        assert heads["probabilities"]["stats"] == {"min": [0.0], "max": [1.0]}
        for head in heads.values():
            assert [(a["name"], a["type"]) for a in head["associated_files"]] == [(LABELS_FILE, "TENSOR_AXIS_LABELS")]
        assert [(a["name"], a["type"]) for a in meta["associated_files"]] == [(PREPROCESSING_FILE, "DESCRIPTIONS")]
        assert sorted(got["packed"]) == [LABELS_FILE, PREPROCESSING_FILE]
        assert got["files"][LABELS_FILE].splitlines() == labels
        prep = json.loads(got["files"][PREPROCESSING_FILE])
        assert {k: prep[k] for k in contract} == contract  # export's contract, verbatim
        assert (prep["size"], prep["resize_method"], prep["antialias"], prep["crop"], prep["channel_order"],
                prep["range"], prep["dtype"]) == (TINY_SIZE, "bilinear", False, "none", "RGB", [0, 255], "float32")
        assert prep["normalization"] == {"applied": "inside the model", "formula": "(x - mean) / std",
                                         "mean": 127.5, "std": 127.5}
        # Our reader says what MediaPipe's says.
        ours = read_metadata(f)
        assert ours["labels"] == labels and ours["preprocessing"] == prep
        assert ours["inputs"][0]["normalization"] == norm["options"]
        assert [t["name"] for t in ours["outputs"]] == [t["name"] for t in sub["output_tensor_metadata"]]


def test_mediapipe_image_classifier_names_our_labels_on_the_probabilities_head(run, labels):
    golden = run / "quantize" / GOLDEN_DIR
    spec = json.loads((golden / GOLDEN_FILE).read_text())
    first = spec["images"][0]
    heads = _python(MEDIAPIPE_HEADS, run / "quantize" / "float32.tflite", golden / first["file"])
    assert set(heads) == {"probabilities", "logits"}
    probs = sorted(heads["probabilities"])  # by output index
    assert [name for _, name, _ in probs] == labels
    assert pytest.approx(sum(score for *_, score in probs), abs=1e-4) == 1.0
    top = max(probs, key=lambda c: c[2])
    assert top[1] == first["expected"][0]["label"]
    assert top[2] == pytest.approx(first["expected"][0]["probability"], abs=1e-4)


def test_files_with_metadata_verify_in_every_runtime(rows):
    for mode in MODES:
        for runtime in RUNTIMES:
            r = rows[(f"tflite-{mode}", runtime)]
            assert r["passed"] and r["error"] is None, (mode, runtime, r["error"])
    # MediaPipe got the verify inputs rounded to uint8 and resized nothing: it matches the float32
    # reference as closely as the other runtimes do.
    mp = rows[("tflite-float32", "mediapipe-tasks")]
    assert mp["top1_agreement"] >= 0.99
    assert mp["max_abs_diff"] < 1e-3


def test_mediapipe_runner_catches_labels_out_of_order(run, labels, tmp_path):
    x = read_golden(run / "quantize" / GOLDEN_DIR)[1]
    wrong = tmp_path / "reversed.tflite"
    contract = read_metadata(run / "quantize" / "float32.tflite")["preprocessing"]
    wrong.write_bytes(with_metadata((run / "quantize" / "float32.tflite").read_bytes(), labels[::-1], contract,
                                    "reversed", "labels in the wrong order"))
    expected = f"category '{labels[-1]}' is output 0 in the model, {len(labels) - 1} in our labels"
    with pytest.raises(RuntimeFailed, match=expected):
        MediapipeRunner(labels).predict(wrong, x, timeout_s=120)


def test_with_metadata_is_idempotent_aligned_and_checks_its_input(run, labels):
    from mediapipe.tasks.metadata import schema_py_generated as model_fb

    path = run / "quantize" / "int8.tflite"
    data = path.read_bytes()
    meta = read_metadata(path)
    assert with_metadata(data, labels, meta["preprocessing"], meta["name"], meta["description"]) == data
    model = model_fb.Model.GetRootAsModel(data, 0)
    assert [model.Metadata(i).Name() for i in range(model.MetadataLength())].count(b"TFLITE_METADATA") == 1
    for i in range(model.BuffersLength()):
        buf = model.Buffers(i)
        if buf.DataLength():
            # The schema's force_align: 16, kept when the model is repacked.
            assert buf._tab.Vector(buf._tab.Offset(4)) % 16 == 0, i
    with pytest.raises(ConversionError, match="not a TFLite flatbuffer"):
        with_metadata(b"PK\x03\x04 not a model", labels, {}, "x", "y")
    with pytest.raises(ConversionError, match=r"expected \[\.\.\., 2\] for 2 labels"):
        with_metadata(data, labels[:2], {}, "x", "y")
    with pytest.raises(ConversionError, match="non-empty single lines"):
        with_metadata(data, ["a\nb", *labels[1:]], {}, "x", "y")


def test_golden_vectors_reproduce_in_ai_edge_litert(run, labels, tiny_holdout):
    from ai_edge_litert.interpreter import Interpreter

    spec, images = read_golden(run / "quantize" / GOLDEN_DIR)
    assert spec["labels"] == labels and spec["top_k"] == 3
    assert len(spec["images"]) == 5
    holdout = {p.name: p.parent.name for p in tiny_holdout.rglob("*.png")}
    # Chosen from the test split, classes taking turns.
    assert [e["source"] in holdout for e in spec["images"]] == [True] * 5
    assert len({e["true_label"] for e in spec["images"]}) == len(labels)
    for entry in spec["images"]:
        with Image.open(run / "quantize" / GOLDEN_DIR / entry["file"]) as im:
            assert (im.mode, im.size) == ("RGB", (TINY_SIZE, TINY_SIZE))
        probs = [e["probability"] for e in entry["expected"]]
        assert [e["label"] for e in entry["expected"]] == [labels[e["index"]] for e in entry["expected"]]
        assert probs == sorted(probs, reverse=True) and len(probs) == 3
    # The TF.js bundle ships the same self-test.
    tfjs_golden = run / "tfjs" / "float32" / GOLDEN_DIR
    assert json.loads((tfjs_golden / GOLDEN_FILE).read_text()) == spec
    for entry in spec["images"]:
        png = entry["file"]
        assert (tfjs_golden / png).read_bytes() == (run / "quantize" / GOLDEN_DIR / png).read_bytes()
    for mode in MODES:
        runner = Interpreter(model_path=str(run / "quantize" / f"{mode}.tflite")).get_signature_runner()
        for entry, img in zip(spec["images"], images):
            p = runner(images=img[None])["probabilities"][0]
            assert labels[int(np.argmax(p))] == entry["expected"][0]["label"], (mode, entry["file"])
            if mode == "float32":
                for e in entry["expected"]:
                    assert p[e["index"]] == pytest.approx(e["probability"], abs=1e-5)

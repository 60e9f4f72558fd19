"""``edgepipe check`` and ``edgepipe classify`` on models edgepipe did not make: plain Keras with
``TFLiteConverter`` and ``tensorflowjs``'s converter, Model Maker's metadata, Teachable Machine's
layout, and (slow) the real poets graph of ``../shared``."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.check import CheckSettings, PrepFlags, check, parse_check_gates, resolve_preprocessing
from pipeline.errors import ConfigError
from pipeline.formats import Carried, InputInfo, ModelCard, kind_of, read_card
from pipeline.types import ArtifactKind
from tests.helpers.cli import edgepipe
from tests.helpers.conversions import (
    COLOUR_LABELS,
    POETS_GRAPH,
    channels_swapped,
    check_world,
    colour_images,
    model_maker_style,
    poets_savedmodel,
    poets_tflite,
    tflite_from_keras,
    trained_colour_classifier,
)
from tests.helpers.tfjs_models import keras_classifier, keras_vector_model, write_graph_model, write_layers_model
from tests.helpers.world import FLOWERS, TINY_SIZE, needs_shared

SIGNED = PrepFlags(value_range="-1-1")


@pytest.fixture(scope="module")
def check_holdout(tmp_path_factory) -> Path:
    """The check world's test images."""
    return check_world(tmp_path_factory.mktemp("check-test") / "test", per_class=6, seed=1)


@pytest.fixture(scope="module")
def colour(tmp_path_factory, check_holdout) -> dict[str, Path]:
    """The colour classifier as a Keras file (labels.txt beside it) and every conversion of it."""
    root = tmp_path_factory.mktemp("colour")
    tiny_images = check_world(root / "train")
    model = trained_colour_classifier(tiny_images)
    keras_dir = root / "keras"
    keras_dir.mkdir()
    model.save(keras_dir / "colour.keras")
    (keras_dir / "labels.txt").write_text("\n".join(COLOUR_LABELS) + "\n")
    calibration = colour_images(tiny_images)[0][::3]
    out = {"reference": keras_dir / "colour.keras"}
    for mode in ("float32", "int8", "uint8"):
        out[mode] = tflite_from_keras(model, root / f"colour_{mode}.tflite", mode, calibration)
    (root / "mm").mkdir()
    out["model_maker"] = model_maker_style(out["float32"], root / "mm" / "colour_mm.tflite", COLOUR_LABELS)
    # Broken conversions: metadata that says raw 0..255 pixels for a model trained on [-1, 1], and a
    # BGR flip baked into the graph.
    out["wrong_normalisation"] = model_maker_style(out["float32"], root / "mm" / "colour_wrong_norm.tflite",
                                                   COLOUR_LABELS, mean=0.0, std=1.0)
    out["swapped"] = tflite_from_keras(channels_swapped(model), root / "colour_bgr.tflite")
    out["teachable"] = write_layers_model(model, root / "tm", COLOUR_LABELS, TINY_SIZE)
    out["graph"] = write_graph_model(model, root / "tfjs_graph")
    model.export(str(root / "savedmodel"), verbose=False)
    out["savedmodel"] = root / "savedmodel"
    return out


# --- where each model's preprocessing comes from (fast: synthetic cards, nothing run) -----------

def _card(carried: dict, kind=ArtifactKind.TFLITE) -> ModelCard:
    return ModelCard(Path("m.tflite"), kind, "tflite", InputInfo("images", (1, 32, 32, 3), "float32"),
                     {"probabilities": (0, 3)}, carried={k: Carried(v, src) for k, (v, src) in carried.items()},
                     output="probabilities", classes=3)


def test_carried_settings_win_flags_fill_gaps_defaults_last():
    card = _card({"size": (32, "input tensor shape"), "mean": (127.5, "TFLite metadata (NormalizationOptions)"),
                  "std": (127.5, "TFLite metadata (NormalizationOptions)")})
    prep, sources, warnings = resolve_preprocessing(card, PrepFlags(resize="area"), "m.tflite")
    assert (prep.size, prep.mean, prep.std, str(prep.resize_method)) == (32, 127.5, 127.5, "area")
    assert sources == {"size": "input tensor shape", "mean": "TFLite metadata (NormalizationOptions)",
                       "std": "TFLite metadata (NormalizationOptions)", "channel_order": "default (the model carries none)",
                       "resize": "--resize"}
    assert warnings == []


def test_a_flag_that_contradicts_the_model_is_a_warning_not_an_override():
    card = _card({"size": (32, "input tensor shape"), "mean": (127.5, "metadata"), "std": (127.5, "metadata")})
    prep, _, warnings = resolve_preprocessing(card, PrepFlags(value_range="0-1"), "m.tflite")
    assert (prep.mean, prep.std) == (127.5, 127.5)
    assert warnings == ["m.tflite: --value-range 0-1 0.0 contradicts the model's mean 127.5 (metadata); the model's is used",
                        "m.tflite: --value-range 0-1 255.0 contradicts the model's std 127.5 (metadata); the model's is used"]


def test_a_model_without_normalisation_names_the_flags():
    with pytest.raises(ConfigError, match=r"^m.tflite: the model carries no mean or std for its input; give --mean M "
                                          r"--std S \(or --value-range 0-255\|0-1\|-1-1\)$"):
        resolve_preprocessing(_card({"size": (32, "input tensor shape")}), PrepFlags(), "m.tflite")
    with pytest.raises(ConfigError, match=r"carries no size .* give --size PIXELS"):
        resolve_preprocessing(_card({}), PrepFlags(mean=0, std=1), "m.tflite")


def test_contradictory_flags_and_unknown_files_are_refused(tmp_path):
    assert PrepFlags(value_range="-1-1", mean=0.0).problems() == [
        "--value-range -1-1 means mean 127.5, std 127.5; it contradicts --mean 0: give one or the other"]
    assert PrepFlags(channel_order="GBR", std=0).problems()[0].startswith("--std 0: would divide by zero")
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ConfigError, match=r"notes.txt: not a model edgepipe reads; give a SavedModel folder"):
        kind_of(tmp_path / "notes.txt")
    with pytest.raises(ConfigError, match=r"--gate 'x.tflite=0.5': expected NAME=VALUE .* a candidate \(m.tflite\)"):
        parse_check_gates(["x.tflite=0.5"], [Path("/a/m.tflite")])
    assert parse_check_gates(["m.tflite=0.5", "tflite-int8=0.8"], [Path("/a/m.tflite")]) == {
        "m.tflite": 0.5, "tflite-int8": 0.8}


# --- the real files' cards --------------------------------------------------------------------------

@pytest.mark.slow
def test_each_source_of_preprocessing_is_named(colour):
    mm = read_card(colour["model_maker"])
    assert mm.labels == tuple(COLOUR_LABELS) and mm.labels_source == "TFLite metadata (labels.txt)"
    assert (mm.carried["mean"].value, mm.carried["std"].value) == (127.5, 127.5)
    assert mm.carried["mean"].source == "TFLite metadata (NormalizationOptions)"
    tm = read_card(colour["teachable"])
    assert tm.format == "tfjs-layers" and tm.labels_source == "metadata.json"
    assert tm.carried["size"].source == "metadata.json (imageSize)" and tm.carried["mean"].value == 127.5
    keras = read_card(colour["reference"])
    assert keras.labels_source == "labels.txt beside the model" and "mean" not in keras.carried
    assert keras.carried["size"].source == "input tensor shape"
    prep, sources, warnings = resolve_preprocessing(keras, SIGNED, "colour.keras")
    assert (prep.size, prep.mean, prep.std) == (TINY_SIZE, 127.5, 127.5) and not warnings
    assert sources["mean"] == "--value-range -1-1" and sources["channel_order"].startswith("default")
    assert read_card(colour["uint8"]).gate_key == "tflite-int8-uint8"
    assert read_card(colour["int8"]).gate_key == "tflite-int8"
    assert read_card(colour["float32"]).gate_key == "tflite-float32"


# --- check, in every runtime ----------------------------------------------------------------------

@pytest.mark.slow
def test_honest_conversions_pass_with_accuracy_and_sources(colour, check_holdout, tmp_path):
    candidates = [colour[k] for k in ("float32", "int8", "uint8", "model_maker", "teachable", "graph", "savedmodel")]
    runtimes = ("tflite-runtime", "ai-edge-litert", "tfjs-wasm", "mediapipe-tasks")
    result = check(CheckSettings(colour["reference"], tuple(candidates), check_holdout, tmp_path, SIGNED,
                                 latency_runs=2, runtimes=runtimes))
    report = json.loads((tmp_path / "report.json").read_text())
    assert result.passed and report["passed"] and report["labelled"]
    rows = {(r["artifact"], r["runtime"]): r for r in report["results"]}
    for name in ("colour_float32.tflite", "colour_int8.tflite", "colour_uint8.tflite"):
        assert {rt for a, rt in rows if a == name} == {"tflite-runtime", "ai-edge-litert"}  # no metadata: no MediaPipe
    # MediaPipe reads the Model Maker file's labels and normalisation itself, from raw pixels.
    assert {rt for a, rt in rows if a == "colour_mm.tflite"} == {"tflite-runtime", "ai-edge-litert", "mediapipe-tasks"}
    assert rows["colour_mm.tflite", "mediapipe-tasks"]["top1_agreement"] == 1.0
    assert {rt for a, rt in rows if a in ("tm", "tfjs_graph")} == {"tfjs-wasm"}
    assert rows["savedmodel", "tensorflow"]["max_abs_diff"] < 1e-5 and rows["savedmodel", "tensorflow"]["gate"] == 0.99
    assert rows["colour.keras", "tensorflow"]["accuracy"] >= 0.9
    assert rows["colour_float32.tflite", "ai-edge-litert"]["max_abs_diff"] < 1e-4
    assert rows["tm", "tfjs-wasm"]["max_abs_diff"] < 1e-4
    models = {m["name"]: m for m in report["models"]}
    assert models["colour_mm.tflite"]["preprocessing"]["mean"]["source"] == "TFLite metadata (NormalizationOptions)"
    assert models["tm"]["labels"]["source"] == "metadata.json"
    assert models["colour_uint8.tflite"]["input"]["dtype"] == "uint8"
    assert models["colour_uint8.tflite"]["kind"] == "tflite-int8-uint8"
    assert models["colour.keras"]["output"]["kind"] == "probabilities"
    md = (tmp_path / "report.md").read_text()
    assert "# edgepipe check: colour.keras" in md and "## Models" in md


@pytest.mark.slow
def test_broken_conversions_fail_with_exit_3_and_say_which(colour, check_holdout, tmp_path):
    done = edgepipe("check", "--reference", colour["reference"], "--candidate", colour["float32"],
                    "--candidate", colour["wrong_normalisation"], "--candidate", colour["swapped"],
                    "--images", check_holdout, "--out", tmp_path, "--value-range=-1-1", "--latency-runs", "0",
                    "--runtime", "ai-edge-litert")
    assert done.returncode == 3, done.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    rows = {r["artifact"]: r for r in report["results"]}
    assert rows["colour_float32.tflite"]["passed"]
    for bad in ("colour_wrong_norm.tflite", "colour_bgr.tflite"):
        assert not rows[bad]["passed"] and rows[bad]["top1_agreement"] < 0.9, rows[bad]
        assert bad in done.stderr.strip().splitlines()[-1]
    assert "colour_float32.tflite" not in done.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_logits_get_softmax_and_a_flat_folder_gives_agreement_only(colour, check_holdout, tmp_path):
    import keras

    model = keras.models.load_model(colour["reference"])
    logits = keras.Model(model.inputs, model.get_layer("scores").input @ model.get_layer("scores").kernel
                         + model.get_layer("scores").bias)
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in sorted(check_holdout.rglob("*.png"))[:9]:
        (flat / p.name).write_bytes(p.read_bytes())
    tflite = tflite_from_keras(logits, tmp_path / "logits.tflite")
    check(CheckSettings(colour["reference"], (tflite,), flat, tmp_path / "out", SIGNED, latency_runs=0,
                        runtimes=("ai-edge-litert",)))
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["labelled"] is False and "flat folder" in report["unlabelled_reason"]
    (row,) = [r for r in report["results"] if r["artifact"] == "logits.tflite"]
    assert row["output_kind"] == "logits" and row["passed"] and row["max_abs_diff"] < 1e-4
    assert row["accuracy"] is None
    assert report["models"][1]["output"]["softmax_applied"] is True


# --- bad input: one line, exit 2 -------------------------------------------------------------------

@pytest.fixture(scope="module")
def odd_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("odd")
    (root / "notes.txt").write_text("not a model")
    keras_vector_model().save(root / "vector.keras")
    keras_classifier(TINY_SIZE, 3).save(root / "three.keras")
    return {"text": root / "notes.txt", "vector": root / "vector.keras", "three": root / "three.keras"}


@pytest.mark.slow
@pytest.mark.parametrize("case, expected", [
    ("not an image", r"vector.keras: input .* has shape \[None, 10\], not an image batch \[N, H, W, 3\]"),
    ("class counts", r"three.keras: 3 classes, the reference .*colour.keras has 4"),
    ("folder labels", r"class folder\(s\) black, blue, red, white match no label of the reference \(cat, dog, "
                      r"fish, owl; from --labels .*\); rename the folders, pass --labels FILE, or --no-labels"),
])
def test_bad_input_names_the_file_the_value_and_the_fix(case, expected, colour, odd_models, check_holdout, tmp_path):
    reference, candidate, labels = colour["reference"], colour["float32"], None
    if case == "not an image":
        candidate = odd_models["vector"]
    elif case == "class counts":
        candidate = odd_models["three"]
    else:
        labels = tmp_path / "other.txt"
        labels.write_text("cat\ndog\nfish\nowl\n")
        reference = tmp_path / "colour.keras"
        reference.write_bytes(colour["reference"].read_bytes())  # no labels.txt beside this copy
    with pytest.raises(ConfigError, match=expected):
        check(CheckSettings(reference, (candidate,), check_holdout, tmp_path / "out", SIGNED, labels=labels))
    assert not (tmp_path / "out" / "report.json").exists()


@pytest.mark.slow
def test_bad_input_on_the_command_line_is_one_line_and_exit_2(colour, odd_models, check_holdout, tmp_path):
    done = edgepipe("check", "--reference", colour["reference"], "--candidate", odd_models["text"],
                    "--images", check_holdout, "--out", tmp_path / "out", "--value-range=-1-1")
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines == [f"error: {odd_models['text']}: not a model edgepipe reads; give a SavedModel folder, a .keras/.h5 "
                     "file, a frozen .pb, a .tflite file or a TF.js folder with model.json"], done.stderr


# --- classify --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_classify_prints_top_k_and_json_lines(colour, check_holdout):
    images = sorted(check_holdout.rglob("*.png"))[::8][:3]
    done = edgepipe("classify", colour["model_maker"], *images, "--top-k", "2", "--json")
    assert done.returncode == 0, done.stderr
    answers = [json.loads(line) for line in done.stdout.strip().splitlines()]
    assert [a["image"] for a in answers] == [str(p) for p in images] and all(len(a["top"]) == 2 for a in answers)
    assert [a["top"][0]["label"] for a in answers] == [p.parent.name for p in images]
    assert "mean latency" in done.stderr and "tflite in ai-edge-litert" in done.stderr
    text = edgepipe("classify", colour["reference"], check_holdout, "--value-range=-1-1", "--quiet")
    assert text.returncode == 0, text.stderr
    lines = text.stdout.strip().splitlines()
    assert len(lines) == len(list(check_holdout.rglob("*.png"))) + 1 and lines[-1].startswith(
        f"{len(lines) - 1} image(s), keras in tensorflow; mean latency")


# --- the real case: the poets graph and plain TFLiteConverter files -------------------------------

@pytest.mark.slow
def test_poets_graph_against_its_plain_conversions(tmp_path):
    needs_shared(POETS_GRAPH)
    test = needs_shared(FLOWERS / "test")
    calibration = sorted((FLOWERS / "train").rglob("*.jpg"))[::24][:20]
    files = [poets_tflite(tmp_path / f"poets_{m}.tflite", m, calibration) for m in ("float32", "int8")]
    files.append(write_graph_model(poets_savedmodel(tmp_path / "sm"), tmp_path / "poets_tfjs"))
    # The plain conversions carry no normalisation: the error offers the reference's, from the catalog.
    with pytest.raises(ConfigError, match=r"poets_float32.tflite, poets_int8.tflite, poets_tfjs carry no mean or std "
                                          r".*the reference takes size 224, mean 127.5, std 127.5, from catalog: "
                                          r"mobilenet_v1_1.0_224: --mean 127.5 --std 127.5"):
        check(CheckSettings(POETS_GRAPH, tuple(files), test, tmp_path / "out"))
    result = check(CheckSettings(POETS_GRAPH, tuple(files), test, tmp_path / "out", PrepFlags(mean=127.5, std=127.5),
                                 latency_runs=2))
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["labelled"] is False and "carries no labels" in report["unlabelled_reason"]
    rows = {(r["artifact"], r["runtime"]): r for r in report["results"]}
    assert rows["poets_float32.tflite", "ai-edge-litert"]["top1_agreement"] == 1.0
    assert rows["poets_int8.tflite", "ai-edge-litert"]["top1_agreement"] >= 0.9
    # tensorflowjs_converter keeps poets' PlaceholderWithDefault, which tfjs 4.22's wasm backend fails on.
    assert result.failures() == "poets_tfjs/tfjs-wasm (failed to run)"
    assert "PlaceholderWithDefault (input_1/BottleneckInputPlaceholder)" in rows["poets_tfjs", "tfjs-wasm"]["error"]
    ref = report["models"][0]
    assert ref["preprocessing"]["mean"] == {"value": 127.5, "source": "catalog: mobilenet_v1_1.0_224"}
    assert ref["output"]["name"] == "final_result:0" and ref["input"]["shape"] == [1, 224, 224, 3]
    assert not report["warnings"]


@pytest.mark.slow
def test_a_float_tflite_reference_a_keras_h5_candidate_and_output_by_name(colour, check_holdout, tmp_path):
    import keras

    from tests.helpers.tfjs_models import keras_two_outputs

    model = keras.models.load_model(colour["reference"])
    model.save(tmp_path / "colour.h5")
    two = tmp_path / "two"
    keras_two_outputs(model).export(str(two), verbose=False)
    result = check(CheckSettings(colour["float32"], (tmp_path / "colour.h5", colour["int8"]), check_holdout,
                                 tmp_path / "out", SIGNED, latency_runs=0, runtimes=("ai-edge-litert",)))
    rows = {(r.artifact, r.runtime): r for r in result.report.results}
    assert result.passed and rows["colour_float32.tflite", "ai-edge-litert"].top1_agreement == 1.0
    assert rows["colour.h5", "tensorflow"].max_abs_diff < 1e-4
    assert result.report.holdout.labels is None  # the float TFLite file carries no labels
    with pytest.raises(ConfigError, match=r"two: has 2 outputs \(.*scores.*\); choose one with --output NAME"):
        check(CheckSettings(colour["reference"], (two,), check_holdout, tmp_path / "out2", SIGNED))
    picked = check(CheckSettings(colour["reference"], (two,), check_holdout, tmp_path / "out3", SIGNED,
                                 output="scores", latency_runs=0))
    assert picked.passed and picked.report.results[1].max_abs_diff < 1e-5


@pytest.mark.slow
def test_an_edgepipe_run_checks_by_the_contract_its_files_carry(session_chain, tmp_path):
    """edgepipe's own files normalise inside: check reads that from their preprocessing.json and
    model.json metadata (no flag), and agrees with the run's verify."""
    from tests.helpers.world import make_image_folders

    run = session_chain.out
    holdout = make_image_folders(tmp_path / "test", per_class=4, seed=3)  # the run's own colour classes
    result = check(CheckSettings(run / "export" / "savedmodel", (run / "quantize" / "float32.tflite",
                                                                run / "tfjs" / "float32"), holdout, tmp_path / "out",
                                 latency_runs=0, runtimes=("ai-edge-litert", "tfjs-wasm")))
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert result.passed and report["labelled"]
    models = {m["name"]: m for m in report["models"]}
    assert models["savedmodel"]["preprocessing"]["mean"] == {
        "value": 0.0, "source": "edgepipe preprocessing.json (normalisation inside the model)"}
    assert models["float32.tflite"]["labels"]["source"] == "TFLite metadata (labels.txt)"
    assert models["float32"]["preprocessing"]["std"]["source"] == "edgepipe metadata in model.json (normalisation inside the model)"
    assert models["savedmodel"]["labels"]["source"] == "labels.txt beside the model"
    assert all(r["top1_agreement"] == 1.0 for r in report["results"])

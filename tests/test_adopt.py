"""Adopting an existing retrained graph (``--model-graph``) and recognising a known backbone by its
tensors (``--graph`` alone): the output search, catalog recognition as data, the options checked
before any work, the adopt path of the retrain stage and the export that wraps the graph."""
from __future__ import annotations

import pytest

from pipeline.errors import GraphError
from pipeline.graph import best_output, load_graph_def, model_outputs, output_candidates
from tests.helpers.adopt import POETS_LOGITS, POETS_OUTPUT, build_tiny_model_graph


@pytest.fixture(scope="session")
def tiny_model_graph(tmp_path_factory):
    return build_tiny_model_graph(tmp_path_factory.mktemp("model-graph") / "retrained_graph.pb")


# --- the output of a whole classifier ----------------------------------------------------------


def test_the_output_is_the_terminal_softmax_and_its_input_the_logits(tiny_model_graph):
    gd = load_graph_def(tiny_model_graph)
    found = output_candidates(gd)
    assert [t.name for t in found] == [POETS_OUTPUT] and found[0].features == 3
    out = model_outputs(gd)
    assert (out.probabilities, out.logits, out.classes, out.found_by, out.softmax) == (
        POETS_OUTPUT, POETS_LOGITS, 3, "search", True)
    assert model_outputs(gd, "final_result").found_by == "given"


def test_a_softmax_is_preferred_to_another_terminal_output(tmp_path):
    gd = load_graph_def(build_tiny_model_graph(tmp_path / "g.pb", extra_output=True))
    assert [t.name for t in output_candidates(gd)] == [POETS_OUTPUT, "aux_result:0"]
    assert model_outputs(gd).probabilities == POETS_OUTPUT


def test_without_a_softmax_one_output_is_taken_as_it_is_and_two_need_output_tensor(tmp_path):
    gd = load_graph_def(build_tiny_model_graph(tmp_path / "g.pb", softmax=False))
    out = model_outputs(gd)
    assert (out.probabilities, out.logits, out.softmax) == (POETS_LOGITS, None, False)
    gd = load_graph_def(build_tiny_model_graph(tmp_path / "h.pb", softmax=False, extra_output=True))
    assert best_output(output_candidates(gd)) is None
    with pytest.raises(GraphError) as err:
        model_outputs(gd)
    assert str(err.value) == (
        "--model-graph: cannot tell which tensor is the classifier's output (several candidates: "
        f"{POETS_LOGITS} [?, 3] (AddV2), aux_result:0 [?, 3] (Identity)); name it with --output-tensor "
        "(see `edgepipe inspect`)")


def test_a_wrong_output_tensor_names_the_close_ones_and_the_outputs(tiny_model_graph):
    gd = load_graph_def(tiny_model_graph)
    with pytest.raises(GraphError, match=r"--output-tensor final_resul: not in the graph; closest: final_result:0"):
        model_outputs(gd, "final_resul")
    with pytest.raises(GraphError, match=r"is float32 \[1, 32, 32, 3\], not float \[N,C\] class scores"):
        model_outputs(gd, "input:0")


def test_inspect_lists_the_outputs_and_says_when_the_catalog_knows_the_graph(tiny_model_graph, v1_lookalike):
    from pipeline.inspect import describe, inspect_graph

    text = describe(inspect_graph(tiny_model_graph))
    section = text.split("outputs (terminal float [N,C] tensors, Softmax first; --model-graph adopts one):\n")[1]
    assert section.splitlines()[0].split() == [POETS_OUTPUT, "Softmax", "[?,", "3]", "3", "classes"]
    assert "recognised as" not in text
    assert (f"recognised as catalog backbone mobilenet_v1_0.25_128 by its tensor names and shapes, so --graph "
            f"{v1_lookalike} alone will do") in describe(inspect_graph(v1_lookalike))


# --- recognising a catalog architecture by its tensors -------------------------------------------

V1 = "MobilenetV1/Logits/AvgPool_1a/AvgPool:0"


def test_the_mobilenet_v1_widths_share_their_names_and_are_told_apart_by_features_and_size():
    from pipeline.catalog import match_backbones

    def names(shapes, **given):
        return [spec.name for spec, _ in match_backbones(shapes, **given)]

    assert names({"input:0": (1, 224, 224, 3), V1: (1, 1, 1, 1024)}) == ["mobilenet_v1_1.0_224"]
    assert names({"input:0": (1, 128, 128, 3), V1: (1, 1, 1, 256)}) == ["mobilenet_v1_0.25_128"]
    assert names({"input:0": (1, 160, 160, 3), V1: (None, 1, 1, 512)}) == ["mobilenet_v1_0.50_160"]
    # Names that match at a size or width the catalog lacks: nothing.
    assert names({"input:0": (1, 96, 96, 3), V1: (1, 1, 1, 1024)}) == []
    assert names({"input:0": (1, 224, 224, 3), V1: (1, 1, 1, 300)}) == []
    # Unknown dimensions rule nothing out; what the user gave narrows.
    free = {"input:0": (None, None, None, 3), V1: (None, 1, 1, 1024)}
    assert names(free) == [f"mobilenet_v1_1.0_{s}" for s in (224, 192, 160, 128)]
    assert names(free, input_size=160) == ["mobilenet_v1_1.0_160"]
    assert names(free, input_tensor="Mul:0") == []


def test_a_row_added_to_the_catalog_is_recognised_without_code(tmp_path):
    from pipeline.catalog import load_catalog, match_backbones

    toml = tmp_path / "backbones.toml"
    toml.write_text('[[backbone]]\nname = "my_net"\ninput_tensor = "pixels:0"\nbottleneck_tensor = "feat:0"\n'
                    'alternates = ["features:0"]\nfeature_size = 64\ninput_size = 96\nmean = 0.0\nstd = 255.0\n')
    rows = load_catalog(toml)
    found = match_backbones({"pixels:0": (1, 96, 96, 3), "features:0": (1, 64)}, catalog=rows)
    assert [(s.name, b) for s, b in found] == [("my_net", "features:0")]


@pytest.fixture(scope="module")
def v1_lookalike(tmp_path_factory):
    """MobileNet v1 0.25_128 by names and shapes (a tiny graph at 128 px with 256 features)."""
    from tests.helpers.world import build_tiny_graph

    return build_tiny_graph(tmp_path_factory.mktemp("v1") / "frozen_graph.pb", size=128, channels=256)


def test_graph_alone_takes_its_tensors_size_and_normalisation_from_the_catalog(v1_lookalike, tmp_path):
    from pipeline.config import RunConfig
    from tests.helpers.lookalikes import lookalike_graph

    cfg = RunConfig(out=tmp_path / "r").with_options(graph=v1_lookalike)
    spec = cfg.backbone_spec()
    assert cfg.resolved().graph.recognised_as == "mobilenet_v1_0.25_128"
    assert (spec.input_tensor, spec.bottleneck_tensor, spec.feature_size, spec.input_size) == ("input:0", V1, 256, 128)
    assert spec.name == "custom:frozen_graph.pb" and "recognised as catalog backbone mobilenet_v1_0.25_128" in spec.notes
    # Inception v3 of 2015 is fed at Mul:0 and normalised with 128, not the usual 127.5.
    (tmp_path / "classify_image_graph_def.pb").write_bytes(lookalike_graph("inception_v3"))
    spec = RunConfig(out=tmp_path / "r").with_options(graph=tmp_path / "classify_image_graph_def.pb").backbone_spec()
    assert (spec.input_tensor, spec.bottleneck_tensor, spec.preprocessing.mean, spec.preprocessing.std) == (
        "Mul:0", "pool_3/_reshape:0", 128.0, 128.0)
    # An option given wins over the row, and still has to fit it.
    cfg = RunConfig(out=tmp_path / "r").with_options(graph=v1_lookalike, mean=0.0, std=255.0)
    assert cfg.backbone_spec().preprocessing.mean == 0.0 and cfg.resolved().graph.recognised_as
    assert "also needs" in " ".join(RunConfig(out=tmp_path / "r").with_options(graph=v1_lookalike,
                                                                               input_size=224).problems(False))


def test_an_unknown_graph_still_asks_for_the_missing_flags(tiny_graph, tmp_path):
    from pipeline.config import RunConfig

    problems = RunConfig(out=tmp_path / "r").with_options(graph=tiny_graph, input_size=32).problems(False)
    assert problems == [f"--graph {tiny_graph} also needs --input-tensor, --bottleneck-tensor: it matches no "
                        f"catalog backbone by its tensor names and shapes (see `edgepipe inspect {tiny_graph}`)"]
    problems = RunConfig(out=tmp_path / "r").with_options(model_graph=tiny_graph).problems(False)
    assert problems[0] == (f"--model-graph {tiny_graph} also needs --input-tensor, --input-size: it matches no "
                           f"catalog backbone by its tensor names and shapes (see `edgepipe inspect {tiny_graph}`)")


def test_rows_that_disagree_on_what_is_missing_are_named(tmp_path):
    import tensorflow as tf

    from pipeline.config import RunConfig

    graph = tf.Graph()
    with graph.as_default():  # an input of unknown size: every 1.0 resolution fits
        x = tf.compat.v1.placeholder(tf.float32, [None, None, None, 3], name="input")
        h = tf.nn.conv2d(x, tf.ones([1, 1, 3, 1024]), strides=1, padding="SAME")
        tf.reduce_mean(h, axis=[1, 2], keepdims=True, name=V1.split(":")[0])
    path = tmp_path / "any_size.pb"
    path.write_bytes(graph.as_graph_def().SerializeToString())
    problems = RunConfig(out=tmp_path / "r").with_options(graph=path).problems(False)
    assert problems == [f"--graph {path} matches catalog backbones mobilenet_v1_1.0_224, mobilenet_v1_1.0_192, "
                        "mobilenet_v1_1.0_160, mobilenet_v1_1.0_128 by its tensor names and shapes, and they differ "
                        "in --input-size; give --input-size to choose"]
    assert RunConfig(out=tmp_path / "r").with_options(graph=path, input_size=192).resolved().graph.recognised_as == (
        "mobilenet_v1_1.0_192")


# --- the options, checked at once before any work ---------------------------------------------------


def test_every_adoption_problem_is_reported_at_once(tiny_model_graph, tiny_images, tmp_path):
    import pipeline
    from pipeline.config import RunConfig
    from pipeline.errors import ConfigError

    labels = tmp_path / "retrained_labels.txt"
    labels.write_text("daisy\nrose\n")
    cfg = RunConfig(out=tmp_path / "r").with_options(
        model_graph=tiny_model_graph, input_tensor="input:0", input_size=32, labels=labels, images=tiny_images,
        backbone="mobilenet_v1_0.25_224", epochs=5, learning_rate=0.1, augment_copies=2, flip_left_right=True)
    given = {"model_graph", "input_tensor", "input_size", "labels", "images", "backbone", "epochs", "learning_rate",
             "augment_copies", "flip_left_right"}
    with pytest.raises(ConfigError) as err:
        pipeline.run(cfg, explicit=given)
    assert str(err.value) == "; ".join([
        f"--labels {labels}: 2 labels, but the graph's output {POETS_OUTPUT} has 3 classes; give one label per "
        "output, in output order (or leave out --labels to name them 0..2)",
        f"--backbone mobilenet_v1_0.25_224 contradicts --model-graph {tiny_model_graph}: the adopted graph is the "
        "whole model; drop --backbone",
        f"--epochs, --learning-rate, --augment-copies, --flip-left-right contradict --model-graph {tiny_model_graph}: "
        "its head is kept as it is and nothing is trained; drop them",
    ])
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("text, problem", [
    ("red\n\nblue\n", "line 2 is blank; give one class name per line, in output order"),
    ("red\nred\nblue\n", "'red' is there twice; each output needs its own name"),
    ("\n\n", "the file is empty; give one class name per line, in output order"),
])
def test_a_labels_file_that_cannot_name_the_outputs_is_one_line(tiny_model_graph, tmp_path, text, problem):
    from pipeline.config import RunConfig

    labels = tmp_path / "labels.txt"
    labels.write_text(text)
    cfg = RunConfig(out=tmp_path / "r").with_options(model_graph=tiny_model_graph, input_tensor="input:0",
                                                     input_size=32, labels=labels)
    assert cfg.problems(False) == [f"--labels {labels}: {problem}"]
    missing = tmp_path / "nope.txt"
    assert cfg.with_options(labels=missing).problems(False) == [f"--labels {missing}: no such file"]


def test_adoption_options_without_model_graph_and_both_graphs_are_contradictions(tiny_graph, tmp_path):
    from pipeline.config import RunConfig

    cfg = RunConfig(out=tmp_path / "r").with_options(labels=tmp_path / "l.txt", output_tensor="final_result:0")
    assert cfg.adopt is None
    assert cfg.problems(False, given={"labels", "output_tensor"}) == [
        "--output-tensor, --labels need --model-graph FILE.pb (with --graph or --backbone the labels are the class "
        "folders' names)"]
    both = RunConfig(out=tmp_path / "r").with_options(graph=tiny_graph, model_graph=tiny_graph, input_tensor="input:0",
                                                      input_size=32)
    assert both.problems(False, given={"graph", "model_graph"})[0].startswith("--graph and --model-graph: give one")


def test_the_command_line_says_it_in_one_line_with_exit_2(tiny_model_graph, tiny_images, tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\n")
    result = CliRunner().invoke(app, ["run", "--model-graph", str(tiny_model_graph), "--input-tensor", "input:0",
                                      "--input-size", "32", "--labels", str(labels), "--images", str(tiny_images),
                                      "--out", str(tmp_path / "r"), "--seed", "3"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --labels {labels}: 2 labels, but the graph's output")
    assert lines[0].endswith(f"--seed contradicts --model-graph {tiny_model_graph}: its head is kept as it is and "
                             "nothing is trained; drop it")


# --- the retrain stage's adopt path ---------------------------------------------------------------


def test_folders_match_labels_as_poets_wrote_them():
    from pipeline.retrain import match_labels

    folders = ("black eyed susan", "daisy")  # normalised folder names, label order
    assert match_labels(folders, ["daisy", "Black_Eyed_Susan", "rose"]) == ([1, 0], [])
    assert match_labels(folders, ["0", "1"]) == (None, ["black eyed susan", "daisy"])
    assert match_labels(folders, ["daisy", "Daisy", "black eyed susan"]) == (None, ["daisy"])  # two alike name neither


# --- whole chains on the tiny world ------------------------------------------------------------------

ADOPT_VARIANTS = {"quant_modes": ["float32", "int8"], "tfjs_modes": ["float32"], "latency_runs": 2}
SHUFFLED = ("red", "blue sky", "green leaf")  # the graph's output order, not the folders' label order


@pytest.fixture(scope="module")
def labelled_run(tiny_images, tiny_holdout, tmp_path_factory):
    """A tiny graph with its head adopted with a labels file whose order is not the folders'."""
    from tests.helpers.chain import run_chain

    root = tmp_path_factory.mktemp("adopt-labelled")
    graph = build_tiny_model_graph(root / "retrained_graph.pb", order=SHUFFLED)
    labels = root / "retrained_labels.txt"
    labels.write_text("\n".join(SHUFFLED) + "\n")
    manifest = run_chain(root / "run", model_graph=graph, input_tensor="input:0", input_size=32, labels=labels,
                         images=tiny_images, test_images=tiny_holdout, cache_dir=root / "cache", stress=True,
                         **ADOPT_VARIANTS)
    return root / "run", manifest, graph


@pytest.mark.chain
def test_an_adopted_graph_is_exported_converted_and_verified_against_itself(labelled_run):
    from tests.helpers.chain import read_json

    out, manifest, graph = labelled_run
    report = read_json(out / "report.json")
    assert report["labelled"] and report["classes"] == list(SHUFFLED)
    rows = {(r["artifact"], r["runtime"]): r for r in report["results"]}
    assert report["results"][0]["artifact"] == "frozen-graph"  # the original graph is the reference
    assert set(rows) >= {("savedmodel", "tensorflow"), ("tflite-float32", "ai-edge-litert"),
                         ("tflite-int8", "tflite-runtime"), ("tfjs-float32", "tfjs-wasm")}
    for r in report["results"]:
        assert r["passed"] and r["top1_agreement"] == 1.0, (r["artifact"], r["runtime"], r["error"])
        # The nearest-colour head is right only if the test images were relabelled into its order.
        assert r["accuracy"] == 1.0, (r["artifact"], r["runtime"])
    assert rows["savedmodel", "tensorflow"]["gate"] == 0.99
    assert "Reference: frozen-graph (frozen GraphDef) in tensorflow." in (out / "report.md").read_text()
    # --stress feeds the graph each mistake normalised as it takes its input: swapping red and blue
    # breaks the nearest-colour head, a nearest-neighbour resize of flat colours does not.
    stress = {s["mistake"]: s for s in report["stress"]}
    assert len(stress) == 8 and stress["BGR channel order"]["accuracy_drop"] >= 0.3
    assert stress["nearest-neighbour resize"]["accuracy_drop"] <= 0.1
    fetch = manifest["stages"]["fetch"]["info"]
    assert fetch["model"] == {"probabilities": POETS_OUTPUT, "logits": POETS_LOGITS, "classes": 3,
                              "found_by": "search", "softmax": True}
    assert manifest["config"]["adopt"]["labels"].endswith("retrained_labels.txt")


@pytest.mark.chain
def test_the_retrain_folder_holds_what_later_stages_read_and_no_head(labelled_run):
    import tensorflow as tf

    from tests.helpers.chain import read_json

    out, manifest, _ = labelled_run
    retrain = out / "retrain"
    assert (retrain / "labels.txt").read_text() == "red\nblue sky\ngreen leaf\n"
    assert read_json(retrain / "split.json")["classes"] == list(SHUFFLED)
    metrics = read_json(retrain / "metrics.json")
    assert metrics["history"] == {} and metrics["adopted"]["labelled"] and metrics["skipped"] == {}
    assert not (retrain / "head.npz").exists()
    assert manifest["stages"]["retrain"]["info"]["adopted"] is True
    signature = tf.saved_model.load(str(out / "export" / "savedmodel")).signatures["serving_default"]
    assert set(signature.structured_outputs) == {"probabilities", "logits"}
    assert signature.structured_input_signature[1]["images"].shape.as_list() == [None, 32, 32, 3]
    assert (out / "export" / "labels.txt").read_text() == "red\nblue sky\ngreen leaf\n"


@pytest.mark.chain
def test_a_resumed_adopted_run_keeps_its_graph_and_refuses_training_options(labelled_run):
    import pipeline
    from pipeline.errors import ConfigError
    from tests.helpers.chain import edgepipe_log

    out = labelled_run[0]
    cfg = pipeline.resume(out, progress=False)
    assert cfg.adopt is not None and cfg.graph.input_size == 32
    with edgepipe_log() as lines:
        pipeline.run(cfg)
    assert sum("up to date, skipped" in ln for ln in lines) == 6, lines
    with pytest.raises(ConfigError, match=r"^--epochs contradicts --model-graph .*retrained_graph.pb: its head is kept"):
        pipeline.run(pipeline.resume(out, epochs=10), explicit={"epochs"})


@pytest.mark.chain
def test_without_labels_the_outputs_are_numbered_and_verify_runs_unlabelled(tiny_images, tiny_holdout, tmp_path):
    """A graph whose probabilities are not a Softmax op (so no logits can be told): the SavedModel
    has `probabilities` alone, and every stage after it works with that."""
    import json

    import tensorflow as tf

    from tests.helpers.chain import edgepipe_log, read_json, run_chain

    graph = build_tiny_model_graph(tmp_path / "manual_softmax.pb", softmax="manual")
    with edgepipe_log() as lines:
        run_chain(tmp_path / "run", model_graph=graph, input_tensor="input:0", input_size=32, images=tiny_images,
                  test_images=tiny_holdout, cache_dir=tmp_path / "cache", **ADOPT_VARIANTS)
    assert any("no --labels given; the graph's 3 outputs are labelled 0..2" in ln for ln in lines), lines
    report = read_json(tmp_path / "run" / "report.json")
    assert report["classes"] == ["0", "1", "2"] and not report["labelled"]
    assert report["unlabelled_reason"].startswith("3 of the 3 class folders of ")
    assert all(r["passed"] and r["accuracy"] is None for r in report["results"]), report["results"]
    assert len(report["results"]) >= 6
    signature = tf.saved_model.load(str(tmp_path / "run" / "export" / "savedmodel")).signatures["serving_default"]
    assert set(signature.structured_outputs) == {"probabilities"}
    golden = json.loads((tmp_path / "run" / "quantize" / "golden" / "golden.json").read_text())
    assert golden["labels"] == ["0", "1", "2"]
    assert {e["true_label"] for e in golden["images"]} <= {"blue sky", "green leaf", "red"}  # the folders


# --- the real poets graph ------------------------------------------------------------------------------


@pytest.mark.slow  # about a minute: MobileNet v1 1.0 on 160 test images in four runtimes
@pytest.mark.chain
def test_the_published_poets_graph_is_adopted_whole_from_the_command_line(tmp_path):
    """The README's command: tensorflow-for-poets' retrained graph, no labels file, flowers8."""
    import json

    from tests.helpers.cli import edgepipe
    from tests.helpers.world import FLOWERS, SHARED, needs_shared

    graph = needs_shared(SHARED / "graphs" / "poets_retrained_mobilenet_v1_1.0_224.pb")
    out = tmp_path / "poets"
    proc = edgepipe("run", "--model-graph", graph, "--images", needs_shared(FLOWERS / "train"),
                    "--test-images", FLOWERS / "test", "--out", out, "--quant", "float32", "--quant", "int8",
                    "--tfjs", "float32", "--latency-runs", "5", "--quiet",
                    env={"EDGEPIPE_CACHE_DIR": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ("--model-graph poets_retrained_mobilenet_v1_1.0_224.pb: recognised as catalog backbone "
            "mobilenet_v1_1.0_224 by its tensor names and shapes") in proc.stderr
    assert "no --labels given; the graph's 2 outputs are labelled 0..1" in proc.stderr
    assert "verify runs unlabelled (agreement and drift only)" in proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert not report["labelled"] and report["classes"] == ["0", "1"] and report["n_test"] == 160
    rows = {(r["artifact"], r["runtime"]): r for r in report["results"]}
    assert list(rows)[0] == ("frozen-graph", "tensorflow")
    assert set(rows) == {("frozen-graph", "tensorflow"), ("savedmodel", "tensorflow"),
                         ("tflite-float32", "tflite-runtime"), ("tflite-float32", "ai-edge-litert"),
                         ("tflite-int8", "tflite-runtime"), ("tflite-int8", "ai-edge-litert"),
                         ("tfjs-float32", "tfjs-wasm")}
    for key, r in rows.items():
        assert r["passed"], (key, r["top1_agreement"], r["error"])
    # The float conversions are the graph to rounding; int8 moves a few borderline images.
    for key in [("savedmodel", "tensorflow"), ("tflite-float32", "ai-edge-litert"), ("tfjs-float32", "tfjs-wasm")]:
        assert rows[key]["top1_agreement"] == 1.0 and rows[key]["max_abs_diff"] < 1e-3, key
    assert "Agreement and drift only" in proc.stdout  # the report, printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["graph"]["recognised_as"] == "mobilenet_v1_1.0_224"
    assert manifest["stages"]["fetch"]["info"]["model"]["logits"] == POETS_LOGITS


@pytest.mark.chain
def test_a_run_directory_switches_between_a_retrained_head_and_an_adopted_graph(
        tiny_graph, tiny_model_graph, tiny_images, tiny_holdout, tmp_path):
    import tensorflow as tf

    from tests.helpers.chain import run_chain
    from tests.helpers.world import tiny_graph_options

    out, common = tmp_path / "run", {"images": tiny_images, "test_images": tiny_holdout, "cache_dir": tmp_path / "c"}
    run_chain(out, until="export", epochs=5, **tiny_graph_options(tiny_graph), **common)
    assert (out / "retrain" / "head.npz").is_file()
    manifest = run_chain(out, until="export", model_graph=tiny_model_graph, input_tensor="input:0", input_size=32,
                         **common)
    assert manifest["stages"]["fetch"]["info"]["model"]["probabilities"] == POETS_OUTPUT
    assert not (out / "retrain" / "head.npz").exists() and not (out / "retrain" / "training.png").exists()
    signature = tf.saved_model.load(str(out / "export" / "savedmodel")).signatures["serving_default"]
    assert set(signature.structured_outputs) == {"probabilities", "logits"}
    # And back: --graph with its tensors trains a head again (the saved adoption is dropped).
    manifest = run_chain(out, until="retrain", epochs=5, **tiny_graph_options(tiny_graph), **common)
    assert manifest["config"]["adopt"] is None and (out / "retrain" / "head.npz").is_file()

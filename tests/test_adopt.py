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

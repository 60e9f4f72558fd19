"""The retrain knobs, on synthetic features and on the tiny graph."""
from __future__ import annotations

import json

import numpy as np
import pytest

import pipeline
from pipeline.errors import ConfigError
from pipeline.retrain import Head, TrainConfig, class_weight_vector, evaluate_head, train_head
from tests.helpers.chain import run_chain
from tests.helpers.world import tiny_graph_options


def blobs(n_per_class=(40, 40, 40), dim=8, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (len(n_per_class), dim))
    x = np.concatenate([rng.normal(c, 1.0, (n, dim)) for c, n in zip(centres, n_per_class)]).astype(np.float32)
    y = np.concatenate([np.full(n, k) for k, n in enumerate(n_per_class)])
    return x, y


def test_same_seed_same_weights_other_seed_other_weights():
    x, y = blobs()
    cfg = TrainConfig(epochs=5, hidden_units=16, dropout=0.2)
    a, b = train_head(x, y, 3, cfg, progress=False), train_head(x, y, 3, cfg, progress=False)
    c = train_head(x, y, 3, TrainConfig(epochs=5, hidden_units=16, dropout=0.2, seed=1), progress=False)
    for (wa, ba), (wb, bb) in zip(a.layers, b.layers):
        np.testing.assert_array_equal(wa, wb)
        np.testing.assert_array_equal(ba, bb)
    assert not np.array_equal(a.layers[0][0], c.layers[0][0])


def test_steps_replace_epochs():
    x, y = blobs()
    head = train_head(x, y, 3, TrainConfig(steps=7, batch_size=32), progress=False)
    assert head.history["steps"] == 7


def test_hidden_layer_learns_and_round_trips_through_npz():
    x, y = blobs()
    head = train_head(x, y, 3, TrainConfig(epochs=60, hidden_units=32, dropout=0.1, learning_rate=0.01),
                      progress=False)
    assert len(head.layers) == 2 and head.layers[0][0].shape == (8, 32)
    assert evaluate_head(head, x, y, 3)["accuracy"] > 0.95
    again = Head.from_npz(head.to_npz())
    np.testing.assert_allclose(again.probabilities(x), head.probabilities(x))


def test_early_stopping_stops_and_keeps_the_best_validation_loss():
    x, y = blobs(seed=1)
    xv, yv = blobs(n_per_class=(10, 10, 10), seed=1)
    yv = np.random.default_rng(0).permutation(yv)  # validation that cannot improve for long
    head = train_head(x, y, 3, TrainConfig(epochs=200, early_stopping=3), xv, yv, progress=False)
    h = head.history
    assert h["stopped_early"] and len(h["epoch"]) < 200
    assert h["best_epoch"] == h["epoch"][int(np.argmin(h["val_loss"]))]


def test_balanced_class_weights_help_the_minority_class():
    x, y = blobs(n_per_class=(200, 200, 6), seed=3)
    plain = train_head(x, y, 3, TrainConfig(epochs=3, learning_rate=0.003), progress=False)
    weighted = train_head(x, y, 3, TrainConfig(epochs=3, learning_rate=0.003, class_weights="balanced"),
                          progress=False)
    w = class_weight_vector(y, 3, "balanced")
    assert w[2] > 10 * w[0]
    recall = lambda h: evaluate_head(h, x, y, 3)["per_class"]["recall"][2]  # noqa: E731
    assert recall(weighted) >= recall(plain)


def test_label_smoothing_softens_confidence():
    x, y = blobs()
    sharp = train_head(x, y, 3, TrainConfig(epochs=40), progress=False)
    soft = train_head(x, y, 3, TrainConfig(epochs=40, label_smoothing=0.3), progress=False)
    assert soft.probabilities(x).max(1).mean() < sharp.probabilities(x).max(1).mean()


def _knobs(root, tiny_graph, tiny_images) -> dict:
    return dict(images=tiny_images, **tiny_graph_options(tiny_graph), cache_dir=root / "cache",
                epochs=6, eval_every=2, checkpoint_every=3, summaries_dir=root / "tb", hidden_units=8,
                dropout=0.1, augment_copies=2, flip_left_right=True, random_crop=10, random_scale=10,
                random_brightness=10, validation_pct=20, test_pct=20, print_misclassified=True)


@pytest.fixture(scope="module")
def knob_run(tiny_graph, tiny_images, tmp_path_factory):
    """Every training and augmentation knob at once, through retrain (in-process)."""
    root = tmp_path_factory.mktemp("knobs")
    options = _knobs(root, tiny_graph, tiny_images)
    run_chain(root / "run", until="retrain", **options)
    return root, options


def test_knobs_reach_the_run_directory(knob_run):
    root, _ = knob_run
    out = root / "run" / "retrain"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["history"]["epoch"] == [2, 4, 6]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch_0003.npz", "epoch_0006.npz"]
    runs = list((root / "tb").iterdir())
    assert len(runs) == 1 and any(p.name.startswith("events.out.tfevents") for p in runs[0].iterdir())
    n_train = sum(metrics["counts"]["train"].values())
    assert metrics["augmented_training_examples"] == 2 * n_train
    assert (out / "confusion_matrix.png").stat().st_size > 1000 and (out / "training.png").exists()
    assert isinstance(metrics["misclassified"], list)
    head = np.load(out / "head.npz")
    assert sorted(head.files) == ["b0", "b1", "w0", "w1"]


def test_augmented_bottlenecks_are_cached(knob_run, tmp_path):
    root, options = knob_run
    run_chain(tmp_path / "again", until="retrain", **options)
    info = json.loads((tmp_path / "again" / "manifest.json").read_text())["stages"]["retrain"]["info"]
    assert info["bottlenecks"]["computed"] == 0 and info["bottlenecks"]["cached"] > 0


@pytest.mark.chain
def test_hidden_layer_head_exports_and_verifies(knob_run):
    root, _ = knob_run
    run_chain(root / "run", quant_modes=["float32", "int8"], tfjs_modes=["float32"])
    report = json.loads((root / "run" / "report.json").read_text())
    assert all(r["passed"] for r in report["results"])
    assert {r["artifact"] for r in report["results"]} == {"savedmodel", "tflite-float32", "tflite-int8", "tfjs-float32"}


def test_dropout_without_hidden_layer_is_a_config_error(tiny_images, tmp_path):
    cfg = pipeline.resume(tmp_path / "r", images=tiny_images, dropout=0.5, random_crop=5)
    with pytest.raises(ConfigError) as err:
        pipeline.validate(cfg)
    assert err.value.exit_code == 2
    assert "--dropout 0.5 needs --hidden-units" in str(err.value) and "--augment-copies" in str(err.value)

"""The int8 repair (pipeline/repair.py) on a model built to drift: one convolution whose every
output channel has an outlier weight on an input channel that is always zero. In float the
outlier costs nothing; in int8 each channel's weight scale is set by it, so the channel's real
weights round to zero. Keeping that one layer in float is the repair."""
from __future__ import annotations

import json

import numpy as np
import pytest

import pipeline.repair as repair
from pipeline.dataset import Example
from pipeline.quantize import Source, _images, calibrate, calibration_sample
from pipeline.types import QuantMode
from tests.helpers.drift import DRIFTING, PREP, drifting_savedmodel
from tests.helpers.world import make_image_folders


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("repair")
    sm = drifting_savedmodel(root / "savedmodel")
    images = make_image_folders(root / "images", per_class=24, size=40, seed=3)
    examples = [Example(str(p), k, "") for k, d in enumerate(sorted(images.iterdir())) for p in sorted(d.iterdir())]
    train, validation, test = examples[0::3], examples[1::3], examples[2::3]
    source = Source(sm)
    calibration = calibration_sample(train, 16)
    calibrated = calibrate(source, _images(calibration, PREP))
    judge = repair.Judge(sm, validation, PREP, root / "val", 4, labelled=False)
    test_judge = repair.Judge(sm, test, PREP, root / "test", 4, labelled=False)
    yield dict(source=source, calibrated=calibrated, calibration=calibration, train=train, judge=judge,
               test_judge=test_judge, root=root)
    judge.close()
    test_judge.close()


def _repair(world, goal, test_judge="real"):
    return repair.repair_int8(world["source"], world["calibrated"], world["calibration"],
                              calibration_sample(world["train"], 32), PREP, world["judge"], goal,
                              world["test_judge"] if test_judge == "real" else test_judge)


def test_the_drifting_layer_is_kept_in_float_and_the_file_agrees_again(world):
    plain = repair.quantize_int8(world["calibrated"])
    plain_score, _ = world["judge"].score(plain)
    assert plain_score.agreement < 0.9  # built to drift: the plain int8 file changes answers

    result = _repair(world, repair.Goal(0.99, None, 10_000_000))
    assert result.reached, result.reason
    more = len(calibration_sample(world["train"], 32))
    assert [a.step for a in result.attempts[:3]] == ["plain int8", f"calibration on {more} images", "per-tensor weights"]
    kept = result.chosen.float_layers
    assert len(kept) == 1 and DRIFTING in kept[0], kept
    assert result.chosen.validation_agreement >= 0.99
    assert result.chosen.test_agreement >= 0.95  # on images the search never chose by
    assert DRIFTING in result.layers[0]["tensor"]  # the debugger ranks it worst
    assert result.layers[0]["rmse_per_scale"] > 10 * result.layers[1]["rmse_per_scale"]
    # The repaired file is the same quantiser's output with that layer in float, and it loads and runs.
    again, _ = world["judge"].score(result.model)
    assert again.agreement == result.chosen.validation_agreement
    assert len(result.model) > len(plain)


def test_the_choice_is_made_on_the_validation_split_only(world):
    """A test split that says the opposite of everything changes no choice."""

    class Contrary:
        def score(self, data, latency_runs=0):
            return repair.Score(0.0, None, 99.0, None), 1.0

    honest = _repair(world, repair.Goal(0.99, None, 10_000_000))
    contrary = _repair(world, repair.Goal(0.99, None, 10_000_000), test_judge=Contrary())
    assert [a.float_layers for a in contrary.attempts] == [a.float_layers for a in honest.attempts]
    assert contrary.chosen.float_layers == honest.chosen.float_layers
    assert contrary.model == honest.model
    assert all(a.test_agreement == 0.0 for a in contrary.attempts)  # reported, never used


def test_the_size_limit_stops_the_search_with_the_reason(world):
    plain = repair.quantize_int8(world["calibrated"])
    result = _repair(world, repair.Goal(0.99, None, len(plain) + 16))
    assert not result.reached and result.model is None
    assert result.reason.startswith("stopped at the size limit: 1 layer(s) in float make")
    assert "raise --int8-repair-max-size" in result.reason
    assert result.chosen.size_bytes <= len(plain) + 16  # the best file within the limit


def test_a_plain_file_that_meets_the_goal_is_kept_as_it_is(world):
    result = _repair(world, repair.Goal(0.0, None, 10_000_000))
    assert result.reached and [a.step for a in result.attempts] == ["plain int8"]
    assert result.chosen.float_layers == [] and result.model == repair.quantize_int8(world["calibrated"])


def test_the_accuracy_bound_fails_a_row_that_agrees_but_loses_points():
    from pipeline.report import why_failed
    from pipeline.verify import Result, bound_accuracy

    def row(flipped, flipped_to):
        return Result("tflite-int8", "ai-edge-litert", 0.96, 0.5, None, None, None, 0.0, 0.0, 0.0, 1, None, 0.9, True,
                      flipped=flipped, flipped_to=flipped_to)

    labels = np.zeros(1000, int)
    reference = np.zeros(1000, int)
    reference[:100] = 1  # the reference gets 900 right
    lossy = row(list(range(100, 130)), [1] * 30)  # 30 more wrong: 3 points, far from chance
    bound_accuracy(lossy, reference, labels, 1.0)
    assert not lossy.passed and lossy.accuracy_drop == 3.0 and lossy.accuracy_drop_p < 1e-6
    assert why_failed(lossy.to_dict()).startswith("accuracy 0.5000 is 3.0 points below the reference's (at most 1, "
                                                  "--max-accuracy-drop; McNemar p = ")
    swapped = row(list(range(100, 130)) + list(range(30)), [1] * 30 + [0] * 30)  # 30 lost, 30 gained
    bound_accuracy(swapped, reference, labels, 1.0)
    assert swapped.passed and swapped.accuracy_drop == 0.0
    small = row([5], [1])  # one image of 18 is 5.6 points, and chance
    bound_accuracy(small, np.zeros(18, int), np.zeros(18, int), 1.0)
    assert small.passed and small.accuracy_drop == 5.5556 and small.accuracy_drop_p == 0.5
    unbounded = row(list(range(100, 130)), [1] * 30)
    bound_accuracy(unbounded, reference, labels, None)
    assert unbounded.passed and unbounded.accuracy_drop is None


def test_a_drifting_dynamic_range_file_is_repaired_with_that_layer_in_float(world):
    """Dynamic range has no calibration and no debugger: ai-edge-quantizer makes the files and the
    layers are ranked by the drift of each alone quantised."""
    from pipeline.quantize import convert_tflite

    float32 = convert_tflite(world["source"], QuantMode.FLOAT32)
    plain = convert_tflite(world["source"], QuantMode.DYNAMIC)  # TensorFlow's, as the quantize stage writes it
    assert world["judge"].score(plain)[0].agreement < 0.9
    result = repair.repair_dynamic(float32, plain, world["judge"], repair.Goal(0.99, None, 10_000_000),
                                   world["test_judge"])
    assert result.reached, result.reason
    assert [a.step for a in result.attempts[:2]] == ["plain dynamic-range", "ai-edge-quantizer's dynamic-range recipe"]
    assert len(result.chosen.float_layers) == 1 and DRIFTING in result.chosen.float_layers[0]
    assert DRIFTING in result.layers[0]["tensor"]
    assert world["judge"].score(result.model)[0].agreement >= 0.99 and result.chosen.test_agreement >= 0.95


def test_repaired_variant_mode_names():
    assert repair.REPAIRED == {QuantMode.INT8: "int8-repaired", QuantMode.DYNAMIC: "dynamic-repaired"}


@pytest.mark.slow
def test_a_missed_size_limit_exits_3_with_one_line_and_writes_no_repaired_file(chain_copy):
    """A run whose SavedModel drifts in int8 (the drifting model, with the tiny world's three
    classes, in place of the export), asked to repair within a limit no float layer fits in: the
    quantize command says why in one line and exits 3; the plain variants are written, no repaired one."""
    import shutil

    from tests.helpers.cli import edgepipe

    out = chain_copy.out
    sm = out / "export" / "savedmodel"
    shutil.rmtree(sm)
    drifting_savedmodel(sm, classes=3)
    from pipeline.rundir import sha256_tree

    manifest = json.loads((out / "manifest.json").read_text())  # the export stage is done, with this output
    manifest["stages"]["export"]["outputs"]["savedmodel"]["sha256"] = sha256_tree(sm)
    (out / "manifest.json").write_text(json.dumps(manifest))
    env = {"EDGEPIPE_CACHE_DIR": str(chain_copy.cache)}
    modes = ("float32", "float16", "int8")  # int16x8 converts from the SavedModel's variables
    r = edgepipe("quantize", "--out", str(out), "--int8-repair", *[a for m in modes for a in ("--quant", m)],
                 "--offline", "--quiet", env=env)
    assert r.returncode == 0, r.stderr
    q = out / "quantize"
    repaired = json.loads((q / "repair-int8.json").read_text())
    assert repaired["reached"] and len(repaired["chosen"]["float_layers"]) == 1
    assert (q / "int8-repaired.tflite").exists()
    r = edgepipe("verify", "--out", str(out), "--runtime", "ai-edge-litert", "--runtime", "tflite-runtime",
                 "--offline", "--quiet", env=env)
    rows = {(x["artifact"], x["runtime"]): x for x in json.loads((out / "report.json").read_text())["results"]}
    for runtime in ("ai-edge-litert", "tflite-runtime"):  # verified like every other file
        assert rows["tflite-int8-repaired", runtime]["top1_agreement"] > rows["tflite-int8", runtime]["top1_agreement"]
    assert "## int8 repair" in (out / "report.md").read_text()
    page = (out / "report.html").read_text()  # the page shows the same attempts, and the picture inlined
    assert "<h2>int8 repair</h2>" in page and page.count("<tr><td class=l>") >= len(repaired["attempts"])
    assert f"<td class=l>{repaired['chosen']['step']}</td>" in page and "data:image/png;base64," in page.split("int8 repair")[1]
    plain, fixed = repaired["attempts"][0]["size_bytes"], repaired["chosen"]["size_bytes"]
    pct = 100 * (plain + fixed) / 2 / (q / "float32.tflite").stat().st_size  # room for no float layer

    r = edgepipe("quantize", "--out", str(out), "--int8-repair-max-size", f"{pct:.3f}", "--offline", "--quiet", env=env)
    assert r.returncode == 3, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "int8 repair stopped at the size limit" in errors[0], r.stderr
    assert errors[0].endswith(f"(see {q / 'repair-int8.json'})"), errors[0]
    info = json.loads((out / "manifest.json").read_text())["stages"]["quantize"]["info"]["repair"]["int8"]
    assert info["needed"] and not info["reached"]
    assert not (q / "int8-repaired.tflite").exists()  # the earlier repaired file is gone, not left stale
    assert (q / "repair-int8.json").exists() and (q / "repair-int8.png").exists()
    assert all((q / f"{m}.tflite").exists() for m in modes)


def test_a_small_validation_split_is_judged_with_augmented_copies_of_each_photo(world, tmp_path):
    """49 photos cannot show a 1 % flip rate: the repair judges each in 15 augmented copies too, the
    same every time, labelled as their photo, the photo itself first and as verify prepares it."""
    assert [repair.copies_to_see(n) for n in (49, 150, 999, 1000, 5000, 5)] == [15, 6, 1, 0, 0, 15]
    validation = world["judge"].holdout
    n = len(validation)
    examples = [Example(p, k % 4, "") for k, p in enumerate(validation.paths)]
    first = repair.augmented_holdout(examples, PREP, tmp_path / "a", 3, labelled=True)
    again = repair.augmented_holdout(examples, PREP, tmp_path / "b", 3, labelled=True)
    x, y = first.contract.read(0, len(first)), again.contract.read(0, len(again))
    assert len(first) == 4 * n and np.array_equal(x, y)
    assert np.array_equal(x[0::4], validation.contract.read(0, n))  # each photo as verify prepares it
    assert all(not np.array_equal(x[k], x[k + 1]) for k in range(0, 4 * n, 4))  # then its copies
    assert list(first.labels) == [k % 4 for k in range(n) for _ in range(4)] and first.paths[1] == validation.paths[0]

"""scripts/cross_validate.py: settings scored on the training folder alone, each photo held out once."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers.world import REPO, tiny_graph_options


def _script(*args, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/cross_validate.py", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def _images(folder) -> set[str]:
    return {str(p.resolve()) for p in folder.rglob("*.png")} | {str(p.resolve()) for p in folder.rglob("*.jpg")}


@pytest.mark.slow
def test_each_training_photo_is_held_out_once_and_the_fewest_errors_choose(tmp_path, tiny_graph, tiny_images,
                                                                           tiny_holdout, cache_dir):
    options = [a for k, v in tiny_graph_options(tiny_graph).items() if k != "graph" for a in ("--option", f"{k}={v}")]
    done = _script("--images", tiny_images, "--test-images", tiny_holdout, "--graph", tiny_graph, "--folds", 3,
                   "--try", "barely trained: epochs=1 learning_rate=1e-6", "--try", "trained: epochs=60",
                   "--out", tmp_path / "cv", *options)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    saved = json.loads((tmp_path / "cv" / "cross-validation.json").read_text())
    train, holdout = _images(tiny_images), _images(tiny_holdout)
    bad, good = saved["settings"]
    for row in (bad, good):
        assert row["photos"] == len(train) and len(row["folds"]) == 3 and sum(row["folds"]) == row["errors"]
        assert {m["path"] for m in row["mistakes"]} <= train  # held-out mistakes come from the training folder
        assert row["test_photos"] == len(holdout) and {m["path"] for m in row["test_mistakes"]} <= holdout
    assert bad["errors"] > good["errors"] == 0 and bad["options"] == {"epochs": 1, "learning_rate": 1e-6}
    assert saved["chosen"] == "trained"
    assert "chosen by cross-validation: trained (CV 1.0000); its test accuracy 1.0000" in done.stdout
    # The folds partition the training photos by name alone.
    sys.path.insert(0, str(REPO / "scripts"))
    from cross_validate import fold_of

    sizes = [sum(fold_of(p, 3) == k for p in train) for k in range(3)]
    assert sum(sizes) == len(train) and min(sizes) > 0


def test_a_setting_that_is_not_key_value_is_refused_in_one_line(tmp_path, tiny_images):
    done = _script("--images", tiny_images, "--try", "ft2: fine_tune", "--out", tmp_path / "cv")
    assert done.returncode == 1
    assert done.stderr.strip() == "error: --try 'ft2: fine_tune': 'fine_tune' is not key=value (e.g. fine_tune=2)"
    assert not (tmp_path / "cv").exists()
    assert os.listdir(tmp_path) == []


def test_near_duplicates_named_nohash_share_a_fold():
    sys.path.insert(0, str(REPO / "scripts"))
    from cross_validate import fold_of

    assert fold_of("/x/a/rose_nohash_1.jpg", 5) == fold_of("/y/b/rose_nohash_2.jpg", 5)
    assert len({fold_of(f"photo_{i}.jpg", 5) for i in range(50)}) == 5

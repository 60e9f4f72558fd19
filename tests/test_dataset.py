
import pytest

from pipeline.dataset import build_dataset, normalise_class_name, split_of
from pipeline.errors import DatasetError
from tests.helpers.world import make_image_folders


def test_split_depends_only_on_the_name():
    names = [f"img_{i}.jpg" for i in range(2000)]
    before = {n: split_of(n, 10, 10) for n in names}
    more = names + [f"new_{i}.jpg" for i in range(500)]
    after = {n: split_of(n, 10, 10) for n in more}
    assert all(after[n] == before[n] for n in names)
    share = {s: sum(v == s for v in before.values()) / len(before) for s in ("train", "validation", "test")}
    assert 0.07 < share["validation"] < 0.13 and 0.07 < share["test"] < 0.13


def test_nohash_suffix_keeps_near_duplicates_together():
    splits = {split_of(f"rose_nohash_{i}.jpg", 30, 30) for i in range(50)}
    assert len(splits) == 1


def test_class_names_are_normalised():
    assert normalise_class_name("Blue-Sky_2") == "blue sky 2"


def test_holdout_folder_replaces_test_split(tiny_images, tiny_holdout):
    ds = build_dataset(tiny_images, tiny_holdout)
    test = ds.split("test")
    assert ds.classes == ("blue sky", "green leaf", "red")
    assert len(test) == 18 and all(str(tiny_holdout) in e.path for e in test)
    assert not any(str(tiny_holdout) in e.path for e in ds.split("train") + ds.split("validation"))


def test_one_class_and_empty_class_are_reported_together(tmp_path):
    make_image_folders(tmp_path / "imgs", per_class=3, colours={"only": (1, 2, 3)})
    (tmp_path / "imgs" / "empty").mkdir()
    with pytest.raises(DatasetError) as err:
        build_dataset(tmp_path / "imgs")
    msg = str(err.value)
    assert f"{tmp_path / 'imgs' / 'empty'}: no images" in msg
    (tmp_path / "imgs" / "empty").rmdir()
    with pytest.raises(DatasetError, match="found 1 class folder"):
        build_dataset(tmp_path / "imgs")


def test_missing_folder_names_it(tmp_path):
    with pytest.raises(DatasetError, match=str(tmp_path / "nope")):
        build_dataset(tmp_path / "nope")


def test_hidden_and_non_image_files_are_ignored(tmp_path):
    root = make_image_folders(tmp_path / "imgs", per_class=4)
    (root / "Red" / ".DS_Store").write_bytes(b"\0\0")
    (root / "Red" / "notes.txt").write_text("hi")
    (root / ".git").mkdir()
    ds = build_dataset(root)
    assert len(ds.examples) == 12 and len(ds.classes) == 3

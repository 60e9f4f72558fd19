"""Property-based tests: the folder scanner, the split and archive extraction, on random input."""
from __future__ import annotations

import io
import math
import os
import random
import tarfile
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from pipeline.dataset import build_dataset, folder_problems, normalise_class_name, scan_classes, split_of
from pipeline.errors import DatasetError, FetchError
from pipeline.fetch import extract_member
from pipeline.images import IMAGE_SUFFIXES

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Names a user's folders really have: any script, spaces, shell metacharacters, leading dots.
name_chars = st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/")
odd_text = st.one_of(
    st.text(name_chars, min_size=1, max_size=12),
    st.sampled_from(["$HOME", "a;b", "it's", "*", "?", "[x]", " lead", "trail ", ".hidden", "-rf", "\\", "..x",
                     "Café", "cafe\u0301", "玫瑰", "ß", "İ", "ﬁ", "_", "a_b", "A", "a"]),
)
suffix = st.sampled_from([".jpg", ".JPG", ".png", ".jpeg", ".gif", ".txt", "", ".DS_Store", ".webp"])
kind = st.sampled_from(["file", "file", "file", "dir", "link-parent", "link-self", "dangling", "fifo"])
tree = st.lists(
    st.tuples(odd_text, st.lists(st.tuples(odd_text, suffix, kind), max_size=5)), max_size=6,
)


def _make(root: Path, spec) -> None:
    for folder, entries in spec:
        if folder in (".", "..") or len(folder.encode()) > 200:
            continue
        d = root / folder
        d.mkdir(exist_ok=True)
        for stem, suf, k in entries:
            name = stem + suf
            if name in (".", "..") or len(name.encode()) > 200:
                continue
            p = d / name
            if p.exists() or p.is_symlink():
                continue
            if k == "file":
                p.write_bytes(b"x")
            elif k == "dir":
                p.mkdir()
            elif k == "link-parent":
                p.symlink_to("..")
            elif k == "link-self":
                p.symlink_to(name)
            elif k == "dangling":
                p.symlink_to("does-not-exist")
            else:
                os.mkfifo(p)


# --- the scanner --------------------------------------------------------------------------------

@FUZZ
@given(tree)
def test_scanning_any_tree_lists_images_only_in_label_order_or_names_the_problem(spec):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _make(root, spec)
        try:
            classes = scan_classes(root)
        except DatasetError as err:
            assert "\n" not in str(err) and str(root) in str(err)
            return
        assert list(classes) == sorted(classes)
        for name, files in classes.items():
            assert name and normalise_class_name(name) == name
            for f in files:
                assert not f.name.startswith(".") and f.suffix.lower() in IMAGE_SUFFIXES and not f.is_dir()
                assert not f.parent.name.startswith(".")
        listed = {f for files in classes.values() for f in files}
        for sub in root.iterdir():
            if sub.name.startswith(".") or not sub.is_dir():
                continue
            for p in sub.iterdir():
                wanted = not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir()
                assert (p in listed) == wanted, p
        # The configuration check and the dataset builder agree and never crash either.
        problems = folder_problems(root)
        assert all(isinstance(s, str) and "\n" not in s for s in problems)
        if problems:
            with pytest.raises(DatasetError):
                build_dataset(root)
        else:
            assert len(build_dataset(root).classes) == len(classes)


@FUZZ
@given(st.text(max_size=30))
def test_class_name_normalisation_is_idempotent_and_clean(name):
    once = normalise_class_name(name)
    assert normalise_class_name(once) == once
    assert once == once.strip() and "  " not in once and "_" not in once


# --- the split ----------------------------------------------------------------------------------

file_names = st.lists(st.text(name_chars, min_size=1, max_size=10).map(lambda s: s + ".jpg"),
                      min_size=1, max_size=25, unique=True)


@FUZZ
@given(file_names, file_names, st.floats(0, 40), st.floats(0, 40))
def test_adding_or_removing_images_never_moves_the_others(names, extra, val_pct, test_pct):
    names = [n for n in names if len(n.encode()) < 200 and n not in (".jpg",) and not n.startswith(".")]
    extra = [n for n in extra if len(n.encode()) < 200 and n not in names and not n.startswith(".")]
    assume(names)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for cls in ("a", "b"):
            (root / cls).mkdir()
            for n in names:
                (root / cls / n).write_bytes(b"x")

        def splits() -> dict[str, str]:
            try:
                ds = build_dataset(root, validation_pct=val_pct, test_pct=test_pct)
            except DatasetError as err:
                assume("fall in the validation/test split" not in str(err))
                raise
            return {e.path: e.split for e in ds.examples}

        before = splits()
        for cls in ("a", "b"):
            for n in extra:
                (root / cls / n).write_bytes(b"x")
        grown = splits()
        assert all(grown[p] == s for p, s in before.items())
        for p in list(before)[::2]:
            if len(before) > 2:
                Path(p).unlink()
        shrunk = splits()
        assert all(before[p] == s for p, s in shrunk.items() if p in before)


@settings(max_examples=25, deadline=None)
@given(st.floats(0, 45), st.floats(0, 45), st.integers(0, 2**32 - 1))
def test_split_percentages_hold_statistically(val_pct, test_pct, seed):
    rng = random.Random(seed)
    n = 4000
    names = [f"{rng.getrandbits(64):016x}_{i}.jpg" for i in range(n)]
    counts = {"train": 0, "validation": 0, "test": 0}
    for name in names:
        counts[split_of(name, val_pct, test_pct)] += 1
    for split, pct in (("validation", val_pct), ("test", test_pct), ("train", 100 - val_pct - test_pct)):
        p = pct / 100
        sigma = math.sqrt(n * p * (1 - p)) or 1.0
        assert abs(counts[split] - n * p) <= 5 * sigma + 1, (split, counts, pct)


@FUZZ
@given(st.text(name_chars, min_size=1, max_size=10), st.lists(st.integers(0, 10**6), min_size=2, max_size=8),
       st.floats(0, 45), st.floats(0, 45))
def test_nohash_variants_always_share_a_split(stem, suffixes, val_pct, test_pct):
    assert len({split_of(f"{stem}_nohash_{k}.jpg", val_pct, test_pct) for k in suffixes}) == 1


# --- archive extraction -------------------------------------------------------------------------

part = st.sampled_from(["a", "b", "model.pb", "labels.txt", "..", ".", "", "C:", "..\\x", "~", "dev"])
member_name = st.one_of(
    st.lists(part, min_size=1, max_size=4).map("/".join),
    st.lists(part, min_size=1, max_size=3).map(lambda ps: "/" + "/".join(ps)),
    st.just("model.pb"), st.just("./model.pb"), st.just("a/model.pb"),
)
member_type = st.sampled_from([tarfile.REGTYPE, tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE,
                               tarfile.LNKTYPE, tarfile.FIFOTYPE, tarfile.CHRTYPE])
safe_name = st.lists(st.sampled_from(["a", "b", "model.pb", "labels.txt"]), min_size=1, max_size=3).map("/".join)
members = st.one_of(
    st.lists(st.tuples(member_name, member_type, member_name, st.binary(max_size=64)), min_size=1, max_size=8),
    # Archives with nothing unsafe in them, so extraction also succeeds and follows links.
    st.lists(st.tuples(safe_name, st.sampled_from([tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE]),
                       safe_name, st.binary(max_size=64)), min_size=1, max_size=8),
)


def _tar(entries) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, typ, link, data in entries:
            info = tarfile.TarInfo(name or "x")
            info.type = typ
            if typ in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                info.linkname = link
            if typ == tarfile.REGTYPE:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return buf.getvalue()


def _snapshot(root: Path) -> dict[str, bytes | str]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            out[str(p.relative_to(root))] = ("link:" + os.readlink(p)) if p.is_symlink() else (
                p.read_bytes() if p.is_file() else "dir")
    return out


@FUZZ
@given(members, st.sampled_from(["model.pb", "a/model.pb", "b/labels.txt"]))
# Found by this test: a link member whose target is missing made tarfile raise KeyError, and a
# link cycle made it recurse until RecursionError.
@example(entries=[("model.pb", tarfile.SYMTYPE, "a", b"")], wanted="model.pb")
@example(entries=[("model.pb", tarfile.SYMTYPE, "model.pb", b"")], wanted="model.pb")
@example(entries=[("a", tarfile.LNKTYPE, "model.pb", b""), ("model.pb", tarfile.SYMTYPE, "a", b"")], wanted="model.pb")
@example(entries=[("a", tarfile.REGTYPE, "", b"graph"), ("model.pb", tarfile.LNKTYPE, "a", b"")], wanted="model.pb")
def test_no_archive_can_write_outside_the_target_folder(entries, wanted):
    with tempfile.TemporaryDirectory() as tmp:
        sandbox = Path(tmp)
        (sandbox / "victim.txt").write_bytes(b"untouched")
        archive = sandbox / "graph.tar"
        archive.write_bytes(_tar(entries))
        dest = sandbox / "out"
        dest.mkdir()
        before = {k: v for k, v in _snapshot(sandbox).items() if not k.startswith("out")}
        try:
            extract_member(archive, wanted, dest, backbone="fuzz")
        except FetchError as err:
            assert "\n" not in str(err)
        after = _snapshot(sandbox)
        # Nothing outside `out/` changed or appeared...
        assert {k: v for k, v in after.items() if not k.startswith("out")} == before
        # ...and inside it there are only plain files and folders, never a link to follow later.
        for rel, v in after.items():
            if rel.startswith("out"):
                assert not (isinstance(v, str) and v.startswith("link:")), rel
                assert (sandbox / rel).resolve().is_relative_to(dest.resolve()), rel

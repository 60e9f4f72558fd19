"""Scanning ``DIR/<class>/*`` image folders and the stable train/validation/test split."""
from __future__ import annotations

import hashlib
import os
import re
import unicodedata
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from pipeline.errors import DatasetError
from pipeline.images import IMAGE_SUFFIXES

SPLITS = ("train", "validation", "test")
# As in tensorflow-for-poets' retrain.py: hash buckets over a large modulus, so percentages are
# fine-grained and an image's bucket depends only on its own name.
_MAX_PER_CLASS = 2**27 - 1


@dataclass(frozen=True)
class Example:
    path: str
    label: int
    split: str


@dataclass(frozen=True)
class Dataset:
    """Class names (index = label) and every example with its split."""

    classes: tuple[str, ...]
    examples: tuple[Example, ...]

    def split(self, name: str) -> list[Example]:
        return [e for e in self.examples if e.split == name]

    def counts(self) -> dict[str, dict[str, int]]:
        out = {s: {c: 0 for c in self.classes} for s in SPLITS}
        for e in self.examples:
            out[e.split][self.classes[e.label]] += 1
        return out

    def to_dict(self) -> dict:
        return {"classes": list(self.classes), "examples": [asdict(e) for e in self.examples]}

    @classmethod
    def from_dict(cls, d: dict) -> "Dataset":
        return cls(tuple(d["classes"]), tuple(Example(**e) for e in d["examples"]))


def normalise_class_name(folder: str) -> str:
    """Lower case, non-alphanumerics to spaces (as poets did, so labels read well in apps).

    Letters and digits of every script count ("Café" → "café", "玫瑰" stays), and names are
    NFC-normalised so a folder copied from macOS (NFD) gives the same label.
    """
    name = unicodedata.normalize("NFC", folder).lower()
    return re.sub(r"[\W_]+", " ", name).strip()


def name_hash(filename: str) -> int:
    """A hash of a file's name alone: the part before ``_nohash_`` decides, so
    ``photo_nohash_1.jpg`` and ``photo_nohash_2.jpg`` hash the same."""
    stem = re.sub(r"_nohash_.*$", "", os.path.basename(filename))
    return int(hashlib.sha1(stem.encode("utf-8")).hexdigest(), 16)


def split_of(filename: str, validation_pct: float, test_pct: float) -> str:
    """The split of one file, from a hash of its name alone.

    The part of the name before ``_nohash_`` decides, so near-duplicates named
    ``photo_nohash_1.jpg`` and ``photo_nohash_2.jpg`` land in the same split. Adding or removing
    other images never moves this one.
    """
    pct = (name_hash(filename) % (_MAX_PER_CLASS + 1)) * (100.0 / _MAX_PER_CLASS)
    if pct < validation_pct:
        return "validation"
    if pct < validation_pct + test_pct:
        return "test"
    return "train"


def _listdir(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except OSError as err:
        raise DatasetError(f"{folder}: cannot list the folder ({err.strerror or err})") from None


def _url_files(root: str) -> dict[str, list[str]]:
    """The image files of each class folder under a URL (``gs://bucket/photos``), by folder name,
    listed through Beam's filesystems (object stores have no empty folders)."""
    import pipeline.storage as storage

    try:
        found = storage.listing(storage.join(root, "*", "*"))
    except OSError as err:
        raise DatasetError(f"image folder {root}: {str(err).removeprefix(storage.join(root, '*', '*') + ': ')}") from None
    out: dict[str, list[str]] = {}
    for url, _, _ in found:
        folder, name = url[len(root.rstrip("/")) + 1:].split("/", 1)
        if not folder.startswith(".") and not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES:
            out.setdefault(folder, []).append(url)
    if not out:
        raise DatasetError(f"image folder {root} holds no <class>/<image> files; pass --images URL with one "
                           "sub-folder per class")
    return out


def _is_url(root) -> bool:
    return "://" in str(root)


def class_folders(root: Path | str) -> list[tuple[str, Path | str]]:
    """``(normalised name, folder)`` of every class folder under ``root`` (a folder, or a URL on a
    Beam filesystem), in label order.

    Raises:
        DatasetError: the folder is missing, or two folders give the same or an empty label.
    """
    if _is_url(root):
        return _label_order({folder: f"{str(root).rstrip('/')}/{folder}" for folder in _url_files(str(root))})
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"image folder {root} does not exist; pass --images DIR with one sub-folder per class")
    return _label_order({p.name: p for p in _listdir(root) if not p.name.startswith(".") and p.is_dir()})


def _label_order(subs: dict) -> list[tuple[str, Path | str]]:
    # Label order follows the normalised names, so renaming "Roses" to "roses" keeps the labels.
    out: dict[str, Path | str] = {}
    for folder in sorted(subs, key=lambda f: (normalise_class_name(f), f)):
        sub, name = subs[folder], normalise_class_name(folder)
        if not name:
            raise DatasetError(f"{sub}: the folder name has no letters or digits to use as a class label; rename it")
        if name in out:
            raise DatasetError(f"{sub}: class folder names collide after normalisation ({name!r}); rename one")
        out[name] = sub
    return list(out.items())


def scan_classes(root: Path | str) -> dict[str, list[Path] | list[str]]:
    """Maps each class folder (normalised name) to its image files, sorted (URLs under a URL).

    Hidden files and folders are ignored; only known image suffixes count. Entries with an image
    suffix that are not regular files (dangling symlinks, FIFOs) are kept, so that the retrain
    stage reports them as skipped instead of dropping them silently; symlinks to folders (even
    loops) are never followed.

    Raises:
        DatasetError: the folder is missing, cannot be listed, or two class folders collide.
    """
    if _is_url(root):
        files = _url_files(str(root))
        folders = _label_order({folder: f"{str(root).rstrip('/')}/{folder}" for folder in files})
        return {name: sorted(files[sub.rsplit("/", 1)[1]]) for name, sub in folders}
    return {
        name: sorted(
            p for p in _listdir(sub)
            if not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir()
        )
        for name, sub in class_folders(root)
    }


def folder_problems(
    images: Path, test_images: Path | None = None, validation_pct: float = 10.0, test_pct: float = 10.0,
) -> list[str]:
    """Every reason the folders cannot be trained on, found by listing them (no image is read).

    Used by the configuration check, so these problems are reported before anything is fetched.
    """
    try:
        folders = class_folders(images)
        classes = scan_classes(images)
        test_classes = scan_classes(test_images) if test_images else {}
    except DatasetError as err:
        return [str(err)]
    problems = [f"{sub}: no images (expected {', '.join(sorted(IMAGE_SUFFIXES))} files)"
                for name, sub in folders if not classes[name]]
    if len(classes) < 2:
        problems.append(f"{images}: found {len(classes)} class folder(s), need at least 2 (one sub-folder per class)")
    unknown = sorted(set(test_classes) - set(classes))
    if unknown:
        problems.append(f"{test_images}: classes {unknown} are not in {images}")
    if test_images and (str(images).rstrip("/") == str(test_images).rstrip("/") if _is_url(images)
                        else Path(images).resolve() == Path(test_images).resolve()):
        problems.append(f"--test-images {test_images} is the --images folder: test accuracy would be "
                        "measured on training images; pass a separate holdout folder")
    effective_test = 0.0 if test_images else test_pct
    for name, files in classes.items():
        if files and all(split_of(os.path.basename(f), validation_pct, effective_test) != "train" for f in files):
            problems.append(
                f"class {name!r}: all {len(files)} image(s) fall in the validation/test split "
                "(by a hash of the file name); add images or lower --validation-pct/--test-pct"
            )
    return problems


def _absolute(path: Path | str) -> str:
    # The folder resolved, the file's own name kept: a symlinked (or dangling, or looping) image
    # is read and reported under the name the user gave it. A URL is absolute already.
    if _is_url(path):
        return str(path)
    return str(path.parent.resolve() / path.name)


def build_dataset(
    images: Path, test_images: Path | None = None,
    validation_pct: float = 10.0, test_pct: float = 10.0,
) -> Dataset:
    """Scans the folders and assigns every image a split.

    With ``test_images`` the test split is that folder (same class names) and ``images`` is split
    into train and validation only.

    Raises:
        DatasetError: fewer than two classes, a class without images, or test classes that the
            training folder does not have.
    """
    if not 0 <= validation_pct < 100 or not 0 <= test_pct < 100 or validation_pct + test_pct >= 100:
        raise DatasetError(
            f"validation {validation_pct}% + test {test_pct}% must leave images to train on; "
            "use percentages that add up to less than 100"
        )
    problems = folder_problems(images, test_images, validation_pct, test_pct)
    if problems:
        raise DatasetError("; ".join(problems))
    classes = scan_classes(images)
    test_classes = scan_classes(test_images) if test_images else {}
    names = tuple(classes)
    examples = []
    for label, name in enumerate(names):
        for path in classes[name]:
            split = split_of(os.path.basename(path), validation_pct, 0.0 if test_images else test_pct)
            examples.append(Example(_absolute(path), label, split))
        for path in test_classes.get(name, []):
            examples.append(Example(_absolute(path), label, "test"))
    return Dataset(names, tuple(examples))


def leakage_warnings(ds: Dataset, hashes: Sequence[str]) -> list[str]:
    """Warnings for identical image content (by sha256 of the bytes) that makes accuracy lie.

    Args:
        hashes: one per example of ``ds`` ("" for a file that could not be read).

    Returns:
        One line per duplicate group: the same bytes filed under two classes (one label is wrong),
        and a test image that is also a training or validation image (it inflates test accuracy).
    """
    groups: dict[str, list[Example]] = {}
    for e, h in zip(ds.examples, hashes):
        if h:
            groups.setdefault(h, []).append(e)
    out = []
    for same in groups.values():
        if len(same) < 2:
            continue
        labels = sorted({e.label for e in same})
        if len(labels) > 1:
            names = " and ".join(repr(ds.classes[k]) for k in labels)
            out.append(f"the same image is in classes {names}: {', '.join(e.path for e in same)}")
        test = [e for e in same if e.split == "test"]
        seen = [e for e in same if e.split != "test"]
        if test and seen:
            out.append(f"test image {test[0].path} is identical to {seen[0].split} image {seen[0].path}; "
                       "it makes test accuracy look better than it is")
    return out

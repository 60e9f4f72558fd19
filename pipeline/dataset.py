"""Scanning ``DIR/<class>/*`` image folders and the stable train/validation/test split."""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

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
    """Lower case, non-alphanumerics to spaces (as poets did, so labels read well in apps)."""
    return re.sub(r"[^a-z0-9]+", " ", folder.lower()).strip()


def split_of(filename: str, validation_pct: float, test_pct: float) -> str:
    """The split of one file, from a hash of its name alone.

    The part of the name before ``_nohash_`` decides, so near-duplicates named
    ``photo_nohash_1.jpg`` and ``photo_nohash_2.jpg`` land in the same split. Adding or removing
    other images never moves this one.
    """
    stem = re.sub(r"_nohash_.*$", "", os.path.basename(filename))
    digest = int(hashlib.sha1(stem.encode("utf-8")).hexdigest(), 16)
    pct = (digest % (_MAX_PER_CLASS + 1)) * (100.0 / _MAX_PER_CLASS)
    if pct < validation_pct:
        return "validation"
    if pct < validation_pct + test_pct:
        return "test"
    return "train"


def scan_classes(root: Path) -> dict[str, list[Path]]:
    """Maps each class folder (normalised name) to its image files, sorted.

    Hidden files and folders are ignored; only known image suffixes count.

    Raises:
        DatasetError: the folder is missing or has no class sub-folders.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"image folder {root} does not exist; pass --images DIR with one sub-folder per class")
    classes: dict[str, list[Path]] = {}
    subs = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    # Label order follows the normalised names, so renaming "Roses" to "roses" keeps the labels.
    for sub in sorted(subs, key=lambda p: (normalise_class_name(p.name), p.name)):
        files = sorted(
            p for p in sub.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
        )
        name = normalise_class_name(sub.name)
        if name in classes:
            raise DatasetError(f"{sub}: class folder names collide after normalisation ({name!r}); rename one")
        classes[name] = files
    return classes


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
    classes = scan_classes(images)
    problems = [f"{images}/{name}: no images" for name, files in classes.items() if not files]
    if len(classes) < 2:
        problems.append(f"{images}: found {len(classes)} class folder(s), need at least 2 (one sub-folder per class)")
    test_classes = scan_classes(test_images) if test_images else {}
    unknown = sorted(set(test_classes) - set(classes))
    if unknown:
        problems.append(f"{test_images}: classes {unknown} are not in {images}")
    if problems:
        raise DatasetError("; ".join(problems))
    names = tuple(classes)
    examples = []
    for label, name in enumerate(names):
        for path in classes[name]:
            split = split_of(path.name, validation_pct, 0.0 if test_images else test_pct)
            examples.append(Example(str(path.resolve()), label, split))
        for path in test_classes.get(name, []):
            examples.append(Example(str(path.resolve()), label, "test"))
    return Dataset(names, tuple(examples))

"""Test images prepared once, on disk, read back a batch at a time.

Verify prepares every test image once per feed (the contract's pixels; the app's, when they
differ) and every runtime reads the same file in batches, so no process ever holds the whole
holdout as float32: memory stays flat in the number of test images. The file is raw
little-endian float32 ``[N, H, W, 3]``, readable from Python and Node.js alike.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

DTYPE = np.dtype("<f4")


@dataclass(frozen=True)
class FeedFile:
    """Raw float32 images at ``path``, ``shape = (N, H, W, 3)``."""

    path: Path
    shape: tuple[int, int, int, int]

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def image_bytes(self) -> int:
        return int(np.prod(self.shape[1:])) * DTYPE.itemsize

    def read(self, start: int, stop: int) -> np.ndarray:
        """Images ``start..stop-1`` as float32 ``[k, H, W, 3]`` (read, not memory-mapped: pages of a
        mapping would stay in the process's resident set)."""
        stop = min(stop, len(self))
        count = max(stop - start, 0)
        with open(self.path, "rb") as f:
            f.seek(start * self.image_bytes)
            data = np.fromfile(f, DTYPE, count * self.image_bytes // DTYPE.itemsize)
        return data.astype(np.float32, copy=False).reshape(count, *self.shape[1:])

    def batches(self, size: int) -> Iterator[tuple[int, np.ndarray]]:
        """``(start, images)`` for consecutive batches of at most ``size`` images."""
        for start in range(0, len(self), size):
            yield start, self.read(start, start + size)

    def to_dict(self) -> dict:
        return {"path": str(self.path), "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: dict) -> "FeedFile":
        return cls(Path(d["path"]), tuple(int(x) for x in d["shape"]))

    @classmethod
    def write(cls, path: Path, batches: Iterable[np.ndarray], image_shape: tuple[int, int, int]) -> "FeedFile":
        """Appends each ``[k, H, W, 3]`` batch to a new file at ``path``."""
        n = 0
        with open(path, "wb") as f:
            for batch in batches:
                batch = np.ascontiguousarray(batch, DTYPE)
                if batch.shape[1:] != tuple(image_shape):
                    raise ValueError(f"batch of shape {batch.shape} in a feed of {image_shape} images")
                batch.tofile(f)
                n += len(batch)
        return cls(Path(path), (n, *image_shape))

    @classmethod
    def from_array(cls, path: Path, images: np.ndarray) -> "FeedFile":
        images = np.asarray(images, np.float32)
        return cls.write(path, [images], tuple(images.shape[1:]))

#!/usr/bin/env python3
"""Classify photos with the TFLite model beside this script (a Raspberry Pi bundle written by edgepipe).

    python classify.py --self-test            # the golden images give the answers edgepipe recorded
    python classify.py photo.jpg photos/      # top-5 labels of each image (folders searched recursively)
    python classify.py --json photos/         # one JSON object a line per image

It needs one TFLite runtime (``tflite_runtime``, else ``ai_edge_litert``), numpy and Pillow, and
reads ``bundle.json``, ``labels.txt`` and ``preprocessing.json`` from its own folder. The pixels are
prepared exactly as edgepipe prepared them when it trained and verified the model: Pillow decodes
the file (EXIF orientation applied, any mode converted to RGB, 16-bit greyscale scaled to 8 bits),
a bilinear resize with half-pixel centres and no antialiasing (TensorFlow's, re-implemented here in
numpy: Pillow's own bilinear resize antialiases when it shrinks, so it would give other pixels)
makes it ``size`` x ``size``, and the float32 values in 0..255 go to the model, which applies the
mean/std itself. A model with integer input gets them quantised with its own scale and zero point;
an integer output is dequantised the same way.

Exit codes: 0 done (an unreadable image is a ``skipped`` line, not an error), 1 the self-test
failed (or the reader of the output went away), 2 a problem with the bundle, the arguments or the
installed packages.

This file is edgepipe's ``pipeline/deploy_classify.py``, copied unchanged into every bundle; it
imports nothing of edgepipe.
"""
from __future__ import annotations

import argparse
import functools
import importlib
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
BUNDLE_FILE = "bundle.json"
LABELS_FILE = "labels.txt"
PREPROCESSING_FILE = "preprocessing.json"
GOLDEN_FILE = Path("golden") / "golden.json"
# Tried in this order: the wheel requirements.txt installs, then Google's newer LiteRT wheel.
RUNTIMES = ("tflite_runtime.interpreter", "ai_edge_litert.interpreter")
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"})
# As edgepipe: decoding is refused above 64 MP (a decompression bomb is stopped at its header).
MAX_PIXELS = 64_000_000
# Used when bundle.json does not say: the loosest tolerance edgepipe gives any of its variants.
DEFAULT_TOLERANCE = 0.15
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


class BundleError(Exception):
    """A problem with the bundle, the arguments or the installed packages (exit code 2)."""


class ImageError(ValueError):
    """An image that cannot be read or decoded."""


# --- pixels: edgepipe's pipeline/images.py, in numpy and Pillow alone ----------------------------

def decode_rgb(data: bytes) -> np.ndarray:
    """Image bytes to uint8 RGB ``[H, W, 3]``, as edgepipe's ``pipeline.images.decode_rgb``.

    Raises:
        ImageError: the bytes are not a readable image, or one over :data:`MAX_PIXELS`.
    """
    from PIL import Image, ImageOps

    if not data:
        raise ImageError("empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.size[0] * im.size[1] > MAX_PIXELS:
                raise ImageError(f"{im.size[0]}x{im.size[1]} pixels is over the {MAX_PIXELS / 1e6:.0f} MP limit")
            im.seek(0)  # a GIF's first frame
            im = ImageOps.exif_transpose(im)  # phones store photos sideways and say so in EXIF
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                # 16-bit greyscale: 0..65535 to 0..255 as browsers show it.
                wide = np.asarray(im, dtype=np.float64)
                im = Image.fromarray(np.clip(np.round(wide / 257.0), 0, 255).astype(np.uint8))
            arr = np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
    except ImageError:
        raise
    except Image.DecompressionBombError as err:
        raise ImageError(f"not decoded ({err})") from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"not an image in a known format (the file starts with {data[:8]!r})") from None
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        raise ImageError(f"not a readable image ({err})") from None
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ImageError(f"unexpected decoded shape {arr.shape}")
    return arr


@functools.lru_cache(maxsize=64)
def _bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TensorFlow's ResizeBilinear sample positions (half-pixel centres) in its float32 steps:
    the lower and upper source index and the weight of the upper one, per output index."""
    scale = np.float32(in_size) / np.float32(out_size)
    pos = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    floor = np.floor(pos)
    lower = np.maximum(floor.astype(np.intp), 0)
    upper = np.minimum(np.ceil(pos).astype(np.intp), in_size - 1)
    return lower, upper, pos - floor


def resize_bilinear(rgb: np.ndarray, size: int) -> np.ndarray:
    """``tf.image.resize(bilinear, antialias=False)`` of uint8 RGB to float32 ``[size, size, 3]``.

    TensorFlow computes ``top + (bottom - top) * y_lerp`` with ``top = left + (right - left) *
    x_lerp`` in float32; the same operations in the same order (along the rows, then down the
    columns) give the same values, bit for bit.
    """
    height, width = rgb.shape[:2]
    if height == width == size:  # half-pixel centres at scale 1 sample every pixel exactly
        return rgb.astype(np.float32)
    ylo, yhi, ylerp = _bilinear_taps(height, size)
    xlo, xhi, xlerp = _bilinear_taps(width, size)
    channel = np.arange(3)
    left_cols = (xlo[:, None] * 3 + channel).ravel()
    right_cols = (xhi[:, None] * 3 + channel).ravel()
    flat = rgb.reshape(height, width * 3)
    if height > 2 * size:  # a large photo: only the rows that are sampled
        rows, inverse = np.unique(np.concatenate([ylo, yhi]), return_inverse=True)
        inverse = inverse.reshape(-1)
        flat, ylo, yhi = flat[rows], inverse[:size], inverse[size:]
    left = np.take(flat, left_cols, axis=1).astype(np.float32)
    across = np.take(flat, right_cols, axis=1).astype(np.float32)
    across -= left
    across *= np.repeat(xlerp, 3)
    across += left
    top = np.take(across, ylo, axis=0)
    out = np.take(across, yhi, axis=0)
    out -= top
    out *= ylerp[:, None]
    out += top
    return out.reshape(size, size, 3)


def load_pixels(path: Path, size: int) -> np.ndarray:
    """A file to the model's input values: float32 RGB ``[size, size, 3]`` in 0..255.

    Raises:
        ImageError: not a regular file, unreadable, or not an image.
    """
    if not path.is_file():
        raise ImageError("not a regular file" if path.exists() else "no such file")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ImageError(f"cannot read ({err.strerror or err})") from None
    return resize_bilinear(decode_rgb(data), size)


# --- the model ----------------------------------------------------------------------------------

def load_runtime():
    """The first TFLite interpreter module of :data:`RUNTIMES` that imports, and its name and version.

    Raises:
        BundleError: none of them is installed.
    """
    errors = []
    for name in RUNTIMES:
        try:
            module = importlib.import_module(name)
        except ImportError as err:
            errors.append(f"{name}: {err}")
            continue
        package = name.split(".")[0]
        try:
            from importlib.metadata import version

            label = f"{package} {version(package.replace('_', '-'))}"
        except Exception:  # a runtime found outside an installed distribution: its name is enough
            label = package
        return module, label
    raise BundleError("no TFLite runtime: run `pip install -r requirements.txt` beside classify.py "
                      f"(or `pip install ai-edge-litert`); tried {'; '.join(errors)}")


def quantise(x: np.ndarray, detail: dict) -> np.ndarray:
    """Float32 pixels to the model's input type, with its own scale and zero point when integer."""
    dtype = np.dtype(detail["dtype"])
    if dtype.kind == "f":
        return x.astype(dtype)
    scale, zero = detail["quantization"]
    info = np.iinfo(dtype)
    if not scale:  # an integer input without quantisation parameters takes the values as they are
        return np.clip(np.round(x), info.min, info.max).astype(dtype)
    return np.clip(np.round(x / scale + zero), info.min, info.max).astype(dtype)


def dequantise(y: np.ndarray, detail: dict) -> np.ndarray:
    """The model's output as float32 probabilities."""
    if np.dtype(detail["dtype"]).kind == "f":
        return y.astype(np.float32)
    scale, zero = detail["quantization"]
    if not scale:
        return y.astype(np.float32)
    return (y.astype(np.float32) - zero) * np.float32(scale)


class Model:
    """One interpreter on the bundle's .tflite file, fed one image a call."""

    def __init__(self, path: Path, threads: int | None):
        self.runtime, self.runtime_name = load_runtime()
        try:
            self.interp = self.runtime.Interpreter(model_path=str(path), num_threads=threads)
            self.interp.allocate_tensors()
        except (ValueError, RuntimeError) as err:
            raise BundleError(f"{path.name}: the TFLite runtime refused it ({err})") from None
        inputs = self.interp.get_input_details()
        if len(inputs) != 1:
            raise BundleError(f"{path.name}: {len(inputs)} inputs; an image classifier has one")
        self.input = inputs[0]
        self.output = self._probabilities_output(path.name)
        shape = [int(d) for d in self.input["shape"]]
        if len(shape) != 4 or shape[3] != 3:
            raise BundleError(f"{path.name}: input shape {shape}, not [1, height, width, 3]")
        self.size = shape[1]

    def _probabilities_output(self, name: str) -> dict:
        # The signature names the outputs ("probabilities", "logits"); the tensors' own names are
        # the converter's (StatefulPartitionedCall:1).
        outputs = {d["index"]: d for d in self.interp.get_output_details()}
        signatures = getattr(self.interp, "_get_full_signature_list", lambda: {})() or {}
        signature = signatures.get("serving_default") or next(iter(signatures.values()), None)
        if signature and "probabilities" in signature["outputs"]:
            return outputs[signature["outputs"]["probabilities"]]
        if len(outputs) == 1:
            return next(iter(outputs.values()))
        raise BundleError(f"{name}: {len(outputs)} outputs and none is named 'probabilities'")

    def __call__(self, pixels: np.ndarray) -> tuple[np.ndarray, float]:
        """Probabilities of one image (float32 ``[size, size, 3]`` 0..255) and the call's milliseconds."""
        self.interp.set_tensor(self.input["index"], quantise(pixels[None], self.input))
        t0 = time.perf_counter()
        self.interp.invoke()
        ms = (time.perf_counter() - t0) * 1000
        return dequantise(self.interp.get_tensor(self.output["index"]), self.output)[0], ms


# --- the bundle ---------------------------------------------------------------------------------

def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{path.name} is missing beside classify.py (in {path.parent})") from None
    except (OSError, ValueError) as err:
        raise BundleError(f"{path}: not readable JSON ({err})") from None


class Bundle:
    """What the bundle folder holds: the model's file, its labels, the contract and the self-test."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.info = _read_json(folder / BUNDLE_FILE) if (folder / BUNDLE_FILE).exists() else {}
        self.contract = _read_json(folder / PREPROCESSING_FILE)
        try:
            self.labels = (folder / LABELS_FILE).read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise BundleError(f"{LABELS_FILE} is missing beside classify.py (in {folder})") from None
        self.model_path = self._model_path()
        problems = []
        if self.contract.get("channel_order", "RGB") != "RGB":
            problems.append(f"channel order {self.contract['channel_order']!r}; this script feeds RGB")
        if self.contract.get("resize_method", "bilinear") != "bilinear" or self.contract.get("antialias"):
            problems.append(f"resize {self.contract.get('resize_method')!r} with antialias "
                            f"{self.contract.get('antialias')}; this script resizes bilinear without antialias")
        if not isinstance(self.contract.get("size"), int) or self.contract["size"] < 1:
            problems.append(f"size {self.contract.get('size')!r} is not a positive whole number")
        if problems:
            raise BundleError(f"{PREPROCESSING_FILE}: " + "; ".join(problems))
        self.size = self.contract["size"]

    def _model_path(self) -> Path:
        if "model" in self.info:
            path = self.folder / self.info["model"]
            if not path.is_file():
                raise BundleError(f"{self.info['model']} (named in {BUNDLE_FILE}) is missing in {self.folder}")
            return path
        found = sorted(self.folder.glob("*.tflite"))
        if len(found) != 1:
            raise BundleError(f"{len(found)} .tflite files in {self.folder}; {BUNDLE_FILE} would name the one to use")
        return found[0]

    @property
    def tolerance(self) -> float:
        return float(self.info.get("self_test", {}).get("tolerance", DEFAULT_TOLERANCE))

    def open(self, threads: int | None) -> Model:
        model = Model(self.model_path, threads)
        if model.size != self.size:
            raise BundleError(f"{self.model_path.name} takes {model.size}x{model.size} images, "
                              f"{PREPROCESSING_FILE} says {self.size}x{self.size}")
        classes = int(np.prod(model.output["shape"][1:]))
        if classes != len(self.labels):
            raise BundleError(f"{LABELS_FILE} has {len(self.labels)} labels for the model's {classes} outputs")
        return model


def image_paths(inputs: list[str]) -> list[Path]:
    """Every image file named, or found (recursively, sorted, hidden ones left out) in a named folder.

    Raises:
        BundleError: a path that does not exist, or no image at all.
    """
    out: list[Path] = []
    for p in map(Path, inputs):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
                          and not any(part.startswith(".") for part in f.relative_to(p).parts))
        elif p.exists():
            out.append(p)
        else:
            raise BundleError(f"{p}: no such image or folder")
    if not out:
        raise BundleError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {', '.join(inputs)}")
    return out


def top(probabilities: np.ndarray, labels: list[str], k: int) -> list[tuple[str, float]]:
    order = np.argsort(-probabilities, kind="stable")[:k]
    return [(labels[i], float(probabilities[i])) for i in order]


def classify(bundle: Bundle, model: Model, paths: list[Path], k: int, as_json: bool) -> None:
    """Prints each image's top-``k`` (or why it was skipped), then a summary line on stderr."""
    times = []
    for path in paths:
        try:
            probs, ms = model(load_pixels(path, bundle.size))
        except ImageError as err:
            print(json.dumps({"image": str(path), "error": str(err)}) if as_json else f"{path}: skipped: {err}",
                  flush=True)
            continue
        times.append(ms)
        best = top(probs, bundle.labels, k)
        if as_json:
            print(json.dumps({"image": str(path), "top": [{"label": lab, "probability": round(p, 6)}
                                                          for lab, p in best]}), flush=True)
        else:
            print(f"{path}: " + ", ".join(f"{lab} {p:.4f}" for lab, p in best), flush=True)
    timing = f"; median {float(np.median(times)):.1f} ms a call" if times else ""
    print(f"{len(times)} of {len(paths)} image(s) classified with {bundle.model_path.name} in "
          f"{model.runtime_name}{timing}", file=sys.stderr)


def self_test(bundle: Bundle, model: Model, tolerance: float) -> list[str]:
    """Runs the golden images and compares them with ``golden/golden.json``.

    Returns:
        One line per failure (an empty list: passed).

    Raises:
        BundleError: the bundle has no golden images.
    """
    spec = _read_json(bundle.folder / GOLDEN_FILE)
    if spec.get("labels") != bundle.labels:
        return [f"{GOLDEN_FILE}: its labels {spec.get('labels')} are not {LABELS_FILE}'s {bundle.labels}"]
    if not spec.get("images"):
        raise BundleError(f"{GOLDEN_FILE} lists no images: nothing to test")
    failures = []
    for entry in spec["images"]:
        name = f"golden/{entry['file']}" + (f" ({entry['source']})" if entry.get("source") else "")
        try:
            probs, _ = model(load_pixels(bundle.folder / "golden" / entry["file"], bundle.size))
        except ImageError as err:
            failures.append(f"{name}: cannot read it ({err})")
            continue
        expected = entry["expected"]
        got = int(np.argmax(probs))
        if got != expected[0]["index"]:
            failures.append(f"{name}: top-1 is {bundle.labels[got]!r} {probs[got]:.4f}, expected "
                            f"{expected[0]['label']!r} {expected[0]['probability']:.4f}")
            continue
        for e in expected:
            drift = abs(float(probs[e["index"]]) - e["probability"])
            if drift > tolerance:
                failures.append(f"{name}: probability of {e['label']!r} is {probs[e['index']]:.4f}, expected "
                                f"{e['probability']:.4f} ± {tolerance:g} (off by {drift:.4f})")
                break
    return failures


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Classify images with the TFLite model of this bundle (see README.md).")
    parser.add_argument("images", nargs="*", help="image files or folders of images (searched recursively)")
    parser.add_argument("--top-k", type=int, default=5, help="labels shown per image (default 5)")
    parser.add_argument("--json", action="store_true", help="one JSON object a line per image")
    parser.add_argument("--threads", type=int, default=None,
                        help="interpreter threads (default: one per core)")
    parser.add_argument("--self-test", action="store_true",
                        help="run the golden images shipped in golden/ and compare with golden.json")
    parser.add_argument("--tolerance", type=float, default=None,
                        help="largest probability difference the self-test accepts (default: bundle.json's)")
    args = parser.parse_args(argv)
    problems = []
    if not args.images and not args.self_test:
        problems.append("give image files or folders, or --self-test")
    if args.top_k < 1:
        problems.append(f"--top-k {args.top_k}: must be at least 1")
    if args.threads is not None and args.threads < 1:
        problems.append(f"--threads {args.threads}: must be at least 1")
    if args.tolerance is not None and not args.tolerance >= 0:
        problems.append(f"--tolerance {args.tolerance}: must be 0 or more")
    if problems:
        parser.error("; ".join(problems))
    return args


def main(argv: list[str] | None = None, folder: Path = HERE) -> int:
    args = parse_args(argv)
    try:
        bundle = Bundle(folder)
        paths = image_paths(args.images) if args.images else []
        model = bundle.open(args.threads or os.cpu_count())
        if args.self_test:
            tolerance = bundle.tolerance if args.tolerance is None else args.tolerance
            failures = self_test(bundle, model, tolerance)
            for line in failures:
                print(f"self-test: {line}", file=sys.stderr)
            if failures:
                print(f"self-test FAILED: {len(failures)} golden image(s) of {bundle.model_path.name} in "
                      f"{model.runtime_name}", file=sys.stderr)
                return EXIT_FAILED
            n = len(_read_json(folder / GOLDEN_FILE)["images"])
            print(f"self-test passed: {n} golden images, top-1 as recorded and probabilities within "
                  f"±{tolerance:g} ({bundle.model_path.name} in {model.runtime_name})", file=sys.stderr)
        if paths:
            classify(bundle, model, paths, min(args.top_k, len(bundle.labels)), args.json)
    except BundleError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BrokenPipeError:
        # The reader went away (`classify.py photos/ | head`): stop quietly, as the Python docs advise.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

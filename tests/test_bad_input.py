"""Bad input, made for real: broken and odd images, odd names, links, FIFOs, duplicates, bad options.

Every unreadable image costs ONE stderr line (`skipped PATH: reason`) and is counted in
retrain/metrics.json, report.json and report.md; the run goes on unless a class is left without
training images (exit 2). Images that are odd but valid (16-bit, CMYK, 1x1, animated) are decoded.

Tests run as root, where `chmod 000` does not stop reads: unreadable files are made as dangling
symlinks, symlink loops and FIFOs (real), and a permission error is injected by monkeypatching
`os.open` (simulated).
"""
from __future__ import annotations

import errno
import io
import json
import os
import resource
import shutil
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import RunConfig, validate
from pipeline.dataset import build_dataset, split_of
from pipeline.errors import ConfigError, PipelineError
from pipeline.images import ImageError, decode_rgb, load_image, read_image_file
from pipeline.types import Preprocessing
from tests.helpers.chain import edgepipe_log, run_chain
from tests.helpers.cli import edgepipe
from tests.helpers.world import make_image_folders, tiny_graph_options

# --- making bad and odd images ----------------------------------------------------------------

def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _png(width: int, height: int, bit_depth: int, colour_type: int, row: bytes) -> bytes:
    """A PNG whose every row is ``row`` (filter byte included), compressed as it is generated,
    so a 30000x30000 image costs a few hundred KB and well under a second."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    comp, parts = zlib.compressobj(9), []
    block = row * 1000
    for start in range(0, height, 1000):
        parts.append(comp.compress(block if height - start >= 1000 else row * (height - start)))
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """One-colour 1-bit PNG: tiny on disk, width*height*3 bytes once decoded to RGB."""
    return _png(width, height, 1, 0, b"\x00" + b"\xff" * ((width + 7) // 8))


def png16_rgb(rgb16: tuple[int, int, int], size: int = 6) -> bytes:
    return _png(size, size, 16, 2, b"\x00" + struct.pack(">HHH", *rgb16) * size)


def png16_grey(value: int, size: int = 6) -> bytes:
    return _encode(Image.fromarray(np.full((size, size), value, np.uint16)), "PNG")


def cmyk_jpeg(rgb=(200, 40, 40), size: int = 24) -> bytes:
    return _encode(Image.new("RGB", (size, size), rgb).convert("CMYK"), "JPEG", quality=95)


def animated_gif(first=(200, 40, 40), second=(40, 40, 200), size: int = 24) -> bytes:
    frames = [Image.new("RGB", (size, size), c).convert("P", palette=Image.Palette.ADAPTIVE, colors=4) for c in (first, second)]
    return _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def truncated_jpeg(rgb=(200, 40, 40), size: int = 64) -> bytes:
    data = _encode(Image.new("RGB", (size, size), rgb), "JPEG")
    return data[: len(data) // 2]


# --- decoding, one case at a time -------------------------------------------------------------

@pytest.mark.parametrize("data, reason", [
    (b"", "empty file (0 bytes)"),
    (b"this is text, not a jpeg", "not an image in a known format (the file starts with b'this is '"),
    (truncated_jpeg(), "not a readable image ("),
    (bomb_png(), "900,000,000 pixels (900.0 MP) is over the 64 MP limit; not decoded (a decompression bomb?)"),
    # Under PIL's own limit (179 MP) but over ours: refused by edgepipe's check, with its size.
    (bomb_png(9000, 8000), "9000x8000 pixels (72.0 MP) is over the 64 MP limit; not decoded"),
], ids=["empty", "text", "truncated", "bomb-30000x30000", "72-megapixel"])
def test_undecodable_images_are_refused_with_the_file_and_the_reason(data, reason):
    with pytest.raises(ImageError) as err:
        decode_rgb(data, "/photos/red/x.jpg")
    assert err.value.reason.startswith(reason)
    assert str(err.value) == f"/photos/red/x.jpg: {err.value.reason}"
    assert "\n" not in str(err.value)


def test_a_decompression_bomb_is_refused_without_allocating_it():
    data = bomb_png()
    assert len(data) < 1_000_000
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    started = time.perf_counter()
    with pytest.raises(ImageError, match="decompression bomb"):
        decode_rgb(data, "bomb.png")
    assert time.perf_counter() - started < 2.0
    # 2.7 GB would have been touched had it been decoded; the peak must not move by 200 MB.
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000


def test_16_bit_pngs_decode_as_browsers_show_them():
    # Mid grey stays mid grey: 0..65535 maps to 0..255, not clipped to white...
    assert np.all(np.abs(decode_rgb(png16_grey(32768)).astype(int) - 128) <= 1)
    # ...and a dark image stays dark, not stretched to its own maximum.
    assert np.all(decode_rgb(png16_grey(1000)) <= 5)
    arr = decode_rgb(png16_rgb((65535, 32768, 0)))
    np.testing.assert_allclose(arr[0, 0], [255, 128, 0], atol=1)


def test_cmyk_jpeg_decodes_to_the_rgb_it_was_made_from():
    arr = decode_rgb(cmyk_jpeg((200, 40, 40)))
    np.testing.assert_allclose(arr.reshape(-1, 3).mean(0), [200, 40, 40], atol=8)


def test_one_pixel_image_is_resized_like_any_other():
    x = load_image(_encode(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG"), Preprocessing(size=32))
    assert x.shape == (32, 32, 3)
    np.testing.assert_allclose(x, np.broadcast_to([10, 20, 30], x.shape), atol=1e-3)


def test_animated_gif_gives_its_first_frame():
    arr = decode_rgb(animated_gif((200, 40, 40), (40, 40, 200)))
    np.testing.assert_allclose(arr[0, 0], [200, 40, 40], atol=10)


# --- reading files that are not plain readable files ------------------------------------------

def test_dangling_symlink_loop_fifo_and_empty_file_are_refused_without_blocking(tmp_path):
    (tmp_path / "gone.jpg").symlink_to(tmp_path / "deleted.jpg")
    (tmp_path / "loop.jpg").symlink_to(tmp_path / "loop.jpg")
    os.mkfifo(tmp_path / "pipe.jpg")  # opening it for reading would block forever
    (tmp_path / "empty.jpg").write_bytes(b"")
    reasons = {}
    for name in ("gone.jpg", "loop.jpg", "pipe.jpg", "empty.jpg"):
        with pytest.raises(ImageError) as err:
            read_image_file(tmp_path / name)
        reasons[name] = err.value.reason
    assert reasons == {
        "gone.jpg": f"dangling symlink to {tmp_path / 'deleted.jpg'}",
        "loop.jpg": "symlink loop",
        "pipe.jpg": "a FIFO, not a regular file",
        "empty.jpg": "empty file (0 bytes)",
    }


def test_permission_denied_is_a_reason_not_a_crash(tmp_path, monkeypatch):
    # Simulated: as root, chmod 000 does not stop reads, so os.open is made to refuse.
    path = tmp_path / "locked.jpg"
    path.write_bytes(_encode(Image.new("RGB", (4, 4)), "JPEG"))
    real_open = os.open

    def deny(p, *a, **kw):
        if str(p) == str(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(p))
        return real_open(p, *a, **kw)

    monkeypatch.setattr(os, "open", deny)
    with pytest.raises(ImageError) as err:
        read_image_file(path)
    assert err.value.reason == "cannot read (Permission denied)"


# --- the whole chain on a folder full of trouble ----------------------------------------------

ODD_CLASS = "Red apples $HOME; 'q' *"
BAD = {  # file name → the reason its skip line must give
    "truncated.jpg": "not a readable image (",
    "empty.jpg": "empty file (0 bytes)",
    "text.jpg": "not an image in a known format",
    "bomb.png": "900,000,000 pixels (900.0 MP) is over the 64 MP limit",
    "gone.jpg": "dangling symlink to ",
    "pipe.jpg": "a FIFO, not a regular file",
}
ODD_BUT_VALID = ("png16.png", "cmyk.jpg", "one_pixel.png", "animated.gif")


@pytest.fixture(scope="module")
def troubled_run(tiny_graph, tmp_path_factory):
    base = tmp_path_factory.mktemp("trouble")
    images = make_image_folders(base / "train $x; 'y' *", per_class=14,
                                colours={ODD_CLASS: (200, 40, 40), "Café": (40, 180, 60), "玫瑰": (50, 70, 210)})
    holdout = make_image_folders(base / "holdout", per_class=5, seed=1,
                                 colours={ODD_CLASS: (200, 40, 40), "Café": (40, 180, 60), "玫瑰": (50, 70, 210)})
    red = images / ODD_CLASS
    red.joinpath("truncated.jpg").write_bytes(truncated_jpeg())
    red.joinpath("empty.jpg").write_bytes(b"")
    red.joinpath("text.jpg").write_text("I am not a photo")
    red.joinpath("bomb.png").write_bytes(bomb_png())
    red.joinpath("gone.jpg").symlink_to(base / "nowhere.jpg")
    os.mkfifo(red / "pipe.jpg")
    red.joinpath("png16.png").write_bytes(png16_rgb((51400, 10280, 10280)))
    red.joinpath("cmyk.jpg").write_bytes(cmyk_jpeg((200, 40, 40)))
    red.joinpath("one_pixel.png").write_bytes(_encode(Image.new("RGB", (1, 1), (200, 40, 40)), "PNG"))
    red.joinpath("animated.gif").write_bytes(animated_gif((200, 40, 40)))
    red.joinpath(".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    red.joinpath("._red_000.png").write_bytes(b"\0\5\26\7 AppleDouble")
    red.joinpath("up").symlink_to("..")      # a symlink loop back to the images folder
    red.joinpath("self").symlink_to(".")
    (images / ".hidden class").mkdir()
    # The same photo filed under two classes, and a holdout photo that is also a training photo.
    shutil.copy(images / "Café" / "café_000.png", images / "玫瑰" / "copied.png")
    shutil.copy(images / "玫瑰" / "玫瑰_003.png", holdout / "玫瑰" / "leaked.png")
    out = base / "run $HOME; 'x' *"
    with edgepipe_log() as lines:  # what the command line prints on stderr
        manifest = run_chain(out, images=images, test_images=holdout, epochs=40, learning_rate=0.05,
                             quant_modes=["float32"], tfjs_modes=["float32"],
                             runtimes=["ai-edge-litert", "tfjs-wasm"], **tiny_graph_options(tiny_graph),
                             cache_dir=base / "cache")
    return images, holdout, out, (manifest, lines)


@pytest.mark.chain
def test_bad_files_cost_one_line_each_and_the_run_succeeds(troubled_run):
    images, _, out, (manifest, log) = troubled_run
    assert all(s["status"] == "done" for s in manifest["stages"].values()), manifest["stages"]
    lines = [ln for ln in log if ln.startswith("skipped ")]
    red = images / ODD_CLASS
    for name, reason in BAD.items():
        mine = [ln for ln in lines if ln.startswith(f"skipped {red / name}: ")]
        assert len(mine) == 1, (name, lines)
        assert mine[0].removeprefix(f"skipped {red / name}: ").startswith(reason), mine[0]
    assert len(lines) == len(BAD), lines
    assert not any("Traceback" in ln for ln in log)


@pytest.mark.chain
def test_odd_but_valid_images_are_trained_on(troubled_run):
    images, _, out, _ = troubled_run
    split = json.loads((out / "retrain" / "split.json").read_text())
    used = {Path(e["path"]).name for e in split["examples"]}
    assert set(ODD_BUT_VALID) <= used
    assert not used & set(BAD)
    assert not any(n.startswith(".") for n in used)


@pytest.mark.chain
def test_skips_are_counted_in_metrics_and_both_reports(troubled_run):
    images, _, out, _ = troubled_run
    metrics = json.loads((out / "retrain" / "metrics.json").read_text())
    assert {Path(p).name for p in metrics["skipped"]} == set(BAD)
    report = json.loads((out / "report.json").read_text())
    assert {Path(s["path"]).name for s in report["skipped_images"]} == set(BAD)
    md = (out / "report.md").read_text()
    assert f"Images skipped as unreadable: {len(BAD)}." in md
    assert f"- `{images / ODD_CLASS / 'empty.jpg'}`: empty file (0 bytes)" in md


@pytest.mark.chain
def test_odd_names_become_clean_labels_everywhere(troubled_run):
    _, _, out, _ = troubled_run
    report = json.loads((out / "report.json").read_text())
    assert report["classes"] == ["café", "red apples home q", "玫瑰"]
    assert (out / "export" / "labels.txt").read_text(encoding="utf-8").splitlines() == report["classes"]
    model = json.loads((out / "tfjs" / "float32" / "model.json").read_text(encoding="utf-8"))
    assert model["userDefinedMetadata"]["edgepipe"]["labels"] == report["classes"]
    assert all(r["passed"] for r in report["results"]), [(r["artifact"], r["runtime"], r["error"]) for r in report["results"]]


@pytest.mark.chain
def test_duplicates_across_classes_and_holdout_leaks_are_warned(troubled_run):
    images, holdout, out, (_, log) = troubled_run
    across = (f"warning: the same image is in classes 'café' and '玫瑰': "
              f"{images / 'Café' / 'café_000.png'}, {images / '玫瑰' / 'copied.png'}")
    leak_prefix = f"warning: test image {holdout / '玫瑰' / 'leaked.png'} is identical to "
    assert across in log
    leak = [ln for ln in log if ln.startswith(leak_prefix)]
    assert len(leak) == 1 and leak[0].endswith(
        f"image {images / '玫瑰' / '玫瑰_003.png'}; it makes test accuracy look better than it is")
    warnings = json.loads((out / "retrain" / "metrics.json").read_text())["warnings"]
    assert len(warnings) == 2 and across.removeprefix("warning: ") in warnings
    assert json.loads((out / "report.json").read_text())["warnings"] == warnings
    md = (out / "report.md").read_text()
    assert "## Warnings (2)" in md and all(f"- {w}" in md for w in warnings)


# --- too few images left ----------------------------------------------------------------------

def test_a_class_left_without_readable_training_images_is_exit_2(tiny_graph, tmp_path):
    images = make_image_folders(tmp_path / "imgs", per_class=6, colours={"red": (200, 40, 40), "blue": (40, 40, 200)})
    for p in (images / "blue").iterdir():
        p.write_bytes(truncated_jpeg())
    with edgepipe_log() as lines, pytest.raises(PipelineError) as err:
        run_chain(tmp_path / "r", until="retrain", images=images, **tiny_graph_options(tiny_graph),
                  cache_dir=tmp_path / "cache")
    assert err.value.exit_code == 2
    assert sum(ln.startswith("skipped ") for ln in lines) == 6
    assert str(err.value) == (
        f"{images}: no readable training images in class(es) 'blue' (6 image(s) skipped, listed above); "
        "add readable images or remove the folder")


# --- configuration mistakes: all at once, before anything is fetched --------------------------

def test_every_configuration_and_folder_problem_is_listed_at_once_before_fetch(tmp_path):
    images = make_image_folders(tmp_path / "imgs", per_class=3, colours={"red": (200, 40, 40)})
    (images / "Empty").mkdir()
    (images / "Empty" / ".DS_Store").write_bytes(b"\0")
    (images / "Empty" / "notes.txt").write_text("not an image")
    holdout = make_image_folders(tmp_path / "hold", per_class=2, colours={"red": (1, 2, 3)})
    proc = edgepipe("run", "--images", images, "--test-images", holdout, "--test-pct", "20",
                    "--backbone", "mobilenet_v9", "--runtime-timeout", "0", "--out", tmp_path / "r",
                    env={"EDGEPIPE_CACHE_DIR": str(tmp_path / "cache")})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    for part in (
        "unknown backbone 'mobilenet_v9'",
        "--runtime-timeout 0: must be a positive number of seconds",
        f"--test-pct 20 contradicts --test-images {holdout} (that folder is the test split); drop --test-pct",
        f"{images / 'Empty'}: no images (expected .bmp, .gif, .jpeg, .jpg, .png, .webp files)",
    ):
        assert part in lines[0], part
    # Nothing was downloaded or written.
    assert not (tmp_path / "r").exists() and not (tmp_path / "cache").exists()


def _cfg(tmp_path, images, **kw) -> RunConfig:
    return RunConfig(out=tmp_path / "r", images=images, graph=None, **kw)


def test_one_class_only_is_a_configuration_error(tmp_path):
    images = make_image_folders(tmp_path / "imgs", per_class=3, colours={"red": (200, 40, 40)})
    with pytest.raises(ConfigError, match=rf"{images}: found 1 class folder\(s\), need at least 2"):
        validate(_cfg(tmp_path, images))


def test_holdout_that_is_the_training_folder_is_refused(tmp_path):
    images = make_image_folders(tmp_path / "imgs", per_class=3)
    with pytest.raises(ConfigError, match="is the --images folder: test accuracy would be measured on training"):
        validate(_cfg(tmp_path, images, test_images=images))


def test_folder_names_without_letters_or_colliding_labels_are_named(tmp_path):
    images = make_image_folders(tmp_path / "imgs", per_class=2, colours={"$$$": (1, 2, 3), "red": (4, 5, 6)})
    with pytest.raises(ConfigError, match=r"\$\$\$: the folder name has no letters or digits"):
        validate(_cfg(tmp_path, images))
    shutil.rmtree(images / "$$$")
    make_image_folders(images, per_class=2, colours={"Red": (4, 5, 6)})
    with pytest.raises(ConfigError, match=r"class folder names collide after normalisation \('red'\)"):
        validate(_cfg(tmp_path, images))


def test_a_class_whose_images_all_hash_out_of_training_is_refused(tmp_path):
    images = make_image_folders(tmp_path / "imgs", per_class=3, colours={"red": (200, 40, 40), "blue": (1, 2, 3)})
    # A name that the 10 % validation split takes, found by the same hash the split uses.
    name = next(f"v{i}.png" for i in range(10_000) if split_of(f"v{i}.png", 10, 10) == "validation")
    (images / "green").mkdir()
    (images / "green" / name).write_bytes((images / "red" / "red_000.png").read_bytes())
    with pytest.raises(ConfigError, match=r"class 'green': all 1 image\(s\) fall in the validation/test split"):
        validate(_cfg(tmp_path, images))


def test_test_pct_zero_with_a_holdout_folder_is_consistent(tmp_path, tiny_images, tiny_holdout):
    validate(_cfg(tmp_path, tiny_images, test_images=tiny_holdout, test_pct=0.0), given={"test_pct"})
    with pytest.raises(ConfigError, match="--test-pct 15 contradicts --test-images"):
        validate(_cfg(tmp_path, tiny_images, test_images=tiny_holdout, test_pct=15.0), given={"test_pct"})
    # The default 10 % is not a contradiction: it was never asked for.
    validate(_cfg(tmp_path, tiny_images, test_images=tiny_holdout))


def test_scan_survives_loops_fifos_and_hidden_files(tmp_path):
    images = make_image_folders(tmp_path / "imgs", per_class=4, colours={"a": (1, 2, 3), "b": (4, 5, 6)})
    (images / "a" / "loop").symlink_to(images)
    (images / "a" / "self.jpg").symlink_to(images / "a" / "self.jpg")
    os.mkfifo(images / "b" / "pipe.png")
    (images / "b" / ".DS_Store").write_bytes(b"\0")
    ds = build_dataset(images, validation_pct=0, test_pct=0)
    names = sorted(Path(e.path).name for e in ds.examples)
    # The loop, the FIFO and the dangling entries are listed (retrain reports them), never followed.
    assert "self.jpg" in names and "pipe.png" in names and ".DS_Store" not in names
    assert ds.classes == ("a", "b")

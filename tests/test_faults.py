"""Faults, made for real: SIGKILL mid-run, two runs on one cache, a full disk, a hanging runtime.

Kill points are made deterministic with the test hook in ``pipeline/testhook.py``
(``EDGEPIPE_TEST_PAUSE_AT``): the run logs ``test hook: paused at <point>`` and sleeps; the test
then sends SIGKILL from outside, so nothing in the process gets to clean up. Those runs, and the
two at once on one cache, are real ``edgepipe`` processes (and ``slow``); the reference they must
reproduce, the full disks and the hanging runtime run in-process through the library. The full disk is a
real 1 MB tmpfs (``mount -t tmpfs``, as root); where mounting is not allowed those tests skip and
``test_a_failed_write_names_the_file_and_leaves_nothing_behind`` covers the same code by
monkeypatching the write.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import PipelineError, VerificationFailed, disk_error
from pipeline.rundir import atomic_write_bytes
from tests.helpers.chain import Chain, build_chain, edgepipe_log, run_chain
from tests.helpers.cli import cli_args, edgepipe, kill_when_paused
from tests.helpers.world import REPO, TINY_FEATURES, make_image_folders, tiny_cli_args, tiny_graph_options

# Two TFLite variants so a kill can fall between them; one TF.js bundle; both kinds of runtime.
VARIANTS = {"quant_modes": ["float32", "int8"], "tfjs_modes": ["float32"],
            "runtimes": ["ai-edge-litert", "tfjs-wasm"]}
N_IMAGES = 3 * 16 + 3 * 6  # training folder + holdout; bottlenecks are extracted in batches of 64


@dataclass(frozen=True)
class World:
    """What every run here shares: its options (``common`` as command-line arguments) and the
    uninterrupted run they must all reproduce."""

    options: dict
    common: list
    reference_run: Chain
    reference: list[dict]


@pytest.fixture(scope="module")
def world(tiny_graph, tiny_images, tiny_holdout, tmp_path_factory) -> World:
    base = tmp_path_factory.mktemp("faults")
    options = {"images": tiny_images, "test_images": tiny_holdout, "epochs": 40, "learning_rate": 0.05,
               **VARIANTS, **tiny_graph_options(tiny_graph)}
    ref = build_chain(base / "reference", base / "ref-cache", **options)
    return World(options, [*cli_args(options), "--quiet"], ref, comparable(ref.out))


def comparable(run: Path) -> list[dict]:
    """report.json results without the timing figures, which differ from run to run.

    Sizes are rounded to 1 KB: the SavedModel's function names carry a per-process counter
    (``__inference_serve_1234``), so its size moves by a few bytes with what the process traced.
    """
    rows = json.loads((run / "report.json").read_text())["results"]
    return [{k: (round(v / 1000) if k == "size_bytes" else v) for k, v in r.items()
             if k not in ("latency_ms", "latency_p50_ms", "latency_p90_ms")}
            for r in rows]


def assert_cache_valid(cache: Path) -> int:
    """Every bottleneck in the cache loads as a full feature vector; no temporary is left over."""
    entries = list((cache / "bottlenecks").rglob("*.npy"))
    for p in entries:
        assert np.load(p, allow_pickle=False).shape == (TINY_FEATURES,), p
    assert not list(cache.rglob("*.tmp")), list(cache.rglob("*.tmp"))
    return len(entries)


def assert_run_dir_complete(run: Path) -> None:
    """Every file under the run directory is whole: it parses as what its name says."""
    from ai_edge_litert.interpreter import Interpreter

    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]
    for p in run.rglob("*"):
        if not p.is_file():
            continue
        if p.suffix == ".json":
            json.loads(p.read_text(encoding="utf-8"))
        elif p.suffix in (".npz", ".npy"):
            np.load(p, allow_pickle=False)
        elif p.suffix == ".png":
            with Image.open(p) as im:
                im.verify()
        elif p.suffix == ".tflite":
            Interpreter(model_path=str(p)).allocate_tensors()


def manifest(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())


# --- SIGKILL, then the same command again -----------------------------------------------------

@pytest.mark.slow
@pytest.mark.chain
def test_killed_during_extraction_then_during_conversion_resumes_to_the_same_report(world, tmp_path):
    common, reference = world.common, world.reference
    out, cache = tmp_path / "run", tmp_path / "cache"
    env = {"EDGEPIPE_CACHE_DIR": str(cache)}
    args = ["run", "--out", out, *common]

    kill_when_paused(args, env, "bottlenecks")
    assert assert_cache_valid(cache) == 64  # the first batch, cached before the kill
    assert_run_dir_complete(out)
    assert manifest(out)["stages"]["retrain"]["status"] == "running"  # no chance to record more

    # The same command again, killed this time after the first .tflite file is written.
    kill_when_paused(args, env, "quantize")
    stages = manifest(out)["stages"]
    assert stages["retrain"]["info"]["bottlenecks"]["cached"] == 64
    assert stages["retrain"]["info"]["bottlenecks"]["computed"] == N_IMAGES - 64
    assert stages["quantize"]["status"] == "running"
    assert (out / "quantize" / "float32.tflite").is_file() and not (out / "quantize" / "int8.tflite").exists()
    assert_run_dir_complete(out)

    proc = edgepipe(*args, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for done in ("fetch", "retrain", "export"):
        assert f"{done}: up to date, skipped" in proc.stderr
    assert "quantize: running" in proc.stderr
    assert comparable(out) == reference
    assert all(s["status"] == "done" for s in manifest(out)["stages"].values())
    assert_cache_valid(cache)
    assert_run_dir_complete(out)


@pytest.mark.slow
@pytest.mark.chain
def test_killed_during_training_resumes_to_the_same_report(world, tmp_path):
    common, reference = world.common, world.reference
    out, cache = tmp_path / "run", tmp_path / "cache"
    env = {"EDGEPIPE_CACHE_DIR": str(cache)}
    second = []

    def run_beside() -> None:  # a second edgepipe on the same --out while the first is at work
        before = (out / "manifest.json").read_bytes()
        second.append(edgepipe("run", "--out", out, *common, env=env))
        assert (out / "manifest.json").read_bytes() == before

    kill_when_paused(["run", "--out", out, *common], env, "train", while_paused=run_beside)
    proc = second[0]
    assert proc.returncode == 4, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [f"error: {out} is in use by another edgepipe (pid "
                                                 f"{(out / '.edgepipe.lock').read_text().strip()}); wait for it to "
                                                 "finish, or give this run another --out"]
    assert assert_cache_valid(cache) == N_IMAGES
    assert_run_dir_complete(out)
    assert manifest(out)["stages"]["retrain"]["status"] == "running"
    assert not (out / "retrain" / "head.npz").exists()
    # What a kill in the middle of a write would leave: the rerun of the stage clears it.
    leftover = out / "retrain" / ".head.npz.k1ll3d.tmp"
    leftover.parent.mkdir(exist_ok=True)
    leftover.write_bytes(b"half a head")

    proc = edgepipe("run", "--out", out, *common, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert manifest(out)["stages"]["retrain"]["info"]["bottlenecks"]["cached"] == N_IMAGES
    assert manifest(out)["stages"]["retrain"]["info"]["bottlenecks"]["computed"] == 0
    assert comparable(out) == reference
    assert not leftover.exists()
    assert_run_dir_complete(out)


@pytest.mark.slow
def test_fine_tuning_killed_after_an_epoch_resumes_from_it_to_the_same_weights(tiny_graph, tiny_images, tiny_holdout,
                                                                                tmp_path):
    """SIGKILL after the first of four fine-tuning epochs: the same command continues from that
    epoch (its state in RUN/retrain/fine-tune-progress.npz) and trains what an uninterrupted run trains."""
    options = {"images": tiny_images, "test_images": tiny_holdout, "epochs": 20, "learning_rate": 0.05,
               "fine_tune_from": "Relu6:0", "fine_tune_epochs": 4, "hidden_units": 8, "dropout": 0.2, **tiny_graph_options(tiny_graph)}
    reference = tmp_path / "reference"
    run_chain(reference, until="retrain", cache_dir=tmp_path / "ref-cache", **options)
    out, env = tmp_path / "run", {"EDGEPIPE_CACHE_DIR": str(tmp_path / "cache")}
    args = ["retrain", "--out", out, *cli_args(options), "--quiet"]
    kill_when_paused(args, env, "fine-tune")
    progress = out / "retrain" / "fine-tune-progress.npz"
    assert progress.is_file() and not (out / "retrain" / "head.npz").exists()

    proc = edgepipe(*args, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"retrain: fine-tuning resumes after epoch 1 of 4 ({progress})" in proc.stderr
    assert not progress.exists()  # the stage is done: nothing left to resume
    for name in ("head.npz", "tail.npz"):
        with np.load(out / "retrain" / name) as got, np.load(reference / "retrain" / name) as want:
            assert sorted(got.files) == sorted(want.files)
            for k in want.files:
                np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=f"{name}: {k}")


@pytest.mark.slow
def test_an_external_kill_at_any_moment_never_leaves_a_torn_cache_entry(tiny_graph, tmp_path):
    """No hook here: SIGKILL lands wherever extraction happens to be (often inside a write)."""
    images = make_image_folders(tmp_path / "many", per_class=150, size=48, seed=3)
    cache = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "retrain", "--images", str(images),
                             "--out", str(tmp_path / "r"), "--quiet", *tiny_cli_args(tiny_graph)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "EDGEPIPE_CACHE_DIR": str(cache)})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if len(list((cache / "bottlenecks").rglob("*.npy"))) >= 100:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    entries = list((cache / "bottlenecks").rglob("*.npy"))
    assert len(entries) >= 100 or proc.returncode == 0, "the run never got going"
    for p in entries:
        assert np.load(p, allow_pickle=False).shape == (TINY_FEATURES,), p


@pytest.mark.slow
@pytest.mark.chain
def test_two_runs_sharing_one_cache_both_finish_correctly(world, tmp_path):
    common, reference = world.common, world.reference
    env = {**os.environ, "EDGEPIPE_CACHE_DIR": str(tmp_path / "shared-cache")}
    procs = [subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", "--out", str(tmp_path / name),
                               *map(str, common)], cwd=REPO, env=env, text=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for name in ("a", "b")]
    errs = [p.communicate(timeout=600)[1] for p in procs]
    for p, err in zip(procs, errs):
        assert p.returncode == 0, err[-3000:]
    assert comparable(tmp_path / "a") == comparable(tmp_path / "b") == reference
    assert assert_cache_valid(tmp_path / "shared-cache") == N_IMAGES


# --- a full disk ------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A real 1 MB tmpfs, filled up to ``free`` bytes by ``fill(free)``; unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); "
                    "test_a_failed_write_names_the_file_and_leaves_nothing_behind covers ENOSPC by monkeypatching")

    def fill(free: int) -> Path:
        filler = mount / "filler"
        with open(filler, "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError as err:
                assert err.errno == errno.ENOSPC
        os.truncate(filler, max(0, filler.stat().st_size - free))
        return filler

    try:
        yield mount, fill
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.chain
def test_cache_on_a_full_disk_is_exit_2_and_stays_valid_for_the_next_run(world, tmp_path, small_disk):
    mount, fill = small_disk
    cache = mount / "cache"
    filler = fill(free=12 * 4096)  # room for a few cache entries (tmpfs gives each file a page)
    out = tmp_path / "run"
    # A PipelineError, not a crash: the command line prints it as its one `error:` line, exit 2.
    with pytest.raises(PipelineError) as err:
        run_chain(out, **world.options, cache_dir=cache)
    assert err.value.exit_code == 2
    message = str(err.value)
    prefix = f"no space left on device writing {cache / 'bottlenecks'}/"
    assert message.startswith(prefix) and message.endswith(
        ".npy; free some space or point --out / EDGEPIPE_CACHE_DIR at a disk with room"), message
    assert "\n" not in message
    written = assert_cache_valid(cache)
    assert 0 < written < N_IMAGES
    assert manifest(out)["stages"]["retrain"]["status"] == "failed"

    filler.unlink()  # space again: the same command finishes and reuses what was cached
    run_chain(out, **world.options, cache_dir=cache)
    assert manifest(out)["stages"]["retrain"]["info"]["bottlenecks"]["cached"] == written
    assert comparable(out) == world.reference


@pytest.mark.chain
def test_an_artifact_on_a_full_disk_is_exit_2_and_nothing_half_written(world, tmp_path, small_disk):
    mount, fill = small_disk
    out = tmp_path / "run"
    out.mkdir()
    (out / "quantize").symlink_to(mount)  # the quantize stage writes onto the full disk
    fill(free=0)
    with pytest.raises(PipelineError) as err:
        run_chain(out, **world.options, cache_dir=tmp_path / "cache")
    assert err.value.exit_code == 2
    assert str(err.value) == (
        f"no space left on device writing {out / 'quantize' / 'float32.tflite'}; "
        "free some space or point --out / EDGEPIPE_CACHE_DIR at a disk with room")
    assert sorted(p.name for p in mount.iterdir()) == ["filler"]
    stages = manifest(out)["stages"]
    assert [stages[s]["status"] for s in ("fetch", "retrain", "export", "quantize")] == ["done"] * 3 + ["failed"]
    assert "no space left on device" in stages["quantize"]["error"]


def test_a_read_only_run_folder_is_exit_2_with_one_line(world, tmp_path):
    """Through the command line: the run folder itself fails before any stage, at the CLI's boundary."""
    common = world.common
    out = tmp_path / "ro"
    out.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(out)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()})")
    try:
        proc = edgepipe("run", "--out", out, *common, env={"EDGEPIPE_CACHE_DIR": str(tmp_path / "cache")})
    finally:
        subprocess.run(["umount", "-l", str(out)], check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: read-only file system: cannot write {out / 'manifest.json'}; "
        "point --out / EDGEPIPE_CACHE_DIR at a writable folder")


def test_a_failed_write_names_the_file_and_leaves_nothing_behind(tmp_path, monkeypatch):
    """Simulated ENOSPC (runs everywhere, mount or not): the write() inside atomic_write_bytes fails."""
    target = tmp_path / "cache" / "ab" / "abcd.npy"
    atomic_write_bytes(target, b"old and whole")

    def full_disk(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(OSError) as err:
        atomic_write_bytes(target, b"new")
    monkeypatch.undo()
    assert err.value.filename == str(target)
    assert target.read_bytes() == b"old and whole" and sorted(target.parent.iterdir()) == [target]
    assert str(disk_error(err.value)) == (
        f"no space left on device writing {target}; free some space or point --out / EDGEPIPE_CACHE_DIR "
        "at a disk with room")
    assert str(disk_error(OSError(errno.EROFS, "Read-only file system", "/ro/x"))).startswith(
        "read-only file system: cannot write /ro/x; ")
    assert disk_error(OSError(errno.ENOENT, "No such file", "/x")) is None


# --- the Node runtime hangs -------------------------------------------------------------------

@pytest.mark.chain
def test_a_hanging_runtime_is_reported_failed_after_the_timeout_and_others_still_run(world, tmp_path, monkeypatch):
    out = world.reference_run.copy(tmp_path / "run").out
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    node = fake_bin / "node"
    node.write_text("#!/bin/sh\nexec sleep 600\n")  # never answers, never exits
    node.chmod(node.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{fake_bin}:{os.environ['PATH']}")
    started = time.monotonic()
    with edgepipe_log() as lines, pytest.raises(VerificationFailed) as err:
        run_chain(out, runtimes=["tfjs-wasm", "tflite-runtime"], runtime_timeout_s=3)
    assert time.monotonic() - started < 120
    assert err.value.exit_code == 3
    bundle = out / "tfjs" / "float32"
    line = next(ln for ln in lines if ln.startswith("verify: tfjs-float32"))
    assert line.endswith(f"FAILED: tfjs-wasm timed out after 3 s on {bundle} (18 images); the Node process was killed")
    rows = {(r["artifact"], r["runtime"]): r for r in json.loads((out / "report.json").read_text())["results"]}
    assert "timed out after 3 s" in rows[("tfjs-float32", "tfjs-wasm")]["error"]
    assert rows[("tflite-int8", "tflite-runtime")]["passed"] and rows[("tflite-float32", "tflite-runtime")]["passed"]
    assert "tfjs-float32 in tfjs-wasm: tfjs-wasm timed out after 3 s" in (out / "report.md").read_text()


def test_a_run_directory_is_held_by_one_process_and_a_killed_holder_releases_it(tmp_path):
    """RunDir.lock, which run_stages and compare take: re-entrant in the holder, RunBusy (exit 4,
    naming the holder's pid) elsewhere, and free again once the holder is SIGKILLed."""
    from pipeline.errors import EXIT_BUSY, RunBusy
    from pipeline.rundir import RunDir

    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pipeline.rundir import RunDir\n"
                               f"with RunDir({str(out)!r}).lock():\n    print('held', flush=True); time.sleep(600)"],
                              cwd=str(REPO), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunBusy) as busy:
            with RunDir(out).lock():
                pass
        assert busy.value.exit_code == EXIT_BUSY and f"(pid {holder.pid})" in str(busy.value)
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    with RunDir(out).lock(), RunDir(out).lock():  # free, and re-entrant
        pass

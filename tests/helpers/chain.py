"""Whole chains through the Python API, in the test process, and copies of their run directories.

A chain on the tiny graph costs seconds in-process; the same chain through ``python -m
pipeline.cli`` pays the process start and TensorFlow's import on top. The session chain
(:data:`SESSION_VARIANTS` on the tiny world, built once in ``conftest.py``) is shared by every test
that only reads a run directory; a test that changes one works on :func:`copy_run` of it.
"""
from __future__ import annotations

import contextlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

# Every TFLite and TF.js variant the stages write by default, verified in every runtime (MediaPipe
# Tasks too), with --stress: what the tests of the report, the metadata, the page and the
# preprocessing contract read.
SESSION_VARIANTS: dict[str, Any] = {
    "epochs": 60, "learning_rate": 0.05,
    "runtimes": ["tflite-runtime", "ai-edge-litert", "tfjs-wasm", "mediapipe-tasks"],
    "stress": True,
}


def run_chain(out: Path, until: str = "verify", **options: Any) -> dict:
    """``pipeline.run(pipeline.resume(out, **options), until)``, without progress bars.

    Returns:
        The run directory's manifest.
    """
    import pipeline

    return pipeline.run(pipeline.resume(out, **{"progress": False, **options}), until=until)


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def report_rows(run: Path) -> dict[tuple[str, str], dict]:
    """``report.json``'s results keyed by (artifact, runtime)."""
    return {(r["artifact"], r["runtime"]): r for r in read_json(run / "report.json")["results"]}


@dataclass(frozen=True)
class Chain:
    """A finished run directory and what made it.

    Attributes:
        out: the run directory.
        options: the :func:`pipeline.resume` options it was built with (``cache_dir`` aside);
            :func:`tests.helpers.cli.cli_args` spells them for the command line.
        cache: its cache folder (``EDGEPIPE_CACHE_DIR`` for a CLI run on it).
    """

    out: Path
    options: dict
    cache: Path

    def report(self) -> dict:
        return read_json(self.out / "report.json")

    def manifest(self) -> dict:
        return read_json(self.out / "manifest.json")

    def rows(self) -> dict[tuple[str, str], dict]:
        return report_rows(self.out)

    def copy(self, dst: Path) -> "Chain":
        """A self-contained copy at ``dst`` (see :func:`copy_run`), sharing the cache."""
        return Chain(copy_run(self.out, dst), dict(self.options), self.cache)


def build_chain(out: Path, cache: Path, **options: Any) -> Chain:
    run_chain(out, cache_dir=cache, **options)
    return Chain(out, options, cache)


def _moved(value: Any, old: str, new: str) -> Any:
    if isinstance(value, str):
        return new + value[len(old):] if value == old or value.startswith(old + "/") else value
    if isinstance(value, list):
        return [_moved(v, old, new) for v in value]
    if isinstance(value, dict):
        return {k: _moved(v, old, new) for k, v in value.items()}
    return value


def copy_run(src: Path, dst: Path) -> Path:
    """Copies run directory ``src`` to ``dst`` so that ``dst`` stands on its own.

    ``manifest.json`` records each stage output's ``path`` relative to the run directory (so a plain
    copy reads its own files: ``test_a_run_directory_copied_elsewhere_reads_its_own_files``); the
    config's ``out`` and a few informational paths are absolute, and are rewritten to the same
    place under ``dst``. Paths outside ``src`` (image folders, the graph, the cache) are kept.
    """
    src, dst = Path(src), Path(dst)
    shutil.copytree(src, dst, symlinks=True)
    manifest = dst / "manifest.json"
    data = _moved(read_json(manifest), str(src), str(dst))
    manifest.write_text(json.dumps(data, indent=2), encoding="utf-8")
    return dst


def tree_state(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` with its size and modification time: what a write would change."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


class _Lines(logging.Handler):
    def __init__(self, lines: list[str]):
        super().__init__(logging.DEBUG)
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.extend(record.getMessage().splitlines())


@contextlib.contextmanager
def edgepipe_log() -> Iterator[list[str]]:
    """Collects the lines edgepipe prints (its ``edgepipe`` logger) while the block runs.

    They are the lines the command line shows on stderr: ``<stage>: up to date, skipped``,
    ``skipped PATH: reason``, ``warning: ...``, ``note: ...``.
    """
    from pipeline.console import LOGGER_NAME, setup_logging

    setup_logging()
    lines: list[str] = []
    handler = _Lines(lines)
    logger = logging.getLogger(LOGGER_NAME)
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)

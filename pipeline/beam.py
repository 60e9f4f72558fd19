"""Apache Beam as the engine of edgepipe's data-parallel passes (``--engine beam``).

Two passes grow with the number of images: bottleneck extraction (retrain) and running every
model on the holdout (verify, check, classify). Each runs here as one Beam pipeline, on any Beam
runner (DirectRunner by default; Dataflow, Flink, Spark and portable runners by name):

* the driver lists the images and spreads them over the workers (``Reshuffle``);
* each worker loads the graph or the models once (``DoFn.setup``), reads its images (local paths
  as the local engine reads them, other URLs through :mod:`apache_beam.io.filesystems`), batches
  them and runs the same functions the local engine runs (:mod:`pipeline.bottlenecks`,
  :mod:`pipeline.verify`'s preparation, the runners);
* bottleneck entries are written by the workers, atomically and content-addressed, so a retried
  bundle rewrites the same bytes under the same name and never tears or duplicates an entry;
* what the driver needs back (features, probabilities, unreadable images) comes as JSON lines
  that Beam's own text sink writes and finalises; the driver then does the rest (training the
  head, metrics, the report) exactly as the local engine does.

Beam's local runner does not retry a bundle whose worker died, so :func:`run` runs the pipeline
again (up to :data:`ATTEMPTS` times), as Dataflow retries bundles: what the cache already holds is
read, not recomputed.
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from pipeline.config import BeamConfig
from pipeline.console import log
from pipeline.console import progress as progress_bar
from pipeline.errors import one_line
from pipeline.images import ImageError, read_image_file

ATTEMPTS = 3  # runs of a pipeline whose workers fail (Dataflow tries a bundle 4 times)
BATCH = 64    # images per backbone call on a worker (BatchElements' upper bound)
RECORDS = "records"


def is_url(path: object) -> bool:
    """A path on a Beam filesystem other than the local one (``gs://``, ``s3://``, ``hdfs://``)."""
    return "://" in str(path)


def read_bytes(path: str) -> bytes:
    """An image's bytes: local files as the local engine reads them (same checks, same reasons),
    URLs through Beam's filesystems.

    Raises:
        ImageError: the file cannot be read.
    """
    if not is_url(path):
        return read_image_file(path)
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems

    try:
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            return f.read()
    except Exception as err:  # each filesystem raises its own (BeamIOError, HttpError, ...)
        why = f"cannot read ({one_line(err, 120)})"
        raise ImageError(f"{path}: {why}", why) from None


@contextlib.contextmanager
def _quiet_import() -> Iterator[None]:
    # Beam's import warns through the root logger (apitools, bigquery), which would give the root
    # logger a stderr handler and print every library's log lines; a handler there while it
    # imports keeps the console edgepipe's.
    root = logging.getLogger()
    guard = logging.NullHandler()
    root.addHandler(guard)
    try:
        yield
    finally:
        root.removeHandler(guard)
        logging.getLogger("apache_beam").setLevel(logging.ERROR)


def _beam():
    with _quiet_import():
        import apache_beam

    return apache_beam


def _given(options: Sequence[str]) -> dict[str, str | None]:
    """``--name=value`` options by name (dashes as underscores), as Beam parses them."""
    out: dict[str, str | None] = {}
    for opt in options:
        name, _, value = opt[2:].partition("=")
        out[name.replace("-", "_")] = value or None
    return out


def pipeline_flags(cfg: BeamConfig) -> list[str]:
    """The Beam options a pass runs with: the user's, and defaults for the ones not given.

    On the DirectRunner the default is its multi-process mode with one worker per core (Beam's
    own default is a single in-process worker), and workers log only errors.
    """
    given = _given(cfg.options)
    flags = [f"--runner={cfg.runner}", *cfg.options]
    if cfg.runner == "DirectRunner":
        if "direct_running_mode" not in given:
            flags.append("--direct_running_mode=multi_processing")
        if "direct_num_workers" not in given:
            flags.append(f"--direct_num_workers={os.cpu_count() or 1}")
    if "default_sdk_harness_log_level" not in given:
        flags.append("--default_sdk_harness_log_level=ERROR")
    return flags


def worker_threads(cfg: BeamConfig) -> int:
    """Threads for a worker's backbone or runtime: the cores shared between the DirectRunner's
    local workers; one on other runners, which start one worker process per core."""
    if cfg.runner != "DirectRunner":
        return 1
    given = _given(pipeline_flags(cfg))
    try:
        workers = int(given.get("direct_num_workers") or 1)
    except ValueError:
        workers = 1
    if given.get("direct_running_mode") == "in_memory":
        workers = 1
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def _results_root(cfg: BeamConfig) -> tuple[str, bool]:
    """Where workers write the records for the driver: the pipeline's ``--temp_location`` when
    given (remote workers need a shared filesystem), else a local temporary folder."""
    temp = _given(cfg.options).get("temp_location")
    if temp:
        return f"{temp.rstrip('/')}/edgepipe-{uuid.uuid4().hex[:12]}", True
    return tempfile.mkdtemp(prefix="edgepipe-beam-"), False


class Progress:
    """Images done, counted by the workers in small files the driver sums (local runners only:
    other runners show their progress in their own consoles)."""

    def __init__(self, folder: str | None):
        self.folder = folder
        self._name: str | None = None
        self._done = 0

    def add(self, n: int) -> None:
        if self.folder is None:
            return
        from pipeline.rundir import atomic_write_bytes

        self._name = self._name or os.path.join(self.folder, f"{os.getpid()}-{uuid.uuid4().hex[:8]}")
        self._done += n
        with contextlib.suppress(OSError):
            atomic_write_bytes(self._name, str(self._done).encode(), durable=False)

    @staticmethod
    def total(folder: str) -> int:
        done = 0
        for name in os.listdir(folder):
            with contextlib.suppress(OSError, ValueError):
                with open(os.path.join(folder, name)) as f:
                    done += int(f.read() or 0)
        return done


def run(build: Callable[[Any, str, Progress], None], cfg: BeamConfig, what: str, total: int,
        progress: bool = True) -> list[dict]:
    """Runs a pass's pipeline and returns its records (JSON lines, in no particular order).

    Args:
        build: adds the pass to a pipeline: ``build(pipeline, records_prefix, progress)``; it ends
            in ``WriteToText(records_prefix)`` of JSON lines.
        what: the pass, for the progress bar and messages.
        total: the items the bar counts.

    Raises:
        RuntimeError: the pipeline failed :data:`ATTEMPTS` times (the last failure chained).
    """
    beam = _beam()
    from apache_beam.options.pipeline_options import PipelineOptions

    flags = pipeline_flags(cfg)
    local = cfg.runner in ("DirectRunner", "PrismRunner")
    for attempt in range(1, ATTEMPTS + 1):
        root, remote = _results_root(cfg)
        counts = tempfile.mkdtemp(prefix="edgepipe-progress-") if local else None
        bar = progress_bar(total=total, desc=what, unit="img", disable=not progress or not local, delay=0.5)
        stop = threading.Event()

        def poll() -> None:
            while not stop.wait(0.5):
                bar.n = min(total, Progress.total(counts))
                bar.refresh()

        watcher = threading.Thread(target=poll, daemon=True) if counts and progress else None
        try:
            if watcher:
                watcher.start()
            pipeline = beam.Pipeline(options=PipelineOptions(flags))
            build(pipeline, f"{root}/{RECORDS}", Progress(counts))
            state = pipeline.run().wait_until_finish()
            if str(state) not in ("DONE", "PipelineState.DONE"):
                raise RuntimeError(f"the pipeline ended {state}")
            records = list(_read_records(f"{root}/{RECORDS}"))
            if watcher:
                bar.n = total
            return records
        except Exception as err:
            if attempt == ATTEMPTS:
                raise RuntimeError(f"beam: the {what} pipeline failed {ATTEMPTS} times; the last time: "
                                   f"{one_line(err)}") from err
            log.info(f"beam: the {what} pipeline failed ({one_line(err, 160)}); running it again "
                     f"(attempt {attempt + 1} of {ATTEMPTS}): what the cache holds is read, not recomputed")
        finally:
            stop.set()
            if watcher:
                watcher.join()
            bar.close()
            _remove(root, remote)
            if counts:
                shutil.rmtree(counts, ignore_errors=True)
    raise AssertionError("unreachable")


def _read_records(prefix: str) -> Iterator[dict]:
    from apache_beam.io.filesystems import FileSystems

    files = sorted(m.path for m in FileSystems.match([f"{prefix}*"])[0].metadata_list)
    for name in files:
        with FileSystems.open(name) as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)


def _remove(root: str, remote: bool) -> None:
    if not remote:
        shutil.rmtree(root, ignore_errors=True)
        return
    from apache_beam.io.filesystems import FileSystems

    with contextlib.suppress(Exception):
        FileSystems.delete([root])


def pack(a: np.ndarray) -> str:
    """float32 values as text for a record (base64 of little-endian bytes: exact, and a third of
    the size of decimal text)."""
    return base64.b64encode(np.ascontiguousarray(a, "<f4").tobytes()).decode("ascii")


def unpack(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), "<f4")


# --- bottlenecks --------------------------------------------------------------------------------

def _extract_fn_class():
    beam = _beam()
    from pipeline.testhook import kill_point

    class ExtractFn(beam.DoFn):
        """Features of a batch of images (and their augmented copies): from the cache, else
        computed and written to it."""

        def __init__(self, job: dict, progress: Progress):
            self.job, self.progress = job, progress

        def setup(self):
            from pipeline.backbone import get_extractor
            from pipeline.bottlenecks import BottleneckCache, backbone_key

            job = self.job
            self.extractor = get_extractor(job["graph"], job["spec"], job["engine"], job["threads"])
            spec = self.extractor.spec
            self.prep = spec.preprocessing
            self.cache = BottleneckCache(job["cache_root"], backbone_key(job["graph_sha256"], spec, self.extractor.engine),
                                         spec.feature_size)

        def process(self, batch):
            from pipeline.bottlenecks import entry_name, item_pixels

            augment = self.job["augment"]
            todo, out = [], []
            for i, path, copies in batch:
                try:
                    data = read_bytes(path)
                except ImageError as err:
                    out.append({"i": i, "skip": err.reason})
                    continue
                sha = hashlib.sha256(data).hexdigest()
                for v in range(1 + copies):
                    name = entry_name(sha, v, augment)
                    hit = self.cache.get(name)
                    if hit is not None:
                        out.append({"i": i, "v": v, "sha": sha, "f": pack(hit)})
                        continue
                    try:
                        todo.append((i, v, sha, name, item_pixels(data, v, self.prep, augment, sha, path)))
                    except (ImageError, OSError) as err:
                        why = err.reason if isinstance(err, ImageError) else f"cannot read ({err.strerror or err})"
                        out.append({"i": i, "skip": why})
                        break
            if todo:
                feats = self.extractor([px for *_, px in todo])
                for (i, v, sha, name, _), f in zip(todo, feats):
                    self.cache.put(name, f)
                    out.append({"i": i, "v": v, "sha": sha, "f": pack(f), "computed": 1})
                kill_point("beam-extract")
            self.progress.add(sum(1 + copies for _, _, copies in batch))
            for record in out:
                yield json.dumps(record)

    return ExtractFn


def extract(paths: Sequence[str], graph_path, spec, graph_sha256: str, cache_root, beam: BeamConfig,
            augment=None, augment_indices: Sequence[int] = (), engine: str = "litert",
            progress: bool = True):
    """:func:`pipeline.bottlenecks.extract` on Beam: the same entries, features and result.

    Returns:
        A :class:`pipeline.bottlenecks.ExtractionResult`, as the local engine's.
    """
    from pipeline.bottlenecks import ExtractionResult, variants

    copies = variants(augment)
    aug_set = set(augment_indices) if copies else set()
    items = [(i, str(p), copies if i in aug_set else 0) for i, p in enumerate(paths)]
    job = {"graph": str(graph_path), "spec": spec, "graph_sha256": graph_sha256, "cache_root": str(cache_root),
           "augment": augment, "engine": engine, "threads": worker_threads(beam)}
    extract_fn = _extract_fn_class()

    def build(p, prefix: str, counter: Progress) -> None:
        b = _beam()
        (p | "images" >> b.Create(items) | "spread" >> b.Reshuffle()
         | "batch" >> b.BatchElements(min_batch_size=1, max_batch_size=BATCH)
         | "features" >> b.ParDo(extract_fn(job, counter))
         | "records" >> b.io.WriteToText(prefix))

    total = len(items) + sum(c for *_, c in items)
    log.info(f"bottlenecks: {len(items)} images on Beam's {beam.runner}")
    records = run(build, beam, "bottlenecks", total, progress)
    n = len(paths)
    dim = next((len(unpack(r["f"])) for r in records if "f" in r), spec.feature_size)
    plain = np.zeros((n, dim), np.float32)
    extra = np.zeros((n, copies, dim), np.float32) if copies else None
    have = np.zeros(n, bool)
    skipped: dict[int, str] = {}
    hashes = [""] * n
    computed = cached = 0
    for r in records:
        i = r["i"]
        if "skip" in r:
            skipped[i] = r["skip"]
            continue
        hashes[i] = r["sha"]
        if r["v"] == 0:
            plain[i] = unpack(r["f"])
            have[i] = True
        else:
            extra[i, r["v"] - 1] = unpack(r["f"])
        computed += r.get("computed", 0)
        cached += 1 - r.get("computed", 0)
    ok = [i for i in range(n) if have[i] and i not in skipped]
    return ExtractionResult(plain[ok], ok, skipped, computed=computed, cached=cached, hashes=hashes,
                            augmented=extra[ok] if copies else None)

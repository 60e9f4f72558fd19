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
import os
import shutil
import tempfile
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

import pipeline.storage as storage
from pipeline.config import LOCAL_BEAM_RUNNERS, BeamConfig, beam_option_values
from pipeline.console import log
from pipeline.console import progress as progress_bar
from pipeline.errors import one_line
from pipeline.images import ImageError, read_image_file, reason_of

ATTEMPTS = 3  # runs of a pipeline whose workers fail (Dataflow tries a bundle 4 times)
BATCH = 64    # images per backbone call on a worker (BatchElements' upper bound)
RECORDS = "records"


def _beam():
    with storage.quiet_import():
        import apache_beam

    return apache_beam


def pipeline_flags(cfg: BeamConfig) -> list[str]:
    """The Beam options a pass runs with: the user's, and defaults for the ones not given.

    On the DirectRunner the default is its multi-process mode with one worker per core (Beam's
    own default is a single in-process worker), and workers log only errors.
    """
    given = beam_option_values(cfg.options)
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
    given = beam_option_values(pipeline_flags(cfg))
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
    temp = beam_option_values(cfg.options).get("temp_location")
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


def run(build: Callable[[Any, str, Progress], None], cfg: BeamConfig, what: str, inputs: Sequence,
        consume: Callable[[dict], None], total: int, progress: bool = True) -> None:
    """Runs a pass's pipeline over ``inputs`` and hands each of its records to ``consume``.

    The inputs (JSON-able: paths with their indices) go to the workers as a file Beam reads,
    not inside the pipeline's definition, whose size runners limit; the records come back as
    JSON lines, read one at a time once the pipeline has succeeded.

    Args:
        build: adds the pass to the spread inputs: ``build(inputs, records_prefix, progress)``; it
            ends in ``WriteToText(records_prefix)`` of JSON lines.
        what: the pass, for the progress bar and messages.
        total: the items the bar counts.

    Raises:
        RuntimeError: the pipeline failed :data:`ATTEMPTS` times (the last failure chained).
    """
    beam = _beam()
    from apache_beam.options.pipeline_options import PipelineOptions

    flags = pipeline_flags(cfg)
    storage.configure(flags)  # the driver reads and writes with the workers' filesystem options
    local = cfg.runner in LOCAL_BEAM_RUNNERS
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
            listing = "".join(json.dumps(item) + "\n" for item in inputs).encode()
            if remote:
                storage.write_atomic(f"{root}/inputs.jsonl", listing)
            else:
                Path(root, "inputs.jsonl").write_bytes(listing)
            if watcher:
                watcher.start()
            pipeline = beam.Pipeline(options=PipelineOptions(flags))
            spread = (pipeline | "inputs" >> beam.io.ReadFromText(f"{root}/inputs.jsonl")
                      | "parse" >> beam.Map(json.loads) | "spread" >> beam.Reshuffle())
            build(spread, f"{root}/{RECORDS}", Progress(counts))
            state = pipeline.run().wait_until_finish()
            if str(state) not in ("DONE", "PipelineState.DONE"):
                raise RuntimeError(f"the pipeline ended {state}")
        except Exception as err:
            if attempt == ATTEMPTS:
                _remove(root, remote)
                raise RuntimeError(f"beam: the {what} pipeline failed {ATTEMPTS} times; the last time: "
                                   f"{one_line(err)}") from err
            log.info(f"beam: the {what} pipeline failed ({one_line(err, 160)}); running it again "
                     f"(attempt {attempt + 1} of {ATTEMPTS}): what the cache holds is read, not recomputed")
            _remove(root, remote)
            continue
        finally:
            stop.set()
            if watcher:
                watcher.join()
            bar.close()
            if counts:
                shutil.rmtree(counts, ignore_errors=True)
        try:
            for record in _read_records(f"{root}/{RECORDS}"):
                consume(record)
        finally:
            _remove(root, remote)
        return
    raise AssertionError("unreachable")


def _read_records(prefix: str) -> Iterator[dict]:
    for name, _, _ in storage.listing(f"{prefix}*"):
        for line in storage.iter_lines(name):
            if line.strip():
                yield json.loads(line)


def _remove(root: str, remote: bool) -> None:
    if remote:
        storage.delete_tree(root)
    else:
        shutil.rmtree(root, ignore_errors=True)


def stage(path, cfg: BeamConfig) -> str:
    """A model or graph file (or folder) where the workers can read it: with ``--temp_location``
    (workers on other machines) a copy there, keyed by the file's size and time; else the path.
    Workers take it with :func:`localize`."""
    temp = beam_option_values(cfg.options).get("temp_location")
    if not temp or storage.is_url(path):
        return str(path)
    local = Path(path)
    stats = [(str(p.relative_to(local)), p.stat().st_size, p.stat().st_mtime_ns)
             for p in sorted(local.rglob("*")) if p.is_file()] if local.is_dir() else [(local.name, *_stat(local))]
    key = hashlib.sha256(json.dumps([str(local.resolve()), stats]).encode()).hexdigest()[:16]
    url = storage.join(temp, "edgepipe-staged", key)
    try:
        storage.read(storage.join(url, storage.MANIFEST))
    except OSError:
        storage.upload(local, url)
    return url


def _stat(p) -> tuple[int, int]:
    st = os.stat(p)
    return st.st_size, st.st_mtime_ns


def localize(path: str, folder: str) -> str:
    """On a worker: a staged URL copied to the local ``folder`` (the runtimes read local files)."""
    if not storage.is_url(path):
        return path
    return str(storage.download(path, Path(folder)))


def pack(a: np.ndarray) -> str:
    """float32 values as text for a record (base64 of little-endian bytes: exact, and a third of
    the size of decimal text)."""
    return base64.b64encode(np.ascontiguousarray(a, "<f4").tobytes()).decode("ascii")


def unpack(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), "<f4")


# --- bottlenecks --------------------------------------------------------------------------------

def remote_cache_class():
    from pipeline.bottlenecks import BottleneckCache

    class RemoteCache(BottleneckCache):
        """:class:`pipeline.bottlenecks.BottleneckCache`'s layout and entries on a Beam filesystem."""

        def __init__(self, root: str, key: str, feature_size: int):
            super().__init__(Path(os.devnull), key, feature_size)  # the header, for this size
            self.dir = storage.join(root, key)

        def _path(self, image_sha: str) -> str:
            return storage.join(self.dir, image_sha[:1], f"{image_sha}.npy")

        def get(self, image_sha: str):
            try:
                return self._entry(storage.read(self._path(image_sha)))
            except OSError:
                return None

        def put(self, image_sha: str, feature: np.ndarray) -> None:
            storage.write_atomic(self._path(image_sha), self._header + np.asarray(feature, "<f4").tobytes())

    return RemoteCache


def _extract_fn_class():
    beam = _beam()
    from pipeline.testhook import kill_point

    class ExtractFn(beam.DoFn):
        """Features of a batch of images (and their augmented copies): from the cache, else
        computed and written to it."""

        def __init__(self, job: dict, progress: Progress):
            self.job, self.progress = job, progress

        def setup(self):
            from pipeline.backbone import LiteRTFeatureExtractor, get_extractor
            from pipeline.bottlenecks import backbone_key

            job = self.job
            self.tmp = tempfile.mkdtemp(prefix="edgepipe-beam-graph-")
            if job["model"] is not None:  # converted on the driver: no TensorFlow on the workers
                self.extractor = LiteRTFeatureExtractor.from_model(job["model"], job["spec"], job["threads"])
            else:
                self.extractor = get_extractor(localize(job["graph"], self.tmp), job["spec"], job["engine"],
                                               job["threads"])
            spec = self.extractor.spec
            self.prep = spec.preprocessing
            self.cache = cache_at(job["cache_root"], backbone_key(job["graph_sha256"], spec, self.extractor.engine),
                                  spec.feature_size)

        def teardown(self):
            shutil.rmtree(getattr(self, "tmp", ""), ignore_errors=True)

        def process(self, batch):
            from pipeline.bottlenecks import entry_name, item_pixels

            augment = self.job["augment"]
            todo, out = [], []
            for i, path, copies in batch:
                try:
                    data = read_image_file(path)
                except ImageError as err:
                    out.append({"i": i, "skip": err.reason})
                    continue
                sha = hashlib.sha256(data).hexdigest()
                for v in range(1 + copies):
                    name = entry_name(sha, v, augment)
                    hit = self.cache.get(name)
                    if hit is not None:
                        out.append({"i": i, "v": v, "sha": sha, **({"f": pack(hit)} if self.job["keep"] else {})})
                        continue
                    try:
                        todo.append((i, v, sha, name, item_pixels(data, v, self.prep, augment, sha, path)))
                    except (ImageError, OSError) as err:
                        out.append({"i": i, "sha": sha, "skip": reason_of(err)})  # read, so hashed, as locally
                        break
            if todo:
                feats = self.extractor([px for *_, px in todo])
                for (i, v, sha, name, _), f in zip(todo, feats):
                    self.cache.put(name, f)
                    out.append({"i": i, "v": v, "sha": sha, "computed": 1, **({"f": pack(f)} if self.job["keep"] else {})})
                kill_point("beam-extract")
            self.progress.add(sum(1 + copies for _, _, copies in batch))
            for record in out:
                yield json.dumps(record)

    return ExtractFn


def extract(paths: Sequence[str], graph_path, spec, graph_sha256: str, cache_root, beam: BeamConfig,
            augment=None, augment_indices: Sequence[int] = (), engine: str = "litert",
            progress: bool = True, keep: bool = True):
    """:func:`pipeline.bottlenecks.extract` on Beam: the same entries, features and result.

    Returns:
        A :class:`pipeline.bottlenecks.ExtractionResult`, as the local engine's.
    """
    from pipeline.bottlenecks import Gathered, backbone_key, variants

    copies = variants(augment)
    aug_set = set(augment_indices) if copies else set()
    items = [(i, str(p), copies if i in aug_set else 0) for i, p in enumerate(paths)]
    from pipeline.backbone import LiteRTFeatureExtractor, get_extractor

    # The graph is converted here once, as the local engine converts it; the workers get the
    # TFLite bytes (a MobileNet's are under 20 MB) and the resolved spec. A graph TFLite cannot
    # convert is staged for the workers, which run it in TensorFlow.
    here = get_extractor(str(graph_path), spec, engine)
    model = here.model if isinstance(here, LiteRTFeatureExtractor) else None
    job = {"graph": None if model else stage(graph_path, beam), "model": model, "spec": here.spec,
           "graph_sha256": graph_sha256, "cache_root": str(cache_root), "augment": augment, "engine": engine,
           "threads": worker_threads(beam), "keep": keep}
    extract_fn = _extract_fn_class()

    def build(spread, prefix: str, counter: Progress) -> None:
        b = _beam()
        (spread | "batch" >> b.BatchElements(min_batch_size=1, max_batch_size=BATCH)
         | "features" >> b.ParDo(extract_fn(job, counter))
         | "records" >> b.io.WriteToText(prefix))

    got = Gathered(len(paths), copies, here.spec.feature_size, keep)

    def consume(r: dict) -> None:
        i = r["i"]
        if "skip" in r:
            got.skipped[i] = r["skip"]
            got.hashes[i] = r.get("sha", got.hashes[i])
            return
        got.hashes[i] = r["sha"]
        got.store(i, r["v"], unpack(r["f"]) if "f" in r else None)
        got.counts["computed" if r.get("computed") else "cached"] += 1

    log.info(f"bottlenecks: {len(items)} images on Beam's {beam.runner}")
    run(build, beam, "bottlenecks", items, consume, len(items) + sum(c for *_, c in items), progress)
    cache = cache_at(cache_root, backbone_key(graph_sha256, here.spec, here.engine), here.spec.feature_size)
    if not storage.is_url(str(cache_root)):  # local: what workers killed mid-write left
        cache.remove_orphans()
    return got.result(cache)


def cache_at(root, key: str, feature_size: int):
    """The bottleneck cache at ``root``: local, or on a Beam filesystem."""
    from pipeline.bottlenecks import BottleneckCache

    kind = remote_cache_class() if storage.is_url(str(root)) else BottleneckCache
    return kind(root, key, feature_size)


# --- the holdout pass: every model in every runtime on every image -----------------------------

@dataclass(frozen=True)
class ModelJob:
    """One (model, runtime) pair of the pass: which file, in which runtime, fed which of
    :func:`pipeline.verify.prepare_feed`'s feeds."""

    key: tuple[str, str]  # (artifact name, runtime or verify.REFERENCE_PASS)
    path: str
    runtime: str
    feed: str
    tensors: Any = None


def _predict_fn_class():
    beam = _beam()

    class PredictFn(beam.DoFn):
        """Every job's raw outputs on a chunk of images: decoded once, prepared once per feed."""

        def __init__(self, jobs: Sequence[ModelJob], prep: dict, progress: Progress):
            self.jobs, self.prep, self.progress = list(jobs), prep, progress

        def setup(self):
            from pipeline.runners import REGISTRY
            from pipeline.types import Runtime

            self.runners = {}
            self.tmp = tempfile.mkdtemp(prefix="edgepipe-beam-feeds-")
            self.paths = [localize(job.path, self.tmp) for job in self.jobs]
            for job in self.jobs:
                if job.runtime not in self.runners:
                    self.runners[job.runtime] = REGISTRY[Runtime(job.runtime)].create(
                        self.prep["classes"], **self.prep["runner_options"])

        def teardown(self):
            for runner in getattr(self, "runners", {}).values():
                with contextlib.suppress(Exception):
                    runner.close()
            shutil.rmtree(getattr(self, "tmp", ""), ignore_errors=True)

        def process(self, chunk):
            from pipeline.images import decode_rgb
            from pipeline.runners.base import RuntimeFailed
            from pipeline.runners.feed import FeedFile
            from pipeline.verify import RAN_ON_KEYS, prepare_feed

            p = self.prep
            rgbs, kept = [], []
            for k, path in chunk:
                try:
                    rgbs.append(decode_rgb(read_image_file(path), path))
                    kept.append(k)
                except (ImageError, OSError) as err:
                    yield json.dumps({"k": k, "skip": reason_of(err)})
            if rgbs:
                feeds = {}
                for name in dict.fromkeys(job.feed for job in self.jobs):
                    array = prepare_feed(rgbs, name, p["contract"], p["app"], p["feeds"])
                    feeds[name] = FeedFile.from_array(Path(self.tmp) / f"feed-{len(feeds)}.f32", array)
                for j, (job, path) in enumerate(zip(self.jobs, self.paths)):
                    runner = self.runners[job.runtime]
                    if runner.unsupported(path):
                        continue  # verify says why, from its own runner
                    try:
                        pred = runner.predict(path, feeds[job.feed], timeout_s=p["timeout_s"], settings=p["run"],
                                              tensors=job.tensors)
                    except RuntimeFailed as err:
                        yield json.dumps({"job": j, "error": str(err)})
                        continue
                    info = getattr(runner, "last_info", None) or getattr(runner, "last_summary", None) or {}
                    yield json.dumps({"job": j, "ran_on": {key: info[key] for key in RAN_ON_KEYS if key in info}},
                                     default=str)
                    for k, row in zip(kept, np.asarray(pred.probabilities, np.float32)):
                        yield json.dumps({"k": k, "job": j, "p": pack(row)})
            self.progress.add(len(chunk))

    return PredictFn


def run_holdout(paths: Sequence[str], jobs: Sequence[ModelJob], prep: dict, beam: BeamConfig, what: str,
                progress: bool = True) -> tuple[list[int], dict[int, str], dict[tuple[str, str], Any]]:
    """Runs every job on every image on Beam.

    Args:
        prep: ``contract``, ``app`` and ``feeds`` (as for :func:`pipeline.verify.prepare_feed`),
            ``classes``, ``runner_options``, ``timeout_s`` and ``run`` (the runners' settings).

    Returns:
        The indices of the images that could be read (in order), the unreadable ones with the
        reason, and each job's :class:`pipeline.verify.PassOutput` by key, rows in that order.
    """
    import dataclasses

    from pipeline.verify import PassOutput

    prep = {**prep, "run": dataclasses.replace(prep["run"], threads=worker_threads(beam), latency_runs=0)}
    jobs = [dataclasses.replace(job, path=stage(job.path, beam)) for job in jobs]
    batch = prep["run"].batch
    # Chunks cut on the driver, as the local engine cuts the holdout into the runtimes' batches, so
    # every runtime sees the same batches either way (some kernels round differently by batch).
    chunks = [[(k, str(paths[k])) for k in range(s, min(len(paths), s + batch))] for s in range(0, len(paths), batch)]
    predict_fn = _predict_fn_class()

    def build(spread, prefix: str, counter: Progress) -> None:
        b = _beam()
        (spread | "predict" >> b.ParDo(predict_fn(jobs, prep, counter))
         | "records" >> b.io.WriteToText(prefix))

    skipped: dict[int, str] = {}
    errors: dict[int, str] = {}
    ran_on: dict[int, dict] = {}
    rows: dict[int, dict[int, np.ndarray]] = {}

    def consume(r: dict) -> None:
        if "skip" in r:
            skipped[r["k"]] = r["skip"]
        elif "error" in r:
            errors.setdefault(r["job"], r["error"])
        elif "ran_on" in r:
            ran_on.setdefault(r["job"], r["ran_on"])
        elif "p" in r:
            rows.setdefault(r["job"], {})[r["k"]] = unpack(r["p"])

    log.info(f"{what}: {len(paths)} images × {len(jobs)} model and runtime pairs on Beam's {beam.runner}")
    run(build, beam, what, chunks, consume, len(paths), progress)
    readable = [k for k in range(len(paths)) if k not in skipped]
    row_of = {k: n for n, k in enumerate(readable)}
    out = {}
    for j, job in enumerate(jobs):
        got = rows.get(j, {})
        if j in errors:
            out[job.key] = PassOutput(None, errors[j], ran_on.get(j, {}))
        elif got and len(got) == len(readable):
            outputs = np.zeros((len(readable), len(next(iter(got.values())))), np.float32)
            for k, row in got.items():
                outputs[row_of[k]] = row
            out[job.key] = PassOutput(outputs, None, ran_on.get(j, {}))
        elif got:
            out[job.key] = PassOutput(None, f"outputs for {len(got)} of {len(readable)} images", ran_on.get(j, {}))
    return readable, skipped, out


def holdout_pass(examples: Sequence, reference, artifacts: Sequence, settings, folder, beam: BeamConfig,
                 feeds: dict | None = None, labelled: bool = True, progress: bool = True):
    """The agreement passes of :func:`pipeline.verify.verify` on Beam, and the holdout to verify with.

    Returns:
        ``(holdout, passes)``: the holdout's labels, paths and unreadable images are every test
        example's, its feeds hold only the first readable image (the driver times latency on
        it); ``passes`` go to ``verify(..., passes=passes)``.

    Raises:
        DatasetError: there are no test examples, or none can be read.
    """
    import dataclasses

    from pipeline.errors import DatasetError
    from pipeline.runners import REFERENCE_RUNTIME, REGISTRY
    from pipeline.verify import REFERENCE_PASS, feed_name, load_holdout, plan

    if not examples:
        raise DatasetError("the test split is empty: raise --test-pct or pass --test-images DIR")
    feeds = dict(feeds or {})
    ref_info = REGISTRY[REFERENCE_RUNTIME[reference.kind]]
    jobs = [ModelJob((reference.name, REFERENCE_PASS), str(reference.path), str(ref_info.runtime),
                     feed_name(reference, ref_info.feed), reference.tensors)]
    _, pairs = plan(artifacts, settings)
    for rt, arts in pairs.items():
        jobs += [ModelJob((a.name, str(rt)), str(a.path), str(rt), feed_name(a, REGISTRY[rt].feed), a.tensors)
                 for a in arts]
    if any(REGISTRY[rt].sampled for rt in pairs):
        log.info("verify: on Beam the emulated runtimes run every test image (--arm64-sample is for the local engine)")
    prep = {"contract": settings.contract, "app": settings.app, "feeds": feeds, "classes": settings.classes,
            "runner_options": dict(settings.runner_options), "timeout_s": settings.timeout_s, "run": settings.run}
    readable, skipped, passes = run_holdout([e.path for e in examples], jobs, prep, beam, "verify", progress)
    for k, why in sorted(skipped.items()):
        log.info(f"skipped {examples[k].path}: {why}")
    if not readable:
        raise DatasetError(f"none of the {len(examples)} test images can be read (listed above); "
                           "restore them or run retrain again")
    first = load_holdout([examples[readable[0]]], settings.contract, folder, settings.app, feeds=feeds,
                         labelled=labelled)
    kept = [examples[k] for k in readable]
    holdout = dataclasses.replace(
        first, labels=np.array([e.label for e in kept]) if labelled else None, paths=[e.path for e in kept],
        skipped=[{"path": examples[k].path, "reason": why} for k, why in sorted(skipped.items())])
    return holdout, passes

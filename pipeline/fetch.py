"""The fetch stage: a backbone's frozen graph, downloaded once into a cache shared by every run.

Where the bytes come from, first hit wins:

1. the cache: ``graphs/<name>/<member>``, else an archive already in ``downloads/``;
2. the mirror (``mirror=`` or ``$EDGEPIPE_MIRROR``): a folder laid out ``<host>/<path>`` like
   ``../shared/mirror``, or a base URL serving that same layout;
3. the official URL from the catalog, unless ``offline=True``.

Offline mode skips only the official URL. A URL mirror is still used offline because the user
named it and it is normally on their own machine or LAN (``python -m http.server`` over a mirror
folder); pass ``mirror=""`` as well to use nothing but the cache.

Cache layout::

    <cache>/downloads/<sha256 or url-hash>/<file>  archives as downloaded, after their check
    <cache>/graphs/<name>/<member>                 the extracted graph, labels.txt beside it
    <cache>/graphs/<name>/fetch.json               where that graph came from, and its hashes
    <cache>/fetch.lock.json                        sha256 of first downloads of unpinned URLs
    <cache>/partial/                               resumable *.part files, staging, lock files

Every final name is filled by ``os.replace`` from ``partial/`` while holding an ``fcntl.flock``
per entry, so processes sharing a cache never see a torn file, and a failed fetch leaves the cache
as it was apart from a resumable ``.part`` file in ``partial/``.
"""
from __future__ import annotations

import contextlib
import datetime
import enum
import errno
import fcntl
import gzip
import hashlib
import json
import lzma
import os
import posixpath
import re
import shutil
import socket
import tarfile
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterator
from urllib.parse import unquote, urlsplit

import requests
import urllib3

from pipeline.console import log
from pipeline.console import progress as progress_bar
from pipeline.errors import ConfigError, FetchError, one_line
from pipeline.graph import graph_def_problem
from pipeline.rundir import atomic_write_json, sha256_file
from pipeline.types import BackboneSpec
from pipeline.version import __version__

MIRROR_ENV = "EDGEPIPE_MIRROR"
CACHE_ENV = "EDGEPIPE_CACHE_DIR"
LOCK_FILE = "fetch.lock.json"
RECORD_FILE = "fetch.json"

# Far above any backbone in the catalog; stops a hostile archive from filling the disk.
MAX_MEMBER_BYTES = 4 << 30
MAX_TOTAL_BYTES = 8 << 30

_CHUNK = 1 << 16
_MAX_BACKOFF_S = 30.0
_GRAPH_HINT = "or pass --graph FILE.pb"
# A cache on a full disk or owned by someone else is the user's to fix; other OSErrors are bugs.
_CACHE_WRITE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}


class Checksum(enum.StrEnum):
    """How the bytes behind a :class:`FetchResult` were checked.

    - ``pinned``: matched the ``sha256`` of the entry in ``models/backbones.toml``.
    - ``locked``: matched the hash recorded in ``<cache>/fetch.lock.json`` by an earlier download.
    - ``recorded``: first download of an unpinned URL; its hash is now in the lock file and every
      later download must match it (a note says so on stderr).
    - ``unchecked``: a user's own graph file with no hash to compare against.
    """

    PINNED = "pinned"
    LOCKED = "locked"
    RECORDED = "recorded"
    UNCHECKED = "unchecked"


@dataclass(frozen=True)
class FetchResult:
    """A checked frozen graph, ready for the later stages.

    Attributes:
        graph_path: the extracted ``.pb`` inside the cache, or the user's own ``.pb``.
        graph_sha256: sha256 of ``graph_path``.
        archive_sha256: sha256 of the downloaded file; None for a user's own graph.
        source: the mirror path or URL the bytes came from this time, or ``"cache"``/``"local"``.
        checksum: a :class:`Checksum` (a ``str``).
    """

    graph_path: Path
    graph_sha256: str
    archive_sha256: str | None
    source: str
    checksum: str


def default_cache_dir() -> Path:
    """The cache shared by all runs of this user.

    Returns:
        ``$EDGEPIPE_CACHE_DIR``, else ``$XDG_CACHE_HOME/edgepipe``, else ``~/.cache/edgepipe``.
    """
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    # The XDG spec says a relative XDG_CACHE_HOME is invalid and must be ignored.
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / "edgepipe"
    return Path.home() / ".cache" / "edgepipe"


def fetch(
    spec: BackboneSpec,
    *,
    cache_dir: Path | None = None,
    mirror: str | None = None,
    offline: bool = False,
    progress: bool = True,
    timeout_s: float = 30.0,
    retries: int = 3,
    backoff_s: float = 0.5,
) -> FetchResult:
    """Returns the backbone's frozen graph, downloading and checking it the first time.

    A spec with ``local_path`` (``--graph FILE.pb``) is only checked: it must exist and parse as a
    GraphDef. Otherwise the graph comes from the cache, the mirror or the official URL, in that
    order (see the module docstring), and the downloaded file must match the catalog's pinned
    sha256, or the hash the lock file recorded on its first download.

    Args:
        spec: the catalog entry, or a user's own graph from ``catalog.custom_backbone``.
        cache_dir: the cache folder; None means :func:`default_cache_dir`.
        mirror: a folder laid out ``<host>/<path>`` or a base URL serving that layout;
            None reads ``$EDGEPIPE_MIRROR``; ``""`` means no mirror.
        offline: never contact the official URL (the cache and the mirror are still used).
        progress: show a tqdm progress bar on stderr while downloading.
        timeout_s: seconds to wait for a connection, and for each block of data.
        retries: further attempts after a dropped connection, a timeout or an HTTP 5xx; each one
            resumes where the last stopped. An HTTP 4xx is final.
        backoff_s: pause before the first retry, doubled before each next one.

    Returns:
        The graph's path and hashes, where it came from and how it was checked.

    Raises:
        FetchError: nothing could deliver the file, or what arrived failed its checksum, is not
            a safe and readable archive holding ``spec.member``, or is not a GraphDef. The cache
            is left as it was, except for a resumable ``.part`` file under ``partial/``.
        ConfigError: ``timeout_s``, ``retries`` or ``backoff_s`` is out of range.
    """
    problems = []
    if not timeout_s > 0:
        problems.append(f"timeout must be positive (got {timeout_s})")
    if retries < 0:
        problems.append(f"retries must be 0 or more (got {retries})")
    if backoff_s < 0:
        problems.append(f"backoff must be 0 or more (got {backoff_s})")
    if problems:
        raise ConfigError("; ".join(problems))

    if spec.local_path:
        return _fetch_local(spec)
    if not spec.url:
        raise FetchError(
            f"backbone {spec.name} has no url and no local graph; "
            f"add url to its entry in models/backbones.toml, {_GRAPH_HINT}"
        )

    entry = _Entry(spec, Path(cache_dir) if cache_dir is not None else default_cache_dir())
    # Final names only ever change by os.replace, so a hit can be read without taking the lock;
    # that also keeps a read-only shared cache usable.
    hit = _cache_hit(entry, _expected(entry))
    if hit:
        return hit

    if mirror is None:
        mirror = os.environ.get(MIRROR_ENV, "")
        mirror_label = f"{MIRROR_ENV}={mirror}"
    else:
        mirror_label = f"mirror {mirror}"
    sources = _sources(entry, mirror, mirror_label, offline)
    net = _Net(timeout_s=timeout_s, retries=retries, backoff_s=backoff_s, progress=progress)

    try:
        with _flock(entry.partial / f"graph-{entry.safe_name}.flock"):
            # Another process may have finished this entry while we waited for the lock.
            expected = _expected(entry)
            hit = _cache_hit(entry, expected)
            if hit:
                return hit
            return _fetch_locked(entry, expected, sources, net, offline)
    except OSError as e:
        if e.errno not in _CACHE_WRITE_ERRNOS:
            raise
        raise FetchError(
            f"cannot write to the cache {entry.cache} ({e.strerror}: {e.filename}); "
            f"free some space, or set {CACHE_ENV} to a folder you can write"
        ) from None


@dataclass(frozen=True)
class FetchedBackbone:
    """The fetch stage's result: the checked graph and its spec resolved against it.

    Attributes:
        graph: what :func:`fetch` returned.
        spec: the spec with the tensors found in the graph and the feature size filled in.
        found_by: how the bottleneck was found: ``name``, ``alternate`` or ``shape``.
        fixes: what edgepipe rewrites in this graph (``pipeline.graphfix``).
    """

    graph: FetchResult
    requested: BackboneSpec
    spec: BackboneSpec
    found_by: str
    fixes: list

    def info(self) -> dict[str, Any]:
        """What the manifest records about the fetch."""
        return {"spec": self.spec.to_dict(), "source": self.graph.source, "checksum": self.graph.checksum,
                "archive_sha256": self.graph.archive_sha256,
                "bottleneck": {"requested": self.requested.bottleneck_tensor, "used": self.spec.bottleneck_tensor,
                               "found_by": self.found_by},
                "graph_fixes": [fix.to_dict() for fix in self.fixes]}


def fetch_backbone(spec: BackboneSpec, *, cache_dir: Path | None = None, mirror: str | None = None,
                   offline: bool = False, progress: bool = True) -> FetchedBackbone:
    """The fetch stage: :func:`fetch`, then the spec resolved against the graph (tensors checked,
    a renamed bottleneck found by its alternates or its shape) and the graph's rewrites listed.

    Raises:
        FetchError: see :func:`fetch`.
        GraphError: the graph lacks the spec's input or bottleneck tensor.
    """
    from pipeline.backbone import graph_fixes, resolve_spec
    from pipeline.graph import load_graph_def

    got = fetch(spec, cache_dir=cache_dir, mirror=mirror, offline=offline, progress=progress)
    resolved = resolve_spec(load_graph_def(got.graph_path), spec)
    used = resolved.bottleneck_tensor
    found_by = "name" if used == spec.bottleneck_tensor else "alternate" if used in spec.alternates else "shape"
    if found_by != "name":
        log.info(f"note: bottleneck {spec.bottleneck_tensor} not in the graph; using {used} (found by {found_by})")
    fixes = graph_fixes(got.graph_path, resolved)
    for fix in fixes:
        log.info(f"note: graph rewritten: {fix.note()}")
    return FetchedBackbone(got, spec, resolved, found_by, fixes)


def cache_status(spec: BackboneSpec, cache_dir: Path | None = None) -> dict[str, Any]:
    """What the cache holds for one backbone, without hashing or downloading anything.

    Args:
        spec: a catalog entry (for a user's own graph, the status of that file).
        cache_dir: the cache folder; None means :func:`default_cache_dir`.

    Returns:
        ``{"name", "url", "cached", "size_bytes", "sha256", "graph_path"}``: ``cached`` is True
        when an extracted graph for this exact url, member and pinned hash is present;
        ``size_bytes``, ``sha256`` (both of the graph file, the hash as recorded when it was
        extracted) and ``graph_path`` are None otherwise.
    """
    status: dict[str, Any] = {
        "name": spec.name,
        "url": spec.url,
        "cached": False,
        "size_bytes": None,
        "sha256": None,
        "graph_path": None,
    }
    if spec.local_path:
        path = Path(spec.local_path).expanduser()
        if path.is_file():
            status.update(cached=True, size_bytes=path.stat().st_size, graph_path=str(path))
        return status
    if not spec.url:
        return status
    entry = _Entry(spec, Path(cache_dir) if cache_dir is not None else default_cache_dir())
    record = _read_record(entry)
    if record is None or not entry.graph_path.is_file():
        return status
    if spec.sha256 and record.get("archive_sha256") != spec.sha256.lower():
        return status
    status.update(
        cached=True,
        size_bytes=entry.graph_path.stat().st_size,
        sha256=record.get("graph_sha256"),
        graph_path=str(entry.graph_path),
    )
    return status


def mirror_relpath(url: str) -> str:
    """Where ``url`` lives inside a mirror: ``<host>/<path>``.

    Args:
        url: an official download URL.

    Returns:
        e.g. ``download.tensorflow.org/models/x.tgz`` for
        ``http://download.tensorflow.org/models/x.tgz``.
    """
    parts = urlsplit(url)
    return f"{parts.hostname or ''}/{parts.path.lstrip('/')}"


# --- the cache entry and what its bytes must hash to ------------------------------------------


@dataclass(frozen=True)
class _Entry:
    """The paths one catalog entry uses inside the cache."""

    spec: BackboneSpec
    cache: Path

    def __post_init__(self) -> None:
        member = self.spec.member
        if member is not None and _unsafe_name(member):
            raise FetchError(
                f"member {member!r} of {self.spec.name} is not a relative path inside the "
                f"archive; fix it in models/backbones.toml"
            )

    @property
    def url(self) -> str:
        return str(self.spec.url)

    @property
    def filename(self) -> str:
        return posixpath.basename(unquote(urlsplit(self.url).path)) or "download"

    @property
    def member(self) -> str:
        """The graph's path inside the archive, or the file name of a bare ``.pb`` download."""
        if self.spec.member is None:
            return self.filename
        return _strip_dot(self.spec.member)

    @property
    def safe_name(self) -> str:
        return re.sub(r"[^A-Za-z0-9._-]", "_", self.spec.name)

    @property
    def archive_path(self) -> Path:
        key = self.spec.sha256.lower() if self.spec.sha256 else f"url-{_short_hash(self.url)}"
        return self.cache / "downloads" / key / self.filename

    @property
    def graph_dir(self) -> Path:
        return self.cache / "graphs" / self.safe_name

    @property
    def graph_path(self) -> Path:
        return self.graph_dir / self.member

    @property
    def partial(self) -> Path:
        return self.cache / "partial"

    @property
    def lock_path(self) -> Path:
        return self.cache / LOCK_FILE


@dataclass(frozen=True)
class _Expected:
    sha256: str | None  # None: first download, nothing to compare with yet
    kind: Checksum
    where: str  # for messages: where the expected hash comes from


def _expected(entry: _Entry) -> _Expected:
    if entry.spec.sha256:
        pinned = entry.spec.sha256.lower()
        return _Expected(pinned, Checksum.PINNED, "pinned in models/backbones.toml")
    recorded = _read_lock(entry.lock_path)["entries"].get(entry.url)
    if recorded:
        where = f"recorded in {entry.lock_path} on first download"
        return _Expected(recorded["sha256"], Checksum.LOCKED, where)
    return _Expected(None, Checksum.RECORDED, "")


def _read_lock(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {"version": 1, "entries": {}}
    except (ValueError, OSError) as e:
        raise FetchError(
            f"cannot read {path} ({one_line(e)}); fix it, or delete it to record hashes again"
        ) from None
    entries = data.get("entries") if isinstance(data, dict) else None
    if not isinstance(entries, dict) or not all(
        isinstance(v, dict) and isinstance(v.get("sha256"), str) for v in entries.values()
    ):
        raise FetchError(
            f"{path} is not a fetch lock file; fix it, or delete it to record hashes again"
        )
    return data


def _record_hash(entry: _Entry, sha256: str, size: int, source: str) -> None:
    with _flock(entry.partial / f"{LOCK_FILE}.flock"):
        lock = _read_lock(entry.lock_path)
        known = lock["entries"].get(entry.url)
        if known and known["sha256"] != sha256:
            # Another process recorded different bytes for this URL while we downloaded.
            raise _BadContent(
                f"sha256 mismatch for {entry.spec.name} from {source}: expected {known['sha256']} "
                f"(recorded in {entry.lock_path} meanwhile), got {sha256}",
                _lock_hint(entry),
            )
        lock["entries"][entry.url] = {
            "name": entry.spec.name,
            "sha256": sha256,
            "size_bytes": size,
            "recorded": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        atomic_write_json(entry.lock_path, lock)
    log.info(
        f"note: {entry.url} has no pinned sha256; recorded {sha256} in {entry.lock_path}, and "
        f"later downloads must match it (pin it as sha256 in models/backbones.toml)"
    )


def _lock_hint(entry: _Entry) -> str:
    return (
        f"if the file changed upstream on purpose, delete the entry for {entry.url} "
        f"from {entry.lock_path} and fetch again"
    )


def _read_record(entry: _Entry) -> dict[str, Any] | None:
    """The graph folder's ``fetch.json``, if it describes this spec's url and member."""
    try:
        record = json.loads((entry.graph_dir / RECORD_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    if record.get("url") != entry.url or record.get("member") != entry.member:
        return None
    return record


def _cache_hit(entry: _Entry, expected: _Expected) -> FetchResult | None:
    record = _read_record(entry)
    if record is None or expected.sha256 is None or record.get("archive_sha256") != expected.sha256:
        return None
    try:
        graph_sha = sha256_file(entry.graph_path)
    except FileNotFoundError:
        return None
    # Re-hashing costs well under a second even for Inception, and catches a graph edited in place.
    if graph_sha != record.get("graph_sha256"):
        return None
    return FetchResult(entry.graph_path, graph_sha, expected.sha256, "cache", expected.kind)


# --- sources ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    label: str  # how messages name it: the URL, or "EDGEPIPE_MIRROR=<value>"
    location: str  # the file path or URL read
    is_url: bool
    is_mirror: bool


@dataclass(frozen=True)
class _Net:
    timeout_s: float
    retries: int
    backoff_s: float
    progress: bool


class _Unavailable(Exception):
    """A source could not deliver the file; ``str()`` says why, for the final message."""


class _Retry(Exception):
    """A download failure worth another attempt (connection trouble, timeout, HTTP 5xx)."""


class _BadContent(Exception):
    """Bytes arrived but are not the graph the spec promises."""

    def __init__(self, what: str, hint: str):
        super().__init__(f"{what}; {hint}")
        self.what = what
        self.hint = hint


def _sources(entry: _Entry, mirror: str, mirror_label: str, offline: bool) -> list[_Source]:
    rel = mirror_relpath(entry.url)
    sources = []
    if mirror:
        if re.match(r"https?://", mirror, re.IGNORECASE):
            sources.append(_Source(mirror_label, f"{mirror.rstrip('/')}/{rel}", True, True))
        else:
            path = Path(mirror).expanduser() / unquote(rel)
            sources.append(_Source(mirror_label, str(path), False, True))
    if not offline:
        sources.append(_Source(entry.url, entry.url, True, False))
    return sources


def _obtain(src: _Source, entry: _Entry, net: _Net) -> tuple[Path, bool]:
    """Puts the source's bytes in a ``.part`` file under ``partial/``.

    Returns:
        The ``.part`` path, and whether the download resumed one left by an earlier attempt.

    Raises:
        _Unavailable: the source does not have the file or cannot be reached.
    """
    entry.partial.mkdir(parents=True, exist_ok=True)
    # One .part per source location: resuming bytes from a different server would be a gamble.
    part = entry.partial / f"{_short_hash(src.location)}-{entry.filename}.part"
    with _flock(part.with_suffix(".flock")):
        if src.is_url:
            return part, _download(src.location, part, net, entry.filename)
        path = Path(src.location)
        if not path.is_file():
            raise _Unavailable(f"not found at {path}")
        try:
            _copy_file(path, part, entry.filename, net.progress)
        except OSError as e:
            part.unlink(missing_ok=True)
            raise _Unavailable(f"cannot read {path}: {e.strerror or e}") from None
        return part, False


def _copy_file(src: Path, dst: Path, desc: str, progress: bool) -> None:
    bar = _bar(src.stat().st_size, 0, desc, progress)
    with open(src, "rb") as fin, open(dst, "wb") as fout, bar:
        while block := fin.read(1 << 20):
            fout.write(block)
            bar.update(len(block))


def _bar(total: int | None, initial: int, desc: str, enabled: bool):
    return progress_bar(
        total=total,
        initial=initial,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=not enabled,
    )


def _download(url: str, part: Path, net: _Net, desc: str) -> bool:
    """Downloads ``url`` into ``part``, resuming what is there; returns whether it resumed."""
    resumed = False
    attempt = 0
    while True:
        try:
            resumed |= _download_once(url, part, net, desc)
            return resumed
        except _Retry as e:
            if attempt >= net.retries:
                # Keep what arrived: the next fetch resumes it with a Range request.
                if part.exists() and part.stat().st_size == 0:
                    part.unlink()
                tries = f", {attempt + 1} attempts" if attempt else ""
                raise _Unavailable(f"{e}{tries}") from None
            time.sleep(min(net.backoff_s * 2**attempt, _MAX_BACKOFF_S))
            attempt += 1


def _download_once(url: str, part: Path, net: _Net, desc: str) -> bool:
    offset = part.stat().st_size if part.exists() else 0
    # identity: Range offsets must count the bytes we store, not a compressed transfer encoding.
    headers = {"Accept-Encoding": "identity", "User-Agent": f"edgepipe/{__version__}"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        resp = requests.get(url, headers=headers, stream=True, timeout=net.timeout_s)
    except requests.RequestException as e:
        raise _request_failure(e, url, net) from None
    with resp:
        status = resp.status_code
        if offset and status == 416:
            # The .part is as long as the file or longer (the file changed): start from zero.
            part.unlink()
            return _download_once(url, part, net, desc)
        if offset and status == 206:
            start, total = _content_range(resp.headers.get("Content-Range"))
            if start != offset:
                part.unlink()
                raise _Retry(f"server resumed at byte {start} instead of {offset}")
            if total is None:
                total = _int_or_none(resp.headers.get("Content-Length"))
                total = None if total is None else offset + total
            mode, resumed = "ab", True
        elif status == 200:
            # Also the answer of a server that ignores Range: the body is the whole file.
            offset, mode, resumed = 0, "wb", False
            total = _int_or_none(resp.headers.get("Content-Length"))
        elif status in (408, 429) or status >= 500:
            raise _Retry(f"HTTP {status}")
        else:
            # E.g. a 404: bytes kept from an earlier attempt belong to nothing that exists now.
            part.unlink(missing_ok=True)
            raise _Unavailable(f"HTTP {status}")
        received = offset
        blocks = _body_blocks(resp)
        with open(part, mode) as f, _bar(total, offset, desc, net.progress) as bar:
            while True:
                try:
                    block = next(blocks, b"")
                except (requests.RequestException, urllib3.exceptions.HTTPError) as e:
                    got = f"{received:,}" + ("" if total is None else f" of {total:,}") + " bytes"
                    if _timed_out(e):
                        raise _Retry(f"no data for {net.timeout_s:g} s after {got}") from None
                    raise _Retry(f"connection dropped after {got}") from None
                if not block:
                    break
                f.write(block)
                received += len(block)
                bar.update(len(block))
    if total is not None and received != total:
        raise _Retry(f"connection dropped after {received:,} of {total:,} bytes")
    return resumed


def _body_blocks(resp: requests.Response) -> Iterator[bytes]:
    raw = resp.raw
    if not hasattr(raw, "read1"):  # urllib3 < 2.3
        yield from resp.iter_content(_CHUNK)
        return
    # read1 hands over whatever has arrived. read(n), under iter_content, discards a partly
    # filled block when the connection drops, and those bytes would be missing from the .part.
    while block := raw.read1(_CHUNK, decode_content=True):
        yield block


# A bad URL or a TLS failure will not get better by asking again.
_FINAL_REQUEST_ERRORS = (
    requests.exceptions.InvalidURL,
    requests.exceptions.MissingSchema,
    requests.exceptions.InvalidSchema,
    requests.exceptions.SSLError,
)


def _request_failure(e: requests.RequestException, url: str, net: _Net) -> Exception:
    """Turns a failure to get response headers into a short reason, retryable or not."""
    causes = list(_causes(e))
    if any(isinstance(c, socket.gaierror) for c in causes):
        # Not retried: without DNS (no network, or a sandbox) waiting will not help.
        return _Unavailable(f"cannot resolve {urlsplit(url).hostname}: no network or DNS?")
    if any(isinstance(c, ConnectionRefusedError) for c in causes):
        return _Retry("connection refused")
    if isinstance(e, requests.ConnectTimeout):
        return _Retry(f"no connection within {net.timeout_s:g} s")
    if isinstance(e, requests.Timeout) or _timed_out(e):
        return _Retry(f"no response within {net.timeout_s:g} s")
    if isinstance(e, _FINAL_REQUEST_ERRORS):
        return _Unavailable(one_line(e))
    return _Retry(f"connection failed: {one_line(e)}")


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """The exception and all it wraps (urllib3 nests the socket error several levels deep)."""
    seen: set[int] = set()
    stack: list[Any] = [exc]
    while stack:
        e = stack.pop()
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        stack += [e.__cause__, e.__context__, getattr(e, "reason", None), *e.args]


def _timed_out(e: BaseException) -> bool:
    return any(
        isinstance(c, (TimeoutError, requests.Timeout)) or type(c).__name__ == "ReadTimeoutError"
        for c in _causes(e)
    )


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    match = re.fullmatch(r"\s*bytes\s+(\d+)-\d+/(\d+|\*)\s*", value or "")
    if not match:
        return None, None
    return int(match.group(1)), None if match.group(2) == "*" else int(match.group(2))


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


# --- from downloaded bytes to the cached graph -----------------------------------------------


def _fetch_locked(
    entry: _Entry, expected: _Expected, sources: list[_Source], net: _Net, offline: bool
) -> FetchResult:
    entry.partial.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=entry.partial, prefix="stage-"))
    try:
        if entry.archive_path.is_file():
            with contextlib.suppress(_BadContent):
                # A damaged cached archive is just a miss; a good download replaces it.
                return _install(entry, expected, entry.archive_path, "cache", stage)
        unavailable: list[tuple[_Source, str]] = []
        bad: list[tuple[_Source, _BadContent]] = []
        for src in sources:
            try:
                result = _from_source(src, entry, expected, stage, net)
            except _Unavailable as e:
                unavailable.append((src, str(e)))
                continue
            except _BadContent as e:
                bad.append((src, e))
                if src is not sources[-1]:
                    # Said now, because a good download from the next source would hide it.
                    log.warning(f"warning: {src.label}: {e.what}; trying the next source")
                continue
            return result
        # Member names and server text end up in the message; the CLI prints exactly one line.
        message = _failure_message(entry, sources, unavailable, bad, offline)
        raise FetchError(re.sub(r"\s*[\r\n]+\s*", " ", message))
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _from_source(
    src: _Source, entry: _Entry, expected: _Expected, stage: Path, net: _Net
) -> FetchResult:
    part, resumed = _obtain(src, entry, net)
    try:
        return _install(entry, expected, part, src.location, stage)
    except _BadContent:
        part.unlink(missing_ok=True)
        if not resumed:
            raise
    # A .part left by an interrupted run may hold bytes of an older file: a clean download decides.
    part, _ = _obtain(src, entry, net)
    try:
        return _install(entry, expected, part, src.location, stage)
    except _BadContent:
        part.unlink(missing_ok=True)
        raise


def _install(
    entry: _Entry, expected: _Expected, archive: Path, source: str, stage: Path
) -> FetchResult:
    """Checks ``archive``, extracts the graph into ``stage`` and moves both to their final names.

    Raises:
        _BadContent: checksum, archive or GraphDef check failed; nothing in the cache changed.
    """
    spec = entry.spec
    from_cache = archive == entry.archive_path
    label = str(archive) if from_cache else source
    archive_sha = sha256_file(archive)
    if expected.sha256 and archive_sha != expected.sha256:
        hint = (
            _lock_hint(entry)
            if expected.kind is Checksum.LOCKED
            else "the file is damaged or not the published one: replace it where it came from, "
            "or fix sha256 in models/backbones.toml if upstream really changed it"
        )
        raise _BadContent(
            f"sha256 mismatch for {spec.name} from {label}: expected {expected.sha256} "
            f"({expected.where}), got {archive_sha}",
            hint,
        )

    new_dir = stage / "graph"
    shutil.rmtree(new_dir, ignore_errors=True)
    new_dir.mkdir()
    if spec.member is None:
        shutil.copyfile(archive, new_dir / entry.member)
    else:
        _extract(archive, entry.member, new_dir, label, spec.name)
    graph = new_dir / entry.member
    problem = graph_def_problem(graph)
    if problem:
        raise _BadContent(
            f"{entry.member} from {label} {problem}",
            f"fix url or member of {spec.name} in models/backbones.toml, {_GRAPH_HINT}",
        )
    graph_sha = sha256_file(graph)
    atomic_write_json(
        new_dir / RECORD_FILE,
        {
            "name": spec.name,
            "url": entry.url,
            "member": entry.member,
            "source": source,
            "archive_sha256": archive_sha,
            "graph_sha256": graph_sha,
            "checksum": expected.kind.value,
        },
    )

    # Every check has passed: from here on only renames, each atomic.
    if expected.kind is Checksum.RECORDED:
        _record_hash(entry, archive_sha, archive.stat().st_size, label)
    if not from_cache:
        entry.archive_path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(archive, entry.archive_path)
    entry.graph_dir.parent.mkdir(parents=True, exist_ok=True)
    if entry.graph_dir.exists():
        # A stale folder (other hash or member): a directory cannot be replaced in one rename.
        os.replace(entry.graph_dir, stage / "old")
    os.replace(new_dir, entry.graph_dir)
    return FetchResult(
        entry.graph_path, graph_sha, archive_sha, "cache" if from_cache else source, expected.kind
    )


def extract_member(archive: Path, member: str, dest: Path, *, backbone: str = "the backbone") -> Path:
    """Extracts one graph from a tarball the way :func:`fetch` does, refusing unsafe archives.

    ``labels.txt`` beside ``member`` comes along when the archive has it. Nothing is written
    outside ``dest``, and no link member becomes a link on disk.

    Args:
        archive: a tar, tar.gz, tar.bz2 or tar.xz file.
        member: the path of the graph inside the archive.
        dest: an existing folder to extract into.
        backbone: the catalog name the error messages' hints refer to.

    Returns:
        ``dest / member``.

    Raises:
        FetchError: the archive is unreadable or unsafe, or has no file ``member``.
    """
    try:
        _extract(Path(archive), member, Path(dest), str(archive), backbone)
    except _BadContent as e:
        raise FetchError(str(e)) from None
    return Path(dest) / member


def _extract(archive: Path, member: str, dest: Path, label: str, name: str) -> None:
    """Writes ``member`` (and ``labels.txt`` beside it, if present) from a tarball under ``dest``.

    Members are streamed through ``extractfile`` to paths we build ourselves, never
    ``TarFile.extract``, and the whole archive is refused if any header is unsafe.
    """
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = _checked_members(tar, label)
            by_name = {_strip_dot(m.name): m for m in members}
            wanted = [member]
            labels = posixpath.join(posixpath.dirname(member), "labels.txt")
            if labels in by_name and by_name[labels].isfile():
                wanted.append(labels)
            for want in wanted:
                info = _follow_links(by_name.get(want), by_name, label, name)
                src = tar.extractfile(info) if info is not None else None
                if src is None:
                    raise _BadContent(
                        f"{label} has no file {member!r} (it has: {_list_names(members)})",
                        f"fix member of {name} in models/backbones.toml, {_GRAPH_HINT}",
                    )
                out = dest / want
                out.parent.mkdir(parents=True, exist_ok=True)
                with src, open(out, "wb") as f:
                    shutil.copyfileobj(src, f, _CHUNK)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, lzma.LZMAError) as e:
        if isinstance(e, EOFError):
            why = "it is truncated"
        elif isinstance(e, tarfile.ReadError) and "could not be opened" in str(e):
            why = "not a tar, tar.gz, tar.bz2 or tar.xz file"
        else:
            why = one_line(e)
        raise _BadContent(
            f"{label} is not a readable archive ({why})",
            f"the download is damaged: delete it and fetch again, {_GRAPH_HINT}",
        ) from None


def _follow_links(
    info: tarfile.TarInfo | None, by_name: dict[str, tarfile.TarInfo], label: str, name: str
) -> tarfile.TarInfo | None:
    """The member a (chain of) link member(s) points to, resolved here rather than by tarfile.

    ``TarFile.extractfile`` follows links itself, with a KeyError for a missing target and
    unbounded recursion for a cycle; an archive should not be able to crash us either way.
    """
    seen: set[str] = set()
    while info is not None and (info.issym() or info.islnk()):
        if info.name in seen:
            raise _BadContent(f"{label}: member {info.name!r} is part of a link loop",
                              f"the archive is damaged; get the file from its official source, {_GRAPH_HINT}")
        seen.add(info.name)
        base = posixpath.dirname(info.name) if info.issym() else ""
        target = _strip_dot(posixpath.normpath(posixpath.join(base, info.linkname)))
        if target not in by_name:
            raise _BadContent(f"{label}: member {info.name!r} is a link to {info.linkname!r}, which the archive does not have",
                              f"fix member of {name} in models/backbones.toml, {_GRAPH_HINT}")
        info = by_name[target]
    return info


def _checked_members(tar: tarfile.TarFile, label: str) -> list[tarfile.TarInfo]:
    members = []
    total = 0
    # Iterating (not getmembers) checks each header before tarfile seeks past its claimed size.
    for info in tar:
        why = _unsafe_member(info)
        total += info.size if info.isfile() else 0
        if why is None and total > MAX_TOTAL_BYTES:
            why = f"brings the total to {total:,} bytes (limit {MAX_TOTAL_BYTES:,})"
        if why:
            raise _BadContent(
                f"refusing to extract {label}: member {info.name!r} {why}",
                f"the archive is unsafe; get the file from its official source, {_GRAPH_HINT}",
            )
        members.append(info)
    return members


def _unsafe_member(info: tarfile.TarInfo) -> str | None:
    name = info.name
    if _is_absolute(name):
        return "has an absolute path"
    if ".." in PurePosixPath(name).parts:
        return "climbs out of the archive with '..'"
    if info.issym():
        target = posixpath.normpath(posixpath.join(posixpath.dirname(name), info.linkname))
        if _is_absolute(info.linkname) or target == ".." or target.startswith("../"):
            return f"is a symlink to {info.linkname!r}, outside the archive"
    elif info.islnk():
        if _unsafe_name(info.linkname):
            return f"is a hard link to {info.linkname!r}, outside the archive"
    elif info.ischr() or info.isblk():
        return "is a device file"
    elif info.isfifo():
        return "is a FIFO"
    elif not (info.isfile() or info.isdir()):
        return f"has an unsupported type {info.type!r}"
    if info.size > MAX_MEMBER_BYTES:
        return f"claims {info.size:,} bytes (limit {MAX_MEMBER_BYTES:,})"
    return None


def _fetch_local(spec: BackboneSpec) -> FetchResult:
    path = Path(str(spec.local_path)).expanduser()
    if not path.exists():
        raise FetchError(f"graph file {path} does not exist; check the path given to --graph")
    if not path.is_file():
        raise FetchError(f"{path} is not a file; pass --graph the frozen .pb file itself")
    problem = graph_def_problem(path)
    if problem:
        raise FetchError(f"{path} {problem}; pass --graph a frozen graph (.pb) of a GraphDef")
    sha = sha256_file(path)
    if spec.sha256 and sha != spec.sha256.lower():
        raise FetchError(
            f"sha256 mismatch for {path}: expected {spec.sha256.lower()}, got {sha}; "
            f"check that --graph names the file you meant"
        )
    checksum = Checksum.PINNED if spec.sha256 else Checksum.UNCHECKED
    return FetchResult(path, sha, None, "local", checksum)


def _failure_message(
    entry: _Entry,
    sources: list[_Source],
    unavailable: list[tuple[_Source, str]],
    bad: list[tuple[_Source, _BadContent]],
    offline: bool,
) -> str:
    if bad:
        # Bytes that arrived and failed a check say more than a 404 from the next source.
        src, err = bad[0]
        others = [f"{s.label}: {why}" for s, why in unavailable]
        others += [f"{s.label}: {e.what}" for s, e in bad[1:]]
        also = f" (also tried {'; '.join(others)})" if others else ""
        return f"{err.what}{also}; {err.hint}"
    reasons = {s.label: why for s, why in unavailable}
    mirror = next((s for s in sources if s.is_mirror), None)
    if offline:
        head = (
            f"{entry.spec.name} is not in the cache {entry.cache} "
            f"and offline mode does not try {entry.url}"
        )
    else:
        head = f"could not download {entry.url} ({reasons.get(entry.url, 'not tried')})"
    if mirror:
        tail = f"no mirror has it ({mirror.label}: {reasons.get(mirror.label, 'not tried')})"
    else:
        tail = f"no mirror is set ({MIRROR_ENV} is empty)"
    return (
        f"{head}, and {tail}; download it by hand and set {MIRROR_ENV} to a folder laid out "
        f"<host>/<path> (this file goes at <folder>/{mirror_relpath(entry.url)}), {_GRAPH_HINT}"
    )


# --- small helpers ---------------------------------------------------------------------------


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    """Holds an exclusive ``flock`` on ``path``; the file is removed again on release.

    The file is unlinked while still locked. A waiter that then gets the lock holds it on an
    unlinked inode, sees that ``path`` no longer names that inode, and starts over; without that
    check two processes could each lock a different file of the same name.
    """
    while True:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _strip_dot(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name


def _is_absolute(name: str) -> bool:
    return name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name) is not None


def _unsafe_name(name: str) -> bool:
    return _is_absolute(name) or ".." in PurePosixPath(name).parts


def _list_names(members: list[tarfile.TarInfo], limit: int = 10) -> str:
    files = [_strip_dot(m.name) for m in members if not m.isdir()]
    # Graph files first: they are what someone fixing the catalog's member is looking for.
    files.sort(key=lambda n: (not n.endswith(".pb"), n))
    if not files:
        return "no files"
    more = f" and {len(files) - limit} more" if len(files) > limit else ""
    return ", ".join(files[:limit]) + more

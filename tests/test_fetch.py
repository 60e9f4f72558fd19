"""The fetch stage against the real mirror in ../shared, and against a local server that misbehaves.

Nothing here touches the network: "official URLs" point at a server on 127.0.0.1, and the one test
that keeps the real catalog URL routes it through that server as an HTTP proxy.
"""
from __future__ import annotations

import dataclasses
import errno
import gzip
import hashlib
import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from pipeline import fetch as fetch_mod
from pipeline.catalog import custom_backbone, get_backbone
from pipeline.errors import ConfigError, FetchError
from pipeline.fetch import FetchResult, cache_status, default_cache_dir, fetch
from pipeline.types import BackboneSpec, Preprocessing
from tests.helpers.lookalikes import make_tgz
from tests.helpers.servers import FakeServer, Route, fetch_in_process

REPO = Path(__file__).resolve().parent.parent
MIRROR = REPO.parent / "shared" / "mirror"
REL_224 = "download.tensorflow.org/models/mobilenet_v1_0.25_224_frozen.tgz"
REL_128 = "download.tensorflow.org/models/mobilenet_v1_0.25_128_frozen.tgz"
MEMBER = "tiny/frozen_graph.pb"
FAST = {"retries": 1, "backoff_s": 0.01, "timeout_s": 5.0, "progress": False}


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _hermetic_env(monkeypatch):
    """No mirror, cache or proxy from the developer's shell leaks into a test."""
    for var in ("EDGEPIPE_MIRROR", "EDGEPIPE_CACHE_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    for var in ("http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
        monkeypatch.delenv(var.upper(), raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@pytest.fixture(scope="session")
def mirror_dir() -> Path:
    if not (MIRROR / REL_224).is_file():
        pytest.skip(f"{MIRROR} is missing (see ../shared/README.md)")
    return MIRROR


@pytest.fixture(scope="session")
def graph_bytes() -> bytes:
    """A serialized two-node GraphDef: placeholder ``input`` and identity ``output``."""
    import tensorflow as tf

    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 4], name="input")
        tf.identity(x, name="output")
    return graph.as_graph_def().SerializeToString()


@pytest.fixture(scope="session")
def tiny_tgz(graph_bytes) -> bytes:
    # Random filler makes the archive ~100 KB, so a half-served download spans many blocks.
    return make_tgz(
        [
            (MEMBER, graph_bytes),
            ("tiny/labels.txt", b"background\ndaisy\n"),
            ("tiny/README.md", os.urandom(100_000)),
        ]
    )


@pytest.fixture
def server():
    srv = FakeServer()
    yield srv
    srv.close()


@pytest.fixture
def mirror_server(mirror_dir):
    """Serves ../shared/mirror over HTTP, so it works as a URL mirror and as a proxy."""
    srv = FakeServer(root=mirror_dir)
    yield srv
    srv.close()


@pytest.fixture
def cache(tmp_path) -> Path:
    path = tmp_path / "cache"
    path.mkdir()
    return path


@pytest.fixture
def warm_cache(cache, server, graph_bytes) -> Path:
    """A cache holding one unpinned entry: 'unchanged' then covers graphs, downloads and lock."""
    url = server.add("/other/other.pb", Route(body=graph_bytes))
    fetch(tiny_spec(url, member=None, name="other"), cache_dir=cache, **FAST)
    server.seen.clear()
    return cache


# --- helpers ----------------------------------------------------------------------------------


def tiny_spec(url: str, *, member: str | None = MEMBER, sha256: str | None = None,
              name: str = "tiny") -> BackboneSpec:
    return BackboneSpec(
        name=name,
        input_tensor="input:0",
        bottleneck_tensor="output:0",
        feature_size=4,
        preprocessing=Preprocessing(size=8),
        url=url,
        sha256=sha256,
        member=member,
    )


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def snapshot(cache: Path) -> dict[str, str]:
    """Every path in the cache outside ``partial/``, with the hash of each file's content."""
    return {
        str(p.relative_to(cache)): "dir" if p.is_dir() else sha(p.read_bytes())
        for p in sorted(cache.rglob("*"))
        if p.relative_to(cache).parts[0] != "partial"
    }


def assert_untouched(cache: Path, before: dict[str, str]) -> None:
    assert snapshot(cache) == before
    # partial/ may keep a resumable download, and nothing else (no lock files, no staging).
    leftovers = list((cache / "partial").rglob("*")) if (cache / "partial").exists() else []
    assert all(p.is_file() and p.name.endswith(".part") for p in leftovers), leftovers


def part_files(cache: Path) -> list[Path]:
    return sorted((cache / "partial").glob("*.part"))


def fail(spec: BackboneSpec, cache: Path, **kwargs) -> str:
    """Runs a fetch that must fail; returns the message after checking it is one line."""
    with pytest.raises(FetchError) as info:
        fetch(spec, cache_dir=cache, **{**FAST, **kwargs})
    message = str(info.value)
    assert "\n" not in message and info.value.exit_code == 2
    return message


def hint(rel: str) -> str:
    return (
        "download it by hand and set EDGEPIPE_MIRROR to a folder laid out <host>/<path> "
        f"(this file goes at <folder>/{rel}), or pass --graph FILE.pb"
    )


# --- the real backbone through every kind of source --------------------------------------------


@pytest.mark.parametrize("via", ["argument", "environment"])
def test_directory_mirror_gives_the_pinned_graph(via, mirror_dir, cache, monkeypatch, capsys):
    spec = get_backbone("mobilenet_v1_0.25_224")
    if via == "environment":
        monkeypatch.setenv("EDGEPIPE_MIRROR", str(mirror_dir))
        result = fetch(spec, cache_dir=cache, progress=False)
    else:
        result = fetch(spec, cache_dir=cache, mirror=str(mirror_dir), progress=False)

    mirror_file = mirror_dir / REL_224
    assert result.source == str(mirror_file)
    assert (result.checksum, result.archive_sha256) == ("pinned", spec.sha256)
    assert result.graph_path == cache / "graphs" / spec.name / spec.member
    assert result.graph_sha256 == sha(result.graph_path.read_bytes())
    labels = (result.graph_path.parent / "labels.txt").read_text().splitlines()
    assert len(labels) == 1001 and labels[0] == "0:background"  # "<index>:<name>" lines
    cached_archive = cache / "downloads" / spec.sha256 / mirror_file.name
    assert cached_archive.read_bytes() == mirror_file.read_bytes()
    # Only what is needed is extracted: not quantized_graph.pb.
    assert sorted(p.name for p in result.graph_path.parent.iterdir()) == ["frozen_graph.pb", "labels.txt"]
    assert list((cache / "partial").iterdir()) == []
    assert capsys.readouterr().err == ""

    monkeypatch.delenv("EDGEPIPE_MIRROR", raising=False)
    again = fetch(spec, cache_dir=cache, mirror="", offline=True)
    assert (again.source, again.checksum) == ("cache", "pinned")
    assert again.graph_sha256 == result.graph_sha256
    status = cache_status(spec, cache)
    assert status["cached"] and status["sha256"] == result.graph_sha256
    assert status["size_bytes"] == result.graph_path.stat().st_size


def test_url_mirror_serves_the_shared_folder(mirror_server, cache):
    spec = get_backbone("mobilenet_v1_0.25_128")
    mirror = mirror_server.base_url + "/"
    result = fetch(spec, cache_dir=cache, mirror=mirror, offline=True, progress=False)
    assert result.source == f"{mirror_server.base_url}/{REL_128}"
    assert (result.checksum, result.archive_sha256) == ("pinned", spec.sha256)
    assert [s.path for s in mirror_server.seen] == [f"/{REL_128}"]


def test_official_url_shows_a_progress_bar(mirror_server, cache, capsys):
    url = f"{mirror_server.base_url}/{REL_128}"
    spec = dataclasses.replace(get_backbone("mobilenet_v1_0.25_128"), url=url)
    result = fetch(spec, cache_dir=cache, mirror="", progress=True)
    assert (result.source, result.checksum) == (url, "pinned")
    err = capsys.readouterr().err
    assert "mobilenet_v1_0.25_128_frozen.tgz" in err and "100%" in err


def test_proxy_variables_are_honoured(mirror_server, cache, monkeypatch):
    # The real catalog URL: only the "proxy" on 127.0.0.1 can answer it.
    spec = get_backbone("mobilenet_v1_0.25_128")
    monkeypatch.setenv("HTTP_PROXY", mirror_server.base_url)
    monkeypatch.setenv("http_proxy", mirror_server.base_url)
    result = fetch(spec, cache_dir=cache, mirror="", progress=False)
    assert (result.source, result.checksum) == (spec.url, "pinned")
    assert [s.path for s in mirror_server.seen] == [spec.url]


def test_bad_mirror_copy_falls_back_to_the_next_source(mirror_server, cache, tmp_path, capsys):
    url = f"{mirror_server.base_url}/{REL_128}"
    spec = dataclasses.replace(get_backbone("mobilenet_v1_0.25_128"), url=url)
    broken = tmp_path / "mirror" / "127.0.0.1" / REL_128
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"not the archive")
    result = fetch(spec, cache_dir=cache, mirror=str(tmp_path / "mirror"), progress=False)
    assert (result.source, result.checksum) == (url, "pinned")
    warning = f"warning: mirror {tmp_path / 'mirror'}: sha256 mismatch for {spec.name} from {broken}"
    assert warning in capsys.readouterr().err


# --- cache, lock file, local graphs -----------------------------------------------------------


def test_first_download_records_the_hash_and_later_ones_must_match(server, cache, tiny_tgz,
                                                                    graph_bytes, capsys):
    url = server.add("/models/tiny.tgz", Route(body=tiny_tgz))
    spec = tiny_spec(url)
    lock_path = cache / "fetch.lock.json"
    first = fetch(spec, cache_dir=cache, **FAST)
    assert (first.source, first.checksum, first.archive_sha256) == (url, "recorded", sha(tiny_tgz))
    assert first.graph_path.read_bytes() == graph_bytes
    assert json.loads(lock_path.read_text())["entries"][url]["sha256"] == sha(tiny_tgz)
    note = capsys.readouterr().err
    assert note.startswith(f"note: {url} has no pinned sha256; recorded {sha(tiny_tgz)} in {lock_path}")

    assert fetch(spec, cache_dir=cache, **FAST).source == "cache"
    shutil.rmtree(cache / "graphs")
    shutil.rmtree(cache / "downloads")
    second = fetch(spec, cache_dir=cache, **FAST)
    assert (second.source, second.checksum) == (url, "locked")
    assert capsys.readouterr().err == ""

    # Upstream now serves different bytes under the same URL.
    changed = make_tgz([(MEMBER, graph_bytes), ("tiny/labels.txt", b"other\n")])
    server.routes["/models/tiny.tgz"].body = changed
    shutil.rmtree(cache / "graphs")
    shutil.rmtree(cache / "downloads")
    before = snapshot(cache)
    assert fail(spec, cache) == (
        f"sha256 mismatch for tiny from {url}: expected {sha(tiny_tgz)} (recorded in {lock_path} on "
        f"first download), got {sha(changed)}; if the file changed upstream on purpose, delete the "
        f"entry for {url} from {lock_path} and fetch again"
    )
    assert_untouched(cache, before)


def test_damaged_cached_graph_is_rebuilt_from_the_cached_archive(server, cache, tiny_tgz, graph_bytes):
    url = server.add("/models/tiny.tgz", Route(body=tiny_tgz))
    first = fetch(tiny_spec(url), cache_dir=cache, **FAST)
    first.graph_path.write_bytes(b"edited in place")
    again = fetch(tiny_spec(url), cache_dir=cache, **FAST)
    assert (again.source, again.graph_sha256) == ("cache", first.graph_sha256)
    assert again.graph_path.read_bytes() == graph_bytes
    assert len(server.seen) == 1


def test_bare_pb_url_is_copied(server, cache, graph_bytes):
    url = server.add("/models/tiny_frozen.pb", Route(body=graph_bytes))
    result = fetch(tiny_spec(url, member=None, sha256=sha(graph_bytes)), cache_dir=cache, **FAST)
    assert result.graph_path == cache / "graphs" / "tiny" / "tiny_frozen.pb"
    assert result.graph_path.read_bytes() == graph_bytes
    assert result.archive_sha256 == result.graph_sha256 == sha(graph_bytes)


def test_cache_status_before_and_after(server, cache, tiny_tgz):
    spec = tiny_spec(server.add("/models/tiny.tgz", Route(body=tiny_tgz)))
    assert cache_status(spec, cache) == {
        "name": "tiny", "url": spec.url, "cached": False,
        "size_bytes": None, "sha256": None, "graph_path": None,
    }
    result = fetch(spec, cache_dir=cache, **FAST)
    status = cache_status(spec, cache)
    assert status["cached"] and status["sha256"] == result.graph_sha256
    assert status["graph_path"] == str(result.graph_path)


def test_local_graph_is_checked_not_copied(tmp_path, graph_bytes):
    graph = tmp_path / "mine.pb"
    graph.write_bytes(graph_bytes)
    spec = custom_backbone(graph, "input:0", "output:0", 8, 127.5, 127.5)
    result = fetch(spec, cache_dir=tmp_path / "cache")
    assert result == FetchResult(graph, sha(graph_bytes), None, "local", "unchecked")
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda p: None, "graph file {p} does not exist; check the path given to --graph"),
        (lambda p: p.mkdir(), "{p} is not a file; pass --graph the frozen .pb file itself"),
        (lambda p: p.write_bytes(b"\xff\xff\xff garbage"), "{p} is not a TensorFlow GraphDef ("),
        (lambda p: p.write_bytes(b""), "{p} is not a TensorFlow GraphDef (it parses as an empty graph)"),
    ],
    ids=["missing", "folder", "garbage", "empty"],
)
def test_local_graph_errors(make, expected, tmp_path):
    path = tmp_path / "mine.pb"
    make(path)
    spec = custom_backbone(path, "input:0", "output:0", 8, 127.5, 127.5)
    with pytest.raises(FetchError) as info:
        fetch(spec)
    assert str(info.value).startswith(expected.format(p=path))


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "edgepipe"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/is/ignored")
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "edgepipe"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "edgepipe"
    monkeypatch.setenv("EDGEPIPE_CACHE_DIR", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"


def test_bad_options_are_reported_together(server):
    spec = tiny_spec(server.add("/x.tgz", Route()))
    expected = r"^timeout must be positive \(got 0\); retries must be 0 or more \(got -1\)$"
    with pytest.raises(ConfigError, match=expected):
        fetch(spec, timeout_s=0, retries=-1)


def test_importing_fetch_does_not_import_tensorflow():
    code = "import sys, pipeline.fetch; sys.exit('tensorflow' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


# --- failures: one actionable line, and the cache exactly as it was -----------------------------


@dataclass(frozen=True)
class Case:
    """One way for a fetch to fail.

    Attributes:
        serve: builds the server's answer from the good tiny archive; None serves nothing (404).
        expected: the whole message ({url}, {hint}, ... filled in), or its start if it ends in "(".
        spec: fields of the tiny spec to change.
        mirror: "", "dir" (an empty mirror folder passed as an argument) or "env" (the same via
            EDGEPIPE_MIRROR).
        kwargs: extra arguments to fetch().
    """

    serve: Callable[[bytes], Route] | None
    expected: str
    spec: dict = dataclasses.field(default_factory=dict)
    mirror: str = ""
    kwargs: dict = dataclasses.field(default_factory=dict)


NO_MIRROR = "no mirror is set (EDGEPIPE_MIRROR is empty); {hint}"
DAMAGED = "the download is damaged: delete it and fetch again, or pass --graph FILE.pb"
FAILURES = {
    "404": Case(None, "could not download {url} (HTTP 404), and " + NO_MIRROR),
    "404-dir-mirror": Case(
        None,
        "could not download {url} (HTTP 404), and no mirror has it "
        "(mirror {mdir}: not found at {mdir}/{rel}); {hint}",
        mirror="dir",
    ),
    "404-env-mirror": Case(
        None,
        "could not download {url} (HTTP 404), and no mirror has it "
        "(EDGEPIPE_MIRROR={mdir}: not found at {mdir}/{rel}); {hint}",
        mirror="env",
    ),
    "500": Case(
        lambda body: Route(body=body, status=500),
        "could not download {url} (HTTP 500, 2 attempts), and " + NO_MIRROR,
    ),
    "dropped": Case(
        lambda body: Route(body=body, drop_at=len(body) // 2),
        "could not download {url} (connection dropped after {half:,} of {size:,} bytes, "
        "2 attempts), and " + NO_MIRROR,
    ),
    "stalled": Case(
        lambda body: Route(body=body, stall_s=2.0),
        "could not download {url} (no data for 0.3 s after 1,024 of {size:,} bytes), and "
        + NO_MIRROR,
        kwargs={"timeout_s": 0.3, "retries": 0},
    ),
    "offline": Case(
        lambda body: Route(body=body),
        "tiny is not in the cache {cache} and offline mode does not try {url}, and " + NO_MIRROR,
        kwargs={"offline": True},
    ),
    "truncated": Case(
        lambda body: Route(body=body[: len(body) // 2]),
        "{url} is not a readable archive (it is truncated); " + DAMAGED,
    ),
    "not-an-archive": Case(
        lambda body: Route(body=b"<html>Not Found</html>"),
        "{url} is not a readable archive (not a tar, tar.gz, tar.bz2 or tar.xz file); " + DAMAGED,
    ),
    "checksum": Case(
        lambda body: Route(body=body),
        "sha256 mismatch for tiny from {url}: expected {zeros} (pinned in models/backbones.toml), "
        "got {digest}; the file is damaged or not the published one: replace it where it came "
        "from, or fix sha256 in models/backbones.toml if upstream really changed it",
        spec={"sha256": "0" * 64},
    ),
    "no-member": Case(
        lambda body: Route(body=body),
        "{url} has no file 'tiny/missing.pb' (it has: tiny/frozen_graph.pb, tiny/README.md, "
        "tiny/labels.txt); fix member of tiny in models/backbones.toml, or pass --graph FILE.pb",
        spec={"member": "tiny/missing.pb"},
    ),
    "not-a-graphdef": Case(
        lambda body: Route(body=make_tgz([(MEMBER, b"\xff\xff\xff not a graph")])),
        "tiny/frozen_graph.pb from {url} is not a TensorFlow GraphDef (",
    ),
}


@pytest.mark.parametrize("name", list(FAILURES))
def test_failure_message_and_untouched_cache(name, warm_cache, server, tiny_tgz, tmp_path,
                                             monkeypatch):
    case, cache = FAILURES[name], warm_cache
    path = "/models/tiny.tgz"
    url = server.add(path, case.serve(tiny_tgz)) if case.serve else server.base_url + path
    mdir = tmp_path / "mirror"
    mdir.mkdir()
    kwargs = dict(case.kwargs)
    if case.mirror == "dir":
        kwargs["mirror"] = str(mdir)
    elif case.mirror == "env":
        monkeypatch.setenv("EDGEPIPE_MIRROR", str(mdir))
    rel = f"127.0.0.1{path}"
    expected = case.expected.format(
        url=url, rel=rel, hint=hint(rel), mdir=mdir, cache=cache, half=len(tiny_tgz) // 2,
        size=len(tiny_tgz), zeros="0" * 64, digest=sha(tiny_tgz),
    )
    before = snapshot(cache)

    message = fail(dataclasses.replace(tiny_spec(url), **case.spec), cache, **kwargs)

    if expected.endswith("("):
        assert message.startswith(expected), message
    else:
        assert message == expected
    assert_untouched(cache, before)
    if name == "offline":
        assert server.seen == []


def test_refused_connection(warm_cache):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound but not listening: connections are refused
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/models/tiny.tgz"
        before = snapshot(warm_cache)
        message = fail(tiny_spec(url), warm_cache)
    assert message == (
        f"could not download {url} (connection refused, 2 attempts), and no mirror is set "
        f"(EDGEPIPE_MIRROR is empty); {hint('127.0.0.1/models/tiny.tgz')}"
    )
    assert_untouched(warm_cache, before)


def test_unwritable_cache_is_reported(server, cache, tiny_tgz, monkeypatch):
    url = server.add("/models/tiny.tgz", Route(body=tiny_tgz))

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(cache / "partial"))

    monkeypatch.setattr(fetch_mod.tempfile, "mkdtemp", refuse)
    assert fail(tiny_spec(url), cache) == (
        f"cannot write to the cache {cache} (Permission denied: {cache / 'partial'}); "
        f"free some space, or set EDGEPIPE_CACHE_DIR to a folder you can write"
    )


# --- retries and resuming ---------------------------------------------------------------------


def test_server_error_is_retried(server, cache, tiny_tgz):
    url = server.add("/models/tiny.tgz", Route(body=tiny_tgz, fail_first=2))
    result = fetch(tiny_spec(url), cache_dir=cache, **{**FAST, "retries": 2})
    assert result.archive_sha256 == sha(tiny_tgz)
    assert len(server.seen) == 3


def test_next_call_resumes_a_dropped_download(server, cache, tiny_tgz):
    half = len(tiny_tgz) // 2
    url = server.add("/models/tiny.tgz", Route(body=tiny_tgz, drop_at=half, drop_times=1))
    spec = tiny_spec(url, sha256=sha(tiny_tgz))
    assert "connection dropped after" in fail(spec, cache, retries=0)
    [part] = part_files(cache)
    assert part.read_bytes() == tiny_tgz[:half]

    result = fetch(spec, cache_dir=cache, **FAST)
    assert server.ranges() == [None, f"bytes={half}-"]
    assert (result.archive_sha256, result.checksum) == (sha(tiny_tgz), "pinned")
    assert part_files(cache) == []


def test_retry_within_one_call_resumes(server, cache, tiny_tgz):
    half = len(tiny_tgz) // 2
    url = server.add("/models/tiny.tgz", Route(body=tiny_tgz, drop_at=half, drop_times=1))
    result = fetch(tiny_spec(url, sha256=sha(tiny_tgz)), cache_dir=cache, **FAST)
    assert server.ranges() == [None, f"bytes={half}-"]
    assert result.archive_sha256 == sha(tiny_tgz)


def test_server_ignoring_range_gets_a_full_download(server, cache, tiny_tgz):
    half = len(tiny_tgz) // 2
    route = Route(body=tiny_tgz, drop_at=half, drop_times=1, ignore_range=True)
    url = server.add("/models/tiny.tgz", route)
    spec = tiny_spec(url, sha256=sha(tiny_tgz))
    fail(spec, cache, retries=0)
    result = fetch(spec, cache_dir=cache, **FAST)
    assert server.ranges() == [None, f"bytes={half}-"]  # asked to resume, answered 200 with it all
    assert result.archive_sha256 == sha(tiny_tgz)
    assert part_files(cache) == []


def test_stale_part_from_another_file_is_downloaded_again(server, cache, tiny_tgz, graph_bytes):
    half = len(tiny_tgz) // 2
    url = server.add("/models/tiny.tgz", Route(body=tiny_tgz, drop_at=half, drop_times=1))
    fail(tiny_spec(url), cache, retries=0)
    # Upstream replaced the file; the .part still holds the first half of the old one.
    new = make_tgz([(MEMBER, graph_bytes), ("tiny/README.md", os.urandom(len(tiny_tgz)))])
    server.routes["/models/tiny.tgz"] = Route(body=new)
    result = fetch(tiny_spec(url, sha256=sha(new)), cache_dir=cache, **FAST)
    assert server.ranges()[1:] == [f"bytes={half}-", None]
    assert result.archive_sha256 == sha(new)


# --- processes sharing one cache --------------------------------------------------------------


@pytest.mark.slow  # two CLI processes (10 s)
def test_two_processes_fetching_at_once_share_one_download(server, cache, tiny_tgz):
    # The delay keeps the first download in flight while the second process arrives.
    url = server.add("/models/tiny.tgz", Route(body=tiny_tgz, delay_s=0.5))
    spec = tiny_spec(url, sha256=sha(tiny_tgz))
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    args = (spec, str(cache), barrier, results)
    procs = [ctx.Process(target=fetch_in_process, args=args) for _ in range(2)]
    for p in procs:
        p.start()
    try:
        outcomes = [results.get(timeout=120) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
    assert all(o[0] == "ok" for o in outcomes), outcomes
    assert sorted(o[1] for o in outcomes) == sorted(["cache", url])
    assert outcomes[0][2:] == outcomes[1][2:]  # same graph hash and bytes
    assert len(server.seen) == 1
    assert list((cache / "partial").iterdir()) == []


# --- archives that must not be unpacked -------------------------------------------------------


def _info(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    if kind == tarfile.CHRTYPE:
        info.devmajor, info.devminor = 1, 3  # /dev/null
    return info


MALICIOUS = {
    "absolute-path": (_info("/tmp/evil.pb", tarfile.REGTYPE), "has an absolute path"),
    "dot-dot": (_info("../evil.pb", tarfile.REGTYPE), "climbs out of the archive with '..'"),
    "nested-dot-dot": (
        _info("tiny/../../evil.pb", tarfile.REGTYPE), "climbs out of the archive with '..'"
    ),
    "symlink-absolute": (
        _info("tiny/passwd", tarfile.SYMTYPE, "/etc/passwd"),
        "is a symlink to '/etc/passwd', outside the archive",
    ),
    "symlink-relative": (
        _info("tiny/up", tarfile.SYMTYPE, "../../etc/passwd"),
        "is a symlink to '../../etc/passwd', outside the archive",
    ),
    "hardlink": (
        _info("tiny/passwd", tarfile.LNKTYPE, "/etc/passwd"),
        "is a hard link to '/etc/passwd', outside the archive",
    ),
    "fifo": (_info("tiny/fifo", tarfile.FIFOTYPE), "is a FIFO"),
    "device": (_info("tiny/null", tarfile.CHRTYPE), "is a device file"),
}


@pytest.mark.parametrize("kind", list(MALICIOUS))
def test_malicious_archive_is_refused(kind, warm_cache, server, graph_bytes, tmp_path):
    evil, why = MALICIOUS[kind]
    # The evil member comes after a perfectly good graph: the whole archive is still refused.
    body = make_tgz([(MEMBER, graph_bytes)], extra=[evil])
    url = server.add("/models/tiny.tgz", Route(body=body))
    before = snapshot(warm_cache)
    assert fail(tiny_spec(url), warm_cache) == (
        f"refusing to extract {url}: member {evil.name!r} {why}; the archive is unsafe; "
        f"get the file from its official source, or pass --graph FILE.pb"
    )
    assert_untouched(warm_cache, before)
    assert not Path("/tmp/evil.pb").exists() and not (tmp_path / "evil.pb").exists()


def test_member_claiming_absurd_size_is_refused(warm_cache, server):
    header = tarfile.TarInfo(MEMBER)
    header.size = 5 << 30  # a header alone: the 5 GiB body is never there to read
    body = gzip.compress(header.tobuf(tarfile.GNU_FORMAT) + bytes(1024))
    url = server.add("/models/tiny.tgz", Route(body=body))
    before = snapshot(warm_cache)
    assert fail(tiny_spec(url), warm_cache).startswith(
        f"refusing to extract {url}: member {MEMBER!r} claims 5,368,709,120 bytes "
        f"(limit 4,294,967,296)"
    )
    assert_untouched(warm_cache, before)


def test_archive_over_the_total_limit_is_refused(warm_cache, server, tiny_tgz, monkeypatch):
    monkeypatch.setattr(fetch_mod, "MAX_TOTAL_BYTES", 50_000)
    url = server.add("/models/tiny.tgz", Route(body=tiny_tgz))
    before = snapshot(warm_cache)
    message = fail(tiny_spec(url), warm_cache)
    assert message.startswith(
        f"refusing to extract {url}: member 'tiny/README.md' brings the total to 100,"
    )
    assert "(limit 50,000)" in message
    assert_untouched(warm_cache, before)

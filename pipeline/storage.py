"""Files named by a local path or by a URL on any Apache Beam filesystem (``gs://``, ``s3://``,
``hdfs://``, ``azfs://``, where Beam's matching extra is installed).

Local paths never touch Beam: the local engine and everything else read them with ``os`` as
before. A URL is listed, read and written through :mod:`apache_beam.io.filesystems`, imported on
first use only, so that Beam stays an optional extra.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import uuid
from pathlib import Path
from typing import Iterator, Sequence

# Set by configure(); children (a spawned converter reading calibration images) inherit it.
OPTIONS_ENV = "EDGEPIPE_BEAM_FS_OPTIONS"


def is_url(path: object) -> bool:
    """A location on a Beam filesystem other than the local one."""
    return "://" in str(path)


def join(base: str, *parts: str) -> str:
    return posixpath.join(str(base).rstrip("/"), *parts) if is_url(base) else os.path.join(str(base), *parts)


def basename(path: object) -> str:
    return posixpath.basename(str(path).rstrip("/")) if is_url(path) else os.path.basename(str(path))


@contextlib.contextmanager
def quiet_import() -> Iterator[None]:
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
        # Its own failures reach the user as edgepipe's one line per attempt (see run()).
        logging.getLogger("apache_beam").setLevel(logging.CRITICAL)


class BeamMissing(OSError):
    """A URL was given but Apache Beam, which reads it, is not installed."""


def _filesystems():
    try:
        with quiet_import():
            from apache_beam.io.filesystems import FileSystems
            from apache_beam.options.pipeline_options import PipelineOptions
    except ImportError:
        raise BeamMissing("reading a URL needs Apache Beam: run `make setup-beam` "
                          "(pip install -c requirements.lock -e '.[beam]')") from None
    FileSystems.set_options(PipelineOptions(json.loads(os.environ.get(OPTIONS_ENV, "[]"))))
    return FileSystems


def configure(options: Sequence[str]) -> None:
    """Beam pipeline options the filesystems take in this process and its children
    (``--s3_endpoint_url``, ``--project``, ``--hdfs_host``...), as the workers get them from the
    pipeline."""
    os.environ[OPTIONS_ENV] = json.dumps(list(options))


def read(url: str) -> bytes:
    """The bytes at ``url``.

    Raises:
        OSError: it cannot be read (the filesystem's own error in the message).
    """
    from apache_beam.io.filesystem import CompressionTypes

    fs = _filesystems()
    try:
        with fs.open(url, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            return f.read()
    except Exception as err:  # each filesystem raises its own (BeamIOError, botocore, HttpError)
        raise OSError(f"{url}: {' '.join(str(err).split())[:200]}") from None


def write_atomic(url: str, data: bytes) -> None:
    """Writes ``data`` at ``url`` under a temporary name first, then renames it, so a reader never
    sees a partial object (object stores make the rename a copy; a retried write gives the same
    bytes under the same name)."""
    from apache_beam.io.filesystem import CompressionTypes

    fs = _filesystems()
    tmp = f"{url}.tmp-{uuid.uuid4().hex[:12]}"
    with fs.create(tmp, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        f.write(data)
    fs.rename([tmp], [url])


def listing(pattern: str) -> list[tuple[str, int, float]]:
    """``(url, size, modified)`` of every file matching a glob (``gs://b/photos/*/*``), sorted."""
    fs = _filesystems()
    try:
        found = fs.match([pattern])[0].metadata_list
    except Exception as err:
        raise OSError(f"{pattern}: cannot list ({' '.join(str(err).split())[:200]})") from None
    return sorted((m.path, m.size_in_bytes, m.last_updated_in_seconds or 0.0) for m in found)


def delete_tree(url: str) -> None:
    """Removes everything under ``url`` (an object store has no folder to remove: its objects)."""
    fs = _filesystems()
    with contextlib.suppress(Exception):
        found = [m.path for m in fs.match([join(url, "**")])[0].metadata_list]
        if found:
            fs.delete(found)
    with contextlib.suppress(Exception):
        if fs.exists(url):
            fs.delete([url])


MANIFEST = "edgepipe-files.json"


def upload(local: Path, url: str) -> str:
    """Copies a file or a folder (a SavedModel, a TF.js bundle) to ``url`` with a list of its
    files, for :func:`download` on a worker that cannot see this machine's disks. Returns ``url``."""
    local = Path(local)
    files = [p for p in sorted(local.rglob("*")) if p.is_file()] if local.is_dir() else [local]
    names = [p.relative_to(local).as_posix() if local.is_dir() else local.name for p in files]
    for p, name in zip(files, names):
        write_atomic(join(url, name), p.read_bytes())
    write_atomic(join(url, MANIFEST), json.dumps({"folder": local.is_dir(), "files": names}).encode())
    return url


def download(url: str, folder: Path) -> Path:
    """The file or folder :func:`upload` put at ``url``, copied under ``folder``; its local path."""
    manifest = json.loads(read(join(url, MANIFEST)))
    root = Path(folder) / basename(url)
    for name in manifest["files"]:
        dst = root / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(read(join(url, name)))
    return root if manifest["folder"] else root / manifest["files"][0]


def iter_lines(url: str) -> Iterator[str]:
    from apache_beam.io.filesystem import CompressionTypes

    with _filesystems().open(url, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        for line in f:
            yield line.decode("utf-8")


logging.getLogger("botocore").setLevel(logging.WARNING)

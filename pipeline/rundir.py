"""Run-directory layout, atomic file writes and the manifest.

A run directory holds one folder per stage (named like the stage's module and CLI command),
``manifest.json`` and the reports. Every file is written to a temporary name in the same folder and
then ``os.replace``d, so a killed process never leaves a half-written artifact under its final name.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_tree(path: Path) -> str:
    """Hash of a file, or of a folder's relative names and file contents (order-independent)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(path)).encode())
        h.update(sha256_file(p).encode())
    return h.hexdigest()


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def atomic_write_bytes(path: Path, data: bytes, durable: bool = True) -> None:
    """Writes ``path`` whole or not at all (a temporary file renamed into place).

    Args:
        durable: fsync before the rename, so the file survives a power cut. Cache entries that
            are checked on read and cheap to recompute pass False (fsync costs about 1 ms each).

    Raises:
        OSError: naming ``path`` (not the temporary file), e.g. ENOSPC on a full disk.
    """
    path = Path(path)
    # One name per process and thread: no two writers share a temporary, and a leftover from a
    # killed process with a recycled pid is simply replaced (O_EXCL fails on it once).
    tmp = str(path.parent / f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    created = False
    try:
        try:
            fd = os.open(tmp, flags, 0o666)  # umask applies
        except FileNotFoundError:
            # The folder is made when missing rather than checked before every write: cache
            # entries are written by the thousand into a few folders.
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, flags, 0o666)
        except FileExistsError:
            os.unlink(tmp)
            fd = os.open(tmp, flags, 0o666)
        created = True
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as err:
        if created:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        if isinstance(err, OSError) and (err.filename is None or str(err.filename) == tmp):
            # A failed write() carries no file name, a failed open() our temporary one.
            err.filename = str(path)
        raise


def remove_orphaned_temporaries(folder: Path) -> int:
    """Removes the temporaries of :func:`atomic_write_bytes` under ``folder`` whose writer has died
    (a worker killed mid-write); a live process's are left to it. Returns how many went."""
    removed = 0
    for tmp in Path(folder).rglob(".*.tmp") if Path(folder).is_dir() else ():
        parts = tmp.name.rsplit(".", 3)  # .NAME . pid . thread . tmp
        if len(parts) != 4 or not parts[1].isdigit() or _alive(int(parts[1])):
            continue
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
            removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yields a temporary sibling folder; on success it replaces ``final`` whole.

    Used for multi-file artifacts (SavedModel, TF.js bundles) so a reader never sees a mix of
    old and new files or a half-converted model.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp's 0700 would hide bundles from a web server's user
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            err.filename = str(final)
        elif not isinstance(err, OSError) and "No space left on device" in str(err):
            # TensorFlow and the converters report a full disk in their own exception types.
            raise OSError(errno.ENOSPC, "No space left on device", str(final)) from err
        raise


def read_json(path: Path, default: Any = None) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return default


_HELD: dict[str, int] = {}  # run directories this process has locked, and how many times


class RunDir:
    """Paths inside one run directory."""

    LOCK = ".edgepipe.lock"

    def __init__(self, root: Path):
        self.root = Path(root)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Holds the run directory for this process: a second edgepipe on the same ``--out`` gets
        :class:`pipeline.errors.RunBusy` instead of writing the same files. The lock is the
        kernel's (``flock``), so a killed run leaves none behind; it is re-entrant in one process."""
        import fcntl

        from pipeline.errors import RunBusy

        key = str(self.root.resolve())
        if key in _HELD:
            _HELD[key] += 1
            try:
                yield
            finally:
                _HELD[key] -= 1
            return
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / self.LOCK
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as err:
            if err.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise
            # A folder this process cannot write to: nothing here can corrupt it, and the run's
            # first write fails with the one line that names the file.
            yield
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                raise RunBusy(f"{self.root} is in use by another edgepipe (pid {holder}); wait for it to finish, "
                              "or give this run another --out") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            _HELD[key] = 1
            try:
                yield
            finally:
                del _HELD[key]
        finally:
            os.close(fd)  # releases the lock

    def stage(self, name: str) -> Path:
        return self.root / name

    def stored(self, path: Path) -> str:
        """How the manifest records ``path``: relative to the run directory when inside it, so a
        run directory moved or copied elsewhere reads its own files; else absolute (the cache)."""
        path = Path(path)
        try:
            return str(path.relative_to(self.root))
        except ValueError:
            return str(path)

    def resolve(self, recorded: str) -> Path:
        """A path the manifest records (see :meth:`stored`; older runs recorded absolute ones)."""
        path = Path(recorded)
        return path if path.is_absolute() else self.root / path

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    def load_manifest(self) -> dict[str, Any]:
        return read_json(self.manifest_path, default={}) or {}

    def save_manifest(self, manifest: dict[str, Any]) -> None:
        atomic_write_json(self.manifest_path, manifest)

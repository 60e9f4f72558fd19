"""Which content hash a file had when it was last read: a stat-keyed memo, as git's index keeps.

A warm bottleneck cache is keyed by the SHA-256 of each image's bytes, so without this memo a
run with nothing new still reads and hashes every photo (a 5 MB phone photo costs ~3 ms). An
entry is trusted only while the file's device, inode, size, mtime and ctime are all unchanged;
any write, ``touch``, ``chmod``, rename-over or copy changes at least one of them. Files changed
less than :data:`RACY_NS` before they were read are not recorded, because a second write within
the same timestamp tick could leave every field as it was (git's "racy clean" problem).

The memo is only ever an optimisation: a missing, locked, read-only or corrupt database means
"hash the file", never a failed run. Content addressing itself (and so the Beam-friendly pure
function in :mod:`pipeline.bottlenecks`) does not depend on it.
"""
from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path
from typing import Iterable, Sequence

RACY_NS = 1_000_000_000
_SCHEMA = ("CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, dev INTEGER, ino INTEGER, size INTEGER,"
           " mtime_ns INTEGER, ctime_ns INTEGER, sha256 TEXT) WITHOUT ROWID")
_QUERY_CHUNK = 500  # SQLite's default limit on host parameters is 999 (older builds)


def signature(st: os.stat_result) -> tuple[int, int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class HashIndex:
    """``path → (stat signature, sha256)`` in one SQLite file, shared by processes.

    Args:
        db: the database file; created on first use. ``None`` gives an index that remembers
            nothing (every lookup misses).
    """

    def __init__(self, db: Path | None):
        self._conn: sqlite3.Connection | None = None
        if db is None:
            return
        try:
            Path(db).parent.mkdir(parents=True, exist_ok=True)
            self._conn = self._open(db)
        except (sqlite3.Error, OSError):
            # A corrupt file is moved out of the way once; anything else (read-only folder,
            # a locked or foreign file) just turns the memo off for this run.
            with contextlib.suppress(OSError):
                if Path(db).is_file() and _is_corrupt(db):
                    os.replace(db, f"{db}.corrupt")
                    self._conn = self._open(db)

    @staticmethod
    def _open(db: Path) -> sqlite3.Connection:
        conn = sqlite3.connect(str(db), timeout=10, isolation_level=None, check_same_thread=False)
        # A lost write after a power cut only costs a re-hash; no fsync per batch.
        conn.execute("PRAGMA synchronous=OFF")
        conn.execute(_SCHEMA)
        return conn

    def lookup(self, paths: Sequence[str], stats: Sequence[os.stat_result | None]) -> list[str | None]:
        """The recorded sha256 of each path whose stat signature is unchanged, else None."""
        found: list[str | None] = [None] * len(paths)
        if self._conn is None:
            return found
        rows: dict[str, tuple] = {}
        try:
            for k in range(0, len(paths), _QUERY_CHUNK):
                part = paths[k:k + _QUERY_CHUNK]
                marks = ",".join("?" * len(part))
                for row in self._conn.execute(
                        f"SELECT path, dev, ino, size, mtime_ns, ctime_ns, sha256 FROM files WHERE path IN ({marks})",
                        part):
                    rows[row[0]] = row
        except sqlite3.Error:
            self._conn = None
            return found
        for n, (path, st) in enumerate(zip(paths, stats)):
            row = rows.get(path)
            if row is not None and st is not None and tuple(row[1:6]) == signature(st):
                found[n] = row[6]
        return found

    def record(self, entries: Iterable[tuple[str, os.stat_result, int, str]]) -> None:
        """Remembers ``(path, stat before reading, time the read started in ns, sha256)``;
        files changed within :data:`RACY_NS` of the read are left out."""
        if self._conn is None:
            return
        rows = [(path, *signature(st), sha) for path, st, read_ns, sha in entries
                if read_ns - max(st.st_mtime_ns, st.st_ctime_ns) >= RACY_NS]
        if not rows:
            return
        try:
            with self._conn:  # one transaction
                self._conn.execute("BEGIN")
                self._conn.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
        except sqlite3.Error:
            self._conn = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _is_corrupt(db: Path) -> bool:
    try:
        conn = sqlite3.connect(str(db), timeout=1)
        try:
            return conn.execute("PRAGMA quick_check").fetchone()[0] != "ok"
        finally:
            conn.close()
    except sqlite3.DatabaseError as err:
        return "malformed" in str(err) or "not a database" in str(err)
    except sqlite3.Error:
        return False

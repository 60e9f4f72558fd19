"""One exception family for everything a user can fix.

Only the CLI catches these; it prints ``str(err)`` as one line and exits with ``err.exit_code``.
Unexpected exceptions are not wrapped, so they keep their traceback.
"""
from __future__ import annotations

import errno

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_GATE_FAILED = 3
EXIT_BUSY = 4


def one_line(err: BaseException | str, limit: int = 200) -> str:
    """An exception's text squashed onto one line of at most ``limit`` characters, for messages
    the CLI prints as a single line."""
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


class PipelineError(Exception):
    """Base class: a problem with input, configuration or environment the user can act on."""

    exit_code = EXIT_BAD_INPUT


class ConfigError(PipelineError):
    """Bad or contradictory options, unknown backbone, missing folder."""


class FetchError(PipelineError):
    """A download, checksum, archive or graph-file problem."""


class DatasetError(PipelineError):
    """Image folders that cannot be trained or verified on."""


class GraphError(PipelineError):
    """A frozen graph that does not have what the backbone spec promises."""


class ConversionError(PipelineError):
    """A converter refused the model."""


class RunBusy(PipelineError):
    """Another edgepipe process is working in the same run directory."""

    exit_code = EXIT_BUSY


class VerificationFailed(PipelineError):
    """At least one converted model drifted past its agreement gate."""

    exit_code = EXIT_GATE_FAILED


_DISK_ERRORS = {
    errno.ENOSPC: ("no space left on device writing", "free some space or point --out / EDGEPIPE_CACHE_DIR at a disk with room"),
    errno.EDQUOT: ("disk quota exceeded writing", "free some space or point --out / EDGEPIPE_CACHE_DIR at a disk with room"),
    errno.EROFS: ("read-only file system: cannot write", "point --out / EDGEPIPE_CACHE_DIR at a writable folder"),
    errno.EACCES: ("permission denied on", "fix the permissions or point --out / EDGEPIPE_CACHE_DIR at a folder you own"),
    errno.EPERM: ("operation not permitted on", "fix the permissions or point --out / EDGEPIPE_CACHE_DIR at a folder you own"),
}


def disk_error(err: BaseException, where: str | None = None) -> PipelineError | None:
    """One line for a full, read-only or forbidden disk, or None for any other exception.

    Args:
        where: named when the error does not carry a file name (a write() on a full disk).
    """
    if not isinstance(err, OSError) or err.errno not in _DISK_ERRORS:
        return None
    what, hint = _DISK_ERRORS[err.errno]
    return PipelineError(f"{what} {err.filename or where or 'the run directory or the cache'}; {hint}")

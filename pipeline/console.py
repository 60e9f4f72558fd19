"""What a user sees: edgepipe's own lines and progress bars, not the libraries' log noise.

edgepipe's messages go through :mod:`logging` (logger ``edgepipe``, one line each, as written).
TensorFlow, absl, XLA and the converters write to file descriptors 1 and 2 from C++, below
Python's ``sys.stderr``; :func:`library_output` points both descriptors at a pipe while a stage
runs and copies what arrives into ``RUN/logs/<stage>.log`` (and, with ``verbose``, to the console
too). edgepipe's own lines and progress bars are written to a duplicate of the console taken
before the switch, so they still appear as they happen.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Iterator, TextIO

LOGGER_NAME = "edgepipe"
log = logging.getLogger(LOGGER_NAME)

_console: TextIO | None = None  # the real console while library output is diverted
_results: TextIO | None = None  # the real standard output while library output is diverted


def console() -> TextIO:
    """Where edgepipe's own lines and progress bars go now."""
    return _console or sys.stderr


def results() -> TextIO:
    """Where a command's results go now (``edgepipe classify`` prints its answers as they come):
    standard output as it was before library output was diverted."""
    return _results or sys.stdout


class _ConsoleHandler(logging.Handler):
    """Writes each record to :func:`console` as it is at that moment (it moves during a stage)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = console()
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # a closed or full console must not fail the run
            self.handleError(record)


def setup_logging() -> None:
    """Gives the ``edgepipe`` logger a console handler, unless the application configured one."""
    if not log.handlers:
        handler = _ConsoleHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.propagate = False
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)


setup_logging()  # edgepipe is a tool: its lines show unless the application says otherwise


def progress(**kwargs):
    """A tqdm progress bar on the console (kwargs as for ``tqdm``)."""
    from tqdm import tqdm

    return tqdm(file=console(), **kwargs)


def _fileno(stream) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):
        return None


def _pump(read_fd: int, log_file, echo_fd: int | None) -> None:
    """Copies the pipe into the log (and the console) until every writer has closed it; then
    closes what it was given."""
    try:
        while True:
            try:
                chunk = os.read(read_fd, 65536)
            except OSError:
                return
            if not chunk:
                return
            if log_file is not None:
                try:
                    log_file.write(chunk)
                    log_file.flush()
                except OSError:
                    pass  # a full disk loses library chatter, never the run
            if echo_fd is not None:
                with contextlib.suppress(OSError):
                    os.write(echo_fd, chunk)
    finally:
        os.close(read_fd)
        if echo_fd is not None:
            os.close(echo_fd)
        if log_file is not None:
            with contextlib.suppress(OSError):
                log_file.close()


@contextlib.contextmanager
def library_output(log_path: Path | None, verbose: bool = False) -> Iterator[None]:
    """Diverts file descriptors 1 and 2 (C++ logs, converters, ``print``) while the block runs.

    Args:
        log_path: where the diverted output is kept (replaced); None keeps nothing. A log that
            cannot be written (full or read-only disk) is skipped, never an error.
        verbose: also show the diverted output on the console, as it arrives.
    """
    global _console, _results
    if _console is not None:  # already diverted by an outer block
        yield
        return
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    # edgepipe's lines go to the console as it was: sys.stderr itself when it is not descriptor 2
    # (pytest's capture, a notebook), else a duplicate of descriptor 2 taken before the switch.
    if _fileno(sys.stderr) == 2:
        console_stream = os.fdopen(os.dup(saved_err), "w", buffering=1, encoding="utf-8",
                                   errors="backslashreplace", closefd=True)
    else:
        console_stream = sys.stderr
    if _fileno(sys.stdout) == 1:
        results_stream = os.fdopen(os.dup(saved_out), "w", buffering=1, encoding="utf-8",
                                   errors="backslashreplace", closefd=True)
    else:
        results_stream = sys.stdout
    log_file = None
    if log_path is not None:
        try:
            Path(log_path).parent.mkdir(parents=True, exist_ok=True)
            log_file = open(log_path, "wb")
        except OSError:
            log_file = None
    read_fd, write_fd = os.pipe()
    echo_fd = os.dup(saved_err) if verbose else None
    pump = threading.Thread(target=_pump, args=(read_fd, log_file, echo_fd),
                            name="edgepipe-library-output", daemon=True)
    pump.start()
    os.dup2(write_fd, 1)
    os.dup2(write_fd, 2)
    os.close(write_fd)
    _console, _results = console_stream, results_stream
    try:
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        os.close(saved_out)
        os.close(saved_err)
        _console = _results = None
        # EOF comes once no child process holds the pipe either; one that lingers is not waited for.
        pump.join(timeout=5)
        if console_stream is not sys.stderr:
            with contextlib.suppress(OSError):
                console_stream.close()
        if results_stream is not sys.stdout:
            with contextlib.suppress(OSError):
                results_stream.close()


def import_tensorflow_quietly(verbose: bool = False) -> None:
    """Imports TensorFlow with its import-time C++ lines (CUDA factories, oneDNN) kept off the
    console, for work that reads a graph before any stage diverts the library output."""
    if "tensorflow" in sys.modules:
        return
    with library_output(None, verbose):
        import tensorflow  # noqa: F401

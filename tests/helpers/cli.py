"""``edgepipe`` as a user runs it: a separate process, its exit code, stdout and stderr.

Only tests about the command line itself use these (exit codes, one-line errors, the printed
table, skips seen from the shell, SIGKILL and resume); everything else calls the library
in-process (:mod:`tests.helpers.chain`), which saves the process start and TensorFlow's import.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable, Mapping

from tests.helpers.world import REPO

# pipeline.resume option names whose command-line flag is not the name with dashes.
_FLAGS = {"quant_modes": "--quant", "tfjs_modes": "--tfjs", "runtimes": "--runtime",
          "runtime_timeout_s": "--runtime-timeout", "gates": "--gate"}


def edgepipe(*args, env: Mapping[str, str] | None = None, cwd: Path = REPO,
             timeout: float = 900) -> subprocess.CompletedProcess:
    """Runs ``python -m pipeline.cli ARGS`` to the end; ``env`` is added to this process's."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *map(str, args)], capture_output=True,
                          text=True, env=full_env, cwd=cwd, timeout=timeout)


def cli_args(options: Mapping[str, object]) -> list[str]:
    """:func:`pipeline.resume` options as the command line spells them.

    ``{"epochs": 60, "quant_modes": ["float32", "int8"], "stress": True, "progress": False}`` →
    ``["--epochs", "60", "--quant", "float32", "--quant", "int8", "--stress", "--quiet"]``.
    ``cache_dir`` is left out: tests give the CLI its cache as ``EDGEPIPE_CACHE_DIR``.
    """
    args: list[str] = []
    for key, value in options.items():
        flag = _FLAGS.get(key, "--" + key.replace("_", "-"))
        if key == "cache_dir" or value is None:
            continue
        if key == "progress":
            args += [] if value else ["--quiet"]
        elif isinstance(value, bool):
            args += [flag] if value else ([f"--no-{key.replace('_', '-')}"] if key == "stress" else [])
        elif isinstance(value, (list, tuple)):
            for item in value:
                args += [flag, str(item)]
        elif isinstance(value, Mapping):
            for name, gate in value.items():
                args += [flag, f"{name}={gate}"]
        else:
            args += [flag, str(value)]
    return args


def kill_when_paused(args: list, env: Mapping[str, str], point: str, timeout: float = 240,
                     while_paused: Callable[[], None] | None = None) -> str:
    """Starts `edgepipe ARGS`, SIGKILLs it once it reports the pause point (after calling
    ``while_paused``, with the run still alive); returns its stderr.

    The pause comes from ``EDGEPIPE_TEST_PAUSE_AT`` (``pipeline/testhook.py``): the run logs
    ``test hook: paused at <point>`` and sleeps, so the kill lands there and nothing in the process
    gets to clean up.
    """
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *map(str, args)], cwd=REPO, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, **env, "EDGEPIPE_TEST_PAUSE_AT": point})
    watchdog = threading.Timer(timeout, proc.kill)
    watchdog.start()
    lines = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if line.strip() == f"test hook: paused at {point}":
                if while_paused is not None:
                    while_paused()
                os.kill(proc.pid, signal.SIGKILL)
                break
    finally:
        watchdog.cancel()
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, "".join(lines)[-3000:]
    assert any(f"paused at {point}" in ln for ln in lines), "".join(lines)[-3000:]
    return "".join(lines)

"""A test hook that stops a run at a named point, so a test can kill it there deterministically.

Never set in normal use. With ``EDGEPIPE_TEST_PAUSE_AT=<point>`` the process logs
``test hook: paused at <point>`` (logger ``edgepipe``, on the console) and sleeps until it is killed. Points:

  bottlenecks  after the first batch of bottlenecks is in the cache
  train        every bottleneck extracted, before the head is trained and written
  fine-tune    after the first epoch of fine-tuning, its state written (``pipeline.finetune.Progress``)
  quantize     after the first .tflite file is written

and with ``EDGEPIPE_TEST_CRASH_ON=<file name>`` a verify worker crashes on that model
(:func:`crash_point`).
"""
from __future__ import annotations

import os
import time

from pipeline.console import log

ENV = "EDGEPIPE_TEST_PAUSE_AT"


def pause_point(name: str) -> None:
    if os.environ.get(ENV) == name:
        log.info(f"test hook: paused at {name}")
        while True:
            time.sleep(60)


CRASH_ENV = "EDGEPIPE_TEST_CRASH_ON"


def crash_point(model: str) -> None:
    """With ``EDGEPIPE_TEST_CRASH_ON=<file name>``, a runtime worker aborts (SIGABRT, as a crashing
    native runtime would) when it is given that model."""
    name = os.environ.get(CRASH_ENV)
    if name and os.path.basename(model) == name:
        os.abort()


KILL_ENV = "EDGEPIPE_TEST_KILL_ONCE"


def kill_point(name: str) -> None:
    """With ``EDGEPIPE_TEST_KILL_ONCE=<point>:<marker file>``, the first process to reach ``point``
    creates the marker and kills itself (SIGKILL, as the OOM killer or a lost machine would); later
    ones, the retry's included, go on. Point: ``beam-extract``, after a Beam worker has written a
    batch of bottlenecks, mid-bundle."""
    setting = os.environ.get(KILL_ENV, "")
    point, _, marker = setting.partition(":")
    if point != name or not marker:
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.close(fd)
    os.kill(os.getpid(), 9)

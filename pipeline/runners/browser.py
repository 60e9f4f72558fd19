"""A TF.js bundle's demo page (``index.html``) in headless Chromium, driven through its own API.

The work happens in ``tfjs/browser_check.mjs`` (Playwright); this module checks that Chromium and
``playwright-core`` are there, runs it, and returns the page's probabilities in label order, so
they compare directly with the reference SavedModel's.
"""
from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.runners.base import RuntimeFailed, describe_exit
from pipeline.runners.tfjs_node import NODE_DIR, _node_executable, _tail

CHECK_SCRIPT = NODE_DIR / "browser_check.mjs"
# Debian's package: Playwright's own browser download needs a network CI does not have.
CHROMIUM = Path("/usr/bin/chromium")
SETUP_HINT = "run `make browser` (it installs Debian's chromium) and `make setup` (the npm packages)"


@dataclass(frozen=True)
class PageRun:
    """What the demo page said.

    Attributes:
        probabilities: float32 ``[N, C]`` from ``window.edgepipe.classify``, in ``labels`` order.
        labels: the page's labels (``model.json`` ``userDefinedMetadata.edgepipe.labels``).
        shown: what the page listed after the first image was chosen in its file picker, most
            probable first (``[{label, probability}]``); None without a screenshot.
        blocked_requests: URLs the page tried to fetch from anywhere but its own folder.
        page_errors: uncaught JavaScript errors.
    """

    probabilities: np.ndarray
    labels: list[str]
    backend: str
    tfjs: str
    browser: str
    shown: list[dict] | None
    blocked_requests: list[str]
    page_errors: list[str]


def ensure_browser(chromium: Path = CHROMIUM) -> None:
    """Checks for Node.js, ``playwright-core`` and Chromium.

    Raises:
        RuntimeFailed: one is missing; the message says how to install it.
    """
    _node_executable()
    missing = []
    if not (NODE_DIR / "node_modules" / "playwright-core" / "package.json").is_file():
        missing.append(f"playwright-core is not installed in {NODE_DIR / 'node_modules'}")
    if not Path(chromium).is_file():
        missing.append(f"Chromium not found at {chromium}")
    if missing:
        raise RuntimeFailed(f"{'; '.join(missing)}: {SETUP_HINT}")


def classify_in_page(
    bundle: Path, images: Sequence[Path], screenshot: Path | None = None, *,
    chromium: Path = CHROMIUM, backend: str | None = None, timeout_s: float = 120.0,
) -> PageRun:
    """Serves ``bundle`` on 127.0.0.1, opens its ``index.html`` and classifies ``images`` there.

    Args:
        bundle: a folder written by the tfjs stage (``model.json``, shards, ``index.html``, ``tf.min.js``).
        images: image files, decoded by the browser itself.
        screenshot: where to save a PNG of the page after it classified ``images[0]`` through its
            file picker.
        backend: a tfjs backend for the page (``cpu``, ``webgl``); None lets tfjs pick.
        timeout_s: wall-clock limit for the whole browser session.

    Raises:
        RuntimeFailed: a tool is missing, or the page or the browser failed or timed out.
    """
    ensure_browser(chromium)
    images = [Path(p) for p in images]
    argv = [_node_executable(), str(CHECK_SCRIPT), "--bundle", str(bundle), "--chromium", str(chromium),
            "--timeout-ms", str(int(timeout_s * 1000))]
    if screenshot is not None:
        argv += ["--screenshot", str(screenshot)]
    if backend is not None:
        argv += ["--backend", backend]
    argv += [str(p) for p in images]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s + 30)
    except subprocess.TimeoutExpired:
        raise RuntimeFailed(f"the demo page of {bundle} timed out after {timeout_s:g} s in Chromium") from None
    if done.returncode != 0:
        why = describe_exit(done.returncode)
        raise RuntimeFailed(f"the demo page of {bundle} failed in Chromium ({why}): {_tail(done.stderr)}")
    try:
        out = json.loads(done.stdout.strip().splitlines()[-1])
        labels = list(out["labels"])
        rows = []
        for image, result in zip(images, out["results"], strict=True):
            by_label = {t["label"]: float(t["probability"]) for t in result["top"]}
            rows.append([by_label[label] for label in labels])
    except (IndexError, ValueError, KeyError, TypeError) as err:
        raise RuntimeFailed(f"browser_check.mjs printed no usable result ({type(err).__name__}: {err}): "
                            f"{done.stdout[-300:]!r}") from None
    return PageRun(
        probabilities=np.array(rows, np.float32).reshape(len(images), len(labels)),
        labels=labels, backend=out["backend"], tfjs=out["tfjs"], browser=out["browser"],
        shown=out.get("shown"), blocked_requests=list(out.get("blocked_requests", [])),
        page_errors=list(out.get("page_errors", [])),
    )

"""The static demo page that every TF.js bundle carries (``index.html`` + ``tf.min.js``).

The page (``pipeline/web/index.html``) loads ``model.json`` from its own folder, reads the labels
and the preprocessing contract from ``userDefinedMetadata.edgepipe`` and classifies a picked image
with tfjs: decode, RGB, bilinear resize without antialias, float32 in 0..255. The tfjs library is
copied from the Node runner's pinned ``@tensorflow/tfjs``, so the page works offline.
``tests/test_browser.py`` drives it in headless Chromium (``pipeline/runners/browser.py``).
"""
from __future__ import annotations

import shutil
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.rundir import sha256_file

TEMPLATE = Path(__file__).parent / "index.html"
TFJS_LIBRARY = (Path(__file__).parent.parent / "runners" / "tfjs" / "node_modules" / "@tensorflow" / "tfjs"
                / "dist" / "tf.min.js")
# What the page adds to a bundle; the model's own size leaves them out.
PAGE_FILES = ("index.html", "tf.min.js")


def add_demo_page(bundle: Path) -> None:
    """Copies ``index.html`` and ``tf.min.js`` into ``bundle`` (next to ``model.json``).

    Raises:
        PipelineError: the tfjs npm package is not installed (``make setup`` installs it).
    """
    if not TFJS_LIBRARY.is_file():
        raise PipelineError(f"{TFJS_LIBRARY} is missing, needed for the TF.js demo page; run `make setup` "
                            "(or `npm ci --prefix pipeline/runners/tfjs`)")
    bundle = Path(bundle)
    shutil.copyfile(TEMPLATE, bundle / "index.html")
    shutil.copyfile(TFJS_LIBRARY, bundle / "tf.min.js")


def page_fingerprint() -> dict[str, str | None]:
    """Hashes of the page's files, so a changed page re-runs the tfjs stage."""
    return {name: sha256_file(path) if path.is_file() else None
            for name, path in zip(PAGE_FILES, (TEMPLATE, TFJS_LIBRARY))}

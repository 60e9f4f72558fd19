"""Headless Chromium for the tests of each TF.js bundle's demo page."""
from __future__ import annotations


def require_browser() -> None:
    """Fails the test, saying how to install it, where Chromium or the npm packages are missing.

    ``make test`` installs both; a skip would let an untested page look tested.
    """
    import pytest

    from pipeline.runners.base import RuntimeFailed
    from pipeline.runners.browser import ensure_browser

    try:
        ensure_browser()
    except RuntimeFailed as err:
        pytest.fail(str(err))

"""Shared fixtures: the tiny world and the session chain. The helpers they use live in
``tests/helpers/``."""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# tensorflowjs imports TF-DF, which imports IPython for a banner when stdout is not a tty.
os.environ.setdefault("TFDF_DISABLE_WELCOME_MESSAGE", "1")

import pytest

from tests.helpers.browser import require_browser
from tests.helpers.chain import SESSION_VARIANTS, Chain, build_chain, tree_state
from tests.helpers.world import build_tiny_graph, make_image_folders, tiny_graph_options


@pytest.fixture(scope="session")
def tiny_graph(tmp_path_factory) -> Path:
    return build_tiny_graph(tmp_path_factory.mktemp("graph") / "tiny_frozen.pb")


@pytest.fixture(scope="session")
def tiny_images(tmp_path_factory) -> Path:
    return make_image_folders(tmp_path_factory.mktemp("images") / "train")


@pytest.fixture(scope="session")
def tiny_holdout(tmp_path_factory) -> Path:
    return make_image_folders(tmp_path_factory.mktemp("holdout") / "test", per_class=6, seed=1)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "cache"
    monkeypatch.setenv("EDGEPIPE_CACHE_DIR", str(d))
    return d


@pytest.fixture(scope="session")
def session_chain(tiny_graph, tiny_images, tiny_holdout, tmp_path_factory) -> Chain:
    """The whole chain on the tiny world, every variant and runtime, built once in-process.

    Tests only read it; one that changes a run directory takes ``chain_copy``. That it stayed
    untouched is checked when the session ends.
    """
    root = tmp_path_factory.mktemp("session-chain")
    chain = build_chain(root / "run", root / "cache", images=tiny_images, test_images=tiny_holdout,
                        **tiny_graph_options(tiny_graph), **SESSION_VARIANTS)
    before = tree_state(chain.out)
    yield chain
    changed = sorted(set(before.items()) ^ set(tree_state(chain.out).items()))
    assert not changed, f"a test wrote into the shared session chain (use chain_copy): {changed[:5]}"


@pytest.fixture
def chain_copy(session_chain, tmp_path) -> Chain:
    """A private copy of the session chain, for a test that re-runs stages with other options."""
    return session_chain.copy(tmp_path / "run")


@pytest.fixture(scope="session")
def browser_ready() -> None:
    require_browser()

"""Shared pytest fixtures. Run the suite with `python -m pytest -q`."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory) -> Path:
    """DPO_DEMO_CACHE pointed at one session-wide temporary folder: demo: assets never go to ~/.cache,
    and are built once per session for the modules that use this fixture. Use it (not a folder of your
    own) for anything that loads configs/quickstart.yaml: its `demo:sft_model` costs about a minute of SFT
    to build, paid here once for the whole session."""
    cache = tmp_path_factory.getbasetemp() / "demo-cache"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DPO_DEMO_CACHE", str(cache))
        yield cache

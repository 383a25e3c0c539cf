"""Shared fixtures: the real-data root, and tiny configs that train in seconds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# The shared data beside the checkout (../shared/data) unless GENLAB_DATA says otherwise.
DATA_ROOT = Path(os.environ.get("GENLAB_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")



@pytest.fixture
def data_root() -> Path:
    if not DATA_ROOT.is_dir():
        pytest.skip(f"real data folder {DATA_ROOT} is absent (set GENLAB_DATA to ../shared/data)")
    return DATA_ROOT


@pytest.fixture(autouse=True)
def _one_thread():
    """Tests run tiny models: one torch thread is as fast there and immune to other processes on the cores
    (OpenMP threads spin-waiting for a busy core made small convolutions ~100x slower under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Keep decoded-data caches of the test run out of the user's ~/.cache."""
    if "GENLAB_CACHE" not in os.environ:
        monkeypatch.setenv("GENLAB_CACHE", str(tmp_path_factory.getbasetemp() / "genlab-cache"))

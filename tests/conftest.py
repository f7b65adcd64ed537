"""Shared fixtures: where ../shared lives, a deterministic torch setup for every test, one torch thread."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LATENTGEN_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The project's ../shared folder (golden tensors, checkpoint specs, CLIP vocabulary)."""
    assert SHARED.is_dir(), f"../shared not found at {SHARED}; set LATENTGEN_SHARED to its path"
    return SHARED


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module: tiny models gain nothing from a second one (on a shared 2-core
    machine its spinning costs far more than the work), and runs compared bitwise must convolve with
    the same thread count, which changes how a convolution sums."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

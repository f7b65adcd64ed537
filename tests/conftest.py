"""Shared fixtures: where ../shared lives, and a deterministic torch setup for every test."""

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

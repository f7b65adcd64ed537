"""Fixtures shared by the evaluation tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """A judge cache of the module's own: its first judge is trained, later ones come from the file."""
    return tmp_path_factory.mktemp("cache")

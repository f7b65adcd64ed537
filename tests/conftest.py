"""Shared fixtures: where ../shared lives, a deterministic torch setup for every test, one torch thread, and
throwaway packages pip-installed for a test module."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from latentgen import registry

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LATENTGEN_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The project's ../shared folder (golden tensors, checkpoint specs, CLIP vocabulary)."""
    assert SHARED.is_dir(), f"../shared not found at {SHARED}; set LATENTGEN_SHARED to its path"
    return SHARED


# The apps choose their thread count from the machine's load when nothing sets it (latentgen.threads); runs
# the tests compare bit for bit must not depend on the load, so the apps this suite starts keep torch's count.
os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))


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


def _pip(*args: str) -> subprocess.CompletedProcess:
    """pip in this interpreter's environment, without the plugin-blocking variables of the caller."""
    env = {k: v for k, v in os.environ.items() if k not in (registry.AUTOLOAD_ENV, registry.BLOCK_ENV)}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=300, env=env)


@contextlib.contextmanager
def installed_package(root: Path, distribution: str, files: dict[str, str], modules: tuple[str, ...] = ()):
    """Write a package ({relative path: text}) under `root`, pip-install it (non-editable) into this
    environment, and uninstall it on the way out, whatever happens; `modules` are forgotten then."""
    folder = root / distribution
    folder.mkdir(parents=True)
    for name, text in files.items():
        (folder / name).write_text(textwrap.dedent(text))
    try:
        result = _pip("install", "--no-deps", "--no-build-isolation", "--no-index", "-q", str(folder))
        assert result.returncode == 0, result.stdout + result.stderr
        registry.refresh()
        yield folder
    finally:
        result = _pip("uninstall", "-y", distribution)
        for module in modules:
            sys.modules.pop(module, None)
        registry.refresh()
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def pip_package():
    """`with pip_package(root, distribution, files, modules):` a throwaway package, pip-installed for the block."""
    return installed_package

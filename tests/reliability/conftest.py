"""Shared by the bad-input tests: running an app in this process, a smoke checkpoint, an existing run directory
to compare before and after, and tripwires that record any training step or weight read."""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smoke_checkpoint(tmp_path_factory) -> Path:
    from latentgen.config import compose
    from latentgen.pipeline import LatentDiffusionPipeline

    return LatentDiffusionPipeline.from_config(compose("train", ["experiment=smoke"])).save(
        tmp_path_factory.mktemp("checkpoint") / "smoke.safetensors")


@pytest.fixture
def run_app(monkeypatch):
    """run_app(app, args) -> (exit status, stderr lines that are not blank): latentgen-<app> in this process."""
    def run(app: str, args: list[str]) -> tuple[int, list[str]]:
        from latentgen.cli import eval as eval_app
        from latentgen.cli import sample, train

        main = {"train": train.main, "sample": sample.main, "eval": eval_app.main}[app]
        monkeypatch.setattr(sys, "argv", [f"latentgen-{app}", *args])
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            try:
                main()
                status = 0
            except SystemExit as exc:
                status = exc.code
        return status, [line for line in stderr.getvalue().splitlines() if line.strip()]

    return run


@pytest.fixture
def tripwires(monkeypatch):
    """Records every training step run and every weight read (the names of what was called)."""
    import safetensors.torch

    from latentgen.formats import native
    from latentgen.interop.weights_file import WeightsFile
    from latentgen.training import run

    called: list[str] = []

    def recording(name, function):
        def wrapper(*args, **kwargs):
            called.append(name)
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(run, "run_steps", recording("training steps", run.run_steps))
    monkeypatch.setattr(native, "load_tensors", recording("weights read", native.load_tensors))
    monkeypatch.setattr(WeightsFile, "tensor", recording("weights read", WeightsFile.tensor))
    monkeypatch.setattr(safetensors.torch, "load_file", recording("weights read", safetensors.torch.load_file))
    return called

"""The console scripts end to end: latentgen-train on the smoke experiment, then latentgen-sample."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from latentgen.pipeline import LatentDiffusionPipeline

pytestmark = pytest.mark.slow  # starts the apps, torchrun or pip in subprocesses

BIN = Path(sys.executable).parent


def run(script, *args, cwd):
    return subprocess.run([str(BIN / script), *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One smoke training run shared by the tests below."""
    run_dir = tmp_path_factory.mktemp("train")
    result = run("latentgen-train", "experiment=smoke", f"hydra.run.dir={run_dir}", cwd=run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_training_writes_checkpoint_grids_and_logs(trained):
    checkpoint = trained / "checkpoints" / "last.safetensors"
    pipe = LatentDiffusionPipeline.from_checkpoint(checkpoint)
    assert pipe.codec.scale_factor != 1.0  # estimated from the latents after stage 1
    for grid in ("stage1_reconstructions.png", "stage2_samples.png"):
        assert Image.open(trained / "samples" / grid).size[0] > 16
    rows = list(csv.DictReader(open(trained / "metrics.csv")))
    stages = {row["stage"] for row in rows}
    assert stages == {"stage 1: codec", "stage 2: denoiser"} and all(float(row["loss"]) >= 0 for row in rows)
    summary = json.loads((trained / "summary.json").read_text())
    assert len(summary["denoiser"]["grid_captions"]) == 4
    assert not [p for p in (trained / "checkpoints").iterdir() if p.name != "last.safetensors"]  # no temp files


def test_sampling_from_the_trained_checkpoint(trained, tmp_path):
    checkpoint = trained / "checkpoints" / "last.safetensors"
    args = [f"checkpoint={checkpoint}", "prompt=[a red circle,a blue star]", "num_images=2", "steps=3", "seed=5"]
    first = run("latentgen-sample", *args, "scheduler=ddpm", f"hydra.run.dir={tmp_path / 'a'}", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    again = run("latentgen-sample", *args, "scheduler=ddpm", f"hydra.run.dir={tmp_path / 'b'}", cwd=tmp_path)
    images = sorted((tmp_path / "a" / "images").iterdir())
    assert len(images) == 4 and Image.open(tmp_path / "a" / "grid.png").size[0] > 32
    assert [p.read_bytes() for p in images] == [p.read_bytes() for p in sorted((tmp_path / "b" / "images").iterdir())]
    assert json.loads((tmp_path / "a" / "sample.json").read_text())["scheduler"] == "ddpm"
    assert again.returncode == 0


@pytest.mark.parametrize("args, message", [
    (["checkpoint=/nonexistent/last.safetensors", "prompt=x"], "does not exist"),
    (["label=3"], "a label was given"),
    (["prompt=x", "height=15"], "multiple of"),
    (["prompt=x", "scheduler=no_such_sampler"], "Could not find 'scheduler/no_such_sampler'"),
])
def test_sampling_errors_are_one_clear_message(trained, tmp_path, args, message):
    if not any(a.startswith("checkpoint=") for a in args):
        args = [f"checkpoint={trained / 'checkpoints' / 'last.safetensors'}", *args]
    result = run("latentgen-sample", *args, f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert result.returncode != 0 and message in result.stderr
    assert "Traceback" not in result.stderr


def test_a_diverging_run_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    result = run("latentgen-train", "experiment=smoke", "train.denoiser.lr=1e30", "train.denoiser.grad_clip=0",
                 f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 1 and "the loss became" in result.stderr
    pipe = LatentDiffusionPipeline.from_checkpoint(tmp_path / "checkpoints" / "last.safetensors")  # stage 1's, intact
    assert len(pipe("a red circle", steps=1, seed=0)) == 1


def test_training_refuses_an_unknown_option_with_the_alternatives(tmp_path):
    result = run("latentgen-train", "experiment=smoke", "codec=vae9000", f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert result.returncode != 0 and "Could not find 'codec/vae9000'" in result.stderr and "kl_tiny" in result.stderr


def test_pixel_space_class_conditional_training(tmp_path):
    """Another combination through the same code: identity codec (no stage 1), class labels."""
    result = run("latentgen-train", "experiment=smoke", "codec=identity", "conditioner=class_label",
                 "train.codec.steps=0", f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert "codec" not in summary and summary["denoiser"]["grid_captions"]


def test_a_killed_run_leaves_a_loadable_checkpoint(tmp_path):
    """SIGKILL at an arbitrary moment of stage 2, while checkpoints are rewritten every 2 steps."""
    import signal
    import time

    from latentgen.checkpoint import read_metadata

    process = subprocess.Popen([str(BIN / "latentgen-train"), "experiment=smoke", "train.denoiser.steps=100000",
                                "train.checkpoint_every=2", f"hydra.run.dir={tmp_path}"], cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / "checkpoints" / "last.safetensors"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if checkpoint.exists() and read_metadata(checkpoint).get("latentgen.stage") == "denoiser":
                break
            time.sleep(0.2)
        time.sleep(0.5)  # well into the rewriting
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    metadata = read_metadata(checkpoint)
    assert metadata["latentgen.stage"] == "denoiser" and int(metadata["latentgen.step"]) >= 2
    assert len(LatentDiffusionPipeline.from_checkpoint(checkpoint)("a red circle", steps=1, seed=0)) == 1

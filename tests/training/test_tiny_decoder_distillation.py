"""Distilling a tiny TAESD decoder from a trained codec (latentgen/training/distill_decoder.py): the student
comes to decode the codec's latents as its full decoder does, and `latentgen-train experiment=tiny_decoder`
writes a file the tiny_decoder adapter reads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from latentgen import LatentDiffusionPipeline, registry
from latentgen.assembly import build_component
from latentgen.config import compose
from latentgen.training.distill_decoder import compare, distill, student_for


def test_the_student_learns_the_full_decoders_images(one_torch_thread):
    torch.manual_seed(0)
    teacher = build_component("codec", {"name": "kl", "latent_channels": 4, "channels": 32, "channel_mult": [1, 1],
                                        "num_res_blocks": 1}).eval()
    dataset = build_component("dataset", {"name": "shapes", "image_size": 16, "size": 64, "seed": 0})
    images = torch.stack([dataset[i]["image"] for i in range(16)])
    untrained = compare(teacher, student_for(teacher, channels=16).eval(), images, repeats=1)
    losses = []
    student = distill(teacher, dataset, {"steps": 150, "batch_size": 16, "lr": 3e-3, "channels": 16},
                      torch.device("cpu"), torch.Generator().manual_seed(0),
                      on_step=lambda step, values, lr: losses.append(values["loss"]))
    trained = compare(teacher, student, images, repeats=1)
    assert trained["psnr_tiny_vs_full_db"] > untrained["psnr_tiny_vs_full_db"] + 6
    assert sum(losses[-10:]) < 0.3 * sum(losses[:10])
    assert set(trained) >= {"full_decode_seconds", "tiny_decode_seconds", "psnr_full_vs_images_db"}


@pytest.mark.slow
def test_latentgen_train_distils_a_decoder_the_adapter_reads(tmp_path):
    base = LatentDiffusionPipeline.from_config(compose("train", ["experiment=smoke"])).save(tmp_path / "base.safetensors")
    run = tmp_path / "run"
    result = subprocess.run([str(Path(sys.executable).parent / "latentgen-train"), "experiment=tiny_decoder",
                             f"base={base}", "dataset=shapes_tiny", "train.tiny_decoder.steps=6",
                             "train.tiny_decoder.batch_size=4", "train.tiny_decoder.channels=8",
                             "train.tiny_decoder.compare_images=4", f"hydra.run.dir={run}"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["tiny_decoder"]["images"] == 4 and "psnr_tiny_vs_full_db" in summary["tiny_decoder"]
    pipe = LatentDiffusionPipeline.from_checkpoint(base)
    pipe.attach(registry.build("adapter", "tiny_decoder", path=str(run / "checkpoints" / "tiny_decoder.safetensors")))
    assert pipe("a red circle", steps=1, seed=0)[0].size == (16, 16)
    again = subprocess.run([str(Path(sys.executable).parent / "latentgen-train"), "experiment=tiny_decoder",
                            f"base={base}", "resume=true", f"hydra.run.dir={run}"], capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 1 and "nothing to resume" in again.stderr  # it keeps no training state

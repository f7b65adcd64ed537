"""A whole training run from a composed config: stage 1 (codec), stage 2 (denoiser), checkpoints, grids."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from latentgen.devices import resolve_device
from latentgen.pipeline import LatentDiffusionPipeline, build_component
from latentgen.training.codec_stage import estimate_scale_factor, train_codec
from latentgen.training.data import LatentCache
from latentgen.training.denoiser_stage import train_denoiser
from latentgen.training.previews import reconstruction_grid, sample_grid

CHECKPOINT_NAME = "last.safetensors"


def run_training(cfg: Any, run_dir: Path) -> Path:
    """Train both stages as `cfg` says, writing into `run_dir`; returns the final checkpoint's path."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    train = cfg["train"]
    device = resolve_device(cfg.get("device"))
    torch.manual_seed(int(cfg["seed"]))
    generator = torch.Generator().manual_seed(int(cfg["seed"]))
    dataset = build_component("dataset", cfg["dataset"])
    pipe = LatentDiffusionPipeline.from_config(cfg).to(device)
    checkpoint_path = run_dir / "checkpoints" / CHECKPOINT_NAME
    summary: dict[str, Any] = {"device": str(device), "checkpoint": str(checkpoint_path)}

    def save(p: LatentDiffusionPipeline, stage: str, step: int) -> None:
        p.save(checkpoint_path, metadata={"latentgen.stage": stage, "latentgen.step": str(step)})

    codec_settings = train["codec"]
    if any(p.requires_grad for p in pipe.codec.parameters()) and int(codec_settings["steps"]) > 0:
        start = time.perf_counter()
        history = train_codec(pipe.codec, dataset, codec_settings, device, generator, run_dir, train["log_every"])
        if codec_settings.get("scale_by_std", True):
            scale = estimate_scale_factor(pipe.codec, dataset, device)
            pipe.codec.scale_factor = scale
            pipe.codec.build_params["scale_factor"] = scale  # what the checkpoint's config records
        save(pipe, "codec", int(codec_settings["steps"]))
        grid_path = reconstruction_grid(pipe.codec, dataset, int(train["grid_size"]), run_dir / "samples" / "stage1_reconstructions.png")
        summary["codec"] = {"seconds": round(time.perf_counter() - start, 1), "final_loss": history[-1][1],
                            "scale_factor": pipe.codec.scale_factor, "grid": str(grid_path)}
    pipe.codec.eval().requires_grad_(False)

    start = time.perf_counter()
    cache = LatentCache.encode(pipe.codec, dataset, tuple(pipe.conditioner.input_keys), device)
    denoiser_settings = train["denoiser"]
    trained, history = train_denoiser(pipe, cache, denoiser_settings, generator, run_dir, train["log_every"],
                                      checkpoint=lambda p, step: save(p, "denoiser", step),
                                      checkpoint_every=int(train["checkpoint_every"]))
    save(trained, "denoiser", int(denoiser_settings["steps"]))
    train_seconds = time.perf_counter() - start
    grid_path, captions = sample_grid(trained, dataset, int(train["grid_size"]), int(cfg["seed"]),
                                      run_dir / "samples" / "stage2_samples.png")
    summary["denoiser"] = {"seconds": round(train_seconds, 1), "final_loss": history[-1][1], "grid": str(grid_path),
                           "grid_captions": captions}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return checkpoint_path

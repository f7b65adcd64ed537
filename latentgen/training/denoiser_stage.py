"""Stage 2: fit the denoiser (and any trainable conditioner) on the frozen codec's latents (Ho et al. 2020, Alg. 1)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F

from latentgen.pipeline import LatentDiffusionPipeline
from latentgen.training.data import LatentCache
from latentgen.training.ema import EMA
from latentgen.training.lr_schedule import warmup_cosine
from latentgen.training.progress import StageLog


def denoiser_loss(pipe: LatentDiffusionPipeline, latents: torch.Tensor, inputs: Mapping[str, Any],
                  generator: torch.Generator) -> torch.Tensor:
    """MSE between the network output and its target for x = x0 + sigma * noise, sigma from a
    uniformly drawn training timestep; the target (eps, v or x0) follows the prediction type."""
    batch_size = latents.shape[0]
    sigma = pipe.model.sample_training_sigmas(batch_size, generator).to(latents.device)
    noise = torch.randn(latents.shape, generator=generator).to(latents.device)
    x = latents + noise * sigma.view(-1, 1, 1, 1).to(latents.dtype)
    cond = pipe.conditioner.for_training(inputs, generator)
    output, _, _ = pipe.model.network_output(x, sigma, cond)
    return F.mse_loss(output.float(), pipe.model.training_target(latents, x, sigma).float())


def train_denoiser(pipe: LatentDiffusionPipeline, cache: LatentCache, settings: Mapping[str, Any],
                   generator: torch.Generator, run_dir: Path, log_every: int,
                   checkpoint: Callable[[LatentDiffusionPipeline, int], None] | None = None,
                   checkpoint_every: int = 0) -> tuple[LatentDiffusionPipeline, list[tuple[int, float]]]:
    """Train; returns the pipeline with averaged (EMA) weights, the one to sample from and save."""
    steps, batch_size = int(settings["steps"]), int(settings["batch_size"])
    if len(cache) < batch_size:
        raise ValueError(f"the dataset has {len(cache)} items, fewer than train.denoiser.batch_size {batch_size}")
    trainable = [module for module in (pipe.denoiser, pipe.conditioner) if any(True for _ in module.parameters())]
    parameters = [p for module in trainable for p in module.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=float(settings["lr"]), weight_decay=float(settings["weight_decay"]))
    decay = float(settings["ema_decay"])
    averages = {id(module): EMA(module, decay) for module in trainable} if decay > 0 else {}
    device = pipe.device
    log = StageLog("stage 2: denoiser", steps, run_dir, log_every)
    for module in trainable:
        module.train()
    for step in range(1, steps + 1):
        lr = float(settings["lr"]) * warmup_cosine(step - 1, steps, int(settings["warmup_steps"]))
        for group in optimizer.param_groups:
            group["lr"] = lr
        indices = torch.randint(0, len(cache), (batch_size,), generator=generator)
        latents, inputs = cache.batch(indices)
        loss = denoiser_loss(pipe, latents.to(device), inputs, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if settings.get("grad_clip"):
            torch.nn.utils.clip_grad_norm_(parameters, float(settings["grad_clip"]))
        optimizer.step()
        for module in trainable:
            if id(module) in averages:
                averages[id(module)].update(module)
        log.step(step, {"loss": loss.item()}, lr)
        if checkpoint is not None and checkpoint_every and step % checkpoint_every == 0 and step < steps:
            checkpoint(_averaged(pipe, averages), step)
    log.close()
    return _averaged(pipe, averages).eval(), log.history


def _averaged(pipe: LatentDiffusionPipeline, averages: Mapping[int, EMA]) -> LatentDiffusionPipeline:
    """The same pipeline with each trained module replaced by its moving average."""
    swap = lambda module: averages[id(module)].average if id(module) in averages else module  # noqa: E731
    return LatentDiffusionPipeline(pipe.codec, swap(pipe.denoiser), swap(pipe.conditioner), pipe.scheduler,
                                   pipe.diffusion, pipe.sampling)

"""Stage 1: fit the codec to reconstruct images (Rombach et al. 2022, Sec. 3.1), then fix its latent scale."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from latentgen.contracts import Codec
from latentgen.training.data import epochs
from latentgen.training.lr_schedule import warmup_cosine
from latentgen.training.progress import StageLog


def train_codec(codec: Codec, dataset: Dataset, settings: Mapping[str, Any], device: torch.device,
                generator: torch.Generator, run_dir: Path, log_every: int) -> list[tuple[int, float]]:
    """Minimize l1 * |x - x'| + l2 * (x - x')^2 + sum of weight * regularizer (e.g. KL) over the
    codec's own regularization terms. Returns the logged (step, loss) history."""
    steps = int(settings["steps"])
    weights = {name[: -len("_weight")]: float(value) for name, value in settings.items() if name.endswith("_weight")}
    optimizer = torch.optim.Adam(codec.parameters(), lr=float(settings["lr"]), betas=(0.5, 0.9))
    batches = epochs(dataset, int(settings["batch_size"]), generator)
    log = StageLog("stage 1: codec", steps, run_dir, log_every)
    codec.train()
    for step in range(1, steps + 1):
        images = next(batches)["image"].to(device)
        lr = float(settings["lr"]) * warmup_cosine(step - 1, steps, min(100, steps // 10))
        for group in optimizer.param_groups:
            group["lr"] = lr
        reconstruction, regularizers = codec.autoencode(images, generator=_device_generator(generator, device))
        losses = {"l1": F.l1_loss(reconstruction, images), "l2": F.mse_loss(reconstruction, images), **regularizers}
        unweighted = set(losses) - set(weights)
        if unweighted:
            raise KeyError(f"codec '{codec.name}' reports the loss term(s) {sorted(unweighted)}; set "
                           f"train.codec.<term>_weight for each")
        loss = sum(weights[name] * value for name, value in losses.items())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        log.step(step, {"loss": loss.item(), **{k: v.item() for k, v in losses.items()}}, lr)
    log.close()
    codec.eval()
    return log.history


def _device_generator(generator: torch.Generator, device: torch.device) -> torch.Generator:
    """A generator on `device` seeded from the CPU one (posterior samples are drawn on the device)."""
    if device.type == "cpu":
        return generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return torch.Generator(device).manual_seed(seed)


@torch.no_grad()
def estimate_scale_factor(codec: Codec, dataset: Dataset, device: torch.device, max_items: int = 2048) -> float:
    """1 / std of the unscaled latents, so the diffusion sees unit-variance data (LDM's scale_by_std)."""
    previous = codec.scale_factor
    codec.scale_factor = 1.0
    latents = []
    seen = 0
    for batch in DataLoader(dataset, batch_size=256, shuffle=False):
        latents.append(codec.encode(batch["image"].to(device)).float())
        seen += latents[-1].shape[0]
        if seen >= max_items:
            break
    codec.scale_factor = previous
    std = torch.cat(latents).std().item()
    if not std > 0:
        raise ValueError(f"codec '{codec.name}' produced constant latents; cannot estimate its scale_factor")
    return 1.0 / std

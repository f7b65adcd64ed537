"""Distilling a tiny TAESD decoder from a trained codec: the student learns to turn the codec's own latents (what
the denoiser samples) into what the codec's full decoder makes of them, on the images the codec was trained on.

`latentgen-train experiment=tiny_decoder base=<checkpoint>` runs it (latentgen/training/run.py) and writes
`checkpoints/tiny_decoder.safetensors` in the published taesd_decoder layout, which the `tiny_decoder` adapter
reads; the run's summary holds the student's PSNR against the full decoder and both decode times.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from latentgen.codecs.taesd import TinyAutoencoder
from latentgen.contracts import Codec
from latentgen.training.data import DatasetBatches
from latentgen.training.lr_schedule import warmup_cosine


def student_for(teacher: Codec, channels: int = 64) -> TinyAutoencoder:
    factor = teacher.downsampling_factor
    if factor < 2 or 2 ** round(math.log2(factor)) != factor:
        raise ValueError(f"train.tiny_decoder: codec '{teacher.name}' downsamples by {factor}; a TAESD decoder "
                         f"upsamples by a power of two")
    return TinyAutoencoder(latent_channels=teacher.latent_channels, channels=channels,
                           downsamplings=round(math.log2(factor)))


@torch.no_grad()
def teacher_pairs(teacher: Codec, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents the denoiser sees, the full decoder's images of them)."""
    latents = teacher.encode(images)
    return latents, teacher.decode(latents).clamp(-1, 1)


def distill(teacher: Codec, dataset: Any, settings: Mapping[str, Any], device: torch.device,
            generator: torch.Generator, on_step: Any = None) -> TinyAutoencoder:
    """Train a student decoder on `settings` (steps, batch_size, lr, channels): L1 + L2 to the teacher's
    decoded images, Adam with warm-up and cosine decay. `on_step(step, {"loss": ...}, lr)` after each step."""
    teacher = teacher.to(device).eval().requires_grad_(False)
    student = student_for(teacher, int(settings.get("channels", 64))).to(device).train()
    decoder = student.decoder
    steps, lr = int(settings["steps"]), float(settings["lr"])
    optimizer = torch.optim.Adam(decoder.parameters(), lr=lr)
    batches = DatasetBatches(dataset, int(settings["batch_size"]), generator, what="train.tiny_decoder.batch_size")
    for step in range(1, steps + 1):
        rate = lr * warmup_cosine(step - 1, steps, min(100, steps // 10))
        for group in optimizer.param_groups:
            group["lr"] = rate
        latents, target = teacher_pairs(teacher, next(batches)["image"].to(device))
        output = student.decode(latents)
        loss = F.l1_loss(output, target) + F.mse_loss(output, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if on_step is not None:
            on_step(step, {"loss": loss.item()}, rate)
    return student.eval()


@torch.no_grad()
def compare(teacher: Codec, student: TinyAutoencoder, images: torch.Tensor, repeats: int = 3) -> dict[str, float]:
    """The student's PSNR (dB) against the full decoder and both against the images, and each decoder's
    seconds for the batch (median of `repeats`)."""
    from latentgen.evaluation.image_quality import psnr

    latents, full = teacher_pairs(teacher, images)
    tiny = student.decode(latents).clamp(-1, 1)

    def unit(x: torch.Tensor) -> torch.Tensor:
        return ((x + 1) / 2).cpu()

    def seconds(decode: Any) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            decode(latents)
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2]

    return {"images": int(images.shape[0]),
            "psnr_tiny_vs_full_db": float(psnr(unit(tiny), unit(full)).mean()),
            "psnr_full_vs_images_db": float(psnr(unit(full), unit(images)).mean()),
            "psnr_tiny_vs_images_db": float(psnr(unit(tiny), unit(images)).mean()),
            "full_decode_seconds": seconds(teacher.decode), "tiny_decode_seconds": seconds(student.decode)}


def save_decoder(student: TinyAutoencoder, path: Path, metadata: Mapping[str, Any]) -> Path:
    """The student's decoder in the published taesd_decoder layout (keys `1.weight`, `3.conv.0.weight`, ...)."""
    from latentgen.checkpoint import save_tensors

    return save_tensors(path, student.decoder.state_dict(), dict(metadata))

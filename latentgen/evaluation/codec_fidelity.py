"""How faithfully a checkpoint's codec reconstructs images: PSNR and SSIM of decode(encode(x)).

Two image sets: held-out images of the model's own dataset (its test split), and the colour
photographs that ship inside scikit-image (`skimage.data`; no download), centre-cropped to a square
and resized with a Lanczos filter to `natural_size`, far outside what a codec trained on a toy
dataset has seen. Encoding is deterministic (a KL codec's posterior mean); reconstructions are
clipped to [-1, 1] and compared in [0, 1] without quantization to 8 bits.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from latentgen.contracts import Codec
from latentgen.evaluation.image_quality import psnr, ssim, to_unit_range

# Colour photographs bundled in scikit-image's wheel (others there are gray, synthetic or downloaded).
NATURAL_IMAGES: tuple[str, ...] = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry",
                                   "hubble_deep_field")


def natural_images(size: int) -> tuple[torch.Tensor, list[str]]:
    """The scikit-image photographs as (N, 3, size, size) in [-1, 1], and their names."""
    try:
        from skimage import data
    except ImportError as exc:
        raise ImportError("the codec evaluation reads scikit-image's sample photographs: "
                          "pip install 'latentgen[eval]'") from exc
    pictures = []
    for name in NATURAL_IMAGES:
        pixels = np.asarray(getattr(data, name)())[..., :3]  # (H, W, 3) uint8
        height, width = pixels.shape[:2]
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        square = Image.fromarray(pixels[top:top + side, left:left + side])
        pictures.append(np.asarray(square.resize((size, size), Image.Resampling.LANCZOS), dtype=np.float32))
    return torch.from_numpy(np.stack(pictures)).permute(0, 3, 1, 2) / 127.5 - 1, list(NATURAL_IMAGES)


@torch.no_grad()
def reconstruct(codec: Codec, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """decode(encode(images)) for images (N, 3, H, W) in [-1, 1], clipped to [-1, 1], on the CPU."""
    codec.latent_size(images.shape[-2], images.shape[-1])  # refuses a size the codec cannot tile
    parameter = next(codec.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None else torch.float32
    chunks = [codec.decode(codec.encode(images[i:i + batch_size].to(device, dtype))).float().clamp(-1, 1).cpu()
              for i in range(0, len(images), batch_size)]
    return torch.cat(chunks)


def fidelity(originals: torch.Tensor, reconstructions: torch.Tensor) -> dict[str, Any]:
    """Mean PSNR (dB) and SSIM, and the per-image values, of reconstructions against originals (both in [-1, 1])."""
    a, b = to_unit_range(originals), to_unit_range(reconstructions)
    per_psnr, per_ssim = psnr(a, b), ssim(a, b)
    return {"num_images": len(a), "psnr": float(per_psnr.mean()), "ssim": float(per_ssim.mean()),
            "psnr_per_image": [round(float(v), 3) for v in per_psnr],
            "ssim_per_image": [round(float(v), 5) for v in per_ssim]}

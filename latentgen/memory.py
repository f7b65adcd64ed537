"""Whether a generation request or a training batch can fit in memory, answered before it allocates anything.

The estimate is a lower bound: only tensors that must exist at once are counted (the latents the sampler
keeps, the guided batch, the decoder's last activation and output, the images returned). A request whose
lower bound exceeds the memory available would fail anyway, minutes later and with a MemoryError
traceback; refusing it up front says how much it needs instead. Requests that fit are never refused.
"""

from __future__ import annotations

from pathlib import Path

import torch

from latentgen.errors import InsufficientMemoryError

GIB = 2**30
LATENT_COPIES = 8  # noise, x, the denoised estimate, the solver's history and the guided batch's two halves


def available_bytes(device: torch.device) -> int | None:
    """Free memory on `device` (CPU: the kernel's MemAvailable, within a cgroup limit if one is set); None
    where it cannot be known."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        free = int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
    try:  # a container's limit (cgroup v2) may be lower than the machine's memory
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit != "max":
            free = min(free, int(limit) - used)
    except (OSError, ValueError):
        pass
    return free


def sampling_bytes(codec: torch.nn.Module, denoiser: torch.nn.Module, latent_channels: int, batch: int,
                   latent_size: tuple[int, int], height: int, width: int, guided: bool) -> int:
    """A lower bound of the memory sampling and decoding `batch` images of height x width needs."""
    itemsize = next(denoiser.parameters(), torch.empty(0)).element_size()
    latent_pixels = latent_size[0] * latent_size[1]
    pixels = height * width
    # The denoiser's first layer widens each latent pixel (or patch) to its model width, and a guided step
    # runs it on two copies; its input and output coexist at least.
    features = (2 if guided else 1) * 2 * _first_layer_width(denoiser) * latent_pixels
    # The decoder's final convolution reads this many channels at full size (its input and the norm's).
    decoded = 2 * _last_conv_inputs(codec) * pixels
    per_image = itemsize * (LATENT_COPIES * latent_channels * latent_pixels + features + decoded) \
        + 4 * 3 * pixels * 2 + 3 * pixels  # the float images, clamped, and the 8-bit ones returned
    return batch * per_image


def training_bytes(codec: torch.nn.Module, denoiser: torch.nn.Module, stage: str, micro_batch: int,
                   image_size: int, latent_size: tuple[int, int]) -> int:
    """A lower bound of the memory one training micro-batch of `stage` ("codec" or "denoiser") needs: what
    backpropagation must keep of the widest layers (their activations and gradients)."""
    itemsize = 4  # trained weights and their activations are float32 (autocast halves only some)
    pixels, latent_pixels = image_size * image_size, latent_size[0] * latent_size[1]
    if stage == "codec":
        per_item = itemsize * 2 * (3 * pixels + _last_conv_inputs(codec) * pixels)
    else:
        latent = codec.latent_channels * latent_pixels
        per_item = itemsize * (LATENT_COPIES * latent + 2 * 2 * _first_layer_width(denoiser) * latent_pixels)
    return micro_batch * per_item


SAMPLING_FIX = "ask for fewer images at a time (num_images, fewer prompts) or a smaller size"


def check_fits(needed: int, device: torch.device, request: str, fix: str = SAMPLING_FIX) -> None:
    """Refuse a request whose lower bound of memory exceeds what `device` has free, saying both figures."""
    free = available_bytes(device)
    if free is not None and needed > free:
        raise InsufficientMemoryError(
            f"{request} needs at least {needed / GIB:.1f} GiB of memory on {device} (a lower bound), but "
            f"{free / GIB:.1f} GiB is available; {fix}")


def _first_layer_width(denoiser: torch.nn.Module) -> int:
    """Output channels per latent pixel of the denoiser's first convolution (divided by a patch's pixels)."""
    first = next((module for module in denoiser.modules() if isinstance(module, torch.nn.Conv2d)), None)
    if first is None:
        return 1
    stride = first.stride[0] * first.stride[1]
    return max(1, first.out_channels // stride)


def _last_conv_inputs(codec: torch.nn.Module) -> int:
    """The input channels of the convolution that makes the RGB image (3 when the codec has none)."""
    to_rgb = [module.in_channels for module in codec.modules()
              if isinstance(module, torch.nn.Conv2d) and module.out_channels == 3]
    return max(to_rgb, default=3)

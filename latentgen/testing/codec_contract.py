"""The contract every codec must honour, as a function a plugin author calls in a test."""

from __future__ import annotations

import copy
import math
from typing import Callable

import torch

from latentgen.contracts import Codec
from latentgen.testing.shared_rules import Subject, check_rebuilds, close, describe_difference, same

# bfloat16 keeps 8 bits of mantissa; a few layers of a small network stay within this of float32.
BFLOAT16_RELATIVE_ERROR = 0.1


def example_images(codec: Codec, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """Images (batch, 3, H, W) in [-1, 1], H = W the smallest multiple of the downsampling factor >= 8
    (and at least 2 latent pixels)."""
    factor = int(codec.downsampling_factor)
    size = factor * max(2, math.ceil(8 / factor))
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, codec.image_channels, size, size, generator=generator) * 2 - 1


def _declared(codec: Codec) -> tuple:
    return codec.latent_channels, codec.downsampling_factor, codec.scale_factor


def check_codec(codec: Codec | Callable[[], Codec]) -> list[str]:
    """Raise AssertionError, naming the codec and the broken rule, unless it:

    declares positive integer `latent_channels` and `downsampling_factor` and a positive `scale_factor`;
    encodes (B, 3, H, W) to (B, latent_channels, H/f, W/f) and decodes back to (B, 3, H, W), in float32
    and bfloat16 (close to float32), finite; encodes deterministically without a generator and
    reproducibly with a seeded one, whatever the global RNG; applies `scale_factor` in `encode` and undoes
    it in `decode`; refuses images and latents of the wrong shape with a ValueError naming itself;
    returns (reconstruction, {name: scalar}) from `autoencode`; survives a safetensors state-dict round
    trip and, if built by the registry, rebuilds identically through the registry and its Hydra option.

    `codec` is an instance (copied, never changed) or a factory of fresh instances. Returns the rules
    checked.
    """
    subject = Subject("codec", codec)
    first = subject.first
    checked: list[str] = []

    rule = "declared capabilities"
    for attribute in ("latent_channels", "downsampling_factor"):
        value = getattr(first, attribute, None)
        subject.require(isinstance(value, int) and not isinstance(value, bool) and value > 0, rule,
                        f"`{attribute}` must be a positive int; got {value!r}")
    scale = getattr(first, "scale_factor", None)
    subject.require(isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale > 0, rule,
                    f"`scale_factor` must be a positive number; got {scale!r}")
    checked.append(rule)

    images = example_images(first)
    batch, _, height, width = images.shape
    factor, channels = first.downsampling_factor, first.latent_channels
    expected_latents = (batch, channels, height // factor, width // factor)

    rule = "shapes"
    with torch.no_grad():
        latents = subject.run(rule, lambda: first.encode(images))
        subject.require(tuple(latents.shape) == expected_latents, rule,
                        f"encode({tuple(images.shape)}) gives {tuple(latents.shape)}, declared {expected_latents}")
        decoded = subject.run(rule, lambda: first.decode(latents))
        subject.require(tuple(decoded.shape) == tuple(images.shape), rule,
                        f"decode({tuple(latents.shape)}) gives {tuple(decoded.shape)}, expected {tuple(images.shape)}")
        wider = torch.zeros(1, channels, height // factor, 2 * width // factor)
        subject.require(tuple(subject.run(rule, lambda: first.decode(wider)).shape) == (1, 3, height, 2 * width), rule,
                        "decode does not follow the latent size (other sizes than the one encoded)")
        recon, losses = subject.run(rule, lambda: first.autoencode(images))
        subject.require(tuple(recon.shape) == tuple(images.shape), rule,
                        f"autoencode gives a reconstruction of shape {tuple(recon.shape)}")
        subject.require(isinstance(losses, dict) and all(torch.is_tensor(v) and v.ndim == 0 for v in losses.values()),
                        rule, f"autoencode's losses must be a dict of scalar tensors; got {losses!r}")
    checked.append(rule)

    rule = "dtype float32"
    subject.require(latents.dtype == torch.float32 and decoded.dtype == torch.float32, rule,
                    f"float32 images give {latents.dtype} latents and {decoded.dtype} images")
    subject.require(bool(torch.isfinite(latents).all() and torch.isfinite(decoded).all()), rule, "non-finite output")
    checked.append(rule)

    rule = "dtype bfloat16"
    low = copy.deepcopy(first).to(torch.bfloat16)
    with torch.no_grad():
        low_latents = subject.run(rule, lambda: low.encode(images.to(torch.bfloat16)))
        low_decoded = subject.run(rule, lambda: low.decode(latents.to(torch.bfloat16)))
    subject.require(low_latents.dtype == torch.bfloat16 and low_decoded.dtype == torch.bfloat16, rule,
                    f"a bfloat16 codec gives {low_latents.dtype} latents and {low_decoded.dtype} images for bfloat16 inputs")
    subject.require(close(low_latents, latents, BFLOAT16_RELATIVE_ERROR), rule,
                    lambda: f"bfloat16 latents far from float32: {describe_difference(low_latents, latents)}")
    subject.require(close(low_decoded, decoded, BFLOAT16_RELATIVE_ERROR), rule,
                    lambda: f"bfloat16 decoding far from float32: {describe_difference(low_decoded, decoded)}")
    checked.append(rule)

    rule = "determinism"
    with torch.no_grad():
        subject.require(same(first.encode(images), latents), rule, "encode without a generator differs between calls")
        subject.require(same(first.decode(latents), decoded), rule, "decode differs between calls")
        torch.manual_seed(1)
        sampled = first.encode(images, generator=torch.Generator().manual_seed(0))
        torch.manual_seed(2)
        again = first.encode(images, generator=torch.Generator().manual_seed(0))
        subject.require(same(sampled, again), rule,
                        "encode with the same seeded generator differs (does it draw from the global RNG?)")
        subject.require(tuple(sampled.shape) == expected_latents, rule, "encode with a generator changes the shape")
    checked.append(rule)

    rule = "scale_factor"
    scaled = copy.deepcopy(first)
    scaled.scale_factor = first.scale_factor * 2
    with torch.no_grad():
        subject.require(torch.allclose(scaled.encode(images), 2 * latents, rtol=1e-5, atol=1e-6), rule,
                        "doubling scale_factor does not double the latents: encode must multiply by scale_factor")
        subject.require(torch.allclose(scaled.decode(2 * latents), decoded, rtol=1e-4, atol=1e-5), rule,
                        "decode must divide by scale_factor first (decode(2 z) at twice the scale differs from decode(z))")
    checked.append(rule)

    rule = "bad inputs are refused"
    wrong = {"images with 4 channels": lambda: first.encode(torch.zeros(1, 4, height, width)),
             "images without a batch dim": lambda: first.encode(torch.zeros(3, height, width)),
             f"latents with {channels + 1} channels": lambda: first.decode(torch.zeros(1, channels + 1, 2, 2))}
    if factor > 1:
        wrong[f"images of height {height + 1}"] = lambda: first.encode(torch.zeros(1, 3, height + 1, width))
    for what, call in wrong.items():
        try:
            with torch.no_grad():
                call()
        except ValueError as exc:
            subject.require(first.name in str(exc), rule, f"the error for {what} does not name the codec: {exc}")
            continue
        except Exception as exc:
            subject.fail(rule, f"{what} raise {type(exc).__name__} ({exc}), not a ValueError naming the codec")
        subject.fail(rule, f"{what} are accepted")
    checked.append(rule)

    def outputs(codec: Codec) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {"encode": codec.encode(images), "decode": codec.decode(latents)}

    check_rebuilds(subject, first, outputs, checked, declared=_declared)
    return checked

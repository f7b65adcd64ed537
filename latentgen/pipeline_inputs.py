"""A generation request's inputs as the conditioner's batch: prompts, labels and `conditioning=` values checked
against what the conditioner reads, converted to tensors and repeated to one per output image; and the
init image and mask of img2img and inpainting as tensors of the request's size.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from latentgen.config.settings import SamplingDefaults
from latentgen.config.typed import check
from latentgen.contracts import Conditioner
from latentgen.contracts.input_keys import INPUT_KEYS, filled_by_pipeline
from latentgen.imaging import from_pil


@dataclass
class Request:
    """The options of one generation call (`LatentDiffusionPipeline.__call__` documents each); None takes
    the pipeline's sampling default."""

    labels: Any = None
    negative_prompts: Any = None
    num_images: int = 1
    steps: int | None = None
    guidance_scale: float | None = None
    guidance_rescale: float | None = None
    seed: int | None = None
    generator: torch.Generator | None = None
    height: int | None = None
    width: int | None = None
    spacing: str | None = None
    grid: str | None = None
    image: Any = None
    strength: float | None = None
    mask: Any = None
    conditioning: Mapping[str, Any] | None = None
    callback: Callable[[dict], None] | None = None
    refiner: Any = None
    refiner_switch: float | None = None

    @classmethod
    def of(cls, options: Mapping[str, Any], defaults: Mapping[str, Any]) -> "Request":
        """The call's options, the pipeline's sampling `defaults` filled in, every value checked: the
        sampling settings against the ranges `SamplingDefaults` declares, the rest here."""
        names = [field.name for field in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise TypeError(f"unknown option(s) {unknown} for generating; the options are {', '.join(names)}")
        request = cls(**options)
        sampled = {field.name for field in dataclasses.fields(SamplingDefaults)} & set(names)
        for name in sampled:
            if getattr(request, name) is None:
                setattr(request, name, defaults.get(name))
        check(SamplingDefaults(**{name: getattr(request, name) for name in sampled}))
        _check_integer("num_images", request.num_images, minimum=1)
        if request.seed is not None:
            _check_integer("seed", request.seed)
        if request.generator is not None and not isinstance(request.generator, torch.Generator):
            raise TypeError(f"generator={request.generator!r}: must be a torch.Generator (or pass seed=<int>)")
        if request.callback is not None and not callable(request.callback):
            raise TypeError(f"callback={request.callback!r}: must be callable, called with a dict after each step")
        if request.refiner_switch is not None and request.refiner is None:
            raise ValueError("refiner_switch was given without a refiner: pass refiner=<a pipeline> as well, or drop it")
        if request.mask is not None and request.image is None:
            raise ValueError("a mask needs the image it applies to: pass image=... as well")
        request.strength = request.strength if request.strength is not None else 1.0 if request.mask is not None else 0.8
        if request.image is not None and not (isinstance(request.strength, (int, float)) and not isinstance(
                request.strength, bool) and 0 < request.strength <= 1):
            raise ValueError(f"strength must be in (0, 1] (the fraction of the sampling path redone); got "
                             f"{request.strength!r}")
        return request


def conditioner_batch(conditioner: Conditioner, prompts: str | Sequence[str] | None,
                      labels: int | Sequence[int] | torch.Tensor | None, num_images: int,
                      conditioning: Mapping[str, Any] | None, device: torch.device) -> dict[str, Any]:
    """The conditioner's input batch, each prompt or label repeated `num_images` times.

    `conditioning` holds the other inputs the conditioner reads, by key (e.g. {"low_res": image}):
    PIL image(s) (mode "L" gives one channel, others RGB, in [-1, 1]), a tensor (B, C, H, W) or
    (C, H, W), or a list of values. Each gives one item for all, one per prompt/label (or, with
    neither, one per request item), or one per output image.
    """
    reads = set(conditioner.input_keys)
    given = {"prompt": prompts, "label": labels}
    for key, value in given.items():
        if value is not None and key not in reads:
            what = "an unconditional model" if not reads else f"a model whose conditioner reads {sorted(reads)}"
            raise ValueError(
                f"a {key} was given to {what} (conditioner '{conditioner.name}'); "
                + (f"pass {sorted(reads)[0]}=... instead" if reads else f"drop the {key}, or load a model trained with a {key} conditioner")
            )
    missing = [key for key in reads if key in given and given[key] is None]
    if missing:
        hint = ' (an empty prompt "" gives unconditional samples)' if missing[0] == "prompt" else ""
        raise ValueError(f"conditioner '{conditioner.name}' needs {missing[0]}=...{hint}")
    batch: dict[str, Any] = {}
    if prompts is not None:
        if not isinstance(prompts, (str, list, tuple)) or not all(isinstance(p, str) for p in
                                                                  ([prompts] if isinstance(prompts, str) else prompts)):
            raise TypeError(f"prompts={prompts!r}: must be a string or a list of strings")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("prompts=[]: give at least one prompt (an empty string \"\" samples unconditionally)")
        batch["prompt"] = [p for p in prompts for _ in range(num_images)]
    if labels is not None:
        if isinstance(labels, (str, bytes)) or not (isinstance(labels, (int, list, tuple, torch.Tensor, np.ndarray))):
            raise TypeError(f"labels={labels!r}: must be an integer, a list of integers or an integer tensor")
        try:
            labels = torch.as_tensor(labels).reshape(-1)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"labels={labels!r}: must be an integer, a list of integers or an integer tensor") from None
        if labels.is_floating_point() or labels.dtype == torch.bool or labels.numel() == 0:
            raise ValueError(f"labels must be an integer or a non-empty list of integers; got {labels.tolist()}")
        batch["label"] = labels.repeat_interleave(num_images)
    batch.update(_conditioning_inputs(conditioner, conditioning or {}, batch, num_images, device))
    return batch


def _conditioning_inputs(conditioner: Conditioner, conditioning: Mapping[str, Any], batch: Mapping[str, Any],
                         num_images: int, device: torch.device) -> dict[str, Any]:
    """`conditioning` checked against what the conditioner reads, batched like the prompts/labels."""
    reads = conditioner.input_keys
    for key in conditioning:
        if filled_by_pipeline(key):
            raise ValueError(f"conditioning['{key}'] is filled by the pipeline: pass {INPUT_KEYS[key].filled_from} instead")
        if key not in reads:
            raise ValueError(f"conditioning['{key}'] was given but conditioner '{conditioner.name}' reads only "
                             f"{list(reads) or 'nothing'}; drop it, or load a model whose conditioner reads '{key}'")
    for key in reads:
        optional = key in INPUT_KEYS and INPUT_KEYS[key].optional
        if not filled_by_pipeline(key) and not optional and conditioning.get(key) is None:
            raise ValueError(
                f"conditioner '{conditioner.reader_of(key)}' needs the input '{key}', which was not given: pass "
                f"conditioning={{'{key}': <PIL image or tensor (B, C, H, W)>}} to the pipeline "
                f"(latentgen-sample: conditioning.{key}=<path.png>)")
    values = {key: _as_conditioning(key, value) for key, value in conditioning.items()}
    if batch:
        items = len(next(iter(batch.values()))) // num_images
    else:  # no prompts or labels: the conditioning inputs are the request's items
        items = max((_count(value) for value in values.values()), default=1)
    return {key: _batched(key, value, items, num_images, device) for key, value in values.items()}


def image_batch(image: Any, batch_size: int, height: int | None, width: int | None,
                device: torch.device) -> torch.Tensor:
    """PIL image(s) or a (B, 3, H, W) tensor in [-1, 1] -> (batch_size, 3, H, W) on `device`."""
    if isinstance(image, torch.Tensor):
        _check_float_tensor("image", image, -1.0, 1.0, "(B, 3, H, W) in [-1, 1]")
        images = image if image.ndim == 4 else image[None]
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"an image tensor must be (B, 3, H, W) in [-1, 1]; got {tuple(image.shape)}")
        if height and width and tuple(images.shape[2:]) != (height, width):
            images = F.interpolate(images.float(), size=(height, width), mode="bicubic").clamp(-1, 1)
    else:
        pictures = list(image) if isinstance(image, (list, tuple)) else [image]
        _check_pictures("image", pictures, "a PIL image, a list of them, or a float tensor (B, 3, H, W) in [-1, 1]")
        size = (width, height) if height and width else None
        images = from_pil(pictures, size)
    return _repeat_to(images, batch_size, "image").to(device)


def mask_batch(mask: Any, batch_size: int, height: int, width: int, device: torch.device) -> torch.Tensor:
    """PIL mask(s) (white = repaint) or a tensor (B, 1, H, W) in [0, 1] -> (batch_size, 1, H, W) on `device`."""
    if isinstance(mask, torch.Tensor):
        if mask.dtype != torch.bool:
            _check_float_tensor("mask", mask, 0.0, 1.0, "(B, 1, H, W) in [0, 1] (1: repaint)")
        masks = mask.float()
        while masks.ndim < 4:
            masks = masks[None]
        if masks.shape[1] != 1:
            raise ValueError(f"a mask tensor must be (B, 1, H, W) in [0, 1]; got {tuple(mask.shape)}")
    else:
        pictures = list(mask) if isinstance(mask, (list, tuple)) else [mask]
        _check_pictures("mask", pictures, "a PIL image (white: repaint), a list of them, or a tensor (B, 1, H, W)")
        masks = (from_pil([p.convert("L").convert("RGB") for p in pictures])[:, :1] + 1) / 2
    masks = F.interpolate(masks, size=(height, width), mode="nearest") if tuple(masks.shape[2:]) != (height, width) else masks
    return _repeat_to(masks, batch_size, "mask").to(device)


def _as_conditioning(key: str, value: Any) -> torch.Tensor | list:
    """A conditioning input as a batch: PIL images and arrays -> float tensor (B, C, H, W), else a list."""
    if isinstance(value, Image.Image) or (isinstance(value, (list, tuple)) and value
                                          and all(isinstance(v, Image.Image) for v in value)):
        pictures = [value] if isinstance(value, Image.Image) else list(value)
        if len({picture.size for picture in pictures}) > 1:
            raise ValueError(f"conditioning['{key}'] holds images of different sizes "
                             f"{sorted({p.size for p in pictures})}; resize them to one size")
        if all(picture.mode == "L" for picture in pictures):  # a one-channel map, e.g. a depth map
            arrays = np.stack([np.asarray(picture, dtype=np.float32) for picture in pictures])[:, None]
            return torch.from_numpy(arrays) / 127.5 - 1
        return from_pil(pictures)
    if key in INPUT_KEYS and INPUT_KEYS[key].value == "numbers":  # (768, 1344): one row for every item
        numbers = torch.as_tensor(value, dtype=torch.float32)
        if not bool(torch.isfinite(numbers).all()):
            raise ValueError(f"conditioning['{key}'] holds NaN or infinite values; pass finite numbers")
        return numbers.reshape(1, -1) if numbers.ndim < 2 else numbers
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) and v.ndim in (3, 4) for v in value):
        value = torch.cat([v if v.ndim == 4 else v[None] for v in value])  # maps of one size, e.g. one per prompt
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"conditioning['{key}'] holds NaN or infinite values; pass a finite map")
        if value.ndim == 3:  # one (C, H, W) map
            value = value[None]
        return value.float() if value.dtype == torch.float64 else value
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _count(value: torch.Tensor | list) -> int:
    return value.shape[0] if isinstance(value, torch.Tensor) else len(value)


def _batched(key: str, value: torch.Tensor | list, items: int, num_images: int,
             device: torch.device) -> torch.Tensor | list:
    """One value for all, one per item (repeated `num_images` times) or one per image -> one per image."""
    count, batch_size = _count(value), items * num_images
    if count not in (1, items, batch_size):
        raise ValueError(f"conditioning['{key}'] has {count} items for {items} prompt(s)/label(s) x {num_images} "
                         f"image(s): pass one, one per prompt/label ({items}) or one per image ({batch_size})")
    if isinstance(value, torch.Tensor):
        if count == batch_size:
            return value.to(device)
        repeats = batch_size if count == 1 else num_images
        return value.repeat_interleave(repeats, dim=0).to(device)
    if count == batch_size:
        return list(value)
    return [v for v in value for _ in range(batch_size if count == 1 else num_images)]


def _repeat_to(tensor: torch.Tensor, batch_size: int, what: str) -> torch.Tensor:
    """One item for the whole batch, or exactly one per item."""
    if tensor.shape[0] == batch_size:
        return tensor
    if tensor.shape[0] == 1:
        return tensor.expand(batch_size, *tensor.shape[1:])
    raise ValueError(f"got {tensor.shape[0]} {what}s for a batch of {batch_size}: pass one, or one per image")


def _check_integer(name: str, value: Any, minimum: int | None = None) -> None:
    bound = f" >= {minimum}" if minimum is not None else ""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}={value!r}: must be an integer{bound} (not a {type(value).__name__})")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}={value!r}: must be an integer >= {minimum}")


def _check_pictures(name: str, pictures: list, expected: str) -> None:
    """Refuse what is not a PIL image (a path, an array), naming the argument and what it takes."""
    for picture in pictures:
        if not isinstance(picture, Image.Image):
            hint = f"; open a file with PIL.Image.open({str(picture)!r})" if isinstance(picture, (str, Path)) else ""
            raise TypeError(f"{name}={picture!r:.80}: must be {expected}{hint}")


def _check_float_tensor(name: str, tensor: torch.Tensor, low: float, high: float, expected: str) -> None:
    """A float tensor, finite, within [low, high] (up to rounding): anything else is a caller's mistake that
    would otherwise sample garbage silently (a uint8 image in 0..255, NaNs from a failed preprocessing)."""
    if not tensor.is_floating_point():
        raise TypeError(f"{name}: a {str(tensor.dtype).removeprefix('torch.')} tensor; pass a float tensor {expected} "
                        f"(from 0..255 integers: tensor.float() / 127.5 - 1)")
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name}: the tensor holds NaN or infinite values; pass a finite tensor {expected}")
    tolerance = 1e-2 * (high - low)
    if tensor.numel() and (float(tensor.min()) < low - tolerance or float(tensor.max()) > high + tolerance):
        raise ValueError(f"{name}: values range over [{float(tensor.min()):.3g}, {float(tensor.max()):.3g}]; pass a "
                         f"tensor {expected}")

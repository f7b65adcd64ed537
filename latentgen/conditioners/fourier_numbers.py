"""Numbers about an image (its original size, crop, target size, aesthetic score) as sinusoid features:
SDXL's micro-conditioning (Podell et al. 2023, Sec. 2.2), which tells the model what a training image was
like so that sampling can ask for the best kind."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch

from latentgen.contracts import Conditioner

IMAGE_SIZE = "image_size"  # the pipeline's (height, width) of the request: a default for sizes


def fourier_features(numbers: torch.Tensor, dim: int) -> torch.Tensor:
    """(B, N) numbers -> (B, N * dim): each number t as [cos(t f_i), sin(t f_i)], f_i = 10000^(-i / (dim/2)),
    cosines first, computed in float32 as the original does (its outputs are what the model was trained on)."""
    half = dim // 2
    frequencies = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=numbers.device) / half)
    angles = numbers.float().reshape(-1, 1) * frequencies[None]  # (B * N, half)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1).reshape(numbers.shape[0], -1)


class FourierNumbers(Conditioner):
    """`count` numbers per item under `input_key` -> "vector" (B, count * dim): each number's sinusoids.

    When the request does not give `input_key` (`conditioning={"original_size": (768, 1344)}`,
    latentgen-sample `conditioning.original_size=[768,1344]`), `default` is used: "image_size" (the requested
    height and width, SDXL's convention for original and target size) or fixed numbers (crop (0, 0), an
    aesthetic score of 6). `unconditional` gives other numbers to the unconditional branch (the refiner's
    negative aesthetic score 2.5); by default the unconditional branch sees the same numbers.
    """

    def __init__(self, input_key: str = "original_size", count: int = 2, dim: int = 256, default: str | Sequence[float] = IMAGE_SIZE,
                 unconditional: Sequence[float] | None = None):
        super().__init__()
        if int(count) < 1 or int(dim) < 2 or int(dim) % 2:
            raise ValueError(f"conditioner '{self.name}': count must be >= 1 and dim a positive even number; got "
                             f"count={count}, dim={dim}")
        if isinstance(default, str) and default != IMAGE_SIZE:
            raise ValueError(f"conditioner '{self.name}': default is '{IMAGE_SIZE}' or a list of {count} numbers; "
                             f"got '{default}'")
        for what, numbers in (("default", default), ("unconditional", unconditional)):
            if numbers is not None and not isinstance(numbers, str) and len(numbers) != int(count):
                raise ValueError(f"conditioner '{self.name}': {what} needs {count} numbers; got {list(numbers)}")
        if default == IMAGE_SIZE and int(count) != 2:
            raise ValueError(f"conditioner '{self.name}': default '{IMAGE_SIZE}' gives 2 numbers (height, width) but "
                             f"count is {count}")
        self.input_key, self.count, self.dim = input_key, int(count), int(dim)
        self.default = default if isinstance(default, str) else [float(n) for n in default]
        self.unconditional_numbers = None if unconditional is None else [float(n) for n in unconditional]
        self.input_keys = (input_key, IMAGE_SIZE) if default == IMAGE_SIZE else (input_key,)
        # No weights: this empty buffer follows .to() so that outputs take the module's device and dtype (the
        # features themselves are always computed in float32).
        self.register_buffer("placement", torch.empty(0), persistent=False)

    @property
    def outputs(self) -> dict[str, int]:
        return {"vector": self.count * self.dim}

    def check_inputs(self, batch: Mapping[str, Any]) -> None:
        """The numbers themselves are optional (the default stands in); the image size, if it is the default, not."""
        if self.default == IMAGE_SIZE and self.input_key not in batch and IMAGE_SIZE not in batch:
            raise ValueError(f"conditioner '{self.name}' needs '{self.input_key}' or the request's '{IMAGE_SIZE}' "
                             f"(the pipeline fills it from height= and width=)")

    def numbers(self, batch: Mapping[str, Any], items: int) -> torch.Tensor:
        """(items, count) float32: the given numbers, or the default, one row per item."""
        self.check_inputs(batch)
        given = batch.get(self.input_key)
        if given is None:
            given = batch[IMAGE_SIZE] if self.default == IMAGE_SIZE else self.default
        numbers = torch.as_tensor(given, dtype=torch.float32)
        if numbers.numel() % self.count or numbers.numel() // self.count not in (1, items):
            raise ValueError(f"conditioner '{self.name}': '{self.input_key}' needs {self.count} number(s) per item "
                             f"(one row for all, or one per image: {items}); got {numbers.tolist()}")
        return numbers.reshape(-1, self.count).expand(items, self.count)

    def _features(self, numbers: torch.Tensor) -> dict[str, torch.Tensor]:
        features = fourier_features(numbers.to(self.placement.device), self.dim)
        return {"vector": features.to(self.placement.dtype)}  # (B, count * dim)

    def forward(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        return self._features(self.numbers(batch, _items(batch)))

    def unconditional(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        if self.unconditional_numbers is None:
            return self(batch)
        return self._features(torch.tensor(self.unconditional_numbers).expand(_items(batch), self.count))


def _items(batch: Mapping[str, Any]) -> int:
    """The batch size: the length of its prompts or labels, else of any batched tensor input, else 1."""
    for key in ("prompt", "label"):
        if key in batch:
            return len(batch[key])
    sizes = [value.shape[0] for value in batch.values() if isinstance(value, torch.Tensor) and value.ndim >= 2]
    return max(sizes, default=1)

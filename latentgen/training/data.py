"""Batches for training: shuffled epochs from a dataset, and a cache of encoded latents."""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, Dataset


def epochs(dataset: Dataset, batch_size: int, generator: torch.Generator, num_workers: int = 0,
           drop_last: bool = True) -> Iterator[dict[str, Any]]:
    """Endless shuffled batches (dicts collated by torch's default_collate)."""
    if len(dataset) < batch_size and drop_last:
        raise ValueError(f"the dataset has {len(dataset)} items, fewer than batch_size {batch_size}; "
                         f"lower train.*.batch_size or use a larger dataset")
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator,
                        num_workers=num_workers, drop_last=drop_last)
    while True:
        yield from loader


class LatentCache:
    """Every item's latents (encoded once by the frozen codec) with its conditioning inputs.

    Stage 2 then draws batches from memory instead of running the encoder at every step.
    """

    def __init__(self, latents: torch.Tensor, inputs: dict[str, Any]):
        self.latents = latents  # (N, C, h, w)
        self.inputs = inputs    # key -> tensor (N, ...) or list of N values

    @classmethod
    @torch.no_grad()
    def encode(cls, codec, dataset: Dataset, keep: tuple[str, ...], device: torch.device,
               batch_size: int = 256) -> "LatentCache":
        latents, inputs = [], {key: [] for key in keep}
        for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            latents.append(codec.encode(batch["image"].to(device)).float().cpu())
            for key in keep:
                if key not in batch:
                    raise KeyError(f"the conditioner reads '{key}' but the dataset's items have only {sorted(batch)}")
                inputs[key].append(batch[key])
        joined = {key: torch.cat(values) if isinstance(values[0], torch.Tensor) else [v for part in values for v in part]
                  for key, values in inputs.items()}
        return cls(torch.cat(latents), joined)

    def __len__(self) -> int:
        return self.latents.shape[0]

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        inputs = {key: value[indices] if isinstance(value, torch.Tensor) else [value[i] for i in indices.tolist()]
                  for key, value in self.inputs.items()}
        return self.latents[indices], inputs

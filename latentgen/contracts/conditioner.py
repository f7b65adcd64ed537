"""Conditioner contract: raw inputs (prompts, labels, images) -> the cond dict a denoiser reads."""

from __future__ import annotations

import abc
from typing import Any, Mapping

import torch
from torch import nn


class Conditioner(nn.Module, abc.ABC):
    """Turns a batch of raw inputs into conditioning tensors, and provides their unconditional
    counterpart for classifier-free guidance (Ho and Salimans 2022).

    A batch is a mapping from input keys ("prompt": list[str], "label": LongTensor (B,),
    "image": (B, 3, H, W), ...; `latentgen.contracts.input_keys`) to values; a conditioner reads the
    keys in `input_keys` and gives keys of `latentgen.contracts.cond_keys`.
    Subclasses set `input_keys`, implement `outputs`, `forward` and `unconditional`;
    `dropout` is the probability, per sample, of training on the unconditional output.
    """

    input_keys: tuple[str, ...] = ()
    dropout: float = 0.0
    # True for a conditioner whose output does not depend on its inputs (zero_tokens: a text encoder left out,
    # in its place); the contract suite then does not ask it to tell samples apart.
    constant: bool = False

    @property
    @abc.abstractmethod
    def outputs(self) -> dict[str, int]:
        """The cond keys produced (`latentgen.contracts.cond_keys`), each with its width: D for "crossattn"
        and "vector", channels for "concat"."""

    @abc.abstractmethod
    def forward(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Conditioning for `batch`: a dict with exactly the keys of `outputs`."""

    @abc.abstractmethod
    def unconditional(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The unconditional counterpart of `forward(batch)`: same keys, same shapes."""

    @property
    def name(self) -> str:
        return getattr(self, "registry_name", type(self).__name__)

    @property
    def device(self) -> torch.device:
        for tensor in self.parameters():
            return tensor.device
        for tensor in self.buffers():
            return tensor.device
        return torch.device("cpu")

    def reader_of(self, input_key: str) -> str:
        """The name of the conditioner that reads `input_key` (a stack names its member)."""
        return self.name

    def check_inputs(self, batch: Mapping[str, Any]) -> None:
        """Raise a ValueError naming the conditioner if an input key it reads is missing."""
        missing = [key for key in self.input_keys if key not in batch]
        if missing:
            raise ValueError(
                f"conditioner '{self.name}' reads the input(s) {missing} but the batch has only "
                f"{sorted(batch)}"
            )

    def for_training(
        self, batch: Mapping[str, Any], generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Conditioning with each sample replaced by its unconditional output with probability
        `dropout`: the training half of classifier-free guidance."""
        cond = self(batch)
        if self.dropout <= 0 or not cond:
            return cond
        uncond = self.unconditional(batch)
        batch_size = next(iter(cond.values())).shape[0]
        drop = torch.rand(batch_size, generator=generator) < self.dropout
        mixed = {}
        for key, value in cond.items():
            mask = drop.to(value.device).view(-1, *([1] * (value.ndim - 1)))
            mixed[key] = torch.where(mask, uncond[key].to(value.dtype), value)
        return mixed

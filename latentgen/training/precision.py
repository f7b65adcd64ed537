"""Mixed precision for training: autocast forward passes over float32 master weights.

The weights, their gradients and the optimizer state stay float32; only the operations inside
`autocast()` run in bfloat16 or float16. bf16 has float32's exponent range and needs no loss scaling
(CPU and CUDA); fp16 underflows small gradients, so it scales the loss with a GradScaler (CUDA only).
"""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager

import torch

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """`with precision.autocast(): loss = ...`, then `backward(loss)`, `unscale_(opt)` before clipping,
    `step(opt)` for each optimizer and `update()` once per training step."""

    def __init__(self, name: str, device: torch.device, key: str = "train.precision"):
        if name not in PRECISIONS:
            raise ValueError(f"unknown {key} '{name}'; choose one of {list(PRECISIONS)}")
        if name == "fp16" and device.type != "cuda":
            raise ValueError(f"{key}=fp16 needs a CUDA device (it relies on a GradScaler); the device is "
                             f"'{device}': use {key}=bf16 or fp32 there")
        self.name = name
        self.device = device
        self.dtype = PRECISIONS[name]
        self.scaler = torch.amp.GradScaler("cuda") if name == "fp16" else None

    def autocast(self) -> ContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Bring the gradients back to their true size (before clipping them)."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """optimizer.step(), skipped by the scaler when fp16 gradients overflowed."""
        if self.scaler is not None:
            self.scaler.step(optimizer)
        else:
            optimizer.step()

    def update(self) -> None:
        if self.scaler is not None:
            self.scaler.update()

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["name"] != self.name:
            raise ValueError(f"the training state was saved with train.precision={state['name']}, this run uses "
                             f"{self.name}; resume with the same precision")
        if self.scaler is not None and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])

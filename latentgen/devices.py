"""Choosing the torch device from a config string."""

from __future__ import annotations

import torch


def resolve_device(name: str | None) -> torch.device:
    """'auto' -> cuda when available, else cpu; anything else must be a usable torch device."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"unknown device '{name}'; use auto, cpu, cuda or cuda:<index>") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device '{name}' was asked for but CUDA is not available here; use device=cpu or device=auto")
    return device

"""Normalization layers shared by the UNet and the transformers (GroupNorm32; RMSNorm for T5 and MMDiT)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_LOW_PRECISION = (torch.bfloat16, torch.float16)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with float32 statistics whatever the input dtype (the original's `GroupNorm32`).

    Statistics over large feature maps lose too much precision in half/bfloat16. On the CPU, torch's
    group_norm takes a bf16/fp16 input with float32 weights and accumulates in float32 itself, so the
    input goes in as it is: no float32 copy of the feature map and no cast back, two passes fewer over
    memory (on a bf16 SD v1 step the time difference was within noise; benchmarks/sd_cpu.py). Elsewhere
    the input is cast to float32 and the result back. Both round only the output.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        if x.dtype in _LOW_PRECISION and x.device.type == "cpu":
            return F.group_norm(x, self.num_groups, weight, bias, self.eps)
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last dimension, without mean or bias (Zhang and Sennrich 2019), with the
    statistics in float32: T5's layer norm and MMDiT's per-head q/k norm."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float() * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight.to(x.dtype)

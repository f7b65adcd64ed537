"""Normalization layers shared by the UNet and its transformers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 and cast back to the input dtype (the original's `GroupNorm32`).

    Statistics over large feature maps lose too much precision in half/bfloat16, so the whole
    normalization (input, weight and bias) runs in float32 whatever the module's dtype.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)

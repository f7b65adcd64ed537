"""Convolutions whose weights are reordered for oneDNN once instead of on every call (bf16 CPU inference).

torch's CPU convolution hands oneDNN each weight in its plain layout, and oneDNN reorders it into the blocked
layout its AMX / AVX-512 kernels read, on every call: for SD v1's 1280-channel 3x3 layers at 8x8 and 16x16
latents (30-60 MB of weights each, little arithmetic) the reorder is much of the layer's time. OpenVINO packs its
weights once. `PackedConv2d` keeps the reordered weight for the last input shape it saw and calls oneDNN's
convolution on it (`torch.ops.mkldnn._convolution_pointwise`, what torch's compiler uses for frozen weights):
the same convolution, bit for bit (tests/nn/test_packed_convolution.py). A bf16 SD v1 UNet step at 512x512
(2-core AMX CPU, one process, alternating, 3-5 rounds): 2.12 -> 2.00 s at two threads, 3.70 -> 3.57 s at one;
packing the 64x64 layers too gained nothing more, so only inputs of at most `MAX_PIXELS` positions are packed.
The packed copies cost those layers' weights once more in memory: for SD v1 in bf16, 71 layers holding 1.06 GiB
of weights, and 3.00 -> 3.99 GiB resident after two steps (one process each).

A packed copy must follow its weight: it is keyed by the weight's storage, its version counter (an in-place
update under torch.no_grad() bumps it; one through `weight.data` does not) and the input shape.
LatentDiffusionPipeline.attach and detach drop every packed copy (`forget_packed_weights`), so an adapter that
changes weights through `.data` is safe too.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

MAX_PIXELS = 32 * 32  # inputs up to 32x32 positions (SD's 64x64 latents: no gain measured)

# layer -> (key, packed weight). Held outside the layer, so that copying or pickling a layer never meets oneDNN's
# opaque tensor, and a layer that goes away takes its copy with it.
_PACKED: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _has_mkldnn_ops() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise") \
        and hasattr(torch.ops.mkldnn, "_reorder_convolution_weight")


class PackedConv2d(nn.Conv2d):
    """An nn.Conv2d (same parameters, same state dict) that packs its weight for bf16 CPU inference. Layers
    become one through `pack_convolutions`; an input it does not take runs nn.Conv2d's own forward."""

    def _packable(self, x: torch.Tensor) -> bool:
        return (x.dim() == 4 and x.dtype == torch.bfloat16 and x.device.type == "cpu"
                and self.weight.dtype == torch.bfloat16 and x.shape[2] * x.shape[3] <= MAX_PIXELS
                and x.is_contiguous(memory_format=torch.channels_last)
                and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
                and not torch.compiler.is_compiling())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._packable(x):
            return super().forward(x)
        weight = self.weight
        key = (tuple(x.shape), weight.data_ptr(), weight._version)
        entry = _PACKED.get(self)
        if entry is None or entry[0] != key:
            _PACKED.pop(self, None)  # the old copy goes before the new one is made
            entry = _PACKED[self] = (key, torch.ops.mkldnn._reorder_convolution_weight(
                weight.detach(), list(self.padding), list(self.stride), list(self.dilation), self.groups,
                list(x.shape)))
        return torch.ops.mkldnn._convolution_pointwise(x, entry[1], self.bias, list(self.padding), list(self.stride),
                                                       list(self.dilation), self.groups, "none", [], "")


def pack_convolutions(module: nn.Module) -> int:
    """Make every plain nn.Conv2d in `module` (exactly that class, zero padding given as numbers) a
    PackedConv2d, in place; returns how many. Does nothing where torch has no oneDNN convolution ops."""
    if not _has_mkldnn_ops():
        return 0
    count = 0
    for layer in module.modules():
        if type(layer) is nn.Conv2d and layer.padding_mode == "zeros" and not isinstance(layer.padding, str):
            layer.__class__ = PackedConv2d
            count += 1
    return count


def unpack_convolutions(module: nn.Module) -> int:
    """Turn every PackedConv2d in `module` back into an nn.Conv2d, dropping its packed copy; returns how many."""
    count = 0
    for layer in module.modules():
        if type(layer) is PackedConv2d:
            _PACKED.pop(layer, None)
            layer.__class__ = nn.Conv2d
            count += 1
    return count


def forget_packed_weights(module: nn.Module) -> None:
    """Drop every packed copy in `module` (made again on the next call), e.g. after weights changed in a way
    their version counter does not see."""
    for layer in module.modules():
        _PACKED.pop(layer, None)

"""Weight-only int8 (`int8_weights`): while attached, the denoiser's nn.Linear and nn.Conv2d weights are held
in one byte per element, symmetric per output channel (scale = absmax / 127, computed in float32; an all-zero
channel gets scale 1), and each call dequantises its layer's weight into the layer's own dtype before the usual
F.linear / conv (stride, padding, dilation, groups and channels-last layout as before). Norms, embeddings and
every other 1-D weight stay as they are.

The point is memory, not speed: dequantising costs little next to the matmul, and the weights take 1 byte each
instead of 2 (bf16) or 4 (fp32), at an error of at most half a scale step per weight. The float originals leave
memory too: they go to a temporary file (deleted on detach, or when the adapter is collected or the process exits
while still attached) unless `keep_originals_in_memory=True`. Detaching
loads them back into the same Parameter objects (values, dtype, strides and requires_grad as before), so the
denoiser computes exactly what it did.

How a layer is quantised: its `weight` Parameter is taken out of the module (kept aside by this adapter, its
storage emptied once saved to the file) and the module's class is switched to `Int8Linear` / `Int8Conv2d`,
subclasses whose `weight` is a property dequantising the buffers `weight_int8` and `weight_scale`; the module
object, its hooks and its bias stay. Code that reads `layer.weight` gets the dequantised tensor, in the original dtype.

Inference only: the int8 weights are buffers, so no gradient reaches them (inputs and biases still get theirs).
Attach it after a merged LoRA (`lora`, `merge=True`), not before: a LoRA merged into a quantised layer would
change a dequantised copy, not the layer, so `lora` refuses that merge (an unmerged LoRA works over it).
"""

from __future__ import annotations

import os
import tempfile
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from latentgen.contracts import Adapter
from latentgen.errors import AdapterError
from latentgen.freed_memory import return_freed_memory
from latentgen.nn.packed_convolution import PackedConv2d

_NAME = "adapter 'int8_weights'"


def _remove_file(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values, float32 scale) of `weight` (out_channels first), symmetric per output channel: the scale is
    absmax / 127 (1 for an all-zero channel), shaped (out, 1, ...) to broadcast; the values keep the weight's
    layout. |weight - values * scale| <= scale / 2 per element, up to float32 rounding."""
    w = weight.detach().float()
    absmax = w.abs().amax(dim=tuple(range(1, w.ndim)), keepdim=True)
    scale = torch.where(absmax == 0, torch.ones_like(absmax), absmax / 127)  # nan or inf stays, for callers to see
    return torch.round(w / scale).clamp_(-127, 127).to(torch.int8), scale


def dequantize(values: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """values * scale in `dtype` (the values' layout kept). The int8 values are exact in any float dtype; in bf16
    the scale is rounded too (relative 2^-9), which adds at most 127 * 2^-9 = 0.25 scale steps to the error, and
    saves a float32 copy of every weight per call (a bf16 SD v1 step at batch 1 took 4.3 s instead of 2.7 s with
    the float32 detour, 3.0 s this way)."""
    return values.to(dtype) * scale.to(dtype)


class _Int8Weight:
    """`weight` read from the int8 buffers. Mixed into nn.Linear / nn.Conv2d: their own forward reads `self.weight`."""

    weight_int8: torch.Tensor
    weight_scale: torch.Tensor
    weight_dtype: torch.dtype

    @property
    def weight(self) -> torch.Tensor:
        return dequantize(self.weight_int8, self.weight_scale, self.weight_dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, int8 weight"


class Int8Linear(_Int8Weight, nn.Linear):
    """An nn.Linear whose weight is held in int8 (the class `int8_weights` gives a layer while attached)."""


class Int8Conv2d(_Int8Weight, nn.Conv2d):
    """An nn.Conv2d whose weight is held in int8 (the class `int8_weights` gives a layer while attached)."""


# A PackedConv2d (the CPU fast path's) is quantised too; removing the adapter gives its class back.
_QUANTISED = {nn.Linear: Int8Linear, nn.Conv2d: Int8Conv2d, PackedConv2d: Int8Conv2d}


class Int8Weights(Adapter):
    """Weight-only int8 for the denoiser's nn.Linear and nn.Conv2d layers (per output channel, dequantised to the
    layer's dtype at each call): `min_size` (layers with fewer weight elements stay in float; 0: none do),
    `modules` (dotted-name prefixes of the layers to quantise, e.g. ["input_blocks", "middle_block"]; default:
    all), `keep_originals_in_memory` (false: the float originals wait in a temporary file until detach)."""

    def __init__(self, min_size: int = 0, modules: Sequence[str] | str | None = None,
                 keep_originals_in_memory: bool = False):
        if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 0:
            raise AdapterError(f"{_NAME}: min_size must be a whole number >= 0 (layers with fewer weight elements "
                               f"stay in float; 0 quantises every layer); got {min_size!r}")
        if isinstance(modules, str):
            modules = [modules]
        if modules is not None:
            if not isinstance(modules, Sequence) or not modules or \
                    not all(isinstance(prefix, str) and prefix.strip(".") for prefix in modules):
                raise AdapterError(f"{_NAME}: modules must be a non-empty list of module-name prefixes (e.g. "
                                   f"['input_blocks', 'middle_block']), or omitted to quantise every layer; "
                                   f"got {modules!r}")
            modules = [prefix.strip(".") for prefix in modules]
        if not isinstance(keep_originals_in_memory, bool):
            raise AdapterError(f"{_NAME}: keep_originals_in_memory must be true or false (false: the float weights "
                               f"wait in a temporary file while attached); got {keep_originals_in_memory!r}")
        self.min_size, self.modules = min_size, modules
        self.keep_originals_in_memory = keep_originals_in_memory
        # What apply changed, in order: (module, its class before, its weight Parameter), each recorded before
        # the module is changed; the Parameters whose storage was emptied (by key); the file holding them.
        self._layers: list[tuple[nn.Module, type, nn.Parameter]] = []
        self._emptied: dict[str, nn.Parameter] = {}
        self._file: str | None = None
        self._file_cleanup: weakref.finalize | None = None

    # ---- which layers ------------------------------------------------------------------------------

    def _candidates(self, denoiser: nn.Module) -> list[tuple[str, nn.Module]]:
        """Every nn.Linear / nn.Conv2d (exactly those classes) with a floating-point weight Parameter."""
        return [(name, module) for name, module in denoiser.named_modules()
                if type(module) in _QUANTISED and isinstance(module._parameters.get("weight"), nn.Parameter)
                and module._parameters["weight"].is_floating_point()]

    def _selected(self, name: str) -> bool:
        return self.modules is None or any(name == prefix or name.startswith(prefix + ".") for prefix in self.modules)

    def _plan(self, denoiser: nn.Module) -> list[tuple[str, nn.Module]]:
        return [(name, module) for name, module in self._candidates(denoiser)
                if self._selected(name) and module.weight.numel() >= self.min_size]

    def check(self, pipeline: Any) -> None:
        denoiser = pipeline.denoiser
        candidates = self._candidates(denoiser)
        for prefix in self.modules or ():
            if not any(name == prefix or name.startswith(prefix + ".") for name, _ in candidates):
                children = ", ".join(name for name, _ in denoiser.named_children())
                raise AdapterError(f"{_NAME}: modules entry {prefix!r} names no nn.Linear or nn.Conv2d layer of "
                                   f"denoiser '{denoiser.name}' (prefixes are dotted module names; its top-level "
                                   f"modules: {children})")
        if not self._plan(denoiser):
            limits = "".join([f" with at least min_size={self.min_size} weight elements" if self.min_size else "",
                              f" under modules={self.modules}" if self.modules else ""])
            raise AdapterError(f"{_NAME} quantises the weights of a denoiser's nn.Linear and nn.Conv2d layers; "
                               f"denoiser '{denoiser.name}' has none{limits} (layers already quantised do not "
                               f"count)" + (": lower min_size or widen modules" if limits else ""))

    # ---- apply and remove --------------------------------------------------------------------------

    @torch.no_grad()
    def apply(self, pipeline: Any) -> None:
        plan = self._plan(pipeline.denoiser)
        # Quantise everything first: nothing changes before every layer is known to quantise.
        params: dict[int, tuple[str, nn.Parameter, torch.Tensor, torch.Tensor]] = {}  # shared weights: once
        for name, module in plan:
            weight = module._parameters["weight"]
            if id(weight) in params:
                continue
            values, scale = quantize(weight)
            if not torch.isfinite(scale).all():
                raise AdapterError(f"{_NAME}: layer '{name}' of denoiser '{pipeline.denoiser.name}' has non-finite "
                                   f"weights (inf or nan); leave it out with modules=[...] or fix the weights")
            params[id(weight)] = (name, weight, values, scale)
        if not self.keep_originals_in_memory:
            handle, self._file = tempfile.mkstemp(prefix="latentgen-int8-weights-", suffix=".pt")
            os.close(handle)
            # A process that ends (or drops the adapter) without detaching must not leave the file behind.
            self._file_cleanup = weakref.finalize(self, _remove_file, self._file)
            torch.save({key: weight.detach() for key, weight, _, _ in params.values()}, self._file)
        for name, module in plan:
            weight = module._parameters["weight"]
            _, _, values, scale = params[id(weight)]
            self._layers.append((module, type(module), weight))
            module._parameters["weight"] = None  # keeps its place: parameter and state-dict order come back as before
            module.register_buffer("weight_int8", values)
            module.register_buffer("weight_scale", scale)
            module.weight_dtype = weight.dtype
            module.__class__ = _QUANTISED[type(module)]
        if not self.keep_originals_in_memory:  # the originals are in the file: free their memory
            for key, weight, _, _ in params.values():
                self._emptied[key] = weight
                weight.data = torch.empty(0, dtype=weight.dtype, device=weight.device)
            del params
            return_freed_memory()

    @torch.no_grad()
    def remove(self, pipeline: Any) -> None:
        if self._emptied:  # memory-mapped: one layer at a time is copied back, in its own strides
            saved = torch.load(self._file, map_location="cpu", mmap=True, weights_only=True)
            for key, weight in self._emptied.items():
                original = saved[key]
                weight.data = torch.empty_strided(original.shape, original.stride(), dtype=original.dtype,
                                                  device=weight.device).copy_(original)
            del saved, original
        for module, cls, weight in reversed(self._layers):
            module.__class__ = cls
            for attribute in ("weight_int8", "weight_scale"):
                module._buffers.pop(attribute, None)
            vars(module).pop("weight_dtype", None)
            module._parameters["weight"] = weight
        if self._file_cleanup is not None:
            self._file_cleanup()  # removes the file, once
        self._layers, self._file_cleanup, self._emptied, self._file = [], None, {}, None
        return_freed_memory()  # the int8 buffers, or the file's pages read back

    @property
    def originals_file(self) -> str | None:
        """The temporary file holding the float weights while attached (None when kept in memory or detached)."""
        return self._file

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "min_size": self.min_size, "modules": self.modules,
                "keep_originals_in_memory": self.keep_originals_in_memory}

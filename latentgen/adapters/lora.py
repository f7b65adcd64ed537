"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"; LoCon convolutions as in
kohya-ss sd-scripts): W' = W + m * (alpha / rank) * up @ down on the modules a file names.

    lora = registry.build("adapter", "lora", path="style.safetensors", scale=0.8)
    pipe.attach(lora); pipe("a cat"); pipe.detach(lora)   # detach restores every weight bit for bit

Two ways to apply, both detached exactly:

- `merge=True` (default, as A1111 and ComfyUI do): the deltas are added to the weights in place, so sampling
  costs nothing extra; the weights it changes are copied first (memory: one copy of each patched weight) and
  copied back on detach. Changing `scale` adds the difference (detach still restores the copies exactly).
- `merge=False`: forward hooks add m * scale * up(down(x)) to each patched module's output at run time
  (diffusers' unfused form): no weight copies, a small cost per call, `scale` read at each call.

`scale` multiplies the UNet part, `text_scale` (default: `scale`) the text-encoder part. File layouts and
names: latentgen.adapters.lora_file and latentgen.adapters.module_names.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from latentgen.adapters.lora_file import LowRank, read_lora_file
from latentgen.adapters.module_names import Target, lora_targets, text_towers
from latentgen.contracts.adapter import Adapter
from latentgen.errors import AdapterError

# The cross-attention key projection's input width tells which model a LoRA was made for.
_CONTEXT_WIDTHS = {768: "SD v1", 1024: "SD v2", 2048: "SDXL base", 1280: "SDXL refiner"}


class LoRA(Adapter):
    """A kohya-ss or diffusers/PEFT LoRA file (SD v1, v2, SDXL; LoCon convs included), merged or unmerged."""

    def __init__(self, path: str | Path, scale: float = 1.0, text_scale: float | None = None, merge: bool = True,
                 strict: bool = True):
        self._scale = _multiplier("scale", scale)
        self._text_scale = None if text_scale is None else _multiplier("text_scale", text_scale)
        if not isinstance(merge, bool) or not isinstance(strict, bool):
            raise TypeError(f"lora: merge and strict must be true or false; got merge={merge!r}, strict={strict!r}")
        self.path, self.merge, self.strict = Path(path), merge, strict
        self.file = read_lora_file(self.path)
        self._plan: list[tuple[Target, LowRank]] | None = None
        self._backups: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(weight) -> (weight, copy)
        self._undo: list[Any] = []  # hook handles and fused-projection restorers, in the order made
        self._pipeline = None

    # ---- multipliers ---------------------------------------------------------------------------------

    @property
    def scale(self) -> float:
        return self._scale

    @scale.setter
    def scale(self, value: float) -> None:
        self._rescale(_multiplier("scale", value), self._text_scale)

    @property
    def text_scale(self) -> float:
        return self._scale if self._text_scale is None else self._text_scale

    @text_scale.setter
    def text_scale(self, value: float | None) -> None:
        self._rescale(self._scale, None if value is None else _multiplier("text_scale", value))

    def _rescale(self, scale: float, text_scale: float | None) -> None:
        old = {part: self.multiplier(part) for part in ("unet", "text")}
        self._scale, self._text_scale = scale, text_scale
        if self.merge and self._pipeline is not None:  # add the difference: LoRAs merged after this one stay
            self._merge_all({part: self.multiplier(part) - old[part] for part in old})

    def multiplier(self, part: str) -> float:
        return self.text_scale if part == "text" else self._scale

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "path": str(self.path), "scale": self._scale, "text_scale": self._text_scale,
                "merge": self.merge}

    # ---- the adapter contract ------------------------------------------------------------------------

    def check(self, pipeline) -> None:
        self._plan = self._resolve(pipeline)
        if self.merge:
            # A weight that is not a Parameter is computed per call (int8_weights dequantises it): a delta merged
            # into it would change a copy and the LoRA would silently do nothing.
            computed = [target.path for target, _ in self._plan if not isinstance(target.weight, torch.nn.Parameter)]
            if computed:
                raise AdapterError(f"LoRA '{self.path.name}' cannot merge into {len(computed)} module(s) whose weight "
                                   f"is computed at each call, e.g. {computed[0]} (held in int8 by int8_weights?): "
                                   f"detach that adapter, attach the LoRA, then attach it again; or pass merge=False")

    def apply(self, pipeline) -> None:
        self._plan = self._plan or self._resolve(pipeline)
        self._pipeline = pipeline
        if self.merge:
            self._merge_all()
        else:
            self._hook_all()

    def remove(self, pipeline) -> None:
        self._restore()
        for undo in reversed(self._undo):
            undo.remove() if hasattr(undo, "remove") else undo()
        self._undo.clear()
        self._plan, self._pipeline = None, None

    # ---- resolving names -----------------------------------------------------------------------------

    def _resolve(self, pipeline) -> list[tuple[Target, LowRank]]:
        table = lora_targets(pipeline)
        plan, unmatched, misfits = [], [], []
        for name, pair in self.file.modules.items():
            target = table.get(name)
            if target is None:
                unmatched.append(name)
            elif _fitted_shape(pair, target) != target.shape():
                misfits.append(f"{name}: down {tuple(pair.down.shape)}, up {tuple(pair.up.shape)} vs the pipeline's "
                               f"{target.path} weight {target.shape()}")
            else:
                plan.append((target, pair))
        if misfits:
            raise AdapterError(f"LoRA '{self.path.name}' does not fit this pipeline ({_pipeline_side(pipeline)}): "
                               f"{len(misfits)} module(s) have other shapes, e.g. {misfits[0]}. "
                               f"{self._made_for()}")
        if unmatched and (self.strict or not plan):
            raise AdapterError(f"LoRA '{self.path.name}': {len(unmatched)} of {len(self.file.modules)} module name(s) "
                               f"match nothing in this pipeline ({_pipeline_side(pipeline)}): "
                               f"{', '.join(unmatched[:6])}{' ...' if len(unmatched) > 6 else ''}. "
                               f"{self._made_for()}" + ("" if not plan else " To apply the modules that do match, "
                                                          "pass strict=False"))
        if unmatched:
            import warnings
            warnings.warn(f"LoRA '{self.path.name}': {len(unmatched)} module(s) match nothing and are skipped: "
                          f"{', '.join(unmatched[:6])}", stacklevel=3)
        return plan

    def _made_for(self) -> str:
        """What the file's own names and shapes say it was made for."""
        names = self.file.modules
        if any(name.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) for name in names):
            return "The file has two text encoders' modules (lora_te1_/lora_te2_): it is an SDXL LoRA."
        widths = {pair.down.shape[1] for name, pair in names.items() if "attn2" in name and name.endswith("to_k")}
        widths = {w for w in widths if w in _CONTEXT_WIDTHS}
        if widths:
            width = widths.pop()
            return f"Its cross-attention reads {width}-wide text: it was made for {_CONTEXT_WIDTHS[width]}."
        return "Load the base model it was trained on."

    # ---- merged --------------------------------------------------------------------------------------

    @torch.no_grad()
    def _merge_all(self, multipliers: dict[str, float] | None = None) -> None:
        """Add each delta times its part's multiplier (or the given ones), copying each weight first."""
        for target, pair in self._plan:
            weight = target.weight
            if id(weight) not in self._backups:
                self._backups[id(weight)] = (weight, weight.detach().clone())
            multiplier = self.multiplier(target.part) if multipliers is None else multipliers[target.part]
            delta = multiplier * pair.delta().reshape(target.shape()).to(weight.device)
            # On the Parameter itself (not .data): its version counter moves, so caches of it (the CPU fast
            # path's packed convolution weights) see the change.
            view = weight if target.rows is None else weight[target.rows]
            view.copy_((view.float() + delta).to(weight.dtype))

    @torch.no_grad()
    def _restore(self) -> None:
        for weight, copy in self._backups.values():
            weight.copy_(copy)
        self._backups.clear()

    # ---- unmerged ------------------------------------------------------------------------------------

    def _hook_all(self) -> None:
        fused: dict[int, list[tuple[Target, LowRank]]] = {}
        for target, pair in self._plan:
            if target.rows is not None:
                fused.setdefault(id(target.module), []).append((target, pair))
                continue
            branch = _branch(target, pair)
            part = target.part

            def hook(module, inputs, output, branch=branch, part=part):
                return output + self.multiplier(part) * branch(inputs[0])

            self._undo.append(target.module.register_forward_hook(hook))
        for pairs in fused.values():
            self._undo.append(_patch_fused(pairs, self.multiplier))


def _multiplier(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"lora: {name} must be a finite number (the LoRA's multiplier, 1.0 = as trained); got {value!r}")
    return float(value)


def _fitted_shape(pair: LowRank, target: Target) -> tuple[int, ...]:
    """The weight shape the pair makes, read the way the target takes it (a 1x1 conv pair on a Linear and a
    Linear pair on a 1x1 conv are the same matrix: SD v1 and v2 differ there)."""
    out, _ = pair.up.shape[:2]
    shape = (out, *pair.down.shape[1:])
    wanted = target.shape()
    if len(wanted) == 2 and len(shape) == 4 and shape[2:] == (1, 1):
        return shape[:2]
    if len(wanted) == 4 and len(shape) == 2 and wanted[2:] == (1, 1):
        return (*shape, 1, 1)
    return shape


def _branch(target: Target, pair: LowRank):
    """x -> scale * up(down(x)) as the target computes it (same stride and padding for a conv)."""
    module, weight = target.module, target.weight
    down = pair.down.to(weight.device, weight.dtype)
    up = pair.up.to(weight.device, weight.dtype)
    scale = pair.scale
    if isinstance(module, nn.Conv2d):
        down = down if down.ndim == 4 else down[:, :, None, None]
        up = up if up.ndim == 4 else up[:, :, None, None]
        stride, padding, dilation = module.stride, module.padding, module.dilation
        return lambda x: scale * F.conv2d(F.conv2d(x, down, None, stride, padding, dilation), up)
    down, up = down.flatten(1), up.flatten(1)
    return lambda x: scale * F.linear(F.linear(x, down), up)


def _patch_fused(pairs: list[tuple[Target, LowRank]], multiplier):
    """Add the q/k/v rows' branches to a fused projection (`in_projection`); returns the undo."""
    module = pairs[0][0].module
    branches = [(target.rows, _branch(target, pair)) for target, pair in pairs]
    previous = module.__dict__.get("in_projection")
    inner = module.in_projection

    def projected(x: torch.Tensor) -> torch.Tensor:
        out = inner(x)
        extra = torch.zeros_like(out)
        for rows, branch in branches:
            extra[..., rows] = branch(x)
        return out + multiplier("text") * extra

    module.in_projection = projected

    def undo() -> None:
        if previous is None:
            del module.in_projection
        else:
            module.in_projection = previous

    return undo


def _pipeline_side(pipeline) -> str:
    denoiser = pipeline.denoiser
    towers = len(text_towers(pipeline.conditioner))
    width = getattr(denoiser, "context_dim", None)
    return (f"denoiser '{denoiser.name}' with {width}-wide cross-attention, conditioner '{pipeline.conditioner.name}' "
            f"with {towers} text tower(s)")

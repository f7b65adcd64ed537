"""ControlNet (Zhang, Rao and Agrawala 2023) as an adapter: a control map steers a pipeline's LDM UNet.

    net = registry.build("adapter", "controlnet", path="control_v11p_sd15_canny.safetensors", scale=1.0)
    pipe.attach(net)
    pipe("a house", conditioning={"control": edges})   # edges: (B, 3, H, W) in [0, 1], PIL, array or file

Reads the released `control_model.*` layout (the `control_*.pth`/`.safetensors` files that hold the ControlNet
alone, and the whole-model files that also carry the SD weights, whose other keys are ignored). The network is
built from the steered UNet's own options and the file's keys and shapes must match it exactly, so a ControlNet
for another UNet is refused at attach naming both shapes.

Options: `scale` (every residual, the middle one included, as cldm's control_scales), `start`/`end` (the
fraction of the sampling steps it acts on), `guess_mode` (cldm's: the unconditional side gets no control and
residual i of n is weighted 0.825 ** (n - 1 - i)), `preprocess="canny"` (edges of a photo, scikit-image), and
`input_key` (default "control"; give a second ControlNet another key to feed it its own map).
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any, Mapping

import torch

from latentgen.adapters.control_maps import active_steps, control_batch
from latentgen.adapters.controlnet_model import ControlNetModel
from latentgen.contracts.adapter import Adapter
from latentgen.errors import AdapterError, CheckpointError
from latentgen.interop.weights_file import WeightsFile

PREFIX = "control_model."
_HINT_FACTOR = 8  # input_hint_block's three stride-2 convs: the map is 8x the latent grid
_GUESS_DECAY = 0.825  # cldm's guess-mode weight per level (0.825 ** (12 - i) for SD's 13 residuals)
_instances = itertools.count()


class ControlNet(Adapter):
    """A ControlNet in the released `control_model.*` layout, for the pipeline's LDM UNet."""

    def __init__(self, path: str | Path, scale: float = 1.0, start: float = 0.0, end: float = 1.0,
                 guess_mode: bool = False, preprocess: str | None = None, input_key: str = "control"):
        for name, value in (("scale", scale), ("start", start), ("end", end)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise TypeError(f"controlnet: {name} must be a number; got {value!r}")
        if not 0 <= start < end <= 1:
            raise ValueError(f"controlnet: start and end are fractions of the sampling steps with 0 <= start < end "
                             f"<= 1; got start={start}, end={end}")
        if preprocess not in (None, "canny"):
            raise ValueError(f"controlnet: preprocess={preprocess!r}; choose 'canny' (edges of a photo) or none")
        self.path = Path(path)
        self.scale, self.start, self.end = float(scale), float(start), float(end)
        self.guess_mode, self.preprocess, self.input_key = bool(guess_mode), preprocess, str(input_key)
        self.input_keys = (self.input_key,)
        self._gate_key = f"{self.input_key}:gate:{next(_instances)}"  # this net's per-sample scale and window
        try:
            self._weights = WeightsFile(self.path)
        except CheckpointError as exc:
            raise AdapterError(f"ControlNet file: {exc}") from None
        self._keys = {key[len(PREFIX):]: key for key in self._weights.keys() if key.startswith(PREFIX)}
        if not self._keys:
            hint = (" It is in diffusers' ControlNetModel layout (controlnet_cond_embedding): latentgen reads the "
                    "original control_model.* files" if any("controlnet_cond_embedding" in key
                                                             for key in self._weights.keys()) else "")
            raise AdapterError(f"'{self.path}' holds no ControlNet: no '{PREFIX}*' keys (first keys: "
                               f"{sorted(self._weights.keys())[:4]}).{hint}")
        self.hint_channels = self._weights.shape(self._keys.get("input_hint_block.0.weight", ""))[1] \
            if "input_hint_block.0.weight" in self._keys else 3
        self.model: ControlNetModel | None = None
        self._pipeline = None

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "path": str(self.path), "scale": self.scale, "start": self.start, "end": self.end,
                "guess_mode": self.guess_mode, "preprocess": self.preprocess, "input_key": self.input_key}

    # ---- attaching -------------------------------------------------------------------------------------

    def check(self, pipeline) -> None:
        self._built(pipeline)

    def _built(self, pipeline) -> ControlNetModel:
        """The network on the meta device, built from the pipeline's UNet, checked against the file."""
        from latentgen.denoisers.unet import UNet

        unet = pipeline.denoiser
        if not isinstance(unet, UNet):
            raise AdapterError(f"ControlNet '{self.path.name}' steers an LDM UNet; this pipeline's denoiser is "
                               f"'{unet.name}'")
        if unet.patch_size != 1:  # its hint and residuals are at the latent resolution
            raise AdapterError(f"ControlNet '{self.path.name}' steers a UNet that works at the latent resolution; "
                               f"this pipeline's UNet folds {unet.patch_size}x{unet.patch_size} patches "
                               f"(patch_size={unet.patch_size}), which no ControlNet is made for")
        params = {key: value for key, value in unet.build_params.items()}
        in_key = "input_blocks.0.0.weight"
        if in_key in self._keys:
            params["in_channels"] = self._weights.shape(self._keys[in_key])[1]
        with torch.device("meta"):
            model = ControlNetModel(params, self.hint_channels)
        wanted = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
        have = {name: self._weights.shape(key) for name, key in self._keys.items()}
        missing = sorted(set(wanted) - set(have))
        extra = sorted(set(have) - set(wanted))
        misfit = [name for name in sorted(set(wanted) & set(have)) if wanted[name] != have[name]]
        if missing or extra or misfit:
            side = (f"the pipeline's UNet (model_channels {unet.model_channels}, context_dim {unet.context_dim}, "
                    f"{len(unet.input_blocks)} input blocks)")
            if misfit:
                name = misfit[0]
                detail = f"its {PREFIX}{name} is {have[name]}, {side} needs {wanted[name]}"
            else:
                detail = (f"{side} needs {len(missing)} weights the file lacks (first: {missing[:3]}) and the file has "
                          f"{len(extra)} it has no place for (first: {extra[:3]})")
            raise AdapterError(f"ControlNet '{self.path.name}' is for another UNet: {detail}. Use the ControlNet made "
                               f"for this base model")
        return model

    def apply(self, pipeline) -> None:
        model = self._built(pipeline)
        reference = next(pipeline.denoiser.parameters())
        tensors = {name: self._weights.tensor(key, reference.dtype).to(reference.device)
                   for name, key in self._keys.items()}
        model.load_state_dict(tensors, strict=True, assign=True)
        self.model = model.eval().requires_grad_(False)
        self._pipeline = pipeline
        pipeline.denoiser.residual_sources.append(self._residuals)

    def remove(self, pipeline) -> None:
        sources = pipeline.denoiser.residual_sources
        sources[:] = [source for source in sources if source != self._residuals]
        self.model, self._pipeline = None, None

    # ---- computing -------------------------------------------------------------------------------------

    def _residuals(self, x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor]):
        hint = cond.get(self.input_key)
        if hint is None or self.model is None:
            return None
        gate = cond.get(self._gate_key)  # (B, 3): scale, t above which it acts (exclusive), t up to which
        if gate is None:
            weights = torch.full((x.shape[0],), self.scale, device=x.device)
        else:
            gate = gate.to(x.device)
            t = t.to(gate.dtype)
            weights = gate[:, 0] * ((t > gate[:, 1]) & (t <= gate[:, 2])).to(gate.dtype)
        if not bool(weights.any()):
            return None
        outs = self.model(x, hint, t, cond)
        count = len(outs)
        soft = [_GUESS_DECAY ** (count - 1 - i) if self.guess_mode else 1.0 for i in range(count)]
        return [out * (weights * level).view(-1, 1, 1, 1).to(out.dtype) for out, level in zip(outs, soft)]

    def conditioning(self, inputs: Mapping[str, Any], *, batch_size: int, image_size: tuple[int, int],
                     sigmas: torch.Tensor, device: torch.device) -> tuple[dict, dict]:
        latent_h, latent_w = self._pipeline.latent_size(*image_size)
        size = (latent_h * _HINT_FACTOR, latent_w * _HINT_FACTOR)
        try:
            hint = control_batch(inputs[self.input_key], batch_size, size, self.preprocess, self.input_key)
        except (TypeError, ValueError, FileNotFoundError) as exc:
            raise type(exc)(f"ControlNet '{self.path.name}': {exc}") from None
        if hint.shape[1] != self.hint_channels:
            raise ValueError(f"ControlNet '{self.path.name}' reads {self.hint_channels}-channel maps; got "
                             f"{hint.shape[1]} channels")
        steps = len(sigmas) - 1
        active = active_steps(steps, self.start, self.end)
        process = self._pipeline.process  # the time the UNet is given for a sigma, as the denoiser computes it
        t_of = lambda sigma: float(process.network_time(sigma.double().reshape(1)).float())  # noqa: E731
        if active:
            high = t_of(sigmas[active[0]])
            low = t_of(sigmas[active[-1] + 1]) if active[-1] + 1 < steps else -math.inf
        else:
            high, low = -math.inf, math.inf
        def gate(scale: float) -> torch.Tensor:
            return torch.tensor([[scale, low, high]], device=device).expand(batch_size, 3)
        hint = hint.to(device)
        cond = {self.input_key: hint, self._gate_key: gate(self.scale)}
        uncond = {self.input_key: hint, self._gate_key: gate(0.0 if self.guess_mode else self.scale)}
        return cond, uncond

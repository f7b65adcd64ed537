"""The original Stable Diffusion XL single file (base and refiner, Stability AI's sgm layout) as a registered
checkpoint format."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from latentgen.contracts.checkpoint_format import CheckpointFormat


class SDXLFormat(CheckpointFormat):
    """An original SDXL base or refiner .safetensors: `model.diffusion_model.*`, `conditioner.embedders.*`.

    Loading takes `original_config` (the sgm inference YAML; without it, the released base or refiner config,
    told apart by the keys), `dtype` (each tensor is read straight into it), `device`, and the fast path's
    `channels_last` (default on) and `compile`; saving writes the
    same layout (`dtype` to cast the weights), passing a loaded file's other tensors through.
    """

    suffixes = (".safetensors",)

    def sniff(self, path: Path) -> bool:
        from latentgen.interop.sdxl import is_sdxl_checkpoint

        return is_sdxl_checkpoint(path)

    def config(self, path: Path, original_config: Any = None, **options: Any) -> dict[str, Any]:
        from latentgen.interop.sdxl import header_config

        return header_config(path, original_config)

    def load(self, path: Path, original_config: Any = None, dtype: Any = None, device: Any = None,
             channels_last: bool = True, compile: bool = False) -> Any:
        from latentgen.interop.sdxl import load_sdxl

        return load_sdxl(path, original_config=original_config, dtype=dtype, device=device,
                         channels_last=channels_last, compile=compile)

    def save(self, pipeline: Any, path: Path, dtype: Any = None) -> Path:
        from latentgen.interop.sdxl import save_sdxl

        return save_sdxl(pipeline, path, dtype=dtype)

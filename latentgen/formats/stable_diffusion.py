"""The original Stable Diffusion single file (v1 and v2 families) as a registered checkpoint format."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from latentgen.contracts.checkpoint_format import CheckpointFormat


class StableDiffusionFormat(CheckpointFormat):
    """An original Stable Diffusion v1/v2 single file: .safetensors with `cond_stage_model.*` keys, or a .ckpt.

    Loading takes the options of `latentgen.interop.stable_diffusion.load_pipeline` (`original_config`,
    `use_ema`, `prediction_type`, `channels_last`, `compile`, `device`, `dtype`); saving writes the
    original layout (`dtype` to cast the weights), passing a loaded file's other tensors through.
    """

    suffixes = (".safetensors", ".ckpt")

    def sniff(self, path: Path) -> bool:
        from latentgen.interop.stable_diffusion import is_original_checkpoint

        return is_original_checkpoint(path)

    def load(self, path: Path, original_config: Any = None, dtype: Any = None, device: Any = None,
             use_ema: bool | None = None, prediction_type: str | None = None, channels_last: bool = True,
             compile: bool = False) -> Any:
        from latentgen.interop.stable_diffusion import load_pipeline

        return load_pipeline(path, original_config=original_config, dtype=dtype, device=device, use_ema=use_ema,
                             prediction_type=prediction_type, channels_last=channels_last, compile=compile)

    def config(self, path: Path, original_config: Any = None, prediction_type: str | None = None,
               **options: Any) -> dict[str, Any] | None:
        """From a .safetensors header (keys and shapes, or the config latentgen recorded there); None for a
        .ckpt, whose keys only unpickling it shows."""
        from latentgen.interop.stable_diffusion import header_config

        return header_config(path, original_config, prediction_type)

    def save(self, pipeline: Any, path: Path, dtype: Any = None) -> Path:
        from latentgen.interop.stable_diffusion import save_original

        return save_original(pipeline, path, dtype=dtype)

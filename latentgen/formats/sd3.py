"""Stable Diffusion 3 / 3.5 single files (medium and large, Stability AI's layout) as a registered checkpoint
format."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from latentgen.contracts.checkpoint_format import CheckpointFormat


class SD3Format(CheckpointFormat):
    """An SD3 / SD3.5 .safetensors: `model.diffusion_model.joint_blocks.*` (MMDiT), `first_stage_model.*` and, in
    all-in-one files, `text_encoders.{clip_l,clip_g,t5xxl}.transformer.*`.

    Loading takes `clip_l`, `clip_g`, `t5xxl` (separate text-encoder files, as SD3.5 ships them), `t5`
    (false: zeros in T5's place; default: T5 when its weights are there), `t5_tokenizer` (spiece.model or
    tokenizer.json; default: one found beside the checkpoint), `text_heads` (CLIP head counts for non-standard
    widths), `dtype`, `device`, `channels_last`, `compile`. Saving writes the all-in-one layout.
    """

    suffixes = (".safetensors",)

    def sniff(self, path: Path) -> bool:
        from latentgen.interop.sd3 import is_sd3_checkpoint

        return is_sd3_checkpoint(path)

    def config(self, path: Path, t5: bool | None = None, t5_tokenizer: Any = None,
               text_heads: Mapping[str, int] | None = None, clip_l: Any = None, clip_g: Any = None,
               t5xxl: Any = None, **options: Any) -> dict[str, Any]:
        from latentgen.interop.sd3 import header_config

        return header_config(path, t5=t5, t5_tokenizer=t5_tokenizer, text_heads=text_heads, clip_l=clip_l,
                             clip_g=clip_g, t5xxl=t5xxl)

    def load(self, path: Path, dtype: Any = None, device: Any = None, t5: bool | None = None,
             t5_tokenizer: Any = None, text_heads: Mapping[str, int] | None = None, clip_l: Any = None,
             clip_g: Any = None, t5xxl: Any = None, channels_last: bool = False, compile: bool = False) -> Any:
        from latentgen.interop.sd3 import load_sd3

        return load_sd3(path, dtype=dtype, device=device, t5=t5, t5_tokenizer=t5_tokenizer, text_heads=text_heads,
                        channels_last=channels_last, compile=compile, clip_l=clip_l, clip_g=clip_g, t5xxl=t5xxl)

    def save(self, pipeline: Any, path: Path, dtype: Any = None) -> Path:
        from latentgen.interop.sd3 import save_sd3

        return save_sd3(pipeline, path, dtype=dtype)

"""Inference speed-ups that leave what a pipeline computes unchanged (up to summation order).

`optimize_for_inference(pipe)` is what `load_pipeline` applies by default to a Stable Diffusion
checkpoint; `benchmarks/sd_cpu.py` measures each lever on its own. What it does:

- channels-last weights for the denoiser and the codec (oneDNN convolutions on the CPU then run in
  NHWC without reordering their input and output each call, and the spatial transformers'
  (B, C, H, W) -> (B, HW, C) reshape becomes a view). On a 2-core AVX-512 CPU, SD v1 at 512x512, it
  made the VAE decode 22-28 % faster in fp32 and bf16 and the bf16 UNet step 6-8 % faster in each of
  four runs; the fp32 UNet step moved by -4 % to +9 %, within that machine's noise;
- `compile=True`: `torch.compile` of the denoiser. Off by default: the first call of each input shape
  compiles (7.3 s for the first SD step against 3.8 s, with inductor's on-disk cache warm; a cold
  cache takes longer) for a 5-10 % faster step afterwards with torch's flash attention, 3 % (within
  noise) with the blocked bf16 attention below, which is an opaque operator inside the graph (one graph, no
  recompilation per block); at one thread a step measured 9.22 s compiled and eager alike.

One more CPU lever is chosen per call rather than here, since it only applies to bf16: on a CPU without AMX,
attention with at least 256 keys runs blocked (`latentgen.nn.blocked_attention`), about 2x faster than torch's
flash kernel at SD's 4096 tokens there, with the scores rounded to bf16; with AMX, torch's flash kernel is faster
and runs instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from latentgen.pipeline import LatentDiffusionPipeline


def optimize_for_inference(pipe: "LatentDiffusionPipeline", channels_last: bool | None = True,
                           compile: bool = False) -> "LatentDiffusionPipeline":
    """Apply the speed-ups in place and return `pipe`; `pipe.fast_path` records which are on.
    `channels_last=None` leaves the weight layout as it is (e.g. as the checkpoint format loaded it)."""
    record = dict(getattr(pipe, "fast_path", None) or {"channels_last": False, "compile": False})
    if channels_last is not None:
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        for module in (pipe.denoiser, pipe.codec):
            module.to(memory_format=memory_format)  # only 4-D parameters (conv weights) change layout
        record["channels_last"] = channels_last
    if compile and not record["compile"]:
        pipe.denoiser.compile(dynamic=False)
        record["compile"] = True
    pipe.fast_path = record
    return pipe

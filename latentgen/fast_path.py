"""Inference speed-ups that leave what a pipeline computes unchanged (up to summation order).

`optimize_for_inference(pipe)` is what `load_pipeline` applies by default to a Stable Diffusion
checkpoint; `benchmarks/sd_cpu.py` measures each lever on its own. What it does:

- channels-last weights for the denoiser and the codec (oneDNN convolutions on the CPU then run in
  NHWC without reordering their input and output each call, and the spatial transformers'
  (B, C, H, W) -> (B, HW, C) reshape becomes a view). On a 2-core AVX-512 CPU, SD v1 at 512x512, it
  made the VAE decode 22-28 % faster in fp32 and bf16 and the bf16 UNet step 6-8 % faster in each of
  four runs; the fp32 UNet step moved by -4 % to +9 %, within that machine's noise;
- `reuse_memory=True` (load_pipeline's default on the CPU): glibc keeps freed memory in the process instead
  of returning each large block to the kernel, so a step's activations land in pages already mapped
  (about 150,000 page faults per bf16 SD v1 step at 512x512 otherwise; 2.37 -> 2.12 s per step at two threads
  on the project's 2-core CPU; `latentgen.freed_memory`);
- `pack_weights=True` (load_pipeline's default): the denoiser's convolutions keep their weights reordered
  for oneDNN (`latentgen.nn.packed_convolution`): bf16 CPU inference at latents of at most 32x32 no longer
  reorders each weight on every call (2.12 -> 2.00 s per SD v1 step at two threads), for a second copy of
  those weights (SD v1 bf16: 1.06 GiB; 3.00 -> 3.99 GiB resident);
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

from latentgen.freed_memory import reuse_freed_memory
from latentgen.nn.packed_convolution import pack_convolutions, unpack_convolutions

if TYPE_CHECKING:
    from latentgen.pipeline import LatentDiffusionPipeline


def optimize_for_inference(pipe: "LatentDiffusionPipeline", channels_last: bool | None = True,
                           compile: bool = False, reuse_memory: bool = False,
                           pack_weights: bool | None = None) -> "LatentDiffusionPipeline":
    """Apply the speed-ups in place and return `pipe`; `pipe.fast_path` records which are on.
    `channels_last=None` leaves the weight layout as it is (e.g. as the checkpoint format loaded it);
    `reuse_memory=True` makes the process keep its freed memory for a pipeline on the CPU (process-wide, for
    good: latentgen.freed_memory); `pack_weights=True` / `False` packs the denoiser's convolution weights for
    oneDNN or unpacks them (None leaves them as they are)."""
    record = dict(getattr(pipe, "fast_path", None) or {"channels_last": False, "compile": False,
                                                       "reuse_memory": False, "pack_weights": False})
    if reuse_memory and pipe.device.type == "cpu":
        record["reuse_memory"] = reuse_freed_memory()
    if channels_last is not None:
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        for module in (pipe.denoiser, pipe.codec):
            module.to(memory_format=memory_format)  # only 4-D parameters (conv weights) change layout
        record["channels_last"] = channels_last
    if pack_weights is not None:
        (pack_convolutions if pack_weights else unpack_convolutions)(pipe.denoiser)
        record["pack_weights"] = pack_weights
    if compile and not record["compile"]:
        pipe.denoiser.compile(dynamic=False)
        record["compile"] = True
    pipe.fast_path = record
    return pipe

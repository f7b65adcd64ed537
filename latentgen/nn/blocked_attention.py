"""softmax(Q K^T / sqrt(d)) V for bf16 on the CPU, one head and one block of queries at a time.

torch's CPU flash-attention kernel runs bf16 no faster than float32 without AMX: on a 2-core AVX-512 machine, one
of SD v1's 4096-token self-attention layers (batch 2, 8 heads of 40) took 268 ms in bf16 and 254 ms in
float32, where the bf16 matmul peak is 4x the float32 one. Two batched matmuls per block of 256
queries against all keys, with the softmax between them, keep the block's scores in cache and reach
the bf16 GEMM kernels: 120 ms for that layer, 11 ms instead of 29 ms at 1024 tokens, and 43 ms instead
of 162 ms for the VAE's single 512-wide head at 4096 tokens (`benchmarks/attention_cpu.py`). A whole
bf16 SD v1 UNet step was 1.26-1.39x faster in four runs, e.g. 3.50 s -> 2.51 s (`benchmarks/sd_cpu.py`,
config `bf16-sdpa-attention` for the old path).

The softmax runs in place through a compiled kernel where one can be built (`latentgen.nn.native_kernels`).

The price is precision: the scores are rounded to bf16 before the softmax (which itself accumulates
in float32). On random inputs the relative error against float64 is 5.7e-3 where the flash kernel
gives 3.8e-3; both round the probabilities and the output to bf16.

Where the CPU has AMX tiles (Intel Xeon since Sapphire Rapids), torch's flash kernel runs bf16 on them
and wins instead: on a 2-core AMX machine the same 4096-token layer took 183 ms there against 261 ms blocked at
one thread (90 against 163 ms at two), and a bf16 SD v1 UNet step 3.30 s against 3.67 s (1.90 against 2.32 s at
two threads; medians of three in one process). So by default the blocked path runs only where AMX is missing
(`blocked_attention(True)` forces it, `False` rules it out).

Everything else (float32, other devices, masks, short key sequences such as a 77-token text context,
inputs that need gradients) goes to `scaled_dot_product_attention`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from latentgen.nn.native_kernels import softmax_
from latentgen.nn.switch import Switch

# Below this many keys a block is small enough that the flash kernel's single call wins (at 77 keys,
# SD's text context, it took 8.8 ms against 17.6 ms blocked).
MIN_KEYS = 256
# Scores per block: 256 queries x 4096 keys, the fastest of the sizes tried at 4096 tokens.
BLOCK_SCORES = 2**20
# Values are padded with zero columns to a multiple of this width (see `_blocked`).
VALUE_WIDTH_MULTIPLE = 16

# None: wherever torch's flash kernel has no AMX (see the module's docstring); True / False: forced on / off.
ENABLED: Switch[bool | None] = Switch(None)


def _cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles, which torch's CPU flash-attention kernel runs bf16 on."""
    check = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private in torch: absent means not known
    try:
        return bool(check()) if check is not None else False
    except RuntimeError:
        return False


# Asked once at import, not per call: torch.compile cannot trace the query and would break the graph there.
FLASH_KERNEL_HAS_AMX = _cpu_has_amx()


def blocked_attention(enabled: bool | None):
    """Force the blocked bf16 path on (True) or off (False) inside a `with` block, to measure it or rule it out;
    None restores the default (on where the CPU has no AMX)."""
    return ENABLED.set(enabled)


def uses_blocked_path(q: torch.Tensor, k: torch.Tensor, attn_mask: torch.Tensor | None = None) -> bool:
    """Whether `dot_product_attention` takes the blocked path for these inputs."""
    enabled = not FLASH_KERNEL_HAS_AMX if ENABLED.value is None else ENABLED.value
    return (
        enabled
        and q.device.type == "cpu"
        and q.dtype == torch.bfloat16
        and attn_mask is None
        and q.shape[:-2] == k.shape[:-2]  # broadcast leading dims are left to torch
        and k.shape[-2] >= MIN_KEYS
        and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad))
    )


def dot_product_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """q (..., N, d), k and v (..., L, d) with the same leading dims -> (..., N, d); scale d^-1/2.

    Same contract as `F.scaled_dot_product_attention(q, k, v, attn_mask)` without dropout.
    """
    if (not uses_blocked_path(q, k, attn_mask) or v.shape[:-1] != k.shape[:-1]
            or (torch.is_grad_enabled() and v.requires_grad)):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    return blocked_attention_op(q, k, v)


def _blocked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    *lead, n_queries, dim = q.shape
    n_keys, value_dim = k.shape[-2], v.shape[-1]
    # The scale goes on the queries before the first matmul: a bf16 multiply of N x d values rather
    # than of the N x L scores.
    q = (q * dim**-0.5).reshape(-1, n_queries, dim)
    keys_t = k.reshape(-1, n_keys, dim).transpose(1, 2)  # (heads, d, L)
    # Zero columns up to a multiple of 16 leave the product's first columns as they are, and the
    # bf16 GEMM runs whole vector tiles: P V with 40 columns took 0.19 ms per 256 x 4096 block,
    # with 48 columns 0.13 ms.
    padded_dim = -(-value_dim // VALUE_WIDTH_MULTIPLE) * VALUE_WIDTH_MULTIPLE
    v = v.reshape(-1, n_keys, value_dim)
    if padded_dim != value_dim:
        v = F.pad(v, (0, padded_dim - value_dim))
    out = q.new_empty(q.shape[0], n_queries, padded_dim)
    rows = max(1, min(n_queries, BLOCK_SCORES // n_keys))
    for head in range(q.shape[0]):
        head_keys_t, head_v = keys_t[head : head + 1], v[head : head + 1]
        for start in range(0, n_queries, rows):
            scores = torch.bmm(q[head : head + 1, start : start + rows], head_keys_t)  # (1, rows, L)
            torch.bmm(softmax_(scores), head_v, out=out[head : head + 1, start : start + rows])
    out = out[..., :value_dim].contiguous() if padded_dim != value_dim else out
    return out.view(*lead, n_queries, value_dim)  # contiguous, as the fake below says


# An opaque operator to torch.compile: traced, the loops would unroll into thousands of graph nodes (256 blocks
# per 4096-token layer) for no gain, since each block is already two GEMM calls; and as an operator rather than
# a compiler-disabled function it breaks no graph, so a compiled UNet stays one graph (weights prepacked once
# with inductor's freezing, no recompilation per block).
@torch.library.custom_op("latentgen::blocked_attention", mutates_args=())
def blocked_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return _blocked(q, k, v)


@blocked_attention_op.register_fake
def _blocked_shape(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return q.new_empty(*q.shape[:-1], v.shape[-1])

"""The attention layers of SD v1 at 512x512 on this CPU: torch's kernel against the blocked bf16 path.

One row per layer shape of the UNet (CFG batch 2) and the VAE decoder, with how many such layers a UNet
step or a decode runs. Times are the best of --repeats after one warm-up call; errors are relative to
a float64 computation of the same inputs.

    python benchmarks/attention_cpu.py [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from latentgen.nn.blocked_attention import dot_product_attention, uses_blocked_path

# name, (batch, heads, queries, keys, head width), layers of this shape per UNet step or VAE decode
SHAPES = [
    ("UNet self 64x64", (2, 8, 4096, 4096, 40), 5),
    ("UNet self 32x32", (2, 8, 1024, 1024, 80), 5),
    ("UNet self 16x16", (2, 8, 256, 256, 160), 5),
    ("UNet self 8x8", (2, 8, 64, 64, 160), 1),
    ("UNet cross 64x64", (2, 8, 4096, 77, 40), 5),
    ("VAE mid 64x64", (1, 1, 4096, 4096, 512), 1),
]


def best_time(call, repeats: int) -> float:
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return min(times)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).norm() / b.norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{torch.get_num_threads()} threads")
    # The last three columns are latentgen's dot_product_attention, which sends short key sequences to
    # sdpa itself: `path` says which one ran.
    header = (f"{'layer':<18}{'count':>6}{'fp32 sdpa ms':>13}{'bf16 sdpa ms':>13}{'bf16 latentgen ms':>18}"
              f"{'path':>8}{'speed-up':>9}{'sdpa err':>10}{'latentgen err':>14}")
    print(header)
    totals = {"sdpa": 0.0, "blocked": 0.0}
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for name, (batch, heads, queries, keys, width), count in SHAPES:
            q = torch.randn(batch, heads, queries, width, generator=generator)
            k, v = (torch.randn(batch, heads, keys, width, generator=generator) for _ in range(2))
            reference = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
            qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
            fp32_s = best_time(lambda: F.scaled_dot_product_attention(q, k, v), args.repeats)
            sdpa_s = best_time(lambda: F.scaled_dot_product_attention(qb, kb, vb), args.repeats)
            blocked_s = best_time(lambda: dot_product_attention(qb, kb, vb), args.repeats)
            blocked_err = rel_err(dot_product_attention(qb, kb, vb), reference)
            path = "blocked" if uses_blocked_path(qb, kb) else "sdpa"
            sdpa_err = rel_err(F.scaled_dot_product_attention(qb, kb, vb), reference)
            if name.startswith("UNet"):
                totals["sdpa"] += count * sdpa_s
                totals["blocked"] += count * blocked_s
            print(f"{name:<18}{count:>6}{1e3 * fp32_s:>13.1f}{1e3 * sdpa_s:>13.1f}{1e3 * blocked_s:>18.1f}{path:>8}"
                  f"{sdpa_s / blocked_s:>8.2f}x{sdpa_err:>10.1e}{blocked_err:>14.1e}")
    print(f"\nUNet step, all attention layers: bf16 sdpa {totals['sdpa']:.2f} s, "
          f"dot_product_attention {totals['blocked']:.2f} s (it takes sdpa where keys < 256)")


if __name__ == "__main__":
    main()

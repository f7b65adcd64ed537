"""Decoding one SD v1 latent (4 x 64 x 64 -> 512 x 512) with the full KL decoder and with the tiny TAESD decoder
on this CPU, in float32 and bf16: seconds (median of --repeats after a warm-up) and GFLOP (torch's count).

    python benchmarks/tiny_decoder.py [--threads 2] [--repeats 3] [--size 512]

Random weights at the released sizes (time only): the SD v1 VAE decoder (`kl`: 128 channels, [1, 2, 4, 4],
2 res blocks, mid-block attention) and TAESD's (`taesd`: 64 channels, 3 upsamplings, 1.2 M parameters).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).parent))
from sd_cpu import timed  # noqa: E402

from latentgen.assembly import build_component  # noqa: E402

CODECS = {
    "SD v1 VAE decoder (kl)": {"name": "kl", "latent_channels": 4, "channels": 128, "channel_mult": [1, 2, 4, 4],
                               "num_res_blocks": 2, "scale_factor": 0.18215},
    "TAESD decoder (taesd)": {"name": "taesd", "latent_channels": 4, "channels": 64, "downsamplings": 3},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    latent = torch.randn(1, 4, args.size // 8, args.size // 8)
    print(f"torch {torch.__version__}, {args.threads} threads; one {args.size}x{args.size} decode, median of "
          f"{args.repeats}\n")
    print("| decoder | parameters | GFLOP | float32 s | bf16 s | bf16 vs full decoder |")
    print("|---|---|---|---|---|---|")
    full = None
    for label, config in CODECS.items():
        codec = build_component("codec", dict(config)).eval()
        parameters = sum(p.numel() for name, p in codec.named_parameters() if name.startswith("decoder"))
        with torch.no_grad():
            with FlopCounterMode(display=False) as counter:
                codec.decode(latent)
            fp32 = timed(lambda: codec.decode(latent), args.repeats)[0]
            low = codec.to(torch.bfloat16).to(memory_format=torch.channels_last)
            bf16 = timed(lambda: low.decode(latent.to(torch.bfloat16)), args.repeats)[0]
        full = full or bf16
        print(f"| {label} | {parameters / 1e6:.2f} M | {counter.get_total_flops() / 1e9:.0f} | {fp32:.2f} | "
              f"{bf16:.2f} | {full / bf16:.1f}x faster |")


if __name__ == "__main__":
    main()

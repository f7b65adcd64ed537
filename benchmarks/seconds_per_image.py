"""Seconds per 512x512 SD v1 image on this CPU, prompt to decoded image, exact and with each accelerator.

Random weights at SD v1's sizes (the checkpoint sd_cpu.py writes; a random TAESD decoder for the tiny-decoder
rows), bf16, load_pipeline's default fast path: the figures are time only. One process, one pipeline; each
configuration attaches its adapters, runs one warm-up image, then --repeats images (seeds 0, 1, ...) and
reports the median, split into sampling (text encoding included) and decoding, the process's resident memory
while the adapters are attached, and an accelerated configuration's relative error ||z - z_exact|| / ||z_exact||
of the final latents (seed 0) against the same configuration without the approximation (EXACT).

    python benchmarks/seconds_per_image.py [--configs cfg20,lcm4,lcm4-tiny,...] [--repeats 2] [--threads N]

The configurations: 20-step CFG (Euler, guidance 7.5, UNet batch 2), and 4-step LCM at guidance 1 (UNet batch
1; `scheduler=lcm grid=lcm`, as an LCM / LCM-LoRA model samples), each with the full VAE decoder or the tiny
one, and with token merging (ratio 0.5), deep-feature reuse (DeepCache, interval 2 on LCM's 4 steps, 3 on
20) or int8 weights.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from sd_cpu import CHECKPOINT_VERSION, ensure_checkpoint, matmul_peak, proc_status_gib  # noqa: E402

from latentgen import registry  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a photograph of an astronaut riding a horse"

# name -> (scheduler, grid, steps, guidance, adapters as (registered name, options))
CONFIGS: dict[str, tuple] = {
    "cfg20": ("euler", None, 20, 7.5, []),
    "cfg20-tome": ("euler", None, 20, 7.5, [("token_merging", {"ratio": 0.5})]),
    "cfg20-deepcache": ("euler", None, 20, 7.5, [("deep_cache", {"interval": 3})]),
    "lcm4": ("lcm", "lcm", 4, 1.0, []),
    "lcm4-tiny": ("lcm", "lcm", 4, 1.0, [("tiny_decoder", {})]),
    "lcm4-tiny-tome": ("lcm", "lcm", 4, 1.0, [("tiny_decoder", {}), ("token_merging", {"ratio": 0.5})]),
    "lcm4-tiny-deepcache": ("lcm", "lcm", 4, 1.0, [("tiny_decoder", {}), ("deep_cache", {"interval": 2})]),
    "lcm4-tiny-int8": ("lcm", "lcm", 4, 1.0, [("tiny_decoder", {}), ("int8_weights", {})]),
}
# An accelerated configuration's error is measured against the same configuration without its approximation.
EXACT = {"cfg20-tome": "cfg20", "cfg20-deepcache": "cfg20", "lcm4-tiny-tome": "lcm4-tiny",
         "lcm4-tiny-deepcache": "lcm4-tiny", "lcm4-tiny-int8": "lcm4-tiny"}


def random_tiny_decoder(path: Path) -> Path:
    """A TAESD decoder with random weights in the published layout (what the adapter reads)."""
    from latentgen.codecs.taesd import TinyAutoencoder
    from latentgen.training.distill_decoder import save_decoder

    torch.manual_seed(0)
    return save_decoder(TinyAutoencoder(latent_channels=4, channels=64, downsamplings=3), path, {})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, from {list(CONFIGS)}")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--spec", type=Path, default=REPO.parent / "shared" / "spec" / "sd-v1-keys.tsv")
    parser.add_argument("--file", type=Path,
                        default=Path(tempfile.gettempdir()) / f"sd-v1-random-v{CHECKPOINT_VERSION}.safetensors")
    args = parser.parse_args()
    configs = args.configs.split(",")
    unknown = [name for name in configs if name not in CONFIGS]
    if unknown:
        parser.error(f"unknown configs {unknown}; choose from {list(CONFIGS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    from latentgen.interop.stable_diffusion import load_pipeline

    ensure_checkpoint(args.spec, args.file)
    pipe = load_pipeline(args.file, dtype=torch.bfloat16)
    work = Path(tempfile.mkdtemp())
    tiny_path = random_tiny_decoder(work / "taesd_decoder.safetensors")
    # The same machine has measured 964 and 415 GFLOP/s here on different days: quote it with the times.
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, 2048^3 bf16 matmul "
          f"{matmul_peak('bfloat16'):.0f} GFLOP/s; SD v1 512x512, bf16, random weights\n")
    print("| configuration | UNet calls x batch | sampling s | decode s | s / image | vs cfg20 | RSS GiB | "
          "latent error vs exact |")
    print("|---|---|---|---|---|---|---|---|")
    base, latents_of = None, {}
    for name in configs:
        scheduler, grid, steps, guidance, adapters = CONFIGS[name]
        pipe.scheduler = registry.build("scheduler", scheduler)
        attached = [pipe.attach(registry.build("adapter", adapter, **({"path": str(tiny_path)}
                                                                     if adapter == "tiny_decoder" else options)))
                    for adapter, options in adapters]
        options = dict(steps=steps, guidance_scale=guidance, height=512, width=512, output_type="latent")
        if grid:
            options["grid"] = grid
        pipe([PROMPT], seed=0, **{**options, "steps": 1})  # warm-up: oneDNN primitives for these shapes
        pipe.decode(torch.zeros(1, 4, 8, 8, dtype=torch.bfloat16))
        sampling, decoding = [], []
        for seed in range(args.repeats):
            start = time.perf_counter()
            latents = pipe([PROMPT], seed=seed, **options)
            middle = time.perf_counter()
            pipe.decode(latents)
            sampling.append(middle - start)
            decoding.append(time.perf_counter() - middle)
            if seed == 0:
                latents_of[name] = latents.float()
        resident = proc_status_gib("VmRSS") or 0.0  # while attached: int8 weights' saving shows here
        for adapter in reversed(attached):
            pipe.detach(adapter)
        sample_s, decode_s = statistics.median(sampling), statistics.median(decoding)
        total = sample_s + decode_s
        base = total if name == "cfg20" else base
        ratio = f"{base / total:.1f}x" if base else "-"
        exact = latents_of.get(EXACT.get(name, ""))
        error = f"{((latents_of[name] - exact).norm() / exact.norm()).item():.3f}" if exact is not None else "-"
        print(f"| {name} | {steps} x {2 if guidance > 1 else 1} | {sample_s:.1f} | {decode_s:.2f} | {total:.1f} | "
              f"{ratio} | {resident:.2f} | {error} |", flush=True)


if __name__ == "__main__":
    main()

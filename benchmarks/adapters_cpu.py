"""Adapters on this CPU, Stable Diffusion v1 at full size (random weights: time, not quality):

- seconds per 512x512 image: 20-step CFG (Euler, guidance 7.5, UNet batch 2) against 4-step LCM at guidance 1
  (`scheduler=lcm grid=lcm`, UNet batch 1), sampling and decode separately; the LCM run with a rank-64
  LoRA on every attention and feed-forward projection (LCM-LoRA's size), merged and unmerged;
- LoRA training seconds per step (batch 1, bf16 autocast, gradient checkpointing, rank 8 on the attention
  projections, AdamW) at 256 and 512 px, and with checkpointing off at 256, with each process's peak RSS.

Each configuration runs in its own process (peak RSS is its own) on the random fp16 checkpoint that
benchmarks/sd_cpu.py writes (kept in --file).

    python benchmarks/adapters_cpu.py [--threads 2] [--configs cfg20,lcm4,...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sd_cpu import CHECKPOINT_VERSION, ensure_checkpoint, matmul_peak, peak_rss_gib  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SAMPLING = {  # name -> (scheduler, grid, steps, guidance, lora merge: None = no LoRA)
    "cfg20": ("euler", "discrete", 20, 7.5, None),
    "lcm4": ("lcm", "lcm", 4, 1.0, None),
    "lcm4-lora-merged": ("lcm", "lcm", 4, 1.0, True),
    "lcm4-lora-unmerged": ("lcm", "lcm", 4, 1.0, False),
}
TRAINING = {  # name -> (image size, gradient checkpointing)
    "train256": (256, True),
    "train512": (512, True),
    "train256-no-checkpointing": (256, False),
    "train512-no-checkpointing": (512, False),
}


def lora_file(pipe, path: Path, rank: int = 64) -> Path:
    """A random kohya-format LoRA on every attention / feed-forward projection of the UNet (LCM-LoRA's scope)."""
    import safetensors.torch
    import torch

    from latentgen.adapters.lora_training import _ATTENTION
    from latentgen.adapters.module_names import kohya_names, lora_targets

    names, tensors = kohya_names(pipe), {}
    generator = torch.Generator().manual_seed(0)
    for target in {t.path: t for t in lora_targets(pipe).values() if t.part == "unet"}.values():
        if not _ATTENTION.search(target.path) or isinstance(target.module, torch.nn.Conv2d) and \
                target.module.kernel_size != (1, 1):
            continue
        out, width = target.shape()[:2]
        name = names[target.path]
        tensors[f"{name}.lora_down.weight"] = torch.randn(rank, width, generator=generator) * width ** -0.5
        tensors[f"{name}.lora_up.weight"] = torch.randn(out, rank, generator=generator) * 0.01
        tensors[f"{name}.alpha"] = torch.tensor(float(rank))
    safetensors.torch.save_file(tensors, str(path))
    return path


def run_sampling(name: str, checkpoint: Path, work: Path) -> dict:
    import torch

    from latentgen import registry
    from latentgen.interop.stable_diffusion import load_pipeline

    scheduler, grid, steps, guidance, merge = SAMPLING[name]
    pipe = load_pipeline(checkpoint, dtype=torch.bfloat16)
    pipe.scheduler = registry.build("scheduler", scheduler)
    row = {"config": name}
    if merge is not None:
        start = time.perf_counter()
        pipe.attach(registry.build("adapter", "lora", path=lora_file(pipe, work / "lora.safetensors"), merge=merge))
        row["attach_s"] = time.perf_counter() - start
    options = dict(steps=steps, guidance_scale=guidance, grid=grid, height=512, width=512, output_type="latent")
    pipe(["a photograph of an astronaut riding a horse"], seed=0, **{**options, "steps": 1})  # warm-up
    times = []
    for seed in range(2):
        start = time.perf_counter()
        latents = pipe(["a photograph of an astronaut riding a horse"], seed=seed, **options)
        times.append(time.perf_counter() - start)
    start = time.perf_counter()
    pipe.decode(latents)
    row.update(sample_s=statistics.median(times), decode_s=time.perf_counter() - start, peak_rss_gib=peak_rss_gib())
    return row


def run_training(name: str, checkpoint: Path, steps: int = 3) -> dict:
    import torch

    from latentgen import registry
    from latentgen.interop.stable_diffusion import load_pipeline
    from latentgen.training.precision import Precision

    size, checkpointing = TRAINING[name]
    pipe = load_pipeline(checkpoint, dtype=torch.float32, channels_last=False)
    for module in pipe.modules():
        module.requires_grad_(False)
    adapter = pipe.attach(registry.build("adapter", "trainable_lora", rank=8))
    pipe.denoiser.train()
    pipe.denoiser.gradient_checkpointing = checkpointing
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=1e-4)
    precision = Precision("bf16", torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, size // 8, size // 8, generator=generator)
    with torch.no_grad():
        context = pipe.conditioner.encode_ids(pipe.conditioner.tokenize(["a photo of sks dog"]))
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        sigma = pipe.model.sample_training_sigmas(1, generator)
        noise = torch.randn(latents.shape, generator=generator)
        x = latents + noise * sigma.view(-1, 1, 1, 1).float()
        with precision.autocast():
            output, _, _ = pipe.model.network_output(x, sigma, {"crossattn": context})
            loss = (output.float() - pipe.model.training_target(latents, x, sigma).float()).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return {"config": name, "step_s": statistics.median(times[1:]), "first_step_s": times[0],
            "trained_parameters": sum(p.numel() for p in adapter.parameters()), "peak_rss_gib": peak_rss_gib()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=REPO.parent / "shared" / "spec" / "sd-v1-keys.tsv")
    parser.add_argument("--file", type=Path,
                        default=Path(tempfile.gettempdir()) / f"sd-v1-random-v{CHECKPOINT_VERSION}.safetensors")
    parser.add_argument("--configs", default=",".join([*SAMPLING, *TRAINING]))
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's, one per physical core)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        row = run_sampling(args.one, args.file, args.work) if args.one in SAMPLING else run_training(args.one, args.file)
        print(json.dumps(row))
        return
    configs = args.configs.split(",")
    unknown = [name for name in configs if name not in SAMPLING and name not in TRAINING]
    if unknown:
        parser.error(f"unknown configs {unknown}; choose from {[*SAMPLING, *TRAINING]}")
    ensure_checkpoint(args.spec, args.file)
    print(f"{torch.get_num_threads()} threads; 2048^3 bf16 matmul: {matmul_peak('bfloat16'):.0f} GFLOP/s")
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for name in configs:
            command = [sys.executable, __file__, "--file", str(args.file), "--one", name, "--work", work,
                       "--threads", str(torch.get_num_threads())]
            out = subprocess.run(command, capture_output=True, text=True)
            if out.returncode:
                print(f"{name}: failed\n{out.stderr[-2000:]}")
                continue
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    sampled = [row for row in rows if "sample_s" in row]
    if sampled:
        print("\nSD v1 bf16, 512x512, one image (sampling from pure noise; decode separately)")
        print(f"{'config':<22}{'sample s':>9}{'decode s':>9}{'s/image':>9}{'attach s':>9}{'peak RSS GiB':>13}")
        for row in sampled:
            attach = f"{row['attach_s']:.1f}" if "attach_s" in row else "-"
            print(f"{row['config']:<22}{row['sample_s']:>9.1f}{row['decode_s']:>9.1f}"
                  f"{row['sample_s'] + row['decode_s']:>9.1f}{attach:>9}{row['peak_rss_gib']:>13.2f}")
    trained = [row for row in rows if "step_s" in row]
    if trained:
        print("\nLoRA training step (batch 1, bf16 autocast, rank 8 on the attention projections, AdamW)")
        print(f"{'config':<28}{'s/step':>8}{'1st step s':>11}{'trained params':>15}{'peak RSS GiB':>13}")
        for row in trained:
            print(f"{row['config']:<28}{row['step_s']:>8.1f}{row['first_step_s']:>11.1f}"
                  f"{row['trained_parameters']:>15,}{row['peak_rss_gib']:>13.2f}")


if __name__ == "__main__":
    main()

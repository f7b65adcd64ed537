"""Stable Diffusion XL base at full size on this CPU: loading memory, one guided UNet step, VAE decode.

Builds a random fp16 SDXL base file with every key and shape of ../shared/spec/sdxl-base-keys.tsv (6.9 GB, the
size of the released file; kept in --file for later runs), then for each configuration, in its own process so
that peak RSS is its own:

- load: `LatentDiffusionPipeline.from_checkpoint(file, dtype=bfloat16)` (the `sdxl` format, tensor by tensor),
  its seconds and the process's peak RSS when it returns (imports included): the issue's bound is 8 GB;
- VAE decode of one 128x128 latent to a 1024x1024 image, and the peak RSS it adds;
- s/step: one UNet call with classifier-free guidance (batch 2, a 77-token 2048-wide context, the 2816-wide
  vector) at 1024x1024 and at 768x768 (128x128 and 96x96 latents), median of --repeats after a warm-up call;
- relative error ||y - y_ref|| / ||y_ref|| of the UNet output (1024) and the decoded image against the first
  configuration (the levers change summation order only).

    python benchmarks/sdxl_cpu.py [--configs bf16,bf16-plain,bf16-sdpa-attention] [--repeats 1]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sd_cpu import matmul_peak, peak_rss_gib, timed, write_random_checkpoint  # shared with the v1 benchmark

REPO = Path(__file__).resolve().parents[1]
# name -> (load options, lever turned back to its slower alternative or None); the first is the reference.
CONFIGS = {
    "bf16": ({}, None),
    "bf16-plain": ({"channels_last": False}, None),
    "bf16-sdpa-attention": ({}, "sdpa_attention"),
}
SIZES = (1024, 768)
CHECKPOINT_VERSION = "1"  # in the file's metadata: a file from another version of make_checkpoint is rebuilt


def make_checkpoint(spec: Path, path: Path) -> None:
    write_random_checkpoint(spec, path, {"latentgen_random_sdxl_base": CHECKPOINT_VERSION})


def checkpoint_version(path: Path) -> str | None:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as file:
        return (file.metadata() or {}).get("latentgen_random_sdxl_base")


def run_config(name: str, path: Path, reference: Path, repeats: int) -> dict:
    import torch

    from latentgen.pipeline import LatentDiffusionPipeline

    options, lever = CONFIGS[name]
    levers = contextlib.ExitStack()  # held until the function returns
    if lever == "sdpa_attention":  # torch's flash kernel instead of the blocked bf16 path
        from latentgen.nn.blocked_attention import blocked_attention

        levers.enter_context(blocked_attention(False))
    row: dict = {"config": name, "rss_before_load_gib": peak_rss_gib()}
    start = time.perf_counter()
    pipe = LatentDiffusionPipeline.from_checkpoint(path, dtype=torch.bfloat16, **options)
    row["load_s"], row["load_peak_rss_gib"] = time.perf_counter() - start, peak_rss_gib()
    row["params_b"] = sum(p.numel() for m in pipe.modules() for p in m.parameters()) / 1e9

    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        latent = torch.randn(1, 4, 128, 128, generator=generator)
        row["decode_s"], _, image = timed(lambda: pipe.decode(latent), repeats)
        row["decode_adds_gib"] = peak_rss_gib() - row["load_peak_rss_gib"]
        context = torch.randn(2, 77, 2048, generator=generator).bfloat16()
        vector = torch.randn(2, 2816, generator=generator).bfloat16()
        for size in SIZES:
            x = torch.randn(2, 4, size // 8, size // 8, generator=generator).bfloat16()
            step = lambda: pipe.denoiser(x, torch.tensor([500.0, 500.0]), {"crossattn": context, "vector": vector})
            row[f"step_{size}_s"], row[f"first_step_{size}_s"], out = timed(step, repeats)
            if size == SIZES[0]:
                unet_out = out.float()
    row["peak_rss_gib"] = peak_rss_gib()
    if reference.exists():
        ref = torch.load(reference)
        row["unet_rel_err"] = ((unet_out - ref["unet"]).norm() / ref["unet"].norm()).item()
        row["image_rel_err"] = ((image - ref["image"]).norm() / ref["image"].norm()).item()
    else:
        torch.save({"unet": unet_out, "image": image}, reference)
    levers.close()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=REPO.parent / "shared" / "spec" / "sdxl-base-keys.tsv")
    parser.add_argument("--file", type=Path,
                        default=Path(tempfile.gettempdir()) / f"sdxl-base-random-v{CHECKPOINT_VERSION}.safetensors")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, from {list(CONFIGS)}")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's, one per physical core)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--make", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--reference", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.make:
        make_checkpoint(args.spec, args.file)
        return
    if args.one:
        print(json.dumps(run_config(args.one, args.file, args.reference, args.repeats)))
        return

    configs = args.configs.split(",")
    unknown = [name for name in configs if name not in CONFIGS]
    if unknown:
        parser.error(f"unknown configs {unknown}; choose from {list(CONFIGS)}")
    version = checkpoint_version(args.file) if args.file.exists() else None
    if args.file.exists() and version is None:
        print(f"{args.file} was not written by this script's make_checkpoint: measuring it as given")
    elif version != CHECKPOINT_VERSION:  # in a child process: the parent stays small while the others run
        start = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--make", "--spec", str(args.spec), "--file", str(args.file)],
                       check=True)
        print(f"wrote {args.file} ({args.file.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - start:.0f} s")
    print(f"{torch.get_num_threads()} threads; 2048^3 matmul: bf16 {matmul_peak('bfloat16'):.0f} GFLOP/s; "
          f"file {args.file.stat().st_size / 1e9:.2f} GB")

    rows = []
    with tempfile.TemporaryDirectory() as work:
        reference = Path(work) / "reference.pt"
        for name in configs:
            command = [sys.executable, __file__, "--file", str(args.file), "--one", name, "--reference",
                       str(reference), "--repeats", str(args.repeats), "--threads", str(torch.get_num_threads())]
            out = subprocess.run(command, capture_output=True, text=True)
            if out.returncode:
                print(f"{name}: failed\n{out.stderr[-2000:]}")
                continue
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    if not rows:
        sys.exit("no configuration ran (above)")
    print(f"\nSDXL base, {rows[0]['params_b']:.2f} B parameters in bf16; UNet step: CFG batch 2; decode: one image")
    print(f"{'config':<21}{'load s':>7}{'load peak RSS GiB':>18}{'dec 1024 s':>11}{'dec adds GiB':>13}"
          f"{'1024 s/step':>12}{'768 s/step':>11}{'peak RSS GiB':>13}{'UNet err':>10}{'image err':>10}")
    for row in rows:
        errors = (f"{row['unet_rel_err']:>10.1e}{row['image_rel_err']:>10.1e}" if "unet_rel_err" in row
                  else f"{'(ref)':>10}{'(ref)':>10}")
        print(f"{row['config']:<21}{row['load_s']:>7.1f}{row['load_peak_rss_gib']:>18.2f}{row['decode_s']:>11.1f}"
              f"{row['decode_adds_gib']:>13.2f}{row['step_1024_s']:>12.1f}{row['step_768_s']:>11.1f}"
              f"{row['peak_rss_gib']:>13.2f}{errors}")


if __name__ == "__main__":
    main()

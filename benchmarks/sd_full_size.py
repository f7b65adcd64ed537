"""Full-size Stable Diffusion v1 on this CPU: load a random checkpoint with every key and shape of
../shared/spec/sd-v1-keys.tsv, then a 512x512 txt2img with 2 steps and classifier-free guidance.

Prints, per dtype: load time, sampling time (2 UNet steps of batch 2 + text encoding + VAE decode),
and peak resident memory of the process. Each dtype runs in its own process so peaks are its own.

    python benchmarks/sd_full_size.py [--spec ../shared/spec/sd-v1-keys.tsv] [--file /tmp/sd-v1-random.safetensors]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make_checkpoint(spec: Path, path: Path) -> None:
    """Random fp16 weights (the common distribution format) for every key of the spec."""
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for line in spec.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape = line.split("\t")
        dims = () if shape == "scalar" else tuple(int(n) for n in shape.split("x"))
        if key.endswith(("norm.weight", "norm1.weight", "norm2.weight", "norm3.weight", "norm_out.weight",
                         "ln_final.weight", "layer_norm1.weight", "layer_norm2.weight", "final_layer_norm.weight")) \
                or ".in_layers.0.weight" in key or ".out_layers.0.weight" in key or key.endswith("out.0.weight"):
            tensors[key] = torch.ones(dims, dtype=torch.float16)
        elif len(dims) >= 2:
            fan_in = 1
            for n in dims[1:]:
                fan_in *= n
            tensors[key] = (torch.randn(dims, generator=generator) / fan_in**0.5).half()
        else:
            tensors[key] = torch.zeros(dims, dtype=torch.float16)
    save_file(tensors, str(path))


def run_one(path: Path, dtype_name: str) -> dict:
    import torch

    from latentgen.interop.stable_diffusion import load_pipeline

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    start = time.perf_counter()
    pipe = load_pipeline(path, dtype=dtype)
    loaded = time.perf_counter()
    images = pipe(["a photograph of an astronaut riding a horse"], steps=2, guidance_scale=7.5, seed=0,
                  height=512, width=512)
    sampled = time.perf_counter()
    assert images[0].size == (512, 512)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"dtype": dtype_name, "load_s": round(loaded - start, 1), "txt2img_2_steps_s": round(sampled - loaded, 1),
            "peak_rss_mib": round(peak_mib)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=REPO.parent / "shared" / "spec" / "sd-v1-keys.tsv")
    parser.add_argument("--file", type=Path, default=Path("/tmp/sd-v1-random.safetensors"))
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.file, args.one)))
        return
    if not args.file.exists():
        start = time.perf_counter()
        make_checkpoint(args.spec, args.file)
        print(f"wrote {args.file} ({args.file.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - start:.0f} s")
    rows = []
    for dtype in args.dtypes.split(","):
        out = subprocess.run([sys.executable, __file__, "--file", str(args.file), "--one", dtype],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{'dtype':<10} {'load s':>8} {'txt2img 512x512, 2 steps s':>28} {'peak RSS MiB':>14}")
    for row in rows:
        print(f"{row['dtype']:<10} {row['load_s']:>8} {row['txt2img_2_steps_s']:>28} {row['peak_rss_mib']:>14}")


if __name__ == "__main__":
    main()

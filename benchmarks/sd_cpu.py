"""Stable Diffusion v1 at full size on this CPU: speed, memory and accuracy of each precision and option.

Builds a random checkpoint with every key and shape of ../shared/spec/sd-v1-keys.tsv (fp16, the usual
distribution format; kept in --file for later runs), then for each configuration, in its own process
so that peak RSS is its own:

- s/step: one UNet call at 512x512 with classifier-free guidance (batch 2, 64x64 latents, a 77-token
  context), median of --repeats after one warm-up call;
- GFLOP/s from torch.utils.flop_counter's count of that call, and that rate as a percent of the
  bf16 matmul peak measured at the start (2048^3). The counter does not see the CPU attention kernel,
  so a second rate adds the attention FLOPs (4 * B * heads * N * L * d per layer, from the shapes);
- VAE decode: one 64x64 latent to a 512x512 image, median of --repeats;
- peak RSS of the process (load included);
- relative error ||y - y_fp32|| / ||y_fp32|| of the UNet output and of the decoded image against the
  plain fp32 configuration (which runs first and writes the reference).

`--txt2img` also times a whole 20-step 512x512 CFG generation (text encoding, sampling, decoding)
for the configurations it names.

    python benchmarks/sd_cpu.py [--configs fp32-plain,fp32,bf16-plain,bf16] [--txt2img bf16]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# name -> (dtype, load_pipeline options, lever turned back to its slower alternative or None).
# "plain" switches the channels-last layout off; the last three undo one built-in lever each.
CONFIGS = {
    "fp32-plain": ("float32", {"channels_last": False}, None),
    "fp32": ("float32", {}, None),
    "bf16-plain": ("bfloat16", {"channels_last": False}, None),
    "bf16": ("bfloat16", {}, None),
    "bf16-compile": ("bfloat16", {"compile": True}, None),
    "bf16-sdpa-attention": ("bfloat16", {}, "sdpa_attention"),
    "bf16-math-attention": ("bfloat16", {}, "math_attention"),
    "bf16-groupnorm-copy": ("bfloat16", {}, "groupnorm_copy"),
}
REFERENCE = "fp32-plain"


# Written into the file's metadata; a file from another version of make_checkpoint is rebuilt.
# Version 2: attention `to_out.0.weight` matrices are random, no longer all ones (version 1 matched
# them as the UNet's final norm `out.0.weight`).
CHECKPOINT_VERSION = "2"


def make_checkpoint(spec: Path, path: Path) -> None:
    write_random_checkpoint(spec, path, {"latentgen_random_sd_v1": CHECKPOINT_VERSION})


def write_random_checkpoint(spec: Path, path: Path, metadata: dict[str, str]) -> None:
    """Random fp16 weights (the common distribution format) for every key of a spec file: 1-D weights (the
    norms' scales) 1, other vectors 0, matrices and kernels randn / sqrt(fan_in)."""
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for line in spec.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape = line.split("\t")
        dims = () if shape == "scalar" else tuple(int(n) for n in shape.split("x"))
        if len(dims) == 1 and key.endswith(".weight"):
            tensors[key] = torch.ones(dims, dtype=torch.float16)
        elif len(dims) >= 2:
            fan_in = 1
            for n in dims[1:]:
                fan_in *= n
            tensors[key] = (torch.randn(dims, generator=generator) / fan_in**0.5).half()
        else:
            tensors[key] = torch.zeros(dims, dtype=torch.float16)
    save_file(tensors, str(path), metadata=metadata)


def ensure_checkpoint(spec: Path, path: Path) -> None:
    """Write the random checkpoint at `path` unless this version of it is there; a file this script did not
    write (a real checkpoint) is measured as given and never overwritten."""
    version = checkpoint_version(path) if path.exists() else None
    if path.exists() and version is None:  # a real checkpoint, or one written before versions: used as given
        print(f"{path} was not written by this script's make_checkpoint: measuring it as given")
    elif version != CHECKPOINT_VERSION:  # missing, or an older file of this script's: the only files it overwrites
        start = time.perf_counter()
        make_checkpoint(spec, path)
        print(f"wrote {path} ({path.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - start:.0f} s")


def checkpoint_version(path: Path) -> str | None:
    """The make_checkpoint version that wrote `path`, or None for any other file."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as file:
        return (file.metadata() or {}).get("latentgen_random_sd_v1")


def matmul_peak(dtype_name: str, size: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of a size^3 matmul, best of `repeats`."""
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def attention_flops(denoiser, call) -> tuple[int, object]:
    """(FLOPs of the attention products (Q K^T and P V) in one call that torch's flop counter does not
    see, from the layers' input shapes; the call's result). The counter misses the CPU SDPA kernel but
    counts the matmuls of the blocked bf16 path, so those layers are left out here."""
    from latentgen.nn.attention import Attention
    from latentgen.nn.blocked_attention import uses_blocked_path

    total = [0]

    def count(module, args, kwargs):
        x = args[0]
        context = kwargs.get("context", args[1] if len(args) > 1 else None)
        context = x if context is None else context
        if not uses_blocked_path(x, context):  # x and context stand in for q and k: same dtype, same N and L
            total[0] += 4 * x.shape[0] * module.heads * x.shape[1] * context.shape[1] * module.dim_head

    hooks = [m.register_forward_pre_hook(count, with_kwargs=True) for m in denoiser.modules() if isinstance(m, Attention)]
    try:
        result = call()
    finally:
        for hook in hooks:
            hook.remove()
    return total[0], result


def peak_rss_gib() -> float:
    """This process's peak resident memory. /proc's VmHWM (Linux), not getrusage's ru_maxrss: that one carries
    over fork and exec, so a child started by a parent holding 6 GB reports at least 6 GB."""
    peak = proc_status_gib("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def proc_status_gib(field: str) -> float | None:
    """A memory field of /proc/self/status (VmHWM: peak resident, VmRSS: resident now) in GiB; None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def timed(call, repeats: int) -> tuple[float, float, object]:
    """(median seconds of `repeats` calls, seconds of the first call before them, the last result)."""
    start = time.perf_counter()
    result = call()  # warm-up: oneDNN primitive creation, torch.compile's compilation
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - start)
    return statistics.median(times), first, result


def run_config(name: str, path: Path, reference: Path, repeats: int, txt2img: bool) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from latentgen.interop.stable_diffusion import load_pipeline

    dtype_name, options, lever = CONFIGS[name]
    dtype = getattr(torch, dtype_name)
    # Held until this function returns: a context manager entered without a reference to it is
    # collected at once, and its exit undoes the setting.
    levers = contextlib.ExitStack()
    if lever in ("sdpa_attention", "math_attention"):  # torch's kernels instead of the blocked bf16 path
        from latentgen.nn.blocked_attention import blocked_attention

        levers.enter_context(blocked_attention(False))
    if lever == "math_attention":  # the unfused softmax(QK^T)V instead of the flash kernel
        from torch.nn.attention import SDPBackend, sdpa_kernel

        levers.enter_context(sdpa_kernel(SDPBackend.MATH))
    elif lever == "groupnorm_copy":  # GroupNorm through a float32 copy of the feature map and a cast back
        from latentgen.nn.normalization import GroupNorm32

        GroupNorm32.forward = lambda self, x: torch.nn.functional.group_norm(
            x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)
    start = time.perf_counter()
    pipe = load_pipeline(path, dtype=dtype, **options)
    load_s = time.perf_counter() - start

    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 64, 64, generator=generator)
    context = torch.randn(2, 77, 768, generator=generator)
    timesteps = torch.tensor([500.0, 500.0])
    decode_latent = torch.randn(1, 4, 64, 64, generator=generator)
    inputs = (latents.to(dtype), timesteps, {"crossattn": context.to(dtype)})

    with torch.inference_mode():
        step_s, first_s, unet_out = timed(lambda: pipe.denoiser(*inputs), repeats)
        unet_out = unet_out.float()
        row = {"config": name, "load_s": load_s, "step_s": step_s, "first_step_s": first_s}
        if name == REFERENCE:  # the same network whatever the config: count once, uncompiled
            counter = FlopCounterMode(display=False)
            with counter:
                attention, _ = attention_flops(pipe.denoiser, lambda: pipe.denoiser(*inputs))
            row["gflop"] = counter.get_total_flops() / 1e9
            row["attention_gflop"] = attention / 1e9
        row["decode_s"], _, image = timed(lambda: pipe.decode(decode_latent), max(1, repeats - 1))

    if txt2img:
        start = time.perf_counter()
        pipe(["a photograph of an astronaut riding a horse"], steps=20, guidance_scale=7.5, seed=0,
             height=512, width=512)
        row["txt2img_s"] = time.perf_counter() - start
    if name == REFERENCE:
        torch.save({"unet": unet_out, "image": image}, reference)
    elif reference.exists():
        ref = torch.load(reference)
        row["unet_rel_err"] = ((unet_out - ref["unet"]).norm() / ref["unet"].norm()).item()
        row["image_rel_err"] = ((image - ref["image"]).norm() / ref["image"].norm()).item()
    row["peak_rss_gib"] = peak_rss_gib()
    levers.close()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=REPO.parent / "shared" / "spec" / "sd-v1-keys.tsv")
    parser.add_argument("--file", type=Path, default=Path(tempfile.gettempdir()) / f"sd-v1-random-v{CHECKPOINT_VERSION}.safetensors")
    parser.add_argument("--configs", default="fp32-plain,fp32,bf16-plain,bf16",
                        help=f"comma-separated, from {list(CONFIGS)}")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's, one per physical core)")
    parser.add_argument("--txt2img", default="", help="configs that also time a 20-step 512x512 generation")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--reference", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(run_config(args.one, args.file, args.reference, args.repeats,
                                    args.one in args.txt2img.split(","))))
        return

    configs = args.configs.split(",")
    unknown = [name for name in configs if name not in CONFIGS]
    if unknown:
        parser.error(f"unknown configs {unknown}; choose from {list(CONFIGS)}")
    if REFERENCE not in configs:
        configs.insert(0, REFERENCE)  # errors are measured against it
    configs.sort(key=lambda name: name != REFERENCE)
    ensure_checkpoint(args.spec, args.file)
    peak_bf16, peak_fp32 = matmul_peak("bfloat16"), matmul_peak("float32")
    print(f"{torch.get_num_threads()} threads; 2048^3 matmul: bf16 {peak_bf16:.0f} GFLOP/s, fp32 {peak_fp32:.0f} GFLOP/s")

    rows = []
    with tempfile.TemporaryDirectory() as work:
        reference = Path(work) / "reference.pt"
        for name in configs:
            command = [sys.executable, __file__, "--file", str(args.file), "--one", name, "--reference", str(reference),
                       "--repeats", str(args.repeats), "--txt2img", args.txt2img, "--threads", str(torch.get_num_threads())]
            out = subprocess.run(command, capture_output=True, text=True)
            if out.returncode:
                print(f"{name}: failed\n{out.stderr[-2000:]}")
                continue
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))

    if not rows or rows[0]["config"] != REFERENCE:
        sys.exit(f"the {REFERENCE} reference run failed (above): no FLOP count or errors to report")
    print(f"\nUNet: 512x512, CFG batch 2; FLOPs per step: {rows[0]['gflop']:.0f} G counted + "
          f"{rows[0]['attention_gflop']:.0f} G attention (not counted by torch on CPU)")
    header = (f"{'config':<21}{'load s':>7}{'1st step s':>11}{'s/step':>8}{'GFLOP/s':>9}{'% bf16 pk':>10}{'w/ attn':>9}"
              f"{'VAE dec s':>10}{'20-step s':>10}{'peak RSS GiB':>13}{'UNet err':>10}{'image err':>10}")
    print(header)
    for row in rows:
        rate = rows[0]["gflop"] / row["step_s"]
        rate_all = (rows[0]["gflop"] + rows[0]["attention_gflop"]) / row["step_s"]
        txt2img = f"{row['txt2img_s']:.1f}" if "txt2img_s" in row else "-"
        errors = (f"{row['unet_rel_err']:>10.1e}{row['image_rel_err']:>10.1e}" if "unet_rel_err" in row
                  else f"{'(ref)':>10}{'(ref)':>10}")
        print(f"{row['config']:<21}{row['load_s']:>7.1f}{row['first_step_s']:>11.1f}{row['step_s']:>8.2f}{rate:>9.0f}{100 * rate / peak_bf16:>9.0f}%"
              f"{rate_all:>9.0f}{row['decode_s']:>10.2f}{txt2img:>10}{row['peak_rss_gib']:>13.2f}{errors}")


if __name__ == "__main__":
    main()

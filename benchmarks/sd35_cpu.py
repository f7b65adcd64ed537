"""Stable Diffusion 3.5 medium at full size on this CPU in bf16: build, text encoding, one guided step, decode, memory.

Random weights (time and memory only: the images are noise). Each configuration (image size x with or without
T5) runs in its own process, so that peak RSS is its own:

- build: the modules of `latentgen.interop.sd3.standard_config("medium", t5)` are constructed on the meta device
  and cast to bf16 there (not timed: mostly imports), assembled into a `LatentDiffusionPipeline`; "build s" is
  `to_empty(device="cpu")`, the fill in place (matrices from a pool of N(0, 0.02) values drawn with a fixed seed,
  norm scales 1, biases 0: no float32 copy of any weight is ever made) and `optimize_for_inference` (channels-last
  as `load_sd3` defaults). Random weights take no reading, so this is not a load time;
- text: CLIP-L, CLIP-G and T5-XXL each encoding the prompt and the empty prompt (one batch of 2), median after a
  warm-up call; and the pipeline's own conditioning (cond + uncond, as a generation call computes it);
- 1-step image: `pipe(prompt, steps=1, guidance_scale=5, height=S, width=S)` (text, one CFG step, decode), cold;
- s/step: one CFG step through the pipeline's guided model (`ClassifierFreeGuidance` over its `ProcessDenoiser`:
  the MMDiT on a batch of 2, cond + uncond, 154 text tokens), median of --repeats after the 1-step image;
- decode: the VAE decode of one 16-channel latent (S/8 x S/8), median of --repeats;
- N-step image: text s + N x s/step + decode s, N the family's default steps (50 for medium): an estimate;
- peak RSS: the process's high-water mark (VmHWM) after all of it, so with T5 and without at 1024 it is the whole
  pipeline's (build + encode + 1 step + decode);
- GFLOP: torch's flop counter on the meta device (the MMDiT's attention runs there as matmuls, so it is counted).

T5's tokenizer: no real one exists offline, so each child writes a stand-in Unigram tokenizer.json (letters only)
in a temp dir. Prompts of up to 76 pieces pad to 77 tokens either way and T5 attends to the padding, so the cost is
that of the real tokenizer's ids. CLIP uses its own bundled tokenizer.

    python benchmarks/sd35_cpu.py [--threads 2] [--sizes 1024 512] [--t5 both|on|off] [--repeats 1]
    python benchmarks/sd35_cpu.py --smoke --threads 1      # a tiny model at 64 and 32 px: checks the script
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sd_cpu import matmul_peak, peak_rss_gib, timed  # shared with the v1 benchmark

PROMPT = "a photograph of an astronaut riding a horse"
TEXT_TOKENS = 77 + 77  # SD3's joint context: CLIP-L and CLIP-G side by side, then T5 (or 77 zero tokens)
POOL = 1 << 24  # random values copied into every weight (16 Mi bf16 values, drawn once)
GIB = 2**30


def family_config(t5: bool, tokenizer: str | None, smoke: bool) -> dict:
    """SD3.5 medium's pipeline config at its released sizes, or (smoke) the same structure at toy sizes."""
    from latentgen.interop.sd3 import standard_config

    config = copy.deepcopy(standard_config("medium", t5=t5, t5_tokenizer=tokenizer))
    if not smoke:
        return config
    config["codec"].update(channels=32, channel_mult=[1, 1, 2, 2], num_res_blocks=1)
    config["denoiser"].update(depth=2, hidden_size=128, num_heads=2, context_dim=128, vector_dim=32 + 64,
                              pos_embed_max_size=16, dual_attention_layers=[0])
    stack, text = config["conditioner"]["conditioners"]
    config["conditioner"]["context_dim"] = 128
    clip_l, clip_g = stack["conditioners"]
    clip_l.update(context_dim=32, layers=2, heads=2, intermediate_size=64)
    clip_g.update(context_dim=64, layers=2, heads=2, intermediate_size=128, projection_dim=64)
    if t5:
        text.update(d_model=128, layers=2, heads=2, d_kv=32, d_ff=256)
    else:
        text.update(width=128)
    return config


def write_t5_tokenizer(path: Path) -> Path:
    """A stand-in T5 tokenizer.json (Unigram; T5's pad 0, end 1, unknown 2; then single characters)."""
    import string

    from tokenizers import Tokenizer, models, pre_tokenizers

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(char, -3.0) for char in string.ascii_letters + string.digits + string.punctuation]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.save(str(path))
    return path


def read_status(field: str) -> float:
    """A /proc/self/status memory field (VmRSS, VmHWM) in GiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def fill_random(modules, seed: int = 0) -> None:
    """Every floating tensor of `modules` (already materialised, uninitialised) filled in place: 1-D `weight`s (the
    norms' scales) 1, 1-D `bias`es 0, everything else slices of one pool of N(0, 0.02) values at random offsets."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    pool = (torch.randn(POOL, generator=generator) * 0.02).to(torch.bfloat16)
    with torch.no_grad():
        for module in modules:
            for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
                if not tensor.is_floating_point() or tensor.numel() == 0:
                    continue
                leaf = name.rsplit(".", 1)[-1]
                if tensor.ndim == 1 and leaf == "weight":
                    tensor.fill_(1.0)
                elif tensor.ndim == 1 and leaf == "bias":
                    tensor.zero_()
                else:
                    flat, done = tensor.view(-1), 0
                    offset = int(torch.randint(POOL, (), generator=generator))
                    while done < flat.numel():
                        count = min(flat.numel() - done, POOL - offset)
                        flat[done:done + count].copy_(pool[offset:offset + count])
                        done, offset = done + count, 0


def count_gflop(pipe, config: dict, size: int) -> dict[str, float | None]:
    """GFLOP of one CFG step, one decode and each text encoder (batch 2), by torch's flop counter on the meta device
    (shapes only; the modules must still be on meta)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    def gflop(call) -> float | None:
        counter = FlopCounterMode(display=False)
        try:
            with counter, torch.inference_mode():
                call()
        except Exception as exc:  # a counter that cannot trace one part leaves that figure out
            print(f"flop count failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            return None
        return counter.get_total_flops() / 1e9

    latent_h, latent_w = pipe.latent_size(size, size)
    channels, denoiser = pipe.codec.latent_channels, config["denoiser"]
    bf16, meta = torch.bfloat16, torch.device("meta")
    x = torch.empty(2, channels, latent_h, latent_w, dtype=bf16, device=meta)
    cond = {"crossattn": torch.empty(2, TEXT_TOKENS, denoiser["context_dim"], dtype=bf16, device=meta),
            "vector": torch.empty(2, denoiser["vector_dim"], dtype=bf16, device=meta)}
    ids = torch.zeros(2, 77, dtype=torch.long, device=meta)
    clip_l, clip_g, t5 = text_members(pipe)
    return {"step_gflop": gflop(lambda: pipe.denoiser(x, torch.empty(2, device=meta), cond)),
            "decode_gflop": gflop(lambda: pipe.codec.decode(x[:1])),
            "clip_l_gflop": gflop(lambda: clip_l.encode(ids)), "clip_g_gflop": gflop(lambda: clip_g.encode(ids)),
            "t5_gflop": gflop(lambda: t5.encode(ids)) if t5 is not None else None}


def text_members(pipe):
    """(CLIP-L, CLIP-G, T5 or None) of SD3's sequence_stack[stack[clip_l, clip_g], t5_text | zero_tokens]."""
    clips, text = pipe.conditioner.conditioners
    return clips.conditioners[0], clips.conditioners[1], text if text.registry_name == "t5_text" else None


def median_seconds(call, repeats: int) -> tuple[float, object]:
    """(median seconds of `repeats` calls, the last result), no warm-up (the caller has run the same shapes)."""
    times, result = [], None
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def run_config(size: int, t5: bool, smoke: bool, repeats: int, channels_last: bool, work: Path) -> dict:
    import torch

    from latentgen.assembly import build_component
    from latentgen.diffusion.guidance import ClassifierFreeGuidance
    from latentgen.fast_path import optimize_for_inference
    from latentgen.kinds import module_parts
    from latentgen.memory import available_bytes
    from latentgen.pipeline import LatentDiffusionPipeline

    row: dict = {"size": size, "t5": t5, "rss_start_gib": read_status("VmRSS")}
    tokenizer = str(write_t5_tokenizer(work / f"t5-{os.getpid()}.json")) if t5 else None
    config = family_config(t5, tokenizer, smoke)

    start = time.perf_counter()
    with torch.device("meta"):
        modules = {kind: build_component(kind, config[kind]).to(torch.bfloat16) for kind in module_parts()}
    pipe = LatentDiffusionPipeline(**modules, scheduler=build_component("scheduler", config["scheduler"]),
                                   process=build_component("process", config["process"]), sampling=config["sampling"])
    row["params_b"] = {kind: sum(p.numel() for p in m.parameters()) / 1e9 for kind, m in modules.items()}
    weights = sum(t.numel() * t.element_size() for m in modules.values() for t in [*m.parameters(), *m.buffers()])
    row["weights_gib"] = weights / GIB
    free, headroom = available_bytes(torch.device("cpu")), 0 if smoke else 1.5 * GIB  # a 1024 decode adds ~1.2 GiB
    if free is not None and weights + headroom > free:
        raise SystemExit(f"the bf16 weights need {weights / GIB:.1f} GiB (+ {headroom / GIB:.1f} GiB to run) but "
                         f"{free / GIB:.1f} GiB is available: nothing was allocated; run when the machine is quieter")
    row["construct_s"] = time.perf_counter() - start  # on meta: imports, module code; no memory
    row.update(count_gflop(pipe, config, size))  # on meta too, before any memory is touched

    start = time.perf_counter()
    for module in modules.values():
        module.to_empty(device="cpu")
    fill_random(modules.values())
    optimize_for_inference(pipe.eval(), channels_last=channels_last)
    row["build_s"] = time.perf_counter() - start
    row["rss_built_gib"] = read_status("VmRSS")

    clip_l, clip_g, t5_member = text_members(pipe)
    prompts = [PROMPT, ""]
    with torch.inference_mode():
        for key, member in (("clip_l", clip_l), ("clip_g", clip_g), ("t5", t5_member)):
            if member is None:
                continue
            ids = member.tokenize(prompts)
            if ids.shape[1] != 77:
                raise SystemExit(f"{key}: {ids.shape[1]} tokens instead of 77; the timing would not be SD3's")
            row[f"{key}_s"], _, _ = timed(lambda: member.encode(ids), repeats)
        batch = pipe.inputs([PROMPT], None, 1)
        row["text_s"], _, (cond, uncond) = timed(
            lambda: (pipe.conditioner(batch), pipe.conditioner.unconditional(batch)), repeats)

    guidance = float(config["sampling"]["guidance_scale"])
    start = time.perf_counter()
    image = pipe([PROMPT], steps=1, guidance_scale=guidance, height=size, width=size, seed=0, output_type="tensor")
    row["one_step_image_s"] = time.perf_counter() - start
    row["peak_rss_one_step_image_gib"] = peak_rss_gib()
    row["finite"] = bool(torch.isfinite(image).all())

    latent_size = pipe.latent_size(size, size)
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(1, pipe.codec.latent_channels, *latent_size, generator=generator)
    grid = pipe.process.sigma_grid(int(config["sampling"]["steps"]), latent_size=latent_size)
    sigma = grid[len(grid) // 2].to(torch.float32)  # any level costs the same; the middle of the sampling grid
    denoise = ClassifierFreeGuidance(pipe.model, cond, uncond, guidance)
    with torch.inference_mode():
        row["step_s"], _ = median_seconds(lambda: denoise(noise, sigma), repeats)
    row["decode_s"], decoded = median_seconds(lambda: pipe.decode(noise), repeats)
    row["finite"] = row["finite"] and bool(torch.isfinite(decoded).all())
    row["steps"] = int(config["sampling"]["steps"])
    row["peak_rss_gib"] = peak_rss_gib()
    return row


def machine_line(threads: int) -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown CPU")
    import torch

    memory = {line.split(":")[0]: int(line.split()[1]) / 2**20 for line in Path("/proc/meminfo").read_text().splitlines()
              if line.startswith(("MemTotal", "MemAvailable"))}
    return (f"torch {torch.__version__}, {threads} thread{'s' if threads != 1 else ''}, {cpu} ({os.cpu_count()} logical CPUs), "
            f"{memory.get('MemTotal', 0):.1f} GiB RAM ({memory.get('MemAvailable', 0):.1f} GiB available); "
            f"2048^3 bf16 matmul: {matmul_peak('bfloat16'):.0f} GFLOP/s")


def main() -> None:
    from latentgen.interop.sd3 import load_sd3

    loader_default = inspect.signature(load_sd3).parameters["channels_last"].default
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--sizes", type=int, nargs="+", help="image sides (default 1024 512; smoke: 64 32)")
    parser.add_argument("--t5", choices=("both", "on", "off"), default="both",
                        help="with T5-XXL, without (zero_tokens in its place), or a run of each (default)")
    parser.add_argument("--repeats", type=int, default=1, help="timed calls per measurement (median)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=loader_default,
                        help=f"channels-last denoiser and codec weights (default: load_sd3's, {loader_default})")
    parser.add_argument("--smoke", action="store_true", help="a toy-sized model: checks the script in seconds")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.one:
        size, t5 = json.loads(args.one)
        print(json.dumps(run_config(size, t5, args.smoke, args.repeats, args.channels_last, args.work)))
        return

    sizes = args.sizes or ([64, 32] if args.smoke else [1024, 512])
    text = {"both": [True, False], "on": [True], "off": [False]}[args.t5]
    print(machine_line(torch.get_num_threads()))
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for size in sizes:
            for t5 in text:
                command = [sys.executable, __file__, "--one", json.dumps([size, t5]), "--work", work,
                           "--threads", str(args.threads), "--repeats", str(args.repeats),
                           "--channels-last" if args.channels_last else "--no-channels-last",
                           *(["--smoke"] if args.smoke else [])]
                start = time.perf_counter()
                out = subprocess.run(command, capture_output=True, text=True)
                label = f"{size}x{size}, {'T5' if t5 else 'no T5'}"
                if out.returncode:
                    print(f"{label}: failed\n{out.stderr[-2000:]}", flush=True)
                    continue
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(f"{label}: done in {time.perf_counter() - start:.0f} s", flush=True)
    if not rows:
        sys.exit("no configuration ran (above)")

    with_t5 = next((row for row in rows if row["t5"]), rows[0])
    params = ", ".join(f"{kind} {n:.3f} B" for kind, n in with_t5["params_b"].items())
    print(f"\nSD3.5 medium{' (SMOKE: toy sizes)' if args.smoke else ''}, bf16, random weights (time and memory "
          f"only); parameters{' with T5' if with_t5['t5'] else ''}: {params}; channels-last {args.channels_last}; "
          f"repeats {args.repeats}")
    flops = {row["size"]: row for row in rows}
    print("GFLOP (torch's count on the meta device): CFG step " + ", ".join(
        f"{size}: {sig(row.get('step_gflop'))}" for size, row in flops.items()) + "; decode " + ", ".join(
        f"{size}: {sig(row.get('decode_gflop'))}" for size, row in flops.items()) + "; text, batch 2: " + ", ".join(
        f"{name} {sig(with_t5.get(key))}" for name, key in (("CLIP-L", "clip_l_gflop"), ("CLIP-G", "clip_g_gflop"),
                                                              ("T5", "t5_gflop")) if with_t5.get(key) is not None))
    print("text: prompt + empty prompt; step: CFG (MMDiT batch 2, 154 text tokens); decode: one image; "
          "N-step image: text + N x step + decode\n")
    print("| image | T5 | build s | weights GiB | RSS built GiB | CLIP-L s | CLIP-G s | T5 s | text s | "
          "1-step image s | s / step | step GFLOP/s | decode s | decode GFLOP/s | N-step image s | peak RSS GiB |")
    print("|---|---|" + "---|" * 14)
    for row in rows:
        def rate(kind: str) -> str:
            return sig(row[f"{kind}_gflop"] / row[f"{kind}_s"]) if row.get(f"{kind}_gflop") else "-"

        n_step = row["text_s"] + row["steps"] * row["step_s"] + row["decode_s"]
        cells = [f"{row['size']}x{row['size']}", "yes" if row["t5"] else "no (zeros)",
                 *(sig(row.get(key)) for key in ("build_s", "weights_gib", "rss_built_gib", "clip_l_s", "clip_g_s",
                                                 "t5_s", "text_s", "one_step_image_s", "step_s")),
                 rate("step"), sig(row["decode_s"]), rate("decode"), f"{row['steps']}: {sig(n_step)}",
                 sig(row["peak_rss_gib"])]
        print("| " + " | ".join(cells) + " |")
    bad = [f"{row['size']}/{'T5' if row['t5'] else 'no T5'}" for row in rows if not row["finite"]]
    if bad:
        print(f"\nnon-finite images (random weights overflowed) in {bad}: the timings stand, but say so")


def sig(value: float | None, digits: int = 3) -> str:
    """`value` to about `digits` significant digits, without an exponent ("-" for None)."""
    if value is None:
        return "-"
    if value == 0:
        return "0"
    return f"{value:.{max(0, digits - 1 - math.floor(math.log10(abs(value))))}f}"


if __name__ == "__main__":
    main()

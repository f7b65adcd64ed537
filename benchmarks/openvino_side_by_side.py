"""The SD v1 UNet step at 512x512 (CFG batch 2, bf16) in latentgen and in OpenVINO, side by side in one process.

OpenVINO is the runtime CPU users pick for Stable Diffusion; latentgen does not depend on it. Install it outside
the project's environment and put it on the path for this script only:

    pip install --target /tmp/ovpkgs --no-deps openvino openvino-telemetry
    PYTHONPATH=/tmp/ovpkgs python benchmarks/openvino_side_by_side.py [--threads 1 2] [--repeats 3] [--busy]

OpenVINO's model is converted from latentgen's own UNet (`openvino.convert_model` of the float32 module with
random weights at SD v1's sizes, as sd_cpu.py writes them; cached as IR next to the checkpoint) and compiled for
bf16 inference (INFERENCE_PRECISION_HINT), one stream, latency hint, the thread count given. Both run the same
inputs, each measurement in its own process (in one process, OpenMP's spinning workers and OpenVINO's slow each
other down: at two threads OpenVINO measured 7.1 s per step beside latentgen's threads and 4.4 s beside compiled
code), alternating runtimes for --rounds rounds; a figure is the median over rounds of each process's median of
--repeats calls after --warmup untimed ones (3: a latentgen step measured 2.05, 1.98, then 1.61-1.70 s at two
threads, settling after its first calls, as a sampling run's 20 steps do). `--busy` keeps the other cores busy with a
Python loop each (what the issue measured: one thread each, the other core busy).

latentgen's configurations: `eager` (load_pipeline's default fast path), `eager-torch-ops` (the same with torch's
operators instead of latentgen's compiled kernels: fused GEGLU, GroupNorm+SiLU), `eager-malloc-as-is`
(`reuse_memory=False`: glibc returns freed blocks to the kernel as it does by default), `eager-unpacked`
(`pack_weights=False`: oneDNN reorders each convolution weight on every call), `compiled` (`compile=True`),
`eager-blocked` (the blocked bf16 attention forced on, as on a CPU without AMX) and `eager-blocked-torch-ops` (the
same without the compiled kernels: torch's softmax too).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from sd_cpu import CHECKPOINT_VERSION, ensure_checkpoint, timed  # noqa: E402

# latentgen's configurations: load_pipeline's speed-ups, and what runs per call (blocked attention: None = the
# default; latentgen's compiled kernels on or off)
DEFAULT = {"compile": False, "reuse_memory": True, "pack_weights": True, "blocked": None, "native": True}
CONFIGS = {"eager": DEFAULT, "eager-torch-ops": {**DEFAULT, "native": False},
           "eager-malloc-as-is": {**DEFAULT, "reuse_memory": False},
           "eager-unpacked": {**DEFAULT, "pack_weights": False}, "compiled": {**DEFAULT, "compile": True},
           "eager-blocked": {**DEFAULT, "blocked": True}, "eager-blocked-torch-ops": {**DEFAULT, "blocked": True,
                                                                                     "native": False}}

REPO = Path(__file__).resolve().parents[1]


class UNetCall(torch.nn.Module):
    """The UNet with positional tensor inputs, as convert_model and a fixed-signature runtime want it."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, {"crossattn": context})


def ensure_ir(checkpoint: Path, inputs: tuple[torch.Tensor, ...]) -> Path:
    """OpenVINO's IR of latentgen's float32 UNet, converted once and kept next to the checkpoint."""
    import openvino as ov

    from latentgen.interop.stable_diffusion import load_pipeline

    ir = checkpoint.with_suffix(".openvino.xml")
    if not ir.exists():
        start = time.perf_counter()
        unet = load_pipeline(checkpoint, dtype=None, channels_last=False).denoiser.eval()
        with torch.no_grad():
            model = ov.convert_model(UNetCall(unet), example_input=tuple(t.float() for t in inputs))
        ov.save_model(model, str(ir), compress_to_fp16=False)
        del unet, model
        print(f"converted latentgen's UNet to OpenVINO IR in {time.perf_counter() - start:.0f} s: {ir}")
    return ir


def openvino_model(checkpoint: Path, inputs: tuple[torch.Tensor, ...], threads: int):
    import openvino as ov

    core = ov.Core()
    ir = ensure_ir(checkpoint, inputs)
    config = {"INFERENCE_PRECISION_HINT": "bf16", "NUM_STREAMS": "1", "PERFORMANCE_HINT": "LATENCY",
              "INFERENCE_NUM_THREADS": str(threads), "ENABLE_HYPER_THREADING": "NO"}
    compiled = core.compile_model(core.read_model(str(ir)), "CPU", config)
    request = compiled.create_infer_request()
    feed = [t.float().numpy() for t in inputs]

    def call():
        return torch.from_numpy(request.infer(feed)[0].copy())

    return call


def latentgen_model(checkpoint: Path, inputs: tuple[torch.Tensor, ...], config: str):
    from latentgen.interop.stable_diffusion import load_pipeline
    from latentgen.nn.blocked_attention import blocked_attention
    from latentgen.nn.native_kernels import native_kernels

    options = dict(CONFIGS[config])
    blocked, native = options.pop("blocked"), options.pop("native")
    pipe = load_pipeline(checkpoint, dtype=torch.bfloat16, **options)
    x, t, context = (t.to(torch.bfloat16) if t.is_floating_point() and t.dim() > 1 else t for t in inputs)

    def call():
        with torch.inference_mode(), blocked_attention(blocked), native_kernels(native):
            return pipe.denoiser(x, t, {"crossattn": context}).float()

    return call


def measure(runtime: str, threads: int, repeats: int, warmup: int, checkpoint: Path,
            inputs: tuple[torch.Tensor, ...], output: Path) -> float:
    """Median seconds per step of one runtime in this process (after `warmup` calls); its output saved to
    `output`."""
    torch.set_num_threads(threads)
    call = openvino_model(checkpoint, inputs, threads) if runtime == "openvino" else \
        latentgen_model(checkpoint, inputs, runtime)
    for _ in range(warmup - 1):  # timed() makes one more: oneDNN primitives, OpenVINO's kernels, compilation
        call()
    seconds, _, result = timed(call, repeats)
    torch.save(result, output)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed calls first (a step reaches its steady speed after two or three)")
    parser.add_argument("--rounds", type=int, default=2, help="times each runtime runs, alternating")
    parser.add_argument("--configs", nargs="+", default=["eager"], choices=list(CONFIGS))
    parser.add_argument("--busy", action="store_true", help="keep every other core busy with a Python loop")
    parser.add_argument("--spec", type=Path, default=REPO.parent / "shared" / "spec" / "sd-v1-keys.tsv")
    parser.add_argument("--file", type=Path,
                        default=Path(tempfile.gettempdir()) / f"sd-v1-random-v{CHECKPOINT_VERSION}.safetensors")
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)  # runtime, threads, output file: a child
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    inputs = (torch.randn(2, 4, 64, 64, generator=generator), torch.tensor([500, 500]),
              torch.randn(2, 77, 768, generator=generator))
    if args.one:
        runtime, threads, output = args.one
        print(measure(runtime, int(threads), args.repeats, args.warmup, args.file, inputs, Path(output)))
        return
    try:
        import openvino
    except ImportError:
        sys.exit("openvino is not importable: install it outside the project (see this script's docstring) and run "
                 "with PYTHONPATH pointing there")
    ensure_checkpoint(args.spec, args.file)
    ensure_ir(args.file, inputs)  # converted once, before any timing
    print(f"torch {torch.__version__}, openvino {openvino.__version__}; SD v1 UNet, 512x512, CFG batch 2, bf16; "
          f"{'other cores busy' if args.busy else 'quiet machine'}; median of {args.repeats} calls per process after "
          f"{args.warmup} untimed, "
          f"{args.rounds} processes each, alternating\n")
    print("| threads | OpenVINO s / step | latentgen | latentgen s / step | latentgen ahead by | "
          "relative difference of the outputs |")
    print("|---|---|---|---|---|---|")
    work = Path(tempfile.mkdtemp())
    for threads in args.threads:
        spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                    for _ in range(max(0, (os.cpu_count() or 1) - threads))] if args.busy else []
        try:
            seconds: dict[str, list[float]] = {}
            for round_ in range(args.rounds):
                for runtime in ["openvino", *args.configs]:
                    # One process per measurement: OpenVINO's and OpenMP's worker threads never share a process.
                    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
                    out = subprocess.run([sys.executable, __file__, "--file", str(args.file), "--repeats",
                                          str(args.repeats), "--warmup", str(args.warmup), "--one", runtime, str(threads),
                                          str(work / f"{runtime}.pt")], capture_output=True, text=True, env=env)
                    if out.returncode:
                        sys.exit(f"{runtime} at {threads} threads failed:\n{out.stderr[-3000:]}")
                    seconds.setdefault(runtime, []).append(float(out.stdout.strip().splitlines()[-1]))
            reference = torch.load(work / "openvino.pt")
            ov_s = statistics.median(seconds["openvino"])
            for config in args.configs:
                ours = torch.load(work / f"{config}.pt")
                our_s = statistics.median(seconds[config])
                difference = ((ours - reference).norm() / reference.norm()).item()
                print(f"| {threads} | {ov_s:.2f} | {config} | {our_s:.2f} | {ov_s / our_s:.2f}x | {difference:.3f} |",
                      flush=True)
        finally:
            for spinner in spinners:
                spinner.kill()


if __name__ == "__main__":
    main()

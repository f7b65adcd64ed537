"""The quality cost of each approximate accelerator on a trained model: the shapes demo, judged and FD-scored.

Runs `latentgen-eval` on a trained shapes checkpoint (`make demo`'s, or --checkpoint) once exactly and once per
accelerator attached (`adapters=[...]`), same seed, sampler and steps, and prints judged adherence (shape,
colour and size all as asked), FD against rendered test images, and the sampling time of the 216 images.

    python benchmarks/accelerators_shapes.py [--checkpoint outputs/train/<run>/checkpoints/last.safetensors]
        [--steps 25] [--scheduler ddim]

The demo's UNet attends only at its second level (4x4 latents: 16 tokens), so token merging runs with
max_downsample 2 (at 1 it would merge nothing, and says so). Its 32x32 images make 8x8 latents and DeepCache
skips a small UNet's deep path, so the speed column says little about SD-sized models
(benchmarks/seconds_per_image.py measures those); the quality columns are what this script is for.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from lora_shapes import newest_demo_checkpoint  # noqa: E402

BIN = Path(sys.executable).parent

ACCELERATORS = {
    "exact": None,
    "token merging 0.3": "[{name: token_merging, ratio: 0.3, max_downsample: 2}]",
    "token merging 0.5": "[{name: token_merging, ratio: 0.5, max_downsample: 2}]",
    "DeepCache interval 2": "[{name: deep_cache, interval: 2}]",
    "DeepCache interval 3": "[{name: deep_cache, interval: 3}]",
    "int8 weights": "[{name: int8_weights}]",
}


def score(checkpoint: Path, adapters: str | None, scheduler: str, steps: int, out: Path) -> dict:
    command = [str(BIN / "latentgen-eval"), f"checkpoint={checkpoint}", "metrics=[adherence,fd]", "progress=false",
               "overwrite=true", f"hydra.run.dir={out}", f"scheduler={scheduler}", f"steps={steps}"]
    if adapters:
        command.append(f"adapters={adapters}")
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    report = json.loads((out / "eval.json").read_text())
    metrics = report["metrics"]
    return {"adherence": metrics["adherence"]["joint_accuracy"], "fd": metrics["fd"]["fd"],
            "floor": metrics["fd"]["fd_real_vs_real"], "seconds": report["sampling"]["seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=newest_demo_checkpoint())
    parser.add_argument("--scheduler", default="ddim")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--only", nargs="+", choices=list(ACCELERATORS), default=list(ACCELERATORS))
    args = parser.parse_args()
    if args.checkpoint is None or not args.checkpoint.is_file():
        sys.exit("no trained shapes checkpoint: run `make demo` first or pass --checkpoint")
    out = args.checkpoint.parents[1] / "accelerators"
    rows = []
    for index, name in enumerate(args.only):
        result = score(args.checkpoint, ACCELERATORS[name], args.scheduler, args.steps, out / f"{index}")
        rows.append((name, result))
        print(f"{name}: {result}", file=sys.stderr, flush=True)
    print(f"\n{args.checkpoint}; {args.scheduler}, {args.steps} steps, 216 samples; "
          f"FD real vs real {rows[0][1]['floor']:.1f}\n")
    print("| accelerator | adherence | FD | sampling s (216 images) |")
    print("|---|---|---|---|")
    for name, result in rows:
        print(f"| {name} | {result['adherence']:.1%} | {result['fd']:.1f} | {result['seconds']:.0f} |")


if __name__ == "__main__":
    main()

"""What the fused Adam(W) step (latentgen/training/fused_adam.py) saves in stage 2 of the shapes
experiments: milliseconds per optimizer step and per whole training step (random latents, the real
DenoiserTrainer), torch's default foreach step beside the fused one. Run it alone: the machine's two
cores are shared.

    python benchmarks/optimizer_step.py [--experiments shapes,shapes_composed] [--steps 30] [--threads 2]
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch

from latentgen.config import compose
from latentgen.pipeline import LatentDiffusionPipeline
from latentgen.training.denoiser_stage import DenoiserTrainer
from latentgen.training.latent_cache import LatentCache

PROMPTS = ["a small red circle left of a large blue star", "a medium green square", "a large cyan cross"]


def milliseconds(function, repeats: int) -> float:
    """Median wall-clock milliseconds of `function()` over `repeats` calls, after three warm-up calls."""
    for _ in range(3):
        function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[len(times) // 2]


def measure(experiment: str, fused: bool, steps: int) -> tuple[float, float, int]:
    """(ms per optimizer step, ms per training step, trained parameters) of `experiment`'s stage 2."""
    config = compose("train", [f"experiment={experiment}"])
    pipe = LatentDiffusionPipeline.from_config(config)
    latent = pipe.codec.latent_channels
    size = int(config["dataset"]["image_size"]) // pipe.codec.downsampling_factor
    settings = config["train"]["denoiser"]
    items = 4 * int(settings["batch_size"])
    cache = LatentCache(torch.randn(items, latent, size, size), {"prompt": [PROMPTS[i % 3] for i in range(items)]})
    trainer = DenoiserTrainer(pipe, cache, settings, torch.Generator().manual_seed(0))
    if not fused:  # torch's default step over the same parameters
        trainer.optimizer = torch.optim.AdamW(trainer.parameters, lr=float(settings["lr"]),
                                              weight_decay=float(settings["weight_decay"]), foreach=True)
    if settings.get("channels_last"):
        trainer.pipe.denoiser.to(memory_format=torch.channels_last)
    step = itertools.count(1)
    step_ms = milliseconds(lambda: trainer.step(next(step)), steps)
    optimizer_ms = milliseconds(trainer.optimizer.step, steps)
    return optimizer_ms, step_ms, sum(p.numel() for p in trainer.parameters)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiments", default="shapes,shapes_composed")
    parser.add_argument("--steps", type=int, default=30, help="timed training steps per variant")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"stage-2 optimizer step, foreach vs fused AdamW (torch threads: {args.threads}; "
          f"median of {args.steps} steps)")
    print(f"{'experiment':<18}{'parameters':>12}{'step':>9}{'optimizer ms':>14}{'training step ms':>18}"
          f"{'vs foreach':>12}")
    for experiment in args.experiments.split(","):
        rows = {fused: measure(experiment, fused, args.steps) for fused in (False, True)}
        for fused, (optimizer_ms, step_ms, count) in rows.items():
            ratio = rows[False][1] / step_ms
            print(f"{experiment:<18}{count:>12,}{'fused' if fused else 'foreach':>9}{optimizer_ms:>14.1f}"
                  f"{step_ms:>18.1f}{ratio:>11.2f}x")


if __name__ == "__main__":
    main()

"""A new sampler in twenty lines, used by the generic pipeline with no change to latentgen.

A plugin package would register `EulerScheduler` under the entry-point group
`latentgen.schedulers` (see CONTRIBUTING.md); here it is registered in-process.

    python examples/custom_scheduler.py [checkpoint.safetensors]
"""

import sys

import torch

from latentgen import LatentDiffusionPipeline, Scheduler, registry
from latentgen.config import compose


class EulerScheduler(Scheduler):
    """Euler's method on the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma (Karras et al. 2022, Alg. 1 without churn)."""

    def sample(self, denoise, x, sigmas, generator, callback):
        for i in range(len(sigmas) - 1):
            denoised = denoise(x, sigmas[i])
            if callback is not None:
                callback({"x": x, "i": i, "sigma": sigmas[i], "denoised": denoised})
            x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
        return x


def main() -> None:
    registry.register("scheduler", "euler_example", EulerScheduler)
    if len(sys.argv) > 1:
        pipe = LatentDiffusionPipeline.from_checkpoint(sys.argv[1], scheduler=registry.build("scheduler", "euler_example"))
    else:  # an untrained toy pipeline, just to show the wiring
        torch.manual_seed(0)
        pipe = LatentDiffusionPipeline.from_config(compose("train", ["experiment=smoke", "scheduler=euler_example"]))
    steps = []
    images = pipe(["a large red circle"], num_images=2, steps=10, seed=0, callback=lambda info: steps.append(info["i"]))
    print(f"scheduler {pipe.scheduler.name}: {len(steps)} steps, {len(images)} images of size {images[0].size}")


if __name__ == "__main__":
    main()

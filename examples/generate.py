"""Generate images from a latentgen checkpoint with the Python API.

    python examples/generate.py outputs/train/<run>/checkpoints/last.safetensors "a large red circle"
"""

import argparse

from latentgen import LatentDiffusionPipeline, registry
from latentgen.imaging import grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("prompts", nargs="+")
    parser.add_argument("--scheduler", default="ddim", choices=registry.available("scheduler"))
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance-scale", type=float, default=3.0)
    parser.add_argument("--num-images", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="generated.png")
    args = parser.parse_args()

    pipe = LatentDiffusionPipeline.from_checkpoint(args.checkpoint, scheduler=registry.build("scheduler", args.scheduler))
    images = pipe(args.prompts, num_images=args.num_images, steps=args.steps,
                  guidance_scale=args.guidance_scale, seed=args.seed)
    labels = [prompt for prompt in args.prompts for _ in range(args.num_images)]
    grid(images, columns=args.num_images, labels=labels).save(args.out)
    print(f"{len(images)} images -> {args.out}")


if __name__ == "__main__":
    main()

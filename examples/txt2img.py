"""Text-to-image (and image-to-image) from an original Stable Diffusion checkpoint, no diffusers needed.

    python examples/txt2img.py v1-5-pruned-emaonly.safetensors "a photograph of an astronaut riding a horse" \
        --negative "blurry" --steps 25 --dtype bfloat16 --out astronaut.png
    python examples/txt2img.py model.safetensors "a watercolour" --image photo.png --strength 0.6

A checkpoint that is not a standard v1 / v2 model needs its inference YAML: --config v1-inference.yaml.
"""

import argparse

import torch
from PIL import Image

from latentgen import registry
from latentgen.imaging import grid
from latentgen.interop.stable_diffusion import load_pipeline

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("prompt", nargs="+")
    parser.add_argument("--negative", default=None, help="negative prompt")
    parser.add_argument("--config", default=None, help="the original inference YAML (non-standard models)")
    parser.add_argument("--scheduler", default="ddim", choices=registry.available("scheduler"))
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--num-images", type=int, default=1)
    parser.add_argument("--size", type=int, default=None, help="height and width (default: the model's)")
    parser.add_argument("--image", default=None, help="an init image, for image-to-image")
    parser.add_argument("--strength", type=float, default=0.75, help="with --image: how much of the path is redone")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="txt2img.png")
    args = parser.parse_args()

    pipe = load_pipeline(args.checkpoint, original_config=args.config, dtype=DTYPES[args.dtype])
    pipe.scheduler = registry.build("scheduler", args.scheduler)
    extra = {"image": Image.open(args.image), "strength": args.strength} if args.image else {}
    images = pipe(args.prompt, negative_prompts=args.negative, num_images=args.num_images, steps=args.steps,
                  guidance_scale=args.guidance_scale, seed=args.seed, height=args.size, width=args.size, **extra)
    grid(images, columns=args.num_images, labels=[p for p in args.prompt for _ in range(args.num_images)]).save(args.out)
    print(f"{len(images)} images -> {args.out}")


if __name__ == "__main__":
    main()

"""Inpainting with an original Stable Diffusion checkpoint: repaint the white part of a mask.

    python examples/inpaint.py sd-v1-5-inpainting.ckpt photo.png mask.png "a red sofa" --out sofa.png

A 9-channel inpainting checkpoint is used as such (mask and masked image enter the UNet); any other
checkpoint inpaints by blending the known latents outside the mask at every step.
"""

import argparse

import torch
from PIL import Image

from latentgen.imaging import grid
from latentgen.interop.stable_diffusion import load_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("image")
    parser.add_argument("mask", help="white = repaint, black = keep")
    parser.add_argument("prompt")
    parser.add_argument("--config", default=None, help="the original inference YAML (non-standard models)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--num-images", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="inpaint.png")
    args = parser.parse_args()

    pipe = load_pipeline(args.checkpoint, original_config=args.config, dtype=getattr(torch, args.dtype))
    image, mask = Image.open(args.image).convert("RGB"), Image.open(args.mask)
    images = pipe(args.prompt, image=image, mask=mask, num_images=args.num_images, steps=args.steps,
                  guidance_scale=args.guidance_scale, seed=args.seed)
    grid([image.resize(images[0].size), mask.convert("RGB").resize(images[0].size), *images],
         labels=["image", "mask", *[args.prompt] * len(images)]).save(args.out)
    print(f"{len(images)} images -> {args.out}")


if __name__ == "__main__":
    main()

"""4x super-resolution of held-out shapes: PSNR and SSIM of a trained SR model against bicubic upsampling.

    latentgen-train experiment=shapes_sr
    python examples/super_resolution.py outputs/train/<run>/checkpoints/last.safetensors

Ground truth is the "test" split of the shapes dataset (never seen in training); each image is shrunk
to its low-resolution copy as the dataset does for training (4x4 block averages, 8 bits) and brought
back to full size by PIL's bicubic resize, by the model, and (as the ceiling of any latent model with
this codec) by encoding and decoding the ground truth itself. "LR PSNR" measures consistency with the
input: each output shrunk the same way against the low-resolution image.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from latentgen.datasets.shapes import ShapesDataset, downsample_uint8
from latentgen.imaging import from_pil, grid, to_pil
from latentgen.pipeline import LatentDiffusionPipeline


def psnr(result: np.ndarray, truth: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of uint8 images (H, W, 3)."""
    mse = np.mean((result.astype(np.float64) - truth.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def ssim(result: np.ndarray, truth: np.ndarray, sigma: float = 1.5, radius: int = 5) -> float:
    """Structural similarity of uint8 images (H, W, 3): Wang et al. 2004 with an 11-tap Gaussian window
    (sigma 1.5), K1 = 0.01, K2 = 0.03, averaged over channels and the pixels whose window fits inside."""
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    taps = np.exp(-np.arange(-radius, radius + 1) ** 2 / (2 * sigma**2))
    taps = torch.from_numpy(taps / taps.sum())
    window = (taps[:, None] * taps[None, :])[None, None]  # (1, 1, k, k)

    def mean(image: torch.Tensor) -> torch.Tensor:  # (3, H, W) -> (3, H - 2r, W - 2r)
        return F.conv2d(image[:, None], window)[:, 0]

    x = torch.tensor(result, dtype=torch.float64).permute(2, 0, 1)
    y = torch.tensor(truth, dtype=torch.float64).permute(2, 0, 1)
    mx, my = mean(x), mean(y)
    vx, vy, cxy = mean(x * x) - mx**2, mean(y * y) - my**2, mean(x * y) - mx * my
    index = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(index.mean())


def as_uint8(images: list[Image.Image]) -> list[np.ndarray]:
    return [np.asarray(image.convert("RGB")) for image in images]


@torch.no_grad()
def reconstructions(pipe: LatentDiffusionPipeline, truths: list[np.ndarray], batch: int) -> list[Image.Image]:
    """Ground truth through the codec and back: what a perfect denoiser would give."""
    out = []
    for start in range(0, len(truths), batch):
        images = from_pil([Image.fromarray(t) for t in truths[start:start + batch]]).to(pipe.codec_device)
        out += to_pil(pipe.decode(pipe.codec.encode(images)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--count", type=int, default=64, help="held-out images")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the checkpoint's)")
    parser.add_argument("--scheduler", default=None, help="a registered scheduler (default: the checkpoint's)")
    parser.add_argument("--factor", type=int, default=4, help="the downsampling factor the model was trained for")
    parser.add_argument("--low-res-mode", default="area", choices=["area", "bicubic"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="super_resolution.png", help="a grid: low-res, bicubic, SR, truth")
    args = parser.parse_args()

    from latentgen import registry

    scheduler = registry.build("scheduler", args.scheduler) if args.scheduler else None
    pipe = LatentDiffusionPipeline.from_checkpoint(args.checkpoint, scheduler=scheduler).eval()
    size = int(pipe.sampling["height"] or 64)
    if size % args.factor:
        raise SystemExit(f"error: the model's image size {size} is not a multiple of --factor {args.factor}")
    dataset = ShapesDataset(image_size=size, size=args.count, split="test")
    truths = [np.asarray(to_pil(dataset[i]["image"][None])[0]) for i in range(len(dataset))]
    smalls = [downsample_uint8(t, size // args.factor, args.low_res_mode) for t in truths]
    low_res = [Image.fromarray(s) for s in smalls]

    bicubic = [image.resize((size, size), Image.Resampling.BICUBIC) for image in low_res]
    # A model stacked with text (conditioner=text_low_res) also gets each image's caption.
    prompts = [dataset[i]["prompt"] for i in range(len(dataset))] if "prompt" in pipe.conditioner.input_keys else None
    generated = []
    for start in range(0, len(low_res), args.batch):
        chunk = slice(start, start + args.batch)
        generated += pipe(prompts[chunk] if prompts else None, conditioning={"low_res": low_res[chunk]}, num_images=1,
                          steps=args.steps, seed=args.seed + start, height=size, width=size)
    results = {"bicubic (PIL)": bicubic,
               f"super-resolution ({pipe.scheduler.name}, {args.steps or pipe.sampling['steps']} steps)": generated,
               "codec reconstruction (ceiling)": reconstructions(pipe, truths, args.batch)}

    print(f"{len(truths)} held-out {size}px shapes, {size // args.factor}px inputs ({args.low_res_mode})")
    print(f"{'method':<40} {'PSNR dB':>8} {'SSIM':>7} {'LR PSNR dB':>11}")
    for method, images in results.items():
        outputs = as_uint8(images)
        again = [downsample_uint8(o, size // args.factor, args.low_res_mode) for o in outputs]
        print(f"{method:<40} {np.mean([psnr(o, t) for o, t in zip(outputs, truths)]):8.2f} "
              f"{np.mean([ssim(o, t) for o, t in zip(outputs, truths)]):7.4f} "
              f"{np.mean([psnr(a, s) for a, s in zip(again, smalls)]):11.2f}")

    shown = min(8, len(truths))
    tiles = [tile for i in range(shown) for tile in
             (low_res[i].resize((size, size), Image.Resampling.NEAREST), bicubic[i], generated[i], Image.fromarray(truths[i]))]
    grid(tiles, columns=4, labels=["low-res", "bicubic", "SR", "truth"] * shown).save(args.out)
    print(f"grid -> {args.out}")


if __name__ == "__main__":
    main()

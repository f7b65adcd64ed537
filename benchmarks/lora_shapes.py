"""A LoRA teaches the shapes demo a new word, in minutes on this CPU, judged before and after.

The base is a trained shapes model (`make demo`'s checkpoint). It never saw the word "crimson": its
captions name red things "red". A LoRA is trained (`experiment=lora`: rank-8 branches on the UNet's
attention, everything else frozen) on rendered red shapes captioned "a <size> crimson <shape>", then the
project's shapes judge reads samples of every "a <size> crimson <shape>" prompt with the LoRA off and on:
how often is the shape red and of the asked shape? The known prompts ("a <size> <colour> <shape>", every
combination) are judged with the LoRA on too, to show what it costs the rest of the model.

    python benchmarks/lora_shapes.py [--base outputs/train/<run>/checkpoints/last.safetensors] [--steps 300]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
WORD = "crimson"


def newest_demo_checkpoint() -> Path | None:
    runs = sorted((REPO / "outputs" / "train").glob("*/checkpoints/last.safetensors"), key=lambda p: p.stat().st_mtime)
    return runs[-1] if runs else None


def write_dataset(folder: Path, image_size: int, count: int, seed: int = 0) -> None:
    """`count` red shapes (every shape and size, random positions and textured backgrounds), captioned with the
    new word: image_folder's layout, a .txt beside each .png."""
    from latentgen.datasets.shapes import SHAPES, SIZES, position_range, render_uint8

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        shape, size = SHAPES[index % len(SHAPES)], SIZES[(index // len(SHAPES)) % len(SIZES)]
        low, high = position_range(size, image_size)
        position = (rng.uniform(low, high), rng.uniform(low, high))
        Image.fromarray(render_uint8(shape, "red", size, position, image_size, rng)).save(folder / f"{index:04d}.png")
        (folder / f"{index:04d}.txt").write_text(f"a {size} {WORD} {shape}")


def judged(pipe, judge, prompts, shapes, colours, seed: int) -> dict:
    from latentgen.evaluation.adherence import score_adherence
    from latentgen.evaluation.sample_generation import generate

    images = generate(pipe, prompts=prompts, seed=seed)
    scores = score_adherence(judge, images, shapes, colours)
    return {key: scores[key] for key in ("shape_accuracy", "colour_accuracy", "joint_accuracy")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, default=newest_demo_checkpoint())
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--images", type=int, default=180, help="training images of the new word")
    parser.add_argument("--repeats", type=int, default=4, help="samples per (shape, size) of the new word")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.base is None or not args.base.exists():
        parser.error("no trained shapes model: run `make demo` first, or pass --base <checkpoint>")
    import torch

    from latentgen import LatentDiffusionPipeline, registry
    from latentgen.config import compose
    from latentgen.datasets.shapes import COLOURS, SHAPES, SIZES, caption
    from latentgen.evaluation.judge_cache import shapes_judge
    from latentgen.training.run import run_training

    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = LatentDiffusionPipeline.from_checkpoint(args.base)
    image_size = int(pipe.sampling["height"])
    judge, info = shapes_judge(image_size)
    red = list(COLOURS).index("red")
    new = [(s, z) for s in range(len(SHAPES)) for z in range(len(SIZES))] * args.repeats
    new_prompts = [f"a {SIZES[z]} {WORD} {SHAPES[s]}" for s, z in new]
    known = [(s, c, z) for s in range(len(SHAPES)) for c in range(len(COLOURS)) for z in range(len(SIZES))]
    known_prompts = [caption(s, c, z) for s, c, z in known]

    rows = {"new word, LoRA off": judged(pipe, judge, new_prompts, [s for s, _ in new], [red] * len(new), 1),
            "known captions, LoRA off": judged(pipe, judge, known_prompts, [s for s, _, _ in known],
                                               [c for _, c, _ in known], 2)}
    with tempfile.TemporaryDirectory() as work:
        data = Path(work) / "crimson"
        write_dataset(data, image_size, args.images)
        start = time.perf_counter()
        lora = run_training(compose("train", [
            "experiment=lora", f"base={args.base}", f"dataset.path={data}", f"dataset.image_size={image_size}",
            f"train.denoiser.steps={args.steps}", "train.denoiser.batch_size=32", "train.denoiser.lr=1e-3",
            "train.precision=fp32", "train.gradient_checkpointing=false", "train.tensorboard=false",
            "train.checkpoint_every=1000", "device=cpu"]), Path(work) / "run")
        seconds = time.perf_counter() - start
        size_kib = lora.stat().st_size / 1024
        pipe.attach(registry.build("adapter", "lora", path=lora))
        rows["new word, LoRA on"] = judged(pipe, judge, new_prompts, [s for s, _ in new], [red] * len(new), 1)
        rows["known captions, LoRA on"] = judged(pipe, judge, known_prompts, [s for s, _, _ in known],
                                                 [c for _, c, _ in known], 2)
    print(f"base {args.base}; judge held-out accuracy {json.dumps(info.get('held_out_accuracy'))}")
    print(f"LoRA: {args.steps} steps of 32 on {args.images} images of '{WORD}', {seconds:.0f} s with "
          f"{torch.get_num_threads()} threads (caching the latents included); file {size_kib:.0f} KiB\n")
    print(f"{'prompts':<26}{'samples':>8}{'shape':>8}{'colour':>8}{'joint':>8}")
    for name, row in rows.items():
        count = len(new_prompts) if name.startswith("new") else len(known_prompts)
        print(f"{name:<26}{count:>8}{row['shape_accuracy']:>8.0%}{row['colour_accuracy']:>8.0%}"
              f"{row['joint_accuracy']:>8.0%}")
    print("\n(colour for the new word: red, the colour its training images have)")


if __name__ == "__main__":
    main()

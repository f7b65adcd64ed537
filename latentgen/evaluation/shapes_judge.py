"""The shapes judge: a small CNN that reads shape, colour and size off a rendered-shapes image.

It is trained on the shapes dataset's own renders (train split) and checked on the test split, so
it measures whether a generated image shows what its prompt asked for, and its penultimate layer
gives the feature space for a Fréchet distance. Training is deterministic: fixed seeds, a forked
RNG that leaves the global one alone, and a single CPU thread (which for a network this small is
also the fastest setting, and makes the weights independent of the machine's core count).

Two-object scenes are read half by half: `half_crops` cuts an image along its relation's axis (a
top or bottom half is transposed, so every half is a tall S x S/2 strip) and `HalfJudge`, the same
network built for the strip, reads the one object each half should hold. It is trained the same way
on the halves of two-object renders.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from latentgen.datasets.shapes import (
    COLOURS,
    DEFAULT_BACKGROUND,
    SHAPES,
    SIZES,
    ShapesDataset,
    relation_axis,
    relation_halves,
)

JUDGE_VERSION = 2  # bump when the network or the training loop changes: it keys the cache
HALF_JUDGE_VERSION = 1  # the same for the two-object judge (HalfJudge, train_half_judge)
FEATURE_DIM = 64
HEADS: dict[str, int] = {"shape": len(SHAPES), "colour": len(COLOURS), "size": len(SIZES)}
NOISE_STD_MAX = 0.05  # augmentation: up to this much pixel noise (in [-1, 1] units) per image


@dataclass(frozen=True)
class JudgeRecipe:
    """Everything besides the renderer and the image size that determines a judge's weights."""

    train_images: int = 4000
    steps: int = 300
    batch_size: int = 32
    learning_rate: float = 5e-3
    weight_decay: float = 1e-4
    seed: int = 0
    held_out_images: int = 1000
    background: str = DEFAULT_BACKGROUND

    def __post_init__(self) -> None:
        for name in ("train_images", "steps", "batch_size", "held_out_images"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"shapes judge: {name} must be a positive integer; got {value!r}")
        if self.batch_size > self.train_images:
            raise ValueError(f"shapes judge: batch_size ({self.batch_size}) exceeds train_images ({self.train_images})")


def _conv(in_channels: int, out_channels: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]


class ShapesJudge(nn.Module):
    """CNN over images (B, 3, S, S) in [-1, 1] -> logits per head: shape (6), colour (6), size (3).

    The input gets a fourth channel, chroma = max - min over RGB: zero on the neutral-gray background
    and high on every shape colour, so the silhouette is explicit whatever the colour. A strided stem
    (above 32px) and pooling stages take the image down to about 8x8; global mean and max pooling then feed a 64-wide embedding
    (`features`, the Fréchet-distance space) and one linear head per factor.
    """

    def __init__(self, image_size: int) -> None:
        super().__init__()
        if image_size < 8:
            raise ValueError(f"shapes judge: image_size must be at least 8; got {image_size}")
        self.image_size = int(image_size)
        self.input_shape = (self.image_size, self.image_size)  # (height, width) of what it reads
        # Above 32px the stem strides: full-resolution convolutions would cost 4x for little gain.
        stride = 2 if image_size > 32 else 1
        stages = max(1, round(math.log2(image_size / stride / 8)))
        layers, width = _conv(4, 16, stride), 16
        for _ in range(stages):
            wider = min(64, 2 * width)
            layers += [*_conv(width, wider), nn.MaxPool2d(2)]
            width = wider
        layers += [*_conv(width, 64), *_conv(64, 64)]
        self.body = nn.Sequential(*layers)
        self.embedding = nn.Linear(2 * 64, FEATURE_DIM)
        self.heads = nn.ModuleDict({name: nn.Linear(FEATURE_DIM, count) for name, count in HEADS.items()})

    def _check(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != self.input_shape:
            raise ValueError(f"the shapes judge was built for images (B, 3, {self.input_shape[0]}, "
                             f"{self.input_shape[1]}); got {tuple(images.shape)}. Build a judge at the generated "
                             f"images' size")

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The penultimate embedding (B, 64), before its ReLU."""
        self._check(images)
        chroma = images.amax(dim=1, keepdim=True) - images.amin(dim=1, keepdim=True) - 1  # (B, 1, S, S) in [-1, 1]
        hidden = self.body(torch.cat([images, chroma], dim=1))  # (B, 64, s, s)
        return self.embedding(torch.cat([hidden.mean(dim=(2, 3)), hidden.amax(dim=(2, 3))], dim=1))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        hidden = F.relu(self.features(images))
        return {name: head(hidden) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
        """The most likely index per head, each (B,) int64, on the CPU."""
        device = next(self.parameters()).device
        chunks = [self(images[i:i + batch_size].to(device, torch.float32)) for i in range(0, len(images), batch_size)]
        return {name: torch.cat([chunk[name].argmax(dim=1).cpu() for chunk in chunks]) for name in HEADS}

    @torch.no_grad()
    def embed(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """`features` of a batch of any length, (B, 64) float64 on the CPU."""
        device = next(self.parameters()).device
        return torch.cat([self.features(images[i:i + batch_size].to(device, torch.float32)).double().cpu()
                          for i in range(0, len(images), batch_size)])


class HalfJudge(ShapesJudge):
    """The two-object judge: the ShapesJudge network built for one half of an S x S scene, a tall strip
    (B, 3, S, S/2) from `half_crops`, whose one object it reads (shape, colour and size relative to the half)."""

    def __init__(self, image_size: int) -> None:
        if image_size < 16 or image_size % 2:
            raise ValueError(f"two-object judge: image_size must be an even number of at least 16; got {image_size}")
        super().__init__(image_size // 2)  # the network's scale is the strip's shorter side
        self.scene_size = int(image_size)
        self.input_shape = (self.scene_size, self.scene_size // 2)


def half_crops(images: torch.Tensor, relations: Sequence[int | str]) -> torch.Tensor:
    """The two halves of each scene (N, 3, S, S) along its relation's axis, (N, 2, 3, S, S/2): left then right,
    or top then bottom, each transposed into a tall strip."""
    if images.ndim != 4 or images.shape[-1] != images.shape[-2] or images.shape[-1] % 2:
        raise ValueError(f"half_crops needs square images (N, 3, S, S) of an even size; got {tuple(images.shape)}")
    if len(relations) != len(images):
        raise ValueError(f"half_crops needs one relation per image; got {len(images)} images, {len(relations)} relations")
    half = images.shape[-1] // 2
    vertical = images.transpose(-1, -2)  # the top half of an image is the left half of its transpose
    crops = []
    for index, relation in enumerate(relations):
        source = images[index] if relation_axis(relation) == 0 else vertical[index]  # (3, S, S)
        crops.append(torch.stack([source[..., :half], source[..., half:]]))  # (2, 3, S, S/2)
    return torch.stack(crops) if crops else images.new_zeros((0, 2, 3, images.shape[-1], half))


def rendered_split(image_size: int, count: int, split: str, seed: int,
                   background: str = DEFAULT_BACKGROUND) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`count` dataset renders (N, 3, S, S) in [-1, 1] and their factors {shape, colour, size} (N,)."""
    data = ShapesDataset(image_size=image_size, size=count, seed=seed, split=split, background=background)
    items = [data[i] for i in range(count)]
    images = torch.stack([item["image"] for item in items])
    factors = {name: torch.tensor([item[name] for item in items]) for name in HEADS}
    return images, factors


def rendered_scenes(image_size: int, count: int, split: str, seed: int,
                    background: str = DEFAULT_BACKGROUND) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`count` two-object dataset renders (N, 3, S, S) in [-1, 1], their objects (N, 2, 3) as (shape, colour,
    size) rows in caption order, and their relations (N,) (indices into RELATIONS)."""
    data = ShapesDataset(image_size=image_size, size=count, seed=seed, split=split, background=background,
                         two_objects=1.0)
    items = [data[i] for i in range(count)]
    return (torch.stack([item["image"] for item in items]), torch.stack([item["objects"] for item in items]),
            torch.tensor([item["relation"] for item in items]))


def objects_by_half(objects: torch.Tensor, relations: Sequence[int | str]) -> torch.Tensor:
    """Objects (N, 2, 3) in caption order -> in half order (left or top first), as `half_crops` cuts them."""
    order = torch.tensor([relation_halves(relation) for relation in relations], dtype=torch.int64)  # (N, 2)
    by_half = torch.empty_like(objects)
    by_half.scatter_(1, order[..., None].expand(-1, -1, objects.shape[-1]), objects)
    return by_half


def rendered_halves(image_size: int, count: int, split: str, seed: int,
                    background: str = DEFAULT_BACKGROUND) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The 2 * `count` halves (2N, 3, S, S/2) of `count` two-object renders and what each holds {shape, colour,
    size} (2N,)."""
    images, objects, relations = rendered_scenes(image_size, count, split, seed, background)
    crops = half_crops(images, relations.tolist()).flatten(0, 1)
    by_half = objects_by_half(objects, relations.tolist()).flatten(0, 1)  # (2N, 3)
    return crops, {name: by_half[:, column] for column, name in enumerate(HEADS)}


@contextlib.contextmanager
def _single_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _binomial_blur(images: torch.Tensor) -> torch.Tensor:
    """A [1, 2, 1] x [1, 2, 1] / 16 blur per channel, edges replicated."""
    kernel = torch.tensor([1.0, 2.0, 1.0])
    kernel = (kernel[:, None] * kernel[None, :] / 16).expand(images.shape[1], 1, 3, 3)
    return F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), kernel, groups=images.shape[1])


def _augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Blur (none, once or twice) and pixel noise: generated images are softer and noisier than renders,
    and a judge should read a blurry red star as a red star."""
    once = _binomial_blur(images)
    choice = torch.randint(0, 3, (len(images), 1, 1, 1), generator=generator)
    images = torch.where(choice == 0, images, torch.where(choice == 1, once, _binomial_blur(once)))
    std = NOISE_STD_MAX * torch.rand(len(images), 1, 1, 1, generator=generator)
    return images + std * torch.randn(images.shape, generator=generator)


def _fit(make_judge: Callable[[], ShapesJudge], images: torch.Tensor, factors: dict[str, torch.Tensor],
         recipe: JudgeRecipe) -> ShapesJudge:
    """A judge from `make_judge` (built under the recipe's seed) trained on `images` and their `factors`."""
    count = len(images)
    with torch.random.fork_rng(devices=[]), _single_thread():
        torch.manual_seed(recipe.seed)
        judge = make_judge()
        generator = torch.Generator().manual_seed(recipe.seed)
        optimizer = torch.optim.AdamW(judge.parameters(), lr=recipe.learning_rate, weight_decay=recipe.weight_decay)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, recipe.learning_rate, total_steps=recipe.steps,
                                                       pct_start=0.2)
        judge.train()
        order, position = torch.randperm(count, generator=generator), 0
        for _ in range(recipe.steps):
            if position + recipe.batch_size > count:
                order, position = torch.randperm(count, generator=generator), 0
            batch = order[position:position + recipe.batch_size]
            position += recipe.batch_size
            logits = judge(_augment(images[batch], generator))
            loss = sum(F.cross_entropy(logits[name], factors[name][batch]) for name in HEADS)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return judge.eval().requires_grad_(False)


def train_shapes_judge(image_size: int, recipe: JudgeRecipe = JudgeRecipe()) -> ShapesJudge:
    """A judge trained from scratch on `recipe.train_images` train-split renders (deterministic, CPU)."""
    images, factors = rendered_split(image_size, recipe.train_images, "train", recipe.seed, recipe.background)
    return _fit(lambda: ShapesJudge(image_size), images, factors, recipe)


# The two-object judge's recipe: train_images and held_out_images count scenes, each two halves. 600 steps:
# at 300 it read 96.8 % of 32px scenes' shapes right, at 400 99.85 %, at 600 99.95-100 % (seeds 0, 1, 2).
HALF_JUDGE_RECIPE = JudgeRecipe(train_images=2000, steps=600, held_out_images=1000)


def train_half_judge(image_size: int, recipe: JudgeRecipe = HALF_JUDGE_RECIPE) -> HalfJudge:
    """A two-object judge trained from scratch on the halves of `recipe.train_images` train-split two-object
    renders of `image_size` (every combination, held-out ones included; deterministic, CPU)."""
    crops, factors = rendered_halves(image_size, recipe.train_images, "train", recipe.seed, recipe.background)
    return _fit(lambda: HalfJudge(image_size), crops, factors, recipe)  # type: ignore[return-value]


def _head_accuracy(judge: ShapesJudge, images: torch.Tensor, factors: dict[str, torch.Tensor]) -> dict[str, float]:
    """Accuracy per head, of shape-and-colour ("joint") and of all three ("object") of the judge's readings."""
    with _single_thread():
        predicted = judge.predict(images)
    correct = {name: predicted[name] == factors[name] for name in HEADS}
    accuracy = {name: float(hits.double().mean()) for name, hits in correct.items()}
    accuracy["joint"] = float((correct["shape"] & correct["colour"]).double().mean())
    accuracy["object"] = float((correct["shape"] & correct["colour"] & correct["size"]).double().mean())
    return accuracy


def held_out_accuracy(judge: ShapesJudge, recipe: JudgeRecipe = JudgeRecipe()) -> dict[str, float]:
    """Accuracy per head, of shape-and-colour ("joint") and of all three ("object") on `recipe.held_out_images`
    test-split renders."""
    images, factors = rendered_split(judge.image_size, recipe.held_out_images, "test", recipe.seed, recipe.background)
    return _head_accuracy(judge, images, factors)


def half_held_out_accuracy(judge: HalfJudge, recipe: JudgeRecipe = HALF_JUDGE_RECIPE) -> dict[str, float]:
    """Accuracy per head, of shape-and-colour ("joint") and of all three ("object") over the objects of
    `recipe.held_out_images` test-split two-object renders, each read in its own half."""
    crops, factors = rendered_halves(judge.scene_size, recipe.held_out_images, "test", recipe.seed, recipe.background)
    return _head_accuracy(judge, crops, factors)

"""Image augmentations for datasets: resize the shorter side, crop to a square, flip horizontally.

Random choices come from a per-item generator that is a pure function of (dataset seed, epoch,
index), so an item is the same in every process (DataLoader workers included) and a resumed run
draws the same augmentations as an uninterrupted one; the batching code moves the epoch on with
`Augmented.set_epoch`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from latentgen.errors import ConfigError

CROPS: tuple[str, ...] = ("center", "random")
_AUGMENTATION_SALT = 0x6A09E667  # keeps augmentation streams apart from other users of the same seed


class Augmented:
    """Declares that a dataset's items draw random augmentations, redrawn every epoch.

    Subclasses set `augments` (True when any augmentation is random) and `augmentation_seed`, and
    draw their random choices from `augmentation_rng(index)`.
    """

    augments: bool = False
    augmentation_seed: int = 0
    epoch: int = 0

    def set_epoch(self, epoch: int) -> None:
        """Items from now on are those of `epoch` (0-based): new crops and flips, same images."""
        self.epoch = int(epoch)

    def augmentation_rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([_AUGMENTATION_SALT, self.augmentation_seed, self.epoch, index])


def resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    """`image` scaled (bicubic, antialiased when shrinking) so that its shorter side is `size` pixels."""
    width, height = image.size
    if min(width, height) == size:
        return image
    scale = size / min(width, height)
    target = (max(size, round(width * scale)), max(size, round(height * scale)))
    # reducing_gap: a fast box pre-shrink for large factors, then the exact bicubic filter.
    return image.resize(target, Image.Resampling.BICUBIC, reducing_gap=3.0)


def crop_box(width: int, height: int, size: int, crop: str,
             rng: np.random.Generator | None) -> tuple[int, int, int, int]:
    """The (left, top, right, bottom) of a `size` square inside a width x height image."""
    if size > min(width, height):
        raise ValueError(f"cannot crop {size}x{size} from a {width}x{height} image; resize it first")
    if crop == "center":
        left, top = (width - size) // 2, (height - size) // 2
    elif crop == "random":
        if rng is None:
            raise ValueError("a random crop needs a generator")
        left, top = int(rng.integers(0, width - size + 1)), int(rng.integers(0, height - size + 1))
    else:
        raise ConfigError(f"unknown crop '{crop}'; choose one of {', '.join(CROPS)}")
    return left, top, left + size, top + size


def horizontal_flip(image: torch.Tensor) -> torch.Tensor:
    """(..., H, W) mirrored left to right."""
    return image.flip(-1)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image -> float32 (3, H, W) in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)


@dataclass(frozen=True)
class SquareImageTransform:
    """PIL image -> (3, image_size, image_size) in [-1, 1]: shorter side resized to `resize`
    (default image_size), a center or random square crop, then an optional random horizontal flip."""

    image_size: int
    resize: int | None = None
    crop: str = "center"
    flip: bool = False
    owner: str = "transform"  # who the errors name

    def __post_init__(self) -> None:
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size < 1:
            raise ConfigError(f"{self.owner}: image_size must be a positive integer, got {self.image_size!r}")
        if self.resize is not None and (isinstance(self.resize, bool) or not isinstance(self.resize, int)
                                        or self.resize < self.image_size):
            raise ConfigError(f"{self.owner}: resize (the shorter side before cropping) must be an integer >= "
                              f"image_size {self.image_size}, or null for image_size; got {self.resize!r}")
        if self.crop not in CROPS:
            raise ConfigError(f"{self.owner}: unknown crop '{self.crop}'; choose one of {', '.join(CROPS)}")
        if not isinstance(self.flip, bool):
            raise ConfigError(f"{self.owner}: flip must be true or false, got {self.flip!r}")

    @property
    def shorter_side(self) -> int:
        return self.image_size if self.resize is None else self.resize

    @property
    def random(self) -> bool:
        """Whether the output depends on the generator."""
        return self.flip or self.crop == "random"

    def __call__(self, image: Image.Image, rng: np.random.Generator | None = None) -> torch.Tensor:
        image = resize_shorter_side(image, self.shorter_side)
        image = image.crop(crop_box(*image.size, self.image_size, self.crop, rng))
        tensor = to_tensor(image)  # (3, image_size, image_size)
        if self.flip:
            if rng is None:
                raise ValueError("a random flip needs a generator")
            if rng.random() < 0.5:
                tensor = horizontal_flip(tensor)
        return tensor

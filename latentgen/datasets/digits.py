"""scikit-learn's 8x8 handwritten digits, upsampled and captioned: an embedded dataset that needs no download."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from latentgen.errors import ConfigError

DIGIT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPLITS: tuple[str, ...] = ("train", "test")
TRAIN_FRACTION = 0.8
MAX_VALUE = 16.0  # load_digits counts ink in 0..16 per 4x4 block of the original 32x32 bitmaps


def caption(digit: int) -> str:
    """The caption of a digit, e.g. "a handwritten digit 3 (three)"."""
    return f"a handwritten digit {digit} ({DIGIT_WORDS[digit]})"


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError("DigitsDataset needs scikit-learn, which is not installed: "
                          "pip install 'latentgen[digits]'") from exc
    bunch = load_digits()
    return bunch.images.astype(np.float32), bunch.target.astype(np.int64)  # (1797, 8, 8), (1797,)


class DigitsDataset(Dataset):
    """The 1797 UCI handwritten digits (scikit-learn `load_digits`), white on black, resized to image_size."""

    def __init__(self, image_size: int = 32, split: str = "train", seed: int = 0) -> None:
        if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 8 \
                or image_size % 8:
            raise ConfigError(f"DigitsDataset: image_size must be a multiple of 8 that is at least 8 "
                              f"(e.g. 32 or 64), got {image_size!r}")
        if split not in SPLITS:
            raise ConfigError(f"DigitsDataset: unknown split '{split}'; choose one of {', '.join(SPLITS)}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ConfigError(f"DigitsDataset: seed must be a non-negative integer, got {seed!r}")
        self.image_size, self.split, self.seed = int(image_size), split, int(seed)
        self.num_classes = len(DIGIT_WORDS)
        self.class_names = list(DIGIT_WORDS)

        images, labels = _load_digits()
        order = np.random.default_rng(self.seed).permutation(len(labels))
        cut = int(round(TRAIN_FRACTION * len(labels)))
        chosen = order[:cut] if split == "train" else order[cut:]
        pixels = torch.from_numpy(images[chosen]).unsqueeze(1)  # (N, 1, 8, 8) in 0..16
        if self.image_size != pixels.shape[-1]:
            # Bicubic overshoots at the strokes' edges; the clamp keeps values in range.
            pixels = F.interpolate(pixels, size=(self.image_size, self.image_size), mode="bicubic",
                                   align_corners=False).clamp_(0.0, MAX_VALUE)
        self._images = pixels.div_(MAX_VALUE / 2).sub_(1.0).contiguous()  # (N, 1, H, W) in [-1, 1]
        self._labels = labels[chosen]

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        digit = int(self._labels[index])
        return {
            "image": self._images[index].repeat(3, 1, 1),  # (3, H, W); a copy, so callers may edit it
            "prompt": caption(digit),
            "label": digit,
        }

    def __repr__(self) -> str:
        return f"DigitsDataset(image_size={self.image_size}, split='{self.split}', seed={self.seed})"

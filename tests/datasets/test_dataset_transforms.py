"""Dataset augmentations: crop boxes against direct arithmetic, and the flip option of the shapes set."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from latentgen.datasets.shapes import ShapesDataset
from latentgen.datasets.transforms import SquareImageTransform, crop_box, horizontal_flip

RED = (220, 30, 30)


def test_crop_box_reference():
    rng = np.random.default_rng(0)
    assert crop_box(48, 32, 32, "center", None) == (8, 0, 40, 32)
    assert crop_box(33, 40, 32, "center", None) == (0, 4, 32, 36)
    for _ in range(50):
        left, top, right, bottom = crop_box(50, 40, 32, "random", rng)
        assert 0 <= left <= 18 and 0 <= top <= 8 and (right - left, bottom - top) == (32, 32)
    with pytest.raises(ValueError, match="resize it first"):
        crop_box(20, 40, 32, "center", None)
    transform = SquareImageTransform(16, resize=24, crop="center")
    assert transform(Image.new("RGB", (100, 50), RED)).shape == (3, 16, 16) and not transform.random



def test_shapes_flip_mirrors_about_half_the_items_and_keeps_captions():
    plain, flipped = ShapesDataset(size=64, image_size=16), ShapesDataset(size=64, image_size=16, flip=True)
    assert flipped.augments and not plain.augments
    mirrored = 0
    for index in range(64):
        original, item = plain[index], flipped[index]
        assert item["prompt"] == original["prompt"] and item["label"] == original["label"]
        assert torch.equal(item["image"], original["image"]) or \
            torch.equal(item["image"], horizontal_flip(original["image"]))
        mirrored += not torch.equal(item["image"], original["image"])
    assert 16 < mirrored < 48  # binomial(64, 1/2): +-4 standard deviations
    before = [flipped[i]["image"] for i in range(64)]
    flipped.set_epoch(1)
    assert any(not torch.equal(before[i], flipped[i]["image"]) for i in range(64))  # redrawn each epoch
    flipped.set_epoch(0)
    assert all(torch.equal(before[i], flipped[i]["image"]) for i in range(64))  # a function of the epoch
    with pytest.raises(ValueError, match="ShapesDataset: flip must be true or false"):
        ShapesDataset(size=8, flip="yes")

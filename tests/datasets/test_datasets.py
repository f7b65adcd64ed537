"""The embedded datasets: item contract, determinism, held-out splits, captions that match the pixels."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, default_collate

from latentgen import registry
from latentgen.datasets import shapes
from latentgen.datasets.digits import DigitsDataset
from latentgen.datasets.shapes import COLOURS, SHAPES, SIZES, ShapesDataset

needs_sklearn = pytest.mark.skipif(importlib.util.find_spec("sklearn") is None, reason="scikit-learn not installed")

COLOUR_NAMES = list(COLOURS)
CHROMA_THRESHOLD = 0.4  # max - min channel in [-1, 1] units; the gray background stays far below it


def _shape_pixels(image: torch.Tensor) -> torch.Tensor:
    """Boolean (H, W) mask of strongly coloured pixels: the background is always neutral gray."""
    chroma = image.max(dim=0).values - image.min(dim=0).values
    return chroma > CHROMA_THRESHOLD


def _check_item(item: dict, image_size: int, num_classes: int) -> None:
    image = item["image"]
    assert image.dtype == torch.float32
    assert image.shape == (3, image_size, image_size)
    assert image.min() >= -1.0 and image.max() <= 1.0
    assert image.max() - image.min() > 0.5, "image is blank"
    assert isinstance(item["prompt"], str) and item["prompt"]
    assert isinstance(item["label"], int) and 0 <= item["label"] < num_classes


def test_registry_builds_shapes():
    assert {"shapes", "digits"} <= set(registry.available("dataset"))
    ds = registry.build("dataset", "shapes", image_size=32, size=64)
    assert isinstance(ds, ShapesDataset) and isinstance(ds, Dataset)
    assert len(ds) == 64 and ds.registry_name == "shapes"


@needs_sklearn
def test_registry_builds_digits():
    digits = registry.build("dataset", "digits", image_size=16, split="test")
    assert isinstance(digits, DigitsDataset) and digits.image_size == 16


@pytest.mark.parametrize("image_size", [32, 64])
def test_shapes_item_contract(image_size):
    ds = ShapesDataset(image_size=image_size, size=40)
    assert ds.image_size == image_size and len(ds) == 40
    assert ds.num_classes == len(SHAPES) * len(COLOURS) == len(ds.class_names)
    for i in range(len(ds)):
        item = ds[i]
        _check_item(item, image_size, ds.num_classes)
        assert item["label"] == item["shape"] * len(COLOURS) + item["colour"]
        assert ds.class_names[item["label"]] == f"{COLOUR_NAMES[item['colour']]} {SHAPES[item['shape']]}"
        for word in (SIZES[item["size"]], COLOUR_NAMES[item["colour"]], SHAPES[item["shape"]]):
            assert word in item["prompt"].split()
    batch = default_collate([ds[i] for i in range(8)])
    assert batch["image"].shape == (8, 3, image_size, image_size) and len(batch["prompt"]) == 8
    assert ds[-1]["prompt"] == ds[len(ds) - 1]["prompt"]
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_shapes_deterministic_per_seed_split_and_index(monkeypatch):
    a, b = ShapesDataset(size=32, seed=3), ShapesDataset(size=32, seed=3)
    other_seed = ShapesDataset(size=32, seed=4)
    assert all(torch.equal(a[i]["image"], b[i]["image"]) and a[i]["prompt"] == b[i]["prompt"] for i in range(32))
    assert sum(torch.equal(a[i]["image"], other_seed[i]["image"]) for i in range(32)) == 0
    # An item does not depend on the dataset's length, nor on whether it was pre-rendered.
    longer = ShapesDataset(size=100, seed=3)
    assert all(torch.equal(a[i]["image"], longer[i]["image"]) for i in range(32))
    monkeypatch.setattr(shapes, "_PRERENDER_BYTES", 0)
    lazy = ShapesDataset(size=32, seed=3)
    assert lazy._images is None
    assert all(torch.equal(a[i]["image"], lazy[i]["image"]) and a[i]["label"] == lazy[i]["label"] for i in range(32))


def test_shapes_test_split_is_held_out():
    train, test = ShapesDataset(size=64, split="train"), ShapesDataset(size=64, split="test")
    train_images = torch.stack([train[i]["image"] for i in range(64)])
    for i in range(64):
        assert not (train_images == test[i]["image"]).flatten(1).all(1).any()


@pytest.fixture(scope="module")
def shapes500():
    ds = ShapesDataset(image_size=32, size=500, seed=0)
    return [ds[i] for i in range(len(ds))]


def test_every_shape_colour_and_size_occurs(shapes500):
    assert {item["shape"] for item in shapes500} == set(range(len(SHAPES)))
    assert {item["colour"] for item in shapes500} == set(range(len(COLOURS)))
    assert {item["size"] for item in shapes500} == set(range(len(SIZES)))


def test_caption_colour_matches_pixels(shapes500):
    palette = torch.tensor(list(COLOURS.values()), dtype=torch.float32) / 127.5 - 1  # (C, 3)
    for item in shapes500:
        parsed = ShapesDataset.parse_prompt(item["prompt"])
        assert parsed is not None
        mask = _shape_pixels(item["image"])
        assert mask.sum() >= 10, item["prompt"]
        mean_rgb = item["image"][:, mask].mean(dim=1)  # (3,)
        assert torch.cdist(mean_rgb[None], palette).argmin().item() == parsed[1], item["prompt"]


def test_caption_size_matches_pixel_count(shapes500):
    counts: dict[tuple[int, int], list[int]] = {}
    for item in shapes500:
        size = next(SIZES.index(word) for word in item["prompt"].split() if word in SIZES)
        counts.setdefault((item["shape"], size), []).append(int(_shape_pixels(item["image"]).sum()))
    for shape in range(len(SHAPES)):
        means = [np.mean(counts[(shape, size)]) for size in range(len(SIZES))]
        assert means[0] * 1.5 < means[1] and means[1] * 1.5 < means[2], (SHAPES[shape], means)
        # Sizes are exact, so the counts within one (shape, size) barely vary.
        small_max, medium_min = max(counts[(shape, 0)]), min(counts[(shape, 1)])
        assert small_max < medium_min, SHAPES[shape]


def test_shapes_stay_inside_and_shapes_differ(shapes500):
    fill: dict[int, list[float]] = {}
    for item in shapes500:
        mask = _shape_pixels(item["image"])
        border = torch.cat([mask[0], mask[-1], mask[:, 0], mask[:, -1]])
        assert not border.any(), item["prompt"]
        rows, cols = mask.any(1).nonzero(), mask.any(0).nonzero()
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        if item["size"] == 2:
            fill.setdefault(item["shape"], []).append(mask.sum().item() / box.item())
    mean_fill = {SHAPES[s]: float(np.mean(v)) for s, v in fill.items()}
    # Fraction of the bounding box covered: ~1 for a square, pi/4 for a circle, ~1/2 for a triangle.
    assert mean_fill["square"] > 0.9
    assert 0.7 < mean_fill["circle"] < 0.88
    assert mean_fill["triangle"] < 0.62 and mean_fill["star"] < 0.62


def test_render_helper_draws_the_requested_combination():
    image = shapes.render("square", "blue", "large", position=(0.5, 0.5), image_size=64, background="plain")
    assert image.shape == (3, 64, 64)
    mask = _shape_pixels(image)
    assert mask[32, 32] and not mask[0, 0]
    assert torch.allclose(image[:, 32, 32], torch.tensor(COLOURS["blue"]) / 127.5 - 1, atol=1e-6)
    assert shapes.caption(0, 0, 2) == "a large red circle"
    with pytest.raises(ValueError, match="leave"):
        shapes.render("circle", "red", "large", position=(0.1, 0.5))
    with pytest.raises(ValueError, match="colour"):
        shapes.render("circle", "pink", "large")


def test_parse_prompt_round_trips_captions():
    for s in range(len(SHAPES)):
        for c in range(len(COLOURS)):
            for z in range(len(SIZES)):
                for t in range(len(shapes.TEMPLATES)):
                    assert ShapesDataset.parse_prompt(shapes.caption(s, c, z, t)) == (s, c)
    assert ShapesDataset.parse_prompt("Two RED Circles.") == (0, 0)
    assert ShapesDataset.parse_prompt("a large circle") is None
    assert ShapesDataset.parse_prompt("a red circle and a blue circle") is None
    assert ShapesDataset.parse_prompt("a photo of a cat") is None


@pytest.mark.parametrize("params, match", [
    ({"image_size": 30}, "image_size"), ({"image_size": 8}, "image_size"), ({"split": "val"}, "train, test"),
    ({"size": 0}, "size"), ({"size": -5}, "size"), ({"background": "noise"}, "plain, textured"),
    ({"seed": -1}, "seed"),
])
def test_shapes_bad_parameters(params, match):
    with pytest.raises(ValueError, match=f"ShapesDataset.*{match}"):
        ShapesDataset(**params)


@needs_sklearn
@pytest.mark.parametrize("image_size", [32, 64])
def test_digits_item_contract(image_size):
    ds = DigitsDataset(image_size=image_size)
    assert ds.num_classes == 10 and ds.class_names[3] == "three"
    for i in range(0, len(ds), 97):
        item = ds[i]
        _check_item(item, image_size, 10)
        assert torch.equal(item["image"][0], item["image"][2])  # grayscale
        assert str(item["label"]) in item["prompt"] and ds.class_names[item["label"]] in item["prompt"]
    assert ds[0]["image"].min() == -1.0  # the background is black


@needs_sklearn
def test_digits_splits_and_determinism():
    train, test = DigitsDataset(split="train"), DigitsDataset(split="test")
    assert len(train) + len(test) == 1797 and len(train) > 3 * len(test)
    assert {train[i]["label"] for i in range(len(train))} == set(range(10))
    assert {test[i]["label"] for i in range(len(test))} == set(range(10))
    again, reshuffled = DigitsDataset(split="train"), DigitsDataset(split="train", seed=1)
    assert all(torch.equal(train[i]["image"], again[i]["image"]) for i in range(0, len(train), 50))
    assert not all(torch.equal(train[i]["image"], reshuffled[i]["image"]) for i in range(20))
    before = train[0]["image"].clone()
    train[0]["image"].zero_()
    assert torch.equal(train[0]["image"], before), "items must be copies"


@needs_sklearn
@pytest.mark.parametrize("params, match", [
    ({"image_size": 12}, "image_size"), ({"split": "validation"}, "train, test"), ({"seed": -1}, "seed"),
])
def test_digits_bad_parameters(params, match):
    with pytest.raises(ValueError, match=f"DigitsDataset.*{match}"):
        DigitsDataset(**params)


def test_digits_without_scikit_learn_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"pip install 'latentgen\[digits\]'"):
        DigitsDataset()

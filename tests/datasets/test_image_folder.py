"""The image-folder dataset and its transforms: indexing, captions, crops and flips against direct
pixel slicing, unreadable files skipped and counted without a crash, clear errors."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from latentgen import registry
from latentgen.config import compose
from latentgen.datasets.image_folder import ImageFolderDataset, find_images
from latentgen.pipeline import build_component

RED, BLUE, GREEN = (220, 30, 30), (30, 60, 230), (20, 200, 40)


def _as_tensor(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1


def _halves(width: int, height: int, left=RED, right=BLUE) -> np.ndarray:
    """uint8 (H, W, 3): left half one colour, right half another."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, : width // 2] = left
    pixels[:, width // 2:] = right
    return pixels


def _stripes(width: int, height: int) -> np.ndarray:
    """uint8 (H, W, 3) whose every column is distinct: any crop window can be located exactly."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[..., 0] = (np.arange(width) * 7 % 256)[None, :]
    pixels[..., 1] = (np.arange(height) * 11 % 256)[:, None]
    pixels[..., 2] = (np.arange(width) // 37 * 50 % 256)[None, :]
    return pixels


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """PNG and JPEG files (one nested, one upper-case extension), captions, a corrupt file, a non-image."""
    root = tmp_path / "images"
    (root / "nested" / "deeper").mkdir(parents=True)
    Image.fromarray(_halves(48, 32)).save(root / "a_halves.png")
    (root / "a_halves.txt").write_text("  a red half\nand a blue half \n")
    Image.new("RGB", (40, 40), GREEN).save(root / "nested" / "b_green.JPG", quality=95)
    Image.fromarray(_stripes(64, 32)).save(root / "nested" / "deeper" / "c_stripes.png")
    (root / "nested" / "deeper" / "c_stripes.txt").write_text("stripes")
    (root / "d_corrupt.png").write_bytes(b"not a png at all" * 10)
    (root / "notes.md").write_text("not an image")
    (root / "orphan.txt").write_text("a caption without an image")
    return root


def test_indexes_images_recursively_in_a_stable_order_and_skips_the_corrupt_one(folder):
    with pytest.warns(UserWarning, match=r"skipping 1 unreadable file.*d_corrupt\.png"):
        dataset = ImageFolderDataset(str(folder), image_size=16)
    names = [path.name for path in dataset.paths]
    assert names == ["a_halves.png", "b_green.JPG", "c_stripes.png"]
    assert len(dataset) == 3 and dataset.skipped == 1
    assert [p.name for p in find_images(folder)] == ["a_halves.png", "d_corrupt.png", "b_green.JPG", "c_stripes.png"]


def test_item_contract_and_captions(folder):
    with pytest.warns(UserWarning):
        dataset = ImageFolderDataset(str(folder), image_size=16)
    for index in range(len(dataset)):
        item = dataset[index]
        assert item["image"].dtype == torch.float32 and item["image"].shape == (3, 16, 16)
        assert -1 <= item["image"].min() and item["image"].max() <= 1
        assert item["prompt"] == item["caption"] and Path(item["path"]) == dataset.paths[index]
    assert dataset[0]["caption"] == "a red half and a blue half"  # whitespace and line breaks collapsed
    assert dataset[1]["caption"] == ""  # no .txt
    assert dataset[2]["caption"] == "stripes"
    assert torch.allclose(dataset[1]["image"], _as_tensor(np.full((16, 16, 3), GREEN, np.uint8)), atol=0.05)  # JPEG
    assert torch.equal(dataset[-1]["image"], dataset[2]["image"])
    with pytest.raises(IndexError):
        dataset[3]
    batch = next(iter(DataLoader(dataset, batch_size=3)))
    assert batch["image"].shape == (3, 3, 16, 16) and batch["prompt"][2] == "stripes" and len(batch["path"]) == 3


def test_resize_and_center_crop_match_direct_slicing(tmp_path):
    # 48x32 halves at image_size 32: no resize; the centre crop is columns 8..40, 16 red then 16 blue.
    Image.fromarray(_halves(48, 32)).save(tmp_path / "halves.png")
    item = ImageFolderDataset(str(tmp_path), image_size=32)[0]["image"]
    assert torch.equal(item, _as_tensor(_halves(48, 32)[:, 8:40]))
    # 96x64 shrinks to 48x32 first (shorter side 32): the same picture, up to the bicubic filter at the edge.
    Image.fromarray(_halves(96, 64)).save(tmp_path / "halves.png")
    item = ImageFolderDataset(str(tmp_path), image_size=32)[0]["image"]
    expected = _as_tensor(_halves(48, 32)[:, 8:40])
    away_from_edge = torch.cat([torch.arange(0, 14), torch.arange(18, 32)])
    assert torch.allclose(item[..., away_from_edge], expected[..., away_from_edge], atol=1 / 127.5)
    # resize 48 then crop 32 out of 72x48: a zoomed-in centre, only red and blue, half each.
    item = ImageFolderDataset(str(tmp_path), image_size=32, resize=48)[0]["image"]
    assert item.shape == (3, 32, 32) and (item[0, :, :12] > 0.6).all() and (item[2, :, 20:] > 0.6).all()


def test_random_crops_are_windows_of_the_image_redrawn_per_epoch_and_reproducible(tmp_path):
    pixels = _stripes(80, 32)  # shorter side == image_size: every crop is a horizontal window
    Image.fromarray(pixels).save(tmp_path / "stripes.png")
    windows = {left: _as_tensor(pixels[:, left:left + 32]) for left in range(80 - 32 + 1)}

    def offsets(dataset, epochs):
        found = []
        for epoch in epochs:
            dataset.set_epoch(epoch)
            image = dataset[0]["image"]
            found.append(next(left for left, window in windows.items() if torch.equal(window, image)))
        return found

    dataset = ImageFolderDataset(str(tmp_path), image_size=32, crop="random", seed=3)
    assert dataset.augments
    seen = offsets(dataset, range(20))
    assert len(set(seen)) > 5  # a new crop each epoch
    assert offsets(ImageFolderDataset(str(tmp_path), image_size=32, crop="random", seed=3), range(20)) == seen
    assert offsets(ImageFolderDataset(str(tmp_path), image_size=32, crop="random", seed=4), range(20)) != seen
    assert not ImageFolderDataset(str(tmp_path), image_size=32).augments


def test_flip_mirrors_about_half_of_the_draws(tmp_path):
    pixels = _stripes(32, 32)
    Image.fromarray(pixels).save(tmp_path / "stripes.png")
    dataset = ImageFolderDataset(str(tmp_path), image_size=32, flip=True)
    original = _as_tensor(pixels)
    flips = 0
    for epoch in range(200):
        dataset.set_epoch(epoch)
        image = dataset[0]["image"]
        assert torch.equal(image, original) or torch.equal(image, original.flip(-1))
        flips += torch.equal(image, original.flip(-1))
    assert 70 < flips < 130  # binomial(200, 1/2): +-4 standard deviations


def test_transparency_and_exif_orientation(tmp_path):
    Image.new("RGBA", (16, 16), (255, 0, 0, 0)).save(tmp_path / "a_clear.png")  # fully transparent red
    tall = np.zeros((32, 16, 3), dtype=np.uint8)
    tall[:16] = RED  # top red, bottom blue; EXIF 6 says: rotate 90 degrees clockwise to display
    tall[16:] = BLUE
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(tall).save(tmp_path / "b_rotated.jpg", exif=exif, quality=100)
    dataset = ImageFolderDataset(str(tmp_path), image_size=16)
    assert torch.allclose(dataset[0]["image"], torch.ones(3, 16, 16))  # composited onto white
    upright = dataset[1]["image"]  # displayed as 32 wide x 16 high: blue left, red right; centre crop 8..24
    assert upright[2, :, :6].mean() > 0.6 and upright[0, :, 10:].mean() > 0.6


def test_a_file_that_fails_to_decode_is_replaced_and_counted_never_raised(tmp_path):
    for name, colour in [("a.png", RED), ("b.jpg", GREEN), ("c.png", BLUE)]:
        Image.new("RGB", (64, 64), colour).save(tmp_path / name)
    noise = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "b.jpg")  # mostly entropy-coded data after the header
    data = (tmp_path / "b.jpg").read_bytes()
    (tmp_path / "b.jpg").write_bytes(data[: len(data) // 3])  # a valid header, truncated data
    dataset = ImageFolderDataset(str(tmp_path), image_size=16)
    assert len(dataset) == 3 and dataset.skipped == 0  # the header check cannot see it
    with pytest.warns(UserWarning, match=r"cannot decode .*b\.jpg"):
        item = dataset[1]
    assert item["path"].endswith("c.png") and dataset.skipped == 1  # the next readable item, deterministically
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # remembered: no second attempt, no second warning
        paths = [dataset[i]["path"] for i in range(len(dataset))]
    assert [Path(p).name for p in paths] == ["a.png", "c.png", "c.png"] and dataset.skipped == 1


def test_registry_and_hydra_option(folder):
    assert "image_folder" in registry.available("dataset")
    with pytest.warns(UserWarning):
        dataset = registry.build("dataset", "image_folder", path=str(folder), image_size=16, crop="random", flip=True)
    assert isinstance(dataset, ImageFolderDataset) and dataset.registry_name == "image_folder"
    cfg = compose("train", ["experiment=smoke", "dataset=image_folder", f"dataset.path={folder}",
                            "dataset.image_size=16"])
    assert cfg.sampling.height == 16
    with pytest.warns(UserWarning):
        assert len(build_component("dataset", cfg.dataset)) == 3
    with pytest.raises(ValueError, match=r"no folder given; set dataset\.path="):
        build_component("dataset", compose("train", ["experiment=smoke", "dataset=image_folder"]).dataset)


@pytest.mark.parametrize("params, match", [
    ({"image_size": 20}, "multiple of 8"),
    ({"crop": "left"}, "center, random"),
    ({"resize": 8}, "resize .* must be an integer >= image_size 16"),
    ({"flip": "yes"}, "flip must be true or false"),
    ({"seed": -1}, "seed"),
])
def test_bad_parameters_name_the_fix(folder, params, match):
    with pytest.raises(ValueError, match=f"image_folder: .*{match}"):
        ImageFolderDataset(str(folder), **{"image_size": 16, **params})


def test_bad_folders_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="does not exist; set dataset.path"):
        ImageFolderDataset(str(tmp_path / "missing"))
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        ImageFolderDataset(str(tmp_path / "file.png"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"no images \(\.png, \.jpg.*searched recursively"):
        ImageFolderDataset(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="none of the 1 image files .* can be read"):
        ImageFolderDataset(str(tmp_path))


def test_training_batches_move_the_epoch_on(tmp_path):
    from latentgen.training.data import epochs

    for index in range(4):
        Image.fromarray(np.roll(_stripes(24, 16), 5 * index, axis=1)).save(tmp_path / f"{index}.png")
    dataset = ImageFolderDataset(str(tmp_path), image_size=16, crop="random", flip=True)
    batches = epochs(dataset, 4, torch.Generator().manual_seed(0))
    by_path = []
    for expected_epoch in range(3):
        batch = next(batches)
        assert dataset.epoch == expected_epoch
        by_path.append(dict(zip(batch["path"], batch["image"])))
    # Every epoch holds all four images, each cropped and flipped anew.
    assert all(set(epoch) == set(by_path[0]) for epoch in by_path)
    assert any(not torch.equal(by_path[0][path], by_path[1][path]) for path in by_path[0])

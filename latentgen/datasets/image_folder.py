"""Your own images: every picture under a folder, each captioned by a same-name .txt file if there is one.

Unreadable files never stop training. A file whose header PIL cannot parse is left out when the
folder is indexed; one that fails to decode later (a truncated download, say) is replaced by the
next readable item, deterministically, and remembered. Both are warned about and counted in
`skipped`, which the training run reports at its end.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from latentgen.datasets.transforms import Augmented, SquareImageTransform
from latentgen.errors import ConfigError

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_EXTENSION = ".txt"
_LISTED_IN_WARNINGS = 5  # unreadable files named in the warning at indexing time


def find_images(root: Path) -> list[Path]:
    """Image files under `root`, recursively, in a stable order (sorted by relative path)."""
    found = [path for path in root.rglob("*") if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()]
    return sorted(found, key=lambda path: path.relative_to(root).as_posix())


def header_problem(path: Path) -> str | None:
    """Why PIL cannot read the header of `path` (a cheap check: nothing is decoded), or None."""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except Exception as error:  # any unreadable file is skipped, whatever PIL raises for it
        return f"{type(error).__name__}: {error}"
    return None if width > 0 and height > 0 else f"empty image ({width}x{height})"


def load_rgb(path: Path, shorter_side: int | None = None) -> Image.Image:
    """The decoded RGB image, EXIF orientation applied, transparency composited onto white."""
    with Image.open(path) as image:
        if shorter_side is not None:
            image.draft("RGB", (shorter_side, shorter_side))  # JPEG: decode at a reduced scale still >= it
        image = ImageOps.exif_transpose(image)
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            image = image.convert("RGBA")
            background = Image.new("RGBA", image.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, image).convert("RGB")
        return image.convert("RGB")


class ImageFolderDataset(Augmented, Dataset):
    """Every .png/.jpg/.jpeg/.webp/.bmp under `path` (recursive) as a square image in [-1, 1].

    Items: "image" (3, image_size, image_size), "prompt" (the caption from <image name>.txt next to
    the image, "" without one; the key text conditioners read), "caption" (the same string) and
    "path". Each image's shorter side is resized to `resize` (default image_size), then a `crop`
    ("center" or "random") square is cut and, with `flip`, mirrored with probability 1/2; random
    choices depend only on (seed, epoch, index).
    """

    def __init__(self, path: str, image_size: int = 32, resize: int | None = None, crop: str = "center",
                 flip: bool = False, seed: int = 0) -> None:
        if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 8 \
                or image_size % 8:
            raise ConfigError(f"image_folder: image_size must be a multiple of 8 that is at least 8 (e.g. 32, 64 "
                              f"or 256), got {image_size!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ConfigError(f"image_folder: seed must be a non-negative integer, got {seed!r}")
        self.transform = SquareImageTransform(int(image_size), resize, crop, flip, owner="image_folder")
        self.image_size, self.resize, self.crop, self.flip = int(image_size), resize, crop, flip
        self.augments, self.augmentation_seed = self.transform.random, int(seed)
        self.root = _existing_folder(path)
        candidates = find_images(self.root)
        if not candidates:
            raise ConfigError(f"image_folder: no images ({', '.join(IMAGE_EXTENSIONS)}) under '{self.root}' "
                              f"(searched recursively); point dataset.path at a folder that holds some")
        problems = {candidate: header_problem(candidate) for candidate in candidates}
        self.paths = [candidate for candidate, problem in problems.items() if problem is None]
        self.unreadable: dict[Path, str] = {p: problem for p, problem in problems.items() if problem is not None}
        if not self.paths:
            raise ConfigError(f"image_folder: none of the {len(candidates)} image files under '{self.root}' can be "
                              f"read (e.g. {_describe(self.unreadable)}); check that they are valid images")
        if self.unreadable:
            warnings.warn(f"image_folder: skipping {len(self.unreadable)} unreadable file(s) under '{self.root}': "
                          f"{_describe(self.unreadable)}", stacklevel=2)
        self._failed: set[int] = set()  # indices whose file failed to decode in this process

    @property
    def skipped(self) -> int:
        """Files left out: unreadable at indexing time or failing to decode since."""
        return len(self.unreadable)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"image_folder index {index} out of range for length {len(self)}")
        index %= len(self)
        for offset in range(len(self)):
            candidate = (index + offset) % len(self)
            if candidate in self._failed:
                continue
            try:
                image = load_rgb(self.paths[candidate], self.transform.shorter_side)
            except Exception as error:  # a corrupt file must not end an epoch; see the module docstring
                self._give_up_on(candidate, error)
                continue
            caption = _read_caption(self.paths[candidate])
            return {
                "image": self.transform(image, self.augmentation_rng(index)),  # (3, H, W) in [-1, 1]
                "prompt": caption,
                "caption": caption,
                "path": str(self.paths[candidate]),
            }
        raise ConfigError(f"image_folder: none of the {len(self)} images under '{self.root}' could be decoded "
                          f"(e.g. {_describe(self.unreadable)}); check that they are valid images")

    def _give_up_on(self, index: int, error: Exception) -> None:
        path = self.paths[index]
        self._failed.add(index)
        self.unreadable[path] = f"{type(error).__name__}: {error}"
        warnings.warn(f"image_folder: cannot decode '{path}' ({type(error).__name__}: {error}); the next readable "
                      f"image takes its place and it is counted as skipped", stacklevel=3)

    def __repr__(self) -> str:
        return (f"ImageFolderDataset(path='{self.root}', image_size={self.image_size}, resize={self.resize}, "
                f"crop='{self.crop}', flip={self.flip}, seed={self.augmentation_seed}) with {len(self)} images")


def _existing_folder(path: str | Path) -> Path:
    if path is None or str(path) in ("", "???"):
        raise ConfigError("image_folder: no folder given; set dataset.path=<folder of images>")
    root = Path(path).expanduser()
    if not root.exists():
        raise ConfigError(f"image_folder: the folder '{root}' does not exist; set dataset.path to a folder of images")
    if not root.is_dir():
        raise ConfigError(f"image_folder: '{root}' is a file, not a folder; set dataset.path to the folder holding "
                          f"the images")
    return root


def _read_caption(image_path: Path) -> str:
    caption_path = image_path.with_suffix(CAPTION_EXTENSION)
    if not caption_path.is_file():
        return ""
    return " ".join(caption_path.read_text(encoding="utf-8", errors="replace").split())


def _describe(problems: dict[Path, str]) -> str:
    listed = [f"{path.name} ({problem})" for path, problem in list(problems.items())[:_LISTED_IN_WARNINGS]]
    more = len(problems) - len(listed)
    return "; ".join(listed) + (f"; and {more} more" if more > 0 else "")

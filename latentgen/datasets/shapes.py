"""Procedurally rendered coloured shapes with captions: an embedded text-to-image dataset that needs no download.

Every image holds one shape (`SHAPES`) in one colour (`COLOURS`) at one of three sizes (`SIZES`),
at a random position on a gray background, and is captioned "a large red circle". Items are a pure
function of (seed, split, index), so a dataset of any length agrees with a longer one on its prefix,
and the "test" split draws from its own random stream. `render` and `caption` are public so that
evaluation code can draw any combination and check a generated image against its prompt.
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from latentgen.datasets.transforms import Augmented
from latentgen.errors import ConfigError

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "cross")

# Saturated, far apart in RGB and in hue, and never gray: the background is always neutral gray,
# so colour alone separates shape from background. Orange is left out because a small model blurs
# it into red and yellow.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "green": (40, 185, 60),
    "blue": (40, 85, 240),
    "yellow": (245, 215, 35),
    "purple": (165, 55, 220),
    "cyan": (30, 205, 225),
}

SIZES: tuple[str, ...] = ("small", "medium", "large")

# Diameter of the shape's bounding circle as a fraction of the image width, per size.
SIZE_FRACTIONS: tuple[float, ...] = (0.36, 0.56, 0.80)

# Every template names size, colour and shape; template 0 is the canonical caption.
TEMPLATES: tuple[str, ...] = (
    "a {size} {colour} {shape}",
    "a picture of a {size} {colour} {shape}",
    "a {size} {colour} {shape} on a gray background",
)

SPLITS: tuple[str, ...] = ("train", "test")
BACKGROUNDS: tuple[str, ...] = ("plain", "textured")
LOW_RES_MODES: tuple[str, ...] = ("area", "bicubic")  # box filter; antialiased bicubic (PIL's BICUBIC resize)

PLAIN_GRAY = 64
TEXTURED_GRAY_RANGE = (40, 96)  # dark grays: every shape colour stands out in luminance or chroma
GRADIENT_AMPLITUDE = 10.0  # gray levels from the centre to an edge
NOISE_STD = 3.0  # gray levels; subtle, so the texture never competes with a shape edge

SUPERSAMPLING = 4  # shapes are drawn at 4x and box-filtered: exact 16-sample edge coverage
MARGIN_PIXELS = 1.0  # empty pixels kept between the shape and the image border

_SPLIT_STREAM = {"train": 0, "test": 1}
_STREAM_SALT = 0x5E4A9E5  # keeps these streams apart from other users of the same seed
_PRERENDER_BYTES = 256 * 2**20  # larger datasets render per item instead of at construction

_WORD = re.compile(r"[a-z]+")


def _index(value: int | str, names: Sequence[str], what: str) -> int:
    """The index of `value` (an index or a name) in `names`."""
    if isinstance(value, str):
        if value not in names:
            raise ConfigError(f"shapes: unknown {what} '{value}'; the {what}s are: {', '.join(names)}")
        return list(names).index(value)
    index = int(value)
    if not 0 <= index < len(names):
        raise ConfigError(f"shapes: {what} index {index} out of range 0..{len(names) - 1} ({', '.join(names)})")
    return index


def _check_image_size(image_size: int, dataset: str, minimum: int) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < minimum \
            or image_size % 8:
        raise ConfigError(f"{dataset}: image_size must be a multiple of 8 that is at least {minimum} "
                          f"(e.g. 32 or 64), got {image_size!r}")
    return int(image_size)


def radius(size: int | str, image_size: int) -> float:
    """Radius in pixels of the bounding circle of a shape of `size`."""
    return SIZE_FRACTIONS[_index(size, SIZES, "size")] * image_size / 2


def position_range(size: int | str, image_size: int) -> tuple[float, float]:
    """The (low, high) range, as fractions of the image width, where a shape's centre keeps it inside."""
    reach = (radius(size, image_size) + MARGIN_PIXELS) / image_size
    return reach, 1.0 - reach


def _outline(shape: int, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Polygon vertices of `shape` centred at (cx, cy) within radius r (pixel coordinates, y down)."""
    def polar(angles_and_radii):
        return [(cx + rad * math.cos(a), cy + rad * math.sin(a)) for a, rad in angles_and_radii]

    name = SHAPES[shape]
    if name == "square":
        half = r * 0.70
        return [(cx - half, cy - half), (cx + half, cy - half), (cx + half, cy + half), (cx - half, cy + half)]
    if name == "triangle":
        # Point up; shifted down by r/4 so that its bounding box, not its circumcentre, is centred.
        return [(x, y + r / 4) for x, y in polar((-math.pi / 2 + k * 2 * math.pi / 3, r) for k in range(3))]
    if name == "star":
        # Inner radius 0.5r rather than the regular 0.38r: fatter arms survive small sizes.
        return polar((-math.pi / 2 + k * math.pi / 5, r if k % 2 == 0 else 0.5 * r) for k in range(10))
    if name == "diamond":
        # Narrower than tall, so it cannot be read as a square turned by 45 degrees.
        return [(cx, cy - r), (cx + 0.62 * r, cy), (cx, cy + r), (cx - 0.62 * r, cy)]
    if name == "cross":
        arm, half = 0.90 * r, 0.30 * r
        return [(cx - half, cy - arm), (cx + half, cy - arm), (cx + half, cy - half), (cx + arm, cy - half),
                (cx + arm, cy + half), (cx + half, cy + half), (cx + half, cy + arm), (cx - half, cy + arm),
                (cx - half, cy + half), (cx - arm, cy + half), (cx - arm, cy - half), (cx - half, cy - half)]
    raise AssertionError(name)


def _mask(shape: int, size: int, position: tuple[float, float], image_size: int) -> np.ndarray:
    """Anti-aliased coverage of the shape, float32 (H, W) in [0, 1]."""
    scale = SUPERSAMPLING * image_size
    canvas = Image.new("L", (scale, scale), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy = position[0] * scale, position[1] * scale
    r = radius(size, image_size) * SUPERSAMPLING
    if SHAPES[shape] == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    else:
        draw.polygon(_outline(shape, cx, cy, r), fill=255)
    return np.asarray(canvas.reduce(SUPERSAMPLING), dtype=np.float32) / 255.0


def _background(background: str, image_size: int, rng: np.random.Generator | None) -> np.ndarray:
    """Neutral gray background, float32 (H, W) in gray levels 0..255."""
    if background == "plain":
        return np.full((image_size, image_size), float(PLAIN_GRAY), dtype=np.float32)
    if rng is None:
        rng = np.random.default_rng(0)
    level = rng.uniform(*TEXTURED_GRAY_RANGE)
    angle = rng.uniform(0, 2 * math.pi)
    coords = (np.arange(image_size, dtype=np.float32) + 0.5) / image_size * 2 - 1  # [-1, 1]
    ramp = math.cos(angle) * coords[None, :] + math.sin(angle) * coords[:, None]
    noise = rng.standard_normal((image_size, image_size), dtype=np.float32) * NOISE_STD
    return (level + GRADIENT_AMPLITUDE * ramp + noise).astype(np.float32)


def render_uint8(shape: int | str, colour: int | str, size: int | str, position: tuple[float, float] = (0.5, 0.5),
                 image_size: int = 32, rng: np.random.Generator | None = None,
                 background: str = "textured") -> np.ndarray:
    """One shape image as uint8 (H, W, 3); `position` is the centre as fractions of the image width."""
    image_size = _check_image_size(image_size, "shapes", 16)
    shape, colour, size = _index(shape, SHAPES, "shape"), _index(colour, COLOURS, "colour"), _index(size, SIZES, "size")
    if background not in BACKGROUNDS:
        raise ConfigError(f"shapes: unknown background '{background}'; choose one of {', '.join(BACKGROUNDS)}")
    low, high = position_range(size, image_size)
    x, y = float(position[0]), float(position[1])
    if not (low - 1e-6 <= x <= high + 1e-6 and low - 1e-6 <= y <= high + 1e-6):
        raise ConfigError(f"shapes: a {SIZES[size]} shape centred at ({x:.3f}, {y:.3f}) would leave the "
                          f"{image_size}px image; both coordinates must lie in [{low:.3f}, {high:.3f}]")
    coverage = _mask(shape, size, (x, y), image_size)[..., None]  # (H, W, 1)
    gray = _background(background, image_size, rng)[..., None]  # (H, W, 1)
    fill = np.asarray(COLOURS[list(COLOURS)[colour]], dtype=np.float32)  # (3,)
    pixels = gray + coverage * (fill - gray)  # (H, W, 3)
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float32 (3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).float().div(127.5).sub(1.0)


def render(shape: int | str, colour: int | str, size: int | str, position: tuple[float, float] = (0.5, 0.5),
           image_size: int = 32, rng: np.random.Generator | None = None, background: str = "textured") -> torch.Tensor:
    """One shape image as float32 (3, H, W) in [-1, 1]; arguments are indices or names."""
    return to_tensor(render_uint8(shape, colour, size, position, image_size, rng, background))


def downsample_uint8(pixels: np.ndarray, size: int, mode: str = "area") -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (size, size, 3), as a user shrinks a picture: `mode` "area" averages
    each block (exact for integer factors), "bicubic" is antialiased like PIL's BICUBIC resize."""
    if mode not in LOW_RES_MODES:
        raise ConfigError(f"shapes: unknown low_res_mode '{mode}'; choose one of {', '.join(LOW_RES_MODES)}")
    image = torch.from_numpy(np.array(pixels, dtype=np.float32)).permute(2, 0, 1)[None]  # (1, 3, H, W), a copy
    options = {"antialias": True, "align_corners": False} if mode == "bicubic" else {}
    small = F.interpolate(image, size=(size, size), mode=mode, **options)
    return small[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()  # 8 bits, as a saved PNG


def caption(shape: int | str, colour: int | str, size: int | str, template: int = 0) -> str:
    """The caption of a shape, e.g. "a large red circle"; template 0 is the canonical form."""
    return TEMPLATES[template].format(size=SIZES[_index(size, SIZES, "size")],
                                      colour=list(COLOURS)[_index(colour, COLOURS, "colour")],
                                      shape=SHAPES[_index(shape, SHAPES, "shape")])


def parse_prompt(prompt: str) -> tuple[int, int] | None:
    """(shape, colour) indices named in `prompt`, or None unless exactly one of each is named."""
    words = _WORD.findall(prompt.lower())
    # A plural ("two red circles") still names the shape.
    shapes = {SHAPES.index(w.removesuffix("s")) for w in words if w.removesuffix("s") in SHAPES} | \
        {SHAPES.index(w) for w in words if w in SHAPES}
    colours = {list(COLOURS).index(w) for w in words if w in COLOURS}
    if len(shapes) != 1 or len(colours) != 1:
        return None
    return shapes.pop(), colours.pop()


class ShapesDataset(Augmented, Dataset):
    """Captioned coloured shapes (circle, square, ... x red, green, ...) rendered on the fly, no download.

    With `low_res_size`, items also hold "low_res": the image shrunk to low_res_size pixels by
    `low_res_mode` and stored in 8 bits, the input of a super-resolution model. With `flip`, an item
    is mirrored left to right with probability 1/2, redrawn every epoch (captions are mirror-invariant).
    """

    SHAPES = SHAPES
    COLOURS = COLOURS
    SIZES = SIZES

    def __init__(self, image_size: int = 32, size: int = 10000, seed: int = 0, split: str = "train",
                 background: str = "textured", low_res_size: int | None = None, low_res_mode: str = "area",
                 flip: bool = False) -> None:
        self.image_size = _check_image_size(image_size, "ShapesDataset", 16)
        if low_res_size is not None and (isinstance(low_res_size, bool) or not isinstance(low_res_size, (int, np.integer))
                                         or not 1 <= low_res_size < self.image_size):
            raise ConfigError(f"ShapesDataset: low_res_size must be an integer in 1..{self.image_size - 1} "
                              f"(below image_size), or null for no low-resolution copy; got {low_res_size!r}")
        if low_res_mode not in LOW_RES_MODES:
            raise ConfigError(f"ShapesDataset: unknown low_res_mode '{low_res_mode}'; "
                              f"choose one of {', '.join(LOW_RES_MODES)}")
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size <= 0:
            raise ConfigError(f"ShapesDataset: size must be a positive integer, got {size!r}")
        if split not in SPLITS:
            raise ConfigError(f"ShapesDataset: unknown split '{split}'; choose one of {', '.join(SPLITS)}")
        if background not in BACKGROUNDS:
            raise ConfigError(f"ShapesDataset: unknown background '{background}'; "
                              f"choose one of {', '.join(BACKGROUNDS)}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ConfigError(f"ShapesDataset: seed must be a non-negative integer, got {seed!r}")
        if not isinstance(flip, bool):
            raise ConfigError(f"ShapesDataset: flip must be true or false, got {flip!r}")
        self.size, self.seed, self.split, self.background = int(size), int(seed), split, background
        self.flip = self.augments = flip
        self.augmentation_seed = self.seed
        self.low_res_size = None if low_res_size is None else int(low_res_size)
        self.low_res_mode = low_res_mode
        self.num_classes = len(SHAPES) * len(COLOURS)
        self.class_names = [f"{colour} {shape}" for shape in SHAPES for colour in COLOURS]
        # Pre-rendering 10000 images at 32px takes about a second and makes every later epoch a
        # plain indexing; beyond the byte budget the images are rendered per item instead.
        self._images: torch.Tensor | None = None
        self._factors: np.ndarray | None = None
        if self.size * 3 * self.image_size**2 <= _PRERENDER_BYTES:
            factors, images = zip(*(self._draw(i) for i in range(self.size)))
            self._factors = np.asarray(factors, dtype=np.int64)  # (N, 4): shape, colour, size, template
            self._images = torch.from_numpy(np.stack(images))  # (N, H, W, 3) uint8

    parse_prompt = staticmethod(parse_prompt)

    def __len__(self) -> int:
        return self.size

    def _draw(self, index: int) -> tuple[tuple[int, int, int, int], np.ndarray]:
        """The factors and uint8 (H, W, 3) image of item `index`: a function of (seed, split, index) only."""
        rng = np.random.default_rng([_STREAM_SALT, _SPLIT_STREAM[self.split], self.seed, index])
        shape, colour, size, template = (int(v) for v in rng.integers(
            0, (len(SHAPES), len(COLOURS), len(SIZES), len(TEMPLATES))))
        low, high = position_range(size, self.image_size)
        position = tuple(rng.uniform(low, high, size=2))
        pixels = render_uint8(shape, colour, size, position, self.image_size, rng, self.background)
        return (shape, colour, size, template), pixels

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -self.size <= index < self.size:
            raise IndexError(f"ShapesDataset index {index} out of range for length {self.size}")
        index %= self.size
        if self._images is not None:
            (shape, colour, size, template), pixels = self._factors[index].tolist(), self._images[index].numpy()
        else:
            (shape, colour, size, template), pixels = self._draw(index)
        if self.flip and self.augmentation_rng(index).random() < 0.5:
            pixels = pixels[:, ::-1]  # (H, W, 3), mirrored left to right
        item = {
            "image": to_tensor(pixels),  # (3, H, W) in [-1, 1]
            "prompt": caption(shape, colour, size, template),
            "label": shape * len(COLOURS) + colour,
            "shape": shape,
            "colour": colour,
            "size": size,
        }
        if self.low_res_size is not None:
            item["low_res"] = to_tensor(downsample_uint8(pixels, self.low_res_size, self.low_res_mode))  # (3, s, s)
        return item

    def __repr__(self) -> str:
        low_res = "" if self.low_res_size is None else \
            f", low_res_size={self.low_res_size}, low_res_mode='{self.low_res_mode}'"
        return (f"ShapesDataset(image_size={self.image_size}, size={self.size}, seed={self.seed}, "
                f"split='{self.split}', background='{self.background}'{low_res}"
                f"{', flip=True' if self.flip else ''})")

"""The inputs a conditioner reads from its batch: each key, what it holds, and who fills it.

Keys the pipeline fills itself come from its own arguments (prompts, labels, image and mask, image
size); every other key reaches a conditioner through `conditioning={key: value}` (the apps:
`conditioning.<key>=<file>`). A conditioner may read a key not listed here; the table is what the
pipeline, the datasets and the contract suites know how to fill.
"""

from __future__ import annotations

from dataclasses import dataclass

# What an input holds, by `InputKey.value`.
VALUES = {
    "text": "list[str] (B)",
    "label": "LongTensor (B,)",
    "image": "float (B, C, H, W) in [-1, 1]",
    "mask": "float (B, 1, H, W) in [0, 1], 1 = repaint",
    "latents": "float (B, C, h, w), scaled like the codec's",
    "size": "(h, w): the latent grid of the request",
    "pixels": "(H, W): the image size of the request",
    "map": "float (B, 3, H, W) in [0, 1] at the image size (a ControlNet's control map)",
    "numbers": "float (B, N): N numbers per item (one row for all items, or one per image)",
}


@dataclass(frozen=True)
class InputKey:
    """One input key a conditioner may read."""

    name: str
    value: str                      # a key of VALUES
    filled_from: str | None = None  # the pipeline arguments it is made from; None: given through `conditioning=`
    # A conditioner that reads this input applies the request's mask itself (an inpainting model), so the
    # pipeline does not also blend latents outside the mask.
    applies_mask: bool = False
    # Given through `conditioning=` when the user wants; the conditioner that reads it has a default.
    optional: bool = False


INPUT_KEYS: dict[str, InputKey] = {key.name: key for key in (
    InputKey("prompt", "text", filled_from="prompts (the first argument)"),
    InputKey("label", "label", filled_from="labels=..."),
    InputKey("image", "image"),
    InputKey("low_res", "image"),
    InputKey("mask", "mask", filled_from="image=... and mask=...", applies_mask=True),
    InputKey("masked_image_latents", "latents", filled_from="image=... and mask=...", applies_mask=True),
    InputKey("latent_size", "size", filled_from="height= and width="),
    InputKey("image_size", "pixels", filled_from="height= and width="),
    # SDXL's micro-conditioning (latentgen.conditioners.fourier_numbers): (height, width), (top, left), a score.
    InputKey("original_size", "numbers", optional=True),
    InputKey("crop_coords_top_left", "numbers", optional=True),
    InputKey("target_size", "numbers", optional=True),
    InputKey("aesthetic_score", "numbers", optional=True),
    InputKey("control", "map"),  # read by a ControlNet adapter (latentgen.adapters.controlnet)
)}


def filled_by_pipeline(name: str) -> bool:
    return name in INPUT_KEYS and INPUT_KEYS[name].filled_from is not None

"""The conditioning vocabulary: every key of the cond dict a conditioner gives and a denoiser reads.

Each row says the tensor's shape, which Denoiser attribute declares its width, and how a conditioner
stack joins members' outputs of that key. The compatibility check, the denoisers' input checks, the
stack and the contract suites all read this table, so adding a key is one row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class CondKey:
    """One conditioning key. `shape` is symbolic: "B" the batch, "W" the declared width, "L" any length,
    "h" and "w" the latent grid."""

    name: str
    shape: tuple[str, ...]
    width_attribute: str       # the Denoiser attribute that declares the width (and so that it reads the key)
    join_dim: int              # where a stack concatenates its members' outputs of this key
    meaning: str
    off: Any = None            # the attribute's value for a denoiser that does not read the key
    in_input_channels: bool = False  # concatenated to x inside the denoiser: counted in its in_channels

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def width_dim(self) -> int:
        return self.shape.index("W")

    @property
    def joins_widths(self) -> bool:
        """Whether a stack's join adds up its members' widths (else they must be equal)."""
        return self.join_dim % self.rank == self.width_dim

    def expected_shape(self, batch: int, width: int, latent_size: tuple[int, int]) -> tuple:
        """The shape a denoiser expects ("L" stays symbolic: any length)."""
        sizes = {"B": batch, "W": width, "h": latent_size[0], "w": latent_size[1]}
        return tuple(sizes.get(symbol, symbol) for symbol in self.shape)

    def example_shape(self, batch: int, width: int, latent_size: tuple[int, int], length: int) -> tuple[int, ...]:
        """A concrete shape for test inputs, with `length` tokens where the length is free."""
        return tuple(length if size == "L" else size for size in self.expected_shape(batch, width, latent_size))

    def described(self) -> str:
        return "(" + ", ".join("D" if symbol == "W" else symbol for symbol in self.shape) + ")"


COND_KEYS: dict[str, CondKey] = {key.name: key for key in (
    CondKey("crossattn", ("B", "L", "W"), "context_dim", join_dim=-1,
            meaning="tokens the denoiser cross-attends to (text features side by side: widths add up)"),
    CondKey("vector", ("B", "W"), "vector_dim", join_dim=-1,
            meaning="a global vector added to the time embedding (class labels, pooled text, sizes)"),
    CondKey("concat", ("B", "W", "h", "w"), "concat_channels", join_dim=1, off=0, in_input_channels=True,
            meaning="maps on the latent grid concatenated to x (inpainting, super-resolution, depth)"),
)}


def cond_key(name: str) -> CondKey:
    """The row of `name`, or a ValueError listing the keys."""
    if name not in COND_KEYS:
        raise ValueError(f"unknown conditioning key '{name}'; the keys are {', '.join(COND_KEYS)} "
                         f"(latentgen/contracts/cond_keys.py)")
    return COND_KEYS[name]


def declared_width(denoiser: Any, key: CondKey) -> int | None:
    """The width `denoiser` declares for `key`, or None when it does not read it."""
    value = getattr(denoiser, key.width_attribute, key.off)
    return None if value is None or value == key.off else int(value)

"""DeepCache (Ma, Fang and Wang 2024, "DeepCache: Accelerating Diffusion Models for Free"): a UNet's deep features
change little from one sampling step to the next, so they are computed at every `interval`-th step only; in the
steps between, only the shallow input blocks and the matching last output blocks run, the deep features coming
from the last full step. Nothing is trained; the cost is detail.

The steps are told apart by the timestep alone: a call at a lower t than the last starts the next step, a call at
the same t is another call of the same step (a second-order sampler's correction; each such call has its own
stored features), and a call at a higher t starts a new sampling run (first step full, everything stored dropped).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from latentgen.contracts import Adapter
from latentgen.errors import AdapterError


class FeatureCache:
    """The UNet's `feature_cache`: which calls run fully, and the deep features each full call stored."""

    def __init__(self, interval: int, depth: int):
        self.interval, self.depth = interval, depth
        self.reset()

    def reset(self) -> None:
        self.level: float | None = None  # the current step's timestep
        self.step = self.call = 0  # the step in the sampling run, the call within the step
        self.stored: dict[int, tuple[tuple, torch.Tensor]] = {}  # call index -> (signature, deep features)
        self.signature: tuple = ()

    def lookup(self, x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, Any]) -> tuple[int, torch.Tensor | None]:
        level = float(t.detach().float().max())
        if self.level is not None and level < self.level:
            self.step, self.call = self.step + 1, 0
        elif self.level is not None and level == self.level:
            self.call += 1
        else:  # the first call, or t went up: a new sampling run
            self.reset()
        self.level = level
        self.signature = (tuple(x.shape), x.dtype, x.device,
                          tuple((key, tuple(value.shape), value.dtype) for key, value in sorted(cond.items())
                                if isinstance(value, torch.Tensor)))
        if self.step % self.interval:
            found = self.stored.get(self.call)
            if found is not None and found[0] == self.signature:
                return self.depth, found[1]
        return self.depth, None  # a full call (a step of the interval, or nothing stored that fits)

    def store(self, h: torch.Tensor) -> None:
        self.stored[self.call] = (self.signature, h.detach())


class DeepCache(Adapter):
    """`interval`: the deep features are computed at every interval-th sampling step and reused in between (1 = every
    step full = off, exactly); `depth`: the number of shallow UNet input blocks (and matching last output blocks)
    that run at every step."""

    def __init__(self, interval: int = 3, depth: int = 2):
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise AdapterError(f"adapter 'deep_cache': interval must be an integer >= 1; got {interval!r} (1 runs "
                               f"every step fully, 2 or 3 reuse the deep features in between)")
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise AdapterError(f"adapter 'deep_cache': depth must be an integer >= 1; got {depth!r} (the number of "
                               f"UNet input blocks run at every step: 1 or 2 for the paper's setting)")
        self.interval, self.depth = interval, depth
        self._cache: FeatureCache | None = None

    def check(self, pipeline: Any) -> None:
        denoiser = pipeline.denoiser
        if not hasattr(denoiser, "feature_cache") or not hasattr(denoiser, "input_blocks"):
            raise AdapterError(f"adapter 'deep_cache' reuses the deep features of a UNet's skip connections; denoiser "
                               f"'{denoiser.name}' has no feature cache (use a UNet, or detach deep_cache)")
        if denoiser.feature_cache is not None:
            raise AdapterError(f"adapter 'deep_cache': denoiser '{denoiser.name}' already has a feature cache "
                               f"attached; detach the other deep_cache first")
        blocks = len(denoiser.input_blocks)
        if self.depth > blocks - 1:
            raise AdapterError(f"adapter 'deep_cache': depth must be in [1, {blocks - 1}] for denoiser "
                               f"'{denoiser.name}' ({blocks} input blocks); got {self.depth} (use a smaller depth)")

    def apply(self, pipeline: Any) -> None:
        if self.interval == 1:
            return
        self._cache = FeatureCache(self.interval, self.depth)
        pipeline.denoiser.feature_cache = self._cache

    def remove(self, pipeline: Any) -> None:
        if self._cache is not None and getattr(pipeline.denoiser, "feature_cache", None) is self._cache:
            pipeline.denoiser.feature_cache = None
        if self._cache is not None:
            self._cache.reset()
        self._cache = None

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "interval": self.interval, "depth": self.depth}

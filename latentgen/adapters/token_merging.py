"""Token merging for Stable Diffusion (Bolya and Hoffman 2023, "Token Merging for Fast Stable Diffusion"): before
each self-attention at the highest resolutions, the most similar tokens are averaged into one, attention runs on
the fewer tokens, and every token then takes its group's output. Nothing is trained; the cost is detail.

Bipartite matching as in the paper: one destination token per 2x2 cell of the feature map (a fixed choice,
seeded), every other token a source; each source is matched to its most similar destination (cosine of the
hidden states) and the `ratio` * N best-matched sources are merged into their destinations by mean.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from latentgen.contracts import Adapter
from latentgen.errors import AdapterError

log = logging.getLogger("latentgen.adapters")


class Merge:
    """The merge and unmerge of one (B, N, C) token batch on an h x w grid, removing `r` tokens."""

    def __init__(self, metric: torch.Tensor, height: int, width: int, r: int, generator: torch.Generator):
        batch, tokens, _ = metric.shape
        cells_h, cells_w = height // 2, width // 2
        choice = torch.randint(4, (cells_h, cells_w), generator=generator).to(metric.device)
        marks = torch.zeros(cells_h, cells_w, 4, dtype=torch.long, device=metric.device)
        marks.scatter_(2, choice.unsqueeze(-1), -1)  # -1: the cell's destination
        grid = torch.zeros(height, width, dtype=torch.long, device=metric.device)
        grid[:cells_h * 2, :cells_w * 2] = marks.view(cells_h, cells_w, 2, 2).transpose(1, 2).reshape(
            cells_h * 2, cells_w * 2)
        order = grid.flatten().argsort(stable=True)  # destinations first
        destinations = cells_h * cells_w
        self.dst_pos, self.src_pos = order[:destinations], order[destinations:]
        normed = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        scores = normed[:, self.src_pos] @ normed[:, self.dst_pos].transpose(1, 2)  # (B, S, D)
        best, best_dst = scores.max(dim=-1)
        ranked = best.argsort(dim=-1, descending=True)
        self.r = min(r, self.src_pos.numel())
        self.merged_src, self.kept_src = ranked[:, :self.r], ranked[:, self.r:]  # indices into the sources
        self.merged_dst = best_dst.gather(1, self.merged_src)
        self.tokens = tokens

    @staticmethod
    def _rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        src, dst = x[:, self.src_pos], x[:, self.dst_pos]
        kept = self._rows(src, self.kept_src)
        moved = self._rows(src, self.merged_src)
        index = self.merged_dst.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        dst = dst.scatter_reduce(1, index, moved, reduce="mean", include_self=True)
        return torch.cat([kept, dst], dim=1)

    def unmerge(self, x: torch.Tensor) -> torch.Tensor:
        kept_count = self.kept_src.shape[1]
        kept, dst = x[:, :kept_count], x[:, kept_count:]
        out = x.new_empty(x.shape[0], self.tokens, x.shape[-1])
        out[:, self.dst_pos] = dst
        channels = x.shape[-1]
        kept_pos = self.src_pos[self.kept_src].unsqueeze(-1).expand(-1, -1, channels)
        merged_pos = self.src_pos[self.merged_src].unsqueeze(-1).expand(-1, -1, channels)
        out.scatter_(1, kept_pos, kept)
        out.scatter_(1, merged_pos, self._rows(dst, self.merged_dst))
        return out


class TokenMerging(Adapter):
    """`ratio`: the fraction of tokens merged away before each self-attention (0 = off, exactly); applied to the
    spatial transformers whose feature map is at most `max_downsample` times smaller than the largest the
    denoiser sees (1: the highest resolution only, the paper's default)."""

    def __init__(self, ratio: float = 0.5, max_downsample: int = 1, seed: int = 0):
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
            raise AdapterError(f"adapter 'token_merging': ratio must be a number in [0, 1); got {ratio!r}")
        if max_downsample not in (1, 2, 4, 8):
            raise AdapterError(f"adapter 'token_merging': max_downsample must be 1, 2, 4 or 8; got {max_downsample!r}")
        self.ratio, self.max_downsample, self.seed = float(ratio), int(max_downsample), int(seed)
        self._hooks: list[Any] = []
        self._wrapped: list[Any] = []
        self._largest = self._merges = 0
        self._warned = False

    def _transformers(self, pipeline: Any) -> list[Any]:
        from latentgen.nn.attention import SpatialTransformer

        return [module for module in pipeline.denoiser.modules() if isinstance(module, SpatialTransformer)]

    def check(self, pipeline: Any) -> None:
        if not self._transformers(pipeline):
            raise AdapterError(f"adapter 'token_merging' merges the tokens of a UNet's spatial transformers; denoiser "
                               f"'{pipeline.denoiser.name}' has none")

    def apply(self, pipeline: Any) -> None:
        if self.ratio == 0:
            return
        self._hooks.append(pipeline.denoiser.register_forward_pre_hook(self._see_input))
        self._hooks.append(pipeline.denoiser.register_forward_hook(self._check_merged))
        for transformer in self._transformers(pipeline):
            state: dict[str, Any] = {}
            self._hooks.append(transformer.register_forward_pre_hook(
                lambda module, args, state=state: state.update(size=tuple(args[0].shape[-2:]))))
            for block in transformer.transformer_blocks:
                attention = block.attn1
                attention.forward = self._merged(attention, state)  # an instance attribute, deleted on remove
                self._wrapped.append(attention)

    def _see_input(self, module: Any, args: tuple) -> None:
        height, width = args[0].shape[-2:]
        self._largest = height * width
        self._merges = 0

    def _check_merged(self, module: Any, args: tuple, output: Any) -> None:
        # Silence would read as "merging costs nothing": say once that it did not happen.
        if not self._merges and not self._warned:
            self._warned = True
            log.warning("adapter 'token_merging' merged nothing: denoiser '%s' has no self-attention on a feature "
                        "map at most max_downsample=%d times smaller than its largest (e.g. its first level has no "
                        "attention); raise max_downsample", getattr(module, "name", type(module).__name__),
                        self.max_downsample)

    def _merged(self, attention: Any, state: dict[str, Any]) -> Any:
        original = type(attention).forward

        def forward(x: torch.Tensor, context: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None):
            height, width = state.get("size", (0, 0))
            tokens = x.shape[1]
            if context is not None or tokens != height * width or \
                    tokens * self.max_downsample ** 2 < self._largest or height < 2 or width < 2:
                return original(attention, x, context, attn_mask)
            self._merges += 1
            merge = Merge(x, height, width, int(tokens * self.ratio), torch.Generator().manual_seed(self.seed))
            return merge.unmerge(original(attention, merge.merge(x), None, attn_mask))

        return forward

    def remove(self, pipeline: Any) -> None:
        for hook in self._hooks:
            hook.remove()
        for attention in self._wrapped:
            vars(attention).pop("forward", None)
        self._hooks, self._wrapped, self._largest = [], [], 0

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "ratio": self.ratio, "max_downsample": self.max_downsample, "seed": self.seed}

"""Token merging (`token_merging`): the bipartite merge and unmerge, fewer tokens in the self-attention at the
highest resolution while attached, the exact UNet back when detached, and ratio 0 as an exact no-op."""

from __future__ import annotations

import pytest
import torch

from latentgen import LatentDiffusionPipeline, registry
from latentgen.adapters.token_merging import Merge
from latentgen.config import compose
from latentgen.errors import AdapterError


def test_merging_tokens_equal_within_each_cell_loses_nothing():
    torch.manual_seed(0)
    cells = torch.randn(2, 4, 5, 8)  # (B, h/2, w/2, C): every 2x2 cell holds one value
    x = cells.repeat_interleave(2, 1).repeat_interleave(2, 2).reshape(2, 80, 8)
    merge = Merge(x, 8, 10, r=60, generator=torch.Generator().manual_seed(0))  # every source merged
    merged = merge.merge(x)
    assert merged.shape == (2, 20, 8)
    assert torch.allclose(merge.unmerge(merged), x, atol=1e-6)


def test_a_partial_merge_keeps_the_kept_tokens_and_averages_the_rest():
    torch.manual_seed(1)
    x = torch.randn(1, 36, 4)
    merge = Merge(x, 6, 6, r=9, generator=torch.Generator().manual_seed(0))
    merged = merge.merge(x)
    assert merged.shape == (1, 27, 4)
    restored = merge.unmerge(merged)
    kept = merge.src_pos[merge.kept_src[0]]
    assert torch.equal(restored[0, kept], x[0, kept])  # untouched tokens come back as they were
    total = x[0, merge.dst_pos].sum() + x[0, merge.src_pos[merge.merged_src[0]]].sum()
    counts = 1 + torch.bincount(merge.merged_dst[0], minlength=9).float()
    assert torch.allclose((merged[0, -9:] * counts[:, None]).sum(), total, atol=1e-4)  # means, weighted back


def test_attached_it_merges_detached_the_unet_is_exactly_back(smoke):
    x = torch.randn(2, smoke.codec.latent_channels, 8, 8)
    t = torch.tensor([500, 500])
    cond = smoke.conditioner({"prompt": ["a red circle", "a blue star"]})
    seen = []
    attention = next(m for m in smoke.denoiser.modules() if type(m).__name__ == "Attention")
    hook = attention.to_q.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[1]))
    with torch.no_grad():
        before = smoke.denoiser(x, t, cond)
        plain_tokens = list(seen)
        seen.clear()
        adapter = registry.build("adapter", "token_merging", ratio=0.5, max_downsample=8)
        smoke.attach(adapter)
        merged = smoke.denoiser(x, t, cond)
        merged_tokens = list(seen)
        smoke.detach(adapter)
        after = smoke.denoiser(x, t, cond)
    hook.remove()
    assert merged_tokens[0] == plain_tokens[0] // 2  # half the tokens merged away
    assert not torch.equal(merged, before) and torch.equal(after, before)
    off = registry.build("adapter", "token_merging", ratio=0.0)
    smoke.attach(off)
    with torch.no_grad():
        assert torch.equal(smoke.denoiser(x, t, cond), before)
    smoke.detach(off)


def test_bad_options_and_denoisers_without_spatial_transformers_are_refused():
    with pytest.raises(AdapterError, match="ratio must be a number in"):
        registry.build("adapter", "token_merging", ratio=1.0)
    with pytest.raises(AdapterError, match="max_downsample must be 1, 2, 4 or 8"):
        registry.build("adapter", "token_merging", max_downsample=3)
    dit = LatentDiffusionPipeline.from_config(compose("train", ["experiment=smoke", "denoiser=dit", "denoiser.depth=1",
                                                                "denoiser.hidden_size=32", "denoiser.num_heads=2"]))
    with pytest.raises(AdapterError, match="denoiser 'dit' has none"):
        dit.attach(registry.build("adapter", "token_merging"))


def test_it_says_once_when_no_attention_is_in_reach(caplog):
    # The shapes demo's UNet attends only below its first level: max_downsample 1 merges nothing, which must not
    # pass for "merging changed nothing".
    pipe = LatentDiffusionPipeline.from_config(compose("train", ["experiment=smoke", "denoiser.channel_mult=[1,2]",
                                                                 "denoiser.attention_resolutions=[2]"])).eval()
    x = torch.randn(2, pipe.codec.latent_channels, 8, 8)
    t = torch.tensor([500, 500])
    cond = pipe.conditioner({"prompt": ["a red circle", "a blue star"]})
    for max_downsample, warned in ((1, True), (2, False)):
        caplog.clear()
        adapter = registry.build("adapter", "token_merging", ratio=0.5, max_downsample=max_downsample)
        pipe.attach(adapter)
        with torch.no_grad(), caplog.at_level("WARNING", logger="latentgen.adapters"):
            pipe.denoiser(x, t, cond)
            pipe.denoiser(x, t, cond)
        pipe.detach(adapter)
        messages = [record.message for record in caplog.records if "merged nothing" in record.message]
        assert len(messages) == (1 if warned else 0), messages

"""Deep-feature reuse (`deep_cache`): full UNet calls at every interval-th sampling step only, the shallow blocks at
every step on the stored deep features, a new run starting afresh, interval 1 and detaching exactly off."""

from __future__ import annotations

import math

import pytest
import torch

from latentgen import LatentDiffusionPipeline, registry
from latentgen.config import compose
from latentgen.errors import AdapterError
from latentgen.nn.timestep_embedding import timestep_embedding


def _sample(pipe, steps: int = 6) -> torch.Tensor:
    return pipe.sample_latents(["a red circle"], steps=steps, seed=0)


class Counts:
    """Which denoiser calls ran the deep part (the middle block) and how often the first input block ran."""

    def __init__(self, unet):
        self.full: list[bool] = []
        self.shallow = 0
        self.hooks = [unet.register_forward_pre_hook(lambda module, args: self.full.append(False)),
                      unet.middle_block.register_forward_hook(lambda module, args, out: self._full()),
                      unet.input_blocks[0].register_forward_hook(lambda module, args, out: self._shallow())]

    def _full(self) -> None:
        self.full[-1] = True

    def _shallow(self) -> None:
        self.shallow += 1

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()


def test_interval_one_is_exactly_off_and_detaching_restores_the_unet_exactly(smoke):
    exact = _sample(smoke)
    off = smoke.attach(registry.build("adapter", "deep_cache", interval=1))
    try:
        assert smoke.denoiser.feature_cache is None
        assert torch.equal(_sample(smoke), exact)
    finally:
        smoke.detach(off)
    cached = smoke.attach(registry.build("adapter", "deep_cache", interval=2))
    try:
        reused = _sample(smoke)
    finally:
        smoke.detach(cached)
    assert smoke.denoiser.feature_cache is None
    assert torch.equal(_sample(smoke), exact)
    change = ((reused - exact).norm() / exact.norm()).item()
    assert 0 < change < 0.1  # an approximation: close to the exact run, not equal to it


def test_full_calls_every_interval_th_step_shallow_blocks_every_step_and_a_new_run_starts_afresh(smoke):
    steps = 7
    exact = _sample(smoke, steps)
    adapter = smoke.attach(registry.build("adapter", "deep_cache", interval=3))
    counts = Counts(smoke.denoiser)
    try:
        first = _sample(smoke, steps)
        first_pattern, first_shallow = list(counts.full), counts.shallow
        counts.full.clear()
        second = _sample(smoke, steps)
    finally:
        counts.close()
        smoke.detach(adapter)
    assert first_pattern == [step % 3 == 0 for step in range(steps)]
    assert sum(first_pattern) == math.ceil(steps / 3) and first_shallow == steps
    assert counts.full == first_pattern  # the second run's first step is full again, nothing carried over
    assert torch.equal(second, first) and not torch.equal(first, exact)


def test_a_reuse_call_is_the_shallow_path_on_the_stored_deep_features_with_the_residuals_on_the_skips_used(smoke):
    unet, depth = smoke.denoiser, 2
    count = len(unet.input_blocks)
    torch.manual_seed(1)
    x1, x2 = torch.randn(2, 2, smoke.codec.latent_channels, 8, 8)
    t1, t2 = torch.tensor([500, 500]), torch.tensor([400, 400])
    cond = smoke.conditioner({"prompt": ["a red circle", "a blue star"]})
    seen: dict[str, torch.Tensor] = {}
    hooks = [unet.input_blocks[i].register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(f"skip{i}", out))
             for i in range(count)]
    hooks.append(unet.middle_block.register_forward_hook(lambda m, a, out: seen.__setitem__("middle", out)))
    hooks.append(unet.output_blocks[count - depth].register_forward_pre_hook(
        lambda m, args: seen.__setitem__("into", args[0])))
    with torch.no_grad():
        unet(x1, t1, cond)  # the shapes of the skips and of the middle block's output
        residuals = [0.1 * torch.randn_like(seen[f"skip{i}"]) for i in range(count)]
        residuals.append(torch.randn_like(seen["middle"]))
        unet.residual_sources.append(lambda x, t, c: residuals)  # as a ControlNet adds its residuals
        try:
            plain_full = unet(x1, t1, cond)  # seen["into"]: the input of output_blocks[K - depth], residuals in
            for hook in hooks:
                hook.remove()
            deep = seen["into"][:, :seen["into"].shape[1] - seen[f"skip{depth - 1}"].shape[1]]
            plain_reuse = unet(x2, t2, cond)
            adapter = smoke.attach(registry.build("adapter", "deep_cache", interval=2, depth=depth))
            try:
                full, reused = unet(x1, t1, cond), unet(x2, t2, cond)
            finally:
                smoke.detach(adapter)
            emb, context = unet.time_embed(timestep_embedding(t2, unet.model_channels)), cond["crossattn"]
            h, skips = x2, []
            for index, block in enumerate(unet.input_blocks[:depth]):
                h = block(h, emb, context)
                skips.append(h + residuals[index])
            h = deep
            for block in unet.output_blocks[count - depth:]:
                h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
            by_hand = unet.out(h)
        finally:
            unet.residual_sources.clear()
    assert torch.equal(full, plain_full)  # a full call computes exactly what the plain UNet does
    assert torch.allclose(reused, by_hand, atol=1e-6, rtol=0) and not torch.allclose(reused, plain_reuse, atol=1e-3)


def test_calls_of_one_step_keep_their_own_features_and_reuse_only_what_fits(smoke):
    unet = smoke.denoiser
    cond2 = smoke.conditioner({"prompt": ["a red circle", "a blue star"]})
    cond1 = smoke.conditioner({"prompt": ["a red circle"]})
    x2, x1 = torch.randn(2, smoke.codec.latent_channels, 8, 8), torch.randn(1, smoke.codec.latent_channels, 8, 8)
    adapter = smoke.attach(registry.build("adapter", "deep_cache", interval=3))
    counts = Counts(unet)
    try:
        with torch.no_grad():
            for t, x, cond in [(500, x2, cond2), (500, x1, cond1),  # step 0: two calls, both full
                               (400, x2, cond2), (400, x1, cond1),  # step 1: each reuses its own call's features
                               (400, x2, cond2),  # a third call of step 1: nothing stored for it, full
                               (300, x1, cond1)]:  # step 2, call 0: the stored batch of 2 does not fit, full
                unet(x, torch.tensor([t] * len(x)), cond)
    finally:
        counts.close()
        smoke.detach(adapter)
    assert counts.full == [True, True, False, False, True, True]


def test_bad_options_and_denoisers_without_a_feature_cache_are_refused(smoke):
    for bad in (0, 1.5, True):
        with pytest.raises(AdapterError, match=rf"interval must be an integer >= 1; got {bad!r}"):
            registry.build("adapter", "deep_cache", interval=bad)
    with pytest.raises(AdapterError, match="depth must be an integer >= 1; got 0"):
        registry.build("adapter", "deep_cache", depth=0)
    with pytest.raises(AdapterError, match=r"depth must be in \[1, 3\] for denoiser 'unet'"):
        smoke.attach(registry.build("adapter", "deep_cache", depth=4))
    assert smoke.denoiser.feature_cache is None
    first = smoke.attach(registry.build("adapter", "deep_cache"))
    try:
        with pytest.raises(AdapterError, match="already has a feature cache"):
            smoke.attach(registry.build("adapter", "deep_cache", interval=2))
    finally:
        smoke.detach(first)
    assert registry.build("adapter", "deep_cache", interval=2).describe() == {"name": "deep_cache", "interval": 2,
                                                                               "depth": 2}
    dit = LatentDiffusionPipeline.from_config(compose("train", ["experiment=smoke", "denoiser=dit", "denoiser.depth=1",
                                                                "denoiser.hidden_size=32", "denoiser.num_heads=2"]))
    with pytest.raises(AdapterError, match="denoiser 'dit' has no feature cache"):
        dit.attach(registry.build("adapter", "deep_cache"))

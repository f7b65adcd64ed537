"""latentgen.testing's contract suites over every registered component of every kind that has one (the
kinds table, latentgen.kinds: built-ins and installed plugins alike), and proof that each suite catches
the faults it is meant to.

A component registered after this file was written is checked for free once it has small parameters:
SMALL_PARAMS in tests/registry/test_registry.py for latentgen's own, PLUGIN_PARAMS below for a plugin's.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import latentgen
from latentgen import registry
from latentgen.kinds import KINDS
from latentgen.testing import (HYDRA_RULE, REGISTRY_RULE, STATE_DICT_RULE, check_codec, check_conditioner,
                               check_denoiser, check_format, check_scheduler)
from test_registry import SMALL_PARAMS

CHECKS = {kind.name: kind.check_function() for kind in KINDS if kind.check is not None}

# Small parameters of the components that the plugins under plugins/ register.
PLUGIN_PARAMS: dict[tuple[str, str], dict[str, Any]] = {
    ("scheduler", "rk4"): {},
    ("conditioner", "minilm"): dict(context_dim=384, max_length=8),
}
# Where SMALL_PARAMS builds something that cannot take real inputs: the CLIP tokenizer's ids reach 49407.
CONTRACT_OVERRIDES = {("conditioner", "clip_text"): dict(vocab_size=49408)}


def _smoke_pipeline(shared_dir):
    from latentgen.config import compose
    from latentgen.pipeline import LatentDiffusionPipeline

    return LatentDiffusionPipeline.from_config(compose("train", ["experiment=smoke"]))


def _sd_tiny_pipeline(shared_dir):
    """sd-tiny's architecture (random weights) with a full CLIP vocabulary, so that prompts tokenize."""
    import yaml

    from latentgen.interop.original_config import pipeline_config
    from latentgen.pipeline import LatentDiffusionPipeline

    original = yaml.safe_load((shared_dir / "golden" / "sd-tiny-config.yaml").read_text())
    original["model"]["params"]["cond_stage_config"]["params"]["text_config"]["vocab_size"] = 49408
    return LatentDiffusionPipeline.from_config(pipeline_config(original))


def _sdxl_tiny_pipeline(shared_dir):
    """The tiny SDXL base of ../shared/golden, from its sgm config (random weights: the suite saves what it built)."""
    from latentgen.interop.original_config import read_original_config
    from latentgen.interop.sgm_config import sgm_pipeline_config
    from latentgen.pipeline import LatentDiffusionPipeline

    return LatentDiffusionPipeline.from_config(
        sgm_pipeline_config(read_original_config(shared_dir / "golden" / "sdxl-tiny-config.yaml")))


# A pipeline each built-in format can hold, for its save-and-load rule.
FORMAT_PIPELINES = {"latentgen": _smoke_pipeline, "stable_diffusion": _sd_tiny_pipeline, "sdxl": _sdxl_tiny_pipeline}


def registered() -> list[tuple[str, str]]:
    return [(kind, name) for kind in CHECKS for name in registry.available(kind)]


def small_params(kind: str, name: str) -> dict[str, Any]:
    if (kind, name) in SMALL_PARAMS:
        params = SMALL_PARAMS[(kind, name)]
    elif (kind, name) in PLUGIN_PARAMS:
        params = PLUGIN_PARAMS[(kind, name)]
    else:
        (entry, *_) = registry.entries(kind)[name]
        pytest.fail(f"{kind} '{name}' ({entry.provenance}) has no small parameters for the contract suite: add them "
                    f"to SMALL_PARAMS in tests/registry/test_registry.py (a latentgen component) or PLUGIN_PARAMS in "
                    f"tests/registry/test_contract_suites.py (a plugin's)")
    return {**params, **CONTRACT_OVERRIDES.get((kind, name), {})}


@pytest.mark.parametrize(("kind", "name"), registered(), ids=[f"{k}-{n}" for k, n in registered()])
def test_every_registered_component_honours_its_contract(kind, name, shared_dir):
    params = small_params(kind, name)
    if kind == "format":  # a format's suite saves and loads a pipeline it can hold
        pipeline = FORMAT_PIPELINES.get(name)
        checked = check_format(lambda: registry.build(kind, name, **params),
                               pipeline=(lambda: pipeline(shared_dir)) if pipeline else None)
        assert {REGISTRY_RULE, "sniff refuses other files"} <= set(checked), checked
        assert pipeline is None or "save, sniff and load round trip" in checked
        return
    checked = CHECKS[kind](lambda: registry.build(kind, name, **params))
    assert {REGISTRY_RULE, HYDRA_RULE} <= set(checked), checked
    if kind != "scheduler":
        assert {STATE_DICT_RULE, "dtype float32", "dtype bfloat16", "determinism"} <= set(checked), checked


def test_every_kind_has_components_to_check():
    assert all(registry.available(kind) for kind in CHECKS)


# ---- each suite catches what it claims to ------------------------------------------------------

class _Codec(latentgen.Codec):
    """A correct 2x2 average-pool codec; the tests below break one rule at a time."""

    def __init__(self):
        super().__init__()
        self.latent_channels, self.downsampling_factor, self.scale_factor = 3, 2, 0.5
        self.gain = nn.Parameter(torch.ones(()))

    def encode(self, images, generator=None):
        self.check_images(images)
        return nn.functional.avg_pool2d(images, 2) * self.gain * self.scale_factor

    def decode(self, latents):
        self.check_latents(latents)
        return nn.functional.interpolate(latents / self.scale_factor, scale_factor=2.0) * self.gain


class _UnscaledCodec(_Codec):
    def encode(self, images, generator=None):
        return super().encode(images) / self.scale_factor * 0.5  # a constant where scale_factor belongs


class _StatefulCodec(_Codec):
    """Keeps a tensor outside its state dict."""

    def __init__(self):
        super().__init__()
        self.offset = torch.randn(())

    def encode(self, images, generator=None):
        return super().encode(images) * (1 + self.offset)


class _SilentCodec(_Codec):
    """Accepts images of any channel count."""

    def encode(self, images, generator=None):
        return nn.functional.avg_pool2d(images[:, :3], 2) * self.gain * self.scale_factor


class _Denoiser(latentgen.Denoiser):
    def __init__(self, mix_batch: bool = False, ignore_vector: bool = False):
        super().__init__()
        self.in_channels, self.out_channels, self.vector_dim = 3, 3, 4
        self.mix_batch, self.ignore_vector = mix_batch, ignore_vector
        self.proj = nn.Linear(4, 3)

    def forward(self, x, t, cond):
        if "vector" not in cond:
            raise ValueError(f"{self.name}: cond['vector'] is required")
        if x.shape[1] != 3:
            raise ValueError(f"{self.name}: expected 3 channels")
        shift = 0 if self.ignore_vector else self.proj(cond["vector"].to(x.dtype))[:, :, None, None]
        out = x * torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1, 1, 1) / 1000 + shift
        return out - out.mean(0, keepdim=True) if self.mix_batch else out


class _Conditioner(latentgen.Conditioner):
    input_keys = ("label",)

    def __init__(self, width: int = 4, declared: int = 4):
        super().__init__()
        self.table = nn.Embedding(3, width)
        self.declared = declared

    @property
    def outputs(self):
        return {"vector": self.declared}

    def forward(self, batch):
        self.check_inputs(batch)
        return {"vector": self.table(torch.as_tensor(batch["label"]))}

    def unconditional(self, batch):
        self.check_inputs(batch)
        return {"vector": self.table(torch.full_like(torch.as_tensor(batch["label"]), 2))}


class _NoisyEuler(latentgen.Scheduler):
    """Euler steps plus a little noise drawn from the global RNG instead of the generator."""

    stochastic = True

    def sample(self, denoise, x, sigmas, generator, callback):
        for i in range(len(sigmas) - 1):
            denoised = denoise(x, sigmas[i])
            self.report(callback, i, x, sigmas[i], denoised)
            x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i]) + 1e-3 * torch.randn_like(x)
        return x


def test_the_reference_components_pass():
    assert "scale_factor" in check_codec(_Codec)
    assert "samples are independent" in check_denoiser(_Denoiser)
    assert "determinism" in check_conditioner(_Conditioner)
    # Built outside the registry: the rebuild rules do not apply, and the result says so.
    assert REGISTRY_RULE not in check_codec(_Codec())


@pytest.mark.parametrize(("check", "component", "rule"), [
    (check_codec, _UnscaledCodec, "codec '_UnscaledCodec' breaks the codec contract: scale_factor"),
    (check_codec, _StatefulCodec, "state dict round trip"),
    (check_codec, _SilentCodec, "bad inputs are refused: images with 4 channels are accepted"),
    (check_denoiser, lambda: _Denoiser(mix_batch=True), "samples are independent"),
    (check_denoiser, lambda: _Denoiser(ignore_vector=True), "changing cond['vector'] does not change the output"),
    (check_conditioner, lambda: _Conditioner(width=5), "shapes: forward['vector'] has shape (2, 5)"),
    (check_scheduler, _NoisyEuler, "scheduler '_NoisyEuler' breaks the scheduler contract: determinism"),
])
def test_a_broken_rule_is_named(check, component, rule):
    with pytest.raises(AssertionError) as info:
        check(component)
    assert rule in str(info.value)


def test_a_factory_of_the_wrong_kind_is_named():
    with pytest.raises(AssertionError, match="not a latentgen.contracts.codec.Codec"):
        check_codec(lambda: _Denoiser())


def test_a_broken_hydra_option_is_named():
    from latentgen.schedulers.euler import EulerScheduler

    class Renamed(EulerScheduler):
        pass

    registry.register("scheduler", "euler_renamed_for_test", Renamed)
    try:
        built = registry.build("scheduler", "euler_renamed_for_test")
        assert HYDRA_RULE in check_scheduler(built)
        built.registry_name = "euler"  # now the registry and Hydra rebuild another type
        with pytest.raises(AssertionError, match="rebuilt by latentgen.registry.build .* gives a EulerScheduler"):
            check_scheduler(built)
    finally:
        registry.unregister("scheduler", "euler_renamed_for_test")

"""Adding a conditioning key is one row of latentgen/contracts/cond_keys.py, and adding a kind one entry of
latentgen/kinds.py: each test adds one (as CONTRIBUTING.md shows) and uses it through every reader, with no
other change to latentgen."""

from __future__ import annotations

import io
from contextlib import redirect_stdout

import pytest
import torch
from torch import nn

import latentgen
from latentgen import kinds, registry
from latentgen.contracts.cond_keys import COND_KEYS, CondKey
from latentgen.denoisers.inputs import check_denoiser_inputs
from latentgen.errors import IncompatibleComponentsError, PluginLoadError

# ---- a conditioning key --------------------------------------------------------------------------

POOLED = CondKey("pooled", ("B", "W"), "pooled_dim", join_dim=-1, meaning="a pooled text embedding")


class PooledConditioner(latentgen.Conditioner):
    """Labels (B,) -> "pooled" (B, width): a learned embedding under the new key."""

    input_keys = ("label",)

    def __init__(self, width: int = 6):
        super().__init__()
        self.table = nn.Embedding(4, width)

    @property
    def outputs(self):
        return {"pooled": self.table.embedding_dim}

    def forward(self, batch):
        self.check_inputs(batch)
        return {"pooled": self.table(torch.as_tensor(batch["label"]).to(self.table.weight.device))}

    def unconditional(self, batch):
        return {"pooled": torch.zeros_like(self(batch)["pooled"])}


class PooledDenoiser(latentgen.Denoiser):
    """x + a per-sample shift from "pooled", through a 1x1 conv: reads the new key by declaring its width."""

    def __init__(self, channels: int = 3, pooled_dim: int = 6):
        super().__init__()
        self.in_channels = self.out_channels = channels
        self.pooled_dim = pooled_dim
        self.mix = nn.Conv2d(channels, channels, 1)
        self.shift = nn.Linear(pooled_dim + 1, channels)

    def forward(self, x, t, cond):
        t = check_denoiser_inputs(self, x, t, cond, "any size")
        features = torch.cat([cond["pooled"], t[:, None].to(x.dtype) / 1000], dim=1)
        return self.mix(x) + self.shift(features)[:, :, None, None]


@pytest.fixture
def pooled_key(monkeypatch):
    monkeypatch.setitem(COND_KEYS, "pooled", POOLED)  # the one row a contributor adds
    registry.register("conditioner", "pooled_test", PooledConditioner)
    registry.register("denoiser", "pooled_test", PooledDenoiser)
    yield
    registry.unregister("conditioner", "pooled_test")
    registry.unregister("denoiser", "pooled_test")


def test_a_new_conditioning_key_works_everywhere_from_one_row(pooled_key):
    from latentgen.pipeline import LatentDiffusionPipeline
    from latentgen.testing import check_conditioner, check_denoiser

    denoiser = registry.build("denoiser", "pooled_test")
    assert denoiser.required_cond == {"pooled": 6} and denoiser.latent_channels == 3
    # The contract suites make inputs of the right shape from the row.
    check_denoiser(lambda: registry.build("denoiser", "pooled_test"))
    check_conditioner(lambda: registry.build("conditioner", "pooled_test"))
    # A stack joins members' outputs of the key as the row says: along the width, widths adding up.
    stack = registry.build("conditioner", "stack", conditioners=[{"name": "pooled_test", "width": 2},
                                                                  {"name": "pooled_test", "width": 4}],
                           pooled_dim=6)
    assert stack.outputs == {"pooled": 6} and stack({"label": torch.tensor([0, 1])})["pooled"].shape == (2, 6)
    # The pipeline assembles, checks and samples it.
    codec = registry.build("codec", "identity")
    pipe = LatentDiffusionPipeline(codec, denoiser, stack)
    images = pipe(labels=[0, 1], steps=2, seed=0, height=8, width=8, output_type="tensor")
    assert images.shape == (2, 3, 8, 8) and torch.isfinite(images).all()
    # A mismatch names both sides and the denoiser attribute the row declares.
    with pytest.raises(IncompatibleComponentsError, match=r"'pooled' of width 6 .* denoiser.pooled_dim=6"):
        LatentDiffusionPipeline(codec, registry.build("denoiser", "pooled_test", pooled_dim=5), stack)
    with pytest.raises(ValueError, match=r"expected cond\['pooled'\] of shape \(2, 6\)"):
        denoiser(torch.zeros(2, 3, 4, 4), 1.0, {"pooled": torch.zeros(2, 5)})


def test_without_the_row_the_key_is_refused_by_name():
    registry.register("conditioner", "pooled_test", PooledConditioner)
    try:
        with pytest.raises(IncompatibleComponentsError, match="unknown conditioning key 'pooled'"):
            from latentgen.pipeline import LatentDiffusionPipeline

            LatentDiffusionPipeline(registry.build("codec", "identity"),
                                    registry.build("denoiser", "unet", in_channels=3, out_channels=3,
                                                   model_channels=32, channel_mult=[1], num_res_blocks=1,
                                                   attention_resolutions=[], num_head_channels=16),
                                    registry.build("conditioner", "pooled_test"))
    finally:
        registry.unregister("conditioner", "pooled_test")


# ---- a kind --------------------------------------------------------------------------------------

class Guider:
    """The base class of the new kind: turns a conditional and an unconditional estimate into one."""

    def combine(self, cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class ScaledGuider(Guider):
    """uncond + scale * (cond - uncond)."""

    def __init__(self, scale: float = 2.0):
        self.scale = scale

    def combine(self, cond, uncond):
        return uncond + self.scale * (cond - uncond)


GUIDER = kinds.Kind("guider", "latentgen.guiders", f"{__name__}:Guider", "combines guided estimates",
                    hydra_group="guider", slot="callable", default="scaled_test")


@pytest.fixture
def guider_kind(monkeypatch):
    monkeypatch.setattr(kinds, "KINDS", (*kinds.KINDS, GUIDER))  # the one entry a contributor adds
    registry.register("guider", "scaled_test", ScaledGuider)
    yield
    registry.unregister("guider", "scaled_test")


def test_a_new_kind_works_everywhere_from_one_entry(guider_kind, tmp_path):
    from latentgen.cli.catalogue import markdown
    from latentgen.cli.main import plugins
    from latentgen.config import compose
    from latentgen.pipeline import LatentDiffusionPipeline

    # The registry: discovery, building, the base-class check, the error for an unknown name.
    assert registry.available("guider") == ["scaled_test"]
    assert registry.build("guider", "scaled_test", scale=3.0).combine(torch.ones(1), torch.zeros(1)).item() == 3.0
    registry.register("guider", "not_a_guider", lambda: object())
    with pytest.raises(PluginLoadError, match="a guider must subclass it"):
        registry.build("guider", "not_a_guider")
    registry.unregister("guider", "not_a_guider")
    with pytest.raises(LookupError, match="Available guiders: scaled_test .*'latentgen.guiders'"):
        registry.build("guider", "scaled_tset")
    # `latentgen plugins` and the catalogue list it.
    with redirect_stdout(io.StringIO()) as out:
        assert plugins(check=True) == 0
    assert "guiders (latentgen.guiders):" in out.getvalue() and "scaled_test" in out.getvalue()
    assert "## Guiders (`latentgen.guiders`)" in markdown()
    # Hydra: every registered guider is an option of the group.
    assert dict(compose("train", ["+guider=scaled_test"]).guider) == {
        "_target_": "latentgen.registry.build", "kind": "guider", "name": "scaled_test"}
    # The pipeline holds one (its default here), records it, and a checkpoint rebuilds it.
    pipe = LatentDiffusionPipeline.from_config(compose("train", ["experiment=smoke"]))
    assert isinstance(pipe.guider, ScaledGuider) and pipe.config["guider"] == {"name": "scaled_test"}
    pipe.guider = registry.build("guider", "scaled_test", scale=4.0)
    loaded = LatentDiffusionPipeline.from_checkpoint(pipe.save(tmp_path / "m.safetensors"))
    assert loaded.guider.scale == 4.0

"""The stages' Adam(W) takes torch's fused step where it can, and that step is the foreach step's update."""

from __future__ import annotations

import pytest
import torch

from latentgen.config import compose
from latentgen.pipeline import LatentDiffusionPipeline, build_component
from latentgen.training.codec_stage import CodecTrainer
from latentgen.training.denoiser_stage import DenoiserTrainer
from latentgen.training.fused_adam import adam, fused_option, load_optimizer_state
from latentgen.training.latent_cache import LatentCache
from latentgen.training.state_file import load_state, save_state

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_fused_only_for_floating_parameters_on_one_supported_device():
    assert fused_option([torch.zeros(2), torch.zeros(3, dtype=torch.bfloat16)]) == {"fused": True}
    assert fused_option([]) == {}
    assert fused_option([torch.zeros(2), torch.zeros(2, device="meta")]) == {}  # two devices
    assert fused_option([torch.zeros(2, device="meta")]) == {}  # no fused kernel there
    assert fused_option([torch.zeros(2), torch.zeros(2, dtype=torch.int64)]) == {}


def test_a_fused_adamw_step_is_the_foreach_step():
    """Twenty steps with weight decay and changing gradients land on the same weights (to float rounding)."""
    generator = torch.Generator().manual_seed(0)
    start = [torch.randn(shape, generator=generator) for shape in ((64, 32), (32,), (8, 4, 3, 3))]
    runs = []
    for options in ({"foreach": True}, fused_option(start)):
        weights = [torch.nn.Parameter(w.clone()) for w in start]
        optimizer = torch.optim.AdamW(weights, lr=1e-2, weight_decay=0.1, **options)
        gradients = torch.Generator().manual_seed(1)
        for _ in range(20):
            for w in weights:
                w.grad = torch.randn(w.shape, generator=gradients)
            optimizer.step()
        runs.append(weights)
    foreach, fused = runs
    assert all((a - s).abs().max() > 0.1 for a, s in zip(foreach, start))  # the steps moved the weights
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-5) for a, b in zip(foreach, fused))


def test_both_stages_build_fused_optimizers_on_a_cpu():
    config = compose("train", ["experiment=smoke", "dataset.size=8"])
    pipe = LatentDiffusionPipeline.from_config(config)
    cache = LatentCache(torch.randn(8, 4, 8, 8), {"prompt": ["a small red circle"] * 8})
    settings = {**config["train"]["denoiser"], "batch_size": 4}
    denoiser = DenoiserTrainer(pipe, cache, settings, torch.Generator().manual_seed(0))
    codec = CodecTrainer(build_component("codec", config["codec"]), build_component("dataset", config["dataset"]),
                         {**config["train"]["codec"], "batch_size": 4}, torch.device("cpu"),
                         torch.Generator().manual_seed(0))
    for trainer in (denoiser, codec):
        assert trainer.optimizer.param_groups[0]["fused"] is True
    before = [p.detach().clone() for p in denoiser.parameters]
    denoiser.step(1)
    assert any(not torch.equal(a, b) for a, b in zip(before, denoiser.parameters))


def test_moments_resumed_from_a_state_file_take_their_channels_last_parameter_layout(tmp_path):
    """A training state file stores tensors contiguous; the fused step on a channels-last weight must still
    see each element's own moments, so that three steps, a save and a load, then three more steps give
    exactly the weights of six steps in one go."""
    start = torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(0))

    def trained(resume_after: int | None, load=load_optimizer_state) -> torch.Tensor:
        weight = torch.nn.Parameter(start.clone().to(memory_format=torch.channels_last))
        optimizer = adam(torch.optim.AdamW, [weight], lr=1e-2)
        gradients = torch.Generator().manual_seed(1)
        for step in range(6):
            weight.grad = torch.randn(weight.shape, generator=gradients).contiguous(memory_format=torch.channels_last)
            optimizer.step()
            if step + 1 == resume_after:
                save_state(tmp_path / "state.safetensors", {"optimizer": optimizer.state_dict()})
                optimizer = adam(torch.optim.AdamW, [weight], lr=1e-2)
                load(optimizer, load_state(tmp_path / "state.safetensors")[0]["optimizer"])
        return weight.detach()

    whole = trained(None)
    assert torch.equal(trained(3), whole)
    # What the plain load does (the moments stay contiguous): another element's moments, another result.
    assert not torch.allclose(trained(3, load=lambda optimizer, state: optimizer.load_state_dict(state)), whole)

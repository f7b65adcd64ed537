"""The MMDiT denoiser against Stability AI's reference (../shared/golden/sd35-tiny-*: the raw output and a
skipped block), the full-size SD3.5 layouts key for key on the meta device, and its own rules."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch

from latentgen import registry
from latentgen.denoisers.mmdit import MMDiT

PREFIX = "model.diffusion_model."


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def golden(shared_dir):
    weights = safetensors.torch.load_file(str(shared_dir / "golden" / "sd35-tiny-weights.safetensors"))
    io = safetensors.torch.load_file(str(shared_dir / "golden" / "sd35-tiny-io.safetensors"))
    model = MMDiT(depth=2, context_dim=24, vector_dim=20, pos_embed_max_size=16, dual_attention_layers=[0])
    model.load_state_dict({k[len(PREFIX):]: v for k, v in weights.items() if k.startswith(PREFIX)}, strict=True)
    return model.eval(), io


def test_matches_the_reference_mmdit_x(golden):
    model, io = golden
    cond = {"crossattn": io["cond.context"], "vector": io["cond.pooled"]}
    with torch.no_grad():
        out = model(io["mmdit.x"], io["mmdit.timestep"], cond)
        skipped = model(io["mmdit.x"], io["mmdit.timestep"], cond, skip_layers=[0])
    assert relative_error(out, io["mmdit.out"]) < 1e-5
    assert relative_error(skipped, io["mmdit.out_skip"]) < 1e-5
    denoised = io["mmdit.x"] - out * io["mmdit.sigma"].view(-1, 1, 1, 1)  # what apply_model returns
    assert relative_error(denoised, io["mmdit.denoised"]) < 1e-5


def test_the_position_table_is_cropped_at_the_centre(golden):
    model, io = golden
    crop = model.cropped_pos_embed(8, 12)  # the golden latent 16x24 in patches of 2
    table = model.pos_embed.reshape(16, 16, -1)
    assert torch.equal(crop[0, 0], table[4, 2]) and torch.equal(crop[0, -1], table[11, 13])
    with pytest.raises(ValueError, match="exceeds the position table's 16x16"):
        model.cropped_pos_embed(17, 4)


def _spec(shared_dir, name):
    rows = [line.split("\t") for line in (shared_dir / "spec" / name).read_text().splitlines()
            if line.startswith(PREFIX)]
    return {key[len(PREFIX):]: tuple(int(n) for n in shape.strip().split("x") if n) for key, shape in rows}


@pytest.mark.parametrize(("spec", "options"), [
    ("sd35-medium-keys.tsv", dict(depth=24, dual_attention_layers=list(range(13)))),
    ("sd35-large-keys.tsv", dict(depth=38)),
])
def test_full_size_layouts_equal_the_spec(shared_dir, spec, options):
    with torch.device("meta"):
        model = MMDiT(context_dim=4096, vector_dim=2048, pos_embed_max_size=384 if options["depth"] == 24 else 192,
                      **options)
    ours = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert ours == _spec(shared_dir, spec)


def test_a_fresh_model_is_the_zero_function_and_refuses_what_it_cannot_build():
    model = registry.build("denoiser", "mmdit", in_channels=4, out_channels=4, depth=2, context_dim=8, vector_dim=None,
                           pos_embed_max_size=8)
    out = model(torch.randn(2, 4, 8, 8), torch.tensor([10.0, 900.0]), {"crossattn": torch.randn(2, 5, 8)})
    assert out.shape == (2, 4, 8, 8) and not out.any()  # adaLN-Zero and a zero final layer
    with pytest.raises(ValueError, match="needs a context_dim"):
        MMDiT(context_dim=None)
    with pytest.raises(ValueError, match=r"dual_attention_layers \[5\] are not blocks of a depth-2 model"):
        MMDiT(depth=2, dual_attention_layers=[5])
    with pytest.raises(ValueError, match="expected latent height and width that are multiples of 2"):
        model(torch.randn(1, 4, 7, 8), torch.tensor([1.0]), {"crossattn": torch.randn(1, 5, 8)})


def test_euler_through_the_rectified_flow_process_reproduces_the_reference_sampling(golden):
    """The reference samples SD3 with k-diffusion's Euler on the flow's own t; in latentgen's variance-exploding
    form (x / (1 - t), sigma = t / (1 - t)) the Euler step is the same DDIM step, so 4 guided steps of the MMDiT
    through `rectified_flow` land on `sample.euler_out`. The reference starts at t = 1 (pure noise), which
    this form reaches only in the limit: t = 1 - 1e-6 here, in float64 (the error that leaves: ~1e-6)."""
    from latentgen.diffusion.guidance import ClassifierFreeGuidance
    from latentgen.diffusion.prediction import ProcessDenoiser

    reference, io = golden
    model = MMDiT(depth=2, context_dim=24, vector_dim=20, pos_embed_max_size=16, dual_attention_layers=[0])
    model.load_state_dict(reference.state_dict())
    model = model.double()
    wrapped = ProcessDenoiser(model, registry.build("process", "rectified_flow", shift=3.0))
    rows = {key: io[key].double() for key in ("cond.context", "cond.pooled")}
    cond = {"crossattn": rows["cond.context"][0:1], "vector": rows["cond.pooled"][0:1]}
    uncond = {"crossattn": rows["cond.context"][2:3], "vector": rows["cond.pooled"][2:3]}  # the prompt ""
    guided = ClassifierFreeGuidance(wrapped, cond, uncond, 5.0)
    t = io["sample.sigmas"].double().clamp(max=1 - 1e-6)
    sigmas = torch.where(t > 0, t / (1 - t), torch.zeros_like(t))
    with torch.no_grad():
        out = registry.build("scheduler", "euler")(guided, io["sample.x_start"].double() / (1 - t[0]), sigmas)
    assert relative_error(out, io["sample.euler_out"]) < 1e-5

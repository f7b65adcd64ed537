"""A refiner finishing a request (`pipe(..., refiner=other, refiner_switch=f)`): the pair is one scheduler run whose
denoiser switches models by noise level. Checked against a hand-written two-model Euler loop, against the
plain run when the refiner is the base itself (every registered scheduler), and for the bad pairings."""

from __future__ import annotations

import pytest
import torch

from latentgen.diffusion.experts import NoiseLevelExperts
from latentgen.diffusion.guidance import ClassifierFreeGuidance
from latentgen.diffusion.sigma_grids import sigma_grid
from latentgen.pipeline import LatentDiffusionPipeline
from latentgen.registry import available

SIZE = dict(height=32, width=32)


@pytest.fixture(scope="module")
def golden(shared_dir):
    return shared_dir / "golden"


@pytest.fixture(scope="module")
def base(golden):
    return LatentDiffusionPipeline.from_checkpoint(golden / "sdxl-tiny-weights.safetensors",
                                                   original_config=golden / "sdxl-tiny-config.yaml")


@pytest.fixture(scope="module")
def refiner(golden):
    return LatentDiffusionPipeline.from_checkpoint(golden / "sdxl-refiner-tiny-weights.safetensors",
                                                   original_config=golden / "sdxl-refiner-tiny-config.yaml")


def guided(pipe: LatentDiffusionPipeline, prompt: str, scale: float, conditioning: dict | None = None):
    """The guided denoiser of one prompt at SIZE, built from public parts only."""
    batch = pipe.inputs([prompt], None, 1, conditioning)
    batch.update(latent_size=(16, 16), image_size=(SIZE["height"], SIZE["width"]))
    return ClassifierFreeGuidance(pipe.model, pipe.conditioner(batch), pipe.conditioner.unconditional(batch), scale)


@torch.no_grad()
def test_the_pair_is_the_base_above_the_switch_and_the_refiner_below(base, refiner):
    steps, fraction, scale = 10, 0.8, 5.0
    grid = sigma_grid(base.schedule, steps, "discrete", "leading")
    handoff = round(fraction * steps)
    assert float(grid[handoff]) <= refiner.model.trained_sigma_max  # a switch within the refiner's noise levels
    high, low = guided(base, "a fox", scale), guided(refiner, "a fox", scale, {"aesthetic_score": 7.5})
    x = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(3)) * grid[0].float()
    for i in range(steps):  # Euler (Karras et al. 2022, Alg. 1 without the correction), each step by its expert
        sigma, following = grid[i].float(), grid[i + 1].float()
        denoised = (high if i < handoff else low)(x, sigma)
        x = x + (following - sigma) * (x - denoised) / sigma
    got = base("a fox", steps=steps, seed=3, guidance_scale=scale, output_type="latent", refiner=refiner,
               refiner_switch=fraction, conditioning={"aesthetic_score": 7.5}, **SIZE)
    assert float((got - x).norm() / x.norm()) < 1e-6  # float32 summation order apart
    alone = base("a fox", steps=steps, seed=3, guidance_scale=scale, output_type="latent", **SIZE)
    assert not torch.allclose(got, alone, atol=1e-3)  # the refiner did change the result


@pytest.mark.parametrize("scheduler", available("scheduler"))
@torch.no_grad()
def test_every_scheduler_runs_the_pair_as_one_run(base, scheduler):
    """With the base as its own refiner, the pair computes exactly the plain run: the switch disturbs neither
    a multistep history nor a stochastic sampler's noise."""
    from latentgen.assembly import build_component

    pipe = LatentDiffusionPipeline(base.codec, base.denoiser, base.conditioner,
                                   build_component("scheduler", {"name": scheduler}), base.diffusion, base.sampling)
    plain = pipe("a fox", steps=6, seed=1, output_type="latent", **SIZE)
    paired = pipe("a fox", steps=6, seed=1, output_type="latent", refiner=pipe, refiner_switch=0.5, **SIZE)
    assert torch.equal(plain, paired)


@torch.no_grad()
def test_conditioning_goes_to_the_model_that_reads_it(base, refiner):
    options = dict(steps=10, seed=0, output_type="latent", refiner=refiner, **SIZE)
    default = base("a fox", **options)  # the refiner's aesthetic score 6 (sgm's sampling default)
    scored = base("a fox", conditioning={"aesthetic_score": 6.0}, **options)
    other = base("a fox", conditioning={"aesthetic_score": 2.0}, **options)
    assert torch.equal(default, scored) and not torch.allclose(default, other, atol=1e-4)
    with pytest.raises(ValueError, match=r"conditioning\['depth'\] is read by neither the base .* nor the refiner"):
        base("a fox", conditioning={"depth": torch.zeros(1, 1, 32, 32)}, **options)


@torch.no_grad()
def test_img2img_and_inpainting_take_the_refiner_too(base, refiner):
    image = torch.rand(1, 3, 32, 32) * 2 - 1
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    out = base("a fox", steps=10, seed=0, image=image, mask=mask, refiner=refiner, output_type="tensor", **SIZE)
    assert out.shape == (1, 3, 32, 32) and bool(torch.isfinite(out).all())
    low = refiner("a fox", steps=10, seed=0, image=image, strength=0.2, output_type="latent", **SIZE)  # alone
    assert low.shape == (1, 4, 16, 16)


def test_bad_pairings_are_refused_by_name(base, refiner, golden):
    options = dict(steps=10, seed=0, output_type="latent", **SIZE)
    with pytest.raises(ValueError, match=r"cannot start from pure noise .* use it as the refiner of a base model"):
        refiner("a fox", **options)
    with pytest.raises(ValueError, match=r"img2img at strength=0.8 .* strength <= 0.20 \(at 10 steps\)"):
        refiner("a fox", image=torch.zeros(1, 3, 32, 32), **options)
    with pytest.raises(ValueError, match=r"it is a refiner; pass a base model as the checkpoint"):
        refiner("a fox", refiner=base, **options)
    with pytest.raises(ValueError, match=r"hands sigma .* to the refiner, .* raise refiner_switch to at least 0.80"):
        base("a fox", refiner=refiner, refiner_switch=0.5, **options)
    with pytest.raises(ValueError, match=r"at 2 steps leaves the refiner no step"):
        base("a fox", refiner=refiner, **{**options, "steps": 2})
    with pytest.raises(ValueError, match=r"refiner_switch=1: must be a number in \(0, 1\)"):
        base("a fox", refiner=refiner, refiner_switch=1, **options)
    with pytest.raises(ValueError, match=r"refiner_switch was given without a refiner"):
        base("a fox", refiner_switch=0.5, **options)
    with pytest.raises(TypeError, match=r"refiner='r.safetensors': must be a LatentDiffusionPipeline"):
        base("a fox", refiner="r.safetensors", **options)
    v1 = LatentDiffusionPipeline.from_checkpoint(golden / "sd-tiny-weights.safetensors",
                                                 original_config=golden / "sd-tiny-config.yaml")
    with pytest.raises(ValueError, match=r"another latent space than the base \(scale_factor 0.13025 vs 0.18215\)"):
        base("a fox", refiner=v1, **options)


def test_experts_split_a_batch_whose_sigmas_straddle_the_switch():
    experts = NoiseLevelExperts(lambda x, s: torch.full_like(x, 1.0), lambda x, s: torch.full_like(x, 2.0), 1.0)
    x = torch.zeros(3, 1, 2, 2)
    out = experts(x, torch.tensor([2.0, 1.0, 0.5]))
    assert out[:, 0, 0, 0].tolist() == [1.0, 2.0, 2.0]  # the switch sigma itself belongs to the low-noise expert
    assert experts(x, torch.tensor(1.0 + 1e-7)).unique().tolist() == [2.0]  # float32 rounding of a grid sigma


def test_a_refiner_trains_on_its_noise_levels_only():
    from latentgen.diffusion.noise_schedule import DiscreteNoiseSchedule
    from latentgen.diffusion.prediction import DiscreteTimeDenoiser

    model = DiscreteTimeDenoiser(None, DiscreteNoiseSchedule.from_betas(), "eps", trained_timesteps=200)
    sigmas = model.sample_training_sigmas(4096, torch.Generator().manual_seed(0))
    assert float(sigmas.max()) == model.trained_sigma_max == float(model.schedule.sigmas[199])
    assert len(sigmas.unique()) == 200

"""Image conditioning concatenated to the latents (concat_image): resizing, noise augmentation, the stack,
the pipeline's `conditioning=` inputs, latentgen-sample's loader, and the super-resolution configs."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from latentgen import registry
from latentgen.conditioners.concat_image import LATENT_SIZE_KEY, MODES
from latentgen.config import compose
from latentgen.pipeline import LatentDiffusionPipeline
from latentgen.testing import fill_zero_parameters

ROOT = Path(__file__).resolve().parents[2]
TINY = ["experiment=smoke"]
CONCAT_DENOISER = ["denoiser.in_channels=7", "+denoiser.concat_channels=3"]  # 4 latent + 3 image channels


def concat_image(**params):
    return registry.build("conditioner", "concat_image", **params)


def random_maps(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def abar_reference(level: int) -> float:
    """prod over the first `level` steps of (1 - beta), betas = linspace(sqrt(1e-4), sqrt(0.02), 1000)^2."""
    betas = [(0.01 + (0.02**0.5 - 0.01) * i / 999) ** 2 for i in range(1000)]
    return float(np.prod([1 - beta for beta in betas[:level]]))


# ---- the conditioner -----------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_map_is_resized_to_the_latent_grid_like_interpolate(mode):
    conditioner = concat_image(mode=mode)
    maps = random_maps(2, 3, 12, 20)
    concat = conditioner({"low_res": maps, LATENT_SIZE_KEY: (6, 10)})["concat"]
    corners = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    torch.testing.assert_close(concat, F.interpolate(maps, size=(6, 10), mode=mode, **corners), rtol=0, atol=0)
    assert conditioner.outputs == {"concat": 3}
    # Without a latent grid (or on it already) the map is used as it is.
    assert torch.equal(conditioner({"low_res": maps})["concat"], maps)
    assert torch.equal(conditioner({"low_res": maps, LATENT_SIZE_KEY: torch.tensor([12, 20])})["concat"], maps)


def test_channel_count_is_configurable_and_checked():
    depth = concat_image(channels=1, input_key="depth", mode="area")
    out = depth({"depth": random_maps(3, 1, 32, 32), LATENT_SIZE_KEY: (8, 8)})["concat"]
    assert out.shape == (3, 1, 8, 8) and depth.input_keys == ("depth",)
    with pytest.raises(ValueError, match=r"reads 'depth' as a float tensor \(B, 1, H, W\); got \(3, 3, 32, 32\).*set "
                                         r"channels"):
        depth({"depth": random_maps(3, 3, 32, 32)})
    with pytest.raises(ValueError, match=r"got list"):
        depth({"depth": [Image.new("L", (8, 8))]})
    with pytest.raises(ValueError, match="float tensor"):
        depth({"depth": torch.zeros(1, 1, 8, 8, dtype=torch.uint8)})
    with pytest.raises(ValueError, match=r"reads the input\(s\) \['depth'\]"):
        depth({"low_res": random_maps(1, 1, 8, 8)})
    with pytest.raises(ValueError, match=r"latent grid \(h, w\)"):
        depth({"depth": random_maps(1, 1, 8, 8), LATENT_SIZE_KEY: (8,)})


@pytest.mark.parametrize("params, message", [
    (dict(mode="lanczos"), "unknown mode 'lanczos'; valid values: bicubic, bilinear, nearest, area"),
    (dict(channels=0), "channels must be a positive integer"),
    (dict(max_noise_level=1001), r"max_noise_level must be in 0..1000"),
    (dict(dropout=0.1), "set unconditional: zeros, or dropout: 0"),
    (dict(unconditional="noise"), "unknown unconditional 'noise'; valid values: keep, zeros"),
    (dict(noise_level_dim=1), "noise_level_dim must be at least 2"),
])
def test_bad_options_are_refused_with_the_fix(params, message):
    with pytest.raises(ValueError, match=message):
        concat_image(**params)


def test_noise_augmentation_follows_the_forward_process():
    """Training levels are uniform on 0..max; each map is sqrt(abar_l) x + sqrt(1 - abar_l) noise with the x4
    upscaler's betas; the level's sinusoidal embedding is the "vector" output."""
    from latentgen.nn.timestep_embedding import timestep_embedding

    top = 350
    conditioner = concat_image(max_noise_level=top, noise_level_dim=32)
    assert conditioner.outputs == {"concat": 3, "vector": 32}
    value = 0.5
    maps = torch.full((6000, 3, 8, 8), value)
    out = conditioner.for_training({"low_res": maps}, torch.Generator().manual_seed(0))
    table = timestep_embedding(torch.arange(top + 1), 32)  # (351, 32)
    levels = torch.cdist(out["vector"], table).argmin(dim=1)  # (B,): the level each item was noised to
    torch.testing.assert_close(out["vector"], table[levels])
    assert levels.min() == 0 and levels.max() == top
    assert abs(levels.double().mean().item() - top / 2) < 4  # std of the mean of 6000 uniform draws: 1.3
    abar = torch.tensor([abar_reference(level) for level in range(top + 1)], dtype=torch.float64)[levels]
    noisy = levels > 0
    z = (out["concat"][noisy].double() - abar[noisy].sqrt().view(-1, 1, 1, 1) * value) \
        / (1 - abar[noisy]).sqrt().view(-1, 1, 1, 1)
    assert abs(z.mean().item()) < 0.005 and abs(z.std().item() - 1) < 0.005  # ~1.1M standard normal values
    assert torch.equal(out["concat"][~noisy], maps[~noisy])  # level 0 is the map itself
    # Reproducible from the generator alone.
    again = conditioner.for_training({"low_res": maps}, torch.Generator().manual_seed(0))
    assert torch.equal(again["concat"], out["concat"])


def test_sampling_uses_one_fixed_level_and_the_same_noise_in_both_branches():
    maps = random_maps(4, 3, 8, 8)
    conditioner = concat_image(max_noise_level=350, sampling_noise_level=20, noise_level_dim=8)
    cond, uncond = conditioner({"low_res": maps}), conditioner.unconditional({"low_res": maps})
    assert torch.equal(cond["concat"], uncond["concat"]) and torch.equal(cond["vector"], uncond["vector"])
    assert torch.equal(conditioner({"low_res": maps})["concat"], cond["concat"])  # deterministic
    residual = (cond["concat"] - abar_reference(20) ** 0.5 * maps) / (1 - abar_reference(20)) ** 0.5
    assert 0.8 < residual.std().item() < 1.2  # noise of the level-20 size (768 values)
    assert torch.equal(concat_image()({"low_res": maps})["concat"], maps)  # level 0: no noise at all


def test_zeros_unconditional_and_its_dropout_rate():
    conditioner = concat_image(unconditional="zeros", dropout=0.3)
    maps = torch.ones(20_000, 3, 2, 2)
    assert not conditioner.unconditional({"low_res": maps[:2]})["concat"].any()
    out = conditioner.for_training({"low_res": maps}, torch.Generator().manual_seed(0))["concat"]
    dropped = (out == 0).flatten(1).all(1)
    assert ((out == 1).flatten(1).all(1) | dropped).all()
    assert dropped.float().mean().item() == pytest.approx(0.3, abs=0.015)


def test_module_moves_and_casts_its_outputs():
    conditioner = concat_image(noise_level_dim=4).to(torch.bfloat16)
    out = conditioner({"low_res": random_maps(2, 3, 4, 4)})
    assert out["concat"].dtype == out["vector"].dtype == torch.bfloat16
    assert conditioner.state_dict() == {}  # nothing to save: the buffer only tracks device and dtype


@pytest.mark.parametrize("params", [{}, dict(max_noise_level=100, sampling_noise_level=10, noise_level_dim=8,
                                             unconditional="zeros", dropout=0.2, mode="area")])
def test_conditioner_contract(params):
    from latentgen.testing import check_conditioner

    checked = check_conditioner(lambda: concat_image(**params), batch={"low_res": random_maps(2, 3, 8, 8)})
    assert {"shapes", "dtype bfloat16", "determinism", "bad inputs are refused"} <= set(checked)


# ---- the stack -----------------------------------------------------------------------------------

def test_stack_joins_concat_maps_in_member_order():
    members = [{"name": "masked_image", "latent_channels": 4}, {"name": "concat_image", "mode": "bilinear"},
               {"name": "text", "context_dim": 16, "num_layers": 1, "num_heads": 2, "dropout": 0.2}]
    stack = registry.build("conditioner", "stack", conditioners=members, concat_channels=8, context_dim=16)
    assert stack.outputs == {"concat": 8, "crossattn": 16}
    assert stack.input_keys == ("mask", "masked_image_latents", "low_res", "prompt")
    batch = {"mask": torch.ones(2, 1, 16, 16), "masked_image_latents": torch.randn(2, 4, 4, 4),
             "low_res": random_maps(2, 3, 8, 8), "prompt": ["a", "b"], LATENT_SIZE_KEY: (4, 4)}
    joined = stack(batch)
    masked, image, text = (member(batch) for member in stack.conditioners)
    assert torch.equal(joined["concat"], torch.cat([masked["concat"], image["concat"]], dim=1))
    assert torch.equal(joined["crossattn"], text["crossattn"])
    uncond = stack.unconditional(batch)  # the maps stay, the text becomes the empty prompt's
    assert torch.equal(uncond["concat"], joined["concat"]) and not torch.equal(uncond["crossattn"], joined["crossattn"])
    assert [member.dropout for member in stack.conditioners] == [0.0, 0.0, 0.2]
    with pytest.raises(ValueError, match="declares concat width 9 but its members give 8"):
        registry.build("conditioner", "stack", conditioners=members, concat_channels=9)


def tiny_pipeline(overrides=(), fill=True) -> LatentDiffusionPipeline:
    cfg = compose("train", TINY + list(overrides))
    pipe = LatentDiffusionPipeline.from_config(cfg).eval()
    torch.manual_seed(0)
    if fill:
        fill_zero_parameters(pipe.denoiser)  # zero-initialized output: otherwise no input would matter
    return pipe


def test_text_low_res_preset_composes_with_per_member_dropout_and_samples():
    cfg = compose("train", TINY + ["conditioner=text_low_res", "conditioner.conditioners.0.dropout=0.3"] + CONCAT_DENOISER)
    pipe = LatentDiffusionPipeline.from_config(cfg)
    text, image = pipe.conditioner.conditioners
    assert (text.name, text.dropout, image.name, image.dropout) == ("text", 0.3, "concat_image", 0.0)
    assert pipe.conditioner.outputs == {"crossattn": 64, "concat": 3} and pipe.denoiser.concat_channels == 3
    low_res = Image.new("RGB", (4, 4), (200, 30, 30))
    images = pipe(["a red circle", "a blue star"], conditioning={"low_res": low_res}, num_images=2, steps=2, seed=0)
    assert len(images) == 4 and images[0].size == (16, 16)
    # One map per prompt, or one per image, is used as given; another count is refused with the counts.
    per_prompt = torch.stack([random_maps(3, 4, 4, seed=1), random_maps(3, 4, 4, seed=2)])
    batch = pipe.inputs(["a", "b"], None, 2, {"low_res": per_prompt})
    assert torch.equal(batch["low_res"], per_prompt.repeat_interleave(2, dim=0))
    maps = [random_maps(3, 4, 4, seed=1), random_maps(3, 4, 4, seed=2)]  # a list of tensors is stacked
    assert torch.equal(pipe.inputs(["a", "b"], None, 1, {"low_res": maps})["low_res"], torch.stack(maps))
    with pytest.raises(ValueError, match=r"has 3 items for 2 prompt\(s\)/label\(s\) x 2 image\(s\)"):
        pipe.inputs(["a", "b"], None, 2, {"low_res": random_maps(3, 3, 4, 4)})


def test_a_one_channel_map_from_a_gray_picture():
    pipe = tiny_pipeline(["conditioner=concat_image", "conditioner.channels=1", "conditioner.input_key=depth",
                          "denoiser.in_channels=5", "+denoiser.concat_channels=1"])
    depth = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4, mode="L")
    batch = pipe.inputs(None, None, 2, {"depth": depth})
    expected = torch.from_numpy(np.asarray(depth, dtype=np.float32))[None, None] / 127.5 - 1
    assert torch.equal(batch["depth"], expected.expand(2, 1, 8, 8))
    near, far = (pipe(conditioning={"depth": d}, steps=2, seed=0, output_type="latent")
                 for d in (depth, Image.new("L", (8, 8), 255)))
    assert near.shape == (1, 4, 8, 8) and not torch.allclose(near, far)


def test_missing_or_stray_conditioning_is_named_with_the_fix():
    pipe = tiny_pipeline(["conditioner=text_low_res"] + CONCAT_DENOISER, fill=False)
    with pytest.raises(ValueError) as error:
        pipe("a red circle", steps=1)
    assert str(error.value) == (
        "conditioner 'concat_image' needs the input 'low_res', which was not given: pass "
        "conditioning={'low_res': <PIL image or tensor (B, C, H, W)>} to the pipeline "
        "(latentgen-sample: conditioning.low_res=<path.png>)")
    with pytest.raises(ValueError, match=r"conditioning\['depth'\] was given but conditioner 'stack' reads only "
                                         r"\['prompt', 'low_res'\]"):
        pipe("a", steps=1, conditioning={"low_res": random_maps(3, 4, 4), "depth": random_maps(1, 4, 4)})
    with pytest.raises(ValueError, match=r"conditioning\['prompt'\] is filled by the pipeline: pass prompts"):
        pipe("a", steps=1, conditioning={"low_res": random_maps(3, 4, 4), "prompt": ["b"]})


def test_the_map_reaches_the_denoiser():
    pipe = tiny_pipeline(["conditioner=concat_image"] + CONCAT_DENOISER)
    red, blue = Image.new("RGB", (8, 8), (230, 20, 20)), Image.new("RGB", (8, 8), (20, 20, 230))
    common = dict(steps=3, seed=0, output_type="latent")
    first = pipe(conditioning={"low_res": red}, **common)
    assert torch.equal(first, pipe(conditioning={"low_res": red}, **common))
    assert (first - pipe(conditioning={"low_res": blue}, **common)).abs().max() > 1e-3
    # Four maps without prompts: one sample each; the first draws the same noise as a single one.
    four = pipe(conditioning={"low_res": [red, blue, blue, red]}, **common)
    assert four.shape[0] == 4 and torch.allclose(four[0], first[0], atol=1e-5)


def test_inpainting_and_concat_image_share_the_denoiser_input():
    from latentgen.config.containers import to_plain

    cfg = to_plain(compose("train", TINY))
    cfg["conditioner"] = {"name": "stack", "conditioners": [
        {"name": "masked_image", "latent_channels": 4}, {"name": "concat_image"},
        {"name": "text", "context_dim": 16, "num_layers": 1, "num_heads": 2}]}
    cfg["denoiser"].update(in_channels=12, concat_channels=8, context_dim=16)  # 4 latent + 1 mask + 4 + 3
    pipe = LatentDiffusionPipeline.from_config(cfg)
    assert pipe.conditioner.outputs == {"concat": 8, "crossattn": 16}
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:12, 4:12] = 1
    images = pipe("a red circle", image=random_maps(1, 3, 16, 16), mask=mask, conditioning={"low_res": random_maps(3, 4, 4)},
                  steps=2, seed=0)
    assert len(images) == 1 and images[0].size == (16, 16)


# ---- latentgen-sample's loader -------------------------------------------------------------------

def test_sample_cli_loads_images_and_arrays(tmp_path):
    from latentgen.cli.sample import _conditioning

    Image.new("RGB", (4, 4), "red").save(tmp_path / "a.png")
    Image.new("RGBA", (4, 4), "blue").save(tmp_path / "b.png")
    np.save(tmp_path / "depth.npy", np.ones((1, 4, 4), dtype=np.float32))
    loaded = _conditioning({"low_res": [str(tmp_path / "a.png"), str(tmp_path / "b.png")], "depth": str(tmp_path / "depth.npy"),
                            "unused": None})
    assert set(loaded) == {"low_res", "depth"} and [image.mode for image in loaded["low_res"]] == ["RGB", "RGB"]
    assert len(loaded["depth"]) == 1 and loaded["depth"][0].shape == (1, 4, 4)
    with pytest.raises(FileNotFoundError, match=r"conditioning.low_res: no file '.*missing.png'"):
        _conditioning({"low_res": str(tmp_path / "missing.png")})


# ---- the dataset option and the super-resolution experiment --------------------------------------

def test_shapes_low_res_copy_is_the_block_average_in_8_bits():
    from latentgen.datasets.shapes import ShapesDataset

    dataset = ShapesDataset(image_size=32, size=3, low_res_size=8)
    item = dataset[2]
    pixels = ((item["image"] + 1) * 127.5).round().double()  # the uint8 image
    expected = pixels.reshape(3, 8, 4, 8, 4).mean(dim=(2, 4)).round() / 127.5 - 1
    torch.testing.assert_close(item["low_res"].double(), expected, rtol=0, atol=1e-6)
    bicubic = ShapesDataset(image_size=32, size=3, low_res_size=8, low_res_mode="bicubic")[2]["low_res"]
    reference = Image.fromarray(((item["image"] + 1) * 127.5).round().byte().permute(1, 2, 0).numpy())
    reference = torch.from_numpy(np.array(reference.resize((8, 8), Image.Resampling.BICUBIC))).permute(2, 0, 1)
    assert ((bicubic + 1) * 127.5 - reference.float()).abs().max() <= 2  # torch's antialiased bicubic vs PIL
    assert "low_res" not in ShapesDataset(image_size=32, size=1)[0]
    from latentgen.errors import ConfigError
    with pytest.raises(ConfigError, match=r"low_res_size must be an integer in 1..31"):
        ShapesDataset(image_size=32, size=1, low_res_size=32)


def test_sr_experiment_composes_as_documented():
    cfg = compose("train", ["experiment=shapes_sr"])
    assert (cfg.dataset.image_size, cfg.dataset.low_res_size, cfg.codec.channel_mult) == (64, 16, [1, 2, 2])
    pipe = LatentDiffusionPipeline.from_config(cfg)
    assert pipe.codec.latent_size(64, 64) == (16, 16) and pipe.conditioner.outputs == {"concat": 3}
    assert pipe.denoiser.in_channels == 7 and pipe.sampling["guidance_scale"] == 1.0
    stacked = LatentDiffusionPipeline.from_config(compose("train", ["experiment=shapes_sr", "conditioner=text_low_res"]))
    assert stacked.conditioner.outputs == {"crossattn": 64, "concat": 3} and stacked.denoiser.context_dim == 64


def _load_example():
    spec = importlib.util.spec_from_file_location("super_resolution_example", ROOT / "examples" / "super_resolution.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_metrics_match_scikit_image():
    metrics = pytest.importorskip("skimage.metrics")
    example = _load_example()
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)
    result = np.clip(truth.astype(int) + rng.integers(-30, 31, truth.shape), 0, 255).astype(np.uint8)
    assert example.psnr(result, truth) == pytest.approx(metrics.peak_signal_noise_ratio(truth, result), rel=1e-12)
    reference = metrics.structural_similarity(truth, result, gaussian_weights=True, sigma=1.5,
                                              use_sample_covariance=False, data_range=255, channel_axis=-1)
    assert example.ssim(result, truth) == pytest.approx(reference, rel=1e-9)
    assert example.ssim(truth, truth) == pytest.approx(1.0)


TINY_SR = ["experiment=shapes_sr", "denoiser=unet_tiny", "dataset.image_size=32", "dataset.low_res_size=8",
           "dataset.size=16", "sampling.steps=2"]


@pytest.fixture(scope="module")
def sr_checkpoint(tmp_path_factory):
    """An (untrained) SR model at toy size, saved as latentgen-train saves it."""
    pipe = LatentDiffusionPipeline.from_config(compose("train", TINY_SR))
    fill_zero_parameters(pipe.denoiser)
    return pipe.save(tmp_path_factory.mktemp("sr") / "sr.safetensors")


def test_sr_config_trains_end_to_end(tmp_path):
    from latentgen.training.run import run_training

    cfg = compose("train", TINY_SR + ["train.codec.steps=2", "train.codec.batch_size=4", "train.denoiser.steps=3",
                                      "train.denoiser.batch_size=4", "train.grid_size=2", "train.log_every=1"])
    checkpoint = run_training(cfg, tmp_path)
    assert (tmp_path / "samples" / "stage2_samples.png").is_file()  # the grid is drawn from the items' low_res
    pipe = LatentDiffusionPipeline.from_checkpoint(checkpoint)
    assert pipe.conditioner.name == "concat_image" and pipe.denoiser.concat_channels == 3
    images = pipe(conditioning={"low_res": Image.new("RGB", (8, 8), "red")}, num_images=2, seed=0)
    assert len(images) == 2 and images[0].size == (32, 32)


@pytest.mark.slow
def test_sample_cli_takes_the_low_res_image(sr_checkpoint, tmp_path):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "small.png")
    out = subprocess.run([sys.executable, "-m", "latentgen.cli.sample", f"checkpoint={sr_checkpoint}",
                          f"conditioning.low_res={tmp_path / 'small.png'}", "num_images=2", "progress=false",
                          f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    images = sorted((tmp_path / "run" / "images").glob("*.png"))
    assert len(images) == 2 and Image.open(images[0]).size == (32, 32)


@pytest.mark.slow
def test_example_prints_the_comparison_table(sr_checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["super_resolution.py", str(sr_checkpoint), "--count", "3", "--out", str(tmp_path / "sr.png")])
    _load_example().main()  # in this process: a subprocess would spend seconds importing torch again
    rows = {line[:40].strip(): line[40:].split() for line in capsys.readouterr().out.splitlines()
            if line.startswith(("bicubic", "super", "codec"))}
    assert set(rows) == {"bicubic (PIL)", "super-resolution (ddim, 2 steps)", "codec reconstruction (ceiling)"}
    assert all(len(values) == 3 and 0 < float(values[1]) <= 1 for values in rows.values())
    assert float(rows["bicubic (PIL)"][0]) > 20 and (tmp_path / "sr.png").is_file()

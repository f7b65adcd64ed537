"""The LDM UNet denoiser: golden parity with the original, SD v1/v2 checkpoint layout, contract, bf16."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from latentgen.denoisers.unet import UNet
from latentgen.nn.attention import Attention, SpatialTransformer
from latentgen.nn.timestep_embedding import timestep_embedding

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PREFIX = "model.diffusion_model."
# Keys of the original UNetModel's params that only select code paths this UNet always takes.
ORIGINAL_ONLY = {"image_size", "use_spatial_transformer", "use_checkpoint", "use_fp16"}


def unet_from_original_params(params: dict) -> UNet:
    params = dict(params)
    assert params.pop("use_spatial_transformer", True), "only the spatial-transformer UNet is supported"
    return UNet(**{k: v for k, v in params.items() if k not in ORIGINAL_ONLY})


@pytest.fixture(scope="module")
def golden(shared_dir: Path):
    config = yaml.safe_load((shared_dir / "golden" / "sd-tiny-config.yaml").read_text())
    params = config["model"]["params"]["unet_config"]["params"]
    weights = load_file(shared_dir / "golden" / "sd-tiny-weights.safetensors")
    state = {k[len(PREFIX) :]: v for k, v in weights.items() if k.startswith(PREFIX)}
    io = load_file(shared_dir / "golden" / "sd-tiny-io.safetensors")
    return params, state, io


@pytest.fixture(scope="module")
def golden_unet(golden) -> UNet:
    params, state, _ = golden
    model = unet_from_original_params(params)
    model.load_state_dict(state, strict=True)
    return model.eval()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# --- 1. golden parity -------------------------------------------------------------------------------


def test_matches_original_implementation(golden, golden_unet):
    _, _, io = golden
    with torch.no_grad():
        out = golden_unet(io["unet.x"], io["unet.t"].float(), {"crossattn": io["unet.context"]})
    assert out.shape == io["unet.out"].shape
    assert relative_error(out, io["unet.out"]) < 1e-4


# --- 2. full-size Stable Diffusion layouts ----------------------------------------------------------


def read_spec(path: Path) -> dict[str, tuple[int, ...]]:
    spec = {}
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        key, shape = line.split("\t")[:2]
        if key.startswith(PREFIX):
            spec[key[len(PREFIX) :]] = tuple(int(s) for s in shape.strip().split("x") if s)
    return spec


SD_V1 = dict(
    in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1], num_res_blocks=2,
    channel_mult=[1, 2, 4, 4], num_heads=8, context_dim=768,
)
SD_V2 = dict(SD_V1, num_heads=-1, num_head_channels=64, use_linear_in_transformer=True, context_dim=1024)


@pytest.mark.parametrize("spec_file, params", [("sd-v1-keys.tsv", SD_V1), ("sd-v2-keys.tsv", SD_V2)])
def test_state_dict_matches_stable_diffusion_checkpoint(shared_dir, spec_file, params):
    spec = read_spec(shared_dir / "spec" / spec_file)
    with torch.device("meta"):
        model = UNet(**params)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(ours) - set(spec)) == []
    assert sorted(set(spec) - set(ours)) == []
    assert {k: v for k, v in ours.items() if spec[k] != v} == {}
    assert len(ours) == 686


def test_head_layout_follows_the_original():
    by_heads = tiny(num_heads=4)
    attn = by_heads.input_blocks[3][1].transformer_blocks[0].attn1  # 64 channels
    assert (attn.heads, attn.dim_head) == (4, 16)
    by_width = tiny(num_heads=-1, num_head_channels=16)
    attn = by_width.input_blocks[3][1].transformer_blocks[0].attn1
    assert (attn.heads, attn.dim_head) == (4, 16)
    with pytest.raises(ValueError, match="exactly one"):
        tiny(num_heads=2, num_head_channels=16)


# --- 3. contract ------------------------------------------------------------------------------------


def tiny(**overrides) -> UNet:
    params = dict(
        in_channels=4, out_channels=4, model_channels=32, num_res_blocks=1, attention_resolutions=(1, 2),
        channel_mult=(1, 2), num_heads=2, context_dim=32,
    )
    return UNet(**{**params, **overrides})


def randomize_zero_init(model: torch.nn.Module) -> torch.nn.Module:
    """The original zero-initialises the last convs and proj_out; give them weights so inputs matter."""
    with torch.no_grad():
        for param in model.parameters():
            if not param.any():
                param.normal_(std=0.05)
    return model


def test_zero_init_like_the_original():
    model = tiny()
    assert not model.out[2].weight.any() and not model.out[2].bias.any()
    assert not model.input_blocks[1][0].out_layers[3].weight.any()
    assert not model.input_blocks[1][1].proj_out.weight.any()
    with torch.no_grad():
        out = model(torch.randn(1, 4, 8, 8), torch.tensor(10.0), {"crossattn": torch.randn(1, 5, 32)})
    assert not out.any()


def test_output_shape_dtype_and_timestep_broadcast():
    model = randomize_zero_init(tiny(out_channels=8)).eval()
    x, context = torch.randn(3, 4, 8, 12), torch.randn(3, 7, 32)
    with torch.no_grad():
        scalar_t = model(x, torch.tensor(250.0), {"crossattn": context})
        batch_t = model(x, torch.full((3,), 250.0), {"crossattn": context})
        other_t = model(x, torch.tensor([250.0, 250.0, 900.0]), {"crossattn": context})
    assert scalar_t.shape == (3, 8, 8, 12) and scalar_t.dtype == torch.float32
    torch.testing.assert_close(scalar_t, batch_t)
    torch.testing.assert_close(other_t[:2], batch_t[:2])
    assert not torch.allclose(other_t[2], batch_t[2])


@pytest.mark.parametrize(
    "overrides, required",
    [
        ({}, {"crossattn": 32}),
        ({"context_dim": None}, {}),
        ({"vector_dim": 6}, {"crossattn": 32, "vector": 6}),
        ({"in_channels": 9, "concat_channels": 5, "context_dim": None}, {"concat": 5}),
    ],
)
def test_required_cond(overrides, required):
    model = tiny(**overrides)
    assert model.required_cond == required
    assert model.latent_channels == 4 and model.latent_size_multiple == 2


def test_vector_and_concat_conditioning_change_the_output():
    model = randomize_zero_init(tiny(in_channels=7, concat_channels=3, vector_dim=6)).eval()
    x = torch.randn(2, 4, 8, 8)
    cond = {"crossattn": torch.randn(2, 5, 32), "vector": torch.randn(2, 6), "concat": torch.randn(2, 3, 8, 8)}
    with torch.no_grad():
        base = model(x, torch.tensor(10.0), cond)
        other_vector = model(x, torch.tensor(10.0), {**cond, "vector": torch.randn(2, 6)})
        other_concat = model(x, torch.tensor(10.0), {**cond, "concat": torch.randn(2, 3, 8, 8)})
    assert base.shape == (2, 4, 8, 8)
    assert relative_error(other_vector, base) > 1e-3
    assert relative_error(other_concat, base) > 1e-3


GOOD = {"x": (2, 4, 8, 8), "crossattn": (2, 5, 32), "vector": (2, 6), "concat": (2, 3, 8, 8)}


@pytest.mark.parametrize(
    "change, expected_text",
    [
        ({"crossattn": None}, "cond['crossattn']"),
        ({"vector": None}, "cond['vector']"),
        ({"concat": None}, "cond['concat']"),
        ({"crossattn": (2, 5, 16)}, "(2, 5, 16)"),
        ({"vector": (2, 7)}, "(2, 7)"),
        ({"concat": (2, 3, 4, 4)}, "(2, 3, 4, 4)"),
        ({"x": (2, 7, 8, 8)}, "(B, 4, h, w)"),
        ({"x": (2, 4, 8, 7)}, "multiples of 2"),
    ],
)
def test_bad_inputs_raise_errors_naming_the_denoiser(change, expected_text):
    model = tiny(in_channels=7, concat_channels=3, vector_dim=6)
    model.registry_name = "unet-under-test"
    shapes = {**GOOD, **change}
    cond = {k: torch.randn(shape) for k, shape in shapes.items() if k != "x" and shape is not None}
    with pytest.raises(ValueError) as error:
        model(torch.randn(shapes["x"]), torch.tensor(1.0), cond)
    assert "unet-under-test" in str(error.value)
    assert expected_text in str(error.value)


def test_without_context_there_is_no_cross_attention():
    model = randomize_zero_init(tiny(context_dim=None)).eval()
    assert not [k for k in model.state_dict() if "attn2" in k or "norm2" in k]
    assert any("attn1" in k for k in model.state_dict())
    with torch.no_grad():
        out = model(torch.randn(2, 4, 8, 8), torch.tensor([1.0, 500.0]), {})
    assert out.shape == (2, 4, 8, 8) and out.abs().sum() > 0


def test_every_parameter_gets_a_gradient():
    model = randomize_zero_init(tiny(in_channels=7, concat_channels=3, vector_dim=6, transformer_depth=[1, 2]))
    cond = {k: torch.randn(shape) for k, shape in GOOD.items() if k != "x"}
    model(torch.randn(GOOD["x"]), torch.tensor([3.0, 700.0]), cond).square().mean().backward()
    without = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert without == []


def test_linear_projections_match_conv_projections():
    conv = randomize_zero_init(SpatialTransformer(32, 2, 16, context_dim=8)).eval()
    linear = SpatialTransformer(32, 2, 16, context_dim=8, use_linear=True).eval()
    state = {k: v.flatten(1) if k in ("proj_in.weight", "proj_out.weight") else v for k, v in conv.state_dict().items()}
    linear.load_state_dict(state, strict=True)
    x, context = torch.randn(2, 32, 4, 6), torch.randn(2, 3, 8)
    with torch.no_grad():
        torch.testing.assert_close(linear(x, context), conv(x, context), rtol=1e-5, atol=1e-5)


def test_attention_against_explicit_softmax():
    attn = Attention(16, context_dim=8, heads=2, dim_head=4).eval()
    x, context = torch.randn(2, 5, 16), torch.randn(2, 3, 8)

    def explicit(x, context):
        q, k, v = (t.view(2, -1, 2, 4).transpose(1, 2) for t in (attn.to_q(x), attn.to_k(context), attn.to_v(context)))
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(4), dim=-1)
        return attn.to_out((weights @ v).transpose(1, 2).reshape(2, -1, 8))

    with torch.no_grad():
        torch.testing.assert_close(attn(x, context), explicit(x, context))
        self_attn = Attention(16, heads=2, dim_head=4).eval()
        attn.to_k, attn.to_v = self_attn.to_k, self_attn.to_v
        torch.testing.assert_close(attn(x), explicit(x, x))


def test_timestep_embedding_layout():
    embedding = timestep_embedding(torch.tensor([0.0, 2.5]), 7)
    assert embedding.shape == (2, 7)
    torch.testing.assert_close(embedding[0], torch.tensor([1.0, 1, 1, 0, 0, 0, 0]))
    freqs = torch.exp(-math.log(10000.0) * torch.arange(3) / 3)
    torch.testing.assert_close(embedding[1, :3], torch.cos(2.5 * freqs))
    torch.testing.assert_close(embedding[1, 3:6], torch.sin(2.5 * freqs))
    assert embedding[1, 6] == 0


# --- 4. bfloat16 ------------------------------------------------------------------------------------


def test_bfloat16_close_to_float32(golden, golden_unet):
    params, state, io = golden
    model = unet_from_original_params(params)
    model.load_state_dict(state, strict=True)
    model = model.to(torch.bfloat16).eval()
    with torch.no_grad():
        reference = golden_unet(io["unet.x"], io["unet.t"].float(), {"crossattn": io["unet.context"]})
        out = model(io["unet.x"].bfloat16(), io["unet.t"].float(), {"crossattn": io["unet.context"].bfloat16()})
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert relative_error(out, reference) < 2e-2

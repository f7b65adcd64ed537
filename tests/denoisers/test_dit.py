"""The DiT denoiser (Peebles & Xie 2023): conditioning paths, adaLN-Zero initialisation, patches and
position embedding against naive references, the paper's parameter count, training and checkpoints."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from latentgen import registry
from latentgen.denoisers.dit import DiT
from latentgen.nn.patches import patchify, unpatchify
from latentgen.nn.position_embedding import sincos_position_embedding_2d
from latentgen.pipeline import LatentDiffusionPipeline
from latentgen.testing import fill_zero_parameters

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(**overrides) -> DiT:
    params = dict(in_channels=4, out_channels=4, patch_size=2, hidden_size=32, depth=2, num_heads=2)
    return DiT(**{**params, **overrides})


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


CONDITIONING = {
    "none": ({}, {}),
    "class vector": ({"vector_dim": 6}, {"vector": (2, 6)}),
    "text": ({"context_dim": 12}, {"crossattn": (2, 5, 12)}),
    "concat": ({"in_channels": 7, "concat_channels": 3}, {"concat": (2, 3, 6, 10)}),
    "all": ({"in_channels": 7, "concat_channels": 3, "vector_dim": 6, "context_dim": 12},
            {"vector": (2, 6), "crossattn": (2, 5, 12), "concat": (2, 3, 6, 10)}),
}


@pytest.mark.parametrize("name", list(CONDITIONING))
def test_output_shape_and_declared_conditioning(name):
    params, shapes = CONDITIONING[name]
    model = fill_zero_parameters(tiny(out_channels=5, **params)).eval()
    assert model.required_cond == {key: shape[-1] if key != "concat" else shape[1] for key, shape in shapes.items()}
    assert model.latent_channels == 4 and model.latent_size_multiple == 2
    cond = {key: torch.randn(shape) for key, shape in shapes.items()}
    with torch.no_grad():
        out = model(torch.randn(2, 4, 6, 10), torch.tensor([3.0, 900.0]), cond)  # a 3 x 5 grid, not square
    assert out.shape == (2, 5, 6, 10) and out.dtype == torch.float32 and out.abs().sum() > 0


def test_each_conditioning_changes_the_output():
    params, shapes = CONDITIONING["all"]
    model = fill_zero_parameters(tiny(**params)).eval()
    x = torch.randn(2, 4, 6, 10)
    cond = {key: torch.randn(shape) for key, shape in shapes.items()}
    with torch.no_grad():
        base = model(x, torch.tensor(10.0), cond)
        for key, shape in shapes.items():
            other = model(x, torch.tensor(10.0), {**cond, key: torch.randn(shape)})
            assert relative_error(other, base) > 1e-3, key
        assert relative_error(model(x, torch.tensor(600.0), cond), base) > 1e-3


def test_cross_attention_reads_the_context_tokens():
    """Once its zero-initialised output is perturbed, cross-attention depends on every context token."""
    model = tiny(context_dim=12, depth=1)
    block = model.blocks[0]
    assert not block.cross_attn.to_out[0].weight.any()
    fill_zero_parameters(block.cross_attn)
    x, c, context = torch.randn(2, 15, 32), torch.randn(2, 32), torch.randn(2, 5, 12)
    with torch.no_grad():
        base = block(x, c, context)
        changed = context.clone()
        changed[:, 4] += 1.0  # only the last token
        assert relative_error(block(x, c, changed), base) > 1e-4
        # The same tokens in another order attend identically (no position in the context).
        torch.testing.assert_close(block(x, c, context.flip(1)), base, rtol=1e-5, atol=1e-5)


def test_adaln_zero_blocks_start_as_identity_and_the_network_outputs_zero():
    model = tiny(in_channels=7, concat_channels=3, vector_dim=6, context_dim=12)
    x, c, context = torch.randn(2, 15, 32), torch.randn(2, 32), torch.randn(2, 5, 12)
    with torch.no_grad():
        for block in model.blocks:
            assert torch.equal(block(x, c, context), x)
        out = model(torch.randn(2, 4, 6, 10), torch.tensor(10.0),
                    {"vector": torch.randn(2, 6), "crossattn": context, "concat": torch.randn(2, 3, 6, 10)})
    assert out.shape == (2, 4, 6, 10) and not out.any()
    # Only the gates and output layers are zero: the branches themselves are initialised (Xavier).
    assert model.blocks[0].attn.qkv.weight.std() > 0 and model.blocks[0].mlp.fc1.weight.std() > 0
    assert model.x_embedder.proj.weight.std() > 0 and model.t_embedder.mlp[0].weight.std() > 0


def test_every_parameter_gets_a_gradient():
    params, shapes = CONDITIONING["all"]
    model = fill_zero_parameters(tiny(**params))
    cond = {key: torch.randn(shape) for key, shape in shapes.items()}
    model(torch.randn(2, 4, 6, 10), torch.tensor([3.0, 700.0]), cond).square().mean().backward()
    assert [name for name, p in model.named_parameters() if p.grad is None or not p.grad.any()] == []


# --- patches and position embedding against naive references -----------------------------------------


def test_patchify_and_unpatchify_against_explicit_indexing():
    x = torch.randn(2, 3, 6, 8)
    p = 2
    tokens = patchify(x, p)
    assert tokens.shape == (2, 12, 12)
    # Token i * 4 + j is patch (i, j); inside it, entry (u * p + v) * C + c is pixel (i * p + u, j * p + v), channel c.
    for i in range(3):
        for j in range(4):
            for u in range(p):
                for v in range(p):
                    for c in range(3):
                        assert tokens[:, i * 4 + j, (u * p + v) * 3 + c].equal(x[:, c, i * p + u, j * p + v])
    assert torch.equal(unpatchify(tokens, p, 3, 4), x)
    tokens = torch.randn(2, 6, 4 * 4 * 5)
    assert torch.equal(patchify(unpatchify(tokens, 4, 2, 3), 4), tokens)
    with pytest.raises(ValueError, match="multiples of the patch size 4"):
        patchify(x, 4)


def test_patch_embedding_is_a_linear_map_of_each_patch():
    """timm's PatchEmbed (a stride-p conv) is a linear layer applied to each flattened patch."""
    model = tiny(patch_size=4)
    x = torch.randn(2, 4, 8, 12)
    proj = model.x_embedder.proj
    weight = proj.weight.permute(0, 2, 3, 1).reshape(proj.weight.shape[0], -1)  # (D, p * p * C), our patch order
    with torch.no_grad():
        torch.testing.assert_close(model.x_embedder(x), F.linear(patchify(x, 4), weight, proj.bias))


def naive_sincos_2d(grid_height: int, grid_width: int, dim: int) -> torch.Tensor:
    """MAE / DiT's 2-D embedding written out: [sin(x w_k), cos(x w_k), sin(y w_k), cos(y w_k)], w_k = 10000^(-k / (dim / 4))."""
    quarter = dim // 4
    rows = []
    for y in range(grid_height):
        for x in range(grid_width):
            row = []
            for position in (x, y):
                angles = [position * 10000.0 ** (-k / quarter) for k in range(quarter)]
                row += [math.sin(a) for a in angles] + [math.cos(a) for a in angles]
            rows.append(row)
    return torch.tensor(rows, dtype=torch.float64)


def test_sincos_position_embedding_against_naive_reference():
    embedding = sincos_position_embedding_2d(3, 5, 16)
    assert embedding.shape == (15, 16) and embedding.dtype == torch.float32
    torch.testing.assert_close(embedding.double(), naive_sincos_2d(3, 5, 16), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="multiple of 4"):
        sincos_position_embedding_2d(2, 2, 10)


def test_any_grid_divisible_by_the_patch_works():
    model = fill_zero_parameters(tiny(patch_size=2)).eval()
    with torch.no_grad():
        small = model(torch.randn(1, 4, 4, 4), torch.tensor(5.0), {})
        large = model(torch.randn(1, 4, 16, 34), torch.tensor(5.0), {})
    assert small.shape == (1, 4, 4, 4) and large.shape == (1, 4, 16, 34)
    assert torch.isfinite(large).all()


# --- errors --------------------------------------------------------------------------------------------

GOOD = {"x": (2, 4, 8, 8), "crossattn": (2, 5, 12), "vector": (2, 6), "concat": (2, 3, 8, 8)}


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
        ({"x": (2, 4, 8, 6)}, "multiples of 4 (the DiT cuts it into 4x4 patches), got 8x6"),
    ],
)
def test_bad_inputs_raise_errors_naming_the_denoiser(change, expected_text):
    model = tiny(patch_size=4, in_channels=7, concat_channels=3, vector_dim=6, context_dim=12)
    model.registry_name = "dit-under-test"
    shapes = {**GOOD, **change}
    cond = {k: torch.randn(shape) for k, shape in shapes.items() if k != "x" and shape is not None}
    with pytest.raises(ValueError) as error:
        model(torch.randn(shapes["x"]), torch.tensor(1.0), cond)
    assert "dit-under-test" in str(error.value) and expected_text in str(error.value)


@pytest.mark.parametrize(
    "params, expected_text",
    [
        ({"hidden_size": 30, "num_heads": 4}, "multiple of num_heads"),
        ({"hidden_size": 18, "num_heads": 3}, "multiple of 4"),
        ({"concat_channels": 4}, "concat_channels"),
        ({"patch_size": 0}, "patch_size"),
    ],
)
def test_bad_constructor_arguments(params, expected_text):
    with pytest.raises(ValueError, match=expected_text):
        tiny(**params)


# --- the paper's sizes -----------------------------------------------------------------------------------


def analytic_parameter_count(hidden: int, depth: int, patch: int, in_channels: int, out_channels: int,
                             frequencies: int = 256) -> int:
    """DiT's parameters without the label table, layer by layer (weights + biases)."""
    per_block = (3 * hidden * hidden + 3 * hidden) + (hidden * hidden + hidden)  # attention qkv, proj
    per_block += (hidden * 4 * hidden + 4 * hidden) + (4 * hidden * hidden + hidden)  # MLP fc1, fc2
    per_block += hidden * 6 * hidden + 6 * hidden  # adaLN modulation
    patch_embedding = patch * patch * in_channels * hidden + hidden
    timestep = (frequencies * hidden + hidden) + (hidden * hidden + hidden)
    final = (hidden * patch * patch * out_channels + patch * patch * out_channels) + (hidden * 2 * hidden + 2 * hidden)
    return depth * per_block + patch_embedding + timestep + final


def test_dit_xl_2_has_the_papers_parameter_count_without_allocating():
    # The paper's DiT-XL/2 (675M, Table 4) predicts eps and a variance (8 output channels) and embeds
    # 1000 classes plus a null class in the network; here that table lives in the class_label conditioner.
    with torch.device("meta"):
        model = DiT(in_channels=4, out_channels=8, patch_size=2, hidden_size=1152, depth=28, num_heads=16)
    assert all(p.is_meta for p in model.parameters())
    count = sum(p.numel() for p in model.parameters())
    assert count == analytic_parameter_count(1152, 28, 2, 4, 8)
    label_table = 1001 * 1152
    assert abs(count + label_table - 675e6) / 675e6 < 0.01


@pytest.mark.parametrize("size, expected_millions", [("s", 33), ("b", 130), ("l", 458), ("xl", 675)])
def test_every_size_preset_matches_the_paper(size, expected_millions):
    """conf/denoiser/dit_<size>.yaml composed (never built at full size): Table 4's Gflop-matched sizes."""
    from latentgen.config import compose

    cfg = compose("train", ["experiment=smoke", f"denoiser=dit_{size}"]).denoiser
    count = analytic_parameter_count(cfg.hidden_size, cfg.depth, cfg.patch_size, 4, 8) + 1001 * cfg.hidden_size
    assert abs(count / 1e6 - expected_millions) / expected_millions < 0.01
    for patch in (4, 8):
        assert compose("train", ["experiment=smoke", f"denoiser=dit_{size}_{patch}"]).denoiser.patch_size == patch


# --- through the pipeline --------------------------------------------------------------------------------


def class_conditional_pipeline() -> LatentDiffusionPipeline:
    return LatentDiffusionPipeline(
        registry.build("codec", "identity"),
        registry.build("denoiser", "dit", in_channels=3, out_channels=3, patch_size=2, hidden_size=32, depth=2,
                       num_heads=2, vector_dim=8),
        registry.build("conditioner", "class_label", num_classes=2, vector_dim=8, dropout=0.0),
    )


def loss_on(pipe: LatentDiffusionPipeline, latents: torch.Tensor, labels: torch.Tensor, seed: int) -> torch.Tensor:
    """The eps-prediction loss at noise levels and noise drawn from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    sigma = pipe.model.sample_training_sigmas(latents.shape[0], generator)
    x = latents + torch.randn(latents.shape, generator=generator) * sigma.view(-1, 1, 1, 1)
    output, _, _ = pipe.model.network_output(x, sigma, pipe.conditioner({"label": labels}))
    return F.mse_loss(output, pipe.model.training_target(latents, x, sigma))


def test_a_few_training_steps_reduce_the_loss():
    pipe = class_conditional_pipeline()
    # Two classes of 8x8 "images": a horizontal and a vertical gradient.
    ramp = torch.linspace(-1, 1, 8)
    latents = torch.stack([ramp.view(1, 8, 1).expand(3, 8, 8), ramp.view(1, 1, 8).expand(3, 8, 8)]).repeat(8, 1, 1, 1)
    labels = torch.tensor([0, 1]).repeat(8)
    parameters = [*pipe.denoiser.parameters(), *pipe.conditioner.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=3e-3)
    with torch.no_grad():
        before = sum(loss_on(pipe, latents, labels, seed) for seed in range(4)) / 4
    for step in range(40):
        loss = loss_on(pipe, latents, labels, seed=100 + step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = sum(loss_on(pipe, latents, labels, seed) for seed in range(4)) / 4
    assert abs(before.item() - 1.0) < 0.2  # a fresh DiT predicts eps = 0: the loss is E[eps^2]
    assert after < 0.7 * before


def test_checkpoint_round_trip(tmp_path):
    pipe = class_conditional_pipeline()
    fill_zero_parameters(pipe.denoiser)
    path = pipe.save(tmp_path / "dit.safetensors")
    loaded = LatentDiffusionPipeline.from_checkpoint(path)
    assert isinstance(loaded.denoiser, DiT) and loaded.config["denoiser"]["patch_size"] == 2
    assert loaded.config == pipe.config
    for key, value in pipe.denoiser.state_dict().items():
        assert torch.equal(loaded.denoiser.state_dict()[key], value), key
    first = pipe(labels=[0, 1], steps=2, seed=3, height=8, width=8, output_type="tensor")
    second = loaded(labels=[0, 1], steps=2, seed=3, height=8, width=8, output_type="tensor")
    assert torch.equal(first, second) and first.abs().sum() > 0
    with pytest.raises(ValueError, match="divisible by 2"):
        loaded(labels=[0], steps=1, height=8, width=7)


def test_bfloat16_close_to_float32():
    params, shapes = CONDITIONING["all"]
    model = fill_zero_parameters(tiny(**params)).eval()
    cond = {key: torch.randn(shape) for key, shape in shapes.items()}
    x = torch.randn(2, 4, 6, 10)
    with torch.no_grad():
        reference = model(x, torch.tensor(10.0), cond)
        out = model.to(torch.bfloat16)(x.bfloat16(), torch.tensor(10.0), {k: v.bfloat16() for k, v in cond.items()})
    assert out.dtype == torch.bfloat16 and relative_error(out, reference) < 3e-2

"""Position features for the UNet's spatial transformers (`attention_positions`): analytic values, a model that
starts as one without them, gradients, bf16, and the option's checks."""

from __future__ import annotations

import math

import pytest
import torch

from latentgen.denoisers.unet import UNet
from latentgen.nn.grid_positions import GridPositions

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = dict(in_channels=4, out_channels=4, model_channels=32, num_res_blocks=1, attention_resolutions=[2],
             channel_mult=[1, 2], num_head_channels=32, context_dim=16)


def test_features_are_sines_and_cosines_of_the_token_centres():
    positions = GridPositions(8, frequencies=3, max_cycles=2.0)
    features = positions.features(2, 4)  # (8, 12): x sin, y sin, x cos, y cos per frequency
    cycles = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    for row in range(2):
        for col in range(4):
            x, y = (col + 0.5) / 4, (row + 0.5) / 2
            angles = torch.cat([2 * math.pi * cycles * x, 2 * math.pi * cycles * y])
            expected = torch.cat([angles.sin(), angles.cos()]).float()
            torch.testing.assert_close(features[row * 4 + col], expected, atol=1e-6, rtol=0)


def test_the_lowest_frequency_tells_the_halves_apart():
    features = GridPositions(8, frequencies=4).features(6, 6).reshape(6, 6, -1)
    x_cos = features[..., 8]  # cos of half a cycle across the map: positive on the left, negative on the right
    assert (x_cos[:, :3] > 0).all() and (x_cos[:, 3:] < 0).all()
    y_cos = features[..., 12]
    assert (y_cos[:3] > 0).all() and (y_cos[3:] < 0).all()


def test_a_unet_with_positions_starts_as_one_without():
    torch.manual_seed(0)
    plain, placed = UNet(**SMALL), UNet(**SMALL, attention_positions=True)
    for p in plain.parameters():  # make the zero-initialised outputs non-zero, so the transformers do something
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.05)
    result = placed.load_state_dict(plain.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all(".positions.proj." in key for key in result.missing_keys)
    x, t, cond = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 700.0]), {"crossattn": torch.randn(2, 5, 16)}
    torch.testing.assert_close(placed(x, t, cond), plain(x, t, cond), atol=0, rtol=0)

    # Trained position weights change the output, and they get a gradient from the zero start.
    placed.zero_grad()
    placed(x, t, cond).square().mean().backward()
    grads = [p.grad for name, p in placed.named_parameters() if ".positions.proj.weight" in name]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    with torch.no_grad():
        for name, p in placed.named_parameters():
            if ".positions.proj." in name:
                p.normal_(std=0.5)
    assert (placed(x, t, cond) - plain(x, t, cond)).abs().max() > 1e-3


def test_bfloat16_positions_are_computed_from_float32_angles():
    torch.manual_seed(0)
    positions = GridPositions(16, frequencies=8, max_cycles=16.0)
    torch.nn.init.normal_(positions.proj.weight)
    reference = positions(32, 32)
    low = positions.to(torch.bfloat16)(32, 32)
    assert low.dtype == torch.bfloat16
    # bf16 rounding of the projection only (about 2^-8 relative), not of angles up to 2 pi * 16 rad.
    assert (low.float() - reference).abs().max() < 0.05 * reference.abs().max()


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_attention_positions_must_be_a_bool(value):
    with pytest.raises(ValueError, match="attention_positions must be true or false"):
        UNet(**SMALL, attention_positions=value)


@pytest.mark.parametrize("frequencies, max_cycles", [(0, 16.0), (4, 0.5)])
def test_bad_grid_positions_are_refused(frequencies, max_cycles):
    with pytest.raises(ValueError, match="GridPositions needs"):
        GridPositions(8, frequencies=frequencies, max_cycles=max_cycles)

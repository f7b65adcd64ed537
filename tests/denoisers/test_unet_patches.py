"""The UNet's `patch_size`: the same network as a patch_size=1 UNet on pixel-unshuffled latents (exactly), the latent
sizes it then needs, training through it, and refused values."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from latentgen.denoisers.unet import UNet

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = dict(model_channels=32, num_res_blocks=1, attention_resolutions=[2], channel_mult=[1, 2],
             num_head_channels=32, context_dim=16)


def _randomised(unet: UNet) -> UNet:
    torch.manual_seed(0)
    for parameter in unet.parameters():  # the zero-initialised output conv would hide everything
        torch.nn.init.normal_(parameter, std=0.05)
    return unet


@pytest.mark.parametrize("patch", [2, 4])
def test_a_patched_unet_is_the_plain_one_on_unshuffled_latents(patch):
    patched = _randomised(UNet(in_channels=4, out_channels=4, patch_size=patch, **SMALL))
    plain = UNet(in_channels=4 * patch**2, out_channels=4 * patch**2, **SMALL)
    plain.load_state_dict(patched.state_dict())  # the same keys and shapes: only the first and last conv widen
    x, t = torch.randn(2, 4, 8 * patch, 4 * patch), torch.tensor([3.0, 700.0])
    cond = {"crossattn": torch.randn(2, 5, 16)}
    expected = F.pixel_shuffle(plain(F.pixel_unshuffle(x, patch), t, cond), patch)
    torch.testing.assert_close(patched(x, t, cond), expected, atol=0, rtol=0)
    assert patched.latent_size_multiple == 2 * patch


def test_concatenated_maps_are_folded_with_the_latents():
    patched = _randomised(UNet(in_channels=6, out_channels=4, concat_channels=2, patch_size=2, **SMALL))
    plain = UNet(in_channels=24, out_channels=16, **SMALL)
    plain.load_state_dict(patched.state_dict())
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([10.0])
    cond = {"crossattn": torch.randn(1, 3, 16), "concat": torch.randn(1, 2, 8, 8)}
    folded = F.pixel_unshuffle(torch.cat([x, cond["concat"]], dim=1), 2)  # the map joins x, then both are folded
    expected = F.pixel_shuffle(plain(folded, t, {"crossattn": cond["crossattn"]}), 2)
    torch.testing.assert_close(patched(x, t, cond), expected, atol=0, rtol=0)


def test_latents_must_divide_by_the_patch_times_the_downsampling():
    patched = UNet(in_channels=4, out_channels=4, patch_size=2, **SMALL)
    with pytest.raises(ValueError, match="multiples of 4 .*downsamples 4x, 2x of it by folding patches"):
        patched(torch.randn(1, 4, 6, 8), torch.tensor([1.0]), {"crossattn": torch.randn(1, 2, 16)})


def test_gradients_reach_every_parameter():
    patched = _randomised(UNet(in_channels=4, out_channels=4, patch_size=2, **SMALL))
    x, t, cond = torch.randn(2, 4, 8, 8), torch.tensor([1.0, 500.0]), {"crossattn": torch.randn(2, 3, 16)}
    patched(x, t, cond).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in patched.parameters())


@pytest.mark.parametrize("value", [0, -2, 1.5, True, "2"])
def test_patch_size_must_be_a_positive_integer(value):
    with pytest.raises(ValueError, match="patch_size must be a positive integer"):
        UNet(in_channels=4, out_channels=4, patch_size=value, **SMALL)

"""Stable Diffusion 3's 16-channel VAE is the KL codec without quant convs and with a latent shift: checked
against Stability AI's reference on sd35-tiny (moments, the sampled and scaled latent, decoding)."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch

from latentgen import registry
from latentgen.nn.autoencoder import DiagonalGaussian

PREFIX = "first_stage_model."
SCALE, SHIFT = 1.5305, 0.0609  # SD3LatentFormat


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def vae(shared_dir):
    weights = safetensors.torch.load_file(str(shared_dir / "golden" / "sd35-tiny-weights.safetensors"))
    io = safetensors.torch.load_file(str(shared_dir / "golden" / "sd35-tiny-io.safetensors"))
    codec = registry.build("codec", "kl", latent_channels=16, channels=32, channel_mult=[1, 2], num_res_blocks=1,
                           quant_convs=False, scale_factor=SCALE, shift_factor=SHIFT)
    codec.load_state_dict({k[len(PREFIX):]: v for k, v in weights.items() if k.startswith(PREFIX)}, strict=True)
    return codec.eval(), io


def test_encoding_matches_the_reference(vae):
    codec, io = vae
    with torch.no_grad():
        moments = codec.encoder(io["vae.image"])
        assert relative_error(moments, io["vae.moments"]) < 1e-5
        posterior = DiagonalGaussian(moments)  # SDVAE.encode samples: mean + std * its noise, then process_in
        sampled = (posterior.mean + posterior.std * io["vae.noise"] - SHIFT) * SCALE
        assert relative_error(sampled, io["vae.latent"]) < 1e-5
        assert relative_error(codec.encode(io["vae.image"]), (io["vae.moments"][:, :16] - SHIFT) * SCALE) < 1e-5


def test_decoding_matches_the_reference(vae):
    codec, io = vae
    with torch.no_grad():
        assert relative_error(codec.decode(io["vae.z"]), io["vae.decoded"]) < 1e-5
        assert relative_error(codec.decode(io["sample.euler_out"]), io["sample.decoded"]) < 1e-5


def test_without_quant_convs_the_latent_width_is_the_encoders():
    with pytest.raises(ValueError, match="z_channels .8. must equal latent_channels .16."):
        registry.build("codec", "kl", latent_channels=16, z_channels=8, quant_convs=False, channels=32,
                       channel_mult=[1], num_res_blocks=1)

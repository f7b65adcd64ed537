"""The tiny TAESD autoencoder (`taesd` codec) and the `tiny_decoder` adapter: the published module layout, its
files in both layouts, and decoding with it on a pipeline exactly while attached."""

from __future__ import annotations

import numpy as np
import pytest
import safetensors.torch
import torch

from latentgen import LatentDiffusionPipeline, registry
from latentgen.codecs.taesd import TinyAutoencoder, tiny_decoder, tiny_encoder
from latentgen.config import compose
from latentgen.errors import AdapterError, CheckpointError


def test_the_layout_is_the_published_one():
    """taesd_decoder.pth / taesd_encoder.pth: nn.Sequential indices, 1.22 M parameters each (4.9 MB in fp32)."""
    decoder, encoder = tiny_decoder().state_dict(), tiny_encoder().state_dict()
    assert sum(v.numel() for v in decoder.values()) == 1_222_531
    assert sum(v.numel() for v in encoder.values()) == 1_222_532
    assert decoder["1.weight"].shape == (64, 4, 3, 3) and decoder["19.weight"].shape == (3, 64, 3, 3)
    assert "7.weight" in decoder and "7.bias" not in decoder  # the convs after each upsampling have no bias
    assert {"3.conv.0.weight", "3.conv.2.weight", "3.conv.4.weight"} <= set(decoder)
    assert encoder["0.weight"].shape == (64, 3, 3, 3) and encoder["14.weight"].shape == (4, 64, 3, 3)
    assert "2.weight" in encoder and "2.bias" not in encoder  # the strided convs have no bias


@pytest.fixture
def published(tmp_path):
    """A decoder file in the released .pth layout and the same weights in diffusers' AutoencoderTiny layout."""
    torch.manual_seed(3)
    decoder = tiny_decoder()
    for parameter in decoder.parameters():
        parameter.data.normal_(0, 0.05)
    state = decoder.state_dict()
    torch.save(state, tmp_path / "taesd_decoder.pth")
    diffusers = {f"decoder.layers.{int(k.split('.', 1)[0]) - 1}.{k.split('.', 1)[1]}": v for k, v in state.items()}
    safetensors.torch.save_file(diffusers, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    return decoder.eval(), tmp_path


def test_published_files_in_either_layout_load_and_decode_the_same(published):
    decoder, folder = published
    latents = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        expected = decoder(latents) * 2 - 1
        for name in ("taesd_decoder.pth", "diffusion_pytorch_model.safetensors"):
            codec = TinyAutoencoder(decoder_path=str(folder / name)).eval()
            assert torch.equal(codec.decode(latents), expected)
    assert expected.shape == (2, 3, 64, 64)


def test_wrong_files_are_named(published, shared_dir):
    _, folder = published
    with pytest.raises(CheckpointError, match="is not a TAESD decoder"):
        TinyAutoencoder(decoder_path=str(shared_dir / "golden" / "lora-tiny-kohya.safetensors"))
    with pytest.raises(CheckpointError, match="does not fit codec 'taesd' with latent_channels=16"):
        TinyAutoencoder(latent_channels=16, decoder_path=str(folder / "taesd_decoder.pth"))


@pytest.fixture(scope="module")
def pipe():
    return LatentDiffusionPipeline.from_config(compose("train", ["experiment=smoke"])).eval()


def test_the_adapter_decodes_with_the_tiny_decoder_only_while_attached(pipe, tmp_path):
    codec = pipe.codec
    tiny = TinyAutoencoder(latent_channels=codec.latent_channels,
                           downsamplings=codec.downsampling_factor.bit_length() - 1)
    torch.save(tiny.decoder.state_dict(), tmp_path / "tiny.pth")
    latents = torch.randn(1, codec.latent_channels, 8, 8)
    images = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        before, encoded = codec.decode(latents), codec.encode(images)
        adapter = registry.build("adapter", "tiny_decoder", path=str(tmp_path / "tiny.pth"))
        pipe.attach(adapter)
        assert torch.equal(pipe.codec.decode(latents), tiny.eval().decode(latents))
        assert torch.equal(pipe.codec.encode(images), encoded)  # img2img still encodes with the real codec
        sampled = pipe("a red circle", steps=2, seed=0)
        pipe.detach(adapter)
        assert torch.equal(pipe.codec.decode(latents), before)
    plain = pipe("a red circle", steps=2, seed=0)
    assert not np.array_equal(np.asarray(sampled[0]), np.asarray(plain[0]))
    assert adapter.describe() == {"name": "tiny_decoder", "path": str(tmp_path / "tiny.pth")}


def test_the_adapter_refuses_a_decoder_of_another_latent_space(pipe, published, tmp_path):
    _, folder = published  # factor 8: the smoke codec's is 2
    with pytest.raises(AdapterError, match="cannot decode for codec .kl..*decodes 4 channels by a factor 8"):
        pipe.attach(registry.build("adapter", "tiny_decoder", path=str(folder / "taesd_decoder.pth")))
    assert pipe.adapters == []
    with pytest.raises(AdapterError, match="no TAESD decoder file"):
        registry.build("adapter", "tiny_decoder", path=str(tmp_path / "none.pth"))

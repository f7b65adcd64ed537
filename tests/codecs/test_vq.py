"""The VQ codec and its quantizer: nearest codes, straight-through gradients, the VQ losses, the EMA
codebook, usage/perplexity, the codec contract and checkpoints."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from latentgen import registry
from latentgen.codecs.kl import KLCodec
from latentgen.codecs.vq import VQCodec
from latentgen.config import compose
from latentgen.nn.quantizer import VectorQuantizer, codebook_statistics
from latentgen.pipeline import LatentDiffusionPipeline
from latentgen.testing import fill_zero_parameters
from latentgen.testing.codec_contract import check_codec


def quantizer_with(codes: list[list[float]], **options) -> VectorQuantizer:
    quantizer = VectorQuantizer(len(codes), len(codes[0]), **options)
    with torch.no_grad():
        quantizer.embedding.weight.copy_(torch.tensor(codes))
    if quantizer.ema_decay is not None:
        quantizer.embed_sum.copy_(torch.tensor(codes))
    return quantizer


def positions(*vectors: list[float]) -> torch.Tensor:
    """Latents (1, D, 1, N) whose N positions are the given D-vectors."""
    return torch.tensor(vectors).t().reshape(1, len(vectors[0]), 1, len(vectors))


def tiny_vq(**overrides) -> VQCodec:
    params = dict(latent_channels=4, num_codes=16, channels=32, channel_mult=[1, 2], num_res_blocks=1, resolution=16)
    params.update(overrides)
    return registry.build("codec", "vq", **params).eval()


# ---- the quantizer ---------------------------------------------------------------------------------

def test_nearest_code_matches_brute_force():
    quantizer = VectorQuantizer(num_codes=37, code_dim=5)
    torch.nn.init.normal_(quantizer.embedding.weight)
    z = torch.randn(3, 5, 4, 6)
    indices = quantizer.nearest(z)
    assert indices.shape == (3, 4, 6)
    # every (position, code) difference explicitly, in float64
    differences = z.double().permute(0, 2, 3, 1)[..., None, :] - quantizer.embedding.weight.double()  # (3, 4, 6, 37, 5)
    torch.testing.assert_close(indices, differences.pow(2).sum(-1).argmin(-1), rtol=0, atol=0)
    torch.testing.assert_close(quantizer.quantize(z), quantizer.embedding.weight[indices].permute(0, 3, 1, 2))


def test_forward_is_the_codes_and_backward_is_the_identity():
    quantizer = VectorQuantizer(num_codes=8, code_dim=3)
    z = torch.randn(2, 3, 4, 4, requires_grad=True)
    out = quantizer(z)
    torch.testing.assert_close(out.latents, quantizer.quantize(z.detach()))
    upstream = torch.randn_like(z)
    (out.latents * upstream).sum().backward()
    torch.testing.assert_close(z.grad, upstream, rtol=0, atol=0)
    assert quantizer.embedding.weight.grad is None  # the codes learn only from the codebook loss


def test_codebook_and_commitment_losses_by_hand():
    quantizer = quantizer_with([[0.0, 0.0], [1.0, 1.0]], beta=0.25)
    z = positions([0.2, 0.1], [0.9, 1.3]).requires_grad_(True)
    out = quantizer(z)
    assert out.indices.flatten().tolist() == [0, 1]
    # squared errors 0.04 + 0.01 and 0.01 + 0.09, averaged over the 4 elements
    assert out.codebook_loss.item() == pytest.approx(0.15 / 4)
    assert out.commitment_loss.item() == pytest.approx(0.25 * 0.15 / 4)
    # the codebook loss moves only the codes, the commitment loss only the encoder output
    out.codebook_loss.backward(retain_graph=True)
    assert z.grad is None
    expected = torch.tensor([[-0.2, -0.1], [0.1, -0.3]]) * 2 / 4  # d/de mean((e - z)^2)
    torch.testing.assert_close(quantizer.embedding.weight.grad, expected)
    quantizer.embedding.weight.grad = None
    out.commitment_loss.backward()
    assert quantizer.embedding.weight.grad is None
    torch.testing.assert_close(z.grad, 0.25 * 2 / 4 * (z - positions([0, 0], [1, 1])).detach())


def test_ema_codebook_update_by_hand():
    codes = [[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]]
    quantizer = quantizer_with(codes, ema_decay=0.9, epsilon=1e-5).train()
    assert not quantizer.embedding.weight.requires_grad
    z = positions([0.2, 0.0], [0.0, 0.4], [1.2, 0.8])  # two vectors to code 0, one to code 1, none to code 2
    out = quantizer(z)
    assert out.codebook_loss is None
    # N = 0.9 * 1 + 0.1 * n;  m = 0.9 * e + 0.1 * sum of assigned z
    sizes = [0.9 + 0.1 * 2, 0.9 + 0.1 * 1, 0.9]
    sums = [[0.1 * 0.2, 0.1 * 0.4], [0.9 + 0.1 * 1.2, 0.9 + 0.1 * 0.8], [4.5, 4.5]]
    total, eps = sum(sizes), 1e-5
    expected = [[s / ((n + eps) / (total + 3 * eps) * total) for s in row] for row, n in zip(sums, sizes)]
    torch.testing.assert_close(quantizer.embedding.weight, torch.tensor(expected))
    torch.testing.assert_close(quantizer.cluster_size, torch.tensor(sizes))
    torch.testing.assert_close(quantizer.embed_sum, torch.tensor(sums))


def test_ema_codebook_converges_to_the_cluster_means_and_only_in_training():
    quantizer = quantizer_with([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]], ema_decay=0.8)
    z = positions([0.2, 0.0], [0.0, 0.4], [1.2, 0.8])
    before = quantizer.embedding.weight.clone()
    quantizer.eval()(z)
    torch.testing.assert_close(quantizer.embedding.weight, before, rtol=0, atol=0)
    quantizer.train()
    for _ in range(30):
        quantizer(z)
    torch.testing.assert_close(quantizer.embedding.weight[:2], torch.tensor([[0.1, 0.2], [1.2, 0.8]]), atol=1e-3, rtol=0)
    # the unused code keeps its vector while its decayed size is still well above epsilon (0.8^30 = 1e-3)
    torch.testing.assert_close(quantizer.embedding.weight[2], torch.tensor([5.0, 5.0]), atol=0.05, rtol=0)


def test_usage_and_perplexity_against_a_count():
    indices = torch.tensor([[0, 0, 1], [1, 1, 3]])  # counts 2, 3, 0, 1 over 8 codes
    usage, perplexity = codebook_statistics(indices, num_codes=8)
    assert usage.item() == pytest.approx(3 / 8)
    entropy = -sum(p * math.log(p) for p in (2 / 6, 3 / 6, 1 / 6))
    assert perplexity.item() == pytest.approx(math.exp(entropy))
    # uniform use of every code gives perplexity = num_codes
    assert codebook_statistics(torch.arange(8).repeat(3), 8)[1].item() == pytest.approx(8.0)


def test_quantizer_refuses_bad_settings_and_shapes():
    with pytest.raises(ValueError, match="ema_decay"):
        VectorQuantizer(4, 2, ema_decay=1.0)
    with pytest.raises(ValueError, match=r"\(B, 2, h, w\)"):
        VectorQuantizer(4, 2).nearest(torch.zeros(1, 3, 2, 2))


# ---- the codec -------------------------------------------------------------------------------------

def test_vq_codec_honours_the_codec_contract():
    check_codec(lambda: tiny_vq(ema_decay=0.99))  # the EMA variant: its buffers must round-trip too


@torch.no_grad()
def test_encode_is_pre_quantization_and_decode_quantizes_first():
    codec = tiny_vq(scale_factor=0.5)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    unscaled = codec.quant_conv(codec.encoder(images))
    latents = codec.encode(images)
    torch.testing.assert_close(latents, unscaled * 0.5)
    assert latents.shape == (2, 4, 8, 8)
    assert not torch.isin(latents / 0.5, codec.quantize.embedding.weight).all()  # continuous, not codes
    codes = codec.quantize.embedding.weight[codec.quantize.nearest(unscaled)].permute(0, 3, 1, 2)
    torch.testing.assert_close(codec.decode(latents), codec.decoder(codec.post_quant_conv(codes)))
    # a latent moved slightly towards its code decodes to the same image
    torch.testing.assert_close(codec.decode(0.5 * (0.9 * unscaled + 0.1 * codes)), codec.decode(latents))


def test_autoencode_losses_statistics_and_last_layer():
    codec = tiny_vq()
    assert codec.statistics() == {}
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    reconstruction, losses = codec.autoencode(images)
    assert set(losses) == {"codebook", "commitment"}
    torch.testing.assert_close(losses["commitment"], 0.25 * losses["codebook"])  # the same distance, beta = 0.25
    with torch.no_grad():
        torch.testing.assert_close(reconstruction, codec.decode(codec.encode(images)), rtol=1e-4, atol=1e-5)
    statistics = codec.statistics()
    indices = codec.quantize.nearest(codec.encode(images))
    assert statistics["codebook_usage"] == pytest.approx(len(indices.unique()) / 16)
    assert 1.0 <= statistics["perplexity"] <= len(indices.unique()) + 1e-4
    assert codec.last_layer() is codec.decoder.conv_out.weight
    _, ema_losses = tiny_vq(ema_decay=0.99).autoencode(images)
    assert set(ema_losses) == {"commitment"}


def test_kl_last_layer_is_the_decoder_output_conv():
    codec = KLCodec(channels=32, channel_mult=(1, 1), num_res_blocks=1, resolution=16)
    assert codec.last_layer() is codec.decoder.conv_out.weight


def test_vq_pipeline_checkpoint_round_trip(tmp_path):
    pipe = LatentDiffusionPipeline.from_config(compose("train", ["experiment=smoke", "codec=vq_tiny",
                                                                 "codec.ema_decay=0.99"])).eval()
    fill_zero_parameters(pipe.denoiser)
    assert isinstance(pipe.codec, VQCodec)
    with torch.no_grad():  # codes that differ from the initial ones, and EMA statistics that do too
        pipe.codec.quantize.embedding.weight.normal_()
        pipe.codec.quantize.cluster_size.uniform_(0.5, 2.0)
    loaded = LatentDiffusionPipeline.from_checkpoint(pipe.save(tmp_path / "vq.safetensors"))
    assert isinstance(loaded.codec, VQCodec) and loaded.codec.quantize.ema_decay == pipe.codec.quantize.ema_decay
    for key, value in pipe.codec.state_dict().items():
        torch.testing.assert_close(loaded.codec.state_dict()[key], value, rtol=0, atol=0)
    first = np.stack([np.asarray(image) for image in pipe("a red circle", steps=2, seed=3)])
    again = np.stack([np.asarray(image) for image in loaded("a red circle", steps=2, seed=3)])
    assert np.array_equal(first, again)

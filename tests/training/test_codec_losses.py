"""The first-stage objective: hinge GAN losses, the adaptive weight, the PatchGAN discriminator,
the LPIPS perceptual slot (weights only from a user file) and a short codec-stage run with all of it."""

from __future__ import annotations

import csv
import logging
import math
import warnings

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from latentgen import registry
from latentgen.codecs.identity import IdentityCodec
from latentgen.config import compose
from latentgen.errors import CheckpointError, ConfigError
from latentgen.nn.discriminator import PatchDiscriminator
from latentgen.training.codec_losses import (
    AdversarialLoss,
    CodecObjective,
    adaptive_weight,
    hinge_discriminator_loss,
    hinge_generator_loss,
)
from latentgen.training.perceptual import LPIPS, load_lpips
from latentgen.training.run import run_training

CPU = torch.device("cpu")


def settings(**overrides) -> dict:
    base = dict( lr=1e-3, l1_weight=1.0, l2_weight=1.0, kl_weight=1e-6, codebook_weight=1.0,
                commitment_weight=1.0, perceptual_weight=0.0, perceptual_weights=None, disc_weight=0.0, disc_start=0,
                disc_layers=2, disc_channels=8, disc_lr=None)
    base.update(overrides)
    return base


def tiny_codec(name: str = "kl"):
    extra = {"num_codes": 16} if name == "vq" else {}
    return registry.build("codec", name, latent_channels=4, channels=32, channel_mult=[1, 1], num_res_blocks=1,
                          resolution=16, **extra)


def _lpips_shapes() -> dict:
    with torch.device("meta"):
        return LPIPS().state_dict()


def random_lpips_file(tmp_path, name: str = "lpips.safetensors") -> tuple:
    """An LPIPS state dict with random weights (heads non-negative), written as the user would."""
    generator = torch.Generator().manual_seed(0)
    state = {key: torch.randn(value.shape, generator=generator) * (0.05 if ".weight" in key else 0.01)
             for key, value in _lpips_shapes().items()}
    state.update({key: value.abs() * 10 for key, value in state.items() if key.startswith("lin")})
    path = tmp_path / name
    if name.endswith(".safetensors"):
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path, state


# ---- hinge losses and the adaptive weight ----------------------------------------------------------

def test_hinge_losses_by_hand():
    real = torch.tensor([2.0, 0.5, -1.0, 0.0])  # relu(1 - x): 0, 0.5, 2, 1  -> mean 0.875
    fake = torch.tensor([-3.0, 0.25, 1.0, -0.5])  # relu(1 + x): 0, 1.25, 2, 0.5 -> mean 0.9375
    assert hinge_discriminator_loss(real, fake).item() == pytest.approx(0.5 * (0.875 + 0.9375))
    assert hinge_generator_loss(fake).item() == pytest.approx(-(-3.0 + 0.25 + 1.0 - 0.5) / 4)


def test_adaptive_weight_matches_separate_autograd_passes():
    layer = nn.Conv2d(4, 3, 3, padding=1)
    features = torch.randn(2, 4, 6, 6)
    target = torch.randn(2, 3, 6, 6)
    critic = nn.Conv2d(3, 1, 3)

    def losses():
        output = layer(features)
        return (output - target).abs().mean(), -critic(output).mean()

    reconstruction, gan = losses()
    weight = adaptive_weight(reconstruction, gan, layer.weight)
    reference = []
    for index in range(2):  # each loss in a graph of its own, through .backward()
        layer.zero_grad()
        losses()[index].backward()
        reference.append(layer.weight.grad.norm().item())
    assert weight.item() == pytest.approx(reference[0] / (reference[1] + 1e-4), rel=1e-5)
    assert not weight.requires_grad


def test_adaptive_weight_is_clamped():
    parameter = nn.Parameter(torch.ones(3))
    weight = adaptive_weight((parameter * 5.0).sum(), 0.0 * parameter.sum(), parameter)  # |g_rec| / 1e-4 = 8.7e4
    assert weight.item() == 1e4


# ---- the discriminator -----------------------------------------------------------------------------

def test_patch_discriminator_gives_one_logit_per_patch_and_refuses_small_images():
    discriminator = PatchDiscriminator(channels=8, num_layers=3)
    assert discriminator(torch.randn(2, 3, 32, 32)).shape == (2, 1, 2, 2)  # 32 -> 16 -> 8 -> 4 -> 3 -> 2
    assert discriminator(torch.randn(2, 3, 24, 24)).shape == (2, 1, 1, 1)  # the smallest size, 3 * 2^3
    with pytest.raises(ValueError, match="H, W >= 24.*disc_layers"):
        discriminator(torch.randn(2, 3, 23, 32))


def test_discriminator_steps_and_state_round_trip():
    adversarial = AdversarialLoss(PatchDiscriminator(channels=8, num_layers=2), weight=0.5, start=0, lr=1e-2)
    real, fake = torch.rand(4, 3, 16, 16), -torch.rand(4, 3, 16, 16)
    first = adversarial.train_step(real, fake, lr_factor=1.0)["disc"].item()
    for _ in range(8):
        last = adversarial.train_step(real, fake, lr_factor=1.0)["disc"].item()
    assert last < first  # it learns to tell bright from dark images
    copy = AdversarialLoss(PatchDiscriminator(channels=8, num_layers=2), weight=0.5, start=0, lr=1e-2)
    copy.load_state_dict(adversarial.state_dict())
    for a, b in zip(copy.discriminator.state_dict().values(), adversarial.discriminator.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert copy.optimizer.state_dict()["state"].keys() == adversarial.optimizer.state_dict()["state"].keys()


# ---- the objective ---------------------------------------------------------------------------------

def test_objective_adds_the_adaptively_weighted_gan_term_after_disc_start():
    codec = tiny_codec("kl")
    objective = CodecObjective(codec, settings(disc_weight=0.5, disc_start=2), CPU)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    reconstruction, regularizers = codec.autoencode(images)

    loss, terms = objective.codec_loss(images, reconstruction, regularizers, step=2)  # not yet
    assert terms["gan"].item() == 0 and terms["adaptive_weight"].item() == 0
    plain = terms["l1"] + terms["l2"] + 1e-6 * terms["kl"]
    assert loss.item() == pytest.approx(plain.item(), rel=1e-6)
    assert objective.discriminator_step(images, reconstruction, step=2, lr_factor=1.0)["disc"].item() == 0

    loss, terms = objective.codec_loss(images, reconstruction, regularizers, step=3)
    rec = torch.nn.functional.l1_loss(reconstruction, images) + torch.nn.functional.mse_loss(reconstruction, images)
    gan = -objective.adversarial.discriminator(reconstruction).mean()
    expected_weight = 0.5 * adaptive_weight(rec, gan, codec.last_layer())
    assert terms["adaptive_weight"].item() == pytest.approx(expected_weight.item(), rel=1e-4)
    assert terms["gan"].item() == pytest.approx(gan.item(), rel=1e-5)
    assert loss.item() == pytest.approx((plain + expected_weight * gan).item(), rel=1e-4)
    assert list(terms)[0] == "loss"
    assert objective.discriminator_step(images, reconstruction, step=3, lr_factor=1.0)["disc"].item() > 0


class _NoLastLayerCodec(IdentityCodec):
    """A codec with a parameter but no last_layer(): the adaptive weight cannot be computed."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(()))

    def autoencode(self, images, generator=None):
        return images * self.gain, {}


def test_without_last_layer_the_adaptive_weight_is_one_with_a_single_warning():
    codec = _NoLastLayerCodec()
    objective = CodecObjective(codec, settings(disc_weight=0.25), CPU)
    images = torch.rand(2, 3, 16, 16)
    with pytest.warns(UserWarning, match="no last_layer"):
        _, terms = objective.codec_loss(images, *codec.autoencode(images), step=1)
    assert terms["adaptive_weight"].item() == 0.25
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        objective.codec_loss(images, *codec.autoencode(images), step=2)  # no second warning


def test_objective_names_unweighted_terms_and_refuses_negative_disc_weight():
    codec = tiny_codec("vq")
    objective = CodecObjective(codec, {k: v for k, v in settings().items() if k != "codebook_weight"}, CPU)
    images = torch.rand(2, 3, 16, 16)
    with pytest.raises(KeyError, match=r"\['codebook'\]; set train.codec.<term>_weight"):
        objective.codec_loss(images, *codec.autoencode(images), step=1)
    with pytest.raises(ConfigError, match="disc_weight"):
        CodecObjective(codec, settings(disc_weight=-1.0), CPU)


# ---- the perceptual slot ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["lpips.safetensors", "lpips.pt"])
def test_lpips_from_a_user_file_is_a_distance(tmp_path, name):
    path, _ = random_lpips_file(tmp_path, name)
    metric = load_lpips(path)
    x, y = torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.equal(metric(x, x), torch.zeros(2))
    distance = metric(x, y)
    assert distance.shape == (2,) and (distance > 0).all()
    torch.testing.assert_close(metric(y, x), distance)


def test_lpips_matches_a_reference_on_torchvision_vgg16(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    path, state = random_lpips_file(tmp_path)
    features = torchvision.models.vgg16(weights=None).features.eval()
    for key, value in state.items():  # net.sliceK.<features index>.weight -> features[index].weight
        if key.startswith("net."):
            _, _, index, kind = key.split(".")
            getattr(features[int(index)], kind).data.copy_(value)
    shift, scale = torch.tensor([-0.030, -0.088, -0.188]), torch.tensor([0.458, 0.448, 0.450])

    def reference(x, y):
        total = torch.zeros(x.shape[0], dtype=torch.float64)
        hx, hy = ((v - shift.view(1, 3, 1, 1)) / scale.view(1, 3, 1, 1) for v in (x, y))
        taps = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
        for index, layer in enumerate(features[:30]):
            hx, hy = layer(hx), layer(hy)
            if index in taps:
                tap = taps.index(index)
                nx = hx.double() / (hx.double().pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                ny = hy.double() / (hy.double().pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                head = state[f"lin{tap}.model.1.weight"].double().view(1, -1, 1, 1)
                total += ((nx - ny).pow(2) * head).sum(1).mean((1, 2))
        return total

    x, y = torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(load_lpips(path)(x, y).double(), reference(x, y), rtol=1e-4, atol=1e-6)


def test_lpips_errors_name_the_file_and_the_keys(tmp_path):
    with pytest.raises(CheckpointError, match="nowhere.safetensors' do not exist.*perceptual_weight=0"):
        load_lpips(tmp_path / "nowhere.safetensors")
    _, state = random_lpips_file(tmp_path)
    wrong = {key: value for key, value in state.items() if not key.startswith("lin4")}
    wrong["classifier.weight"] = torch.zeros(2)
    wrong["net.slice1.0.weight"] = torch.zeros(64, 3, 1, 1)
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(CheckpointError) as error:
        load_lpips(tmp_path / "wrong.safetensors")
    message = str(error.value)
    for fragment in ("wrong.safetensors", "missing 1 key(s), first: lin4.model.1.weight",
                     "unexpected 1 key(s), first: classifier.weight", "net.slice1.0.weight (64, 3, 1, 1)"):
        assert fragment in message
    negative = dict(state, **{"lin0.model.1.weight": -state["lin0.model.1.weight"]})
    save_file(negative, str(tmp_path / "negative.safetensors"))
    with pytest.raises(CheckpointError, match="non-negative.*lin0"):
        load_lpips(tmp_path / "negative.safetensors")
    (tmp_path / "junk.pt").write_bytes(b"not a state dict")
    with pytest.raises(CheckpointError, match="junk.pt' could not be read"):
        load_lpips(tmp_path / "junk.pt")


def test_objective_without_perceptual_weights_says_so_once_and_with_them_uses_them(tmp_path, caplog):
    codec = tiny_codec("kl")
    with caplog.at_level(logging.WARNING, logger="latentgen.training.codec_losses"):
        objective = CodecObjective(codec, settings(), CPU)
    messages = [r.getMessage() for r in caplog.records if "perceptual" in r.getMessage()]
    assert len(messages) == 1 and "without a perceptual" in messages[0] and "perceptual_weights=" in messages[0]
    assert objective.perceptual is None
    with pytest.raises(ConfigError, match="perceptual_weights"):
        CodecObjective(codec, settings(perceptual_weight=1.0), CPU)

    path, _ = random_lpips_file(tmp_path)
    objective = CodecObjective(codec, settings(perceptual_weight=0.5, perceptual_weights=str(path)), CPU)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    reconstruction, regularizers = codec.autoencode(images)
    loss, terms = objective.codec_loss(images, reconstruction, regularizers, step=1)
    expected_perceptual = load_lpips(path)(reconstruction, images).mean()
    torch.testing.assert_close(terms["perceptual"], expected_perceptual.detach())
    assert loss.item() == pytest.approx((terms["l1"] + terms["l2"] + 1e-6 * terms["kl"] + 0.5 * terms["perceptual"]).item(),
                                        rel=1e-5)
    loss.backward()
    assert codec.last_layer().grad is not None
    assert all(p.grad is None for p in objective.perceptual.parameters())  # the metric stays fixed


# ---- a short stage-1 run ---------------------------------------------------------------------------

@pytest.mark.parametrize("codec", ["kl_tiny", "vq_tiny"])
def test_codec_stage_runs_with_the_discriminator_from_step_zero_and_logs(tmp_path, codec):
    # stop_after_steps ends the run after stage 1's three steps, before the denoiser stage.
    cfg = compose("train", ["experiment=smoke", f"codec={codec}", "train.codec.steps=3", "train.stop_after_steps=3",
                            "train.log_every=1", "train.codec.disc_weight=0.5", "train.codec.disc_start=0",
                            "train.codec.disc_layers=2", "train.codec.disc_channels=8"])
    run_training(cfg, tmp_path)
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [row["step"] for row in rows] == ["1", "2", "3"] and {row["stage"] for row in rows} == {"stage 1: codec"}
    for row in rows:
        assert float(row["disc"]) > 0 and float(row["adaptive_weight"]) > 0 and math.isfinite(float(row["gan"]))
        if codec == "vq_tiny":
            assert 0 < float(row["codebook_usage"]) <= 1 and 1 <= float(row["perplexity"]) <= 64
            assert float(row["codebook"]) > 0 and float(row["commitment"]) > 0
        else:
            assert "codebook_usage" not in row and float(row["kl"]) > 0

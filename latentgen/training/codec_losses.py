"""The LDM first-stage objective (Rombach et al. 2022, App. G; Esser et al. 2021, "Taming Transformers",
Sec. 3.1 and Eq. 7): reconstruction + perceptual + the codec's regularizers + an adaptively weighted
PatchGAN term, and the discriminator it is trained against."""

from __future__ import annotations

import logging
import warnings
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from latentgen.contracts import Codec
from latentgen.errors import ConfigError
from latentgen.nn.discriminator import PatchDiscriminator
from latentgen.training.fused_adam import adam, load_optimizer_state
from latentgen.training.perceptual import LPIPS, load_lpips

__all__ = ["AdversarialLoss", "CodecObjective", "adaptive_weight", "hinge_discriminator_loss", "hinge_generator_loss"]

log = logging.getLogger(__name__)

# train.codec keys ending in "_weight" that are not the weight of a loss term.
NOT_TERM_WEIGHTS = ("disc_weight",)
RECONSTRUCTION_TERMS = ("l1", "l2", "perceptual")
MAX_ADAPTIVE_WEIGHT = 1e4


def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """(mean relu(1 - D(x)) + mean relu(1 + D(x'))) / 2 (Lim & Ye 2017, the geometric GAN)."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """-mean D(x'): the generator side of the hinge GAN."""
    return -logits_fake.mean()


def adaptive_weight(reconstruction_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """||grad_L rec|| / (||grad_L gan|| + 1e-4), clamped to [0, 1e4], at the decoder's last layer L
    (Esser et al. 2021, Eq. 7): the GAN gradient is scaled to the size of the reconstruction one."""
    (reconstruction_grad,) = torch.autograd.grad(reconstruction_loss, last_layer, retain_graph=True)
    (gan_grad,) = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)
    weight = reconstruction_grad.norm() / (gan_grad.norm() + 1e-4)
    return weight.clamp(0.0, MAX_ADAPTIVE_WEIGHT).detach()


class AdversarialLoss:
    """A PatchGAN discriminator, its Adam optimizer, and when and how much its term counts.

    Both the discriminator's training and the codec's GAN term begin after `start` steps (LDM's
    disc_start); the term is scaled by `weight` times the adaptive weight.
    """

    def __init__(self, discriminator: PatchDiscriminator, weight: float, start: int, lr: float) -> None:
        self.discriminator = discriminator
        self.weight, self.start, self.lr = float(weight), int(start), float(lr)
        self.optimizer = adam(torch.optim.Adam, discriminator.parameters(), lr=self.lr, betas=(0.5, 0.9))

    def active(self, step: int) -> bool:
        """Whether the 1-based `step` trains with the GAN (LDM counts steps from 0 and starts at step >= start)."""
        return step > self.start

    def logits(self, images: torch.Tensor, trainable: bool) -> torch.Tensor:
        # The codec's pass needs gradients through the discriminator to the images, not into its weights.
        self.discriminator.requires_grad_(trainable)
        return self.discriminator(images)

    def train_step(self, images: torch.Tensor, reconstruction: torch.Tensor, lr_factor: float) -> dict[str, torch.Tensor]:
        """One hinge-loss step of the discriminator on real images and detached reconstructions."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * lr_factor
        logits_real = self.logits(images.detach(), trainable=True)
        logits_fake = self.logits(reconstruction.detach(), trainable=True)
        loss = hinge_discriminator_loss(logits_real, logits_fake)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"disc": loss.detach(), "logits_real": logits_real.detach().mean(), "logits_fake": logits_fake.detach().mean()}

    def state_dict(self) -> dict[str, Any]:
        return {"discriminator": self.discriminator.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.discriminator.load_state_dict(state["discriminator"])
        load_optimizer_state(self.optimizer, state["optimizer"])


class CodecObjective:
    """What stage 1 minimizes, from the train.codec settings:

    sum_t <t>_weight * L_t over l1, l2, perceptual (LPIPS) and the codec's regularizers (kl,
    codebook, commitment, ...), plus disc_weight * lambda * L_gan after disc_start steps, with
    lambda the adaptive weight at `codec.last_layer()`. `metrics` lists the logged values, the same
    names at every step so the CSV columns stay aligned.
    """

    def __init__(self, codec: Codec, settings: Mapping[str, Any], device: torch.device) -> None:
        self.codec = codec
        self.term_weights = {name[: -len("_weight")]: float(value) for name, value in settings.items()
                             if name.endswith("_weight") and name not in NOT_TERM_WEIGHTS}
        self.perceptual = _perceptual_network(settings, device)
        self.adversarial = _adversarial_loss(codec, settings, lr=float(settings["lr"]), device=device)
        self._warned_no_last_layer = False

    # ---- the codec's loss ---------------------------------------------------------------------

    def codec_loss(self, images: torch.Tensor, reconstruction: torch.Tensor, regularizers: Mapping[str, torch.Tensor],
                   step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted total and every term (unweighted) for logging, "loss" first."""
        terms = {"l1": F.l1_loss(reconstruction, images), "l2": F.mse_loss(reconstruction, images)}
        if self.perceptual is not None:
            terms["perceptual"] = self.perceptual(reconstruction.float(), images.float()).mean()
        terms.update(regularizers)
        unweighted = sorted(set(terms) - set(self.term_weights))
        if unweighted:
            raise KeyError(f"codec '{self.codec.name}' reports the loss term(s) {unweighted}; set "
                           f"train.codec.<term>_weight for each")
        reconstruction_loss = sum(self.term_weights[t] * terms[t] for t in terms if t in RECONSTRUCTION_TERMS)
        loss = reconstruction_loss + sum(self.term_weights[t] * terms[t] for t in terms if t not in RECONSTRUCTION_TERMS)
        if self.adversarial is not None:
            gan, weight = self._gan_term(reconstruction, reconstruction_loss, step)
            loss = loss + weight * gan
            terms.update(gan=gan.detach(), adaptive_weight=weight)
        return loss, {"loss": loss.detach(), **{k: v.detach() for k, v in terms.items()}}

    def _gan_term(self, reconstruction: torch.Tensor, reconstruction_loss: torch.Tensor,
                  step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(L_gan, disc_weight * lambda); both zero before disc_start, where nothing is computed."""
        zero = reconstruction.new_zeros(())
        if not self.adversarial.active(step):
            return zero, zero
        gan = hinge_generator_loss(self.adversarial.logits(reconstruction, trainable=False))
        return gan, self.adversarial.weight * self._adaptive_weight(reconstruction_loss, gan)

    def _adaptive_weight(self, reconstruction_loss: torch.Tensor, gan: torch.Tensor) -> torch.Tensor:
        last_layer = self.codec.last_layer()
        if last_layer is None or not torch.is_grad_enabled():
            if last_layer is None and not self._warned_no_last_layer:
                warnings.warn(f"codec '{self.codec.name}' has no last_layer(), so the GAN term is not balanced "
                              f"against the reconstruction (adaptive weight fixed at 1); tune "
                              f"train.codec.disc_weight by hand or implement Codec.last_layer", stacklevel=2)
                self._warned_no_last_layer = True
            return gan.new_ones(())
        return adaptive_weight(reconstruction_loss, gan, last_layer)

    # ---- the discriminator --------------------------------------------------------------------

    def discriminator_step(self, images: torch.Tensor, reconstruction: torch.Tensor, step: int,
                           lr_factor: float) -> dict[str, torch.Tensor]:
        """Train the discriminator once (after disc_start); its logged values (zeros before)."""
        if self.adversarial is None:
            return {}
        if not self.adversarial.active(step):
            zero = images.new_zeros(())
            return {"disc": zero, "logits_real": zero, "logits_fake": zero}
        return self.adversarial.train_step(images, reconstruction, lr_factor)

    # ---- checkpointing ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The trainable loss state (the discriminator and its optimizer); empty without a GAN."""
        return {} if self.adversarial is None else {"adversarial": self.adversarial.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if (self.adversarial is None) != ("adversarial" not in state):
            raise ValueError("the saved codec loss state and this run disagree on whether a discriminator is "
                             "trained (train.codec.disc_weight); resume with the same setting")
        if self.adversarial is not None:
            self.adversarial.load_state_dict(state["adversarial"])


def _perceptual_network(settings: Mapping[str, Any], device: torch.device) -> LPIPS | None:
    weight, path = float(settings.get("perceptual_weight", 0.0)), settings.get("perceptual_weights")
    if weight > 0 and not path:
        raise ConfigError("train.codec.perceptual_weight > 0 needs LPIPS weights: set train.codec.perceptual_weights "
                          "to an LPIPS-VGG16 file (.safetensors or torch state dict; layout in "
                          "latentgen.training.perceptual), or set train.codec.perceptual_weight=0")
    if weight <= 0:
        log.warning("the codec trains without a perceptual (LPIPS) loss%s; to enable it set "
                    "train.codec.perceptual_weights=<LPIPS-VGG16 weights file> train.codec.perceptual_weight=1.0",
                    " (perceptual_weights is set but perceptual_weight is 0)" if path else "")
        return None
    return load_lpips(path).to(device)


def _adversarial_loss(codec: Codec, settings: Mapping[str, Any], lr: float, device: torch.device) -> AdversarialLoss | None:
    weight = float(settings.get("disc_weight", 0.0))
    if weight < 0:
        raise ConfigError(f"train.codec.disc_weight must be >= 0 (0 trains without a discriminator); got {weight}")
    if weight == 0:
        return None
    discriminator = PatchDiscriminator(codec.image_channels, int(settings.get("disc_channels", 64)),
                                       int(settings.get("disc_layers", 3))).to(device)
    disc_lr = settings.get("disc_lr")
    return AdversarialLoss(discriminator, weight, int(settings.get("disc_start", 0)),
                           lr if disc_lr is None else float(disc_lr))

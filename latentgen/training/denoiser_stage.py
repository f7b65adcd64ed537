"""Stage 2: fit the denoiser (and any trainable conditioner) on the frozen codec's latents (Ho et al. 2020, Alg. 1)."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from latentgen.pipeline import LatentDiffusionPipeline
from latentgen.training.data import ShuffledOrder, seed_from
from latentgen.training.distributed import ProcessGroup
from latentgen.training.ema import EMA
from latentgen.training.fused_adam import adam, load_optimizer_state
from latentgen.training.latent_cache import LatentCache
from latentgen.training.loss_weighting import check_weighting, loss_weights
from latentgen.training.lr_schedule import warmup_cosine
from latentgen.training.precision import Precision


def denoising_loss(pipe: LatentDiffusionPipeline, latents: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor,
                   cond: Mapping[str, torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """Sum over the batch of weight_i * mean squared error between the network output and its target
    (eps, v or x0, as the prediction type says) for x = x0 + sigma * noise. (A sum, not a mean, so
    that shards and micro-batches of one batch add up to the same loss.)"""
    x = latents + noise * sigma.view(-1, 1, 1, 1).to(latents.dtype)
    output, _, _ = pipe.model.network_output(x, sigma, cond)
    target = pipe.model.training_target(latents, x, sigma)
    squared = (output.float() - target.float()).square().flatten(1).mean(1)  # (B,)
    return (weights.to(squared.device) * squared).sum()


class DenoiserTrainer:
    """One optimizer step of stage 2 per `step(step)`.

    A step takes the next global batch of `batch_size` cached latents (shuffled epochs), draws its
    noise levels, noise and conditioning dropout for the whole batch from `generator`, runs the
    conditioner on the whole batch, and then the denoiser on this process's rows in
    `grad_accumulation` micro-batches; the gradients are summed over micro-batches and processes, so
    the update equals one step on the whole batch. Mixed precision, gradient clipping, AdamW with
    warm-up + cosine learning rate, and an EMA of the trained modules, which is what gets saved.
    """

    def __init__(self, pipe: LatentDiffusionPipeline, cache: LatentCache, settings: Mapping[str, Any],
                 generator: torch.Generator, precision: Precision | None = None, group: ProcessGroup | None = None):
        self.pipe, self.cache, self.generator = pipe, cache, generator
        self.precision = precision or Precision("fp32", pipe.device)
        self.group = group or ProcessGroup()
        self.steps, self.batch_size = int(settings["steps"]), int(settings["batch_size"])
        self.base_lr, self.warmup_steps = float(settings["lr"]), int(settings["warmup_steps"])
        self.grad_clip = float(settings.get("grad_clip") or 0)
        self.weighting = str(settings.get("loss_weighting", "none"))
        self.gamma = settings.get("snr_gamma")
        check_weighting(self.weighting, self.gamma)
        self.micro_batches = int(settings.get("grad_accumulation", 1))
        if self.micro_batches < 1:
            raise ValueError(f"train.denoiser.grad_accumulation must be at least 1; got {self.micro_batches}")
        self.rows = self.group.rows(self.batch_size, "train.denoiser.batch_size")
        local = self.rows.stop - self.rows.start
        if local % self.micro_batches:
            raise ValueError(f"train.denoiser.batch_size {self.batch_size} over {self.group.world_size} process(es) "
                             f"gives {local} rows each, which do not split into grad_accumulation="
                             f"{self.micro_batches} micro-batches; make batch_size a multiple of "
                             f"{self.group.world_size * self.micro_batches}")
        self.order = ShuffledOrder(len(cache), self.batch_size, seed_from(generator), "train.denoiser.batch_size")
        self.modules = {kind: getattr(pipe, kind) for kind in ("denoiser", "conditioner")
                        if any(p.requires_grad for p in getattr(pipe, kind).parameters())}
        self.parameters = [p for module in self.modules.values() for p in module.parameters() if p.requires_grad]
        self.optimizer = adam(torch.optim.AdamW, self.parameters, lr=self.base_lr,
                              weight_decay=float(settings["weight_decay"]))
        decay = float(settings["ema_decay"])
        self.averages = {kind: EMA(module, decay) for kind, module in self.modules.items()} if decay > 0 else {}
        for module in self.modules.values():
            module.train()

    def learning_rate(self, step: int) -> float:
        return self.base_lr * warmup_cosine(step - 1, self.steps, self.warmup_steps)

    def step(self, step: int) -> tuple[dict[str, float], float]:
        """Train on the `step`-th batch (1-based); returns ({"loss": global mean loss}, learning rate)."""
        pipe, device = self.pipe, self.pipe.device
        lr = self.learning_rate(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        latents, inputs = self.cache.batch(self.order.next())
        sigma = pipe.model.sample_training_sigmas(self.batch_size, self.generator)  # (B,) float64
        noise = torch.randn(latents.shape, generator=self.generator)
        weights = loss_weights(sigma, pipe.model.prediction_type, self.weighting, self.gamma) * \
            pipe.process.loss_weight(sigma).float()
        self.optimizer.zero_grad(set_to_none=True)
        with self.precision.autocast():
            cond = pipe.conditioner.for_training(inputs, self.generator)
        # The denoiser's micro-batches backpropagate into detached copies of this process's
        # conditioning; the conditioner then runs its backward once for all of them.
        mine = {key: value[self.rows] for key, value in cond.items()}
        leaves = {key: value.detach().requires_grad_(value.requires_grad) for key, value in mine.items()}
        total = torch.zeros((), device=device)
        start, size = self.rows.start, (self.rows.stop - self.rows.start) // self.micro_batches
        for micro in range(self.micro_batches):
            rows = slice(start + micro * size, start + (micro + 1) * size)
            local = slice(micro * size, (micro + 1) * size)
            with self.precision.autocast():
                loss = denoising_loss(pipe, latents[rows].to(device), sigma[rows].to(device), noise[rows].to(device),
                                      {key: value[local] for key, value in leaves.items()}, weights[rows])
            loss = loss / self.batch_size
            self.precision.backward(loss)
            total += loss.detach().float()
        grads = [(mine[key], leaf.grad) for key, leaf in leaves.items() if leaf.grad is not None]
        if grads:
            torch.autograd.backward([value for value, _ in grads], [grad for _, grad in grads])
        self.group.sum_gradients(self.parameters)
        if self.grad_clip:
            self.precision.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.parameters, self.grad_clip)
        self.precision.step(self.optimizer)
        self.precision.update()
        for kind, average in self.averages.items():
            average.update(self.modules[kind])
        return {"loss": float(self.group.sum(total))}, lr

    def averaged(self) -> LatentDiffusionPipeline:
        """The same pipeline with each trained module replaced by its moving average (what is saved)."""
        swap = {kind: self.averages[kind].average if kind in self.averages else getattr(self.pipe, kind)
                for kind in ("denoiser", "conditioner")}
        pipe = self.pipe
        return LatentDiffusionPipeline(pipe.codec, swap["denoiser"], swap["conditioner"], pipe.scheduler,
                                       pipe.diffusion, pipe.sampling, process=pipe.process)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "order": self.order.state_dict(),
                "averages": {kind: average.state_dict() for kind, average in self.averages.items()},
                "precision": self.precision.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if set(state["averages"]) != set(self.averages):
            raise ValueError(f"the training state averages {sorted(state['averages'])}, this run {sorted(self.averages)}; "
                             f"resume with the same ema_decay and trainable modules")
        load_optimizer_state(self.optimizer, state["optimizer"])
        self.order.load_state_dict(state["order"])
        for kind, average in self.averages.items():
            average.load_state_dict(state["averages"][kind])
        self.precision.load_state_dict(state["precision"])

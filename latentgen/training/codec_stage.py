"""Stage 1: fit the codec to reconstruct images (Rombach et al. 2022, Sec. 3.1), then fix its latent scale."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch.utils.data import DataLoader, Dataset

from latentgen.contracts import Codec
from latentgen.nn.discriminator import min_image_size
from latentgen.training.codec_losses import CodecObjective, hinge_discriminator_loss
from latentgen.training.data import DatasetBatches, derived_seed, seed_from
from latentgen.training.distributed import ProcessGroup
from latentgen.training.fused_adam import adam, load_optimizer_state
from latentgen.training.lr_schedule import warmup_cosine
from latentgen.training.precision import Precision


class CodecTrainer:
    """One optimizer step of stage 1 per `step(step)`: the first-stage objective (CodecObjective:
    l1/l2 reconstruction, perceptual, the codec's regularizers, an adaptively weighted GAN term),
    then one step of its discriminator, if any.

    The global batch of `batch_size` images is split into chunks: `grad_accumulation` micro-batches on
    each of the processes. Every loss term is a mean over its chunk, so each chunk's loss is divided
    by the number of chunks and the gradients are summed over chunks and processes: the mean over the
    global batch. Chunk c samples the codec's posterior with a generator seeded from (step, c), so a
    run with P processes of A micro-batches equals one process with P * A micro-batches. (The GAN's
    adaptive weight and the discriminator's batch norm see one chunk at a time, and a VQ codebook with
    EMA updates once per chunk: with those, more chunks is a close approximation, not an identity.)
    """

    stage = "codec"

    def __init__(self, codec: Codec, dataset: Dataset, settings: Mapping[str, Any], device: torch.device,
                 generator: torch.Generator, num_workers: int = 0, precision: Precision | None = None,
                 group: ProcessGroup | None = None):
        self.codec, self.device, self.generator = codec, device, generator
        self.precision = precision or Precision("fp32", device)
        self.group = group or ProcessGroup()
        self.steps, self.batch_size = int(settings["steps"]), int(settings["batch_size"])
        self.base_lr = float(settings["lr"])
        self.grad_clip = float(settings.get("grad_clip") or 0)
        self.micro_batches = int(settings.get("grad_accumulation", 1))
        rows = self.group.rows(self.batch_size, "train.codec.batch_size")
        if self.micro_batches < 1 or (rows.stop - rows.start) % self.micro_batches:
            raise ValueError(f"train.codec.grad_accumulation={self.micro_batches} must be >= 1 and split the "
                             f"{rows.stop - rows.start} rows each of {self.group.world_size} process(es) get from "
                             f"batch_size {self.batch_size}; make batch_size a multiple of "
                             f"{self.group.world_size * max(1, self.micro_batches)}")
        self.chunks = self.group.world_size * self.micro_batches
        self.rows = rows
        self.crop_size = check_crop_size(settings, codec, dataset)
        self.objective = CodecObjective(codec, settings, device)
        self.optimizer = adam(torch.optim.Adam, codec.parameters(), lr=self.base_lr, betas=(0.5, 0.9))
        self.batches = DatasetBatches(dataset, self.batch_size, generator, num_workers, rows, "train.codec.batch_size")
        codec.train()

    def lr_factor(self, step: int) -> float:
        return warmup_cosine(step - 1, self.steps, min(100, self.steps // 10))

    def step(self, step: int) -> tuple[dict[str, float], float]:
        """Train on the `step`-th batch (1-based); returns (global mean of each logged value, lr)."""
        factor = self.lr_factor(step)
        for group in self.optimizer.param_groups:
            group["lr"] = self.base_lr * factor
        images = next(self.batches)["image"].to(self.device)  # this process's rows
        step_seed = seed_from(self.generator)  # the same on every process
        if self.crop_size:
            images = self._crop(images, step_seed)
        parts = images.chunk(self.micro_batches)
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, torch.Tensor] = {}
        reconstructions = []
        for micro, part in enumerate(parts):
            chunk = self.group.rank * self.micro_batches + micro
            generator = torch.Generator(self.device).manual_seed(derived_seed(step_seed, chunk))
            with self.precision.autocast():
                reconstruction, regularizers = self.codec.autoencode(part, generator=generator)
                loss, metrics = self.objective.codec_loss(part, reconstruction, regularizers, step)
            self.precision.backward(loss / self.chunks)
            reconstructions.append(reconstruction.detach())
            _accumulate(sums, metrics, self.chunks)
        parameters = [p for p in self.codec.parameters() if p.requires_grad]
        self.group.sum_gradients(parameters)
        self.group.average_buffers(self.codec)
        if self.grad_clip:
            self.precision.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(parameters, self.grad_clip)
        self.precision.step(self.optimizer)
        self._discriminator_step(parts, reconstructions, step, factor, sums)
        self.precision.update()
        totals = self.group.sum(torch.stack(list(sums.values())))
        logged = dict(zip(sums, totals.tolist()))
        logged.update(self.codec.statistics())
        return logged, self.base_lr * factor

    def _crop(self, images: torch.Tensor, step_seed: int) -> torch.Tensor:
        """A random crop_size x crop_size window of each image. The offsets are drawn for the whole global
        batch from the step's seed (a stream of its own, after the chunks' ones), so they do not depend on
        how many processes share the batch."""
        size = self.crop_size
        generator = torch.Generator().manual_seed(derived_seed(step_seed, _CROP_STREAM))
        height, width = images.shape[-2:]
        if size > min(height, width):
            raise ValueError(f"train.codec.crop_size={size} does not fit in images of {height}x{width}; use at most "
                             f"{min(height, width)}, or null for whole images")
        offsets = torch.stack([torch.randint(0, height - size + 1, (self.batch_size,), generator=generator),
                               torch.randint(0, width - size + 1, (self.batch_size,), generator=generator)], 1)
        offsets = offsets[self.rows].tolist()
        return torch.stack([image[:, y:y + size, x:x + size] for image, (y, x) in zip(images, offsets)])

    def _discriminator_step(self, parts, reconstructions, step: int, factor: float,
                            sums: dict[str, torch.Tensor]) -> None:
        """One hinge-loss step of the discriminator on real images and detached reconstructions
        (after disc_start; zeros are logged before); adds its logged values to `sums`."""
        adversarial = self.objective.adversarial
        if adversarial is None:
            return
        if not adversarial.active(step):
            zero = parts[0].new_zeros(())
            _accumulate(sums, {"disc": zero, "logits_real": zero, "logits_fake": zero}, 1)
            return
        for group in adversarial.optimizer.param_groups:
            group["lr"] = adversarial.lr * factor
        adversarial.optimizer.zero_grad(set_to_none=True)
        for part, reconstruction in zip(parts, reconstructions):
            with self.precision.autocast():
                real = adversarial.logits(part, trainable=True)
                fake = adversarial.logits(reconstruction, trainable=True)
                loss = hinge_discriminator_loss(real, fake)
            self.precision.backward(loss / self.chunks)
            _accumulate(sums, {"disc": loss, "logits_real": real.mean(), "logits_fake": fake.mean()}, self.chunks)
        parameters = list(adversarial.discriminator.parameters())
        self.group.sum_gradients(parameters)
        self.group.average_buffers(adversarial.discriminator)
        self.precision.step(adversarial.optimizer)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "objective": self.objective.state_dict(),
                "data": self.batches.state_dict(), "precision": self.precision.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        load_optimizer_state(self.optimizer, state["optimizer"])
        self.objective.load_state_dict(state["objective"])
        self.batches.load_state_dict(state["data"])
        self.precision.load_state_dict(state["precision"])


_CROP_STREAM = 2**31  # above any chunk index


def check_crop_size(settings: Mapping[str, Any], codec: Codec, dataset: Any) -> int | None:
    """`train.codec.crop_size` as an int (None: whole images); a ValueError naming the fix where crops of that
    size cannot be encoded, do not fit in the dataset's images or are too small for the discriminator."""
    crop_size = settings.get("crop_size")
    if crop_size is None:
        return None
    crop_size, downsampling_factor = int(crop_size), int(codec.downsampling_factor)
    image_size = getattr(dataset, "image_size", None)
    if crop_size % downsampling_factor:
        raise ValueError(f"train.codec.crop_size={crop_size} is not a multiple of the codec's downsampling factor "
                         f"{downsampling_factor}; use a multiple of {downsampling_factor}, or null for whole images")
    if image_size is not None and crop_size > int(image_size):
        raise ValueError(f"train.codec.crop_size={crop_size} is larger than the dataset's {image_size}x{image_size} "
                         f"images; use at most {image_size}, or null for whole images")
    layers = int(settings.get("disc_layers", 3))
    if float(settings.get("disc_weight") or 0) > 0 and crop_size < min_image_size(layers):
        raise ValueError(f"train.codec.crop_size={crop_size} is too small for the discriminator's {layers} layers, "
                         f"which need crops of at least {min_image_size(layers)} pixels; raise crop_size or lower "
                         f"train.codec.disc_layers")
    return crop_size


def _accumulate(sums: dict[str, torch.Tensor], metrics: Mapping[str, torch.Tensor], chunks: int) -> None:
    """Add each value / chunks (so that the sum over chunks and processes is the global mean)."""
    for key, value in metrics.items():
        sums[key] = sums.get(key, 0) + value.detach().float() / chunks


@torch.no_grad()
def estimate_scale_factor(codec: Codec, dataset: Dataset, device: torch.device, max_items: int = 2048) -> float:
    """1 / std of the unscaled latents, so the diffusion sees unit-variance data (LDM's scale_by_std)."""
    previous = codec.scale_factor
    codec.scale_factor = 1.0
    latents = []
    seen = 0
    # A private generator: the loader's seed draw must not move the global one (an exact resume needs it still).
    for batch in DataLoader(dataset, batch_size=256, shuffle=False, generator=torch.Generator()):
        latents.append(codec.encode(batch["image"].to(device)).float())
        seen += latents[-1].shape[0]
        if seen >= max_items:
            break
    codec.scale_factor = previous
    std = torch.cat(latents).std().item()
    if not std > 0:
        raise ValueError(f"codec '{codec.name}' produced constant latents; cannot estimate its scale_factor")
    return 1.0 / std

"""Vector quantization with a learned codebook (van den Oord et al. 2017, "Neural Discrete
Representation Learning", Eq. 3; EMA codebook from its App. A.1), as in the LDM VQ autoencoder."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = ["Quantized", "VectorQuantizer", "codebook_statistics"]


@dataclass
class Quantized:
    """What one quantization of a batch of latents (B, C, h, w) produced."""

    latents: torch.Tensor  # (B, C, h, w): the codes in the forward pass, the identity in the backward pass
    indices: torch.Tensor  # (B, h, w) long: the chosen code per position
    codebook_loss: torch.Tensor | None  # ||sg[z] - e||^2, mean; None with an EMA codebook (no gradient learns it)
    commitment_loss: torch.Tensor  # beta * ||z - sg[e]||^2, mean
    usage: torch.Tensor  # scalar: fraction of the codebook used in this batch
    perplexity: torch.Tensor  # scalar: exp(entropy of the batch's code frequencies); num_codes at best


def codebook_statistics(indices: torch.Tensor, num_codes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fraction of codes used, perplexity) of a batch of code indices of any shape."""
    counts = torch.bincount(indices.flatten(), minlength=num_codes).float()
    probabilities = counts / counts.sum()
    # 0 * log 0 counts as 0: xlogy handles it without a NaN.
    entropy = -torch.special.xlogy(probabilities, probabilities).sum()
    return (counts > 0).float().mean(), entropy.exp()


class VectorQuantizer(nn.Module):
    """Nearest-neighbour codebook lookup over the channel dimension with a straight-through gradient.

    The codebook is `embedding.weight` (num_codes, code_dim), the name the LDM VQ checkpoints use.
    With `ema_decay=None` the codebook is learned by gradient through the codebook loss; with a
    decay in (0, 1) it is an exponential moving average of the encoder outputs assigned to each code
    (cluster sizes Laplace-smoothed so no code divides by zero) and no codebook loss is returned.
    A side effect of the smoothing: once a code has gone unused so long that its decayed size falls
    below `epsilon` (about log(epsilon) / log(decay) steps), its vector shrinks towards the origin.
    """

    def __init__(self, num_codes: int, code_dim: int, beta: float = 0.25, ema_decay: float | None = None,
                 epsilon: float = 1e-5) -> None:
        super().__init__()
        if num_codes < 1 or code_dim < 1:
            raise ValueError(f"VectorQuantizer needs num_codes >= 1 and code_dim >= 1; got {num_codes}, {code_dim}")
        if beta < 0:
            raise ValueError(f"VectorQuantizer needs a commitment beta >= 0; got {beta}")
        if ema_decay is not None and not 0.0 < ema_decay < 1.0:
            raise ValueError(f"VectorQuantizer's ema_decay must be in (0, 1) (e.g. 0.99), or None for a codebook "
                             f"learned by gradient; got {ema_decay}")
        self.num_codes, self.code_dim = int(num_codes), int(code_dim)
        self.beta = float(beta)
        self.ema_decay = None if ema_decay is None else float(ema_decay)
        self.epsilon = float(epsilon)
        self.embedding = nn.Embedding(self.num_codes, self.code_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / self.num_codes, 1.0 / self.num_codes)
        if self.ema_decay is not None:
            self.embedding.weight.requires_grad_(False)
            # Sizes start at 1 with sums equal to the initial codes, so a code no batch has chosen yet
            # keeps its vector (sum / size) instead of being divided by a near-zero smoothed size.
            self.register_buffer("cluster_size", torch.ones(self.num_codes))
            self.register_buffer("embed_sum", self.embedding.weight.detach().clone())

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code (Euclidean) for every position of z (B, code_dim, h, w) -> (B, h, w)."""
        if z.ndim != 4 or z.shape[1] != self.code_dim:
            raise ValueError(f"VectorQuantizer expects latents of shape (B, {self.code_dim}, h, w); got {tuple(z.shape)}")
        flat = z.detach().float().permute(0, 2, 3, 1).reshape(-1, self.code_dim)  # (N, D)
        codes = self.embedding.weight.detach().float()  # (K, D)
        # |z - e|^2 = |z|^2 - 2 z.e + |e|^2, without materializing (N, K, D); float32 so that
        # reduced-precision autocast cannot flip near-ties.
        distances = flat.pow(2).sum(1, keepdim=True) - 2.0 * flat @ codes.t() + codes.pow(2).sum(1)  # (N, K)
        return distances.argmin(dim=1).view(z.shape[0], z.shape[2], z.shape[3])

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes for indices (B, h, w) -> (B, code_dim, h, w)."""
        return self.embedding(indices).permute(0, 3, 1, 2)

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """The nearest codes for z (B, code_dim, h, w), without losses or codebook updates (decoding)."""
        return self.lookup(self.nearest(z)).to(z.dtype)

    def forward(self, z: torch.Tensor) -> Quantized:
        """Quantize z (B, code_dim, h, w) for training; updates an EMA codebook in training mode."""
        indices = self.nearest(z)
        if self.ema_decay is not None and self.training:
            self._update_codebook(z, indices)
        codes = self.lookup(indices).to(z.dtype)
        commitment = self.beta * F.mse_loss(z, codes.detach())
        codebook = None if self.ema_decay is not None else F.mse_loss(codes, z.detach())
        straight_through = z + (codes - z).detach()
        usage, perplexity = codebook_statistics(indices, self.num_codes)
        return Quantized(straight_through, indices, codebook, commitment, usage, perplexity)

    @torch.no_grad()
    def _update_codebook(self, z: torch.Tensor, indices: torch.Tensor) -> None:
        """e_k = m_k / N_k with N_k <- d N_k + (1-d) n_k and m_k <- d m_k + (1-d) sum of the z assigned to k."""
        flat = z.detach().float().permute(0, 2, 3, 1).reshape(-1, self.code_dim)  # (N, D)
        assignments = F.one_hot(indices.flatten(), self.num_codes).float()  # (N, K)
        counts = assignments.sum(0)  # (K,)
        sums = assignments.t() @ flat  # (K, D)
        if dist.is_available() and dist.is_initialized():
            # Every process must apply the same update, so the statistics are those of the global batch.
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        decay = self.ema_decay
        self.cluster_size.mul_(decay).add_(counts, alpha=1.0 - decay)
        self.embed_sum.mul_(decay).add_(sums, alpha=1.0 - decay)
        total = self.cluster_size.sum()
        # Laplace smoothing keeps every size positive while preserving their total.
        smoothed = (self.cluster_size + self.epsilon) / (total + self.num_codes * self.epsilon) * total
        self.embedding.weight.copy_(self.embed_sum / smoothed.unsqueeze(1))

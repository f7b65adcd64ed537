"""CLIP text conditioning as Stable Diffusion uses it: v1 with OpenAI CLIP (Radford et al. 2021, CLIP),
v2 with OpenCLIP (Cherti et al. 2023; Ilharco et al. 2021, OpenCLIP)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from latentgen.contracts import Conditioner
from latentgen.text.clip_text_model import HIDDEN_ACTS, CLIPTextTransformer
from latentgen.text.clip_tokenizer import CLIPTokenizer
from latentgen.text.openclip_text_model import OpenCLIPTextTower

LAYOUTS = ("clip", "openclip")
LAYERS = {"last": -1, "penultimate": -2}
DEFAULT_PAD_ID = {"clip": 49407, "openclip": 0}
DEFAULT_HIDDEN_ACT = {"clip": "quick_gelu", "openclip": "gelu"}


class CLIPTextConditioner(Conditioner):
    """Prompts (list[str]) -> "crossattn" (B, max_length, context_dim): the layer-normed hidden state of a CLIP
    text tower (Radford et al. 2021); the empty prompt "" is the unconditional input.

    layout "clip" is SD v1's tower (attribute `transformer`, keys as `cond_stage_model.transformer.*`),
    "openclip" SD v2's (attribute `model`, keys as `cond_stage_model.model.*`). `layer` "last" is the
    SD v1 convention, "penultimate" SD v2's and SDXL's; `final_norm=False` leaves the tower's final layer
    norm off that layer's output (SDXL). `pooled=True` also gives "vector" (B, projection_dim): the
    final-normed end-of-text token of the last layer through `text_projection` (SDXL's pooled text
    embedding); for layout "clip" the projection is transformers' `text_projection` Linear when
    `projection_dim` is given, and none otherwise (SD3's CLIP-G and CLIP-L pooled vectors). `zero_unconditional=True` makes the unconditional output zeros
    instead of the encoding of "" (what SDXL base's sampling does). `pad_id` and `hidden_act` default to the
    layout's own (49407 and quick_gelu for "clip", 0 and gelu for "openclip"). Defaults otherwise build
    CLIP ViT-L/14's text tower.
    """

    def __init__(self, layout: str = "clip", context_dim: int = 768, layers: int = 12, heads: int = 12,
                 intermediate_size: int | None = None, vocab_size: int = 49408, max_length: int = 77,
                 hidden_act: str | None = None, layer: str = "last", pad_id: int | None = None,
                 dropout: float = 0.1, input_key: str = "prompt", final_norm: bool = True, pooled: bool = False,
                 projection_dim: int | None = None, zero_unconditional: bool = False):
        super().__init__()
        if projection_dim is not None and layout != "openclip" and not pooled:
            raise ValueError(f"conditioner '{self.name}': projection_dim projects the pooled vector: pass pooled=true "
                             f"as well (layout '{layout}')")
        if projection_dim is not None and int(projection_dim) < 1:
            raise ValueError(f"conditioner '{self.name}': projection_dim must be a positive integer; got "
                             f"{projection_dim}")
        self.final_norm, self.pooled, self.zero_unconditional = bool(final_norm), bool(pooled), bool(zero_unconditional)
        self.projection_dim = int(projection_dim) if projection_dim is not None else int(context_dim)
        project_clip = layout == "clip" and projection_dim is not None
        width = context_dim  # the tower's width is the width of the tokens it gives cross-attention
        self._check_options(layout, width, layers, heads, intermediate_size, vocab_size, max_length,
                            hidden_act, layer, dropout)
        hidden_act = DEFAULT_HIDDEN_ACT[layout] if hidden_act is None else hidden_act
        intermediate_size = 4 * width if intermediate_size is None else int(intermediate_size)
        self.layout = layout
        self.width = int(width)
        self.vocab_size = int(vocab_size)
        self.max_length = int(max_length)
        self.layer = layer
        self.pad_id = DEFAULT_PAD_ID[layout] if pad_id is None else int(pad_id)
        self.dropout = float(dropout)
        self.input_keys = (input_key,)
        self._tokenizer: CLIPTokenizer | None = None  # built on first use: reading the vocabulary takes ~0.1 s
        self._added_weights: list[nn.Parameter] = []  # token embeddings before each add_word, for remove_word
        if layout == "clip":
            self.transformer = CLIPTextTransformer(vocab_size, width, intermediate_size, layers, heads, max_length,
                                                   hidden_act)
            if project_clip:  # transformers' CLIPTextModelWithProjection head, used as pooled @ W.T
                self.text_projection = nn.Linear(width, self.projection_dim, bias=False)
        else:
            self.model = OpenCLIPTextTower(vocab_size, width, layers, heads, intermediate_size / width, max_length,
                                           embed_dim=self.projection_dim, hidden_act=hidden_act)

    def _check_options(self, layout: str, width: int, layers: int, heads: int, intermediate_size: int | None,
                       vocab_size: int, max_length: int, hidden_act: str | None, layer: str, dropout: float) -> None:
        def fail(message: str) -> None:
            raise ValueError(f"conditioner '{self.name}': {message}")

        if layout not in LAYOUTS:
            fail(f"unknown layout '{layout}'; valid values: {', '.join(LAYOUTS)}")
        if layer not in LAYERS:
            fail(f"unknown layer '{layer}'; valid values: {', '.join(LAYERS)}")
        if hidden_act is not None and hidden_act not in HIDDEN_ACTS:
            fail(f"unknown hidden_act '{hidden_act}'; valid values: {', '.join(HIDDEN_ACTS)}")
        for option, value in (("context_dim", width), ("heads", heads), ("vocab_size", vocab_size)):
            if int(value) < 1:
                fail(f"{option} must be a positive integer; got {value}")
        if intermediate_size is not None and int(intermediate_size) < 1:
            fail(f"intermediate_size must be a positive integer or None (4 * context_dim); got {intermediate_size}")
        if width % heads:
            fail(f"context_dim {width} must be divisible by heads {heads}")
        if layers < (2 if layer == "penultimate" else 1):
            fail(f"layer '{layer}' needs at least {2 if layer == 'penultimate' else 1} layers; got layers={layers}")
        if max_length < 2:
            fail(f"max_length must be at least 2 (start and end tokens); got {max_length}")
        if not 0.0 <= dropout <= 1.0:
            fail(f"dropout is a probability in [0, 1]; got {dropout}")

    @property
    def tower(self) -> CLIPTextTransformer | OpenCLIPTextTower:
        return self.transformer if self.layout == "clip" else self.model

    @property
    def tokenizer(self) -> CLIPTokenizer:
        if self._tokenizer is None:
            self._tokenizer = CLIPTokenizer(context_length=self.max_length, pad_id=self.pad_id)
        return self._tokenizer

    @property
    def outputs(self) -> dict[str, int]:
        return {"crossattn": self.width, **({"vector": self.projection_dim} if self.pooled else {})}

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts -> token ids (B, max_length) on the module's device."""
        return self.tokenizer(prompts).to(self.device)

    def encode_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B, max_length) -> the hidden state of `layer` (B, max_length, width), final-normed
        unless `final_norm` is off."""
        return self.encode(input_ids)["crossattn"]

    def encode(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Token ids (B, max_length) -> this conditioner's outputs: "crossattn", and "vector" when `pooled`."""
        if input_ids.device.type != "meta" and input_ids.numel():
            low, high = int(input_ids.min()), int(input_ids.max())
            known = self.tower.token_embedding.num_embeddings if self.layout == "openclip" else \
                self.tower.embeddings.token_embedding.num_embeddings  # the vocabulary and any added words
            if low < 0 or high >= known:
                raise ValueError(f"conditioner '{self.name}': token ids must lie in 0..{known - 1} "
                                 f"(vocab_size); got ids {low}..{high}")
        tower, input_ids = self.tower, input_ids.to(self.device)
        norm = tower.final_layer_norm if self.layout == "clip" else tower.ln_final
        if self.pooled:  # one pass to the last layer, keeping `layer`'s output on the way
            hidden, last = tower(input_ids, layer=LAYERS[self.layer], return_last=True)
            # EOS is the largest id, so its position is the argmax, unless added words' ids lie beyond it.
            ends = (input_ids == self.tokenizer.eos_id).int().argmax(dim=-1) if self.tokenizer.added \
                else input_ids.argmax(dim=-1)
            end = norm(last)[torch.arange(last.shape[0], device=last.device), ends]
            if self.layout == "openclip":
                end = end @ tower.text_projection
            elif hasattr(self, "text_projection"):
                end = self.text_projection(end)
            outputs = {"vector": end}  # (B, projection_dim)
        else:
            hidden, outputs = tower(input_ids, layer=LAYERS[self.layer]), {}  # (B, L, D)
        return {"crossattn": norm(hidden) if self.final_norm else hidden, **outputs}

    # ---- words added by textual inversion (latentgen.adapters.embedding) ----------------------------------

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.tower.token_embedding if self.layout == "openclip" else self.tower.embeddings.token_embedding

    def add_word(self, word: str, vectors: torch.Tensor) -> None:
        """Make `word` in a prompt stand for `vectors` (n, width): n new token ids after the vocabulary (and
        after words added before), their rows appended to the token embedding. Undone by `remove_word`."""
        embedding = self.token_embedding
        if vectors.ndim != 2 or vectors.shape[1] != embedding.embedding_dim:
            raise ValueError(f"conditioner '{self.name}': vectors for '{word}' must be (n, {embedding.embedding_dim}); "
                             f"got {tuple(vectors.shape)}")
        if word in self.tokenizer.added:
            raise ValueError(f"conditioner '{self.name}': the word '{word}' is already added; detach the embedding "
                             f"that added it first")
        first = embedding.num_embeddings
        self._added_weights.append(embedding.weight)  # restored as the same Parameter object on removal
        grown = torch.cat([embedding.weight.detach(), vectors.to(embedding.weight)])
        embedding.weight = nn.Parameter(grown, requires_grad=embedding.weight.requires_grad)
        embedding.num_embeddings = grown.shape[0]
        self.tokenizer.added[word] = list(range(first, grown.shape[0]))

    def remove_word(self, word: str) -> None:
        """Undo `add_word(word)`; it must be the last word added (adapters are removed in reverse order)."""
        if word not in self.tokenizer.added:
            return
        if list(self.tokenizer.added)[-1] != word:
            raise ValueError(f"conditioner '{self.name}': remove the words added after '{word}' first")
        del self.tokenizer.added[word]
        embedding = self.token_embedding
        embedding.weight = self._added_weights.pop()
        embedding.num_embeddings = embedding.weight.shape[0]

    def _prompts(self, batch: Mapping[str, Any]) -> list[str]:
        self.check_inputs(batch)
        prompts = batch[self.input_keys[0]]
        return [prompts] if isinstance(prompts, str) else list(prompts)

    def forward(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        return self.encode(self.tokenize(self._prompts(batch)))  # crossattn (B, L, D) [, vector (B, P)]

    def unconditional(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The encoding of the empty prompt for every item (what SD uses for classifier-free guidance), or
        zeros of the same shapes with `zero_unconditional`."""
        count = len(self._prompts(batch))
        empty = self.encode(self.tokenize([""]))  # each (1, ...)
        return {key: (torch.zeros_like(value) if self.zero_unconditional else value).repeat(count, *[1] * (value.ndim - 1))
                for key, value in empty.items()}

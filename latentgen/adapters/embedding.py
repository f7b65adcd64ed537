"""Textual inversion (Gal et al. 2023, "An Image is Worth One Word"): a file of learned token vectors that a
trigger word in a prompt expands to.

    emb = registry.build("adapter", "embedding", path="my-style.pt")        # trigger word: the file's stem
    pipe.attach(emb); pipe("a cat, my-style")

Files read: A1111 `.pt` (`string_to_param["*"]`, read with torch.load(weights_only=True), so a pickle that
needs code to unpickle is refused rather than run), A1111 / civitai `.safetensors` (`emb_params`), diffusers
(`{"<token>": vectors}`), and SDXL pairs (`clip_l` (n, 768) and `clip_g` (n, 1280)): each set of vectors goes
to the CLIP text tower of its width, and every tower of the pipeline must get one.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from latentgen.contracts.adapter import Adapter
from latentgen.errors import AdapterError


class TextualInversion(Adapter):
    """A1111 / diffusers textual-inversion embedding (SD v1, v2, SDXL's clip_l/clip_g pairs)."""

    def __init__(self, path: str | Path, token: str | None = None):
        self.path = Path(path)
        self.vectors = read_embedding(self.path)  # {"clip_l": (n, 768), ...} or {"": (n, width)}
        self.token = token if token is not None else self._default_token()
        if not isinstance(self.token, str) or not self.token.strip() or any(c.isspace() for c in self.token):
            raise ValueError(f"embedding: token={self.token!r} must be one word without spaces (the trigger word "
                             f"a prompt uses)")
        self._added: list[Any] = []

    def _default_token(self) -> str:
        return self.vectors.pop("__token__") if "__token__" in self.vectors else self.path.stem

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "path": str(self.path), "token": self.token}

    def _assignment(self, pipeline) -> list[tuple[Any, torch.Tensor]]:
        from latentgen.conditioners.clip_text import CLIPTextConditioner

        towers = [module for module in pipeline.conditioner.modules() if isinstance(module, CLIPTextConditioner)]
        if not towers:
            raise AdapterError(f"embedding '{self.path.name}' adds a word to CLIP text towers; this pipeline's "
                               f"conditioner '{pipeline.conditioner.name}' has none")
        widths = {name: tuple(vectors.shape) for name, vectors in self.vectors.items()}
        plan, free = [], dict(self.vectors)
        for tower in towers:
            width = tower.token_embedding.embedding_dim
            match = next((name for name, vectors in free.items() if vectors.shape[1] == width), None)
            if match is None:
                raise AdapterError(f"embedding '{self.path.name}' has vectors {widths or 'none'}, none for this "
                                   f"pipeline's {width}-wide text tower ('{tower.name}'; the towers are "
                                   f"{[t.token_embedding.embedding_dim for t in towers]} wide). It was made for another "
                                   f"model (768: SD v1, 1024: SD v2, clip_l 768 + clip_g 1280: SDXL)")
            plan.append((tower, free.pop(match)))
            if tower.tokenizer.added.get(self.token) is not None:
                raise AdapterError(f"the word '{self.token}' is already added by another embedding; pass token=... to "
                                   f"give this one another trigger word")
        return plan

    def check(self, pipeline) -> None:
        self._assignment(pipeline)

    def apply(self, pipeline) -> None:
        for tower, vectors in self._assignment(pipeline):
            tower.add_word(self.token, vectors)
            self._added.append(tower)

    def remove(self, pipeline) -> None:
        for tower in reversed(self._added):
            tower.remove_word(self.token)
        self._added.clear()


def read_embedding(path: Path) -> dict[str, torch.Tensor]:
    """The vectors of an embedding file by tower name ("clip_l", "clip_g", or "" for a one-tower file), each
    (n, width) float32; "__token__" holds a diffusers file's own token."""
    if not path.is_file():
        raise AdapterError(f"embedding file '{path}' does not exist; check the path")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            data: Any = load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types for a corrupt header
            raise AdapterError(f"embedding file '{path}' cannot be read as safetensors: {exc}") from None
    else:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            reason = next((line.strip() for line in str(exc).splitlines() if "Unsupported global" in line),
                          "a pickle that is not plain tensors")
            raise AdapterError(f"embedding file '{path}' needs code to unpickle ({reason}); "
                               f"latentgen does not run code from files. Convert it to .safetensors with a tool you "
                               f"trust") from None
        except Exception as exc:  # a truncated or foreign file
            raise AdapterError(f"embedding file '{path}' cannot be read: {type(exc).__name__}: {exc}") from None
    vectors = _vectors(data, path)
    for name, tensor in vectors.items():
        if name == "__token__":
            continue
        if not torch.is_floating_point(tensor) or not bool(torch.isfinite(tensor).all()):
            raise AdapterError(f"embedding file '{path}': the vectors {name or ''} are not finite floats")
    return vectors


def _vectors(data: Any, path: Path) -> dict[str, Any]:
    if not isinstance(data, dict) or not data:
        raise AdapterError(f"embedding file '{path}' holds no vectors (an empty or foreign file)")
    if "string_to_param" in data:  # A1111 .pt
        params = data["string_to_param"]
        if not isinstance(params, dict) or not params:
            raise AdapterError(f"embedding file '{path}': string_to_param is empty")
        return {"": _matrix(next(iter(params.values())), path)}
    if "clip_l" in data or "clip_g" in data:  # SDXL
        return {name: _matrix(data[name], path) for name in ("clip_l", "clip_g") if name in data}
    if "emb_params" in data:
        return {"": _matrix(data["emb_params"], path)}
    tensors = {key: value for key, value in data.items() if isinstance(value, torch.Tensor)}
    if len(tensors) == 1:  # diffusers: {"<token>": vectors}
        token, value = next(iter(tensors.items()))
        return {"": _matrix(value, path), "__token__": token}
    raise AdapterError(f"embedding file '{path}' is not a textual-inversion embedding: expected string_to_param "
                       f"(A1111), emb_params, clip_l/clip_g (SDXL) or one tensor (diffusers); got keys "
                       f"{sorted(map(str, data))[:5]}")


def _matrix(value: Any, path: Path) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.ndim not in (1, 2) or value.numel() == 0:
        raise AdapterError(f"embedding file '{path}': expected vectors (n, width); got "
                           f"{tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__}")
    return (value[None] if value.ndim == 1 else value).float()

"""Every dataset item encoded once by the frozen codec, with its conditioning inputs; optionally on disk.

Stage 2 draws its batches from this cache instead of running the encoder at every step. With
`train.denoiser.latent_cache=<path>` the cache is a safetensors file: tensor inputs are stored as
tensors, string inputs (captions) as JSON in the metadata, beside a fingerprint of what produced the
latents (a hash of the codec's weights and its config, the dataset's config, the kept input keys).
A later run reuses the file when the fingerprint matches and rebuilds it, saying why, when not.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch.utils.data import DataLoader, Dataset

from latentgen.checkpoint import load_tensors, read_metadata, save_tensors
from latentgen.errors import CheckpointError

log = logging.getLogger("latentgen.train")

FINGERPRINT_KEY = "latentgen.latent_cache"
STRINGS_KEY = "latentgen.latent_cache.strings"


class LatentCache:
    """latents (N, C, h, w) float32 on the CPU, and inputs: key -> tensor (N, ...) or list of N strings."""

    def __init__(self, latents: torch.Tensor, inputs: dict[str, Any]):
        self.latents = latents
        self.inputs = inputs

    @classmethod
    @torch.no_grad()
    def encode(cls, codec, dataset: Dataset, keep: tuple[str, ...], device: torch.device,
               batch_size: int = 256) -> "LatentCache":
        """Deterministic encodings (the posterior mean for a KL codec) of every item, in dataset order."""
        latents, inputs = [], {key: [] for key in keep}
        for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, generator=torch.Generator()):
            latents.append(codec.encode(batch["image"].to(device)).float().cpu())
            for key in keep:
                if key not in batch:
                    raise KeyError(f"the conditioner reads '{key}' but the dataset's items have only {sorted(batch)}")
                inputs[key].append(batch[key])
        joined = {key: torch.cat(values) if isinstance(values[0], torch.Tensor) else [v for part in values for v in part]
                  for key, values in inputs.items()}
        return cls(torch.cat(latents), joined)

    def __len__(self) -> int:
        return self.latents.shape[0]

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        inputs = {key: value[indices] if isinstance(value, torch.Tensor) else [value[i] for i in indices.tolist()]
                  for key, value in self.inputs.items()}
        return self.latents[indices], inputs

    # ---- on disk ------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike, fingerprint: Mapping[str, Any]) -> Path:
        tensors = {"latents": self.latents}
        strings: dict[str, list[str]] = {}
        for key, value in self.inputs.items():
            if isinstance(value, torch.Tensor):
                tensors[f"inputs.{key}"] = value
            elif all(isinstance(item, str) for item in value):
                strings[key] = list(value)
            else:
                kinds = sorted({type(item).__name__ for item in value})
                raise TypeError(f"the latent cache stores tensor and string inputs; '{key}' holds {kinds}. "
                                f"Set train.denoiser.latent_cache=null to keep the cache in memory")
        return save_tensors(path, tensors, {FINGERPRINT_KEY: dict(fingerprint), STRINGS_KEY: strings})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LatentCache":
        metadata = read_metadata(path)
        tensors = load_tensors(path)
        inputs: dict[str, Any] = {key.removeprefix("inputs."): value for key, value in tensors.items()
                                  if key.startswith("inputs.")}
        inputs.update(json.loads(metadata.get(STRINGS_KEY, "{}")))
        return cls(tensors["latents"], inputs)

    @classmethod
    def load_or_encode(cls, path: str | os.PathLike, codec, dataset: Dataset, dataset_config: Mapping[str, Any],
                       keep: tuple[str, ...], device: torch.device, write: bool = True) -> "LatentCache":
        """The cache at `path` when its fingerprint matches this codec, dataset and keys; else encode
        and (if `write`) save it there. Processes other than the writer pass write=False after it has."""
        path = Path(path)
        if path.is_dir():
            raise ValueError(f"train.denoiser.latent_cache '{path}' is a directory; give a file path in it, e.g. "
                             f"{path / 'latents.safetensors'}")
        fingerprint = cache_fingerprint(codec, dataset_config, keep)
        reason = _stale(path, fingerprint)
        if reason is None:
            log.info("latent cache: reusing %s", path)
            return cls.load(path)
        cache = cls.encode(codec, dataset, keep, device)
        if write:
            log.info("latent cache: %s; encoding the dataset into %s", reason, path)
            cache.save(path, fingerprint)
        return cache


def cache_fingerprint(codec, dataset_config: Mapping[str, Any], keep: tuple[str, ...]) -> dict[str, Any]:
    """What the cached latents depend on, JSON-able."""
    from latentgen.assembly import component_config

    return {"version": 1, "codec_weights": weights_hash(codec), "codec": component_config("codec", codec),
            "scale_factor": float(codec.scale_factor), "dataset": json.loads(json.dumps(dataset_config, default=str)),
            "keys": list(keep)}


def weights_hash(module: torch.nn.Module) -> str:
    """sha256 over the names, dtypes, shapes and bytes of a module's state dict."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _stale(path: Path, fingerprint: Mapping[str, Any]) -> str | None:
    """Why the file at `path` cannot be reused (None when it can)."""
    if not path.exists():
        return "no cache file yet"
    try:
        stored = json.loads(read_metadata(path).get(FINGERPRINT_KEY, "null"))
    except (CheckpointError, json.JSONDecodeError) as exc:
        return f"the existing file is unreadable ({exc})"
    if not isinstance(stored, dict):
        return "the existing file is not a latent cache"
    changed = [key for key in fingerprint if stored.get(key) != fingerprint[key]]
    if changed:
        names = {"codec_weights": "codec weights", "codec": "codec config", "scale_factor": "codec scale_factor",
                 "dataset": "dataset config", "keys": "conditioning inputs", "version": "cache format"}
        return "the cached file was built with different " + ", ".join(names.get(key, key) for key in changed)
    return None

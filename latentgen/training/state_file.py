"""Nested training state (state dicts, optimizer state, RNG states, counters) in one safetensors file.

Every tensor is stored under its path in the nesting (`trainer/optimizer/state/3/exp_avg`); the
structure with everything that is not a tensor (numbers, strings, lists, tuples, dicts with int keys)
is JSON in the header metadata, each tensor replaced by a reference. So the state is plain data, never
a pickle, and it is written atomically like a checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from latentgen.checkpoint import load_tensors, read_metadata, save_tensors
from latentgen.errors import CheckpointError

STRUCTURE_KEY = "latentgen.training_state"


def flatten(state: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """(tensors by path, JSON-able structure referring to them)."""
    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()

    def encode(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            value = value.detach()
            # safetensors refuses tensors that share memory (e.g. tied weights): store a copy.
            pointer = value.untyped_storage().data_ptr() if value.numel() else -1
            if pointer in storages:
                value = value.clone()
            elif pointer != -1:
                storages.add(pointer)
            tensors[path] = value
            return {"__tensor__": path}
        if isinstance(value, Mapping):
            return {"__dict__": [[_key(key, path), encode(item, f"{path}/{key}")] for key, item in value.items()]}
        if isinstance(value, tuple):
            return {"__tuple__": [encode(item, f"{path}/{i}") for i, item in enumerate(value)]}
        if isinstance(value, list):
            return [encode(item, f"{path}/{i}") for i, item in enumerate(value)]
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"training state at '{path}' holds a {type(value).__name__}, which cannot be saved as data")

    return tensors, encode(state, "state")


def _key(key: Any, path: str) -> Any:
    if key is None or isinstance(key, (bool, int, float, str)):
        return key
    raise TypeError(f"training state at '{path}' has a dict key of type {type(key).__name__}")


def unflatten(structure: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(structure, dict):
        if "__tensor__" in structure:
            return tensors[structure["__tensor__"]]
        if "__tuple__" in structure:
            return tuple(unflatten(item, tensors) for item in structure["__tuple__"])
        return {key: unflatten(item, tensors) for key, item in structure["__dict__"]}
    if isinstance(structure, list):
        return [unflatten(item, tensors) for item in structure]
    return structure


def save_state(path: str | os.PathLike, state: Any, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write `state` (atomically) with extra JSON metadata beside it."""
    tensors, structure = flatten(state)
    return save_tensors(path, tensors, {STRUCTURE_KEY: structure, **(metadata or {})})


def load_state(path: str | os.PathLike) -> tuple[Any, dict[str, str]]:
    """(state, metadata strings) as `save_state` wrote them."""
    metadata = read_metadata(path)
    if STRUCTURE_KEY not in metadata:
        raise CheckpointError(f"'{path}' is not a latentgen training state (no '{STRUCTURE_KEY}' metadata)")
    try:
        structure = json.loads(metadata[STRUCTURE_KEY])
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"training state '{path}' has corrupt metadata: {exc}") from exc
    return unflatten(structure, load_tensors(path)), metadata

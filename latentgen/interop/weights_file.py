"""Reading a single-file checkpoint (.safetensors or .ckpt) tensor by tensor, without a second full copy.

A `.safetensors` tensor is read from its byte range when asked for, with a positioned read into a
fresh buffer rather than through a memory map: pages of a mapped file stay resident (and count in the
process's RSS) for as long as the map is open, so loading a 2 GiB fp16 file into bf16 weights would
hold both copies at once. A `.ckpt` is opened with `torch.load(weights_only=True, mmap=True)`, which
refuses any pickle that would run code. Either way `tensor(key, dtype)` casts straight to the target
dtype, so an fp16 file becomes a bf16 model without an fp32 detour.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Iterable

import torch

from latentgen.checkpoint import SAFETENSORS_DTYPES as _SAFETENSORS_DTYPES
from latentgen.checkpoint import read_header
from latentgen.errors import CheckpointError


class WeightsFile:
    """The tensors of one checkpoint file, by key, loaded lazily."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise CheckpointError(f"checkpoint '{self.path}' does not exist; check the path")
        self._ranges: dict[str, tuple[int, int]] | None = None  # safetensors: key -> absolute byte range
        self._state: dict[str, torch.Tensor] | None = None
        self.metadata: dict[str, str] = {}  # a safetensors file's string metadata
        self._buffer: torch.Tensor | None = None  # staging for reads that cast or change layout
        if self._is_safetensors():
            header = read_header(self.path)  # names truncation and corruption precisely
            self.metadata = dict(header.get("__metadata__") or {})
            entries = {key: entry for key, entry in header.items() if key != "__metadata__"}
            unknown = sorted({entry["dtype"] for entry in entries.values()} - set(_SAFETENSORS_DTYPES))
            if unknown:
                raise CheckpointError(f"'{self.path}' holds tensors of dtype {unknown}, which latentgen cannot read; "
                                      f"convert them to F32, F16 or BF16 with the tool that wrote the file")
            with open(self.path, "rb") as handle:
                data_start = 8 + int.from_bytes(handle.read(8), "little")
            self._shapes = {key: (tuple(entry["shape"]), entry["dtype"]) for key, entry in entries.items()}
            self._ranges = {key: (data_start + entry["data_offsets"][0], data_start + entry["data_offsets"][1])
                            for key, entry in entries.items()}
        else:
            self._state = self._load_pickle()
            self._shapes = {key: (tuple(value.shape), str(value.dtype)) for key, value in self._state.items()}

    def _is_safetensors(self) -> bool:
        with open(self.path, "rb") as handle:
            prefix = handle.read(8)
        if self.path.suffix == ".safetensors":
            return True
        return len(prefix) == 8 and not zipfile.is_zipfile(self.path) and prefix[:1] != b"\x80"

    def _load_pickle(self) -> dict[str, torch.Tensor]:
        try:
            try:
                state = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                # A pre-zip (legacy) torch.save file cannot be memory-mapped: read it whole.
                state = torch.load(self.path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise CheckpointError(
                f"'{self.path}' is a pickle that needs code execution to load ({str(exc).splitlines()[0][:200]}); "
                f"latentgen refuses to run it. Convert it to .safetensors with the tool that made it, or load a "
                f".safetensors copy"
            ) from exc
        except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as exc:
            raise CheckpointError(f"'{self.path}' is not a readable checkpoint (truncated or corrupt .ckpt?): {exc}") from exc
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]  # the Lightning wrapper of the original training code
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"'{self.path}' does not hold a dict of tensors (found {type(state).__name__})")
        return state

    def keys(self) -> list[str]:
        return list(self._shapes)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key][0]

    def dtype_name(self, key: str) -> str:
        return self._shapes[key][1]

    def dtype(self, key: str) -> torch.dtype:
        return self._state[key].dtype if self._state is not None else _SAFETENSORS_DTYPES[self._shapes[key][1]]

    def __contains__(self, key: str) -> bool:
        return key in self._shapes

    def tensor(self, key: str, dtype: torch.dtype | None = None, channels_last: bool = False) -> torch.Tensor:
        """The tensor `key`, cast to `dtype` (floating point only) and, if 4-D and `channels_last`, in that
        memory format."""
        if self._ranges is None:
            value = self._state[key]
            if dtype is not None and value.dtype.is_floating_point and value.dtype != dtype:
                value = value.to(dtype)
            return value.contiguous(memory_format=torch.channels_last) if channels_last and value.ndim == 4 else value
        shape, dtype_name = self._shapes[key]
        stored = _SAFETENSORS_DTYPES[dtype_name]
        target = dtype if dtype is not None and stored.is_floating_point else stored
        layout = torch.channels_last if channels_last and len(shape) == 4 else torch.contiguous_format
        if target == stored and layout == torch.contiguous_format:
            return self._read(key)  # straight into the tensor's own memory
        # Read through one reused staging buffer into the final tensor: a fresh buffer per tensor, freed after
        # the cast, leaves holes in the C heap that kept a 6.9 GB SDXL load 0.8 GiB above its weights.
        out = torch.empty(shape, dtype=target).contiguous(memory_format=layout)
        return out.copy_(self._read(key, staging=True))

    def _staging(self, size: int) -> torch.Tensor:
        """A byte buffer of at least `size`, kept for the next read: sized once to the file's largest tensor."""
        if self._buffer is None:
            self._buffer = torch.empty(max(end - begin for begin, end in self._ranges.values()), dtype=torch.uint8)
        return self._buffer[:size]

    def _read(self, key: str, staging: bool = False) -> torch.Tensor:
        """One safetensors tensor, read from its byte range into memory it owns (or, with `staging`, into the
        reused staging buffer: valid until the next staged read)."""
        begin, end = self._ranges[key]
        shape, dtype_name = self._shapes[key]
        raw = self._staging(end - begin) if staging else torch.empty(end - begin, dtype=torch.uint8)
        buffer, read = memoryview(raw.numpy()), 0
        with open(self.path, "rb") as handle:
            while read < len(buffer):  # one read returns at most ~2 GiB on Linux
                count = os.preadv(handle.fileno(), [buffer[read:]], begin + read)
                if count == 0:
                    raise CheckpointError(f"'{self.path}' ended while reading '{key}' (got {read} of {end - begin} "
                                          f"bytes); the file is truncated or changed while loading")
                read += count
        return raw.view(_SAFETENSORS_DTYPES[dtype_name]).view(shape)

    def tensors(self, keys: Iterable[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        return {key: self.tensor(key, dtype) for key in keys}

    def release(self) -> None:
        """Drop the staging buffer (a loader calls this when it has read what it needs)."""
        self._buffer = None

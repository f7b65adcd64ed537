"""latentgen checkpoint files: safetensors weights with the resolved config and component provenance, and
the safetensors reading and atomic writing every format and the trainer share.

A checkpoint is one `.safetensors` file (the format `latentgen`, latentgen.formats.native). Its tensors are the state dicts of the pipeline's modules
under the prefixes `codec.`, `denoiser.` and `conditioner.`; its header metadata holds JSON under
`latentgen.config` (everything needed to rebuild the components through the registry) and
`latentgen.components` (which distribution and version provided each one). No code is pickled.
Files are written atomically: a crash mid-write leaves the previous file intact.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from latentgen.errors import CheckpointError

# safetensors dtype names -> torch dtypes (https://github.com/huggingface/safetensors, format spec).
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}

FORMAT_KEY = "latentgen.format"
FORMAT_VERSION = "1"
CONFIG_KEY = "latentgen.config"
COMPONENTS_KEY = "latentgen.components"


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Run `write(tmp)` on a temporary file beside `path`, then rename it over `path`.

    The rename is atomic on POSIX, so readers see the old file or the new one, never a partial one;
    if `write` fails the temporary file is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would hide the file from everyone else
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove_stale_temporaries(*directories: Path) -> list[Path]:
    """Delete the temporary files `atomic_write` leaves when a process is killed mid-write (`.<name>.*.tmp`);
    only for a directory this process owns, where no write of its own is under way."""
    stale = [path for directory in directories if Path(directory).is_dir()
             for path in Path(directory).glob(".*.tmp") if path.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]) -> Path:
    """Write tensors and JSON-encoded metadata to a safetensors file, atomically."""
    from safetensors.torch import save_file

    header = {key: value if isinstance(value, str) else json.dumps(value) for key, value in metadata.items()}
    plain, storages = {}, set()
    for key, value in tensors.items():
        value = value.detach().contiguous().cpu()
        storage = value.untyped_storage().data_ptr()
        # safetensors refuses tensors sharing memory (a tied weight under two names): each gets its own copy
        plain[key] = value.clone() if storage in storages and value.numel() else value
        storages.add(storage)
    return atomic_write(path, lambda tmp: save_file(plain, str(tmp), metadata=header))


def read_header(path: Path) -> dict:
    """The safetensors JSON header, with errors that say what is wrong with the file."""
    if not path.exists():
        raise CheckpointError(f"checkpoint '{path}' does not exist; check the path (a training run writes "
                              f"<run dir>/checkpoints/last.safetensors)")
    if path.is_dir():
        raise CheckpointError(f"checkpoint '{path}' is a directory; pass the .safetensors file inside it")
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"checkpoint '{path}' is {size} bytes long: empty or truncated")
        (header_size,) = struct.unpack("<Q", prefix)
        if header_size > min(size - 8, 100_000_000):
            if prefix[:2] == b"PK" or prefix[:1] == b"\x80":
                raise CheckpointError(f"'{path}' is a pickle/zip file (a .ckpt), not safetensors; latentgen "
                                      f"checkpoints are .safetensors files")
            raise CheckpointError(f"'{path}' is not a safetensors file, or its header is truncated "
                                  f"(header claims {header_size} bytes, file has {size})")
        try:
            header = json.loads(handle.read(header_size))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"'{path}' has a corrupt safetensors header: {exc}") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"'{path}' has a corrupt safetensors header: not a JSON object")
    end = max((_entry_end(key, entry, path) for key, entry in header.items() if key != "__metadata__"), default=0)
    if 8 + header_size + end > size:
        raise CheckpointError(
            f"checkpoint '{path}' is truncated: its header describes {8 + header_size + end} bytes but the "
            f"file has {size}; the file was cut off while copying or writing — use an intact copy"
        )
    return header


def _entry_end(key: str, entry: Any, path: Path) -> int:
    """Where a header entry's bytes end, once its dtype, shape and offsets are checked against each other."""
    try:
        dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not (all(isinstance(n, int) and n >= 0 for n in (*shape, begin, end)) and begin <= end):
            raise ValueError("negative or non-integer sizes")
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"'{path}' has a malformed safetensors header: the entry of tensor '{key}' needs a "
                              f"dtype, a shape and two data_offsets ({type(exc).__name__}: {exc}); the file is "
                              f"corrupt, use an intact copy") from None
    if dtype in SAFETENSORS_DTYPES:
        elements = 1
        for n in shape:
            elements *= n
        if elements * SAFETENSORS_DTYPES[dtype].itemsize != end - begin:
            raise CheckpointError(f"'{path}' has a malformed safetensors header: tensor '{key}' ({dtype}, shape "
                                  f"{shape}) spans {end - begin} bytes, not {elements * SAFETENSORS_DTYPES[dtype].itemsize}; "
                                  f"the file is corrupt, use an intact copy")
    return end


def float_weight_problems(own: Mapping[str, torch.Tensor], dtypes: Mapping[str, torch.dtype]) -> list[str]:
    """'key: int64' for every weight a module holds as floats but a file stores as integers or booleans
    (cast, they would sample garbage without a word)."""
    return [f"{key}: {str(dtypes[key]).removeprefix('torch.')}" for key, value in own.items()
            if key in dtypes and value.is_floating_point() and not dtypes[key].is_floating_point]


def safetensors_header(path: str | os.PathLike) -> dict | None:
    """The header of a readable safetensors file, or None for anything else (what a format's `sniff` needs:
    cheap, and never raising; `read_header` says what is wrong with a file that is not readable)."""
    try:
        return read_header(Path(path))
    except (CheckpointError, OSError):
        return None


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a safetensors file (validated for truncation first)."""
    return dict(read_header(Path(path)).get("__metadata__", {}) or {})


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config, components) of a latentgen checkpoint, or a CheckpointError that says what the file is."""
    path = Path(path)
    header = read_header(path)
    metadata = header.get("__metadata__", {}) or {}
    if CONFIG_KEY not in metadata:
        keys = [key for key in header if key != "__metadata__"]
        raise CheckpointError(
            f"'{path}' is a safetensors file but not a latentgen checkpoint (no '{CONFIG_KEY}' metadata; "
            f"first keys: {keys[:3]}). If another checkpoint format reads it, "
            f"LatentDiffusionPipeline.from_checkpoint finds that format"
        )
    try:
        config = json.loads(metadata[CONFIG_KEY])
        components = json.loads(metadata.get(COMPONENTS_KEY, "{}"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"checkpoint '{path}' has corrupt latentgen metadata: {exc}") from exc
    return config, components


def load_tensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a (validated) safetensors file."""
    from safetensors.torch import load_file

    read_header(Path(path))
    return load_file(str(path), device=str(device))


def mismatch_report(missing: list[str], unexpected: list[str], mismatched: list[str]) -> str:
    """'N missing, first: [...]; N unexpected, ...; N of another shape, ...', or '' when all fit."""
    parts = [f"{len(keys)} {label}, first: {keys[:3]}" for label, keys in
             (("missing", missing), ("unexpected", unexpected), ("of another shape", mismatched)) if keys]
    return "; ".join(parts)


def materialise_empty_buffers(module: torch.nn.Module, what: str) -> None:
    """After a module built on the meta device got its weights: its non-persistent buffers are still on meta.
    Empty ones (placeholders that follow .to()) are made real; one with content cannot be recreated there."""
    for owner in module.modules():
        for name, buffer in list(owner._buffers.items()):
            if buffer is None or not buffer.is_meta:
                continue
            if buffer.numel():
                raise CheckpointError(f"the {what} keeps a computed buffer '{name}' ({tuple(buffer.shape)}) that a "
                                      f"loader building on the meta device cannot recreate; make it persistent")
            owner._buffers[name] = torch.empty(buffer.shape, dtype=buffer.dtype)


def load_module_state(module: torch.nn.Module, state: Mapping[str, torch.Tensor], what: str, path: Path) -> None:
    """load_state_dict(strict) with an error that names the first offending keys and shapes."""
    own = module.state_dict()
    report = mismatch_report(
        [key for key in own if key not in state],
        [key for key in state if key not in own],
        [f"{key}: checkpoint {tuple(state[key].shape)} vs model {tuple(own[key].shape)}"
         for key in own if key in state and state[key].shape != own[key].shape])
    if report:
        raise CheckpointError(f"the {what} weights in '{path}' do not fit its config: {report}")
    wrong = float_weight_problems(own, {key: value.dtype for key, value in state.items()})
    if wrong:
        raise CheckpointError(f"{len(wrong)} {what} weights in '{path}' are not floating point (first: {wrong[:3]}); "
                              f"weights are float32, float16 or bfloat16: the file is corrupt or was converted wrongly")
    module.load_state_dict(state, strict=True)

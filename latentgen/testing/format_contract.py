"""The contract every checkpoint format must honour, as a function a plugin author calls in a test."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from latentgen.contracts.checkpoint_format import CheckpointFormat
from latentgen.testing.shared_rules import REGISTRY_RULE, Subject, registry_rebuild, same

# Files of no format: a format's sniff must say no to each, without raising.
_FOREIGN = {
    "missing.safetensors": None,
    "empty.safetensors": b"",
    "noise.bin": bytes(range(256)) * 4,
    "json.safetensors": b"\x10\x00\x00\x00\x00\x00\x00\x00" + b'{"a": [1, 2, 3]}',
}


def _outputs(pipe: Any) -> dict[str, torch.Tensor]:
    """What a pipeline computes, on fixed inputs: a short seeded sample at a small size, as latents."""
    reads = pipe.conditioner.input_keys
    prompts = ["a red circle", "a blue star"] if "prompt" in reads else None
    labels = [0, 1] if "label" in reads and prompts is None else None
    num_images = 1 if prompts or labels else 2
    # The smallest size the codec and denoiser take (at least 16 pixels), not the pipeline's default:
    # an SDXL pipeline's 1024x1024 would make a format's check take minutes.
    step = int(pipe.codec.downsampling_factor) * int(pipe.denoiser.latent_size_multiple)
    side = step * math.ceil(16 / step)
    size = (side, side)
    latents = pipe(prompts, labels=labels, num_images=num_images, steps=2, seed=0, height=size[0], width=size[1],
                   output_type="latent")
    return {"latents": latents.float()}


def check_format(fmt: CheckpointFormat | Callable[[], CheckpointFormat],
                 pipeline: Callable[[], Any] | None = None, file: str | Path | None = None) -> list[str]:
    """Raise AssertionError, naming the format and the broken rule, unless it:

    says in its docstring which files it reads; answers `sniff` with False, never raising, for files of no
    format (missing, empty, random bytes, a JSON-headed file) and for a directory; and, given `pipeline` (a
    factory of a pipeline this format can hold), saves it (as `model<suffixes[0]>`) to a path it returns, sniffs that file as its
    own, and loads it back (with `device="cpu"`) to a pipeline that computes bitwise the same samples;
    given `file` (one of its files), sniffs and loads it. If built by the registry, it rebuilds through it.

    `fmt` is an instance or a factory of fresh instances. Returns the rules checked.
    """
    subject = Subject("format", fmt)
    first = subject.first
    checked: list[str] = []

    rule = "declared capabilities"
    subject.require(bool(first.summary), rule, "its class docstring must say which files it reads (first line)")
    checked.append(rule)

    rule = "sniff refuses other files"
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name, content in _FOREIGN.items():
            if content is not None:
                (folder / name).write_bytes(content)
            claimed = subject.run(rule, lambda: first.sniff(folder / name))
            subject.require(claimed is False, rule, f"sniff('{name}') gives {claimed!r}, expected False")
        claimed = subject.run(rule, lambda: first.sniff(folder))
        subject.require(claimed is False, rule, f"sniff(<a directory>) gives {claimed!r}, expected False")
    checked.append(rule)

    if pipeline is not None:
        rule = "save, sniff and load round trip"
        original = pipeline()
        expected = _outputs(original)
        with tempfile.TemporaryDirectory() as tmp:
            name = "model" + (first.suffixes[0] if first.suffixes else "")
            written = subject.run(rule, lambda: first.save(original, Path(tmp) / name))
            subject.require(isinstance(written, Path) and written.exists(), rule,
                            f"save returns {written!r}, not the path of the file it wrote")
            subject.require(subject.run(rule, lambda: first.sniff(written)) is True, rule,
                            "sniff does not claim the file its own save wrote")
            loaded = subject.run(rule, lambda: first.load(written, device="cpu"))
            subject.require(same(_outputs(loaded), expected), rule,
                            "the loaded pipeline computes other samples than the saved one")
            told = subject.run(rule, lambda: first.config(written))
            if told is not None:  # optional: the config from the header must be the loaded pipeline's
                parts = {kind: (told.get(kind) or {}).get("name") for kind in ("codec", "denoiser", "conditioner")}
                subject.require(parts == {kind: loaded.config[kind]["name"] for kind in parts}, rule,
                                f"config() tells components {parts}, but the loaded pipeline has others")
        checked.append(rule)

    if file is not None:
        rule = "reads its own files"
        path = Path(file)
        subject.require(subject.run(rule, lambda: first.sniff(path)) is True, rule, f"sniff('{path}') is not True")
        subject.run(rule, lambda: first.load(path, device="cpu"))
        checked.append(rule)

    if registry_rebuild(subject, first) is not None:
        checked.append(REGISTRY_RULE)
    return checked

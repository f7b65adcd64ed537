"""latentgen's own checkpoint format: one safetensors file with the resolved config and component provenance."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Mapping

import torch

from latentgen import registry
from latentgen.checkpoint import (COMPONENTS_KEY, CONFIG_KEY, FORMAT_KEY, FORMAT_VERSION, load_module_state,
                                  load_tensors, read_checkpoint, safetensors_header, save_tensors)
from latentgen.contracts.checkpoint_format import CheckpointFormat
from latentgen.errors import ConfigError
from latentgen.kinds import module_parts, pipeline_parts


class LatentgenFormat(CheckpointFormat):
    """A latentgen checkpoint: a .safetensors file whose metadata holds `latentgen.config`.

    Tensors are the state dicts of the pipeline's modules under `<kind>.`; the metadata holds the
    resolved config (what rebuilds every component through the registry) and which distribution and
    version provided each component. No code is pickled; writes are atomic.
    """

    suffixes = (".safetensors",)

    def sniff(self, path: Path) -> bool:
        header = safetensors_header(path)
        return header is not None and CONFIG_KEY in (header.get("__metadata__") or {})

    def load(self, path: Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
             compile: bool = False) -> Any:
        """`compile=True` compiles the denoiser with torch.compile (`latentgen.fast_path`)."""
        from latentgen.pipeline import LatentDiffusionPipeline

        device = device if device is not None else "cpu"
        config, provenance = read_checkpoint(path)
        _check_provenance(provenance, path)
        pipe = LatentDiffusionPipeline.from_config(config)
        tensors = load_tensors(path, device)
        for kind in module_parts():
            prefix = f"{kind}."
            state = {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}
            load_module_state(getattr(pipe, kind), state, kind, path)
        pipe.to(device).eval()
        if dtype is not None:
            pipe.to(dtype=dtype)
        if compile:  # the channels-last layout was measured only on SD-sized models: left as it is
            from latentgen.fast_path import optimize_for_inference

            optimize_for_inference(pipe, channels_last=False, compile=True)
        return pipe

    def config(self, path: Path, **options: Any) -> dict[str, Any]:
        """The config stored in the header (the options of `load` change nothing in it)."""
        return read_checkpoint(path)[0]

    def save(self, pipeline: Any, path: Path, metadata: Mapping[str, Any] | None = None) -> Path:
        """Weights, config and component versions in one safetensors file, written atomically; `metadata`
        adds entries to the header (JSON-encoded unless strings)."""
        config = pipeline.config  # first: it explains what is missing if a component is not registry-built
        tensors = {f"{kind}.{key}": value for kind in module_parts()
                   for key, value in getattr(pipeline, kind).state_dict().items()}
        provenance = {kind: {"name": getattr(pipeline, kind).registry_name,
                             "distribution": getattr(pipeline, kind).registry_distribution,
                             "version": getattr(pipeline, kind).registry_version} for kind in pipeline_parts()}
        header = {FORMAT_KEY: FORMAT_VERSION, CONFIG_KEY: config, COMPONENTS_KEY: provenance, **(metadata or {})}
        return save_tensors(path, tensors, header)


def _check_provenance(provenance: Mapping[str, Mapping[str, str]], path: Path) -> None:
    """Say which distribution to install when a checkpoint's component is missing; warn on version drift."""
    for kind, info in provenance.items():
        if kind not in pipeline_parts():
            continue
        name, distribution, version = info.get("name"), info.get("distribution"), info.get("version")
        if name not in registry.available(kind):
            raise ConfigError(f"checkpoint '{path}' needs {kind} '{name}' from distribution '{distribution}' "
                              f"{version}, which is not installed here: pip install {distribution}")
        entry = registry.resolve(kind, name)
        if (entry.distribution, entry.version) != (distribution, version):
            warnings.warn(f"checkpoint '{path}' was written with {kind} '{name}' from {distribution} {version}; "
                          f"this environment has {entry.provenance}", stacklevel=3)

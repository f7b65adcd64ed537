"""Stable Diffusion XL single files (base and refiner, the `sgm` layout): reading them into a pipeline tensor by
tensor, telling base from refiner by their keys, and writing a pipeline back in the same layout.

Keys: `model.diffusion_model.*` (the UNet), `first_stage_model.*` (the VAE), `conditioner.embedders.N.*` (the text
towers: `transformer.text_model.*` for CLIP ViT-L, `model.*` for OpenCLIP bigG), N being the position in the
conditioner stack. Buffers some files carry (`denoiser.sigmas`, the CLIP `position_ids`) are passed through.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch

from latentgen.assembly import build_component
from latentgen.checkpoint import (
    CONFIG_KEY,
    safetensors_header,
    save_tensors,
)
from latentgen.errors import CheckpointError, ConfigError
from latentgen.interop.original_config import read_original_config
from latentgen.interop.sgm_config import sgm_pipeline_config, standard_sgm_config
from latentgen.interop.stable_diffusion import (
    PIPELINE_CONFIG_KEY,
    KeyMap,
    SourceFile,
    assemble,
    assign_weights,
    locate_weights,
)
from latentgen.interop.weights_file import WeightsFile
from latentgen.kinds import module_parts
from latentgen.pipeline import LatentDiffusionPipeline

UNET, VAE, EMBEDDERS = "model.diffusion_model.", "first_stage_model.", "conditioner.embedders."
_MEMBERS = 8  # stack positions the key map covers (SDXL uses 5)
SGM_LAYOUT = KeyMap(rules=(
    ("denoiser.", UNET),
    ("codec.", VAE),
    *((f"conditioner.conditioners.{n}.transformer.", f"{EMBEDDERS}{n}.transformer.text_model.") for n in range(_MEMBERS)),
    *((f"conditioner.conditioners.{n}.model.", f"{EMBEDDERS}{n}.model.") for n in range(_MEMBERS)),
))
# A key each family has: the base's CLIP ViT-L at position 0; the refiner's OpenCLIP at position 0.
FAMILY_MARKERS = {"base": EMBEDDERS + "0.transformer.text_model.embeddings.token_embedding.weight",
                  "refiner": EMBEDDERS + "0.model.token_embedding.weight"}
_IGNORED = ("denoiser.sigmas", "embeddings.position_ids", "first_stage_model.loss.")


def is_sdxl_checkpoint(path: str | Path) -> bool:
    """A .safetensors without latentgen metadata holding the sgm layout's UNet and conditioner. Header only."""
    header = safetensors_header(path)
    if header is None or CONFIG_KEY in (header.get("__metadata__") or {}):
        return False
    return any(key.startswith(EMBEDDERS) for key in header) and any(key.startswith(UNET) for key in header)


def infer_family(weights: WeightsFile) -> str:
    """"base" or "refiner" from the text towers' keys."""
    found = [family for family, marker in FAMILY_MARKERS.items() if marker in weights]
    if len(found) != 1:
        raise CheckpointError(f"'{weights.path}' is not an SDXL base or refiner file: expected '{FAMILY_MARKERS['base']}' "
                              f"(base) or '{FAMILY_MARKERS['refiner']}' (refiner); for another model in this layout "
                              f"pass original_config=<its sgm inference YAML>")
    return found[0]


def header_config(path: str | Path, original_config: str | Path | Mapping[str, Any] | None = None) -> dict:
    """latentgen's config for the file: from the sgm YAML given, else the one latentgen recorded when it wrote
    the file, else the released config of the family its keys show. Reads the header only."""
    return _config_and_origin(WeightsFile(path), original_config)[0]


def _config_and_origin(weights: WeightsFile, original_config: str | Path | Mapping[str, Any] | None
                       ) -> tuple[dict, str]:
    """header_config of an open file, and words saying where it came from (for errors)."""
    path = weights.path
    if original_config is not None:
        where = f"'{original_config}'" if isinstance(original_config, (str, Path)) else "the original_config given"
        return sgm_pipeline_config(read_original_config(original_config)), where
    embedded = weights.metadata.get(PIPELINE_CONFIG_KEY)
    if embedded is not None:
        try:
            return json.loads(embedded), "the config latentgen recorded in the file"
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"'{path}' has corrupt {PIPELINE_CONFIG_KEY} metadata ({exc}); pass "
                                  f"original_config=<its sgm inference YAML>") from exc
    family = infer_family(weights)
    return (sgm_pipeline_config(standard_sgm_config(family)),
            f"the released SDXL {family} config (chosen from the file's keys)")


def load_sdxl(path: str | Path, original_config: str | Path | Mapping[str, Any] | None = None,
              dtype: torch.dtype | None = None, device: str | torch.device | None = None, channels_last: bool = True,
              compile: bool = False) -> LatentDiffusionPipeline:
    """A pipeline from an SDXL single file, each tensor read straight into `dtype` (default float32): the
    modules are built on the meta device, so no second copy of the weights is ever made. `channels_last` and
    `compile`: the speed-ups of `latentgen.fast_path.optimize_for_inference`, as for v1/v2 files."""
    weights = WeightsFile(path)
    config, origin = _config_and_origin(weights, original_config)
    with torch.device("meta"):
        modules = {kind: build_component(kind, config[kind]) for kind in module_parts()}
    source = SourceFile(Path(path))
    for kind, module in modules.items():
        located, report = locate_weights(module, kind, SGM_LAYOUT.file_key, weights)
        if report:
            raise CheckpointError(f"the {kind} weights in '{path}' do not match {origin} ({report}); pass the "
                                  f"file's own sgm inference YAML as original_config")
        assign_weights(module, kind, located, weights, dtype or torch.float32, channels_last)
        source.origin.update({f"{kind}.{name}": key for name, key in located.items()})
    weights.release()
    used = set(source.origin.values())
    unexpected = [key for key in weights.keys() if key not in used and key.startswith((UNET, VAE, EMBEDDERS))
                  and not any(part in key for part in _IGNORED)]
    if unexpected:
        raise CheckpointError(f"'{path}' has {len(unexpected)} weight(s) {origin} has no place for, first: "
                              f"{[f'{k} {weights.shape(k)}' for k in unexpected[:3]]}; pass the file's own sgm "
                              f"inference YAML as original_config")
    source.passthrough = [key for key in weights.keys() if key not in used]
    return assemble(modules, config, source, device, channels_last, compile)


def save_sdxl(pipe: LatentDiffusionPipeline, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write the pipeline in the sgm layout (atomically): weights under the keys they were read from, the source
    file's other tensors passed through bit for bit, latentgen's config in the metadata."""
    source: SourceFile | None = getattr(pipe, "source", None)
    origin = source.origin if source is not None else {}
    tensors: dict[str, torch.Tensor] = {}
    for kind in module_parts():
        module = getattr(pipe, kind)
        for name, value in module.state_dict().items():
            key = origin.get(f"{kind}.{name}") or SGM_LAYOUT.file_key(f"{kind}.{name}")
            if key is None:
                raise ConfigError(f"the SDXL layout has no place for the {kind} weight '{name}' of "
                                  f"{kind} '{getattr(module, 'name', type(module).__name__)}'; save this pipeline "
                                  f"with format='latentgen'")
            tensors[key] = value.to(dtype) if dtype is not None and value.is_floating_point() else value
    if not any(key.startswith(UNET) for key in tensors) or not any(key.startswith(EMBEDDERS) for key in tensors):
        raise ConfigError("the SDXL layout holds a UNet and text towers under conditioner.embedders; this pipeline "
                          "has no such parts: save it with format='latentgen'")
    if source is not None and source.passthrough:
        original = WeightsFile(source.path)
        for key in source.passthrough:
            tensors.setdefault(key, original.tensor(key))
    return save_tensors(path, tensors, {PIPELINE_CONFIG_KEY: pipe.config})

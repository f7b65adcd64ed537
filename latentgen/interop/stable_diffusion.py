"""Original Stable Diffusion single-file checkpoints (v1 and v2 families): load them, and write them back.

The original layout puts the UNet under `model.diffusion_model.`, the KL autoencoder under
`first_stage_model.` and the text tower under `cond_stage_model.` (CLIP ViT-L/14 as
`cond_stage_model.transformer.[text_model.]*` for v1, OpenCLIP ViT-H/14 as `cond_stage_model.model.*`
for v2); EMA weights, when kept, sit under `model_ema.` with the dots of their names removed. The
native `unet`, `kl` and `clip_text` components use exactly these parameter names, so loading is a
prefix mapping, checked key by key and shape by shape before any weight is read.

    from latentgen.interop.stable_diffusion import load_pipeline
    pipe = load_pipeline("v1-5.safetensors", dtype=torch.bfloat16)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from latentgen.checkpoint import mismatch_report, save_tensors
from latentgen.errors import CheckpointError, ConfigError
from latentgen.fast_path import optimize_for_inference
from latentgen.interop.original_config import pipeline_config, read_original_config, standard_config
from latentgen.interop.weights_file import WeightsFile
from latentgen.pipeline import LatentDiffusionPipeline, build_component

UNET = "model.diffusion_model."
VAE = "first_stage_model."
TEXT = "cond_stage_model."
EMA = "model_ema."
# Newer tools write the v1 text tower with transformers' `text_model.` level; both load.
HF_TEXT_MODEL = "cond_stage_model.transformer.text_model."
HF_TEXT = "cond_stage_model.transformer."
# Never part of the model: the training loss (LPIPS, discriminator) and the HF position_ids buffer.
_SKIPPED = ("first_stage_model.loss.",)
_POSITION_IDS = ("embeddings.position_ids",)

_FAMILY_MARKERS = {
    "v1": "cond_stage_model.transformer.embeddings.token_embedding.weight",
    "v2": "cond_stage_model.model.token_embedding.weight",
}


@dataclass
class SourceFile:
    """Where each module weight came from, so that export writes it back under the same key and
    passes every other tensor of the file through unchanged."""

    path: Path
    origin: dict[str, str] = field(default_factory=dict)  # "<kind>.<param>" -> key in the file
    passthrough: list[str] = field(default_factory=list)  # keys not loaded into a module


def _normalized(key: str) -> str:
    return HF_TEXT + key[len(HF_TEXT_MODEL):] if key.startswith(HF_TEXT_MODEL) else key


def is_original_checkpoint(path: str | Path) -> bool:
    """A .ckpt, or a .safetensors without latentgen metadata whose keys use the original layout."""
    from latentgen.checkpoint import CONFIG_KEY, read_header

    path = Path(path)
    if path.suffix == ".ckpt":
        return path.exists()
    if not path.is_file() or path.stat().st_size < 8:
        return False
    try:
        header = read_header(path)
    except CheckpointError:
        return False  # let the latentgen reader explain what is wrong with the file
    if CONFIG_KEY in (header.get("__metadata__") or {}):
        return False
    return any(key.startswith((UNET, VAE, TEXT)) for key in header)


def infer_family(weights: WeightsFile) -> str:
    """"v1" or "v2" from the text tower's keys; a clear error for anything else."""
    keys = {_normalized(key) for key in weights.keys()}
    found = [family for family, marker in _FAMILY_MARKERS.items() if marker in keys]
    if len(found) != 1 or not any(key.startswith(UNET) for key in keys):
        sample = sorted(weights.keys())[:5]
        raise CheckpointError(
            f"'{weights.path}' is not a Stable Diffusion v1 or v2 checkpoint: expected '{UNET}*' weights and a text "
            f"tower ('{_FAMILY_MARKERS['v1']}' for v1, '{_FAMILY_MARKERS['v2']}' for v2); first keys: {sample}. For "
            f"another architecture pass original_config=<its inference YAML>"
        )
    return found[0]


def _ema_key(unet_key: str) -> str:
    """The key LitEma stores an UNet parameter under: dots removed from `diffusion_model.<name>`."""
    return EMA + ("diffusion_model." + unet_key[len(UNET):]).replace(".", "")


def _mapped_modules(codec, denoiser, conditioner) -> list[tuple[str, torch.nn.Module, str]]:
    """(kind, module, key prefix in the file) for the three parts of the original layout; the text
    tower may sit inside a stack (inpainting models: text + masked image)."""
    text = conditioner.member("clip_text") if getattr(conditioner, "registry_name", None) == "stack" else conditioner
    names = (getattr(codec, "registry_name", None), getattr(denoiser, "registry_name", None),
             getattr(text, "registry_name", None))
    if names != ("kl", "unet", "clip_text"):
        raise ConfigError(f"the original layout holds a 'kl' codec, a 'unet' denoiser and a 'clip_text' text tower; "
                          f"this pipeline has codec {names[0]!r}, denoiser {names[1]!r}, conditioner "
                          f"{getattr(conditioner, 'registry_name', None)!r}. Save it with pipe.save() instead")
    return [("denoiser", denoiser, UNET), ("codec", codec, VAE), ("conditioner", text, TEXT)]


def load_pipeline(checkpoint: str | Path | WeightsFile, original_config: str | Path | Mapping[str, Any] | None = None,
                  dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                  use_ema: bool | None = None, prediction_type: str | None = None, channels_last: bool = True,
                  compile: bool = False) -> LatentDiffusionPipeline:
    """A pipeline from an original single-file checkpoint (.safetensors, or .ckpt memory-mapped).

    `original_config`: the inference YAML (path or dict); None infers v1 or v2 from the keys (v2 is
    taken as the 768-v model, v-prediction: pass `prediction_type="eps"` for the 512 base model).
    `dtype`: the weights' dtype in memory (default float32), cast tensor by tensor from the file.
    `use_ema`: load `model_ema.*` when present (default: yes, as the original inference does).
    `channels_last`, `compile`: the speed-ups of `latentgen.fast_path.optimize_for_inference`
    (channels-last weights by default; each measured by benchmarks/sd_cpu.py).
    `checkpoint` may also be an open `WeightsFile` (or anything with its `path`, `keys`, `shape`,
    `tensor` and `in`).
    """
    weights = WeightsFile(checkpoint) if isinstance(checkpoint, (str, Path)) else checkpoint
    checkpoint = weights.path
    if original_config is None:
        original = standard_config(infer_family(weights))
        unet_params = original["model"]["params"]["unet_config"]["params"]
        in_key = UNET + "input_blocks.0.0.weight"
        if in_key in weights and weights.shape(in_key)[1] != unet_params["in_channels"]:
            # An inpainting checkpoint: mask and masked-image latents are concatenated to the input.
            unet_params["in_channels"] = weights.shape(in_key)[1]
            original["model"]["params"]["conditioning_key"] = "hybrid"
    else:
        original = read_original_config(original_config)
    config = pipeline_config(original, prediction_type)
    dtype = dtype or torch.float32

    # Build on the meta device: no memory and no random init for weights about to be replaced.
    with torch.device("meta"):
        modules = {kind: build_component(kind, config[kind]) for kind in ("codec", "denoiser", "conditioner")}
    source = SourceFile(Path(checkpoint))
    keys = {_normalized(key): key for key in weights.keys()}
    has_ema = any(key.startswith(EMA) for key in keys)
    use_ema = has_ema if use_ema is None else use_ema
    if use_ema and not has_ema:
        raise CheckpointError(f"use_ema=True but '{checkpoint}' has no '{EMA}*' weights")

    shadowed = set()  # non-EMA UNet weights replaced by their EMA: passed through, not unexpected
    for kind, module, prefix in _mapped_modules(modules["codec"], modules["denoiser"], modules["conditioner"]):
        wanted = module.state_dict()
        located, missing, mismatched = {}, [], []
        for name, expected in wanted.items():
            key = prefix + name
            if kind == "denoiser" and use_ema and _ema_key(key) in keys:
                shadowed.add(keys.get(key, key))
                key = _ema_key(key)
            if key not in keys:
                missing.append(f"{key} {tuple(expected.shape)}")
            elif weights.shape(keys[key]) != tuple(expected.shape):
                mismatched.append(f"{key}: file {weights.shape(keys[key])} vs config {tuple(expected.shape)}")
            else:
                located[name] = keys[key]
        report = mismatch_report(missing, [], mismatched)
        if report:
            raise CheckpointError(f"the {kind} weights in '{checkpoint}' do not match the config ({report}). "
                                  f"Pass the checkpoint's own inference YAML as original_config")
        state = {name: weights.tensor(key, dtype) for name, key in located.items()}
        module.load_state_dict(state, strict=True, assign=True)
        source.origin.update({f"{kind}.{name}": key for name, key in located.items()})

    used = set(source.origin.values())
    unexpected = [key for key in weights.keys()
                  if key not in used and key not in shadowed and _normalized(key).startswith((UNET, VAE, TEXT))
                  and not key.startswith(_SKIPPED) and not key.endswith(_POSITION_IDS)]
    if unexpected:
        raise CheckpointError(
            f"'{checkpoint}' has {len(unexpected)} weight(s) the config has no place for, first: "
            f"{[f'{k} {weights.shape(k)}' for k in unexpected[:3]]}. Pass the checkpoint's own inference YAML as "
            f"original_config"
        )
    source.passthrough = [key for key in weights.keys() if key not in used]

    pipe = LatentDiffusionPipeline(**modules, scheduler=build_component("scheduler", config["scheduler"]),
                                   diffusion=config["diffusion"], sampling=config["sampling"])
    pipe.source = source
    if device is not None:
        pipe.to(device)
    return optimize_for_inference(pipe.eval(), channels_last=channels_last, compile=compile)


def save_original(pipe: LatentDiffusionPipeline, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write the pipeline in the original single-file layout (safetensors), atomically.

    Weights go back under the keys they were loaded from (EMA ones too), and the file's other
    tensors (noise-schedule buffers, unused EMA or non-EMA copies, loss weights) pass through
    unchanged: loading and saving an unmodified checkpoint gives the same tensors bit for bit. A
    pipeline that was not loaded from such a file is written as its model weights alone.
    """
    source: SourceFile | None = getattr(pipe, "source", None)
    origin = source.origin if source is not None else {}
    tensors: dict[str, torch.Tensor] = {}
    for kind, module, prefix in _mapped_modules(pipe.codec, pipe.denoiser, pipe.conditioner):
        for name, value in module.state_dict().items():
            value = value.to(dtype) if dtype is not None and value.is_floating_point() else value
            tensors[origin.get(f"{kind}.{name}", prefix + name)] = value
    if source is not None and source.passthrough:
        original = WeightsFile(source.path)
        for key in source.passthrough:
            if key not in tensors:
                tensors[key] = original.tensor(key)
    return save_tensors(path, tensors, {})

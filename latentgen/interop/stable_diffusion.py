"""Original Stable Diffusion single-file checkpoints (v1 and v2 families): load them, and write them back.

The original layout puts the UNet under `model.diffusion_model.`, the KL autoencoder under
`first_stage_model.` and the text tower under `cond_stage_model.` (CLIP ViT-L/14 as
`cond_stage_model.transformer.text_model.*` for v1, OpenCLIP ViT-H/14 as `cond_stage_model.model.*`
for v2); EMA weights, when kept, sit under `model_ema.` with the dots of their names removed. The
native `unet`, `kl` and `clip_text` components use the same parameter names below those prefixes, so
the mapping is a table of prefixes (`ORIGINAL_LAYOUT`), checked key by key and shape by shape before
any weight is read. The registered format `stable_diffusion` (latentgen.formats.stable_diffusion)
reads and writes through here.

    from latentgen.interop.stable_diffusion import load_pipeline
    pipe = load_pipeline("v1-5.safetensors", dtype=torch.bfloat16)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from latentgen.assembly import build_component
from latentgen.checkpoint import (
    CONFIG_KEY,
    float_weight_problems,
    materialise_empty_buffers,
    mismatch_report,
    safetensors_header,
    save_tensors,
)
from latentgen.errors import CheckpointError, ConfigError
from latentgen.fast_path import optimize_for_inference
from latentgen.interop.original_config import pipeline_config, read_original_config, standard_config
from latentgen.interop.weights_file import WeightsFile
from latentgen.kinds import module_parts
from latentgen.pipeline import LatentDiffusionPipeline

UNET = "model.diffusion_model."
VAE = "first_stage_model."
TEXT = "cond_stage_model."
EMA = "model_ema."
# latentgen's pipeline config, in the metadata of the files it writes: other tools ignore it, and reading
# the file back needs no inference YAML even for a non-standard architecture.
PIPELINE_CONFIG_KEY = "latentgen.pipeline_config"
# Never part of the model: the training loss (LPIPS, discriminator) and the HF position_ids buffer.
_SKIPPED = ("first_stage_model.loss.",)
_POSITION_IDS = ("embeddings.position_ids",)


@dataclass(frozen=True)
class KeyMap:
    """Where a pipeline's weights (`<part>.<parameter>`) live in a foreign file, as data.

    `rules` map pipeline prefixes to file prefixes (the longest matching pipeline prefix wins); `aliases`
    map a file prefix some tools write to the one the rules use, so both read the same.
    """

    rules: tuple[tuple[str, str], ...]
    aliases: tuple[tuple[str, str], ...] = ()

    def file_key(self, pipeline_key: str) -> str | None:
        matches = [(ours, theirs) for ours, theirs in self.rules if pipeline_key.startswith(ours)]
        if not matches:
            return None
        ours, theirs = max(matches, key=lambda rule: len(rule[0]))
        return theirs + pipeline_key[len(ours):]

    def canonical(self, file_key: str) -> str:
        for written, meant in self.aliases:
            if file_key.startswith(written) and not file_key.startswith(meant):
                return meant + file_key[len(written):]
        return file_key


ORIGINAL_LAYOUT = KeyMap(
    rules=(
        ("denoiser.", UNET),
        ("codec.", VAE),
        ("conditioner.transformer.", "cond_stage_model.transformer.text_model."),  # CLIP (v1), as released
        ("conditioner.model.", "cond_stage_model.model."),                         # OpenCLIP (v2)
        # The text tower of an inpainting model, the first member of its stack (text + masked image).
        ("conditioner.conditioners.0.transformer.", "cond_stage_model.transformer.text_model."),
        ("conditioner.conditioners.0.model.", "cond_stage_model.model."),
    ),
    # Some tools write the v1 text tower without transformers' `text_model.` level; both read the same.
    aliases=(("cond_stage_model.transformer.", "cond_stage_model.transformer.text_model."),),
)
# A key only each family's text tower has (in the rules' layout).
FAMILY_MARKERS = {
    "v1": "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
    "v2": "cond_stage_model.model.token_embedding.weight",
}
# What the original file holds besides the text tower: the LDM UNet and the KL autoencoder.
STRUCTURE_MARKERS = {"denoiser": UNET + "input_blocks.0.0.weight", "codec": VAE + "decoder.conv_out.weight"}


@dataclass
class SourceFile:
    """Where each module weight came from, so that export writes it back under the same key and
    passes every other tensor of the file through unchanged."""

    path: Path
    origin: dict[str, str] = field(default_factory=dict)  # "<kind>.<param>" -> key in the file
    passthrough: list[str] = field(default_factory=list)  # keys not loaded into a module


def is_original_checkpoint(path: str | Path) -> bool:
    """A .ckpt (the original training code's pickle, whose keys need unpickling to read), or a .safetensors
    without latentgen metadata that holds an LDM-era text tower (`cond_stage_model.*`; SDXL's sgm layout has
    `conditioner.embedders.*` instead). Reads the header only."""
    path = Path(path)
    if path.suffix == ".ckpt":
        return path.is_file()
    header = safetensors_header(path)
    return (header is not None and CONFIG_KEY not in (header.get("__metadata__") or {})
            and any(key.startswith(TEXT) for key in header))


def infer_family(weights: WeightsFile) -> str:
    """"v1" or "v2" from the text tower's keys; a clear error for anything else."""
    keys = {ORIGINAL_LAYOUT.canonical(key) for key in weights.keys()}
    found = [family for family, marker in FAMILY_MARKERS.items() if marker in keys]
    if len(found) != 1 or not any(key.startswith(UNET) for key in keys):
        sample = sorted(weights.keys())[:5]
        raise CheckpointError(
            f"'{weights.path}' is not a Stable Diffusion v1 or v2 checkpoint: expected '{UNET}*' weights and a text "
            f"tower ('{FAMILY_MARKERS['v1']}' for v1, '{FAMILY_MARKERS['v2']}' for v2); first keys: {sample}. For "
            f"another architecture pass original_config=<its inference YAML>"
        )
    return found[0]


def _ema_key(unet_key: str) -> str:
    """The key LitEma stores an UNet parameter under: dots removed from `diffusion_model.<name>`."""
    return EMA + ("diffusion_model." + unet_key[len(UNET):]).replace(".", "")


def load_pipeline(checkpoint: str | Path | WeightsFile, original_config: str | Path | Mapping[str, Any] | None = None,
                  dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                  use_ema: bool | None = None, prediction_type: str | None = None, channels_last: bool = True,
                  compile: bool = False, reuse_memory: bool = True, pack_weights: bool = True) -> LatentDiffusionPipeline:
    """A pipeline from an original single-file checkpoint (.safetensors, or .ckpt memory-mapped).

    `original_config`: the inference YAML (path or dict); None infers v1 or v2 from the keys (v2 is
    taken as the 768-v model, v-prediction: pass `prediction_type="eps"` for the 512 base model).
    `dtype`: the weights' dtype in memory (default float32), cast tensor by tensor from the file.
    `use_ema`: load `model_ema.*` when present (default: yes, as the original inference does).
    `channels_last`, `compile`, `reuse_memory`, `pack_weights`: the speed-ups of
    `latentgen.fast_path.optimize_for_inference` (by default channels-last weights, convolution weights packed
    for oneDNN, and on the CPU the process keeps its freed memory; `reuse_memory=False` leaves malloc as it is,
    `pack_weights=False` saves the packed copies' memory; measured by benchmarks/sd_cpu.py and
    benchmarks/openvino_side_by_side.py).
    `checkpoint` may also be an open `WeightsFile` (or anything with its `path`, `keys`, `shape`,
    `tensor` and `in`).
    """
    weights = WeightsFile(checkpoint) if isinstance(checkpoint, (str, Path)) else checkpoint
    checkpoint = weights.path
    config = _pipeline_config(weights, original_config, prediction_type)
    dtype = dtype or torch.float32

    # Build on the meta device: no memory and no random init for weights about to be replaced.
    with torch.device("meta"):
        modules = {kind: build_component(kind, config[kind]) for kind in module_parts()}
    source = SourceFile(Path(checkpoint))
    keys = {ORIGINAL_LAYOUT.canonical(key): key for key in weights.keys()}  # the rules' layout -> key in the file
    has_ema = any(key.startswith(EMA) for key in keys)
    use_ema = has_ema if use_ema is None else use_ema
    if use_ema and not has_ema:
        raise CheckpointError(f"use_ema=True but '{checkpoint}' has no '{EMA}*' weights")

    shadowed = set()  # non-EMA UNet weights replaced by their EMA: passed through, not unexpected
    for kind, module in modules.items():
        located, missing, mismatched = {}, [], []
        for name, expected in module.state_dict().items():
            key = _file_key(kind, name, module)
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
        assign_weights(module, kind, located, weights, dtype, channels_last)
        source.origin.update({f"{kind}.{name}": key for name, key in located.items()})

    if isinstance(weights, WeightsFile):
        weights.release()
    used = set(source.origin.values())
    unexpected = [key for key in weights.keys()
                  if key not in used and key not in shadowed and key.startswith((UNET, VAE, TEXT))
                  and not key.startswith(_SKIPPED) and not key.endswith(_POSITION_IDS)]
    if unexpected:
        raise CheckpointError(
            f"'{checkpoint}' has {len(unexpected)} weight(s) the config has no place for, first: "
            f"{[f'{k} {weights.shape(k)}' for k in unexpected[:3]]}. Pass the checkpoint's own inference YAML as "
            f"original_config"
        )
    source.passthrough = [key for key in weights.keys() if key not in used]
    return assemble(modules, config, source, device, channels_last, compile, reuse_memory, pack_weights)


def assemble(modules: Mapping[str, torch.nn.Module], config: Mapping[str, Any], source: SourceFile,
             device: str | torch.device | None, channels_last: bool, compile: bool,
             reuse_memory: bool = True, pack_weights: bool = True) -> LatentDiffusionPipeline:
    """The pipeline of loaded modules, remembering the file they came from (for export), on `device`, with
    the fast path's speed-ups."""
    process = build_component("process", config["process"]) if config.get("process") else None
    pipe = LatentDiffusionPipeline(**modules, scheduler=build_component("scheduler", config["scheduler"]),
                                   diffusion=config.get("diffusion"), sampling=config["sampling"], process=process)
    pipe.source = source
    if device is not None:
        pipe.to(device)
    return optimize_for_inference(pipe.eval(), channels_last=channels_last, compile=compile, reuse_memory=reuse_memory,
                                  pack_weights=pack_weights)


def locate_weights(module: torch.nn.Module, kind: str, file_key: Any, weights: Any) -> tuple[dict[str, str], str]:
    """Each state-dict name of `module` -> its key in `weights` (`file_key(f"{kind}.{name}")`), and a report of
    the keys missing or of another shape ("" when every weight is there)."""
    located, missing, mismatched = {}, [], []
    for name, expected in module.state_dict().items():
        key = file_key(f"{kind}.{name}")
        if key is None or key not in weights:
            missing.append(f"{key or kind + '.' + name} {tuple(expected.shape)}")
        elif weights.shape(key) != tuple(expected.shape):
            mismatched.append(f"{key}: file {weights.shape(key)} vs config {tuple(expected.shape)}")
        else:
            located[name] = key
    return located, mismatch_report(missing, [], mismatched)


def assign_weights(module: torch.nn.Module, kind: str, located: Mapping[str, str], weights: Any,
                   dtype: torch.dtype | None, channels_last: bool) -> None:
    """Give a module built on the meta device its weights: `located` maps each state-dict name to its key in
    `weights`, every one checked floating point, read straight into `dtype` (and, for the denoiser and codec
    with `channels_last`, into optimize_for_inference's layout: no copy is made afterwards)."""
    wrong = float_weight_problems(module.state_dict(), {name: weights.dtype(key) for name, key in located.items()})
    if wrong:
        raise CheckpointError(f"{len(wrong)} {kind} weights in '{weights.path}' are not floating point (first: "
                              f"{wrong[:3]}); the file is corrupt or was converted wrongly")
    # a duck-typed `weights` (anything with path, keys, shape, dtype, tensor) gets the layout afterwards
    layout = {"channels_last": True} if channels_last and kind in ("denoiser", "codec") \
        and isinstance(weights, WeightsFile) else {}
    module.load_state_dict({name: weights.tensor(key, dtype, **layout) for name, key in located.items()},
                           strict=True, assign=True)
    materialise_empty_buffers(module, kind)


def header_config(path: str | Path, original_config: str | Path | Mapping[str, Any] | None = None,
                  prediction_type: str | None = None) -> dict | None:
    """The pipeline config of an original .safetensors file, from its header alone (None for a .ckpt)."""
    if safetensors_header(path) is None:
        return None
    return _pipeline_config(WeightsFile(path), original_config, prediction_type)


def _pipeline_config(weights: WeightsFile, given: str | Path | Mapping[str, Any] | None,
                     prediction_type: str | None) -> dict:
    """latentgen's config for the file: from the inference YAML given, else the one latentgen recorded when
    it wrote the file, else the standard config of the family its keys show."""
    embedded = getattr(weights, "metadata", {}).get(PIPELINE_CONFIG_KEY)
    if given is None and embedded is not None:
        try:
            config = json.loads(embedded)
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"'{weights.path}' has corrupt {PIPELINE_CONFIG_KEY} metadata ({exc}); pass "
                                  f"original_config=<its inference YAML>") from exc
        if prediction_type is not None:
            config["diffusion"]["prediction_type"] = prediction_type
        return config
    return pipeline_config(_original_config(weights, given), prediction_type)


def _original_config(weights: WeightsFile, given: str | Path | Mapping[str, Any] | None) -> dict:
    """The inference config given, or the standard one of the family the keys show."""
    if given is not None:
        return read_original_config(given)
    original = standard_config(infer_family(weights))
    unet_params = original["model"]["params"]["unet_config"]["params"]
    in_key = UNET + "input_blocks.0.0.weight"
    if in_key in weights and weights.shape(in_key)[1] != unet_params["in_channels"]:
        # An inpainting checkpoint: mask and masked-image latents are concatenated to the input.
        unet_params["in_channels"] = weights.shape(in_key)[1]
        original["model"]["params"]["conditioning_key"] = "hybrid"
    return original


def _file_key(kind: str, name: str, module: torch.nn.Module) -> str:
    """The key of a module weight in the original layout; a ConfigError for a weight it has no place for."""
    key = ORIGINAL_LAYOUT.file_key(f"{kind}.{name}")
    if key is None:
        raise ConfigError(f"the original Stable Diffusion layout has no place for the {kind} weight '{name}' of "
                          f"{kind} '{getattr(module, 'name', type(module).__name__)}' (it holds the LDM UNet, the KL "
                          f"autoencoder and a CLIP or OpenCLIP text tower); save this pipeline with format='latentgen'")
    return key


def save_original(pipe: LatentDiffusionPipeline, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write the pipeline in the original single-file layout (safetensors), atomically.

    Weights go back under the keys they were loaded from (EMA ones too), and the file's other
    tensors (noise-schedule buffers, unused EMA or non-EMA copies, loss weights) pass through
    unchanged: loading and saving an unmodified checkpoint gives the same tensors bit for bit. A
    pipeline that was not loaded from such a file is written as its model weights alone, in the
    released layout. A pipeline whose parts do not have the original architecture is refused by name.
    latentgen's config goes into the file's metadata, so that the file loads back without an inference
    YAML whatever its architecture (other tools ignore it).
    """
    source: SourceFile | None = getattr(pipe, "source", None)
    origin = source.origin if source is not None else {}
    tensors: dict[str, torch.Tensor] = {}
    placed = set()  # every weight's key in the rules' layout (whatever key it came from)
    for kind in module_parts():
        module = getattr(pipe, kind)
        for name, value in module.state_dict().items():
            value = value.to(dtype) if dtype is not None and value.is_floating_point() else value
            key = _file_key(kind, name, module)
            placed.add(key)
            tensors[origin.get(f"{kind}.{name}", key)] = value
    _check_structure(pipe, placed)
    if source is not None and source.passthrough:
        original = WeightsFile(source.path)
        for key in source.passthrough:
            if key not in tensors:
                tensors[key] = original.tensor(key)
    return save_tensors(path, tensors, {PIPELINE_CONFIG_KEY: pipe.config})


def _check_structure(pipe: LatentDiffusionPipeline, keys: set[str]) -> None:
    """Refuse to write a file the original layout's readers could not load: the LDM UNet, the KL
    autoencoder and a CLIP or OpenCLIP text tower must all be there."""
    for kind, marker in STRUCTURE_MARKERS.items():
        if marker not in keys:
            raise ConfigError(f"the original Stable Diffusion layout holds the LDM UNet and KL autoencoder, but this "
                              f"pipeline's {kind} '{getattr(pipe, kind).name}' has no weight for '{marker}'; save it "
                              f"with format='latentgen' instead")
    if not any(marker in keys for marker in FAMILY_MARKERS.values()):
        raise ConfigError(f"the original Stable Diffusion layout holds a CLIP (v1) or OpenCLIP (v2) text tower, but "
                          f"this pipeline's conditioner '{pipe.conditioner.name}' has none; save it with "
                          f"format='latentgen' instead")

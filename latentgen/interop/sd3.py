"""Stable Diffusion 3 / 3.5 single files (Stability AI's layout): every size read from key shapes, the text
encoders from the file or from their own files, T5 optional, written back in the same layout.

Keys: `model.diffusion_model.*` (the MMDiT), `first_stage_model.*` (the 16-channel VAE), and, in all-in-one
files, `text_encoders.{clip_l,clip_g,t5xxl}.transformer.*`. The released sd3.5_medium/large files hold only the
first two; their text encoders ship as separate files whose keys lack the `text_encoders.<name>.transformer.`
prefix (`clip_l=`, `clip_g=`, `t5xxl=` load options; files of either naming are read).

The pipeline is made of registered components only: `mmdit`, `kl` (no quant convs; scale 1.5305, shift 0.0609),
`sequence_stack[stack[clip_text L, clip_text G], t5_text | zero_tokens]` (SD3's joint context: the CLIP features
side by side, zero-padded to T5's width, then T5's tokens) and the `rectified_flow` process with shift 3.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from latentgen.assembly import build_component
from latentgen.checkpoint import CONFIG_KEY, safetensors_header, save_tensors
from latentgen.errors import CheckpointError, ConfigError
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

log = logging.getLogger(__name__)

MMDIT, VAE, TEXT = "model.diffusion_model.", "first_stage_model.", "text_encoders."
TOWERS = ("clip_l", "clip_g", "t5xxl")
HEADS_KEY = "latentgen.sd3_text_heads"  # CLIP head counts, which no weight shape gives (written on export)
_CLIP, _T5 = "conditioner.conditioners.0.conditioners.", "conditioner.conditioners.1."
SD3_LAYOUT = KeyMap(rules=(
    ("denoiser.", MMDIT),
    ("codec.", VAE),
    (f"{_CLIP}0.transformer.", f"{TEXT}clip_l.transformer.text_model."),
    (f"{_CLIP}0.text_projection.", f"{TEXT}clip_l.transformer.text_projection."),
    (f"{_CLIP}1.transformer.", f"{TEXT}clip_g.transformer.text_model."),
    (f"{_CLIP}1.text_projection.", f"{TEXT}clip_g.transformer.text_projection."),
    (f"{_T5}transformer.", f"{TEXT}t5xxl.transformer."),
))
# Stability AI's SD3 latent format and sampling settings (sd3_impls.SD3LatentFormat; sd3_infer.CONFIGS).
SCALE_FACTOR, SHIFT_FACTOR = 1.5305, 0.0609
SAMPLING = {"medium": {"steps": 50, "guidance_scale": 5.0}, "large": {"steps": 40, "guidance_scale": 4.5}}
TOKENIZER_NAMES = ("spiece.model", "t5xxl.model", "tokenizer_3/spiece.model", "tokenizer_3/tokenizer.json",
                   "t5_tokenizer.json", "text_encoders/spiece.model")
_IGNORED = ("position_ids", "logit_scale")


def tower_prefix(name: str) -> str:
    return f"{TEXT}{name}.transformer."


def is_sd3_checkpoint(path: str | Path) -> bool:
    """A .safetensors without latentgen metadata holding an MMDiT (`model.diffusion_model.joint_blocks.*`)."""
    header = safetensors_header(path)
    if header is None or CONFIG_KEY in (header.get("__metadata__") or {}):
        return False
    return f"{MMDIT}x_embedder.proj.weight" in header and any(k.startswith(f"{MMDIT}joint_blocks.") for k in header)


class SD3Weights:
    """The main file plus any separate text-encoder files, seen under the all-in-one file's key names (the
    duck type `assign_weights` reads: path, keys, shape, dtype, tensor)."""

    def __init__(self, path: Path, towers: Mapping[str, str | Path | None]):
        self.path = Path(path)
        self.main = WeightsFile(path)
        self.metadata = self.main.metadata
        self._where: dict[str, tuple[WeightsFile, str]] = {key: (self.main, key) for key in self.main.keys()}
        self.files = {"main": self.main}
        for name, tower_path in towers.items():
            if tower_path is None:
                continue
            if name not in TOWERS:
                raise ConfigError(f"SD3 text encoders are {', '.join(TOWERS)}; got '{name}'")
            tower = WeightsFile(tower_path)
            prefix = tower_prefix(name)
            named = {key if key.startswith(prefix) else prefix + key: key for key in tower.keys()}
            marker = {"clip_l": "text_model.embeddings.token_embedding.weight",
                      "clip_g": "text_model.embeddings.token_embedding.weight",
                      "t5xxl": "encoder.block.0.layer.0.SelfAttention.q.weight"}[name]
            if prefix + marker not in named:
                raise CheckpointError(f"{name}='{tower_path}' is not a {name} text encoder: it has no '{marker}' "
                                      f"(first keys: {tower.keys()[:3]}); pass SD3's text_encoders/{name}*.safetensors")
            self.files[name] = tower
            self._where.update({ours: (tower, theirs) for ours, theirs in named.items()})

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> tuple[int, ...]:
        file, theirs = self._where[key]
        return file.shape(theirs)

    def dtype(self, key: str) -> torch.dtype:
        file, theirs = self._where[key]
        return file.dtype(theirs)

    def tensor(self, key: str, dtype: torch.dtype | None = None, **layout: Any) -> torch.Tensor:
        file, theirs = self._where[key]
        return file.tensor(theirs, dtype, **layout)

    def release(self) -> None:
        for file in self.files.values():
            file.release()


def _count(keys: list[str], pattern: str) -> int:
    found = {int(m.group(1)) for key in keys if (m := re.match(pattern, key))}
    if found != set(range(len(found))):
        raise CheckpointError(f"the blocks matching {pattern!r} are not numbered 0..N-1: {sorted(found)}")
    return len(found)


def _shape(weights: SD3Weights, key: str) -> tuple[int, ...]:
    if key not in weights:
        raise CheckpointError(f"'{weights.path}' has no '{key}', which every SD3 file has; the file is not an SD3 / "
                              f"SD3.5 checkpoint or is incomplete")
    return weights.shape(key)


def denoiser_config(weights: SD3Weights) -> dict:
    """The `mmdit` options, each from a key shape (as Stability AI's loader reads them)."""
    keys = [key for key in weights.keys() if key.startswith(MMDIT)]
    hidden, in_channels, patch, _ = _shape(weights, f"{MMDIT}x_embedder.proj.weight")
    depth = _count(keys, re.escape(MMDIT) + r"joint_blocks\.(\d+)\.")
    out = _shape(weights, f"{MMDIT}final_layer.linear.weight")[0]
    positions = _shape(weights, f"{MMDIT}pos_embed")[1]
    side = math.isqrt(positions)
    if side * side != positions:
        raise CheckpointError(f"'{weights.path}': pos_embed has {positions} positions, not a square table")
    vector = f"{MMDIT}y_embedder.mlp.0.weight"
    return {
        "name": "mmdit", "in_channels": in_channels, "out_channels": out // (patch * patch), "patch_size": patch,
        "depth": depth, "hidden_size": hidden, "num_heads": hidden // 64,
        "mlp_ratio": _shape(weights, f"{MMDIT}joint_blocks.0.x_block.mlp.fc1.weight")[0] / hidden,
        "context_dim": _shape(weights, f"{MMDIT}context_embedder.weight")[1],
        "vector_dim": weights.shape(vector)[1] if vector in weights else None,
        "pos_embed_max_size": side,
        "qk_norm": f"{MMDIT}joint_blocks.0.x_block.attn.ln_k.weight" in weights,
        "dual_attention_layers": sorted({int(m.group(1)) for key in keys
                                         if (m := re.match(re.escape(MMDIT) + r"joint_blocks\.(\d+)\.x_block\.attn2\.",
                                                           key))}),
    }


def codec_config(weights: SD3Weights) -> dict:
    """The `kl` options of the 16-channel VAE, from key shapes."""
    keys = [key for key in weights.keys() if key.startswith(VAE)]
    channels = _shape(weights, f"{VAE}encoder.conv_in.weight")[0]
    levels = _count(keys, re.escape(VAE) + r"encoder\.down\.(\d+)\.")
    mult = [_shape(weights, f"{VAE}encoder.down.{i}.block.0.conv2.weight")[0] // channels for i in range(levels)]
    z_channels = _shape(weights, f"{VAE}decoder.conv_in.weight")[1]
    return {"name": "kl", "latent_channels": z_channels, "z_channels": z_channels, "channels": channels,
            "channel_mult": mult, "num_res_blocks": _count(keys, re.escape(VAE) + r"encoder\.down\.0\.block\.(\d+)\."),
            "quant_convs": f"{VAE}quant_conv.weight" in weights, "scale_factor": SCALE_FACTOR,
            "shift_factor": SHIFT_FACTOR}


def clip_config(weights: SD3Weights, name: str, heads: int | None) -> dict:
    """A `clip_text` member for CLIP-L or CLIP-G in transformers' layout, as SD3 uses them: the penultimate
    layer without the final norm, the pooled vector (CLIP-G's through its text_projection)."""
    prefix = tower_prefix(name) + "text_model."
    vocab, width = _shape(weights, f"{prefix}embeddings.token_embedding.weight")
    layers = _count([k for k in weights.keys() if k.startswith(prefix)], re.escape(prefix) + r"encoder\.layers\.(\d+)\.")
    heads = heads if heads is not None else width // 64
    if heads < 1 or width % heads:
        raise ConfigError(f"{name}: {heads} attention heads do not divide its width {width}; pass "
                          f"text_heads={{{name}: <heads>}} (the weights do not say)")
    member = {"name": "clip_text", "layout": "clip", "context_dim": width, "layers": layers, "heads": heads,
              "intermediate_size": _shape(weights, f"{prefix}encoder.layers.0.mlp.fc1.weight")[0],
              "vocab_size": vocab, "max_length": _shape(weights, f"{prefix}embeddings.position_embedding.weight")[0],
              "hidden_act": "quick_gelu" if name == "clip_l" else "gelu", "layer": "penultimate",
              "final_norm": False, "pooled": True, "dropout": 0.0}
    if name == "clip_g":  # the reference pads CLIP-G's ids with 0 and projects its pooled vector
        member.update(pad_id=0, projection_dim=_shape(weights, tower_prefix(name) + "text_projection.weight")[0])
    return member


def t5_config(weights: SD3Weights, tokenizer: str | None) -> dict:
    prefix = tower_prefix("t5xxl")
    embed = f"{prefix}shared.weight" if f"{prefix}shared.weight" in weights else f"{prefix}encoder.embed_tokens.weight"
    vocab, d_model = _shape(weights, embed)
    heads = _shape(weights, f"{prefix}encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")[1]
    layers = _count([k for k in weights.keys() if k.startswith(prefix)], re.escape(prefix) + r"encoder\.block\.(\d+)\.")
    return {"name": "t5_text", "d_model": d_model, "layers": layers, "heads": heads,
            "d_kv": _shape(weights, f"{prefix}encoder.block.0.layer.0.SelfAttention.q.weight")[0] // heads,
            "d_ff": _shape(weights, f"{prefix}encoder.block.0.layer.1.DenseReluDense.wi_0.weight")[0],
            "vocab_size": vocab, "tokenizer": tokenizer, "dropout": 0.0}


def find_tokenizer(path: Path) -> Path | None:
    """A T5 tokenizer file beside the checkpoint (TOKENIZER_NAMES), if any."""
    return next((path.parent / name for name in TOKENIZER_NAMES if (path.parent / name).is_file()), None)


@dataclass
class TextChoice:
    """Which text encoders a load uses: the CLIP heads, whether T5 runs, and its tokenizer."""

    heads: dict[str, int | None]
    t5: bool
    tokenizer: str | None


def _text_choice(weights: SD3Weights, t5: bool | None, t5_tokenizer: str | Path | None,
                 text_heads: Mapping[str, int] | None) -> TextChoice:
    missing = [name for name in ("clip_l", "clip_g") if tower_prefix(name) + "text_model.embeddings.token_embedding"
               ".weight" not in weights]
    if missing:
        raise CheckpointError(f"'{weights.path}' holds no {' and no '.join(missing)} text encoder (the released "
                              f"SD3.5 files ship them separately): pass " + ", ".join(
                                  f"{name}=<text_encoders/{name}.safetensors>" for name in missing))
    recorded = json.loads(weights.metadata.get(HEADS_KEY, "{}"))
    heads = {name: (dict(text_heads or {}).get(name) or recorded.get(name)) for name in ("clip_l", "clip_g")}
    has_t5 = tower_prefix("t5xxl") + "encoder.block.0.layer.0.SelfAttention.q.weight" in weights
    if t5 and not has_t5:
        raise CheckpointError(f"t5=true but '{weights.path}' holds no T5 encoder: pass "
                              f"t5xxl=<text_encoders/t5xxl_fp16.safetensors>, or t5=false (zeros in its place)")
    use_t5 = has_t5 if t5 is None else bool(t5)
    if not use_t5:
        log.info("%s: no T5 (%s): 77 zero tokens in its place", weights.path,
                 "t5=false" if has_t5 else "none in the file; t5xxl=<file> adds it")
    tokenizer = None
    if use_t5:
        found = Path(t5_tokenizer) if t5_tokenizer is not None else find_tokenizer(weights.path)
        if t5_tokenizer is None and found is not None:
            log.info("T5 tokenizer found beside the checkpoint: %s", found)
        if found is None:
            raise ConfigError(f"'{weights.path}' has a T5 encoder but no T5 tokenizer was given or found beside it "
                              f"({', '.join(TOKENIZER_NAMES)}): pass t5_tokenizer=<spiece.model or tokenizer.json of "
                              f"google/t5-v1_1-xxl> (nothing is downloaded), or t5=false to run without T5")
        from latentgen.text.t5_tokenizer import T5Tokenizer

        vocab = _shape(weights, tower_prefix("t5xxl") + "encoder.embed_tokens.weight")[0] \
            if tower_prefix("t5xxl") + "encoder.embed_tokens.weight" in weights else None
        T5Tokenizer(found, vocab_size=vocab)  # its kind and ids checked now, before any weight is read
        tokenizer = str(found)
    return TextChoice(heads, use_t5, tokenizer)


def pipeline_config(weights: SD3Weights, choice: TextChoice) -> dict:
    """latentgen's config for the file: every size from key shapes, the sampling settings of its family."""
    denoiser = denoiser_config(weights)
    clips = [clip_config(weights, name, choice.heads[name]) for name in ("clip_l", "clip_g")]
    t5 = t5_config(weights, choice.tokenizer) if choice.t5 else None
    width = denoiser["context_dim"]
    if sum(member["context_dim"] for member in clips) > width or (t5 is not None and t5["d_model"] != width):
        raise CheckpointError(f"'{weights.path}': the text encoders' widths ({', '.join(str(m['context_dim']) for m in clips)}"
                              f"{', ' + str(t5['d_model']) if t5 else ''}) do not fit the MMDiT's context width {width}")
    tokens = clips[0]["max_length"]
    family = "medium" if denoiser["dual_attention_layers"] else "large"
    return {
        "codec": codec_config(weights),
        "denoiser": denoiser,
        "conditioner": {"name": "sequence_stack", "context_dim": width, "conditioners": [
            {"name": "stack", "conditioners": clips},
            t5 or {"name": "zero_tokens", "width": width, "tokens": tokens}]},
        "scheduler": {"name": "euler"},
        "process": {"name": "rectified_flow", "shift": 3.0},
        "sampling": {"height": 1024, "width": 1024, **SAMPLING[family]},
    }


# The released sizes (Stability AI's sd3.5 repository: MMDiTX built from the file's shapes; sd3_infer's CLIPL_CONFIG,
# CLIPG_CONFIG, T5_CONFIG), for building the full-size models without a file (benchmarks, layout checks).
STANDARD_MMDIT = {"medium": {"depth": 24, "pos_embed_max_size": 384, "dual_attention_layers": list(range(13))},
                  "large": {"depth": 38, "pos_embed_max_size": 192, "dual_attention_layers": []}}


def standard_config(family: str, t5: bool = True, t5_tokenizer: str | None = None) -> dict:
    """latentgen's config of SD3.5 `family` ("medium" or "large") at its released sizes."""
    if family not in STANDARD_MMDIT:
        raise ConfigError(f"SD3.5 families are {', '.join(STANDARD_MMDIT)}; got '{family}'")
    depth = STANDARD_MMDIT[family]["depth"]
    clip = {"name": "clip_text", "layout": "clip", "vocab_size": 49408, "max_length": 77, "layer": "penultimate",
            "final_norm": False, "pooled": True, "dropout": 0.0}
    clips = [{**clip, "context_dim": 768, "layers": 12, "heads": 12, "intermediate_size": 3072,
              "hidden_act": "quick_gelu"},
             {**clip, "context_dim": 1280, "layers": 32, "heads": 20, "intermediate_size": 5120, "hidden_act": "gelu",
              "pad_id": 0, "projection_dim": 1280}]
    t5_member = {"name": "t5_text", "d_model": 4096, "layers": 24, "heads": 64, "d_kv": 64, "d_ff": 10240,
                 "vocab_size": 32128, "tokenizer": t5_tokenizer, "dropout": 0.0} if t5 else \
        {"name": "zero_tokens", "width": 4096, "tokens": 77}
    return {
        "codec": {"name": "kl", "latent_channels": 16, "z_channels": 16, "channels": 128, "channel_mult": [1, 2, 4, 4],
                  "num_res_blocks": 2, "quant_convs": False, "scale_factor": SCALE_FACTOR, "shift_factor": SHIFT_FACTOR},
        "denoiser": {"name": "mmdit", "in_channels": 16, "out_channels": 16, "patch_size": 2, "hidden_size": 64 * depth,
                     "num_heads": depth, "mlp_ratio": 4.0, "context_dim": 4096, "vector_dim": 2048, "qk_norm": True,
                     **STANDARD_MMDIT[family]},
        "conditioner": {"name": "sequence_stack", "context_dim": 4096, "conditioners": [
            {"name": "stack", "conditioners": clips}, t5_member]},
        "scheduler": {"name": "euler"},
        "process": {"name": "rectified_flow", "shift": 3.0},
        "sampling": {"height": 1024, "width": 1024, **SAMPLING[family]},
    }


def header_config(path: str | Path, t5: bool | None = None, t5_tokenizer: str | Path | None = None,
                  text_heads: Mapping[str, int] | None = None, **towers: str | Path | None) -> dict:
    weights = SD3Weights(Path(path), towers)
    return pipeline_config(weights, _text_choice(weights, t5, t5_tokenizer, text_heads))


def load_bytes(weights: SD3Weights, modules: Mapping[str, torch.nn.Module], dtype: torch.dtype) -> dict[str, int]:
    """The bytes the modules' weights take in `dtype`, per part (for the memory check before reading)."""
    size = torch.empty((), dtype=dtype).element_size()
    parts = {}
    for kind, module in modules.items():
        unique = {id(value): value for value in module.state_dict(keep_vars=True).values()}  # T5's tied embedding once
        parts[kind] = sum(value.numel() * (size if value.is_floating_point() else value.element_size())
                          for value in unique.values())
    return parts


def check_memory(weights: SD3Weights, parts: Mapping[str, int], dtype: torch.dtype, t5: bool) -> None:
    """Refuse a load that cannot fit, before any weight is read, saying what it needs and what would fit."""
    from latentgen.errors import InsufficientMemoryError
    from latentgen.memory import GIB, available_bytes

    needed = sum(parts.values())
    free = available_bytes(torch.device("cpu"))
    if free is None or needed <= free:
        return
    detail = ", ".join(f"{kind} {n / GIB:.1f}" for kind, n in parts.items())
    fixes = [] if dtype in (torch.bfloat16, torch.float16) else ["dtype=bfloat16 (half of it)"]
    if t5:
        fixes.append("t5=false (zeros in T5's place, as Stability AI's reference allows; saves most of the "
                     "conditioner's share)")
    fixes.append("a machine with more memory")
    raise InsufficientMemoryError(
        f"loading '{weights.path}' in {str(dtype).replace('torch.', '')} needs {needed / GIB:.1f} GiB for the weights "
        f"alone ({detail} GiB) but {free / GIB:.1f} GiB is available; nothing was read. Try "
        + "; or ".join(fixes))


def load_sd3(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device | None = None,
             t5: bool | None = None, t5_tokenizer: str | Path | None = None,
             text_heads: Mapping[str, int] | None = None, channels_last: bool = False, compile: bool = False,
             **towers: str | Path | None) -> Any:
    """A pipeline from an SD3 / SD3.5 file (and separate text-encoder files), each tensor read straight into
    `dtype` (default float32) into modules built on the meta device."""
    dtype = dtype or torch.float32
    weights = SD3Weights(Path(path), towers)
    choice = _text_choice(weights, t5, t5_tokenizer, text_heads)
    config = pipeline_config(weights, choice)
    with torch.device("meta"):
        modules = {kind: build_component(kind, config[kind]) for kind in module_parts()}
    check_memory(weights, load_bytes(weights, modules, dtype), dtype, choice.t5)
    source = SourceFile(weights.path)
    for kind, module in modules.items():
        located, report = locate_weights(module, kind, lambda name: _file_key(name, weights), weights)
        if report:
            raise CheckpointError(f"the {kind} weights of '{path}' do not form an SD3 {kind} ({report}); the file "
                                  f"is incomplete or not an SD3 / SD3.5 checkpoint")
        assign_weights(module, kind, located, weights, dtype, channels_last)
        source.origin.update({f"{kind}.{name}": key for name, key in located.items()})
    weights.release()
    used = set(source.origin.values())
    unexpected = [key for key in weights.main.keys() if key not in used and key.startswith((MMDIT, VAE))
                  and not any(part in key for part in _IGNORED)]
    if unexpected:
        raise CheckpointError(f"'{path}' has {len(unexpected)} weight(s) the inferred SD3 model has no place for, "
                              f"first: {[f'{k} {weights.shape(k)}' for k in unexpected[:3]]}")
    source.passthrough = [key for key in weights.main.keys() if key not in used]
    return assemble(modules, config, source, device, channels_last, compile)


def _file_key(pipeline_key: str, weights: SD3Weights) -> str | None:
    """SD3_LAYOUT's key, or for T5's one embedding (stored under either name or both) the name the file has."""
    key = SD3_LAYOUT.file_key(pipeline_key)
    if key is None or key in weights or not key.endswith(("shared.weight", "embed_tokens.weight")):
        return key
    prefix = tower_prefix("t5xxl")
    return f"{prefix}encoder.embed_tokens.weight" if key.endswith("shared.weight") else f"{prefix}shared.weight"


def save_sd3(pipe: Any, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write the pipeline in SD3's all-in-one layout (atomically): every module weight under its key, the
    source file's other tensors passed through, the CLIP head counts in the metadata."""
    source: SourceFile | None = getattr(pipe, "source", None)
    origin = source.origin if source is not None else {}
    if getattr(pipe.denoiser, "registry_name", None) != "mmdit":
        raise ConfigError("the SD3 layout holds an MMDiT; this pipeline's denoiser is "
                          f"'{pipe.denoiser.name}': save it with format='latentgen'")
    tensors: dict[str, torch.Tensor] = {}
    for kind in module_parts():
        module = getattr(pipe, kind)
        for name, value in module.state_dict().items():
            key = origin.get(f"{kind}.{name}") or SD3_LAYOUT.file_key(f"{kind}.{name}")
            if key is None:
                raise ConfigError(f"the SD3 layout has no place for the {kind} weight '{name}' of {kind} "
                                  f"'{getattr(module, 'name', type(module).__name__)}'; save this pipeline with "
                                  f"format='latentgen'")
            tensors[key] = value.to(dtype) if dtype is not None and value.is_floating_point() else value
    if source is not None and source.passthrough:
        original = WeightsFile(source.path)
        for key in source.passthrough:
            tensors.setdefault(key, original.tensor(key))
    clips = pipe.config["conditioner"]["conditioners"][0]["conditioners"]
    heads = {name: member["heads"] for name, member in zip(("clip_l", "clip_g"), clips)}
    return save_tensors(path, tensors, {PIPELINE_CONFIG_KEY: pipe.config, HEADS_KEY: heads})


"""Stable Diffusion XL's original inference config (Stability AI's `sgm`, a `DiffusionEngine` YAML) as latentgen's
pipeline config, and the standard base and refiner configs for files that come without one.

The parts map one to one: `network_config` (UNetModel) -> `unet`, `first_stage_config` (AutoencoderKL) -> `kl`,
`conditioner_config` (GeneralConditioner) -> a `stack` whose members follow `emb_models` in order (so member N
holds `conditioner.embedders.N.*`), `denoiser_config` (DiscreteDenoiser) -> the discrete process. Options with
no latentgen equivalent are refused by name.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

from latentgen.errors import ConfigError
from latentgen.interop.original_config import _TEXT_CONFIG, _codec_params, _unet_params, require_family

# sgm's text embedders, with the architecture their `arch` / `version` names (CLIP ViT-L/14; OpenCLIP ViT-bigG/14).
_CLIP_L = {"layout": "clip", "context_dim": 768, "layers": 12, "heads": 12, "hidden_act": "quick_gelu"}
_OPENCLIP_BIGG = {"layout": "openclip", "context_dim": 1280, "layers": 32, "heads": 20, "hidden_act": "gelu",
                  "projection_dim": 1280}
# open_clip CLIPTextCfg names (the golden configs' `text_config` extension) -> clip_text parameters.
_OPENCLIP_CONFIG = {"width": "context_dim", "layers": "layers", "heads": "heads", "vocab_size": "vocab_size",
                    "context_length": "max_length", "embed_dim": "projection_dim"}
# ConcatTimestepEmbedderND input keys -> (latentgen input key, numbers per item, default, unconditional).
_NUMBERS = {
    "original_size_as_tuple": ("original_size", 2, "image_size", None),
    "crop_coords_top_left": ("crop_coords_top_left", 2, [0, 0], None),
    "target_size_as_tuple": ("target_size", 2, "image_size", None),
    # The refiner's: sgm's sampling asks for 6 and gives the unconditional branch its negative score, 2.5.
    "aesthetic_score": ("aesthetic_score", 1, [6.0], [2.5]),
}
_SCALINGS = {"EpsScaling": "eps", "VScaling": "v"}


def _embedder(model: Mapping[str, Any], zero_unconditional: bool) -> dict:
    """One `emb_models` entry as a stack member."""
    target = str(model.get("target", "")).rsplit(".", 1)[-1]
    params = dict(model.get("params") or {})
    where = f"conditioner_config emb_models entry {target or '?'}"
    if target == "FrozenCLIPEmbedder":
        member = {"name": "clip_text", **_CLIP_L, "zero_unconditional": zero_unconditional}
        for key, value in (params.get("text_config") or {}).items():
            if key in _TEXT_CONFIG:
                member[_TEXT_CONFIG[key]] = value
        layer, index = params.get("layer", "last"), params.get("layer_idx")
        if layer == "last":
            member.update(layer="last", final_norm=True)
        elif layer == "hidden" and index is not None and int(index) in (member["layers"] - 1, -2):
            member.update(layer="penultimate", final_norm=False)  # transformers' hidden_states[L-1]: no final norm
        else:
            raise ConfigError(f"{where}: layer={layer!r} layer_idx={index!r} is not supported (last, or hidden with "
                              f"the penultimate layer, as SDXL)")
        return member
    if target == "FrozenOpenCLIPEmbedder2":
        member = {"name": "clip_text", **_OPENCLIP_BIGG, "zero_unconditional": zero_unconditional,
                  "pooled": bool(params.get("always_return_pooled", False)),
                  "final_norm": bool(params.get("legacy", True))}  # sgm norms the chosen layer only in legacy mode
        if params.get("arch", "ViT-bigG-14") != "ViT-bigG-14" and "text_config" not in params:
            raise ConfigError(f"{where}: arch '{params['arch']}' needs a text_config giving its text tower's size")
        for key, value in (params.get("text_config") or {}).items():
            if key in _OPENCLIP_CONFIG:
                member[_OPENCLIP_CONFIG[key]] = value
        if params.get("layer", "penultimate") not in ("last", "penultimate"):
            raise ConfigError(f"{where}: layer {params['layer']!r} is not supported (last or penultimate)")
        member["layer"] = params.get("layer", "penultimate")
        return member
    if target == "ConcatTimestepEmbedderND":
        key = model.get("input_key")
        if key not in _NUMBERS:
            raise ConfigError(f"{where}: input_key {key!r} is not one SDXL uses ({', '.join(_NUMBERS)})")
        input_key, count, default, unconditional = _NUMBERS[key]
        return {"name": "fourier_numbers", "input_key": input_key, "count": count, "dim": int(params.get("outdim", 256)),
                "default": default, "unconditional": unconditional}
    raise ConfigError(f"{where} is not supported; latentgen reads FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder2 and "
                      f"ConcatTimestepEmbedderND (SDXL base and refiner)")


def _process(denoiser: Mapping[str, Any]) -> dict:
    params = dict(denoiser.get("params") or {})
    if str(denoiser.get("target", "")).rsplit(".", 1)[-1] != "DiscreteDenoiser":
        raise ConfigError(f"denoiser_config target {denoiser.get('target')!r} is not supported (DiscreteDenoiser)")
    scaling = str((params.get("scaling_config") or {}).get("target", "EpsScaling")).rsplit(".", 1)[-1]
    discretization = str((params.get("discretization_config") or {}).get("target", "LegacyDDPMDiscretization"))
    if scaling not in _SCALINGS or not discretization.endswith("LegacyDDPMDiscretization"):
        raise ConfigError(f"denoiser_config: {scaling} with {discretization.rsplit('.', 1)[-1]} is not supported "
                          f"(EpsScaling or VScaling over LegacyDDPMDiscretization)")
    # LegacyDDPMDiscretization: SD's schedule, linear in sqrt(beta) from 0.00085 to 0.012.
    return {"noise_schedule": "scaled_linear", "num_timesteps": int(params.get("num_idx", 1000)),
            "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": _SCALINGS[scaling]}


def sgm_pipeline_config(original: Mapping[str, Any]) -> dict:
    """latentgen's pipeline config for an sgm `DiffusionEngine` inference config."""
    require_family(original, "sgm")
    try:
        params = original["model"]["params"]
        unet = dict(params["network_config"]["params"])
        embedders = list(params["conditioner_config"]["params"]["emb_models"])
        vae = params["first_stage_config"]["params"]
    except (KeyError, TypeError) as exc:
        raise ConfigError(f"the sgm config lacks model.params.{exc.args[0]}; is it an SDXL inference YAML "
                          f"(sgm.models.diffusion.DiffusionEngine)?") from exc
    if unet.pop("num_classes", "sequential") != "sequential":
        raise ConfigError("network_config num_classes must be 'sequential' (the vector input of SDXL)")
    unet.pop("spatial_transformer_attn_type", None)  # softmax or its xformers kernel: the same result
    codec = _codec_params(vae, float(params.get("scale_factor", 0.13025)))
    # sgm's sampling zeroes the text for the base's unconditional branch; the refiner (the one with an
    # aesthetic score) encodes the empty prompt instead (scripts/demo/sampling.py).
    refiner = any(model.get("input_key") == "aesthetic_score" for model in embedders)
    members = [_embedder(model, zero_unconditional=not refiner) for model in embedders]
    return {
        "codec": {"name": "kl", **codec},
        "denoiser": {"name": "unet", **_unet_params(unet, "crossattn", codec["latent_channels"])},
        "conditioner": {"name": "stack", "conditioners": members},
        "scheduler": {"name": "euler"},
        # The refiner was trained on the 200 least noisy of the 1000 timesteps (Podell et al. 2023, Sec. 2.5).
        "diffusion": {**_process(params.get("denoiser_config") or {"target": "DiscreteDenoiser"}),
                      "trained_timesteps": 200 if refiner else None},
        "sampling": {"height": 1024, "width": 1024, "steps": 30, "guidance_scale": 5.0, "spacing": "leading"},
    }


def _numbers_embedder(key: str) -> dict:
    return {"is_trainable": False, "input_key": key, "target": "sgm.modules.encoders.modules.ConcatTimestepEmbedderND",
            "params": {"outdim": 256}}


_OPENCLIP_EMBEDDER = {"is_trainable": False, "input_key": "txt", "target": "sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2",
                      "params": {"arch": "ViT-bigG-14", "layer": "penultimate", "always_return_pooled": True,
                                 "legacy": False}}
_VAE = {"embed_dim": 4, "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3,
                                     "out_ch": 3, "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2,
                                     "attn_resolutions": [], "dropout": 0.0}}
# The released configs (configs/inference/sd_xl_base.yaml and sd_xl_refiner.yaml), as far as they shape weights.
STANDARD = {
    "base": {"model": {"params": {
        "scale_factor": 0.13025,
        "network_config": {"params": {
            "adm_in_channels": 2816, "num_classes": "sequential", "in_channels": 4, "out_channels": 4,
            "model_channels": 320, "attention_resolutions": [4, 2], "num_res_blocks": 2, "channel_mult": [1, 2, 4],
            "num_head_channels": 64, "use_linear_in_transformer": True, "transformer_depth": [1, 2, 10],
            "context_dim": 2048}},
        "conditioner_config": {"params": {"emb_models": [
            {"is_trainable": False, "input_key": "txt", "target": "sgm.modules.encoders.modules.FrozenCLIPEmbedder",
             "params": {"layer": "hidden", "layer_idx": 11}},
            _OPENCLIP_EMBEDDER, _numbers_embedder("original_size_as_tuple"),
            _numbers_embedder("crop_coords_top_left"), _numbers_embedder("target_size_as_tuple")]}},
        "first_stage_config": {"params": _VAE}}}},
    "refiner": {"model": {"params": {
        "scale_factor": 0.13025,
        "network_config": {"params": {
            "adm_in_channels": 2560, "num_classes": "sequential", "in_channels": 4, "out_channels": 4,
            "model_channels": 384, "attention_resolutions": [4, 2], "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4],
            "num_head_channels": 64, "use_linear_in_transformer": True, "transformer_depth": 4,
            "context_dim": [1280, 1280, 1280, 1280]}},
        "conditioner_config": {"params": {"emb_models": [
            _OPENCLIP_EMBEDDER, _numbers_embedder("original_size_as_tuple"),
            _numbers_embedder("crop_coords_top_left"), _numbers_embedder("aesthetic_score")]}},
        "first_stage_config": {"params": _VAE}}}},
}


def standard_sgm_config(family: str) -> dict:
    """A copy of the released "base" or "refiner" inference config."""
    return copy.deepcopy(STANDARD[family])

"""The original repositories' inference YAML (`v1-inference.yaml`, `v2-inference-v.yaml`) <-> latentgen's pipeline config.

Every Stable Diffusion tool accepts those files, so they are the way to describe a checkpoint whose
architecture differs from the standard ones. Only what changes the computation is read; options the
native components do not implement are refused by name rather than ignored.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Mapping

from latentgen.errors import ConfigError

# The architectures of the standard checkpoints, in the original config's own terms.
_UNET_V1 = {
    "image_size": 64, "in_channels": 4, "out_channels": 4, "model_channels": 320,
    "attention_resolutions": [4, 2, 1], "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4], "num_heads": 8,
    "use_spatial_transformer": True, "transformer_depth": 1, "context_dim": 768, "legacy": False,
}
_VAE_F8 = {
    "embed_dim": 4,
    "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                 "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0},
}


def _model(unet: dict, cond_stage: dict, parameterization: str, image_size: int) -> dict:
    return {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
        "linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000, "image_size": image_size, "channels": 4,
        "conditioning_key": "crossattn", "scale_factor": 0.18215, "parameterization": parameterization,
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet},
        "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": copy.deepcopy(_VAE_F8)},
        "cond_stage_config": cond_stage,
    }}}


def standard_config(family: str) -> dict:
    """The inference config of a standard family: "v1" (v1-inference.yaml) or "v2" (v2-inference-v.yaml)."""
    if family == "v1":
        return _model(dict(_UNET_V1), {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"}, "eps", 64)
    if family == "v2":
        unet = {**_UNET_V1, "image_size": 96, "num_heads": -1, "num_head_channels": 64, "context_dim": 1024,
                "use_linear_in_transformer": True}
        cond = {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                "params": {"freeze": True, "layer": "penultimate"}}
        return _model(unet, cond, "v", 96)
    raise ValueError(f"unknown Stable Diffusion family '{family}'; the standard ones are v1 and v2")


def read_original_config(source: str | Path | Mapping[str, Any]) -> dict:
    """A path to an inference YAML, or the already parsed dict."""
    if isinstance(source, Mapping):
        return copy.deepcopy(dict(source))
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"original config '{path}' does not exist")
    import yaml

    try:
        parsed = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"original config '{path}' is not valid YAML: {exc}") from exc
    if not isinstance(parsed, dict) or "model" not in parsed:
        raise ConfigError(f"original config '{path}' has no top-level 'model' section (expected an LDM inference YAML)")
    return parsed


# UNetModel options the native UNet takes under the same name, and those with no effect at inference.
_UNET_SAME = ("in_channels", "out_channels", "model_channels", "attention_resolutions", "num_res_blocks",
              "channel_mult", "num_heads", "num_head_channels", "transformer_depth", "context_dim",
              "use_linear_in_transformer", "legacy", "dropout", "num_attention_blocks")
_UNET_IGNORED = ("image_size", "use_checkpoint", "use_fp16", "num_heads_upsample", "use_spatial_transformer")
# Options the native UNet does not implement, with the value that means "off".
_UNET_OFF = {"use_scale_shift_norm": False, "resblock_updown": False, "num_classes": None,
             "disable_self_attentions": None, "use_new_attention_order": False, "conv_resample": True, "dims": 2}


def _unet_params(params: Mapping[str, Any], conditioning_key: str, latent_channels: int) -> dict:
    if not params.get("use_spatial_transformer", True):
        raise ConfigError("unet_config.params.use_spatial_transformer is false: the native 'unet' implements the "
                          "spatial-transformer UNet of Stable Diffusion only")
    unknown = set(params) - set(_UNET_SAME) - set(_UNET_IGNORED) - set(_UNET_OFF) - {"adm_in_channels"}
    if unknown:
        raise ConfigError(f"unet_config.params has options the native 'unet' does not know: {sorted(unknown)}")
    for option, off in _UNET_OFF.items():
        if option in params and params[option] != off:
            raise ConfigError(f"unet_config.params.{option}={params[option]!r} is not implemented by the native "
                              f"'unet' (only {off!r})")
    unet = {key: params[key] for key in _UNET_SAME if key in params}
    if "adm_in_channels" in params:
        unet["vector_dim"] = params["adm_in_channels"]
    extra = int(unet.get("in_channels", 4)) - latent_channels
    if extra > 0:
        if conditioning_key != "hybrid":
            raise ConfigError(f"the UNet takes {unet['in_channels']} input channels for {latent_channels}-channel latents "
                              f"but conditioning_key is '{conditioning_key}'; extra input channels need 'hybrid'")
        unet["concat_channels"] = extra
    return unet


def _codec_params(params: Mapping[str, Any], scale_factor: float) -> dict:
    dd = params.get("ddconfig", {})
    if not dd.get("double_z", True):
        raise ConfigError("first_stage_config ddconfig.double_z is false: only the KL autoencoder (double_z) is supported")
    return {
        "latent_channels": params.get("embed_dim", 4), "channels": dd.get("ch", 128),
        "channel_mult": list(dd.get("ch_mult", [1, 2, 4, 4])), "num_res_blocks": dd.get("num_res_blocks", 2),
        "attn_resolutions": list(dd.get("attn_resolutions", [])), "resolution": dd.get("resolution", 256),
        "dropout": dd.get("dropout", 0.0), "z_channels": dd.get("z_channels", params.get("embed_dim", 4)),
        "scale_factor": scale_factor,
    }


# The text towers the original configs name, with their architecture.
_TEXT_TOWERS = {
    "FrozenCLIPEmbedder": {"layout": "clip", "context_dim": 768, "layers": 12, "heads": 12, "hidden_act": "quick_gelu",
                           "layer": "last"},  # OpenAI CLIP ViT-L/14
    "FrozenOpenCLIPEmbedder": {"layout": "openclip", "context_dim": 1024, "layers": 24, "heads": 16, "hidden_act": "gelu",
                               "layer": "penultimate"},  # OpenCLIP ViT-H/14
}
# `text_config` keys (Hugging Face CLIPTextConfig names) -> clip_text parameters.
_TEXT_CONFIG = {"hidden_size": "context_dim", "num_hidden_layers": "layers", "num_attention_heads": "heads",
                "intermediate_size": "intermediate_size", "vocab_size": "vocab_size",
                "max_position_embeddings": "max_length", "hidden_act": "hidden_act"}


def _conditioner_params(cond_stage: Mapping[str, Any]) -> dict:
    target = str(cond_stage.get("target", ""))
    kind = target.rsplit(".", 1)[-1]
    if kind not in _TEXT_TOWERS:
        raise ConfigError(f"cond_stage_config.target '{target}' is not supported; latentgen reads "
                          f"{sorted(_TEXT_TOWERS)} (Stable Diffusion v1 and v2 text towers)")
    params = dict(cond_stage.get("params") or {})
    text = {"name": "clip_text", **_TEXT_TOWERS[kind]}
    if "layer" in params:
        if params["layer"] not in ("last", "penultimate"):
            raise ConfigError(f"cond_stage_config.params.layer '{params['layer']}' is not supported (last or penultimate)")
        text["layer"] = params["layer"]
    if params.get("arch", "ViT-H-14") != "ViT-H-14" and "text_config" not in params:
        raise ConfigError(f"OpenCLIP arch '{params['arch']}' needs a text_config giving its text tower's size")
    for key, value in (params.get("text_config") or {}).items():
        if key in _TEXT_CONFIG:
            text[_TEXT_CONFIG[key]] = value
    return text


def config_family(original: Mapping[str, Any]) -> str | None:
    """Which original code base an inference config is for: "ldm" (SD v1/v2: `unet_config`), "sgm" (SDXL:
    `network_config`), or None."""
    params = (original.get("model") or {}).get("params") if isinstance(original.get("model"), Mapping) else None
    if not isinstance(params, Mapping):
        return None
    return "ldm" if "unet_config" in params else "sgm" if "network_config" in params else None


# family -> (its YAML in words, its files in words, the fix for a file of this family given the other's YAML)
_FAMILIES = {
    "ldm": ("a Stable Diffusion v1/v2 (LDM) inference YAML", "a Stable Diffusion v1/v2 file (no "
            "conditioner.embedders.* keys)", "give its LDM YAML as original_config, or none for a standard v1/v2 file"),
    "sgm": ("an SDXL (sgm) inference YAML", "an SDXL file (conditioner.embedders.* keys)",
            "give its sgm YAML as original_config, or none for the released SDXL base or refiner"),
}


def require_family(original: Mapping[str, Any], expected: str) -> None:
    """Refuse an inference YAML of the other code base than the checkpoint's, naming both."""
    found = config_family(original)
    if found is not None and found != expected:
        raise ConfigError(f"the original config is {_FAMILIES[found][0]}, but the checkpoint is "
                          f"{_FAMILIES[expected][1]}; {_FAMILIES[expected][2]}")


def pipeline_config(original: Mapping[str, Any], prediction_type: str | None = None) -> dict:
    """latentgen's pipeline config for an original inference config."""
    require_family(original, "ldm")
    try:
        params = original["model"]["params"]
        unet, vae, cond = (params["unet_config"]["params"], params["first_stage_config"]["params"],
                           params["cond_stage_config"])
    except (KeyError, TypeError) as exc:
        raise ConfigError(f"the original config lacks model.params.{exc.args[0]}; is it an LDM inference YAML?") from exc
    codec = _codec_params(vae, float(params.get("scale_factor", 1.0)))
    schedule = params.get("beta_schedule", "linear")
    if schedule not in ("linear", "cosine"):
        raise ConfigError(f"beta_schedule '{schedule}' is not supported (linear or cosine)")
    parameterization = prediction_type or params.get("parameterization", "eps")
    if parameterization not in ("eps", "v", "x0"):
        raise ConfigError(f"parameterization '{parameterization}' is not supported (eps, v or x0)")
    image_size = int(params.get("image_size", unet.get("image_size", 64)))
    factor = 2 ** (len(codec["channel_mult"]) - 1)
    denoiser = {"name": "unet", **_unet_params(unet, params.get("conditioning_key", "crossattn"), codec["latent_channels"])}
    conditioner = _conditioner_params(cond)
    if denoiser.get("concat_channels"):
        if denoiser["concat_channels"] != codec["latent_channels"] + 1:
            raise ConfigError(f"the UNet takes {denoiser['concat_channels']} extra input channels; latentgen knows the "
                              f"inpainting layout (mask + masked-image latents = {codec['latent_channels'] + 1})")
        conditioner = {"name": "stack", "conditioners": [
            conditioner, {"name": "masked_image", "latent_channels": codec["latent_channels"]}]}
    return {
        "codec": {"name": "kl", **codec},
        "denoiser": denoiser,
        "conditioner": conditioner,
        "scheduler": {"name": "ddim"},
        "diffusion": {
            # The LDM code's "linear" schedule is linear in sqrt(beta): our "scaled_linear".
            "noise_schedule": "scaled_linear" if schedule == "linear" else "cosine",
            "num_timesteps": int(params.get("timesteps", 1000)),
            "beta_start": float(params.get("linear_start", 0.00085)),
            "beta_end": float(params.get("linear_end", 0.012)),
            "prediction_type": parameterization,
        },
        "sampling": {"height": image_size * factor, "width": image_size * factor, "steps": 50,
                     "guidance_scale": 7.5, "spacing": "leading"},
    }

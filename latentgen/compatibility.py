"""Checks that a codec, denoiser and conditioner fit together, before anything is computed."""

from __future__ import annotations

from latentgen.contracts import Codec, Conditioner, Denoiser
from latentgen.contracts.cond_keys import COND_KEYS
from latentgen.errors import IncompatibleComponentsError


def _unset(key: str) -> str:
    """The override value of a width attribute that makes a denoiser not read `key`."""
    off = COND_KEYS[key].off
    return "null" if off is None else str(off)


def compatibility_problems(codec: Codec, denoiser: Denoiser, conditioner: Conditioner) -> list[str]:
    """Every mismatch between the three components, each naming both sides and the override that fixes it."""
    problems = []
    c, d, k = f"codec '{codec.name}'", f"denoiser '{denoiser.name}'", f"conditioner '{conditioner.name}'"
    provided, required = conditioner.outputs, denoiser.required_cond
    problems += [f"{k} provides unknown conditioning key '{key}'; the keys are {', '.join(COND_KEYS)} "
                 f"(latentgen/contracts/cond_keys.py)" for key in provided if key not in COND_KEYS]
    if denoiser.latent_channels != codec.latent_channels:
        concatenated = {key: width for key, width in required.items() if COND_KEYS[key].in_input_channels}
        taken = "".join(f" minus {COND_KEYS[key].width_attribute} {width}" for key, width in concatenated.items())
        problems.append(
            f"{c} makes {codec.latent_channels}-channel latents but {d} takes {denoiser.latent_channels} "
            f"latent channels (in_channels {denoiser.in_channels}{taken}); "
            f"override denoiser.in_channels={codec.latent_channels + sum(concatenated.values())}"
        )
    if denoiser.out_channels != codec.latent_channels:
        problems.append(
            f"{d} predicts {denoiser.out_channels} channels but {c} decodes {codec.latent_channels}; "
            f"override denoiser.out_channels={codec.latent_channels}"
        )
    for key, width in required.items():
        parameter = COND_KEYS[key].width_attribute
        if key not in provided:
            problems.append(
                f"{d} needs cond '{key}' ({parameter}={width}) but {k} provides "
                f"{sorted(provided) or 'nothing'}; choose a conditioner that provides '{key}' or override "
                f"denoiser.{parameter}={_unset(key)}"
            )
        elif provided[key] != width:
            problems.append(
                f"{k} gives '{key}' of width {provided[key]} but {d} has {parameter}={width}; "
                f"override denoiser.{parameter}={provided[key]}"
            )
    for key, width in provided.items():
        if key in COND_KEYS and key not in required:
            problems.append(
                f"{k} provides '{key}' (width {width}) but {d} does not read '{key}', so the conditioning "
                f"would be ignored; override denoiser.{COND_KEYS[key].width_attribute}={width} or use conditioner=null"
            )
    return problems


def check_compatible(codec: Codec, denoiser: Denoiser, conditioner: Conditioner) -> None:
    """Raise IncompatibleComponentsError listing every mismatch, or return quietly."""
    problems = compatibility_problems(codec, denoiser, conditioner)
    if problems:
        raise IncompatibleComponentsError("incompatible components:\n- " + "\n- ".join(problems))

"""Checks that a codec, denoiser and conditioner fit together, before anything is computed."""

from __future__ import annotations

from latentgen.contracts import Codec, Conditioner, Denoiser
from latentgen.errors import IncompatibleComponentsError

# The denoiser parameter that sets the width of each cond key, for the fix we suggest.
_WIDTH_PARAMETER = {"crossattn": "context_dim", "vector": "vector_dim", "concat": "concat_channels"}


def compatibility_problems(codec: Codec, denoiser: Denoiser, conditioner: Conditioner) -> list[str]:
    """Every mismatch between the three components, each naming both sides and the override that fixes it."""
    problems = []
    c, d, k = f"codec '{codec.name}'", f"denoiser '{denoiser.name}'", f"conditioner '{conditioner.name}'"
    if denoiser.latent_channels != codec.latent_channels:
        problems.append(
            f"{c} makes {codec.latent_channels}-channel latents but {d} takes {denoiser.latent_channels} "
            f"latent channels (in_channels {denoiser.in_channels} minus concat_channels {denoiser.concat_channels}); "
            f"override denoiser.in_channels={codec.latent_channels + denoiser.concat_channels}"
        )
    if denoiser.out_channels != codec.latent_channels:
        problems.append(
            f"{d} predicts {denoiser.out_channels} channels but {c} decodes {codec.latent_channels}; "
            f"override denoiser.out_channels={codec.latent_channels}"
        )
    provided, required = conditioner.outputs, denoiser.required_cond
    for key, width in required.items():
        parameter = _WIDTH_PARAMETER[key]
        if key not in provided:
            problems.append(
                f"{d} needs cond '{key}' ({parameter}={width}) but {k} provides "
                f"{sorted(provided) or 'nothing'}; choose a conditioner that provides '{key}' or override "
                f"denoiser.{parameter}={'0' if key == 'concat' else 'null'}"
            )
        elif provided[key] != width:
            problems.append(
                f"{k} gives '{key}' of width {provided[key]} but {d} has {parameter}={width}; "
                f"override denoiser.{parameter}={provided[key]}"
            )
    for key, width in provided.items():
        if key not in required:
            problems.append(
                f"{k} provides '{key}' (width {width}) but {d} does not read '{key}', so the conditioning "
                f"would be ignored; override denoiser.{_WIDTH_PARAMETER.get(key, key)}={width} or use conditioner=null"
            )
    return problems


def check_compatible(codec: Codec, denoiser: Denoiser, conditioner: Conditioner) -> None:
    """Raise IncompatibleComponentsError listing every mismatch, or return quietly."""
    problems = compatibility_problems(codec, denoiser, conditioner)
    if problems:
        raise IncompatibleComponentsError("incompatible components:\n- " + "\n- ".join(problems))

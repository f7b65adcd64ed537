"""Changing a trained model's process options at sampling time (rectified flow's shift, say) without letting
it be swapped for another process: a denoiser only predicts what its process trained it to predict."""

from __future__ import annotations

from typing import Any, Mapping

from latentgen.errors import IncompatibleComponentsError

_FIXES = {"rectified_flow": "+process.shift=3.0", "edm": "+process.sigma_max=80",
          "discrete": "+process.zero_terminal_snr=true"}


def overridden_process(current: Mapping[str, Any], override: Mapping[str, Any], what: str) -> dict:
    """`current` (a process config, {name, ...}) with `override`'s options. Refused: another process, or
    another prediction target (a v-prediction checkpoint asked for eps, or for rectified flow's velocity)."""
    current, override = dict(current), dict(override)
    name = str(override.pop("name", current["name"]))
    trained = current["name"] + (f" ({current['prediction_type']} prediction)" if "prediction_type" in current else "")
    asked = override.get("prediction_type", current.get("prediction_type"))
    if name != current["name"] or asked != current.get("prediction_type"):
        wanted = name + (f" ({asked} prediction)" if asked is not None else "")
        example = _FIXES.get(current["name"], "+process.<option>=<value>")
        raise IncompatibleComponentsError(
            f"{what} was trained with the {trained} process; process {wanted} would read its output as something "
            f"it never learned to predict and sample noise. Keep its process and change only that process's "
            f"options (e.g. {example}), or train a model for {name}")
    return {**current, **override, "name": name}

"""OmegaConf containers -> plain Python, so components never see Hydra types."""

from __future__ import annotations

import re
from typing import Any

from latentgen.errors import ConfigError


def to_plain(node: Any) -> Any:
    """Plain dicts and lists from OmegaConf containers (anything else unchanged), resolving
    interpolations; an unresolvable one is a ConfigError that names both components and the fix."""
    if not type(node).__module__.startswith("omegaconf"):
        return node
    from omegaconf import OmegaConf
    from omegaconf.errors import InterpolationResolutionError

    try:
        return OmegaConf.to_container(node, resolve=True)
    except InterpolationResolutionError as exc:
        raise ConfigError(_unresolvable(node, exc)) from exc


def _unresolvable(config: Any, exc: Exception) -> str:
    """Which component's value could not be taken from which other component, and the fix."""
    from omegaconf import OmegaConf

    key = str(getattr(exc, "full_key", "") or "?")
    wanted = re.search(r"'([^']+)'", str(getattr(exc, "msg", exc)))
    wanted = wanted.group(1) if wanted else "?"
    name_of = lambda path: OmegaConf.select(config, f"{path.split('.')[0]}.name", default="?")  # noqa: E731
    return (
        f"cannot resolve '{key}' of {key.split('.')[0]} '{name_of(key)}': it is taken from '${{{wanted}}}', but "
        f"{wanted.split('.')[0]} '{name_of(wanted)}' has no '{wanted.split('.')[-1]}' in its config (a component "
        f"registered without a YAML file has only its name). Override {key}=<value> on the command line, "
        f"or, if the {wanted.split('.')[0]} takes such a parameter, give it: +{wanted}=<value>."
    )

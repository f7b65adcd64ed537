"""Every registered component becomes an option of its Hydra group, even without a YAML file.

The options are stored in Hydra's ConfigStore from entry-point names alone (no plugin is
imported). Names that latentgen's own conf/ has a YAML file for are left to that file. Hydra
searches the ConfigStore last, so a plugin's YAML of the same name (added through a SearchPathPlugin)
is found first; Hydra then merges it onto our bare `{_target_, kind, name}` node ("automatic schema
matching"), which changes nothing but prints a deprecation warning, silenced here.
"""

from __future__ import annotations

import warnings
from importlib import resources
from typing import Sequence

from latentgen import registry

CONFIG_MODULE = "latentgen.conf"


def _selectable(name: str) -> bool:
    """Hydra reads `group=null` (and true/false/numbers) as values, not option names; such
    registry names cannot be options (the null conditioner is `conditioner=unconditional`)."""
    if name.lower() in {"null", "true", "false", "nan", "inf"}:
        return False
    try:
        float(name)
    except ValueError:
        return True
    return False


def register_component_options() -> list[tuple[str, str]]:
    """Store `{_target_: latentgen.registry.build, kind, name}` for every registered component;
    returns the (group, name) pairs stored."""
    from hydra.core.config_store import ConfigStore

    warnings.filterwarnings("ignore", message=r"(?s).*is validated against ConfigStore schema with the same name")
    store = ConfigStore.instance()
    stored = []
    for kind in registry.GROUPS:
        shipped = {path.name[: -len(".yaml")] for path in resources.files(CONFIG_MODULE).joinpath(kind).iterdir()
                   if path.name.endswith(".yaml")}
        for name in registry.available(kind):
            if name in shipped or not _selectable(name):
                continue
            store.store(group=kind, name=name, node={"_target_": "latentgen.registry.build", "kind": kind, "name": name},
                        provider=f"latentgen.registry:{kind}")
            stored.append((kind, name))
    return stored


def compose(config_name: str = "train", overrides: Sequence[str] = ()):
    """Compose one of latentgen's configs (as the apps would) for use from Python."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    register_component_options()
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


def group_options(group: str) -> list[str]:
    """Every option Hydra offers for a config group: YAML presets and registered components."""
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    register_component_options()
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        return GlobalHydra.instance().config_loader().get_group_options(group)

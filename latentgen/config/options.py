"""Every registered component becomes an option of its Hydra group, even without a YAML file; every plugin's
presets join latentgen's groups.

The options are stored in Hydra's ConfigStore from entry-point names alone (no plugin is
imported). Names that latentgen's own conf/ has a YAML file for are left to that file. Hydra
searches the ConfigStore last, so a plugin's YAML of the same name is found first; Hydra then merges it
onto our bare `{_target_, kind, name}` node ("automatic schema matching"), which changes nothing but
prints a deprecation warning, silenced here.

A plugin ships presets in either of two ways: an entry point in the group `latentgen.configs` naming a
package that holds `<group>/<option>.yaml` files (latentgen's configs put every such package on Hydra's
search path through the `latentgen_plugin_configs` resolver in their `hydra.searchpath`), or a Hydra
SearchPathPlugin of its own under `hydra_plugins`.
"""

from __future__ import annotations

import hashlib
import importlib
import warnings
from importlib import resources
from typing import Any, Sequence

from latentgen import kinds, registry

CONFIG_MODULE = "latentgen.conf"
SEARCHPATH_RESOLVER = "latentgen_plugin_configs"
SAFE_NAME_RESOLVER = "latentgen_safe_name"
_LONGEST_NAME = 180  # bytes of a directory name; file systems allow 255


def safe_name(value: Any) -> str:
    """`value` as one directory name: separators and control characters replaced, never '.' or '..', at most
    _LONGEST_NAME bytes (a long one keeps a hash of the whole). A sweep names its job folders after their
    overrides, and an override value such as prompt='../../x' must not become a path."""
    text = "".join("_" if char in "/\\" or not char.isprintable() else char for char in str(value))
    if text.strip(".") == "":
        text = text.replace(".", "_") or "_"
    if len(text.encode()) > _LONGEST_NAME:
        digest = hashlib.sha1(text.encode()).hexdigest()[:10]
        text = text.encode()[: _LONGEST_NAME - 11].decode(errors="ignore") + "-" + digest
    return text


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


def _shipped(group: str) -> set[str]:
    folder = resources.files(CONFIG_MODULE).joinpath(group)
    if not folder.is_dir():
        return set()
    return {path.name[: -len(".yaml")] for path in folder.iterdir() if path.name.endswith(".yaml")}


def plugin_config_paths() -> list[str]:
    """`pkg://` search-path entries of every admitted plugin's presets (entry-point group `latentgen.configs`).
    A package that fails to import (or exits while importing) is warned about by name and left out: Hydra would
    otherwise end the app without a word about which plugin broke it."""
    paths = []
    for package, distribution in registry.config_packages():
        try:
            importlib.import_module(package)
        except (Exception, SystemExit) as exc:
            warnings.warn(f"the presets of plugin distribution '{distribution}' (package '{package}') failed to "
                          f"import ({type(exc).__name__}: {exc}) and are left out; fix or uninstall "
                          f"'{distribution}', or set {registry.BLOCK_ENV}={distribution}", stacklevel=2)
            continue
        paths.append(f"pkg://{package}")
    return paths


def register_component_options() -> list[tuple[str, str]]:
    """Store `{_target_: latentgen.registry.build, kind, name}` for every registered component of a kind with
    a Hydra group, and register the resolver that puts plugins' presets on the search path; returns the
    (group, name) pairs stored."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    warnings.filterwarnings("ignore", message=r"(?s).*is validated against ConfigStore schema with the same name")
    if not OmegaConf.has_resolver(SEARCHPATH_RESOLVER):
        OmegaConf.register_new_resolver(SEARCHPATH_RESOLVER, plugin_config_paths)
    if not OmegaConf.has_resolver(SAFE_NAME_RESOLVER):
        OmegaConf.register_new_resolver(SAFE_NAME_RESOLVER, safe_name)
    store = ConfigStore.instance()
    stored = []
    for kind in kinds.KINDS:
        if kind.hydra_group is None:
            continue
        shipped = _shipped(kind.hydra_group)
        for name in registry.available(kind.name):
            if name in shipped or not _selectable(name):
                continue
            store.store(group=kind.hydra_group, name=name,
                        node={"_target_": "latentgen.registry.build", "kind": kind.name, "name": name},
                        provider=f"latentgen.registry:{kind.name}")
            stored.append((kind.hydra_group, name))
    return stored


def compose(config_name: str = "train", overrides: Sequence[str] = ()):
    """Compose one of latentgen's configs (as the apps would) for use from Python."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    register_component_options()
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


def group_options(group: str, config_name: str = "train") -> list[str]:
    """Every option Hydra offers for a config group of the app config `config_name`: YAML presets (latentgen's
    and plugins') and registered components."""
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    register_component_options()
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        return GlobalHydra.instance().config_loader().get_group_options(group, config_name=config_name)

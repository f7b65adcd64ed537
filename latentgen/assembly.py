"""Components from config nodes and back: `{name, **params}` through the registry, and what rebuilds one."""

from __future__ import annotations

from typing import Any, Mapping

from latentgen import registry
from latentgen.config.containers import to_plain
from latentgen.errors import ConfigError
from latentgen.kinds import kind as kind_of


def build_component(kind: str, node: Mapping[str, Any] | None) -> Any:
    """A component from its config node: `{name: ..., **params}`, optionally with Hydra's
    `_target_: latentgen.registry.build` and `kind`. A missing node gives the kind's default, if it has one."""
    node = to_plain(node)
    if node is None:
        default = kind_of(kind).default
        if default is not None:
            return registry.build(kind, default)
        raise ConfigError(f"the pipeline config has no '{kind}'; choose one, e.g. {kind}={registry.available(kind)[:1]}")
    if not isinstance(node, Mapping):
        raise ConfigError(f"the '{kind}' config must be a mapping {{name: <component>, ...}}; got {node!r}")
    params = dict(node)
    target = params.pop("_target_", "latentgen.registry.build")
    if target != "latentgen.registry.build":
        raise ConfigError(f"{kind} config names _target_ '{target}'; latentgen configs name components through "
                          f"the registry: _target_: latentgen.registry.build, kind: {kind}, name: <component>")
    declared = params.pop("kind", kind)
    if declared != kind:
        raise ConfigError(f"the '{kind}' config declares kind '{declared}'")
    if "name" not in params:
        raise ConfigError(f"the '{kind}' config has no 'name'; available: {registry.describe(kind)}")
    return registry.build(kind, str(params.pop("name")), **params)


def component_config(kind: str, component: Any) -> dict[str, Any]:
    """{name, **params} that rebuilds a registry-built component."""
    if not hasattr(component, "registry_name"):
        raise ConfigError(
            f"the {kind} {type(component).__name__} was not built through latentgen.registry.build, so "
            f"its configuration is unknown and it cannot be saved; build it with registry.build('{kind}', name, ...)"
        )
    return {"name": component.registry_name, **component.build_params}

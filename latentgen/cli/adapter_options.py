"""The apps' adapter options: `adapters=[{name, ...}]` (any registered adapter with its options, in order; both
latentgen-sample and latentgen-eval) and latentgen-sample's shorthands `lora=<file or list>` (each at `lora_scale`)
and `controlnet=<file>`, built before any weight is read so that a missing or foreign file fails first, and
attached once the checkpoint is loaded."""

from __future__ import annotations

from typing import Any

from latentgen.errors import ConfigError


def adapter_nodes(settings: Any) -> list[dict[str, Any]]:
    """The adapters a run asks for, as {name, **options}: `adapters=` first, then lora=, then controlnet=."""
    nodes = listed_adapters(settings.adapters)
    loras = settings.lora if isinstance(settings.lora, list) else [] if settings.lora is None else [settings.lora]
    for path in loras:
        if not isinstance(path, str):
            raise ConfigError(f"lora={settings.lora!r}: must be a file path or a list of them")
        nodes.append({"name": "lora", "path": path, "scale": settings.lora_scale})
    if settings.controlnet is not None:
        nodes.append({"name": "controlnet", "path": settings.controlnet})
    return nodes


def listed_adapters(given: Any) -> list[dict[str, Any]]:
    """An `adapters=[{name, ...options}]` setting checked, as a list of {name, **options} (None: none)."""
    given = given if given is not None else []
    if not isinstance(given, list):
        raise ConfigError(f"adapters={given!r}: must be a list of {{name: <adapter>, ...options}}, e.g. "
                          f"'adapters=[{{name: lora, path: style.safetensors, scale: 0.8}}]'")
    nodes = []
    for index, node in enumerate(given):
        if not isinstance(node, dict) or "name" not in node:
            raise ConfigError(f"adapters[{index}]={node!r}: must be a mapping with a name, e.g. "
                              f"{{name: lora, path: style.safetensors}}")
        nodes.append(dict(node))
    return nodes


def build_adapters(nodes: list[dict[str, Any]]) -> list[Any]:
    """Each adapter built through the registry (its file read and checked); errors name the list position."""
    from latentgen.errors import LatentgenError
    from latentgen.registry import build

    adapters = []
    for index, node in enumerate(nodes):
        options = {key: value for key, value in node.items() if key != "name"}
        try:
            adapters.append(build("adapter", str(node["name"]), **options))
        except LatentgenError as exc:
            raise type(exc)(f"adapter {index} ({node['name']}): {exc}") from None
    return adapters

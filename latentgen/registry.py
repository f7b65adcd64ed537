"""Component registry over Python entry points: the one way built-ins and plugins are found and built.

Each kind has an entry-point group (`latentgen.codecs`, `latentgen.denoisers`, ...; the table is
`latentgen.kinds.KINDS`). Discovery reads
only distribution metadata; a component's module is imported when that component is built, so a
broken plugin cannot break the others. Two environment variables restrict what is loaded:

- `LATENTGEN_DISABLE_PLUGIN_AUTOLOAD=1`: only components that latentgen itself provides;
- `LATENTGEN_BLOCK_PLUGINS=dist-a,dist-b`: ignore the named distributions.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import inspect
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

from latentgen.errors import (ComponentConflictError, ComponentNotFoundError, ConfigError, LatentgenError,
                              PluginLoadError)
from latentgen.kinds import KINDS
from latentgen.kinds import kind as _kind

CORE_DISTRIBUTION = "latentgen"
AUTOLOAD_ENV = "LATENTGEN_DISABLE_PLUGIN_AUTOLOAD"
BLOCK_ENV = "LATENTGEN_BLOCK_PLUGINS"

# kind -> entry-point group, as declared in latentgen.kinds (which the functions below read)
GROUPS = {kind.name: kind.group for kind in KINDS}
# Plugin packages of Hydra presets: `<distribution> = "<package with conf/<group>/*.yaml>"`, found without a
# hydra_plugins module of the plugin's own (latentgen.config.options adds them to Hydra's search path).
CONFIGS_GROUP = "latentgen.configs"


@dataclass
class Entry:
    """One registered component: where it comes from and how to load it."""

    kind: str
    name: str
    target: str  # "module:attribute", or a description for in-process registrations
    distribution: str
    version: str
    entry_point: importlib.metadata.EntryPoint | None = None
    factory: Callable[..., Any] | None = field(default=None, repr=False)

    @property
    def provenance(self) -> str:
        return f"{self.distribution} {self.version}"

    def load(self) -> Callable[..., Any]:
        if self.factory is None:
            try:
                self.factory = self.entry_point.load()
            except (Exception, SystemExit) as exc:  # any failure inside a plugin's import, an exit() too, is reported
                raise PluginLoadError(
                    f"{self.kind} '{self.name}' from distribution '{self.distribution}' "
                    f"({self.target}) failed to import: {type(exc).__name__}: {exc}. Other components "
                    f"still work; fix or uninstall '{self.distribution}', or set "
                    f"{BLOCK_ENV}={self.distribution} to ignore it."
                ) from exc
        return self.factory


_discovered: dict[str, dict[str, list[Entry]]] = {}
_runtime: dict[str, dict[str, Entry]] = {}


def _check_kind(kind: str) -> str:
    return _kind(kind).name


def _blocked_distributions() -> set[str]:
    return {name.strip().lower() for name in os.environ.get(BLOCK_ENV, "").split(",") if name.strip()}


def _admitted(distribution: str) -> bool:
    if distribution.lower() == CORE_DISTRIBUTION:
        return True
    if os.environ.get(AUTOLOAD_ENV, "").strip().lower() in {"1", "true", "yes"}:
        return False
    return distribution.lower() not in _blocked_distributions()


def _discover(kind: str) -> dict[str, list[Entry]]:
    if kind not in _discovered:
        found: dict[str, list[Entry]] = {}
        for ep in importlib.metadata.entry_points(group=_kind(kind).group):
            dist = ep.dist.name if ep.dist is not None else "<unknown>"
            version = ep.dist.version if ep.dist is not None else "?"
            if not _admitted(dist):
                continue
            entries = found.setdefault(ep.name, [])
            # The same distribution can be visible twice on sys.path (an editable install beside
            # its egg-info); that is one registration, not a conflict.
            if not any(e.distribution == dist and e.target == ep.value for e in entries):
                entries.append(Entry(kind, ep.name, ep.value, dist, version, entry_point=ep))
        for name, entry in _runtime.get(kind, {}).items():
            found.setdefault(name, []).append(entry)
        for name, entries in found.items():
            if len(entries) > 1:
                warnings.warn(
                    f"{kind} '{name}' is registered by several distributions: "
                    f"{', '.join(e.provenance for e in entries)}; building it will fail until one is "
                    f"uninstalled or blocked with {BLOCK_ENV}",
                    stacklevel=3,
                )
        _discovered[kind] = found
    return _discovered[kind]


def refresh() -> None:
    """Forget what was discovered (after installing or uninstalling a plugin in this process)."""
    _discovered.clear()
    importlib.invalidate_caches()


def register(kind: str, name: str, factory: Callable[..., Any], distribution: str = "<runtime>") -> None:
    """Register a component in this process only (notebooks, tests); plugins use entry points."""
    _check_kind(kind)
    _runtime.setdefault(kind, {})[name] = Entry(kind, name, f"{getattr(factory, '__module__', '?')}:{getattr(factory, '__qualname__', factory)}",
                                 distribution, "-", factory=factory)
    _discovered.pop(kind, None)


def unregister(kind: str, name: str) -> None:
    """Undo `register`."""
    _runtime.get(_check_kind(kind), {}).pop(name, None)
    _discovered.pop(kind, None)


def available(kind: str) -> list[str]:
    """Sorted names of every component of `kind` (imports nothing)."""
    return sorted(_discover(_check_kind(kind)))


def entries(kind: str) -> dict[str, list[Entry]]:
    """Every registration of `kind` by name; more than one entry for a name is a conflict."""
    return dict(_discover(_check_kind(kind)))


def describe(kind: str) -> str:
    """'name (distribution version), ...' for error messages."""
    items = [f"{name} ({', '.join(e.provenance for e in regs)})" for name, regs in sorted(_discover(kind).items())]
    return ", ".join(items) if items else "(none installed)"


def resolve(kind: str, name: str) -> Entry:
    """The single registration of `name`, or an error that lists what is available."""
    found = _discover(_check_kind(kind))
    if name not in found:
        close = difflib.get_close_matches(str(name), list(found), n=3)
        # Prefer a transposition ("ddmi" -> "ddim") over an equally similar other name.
        close.sort(key=lambda candidate: sorted(candidate) != sorted(str(name)))
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ComponentNotFoundError(
            f"unknown {kind} '{name}'.{hint} Available {_kind(kind).plural_name}: {describe(kind)}. A plugin package "
            f"registers more under the entry-point group '{_kind(kind).group}'."
        )
    regs = found[name]
    if len(regs) > 1:
        raise ComponentConflictError(
            f"{kind} '{name}' is registered by {len(regs)} distributions: "
            f"{', '.join(e.provenance + ' -> ' + e.target for e in regs)}. Uninstall one, or set "
            f"{BLOCK_ENV}=<distribution> to ignore it."
        )
    return regs[0]


def build(kind: str, name: str, **params: Any) -> Any:
    """Build the component `name` of `kind` with `params`; checks it honours its kind's contract."""
    from latentgen.config.containers import to_plain  # here: this module stays import-light

    entry = resolve(kind, name)
    factory = entry.load()
    params = {key: to_plain(value) for key, value in params.items()}
    try:
        inspect.signature(factory).bind(**params)
    except TypeError as exc:
        accepted = set(inspect.signature(factory).parameters)
        unknown = [f"{kind}.{key}" for key in params if key not in accepted]
        what = f"has no parameter {', '.join(unknown)}" if unknown else f"cannot take these parameters: {exc}"
        raise ConfigError(f"{kind} '{name}' ({entry.provenance}) {what}; it takes: {_parameters(factory)}") from exc
    except ValueError:  # a builtin without a signature: let the call itself decide
        pass
    try:
        component = factory(**params)
    except LatentgenError:
        raise
    except (ValueError, TypeError) as exc:  # a refused parameter value: say which component refused it
        raise ConfigError(f"{kind} '{name}' ({entry.provenance}) refused its parameters: {exc}") from exc
    except (Exception, SystemExit) as exc:  # a bug in the component: name it and where it comes from
        raise PluginLoadError(f"{kind} '{name}' from distribution '{entry.distribution}' ({entry.target}) failed to "
                              f"build: {type(exc).__name__}: {exc}") from exc
    base = base_class(kind)
    if not isinstance(component, base):
        raise PluginLoadError(
            f"{kind} '{name}' from '{entry.distribution}' built a {type(component).__name__}, which is "
            f"not a {base.__module__}.{base.__qualname__}; a {kind} must subclass it"
        )
    component.registry_name = name
    component.registry_distribution = entry.distribution
    component.registry_version = entry.version
    # What rebuilds it: a checkpoint stores these instead of any code.
    component.build_params = params
    return component


def _parameters(factory: Callable[..., Any]) -> str:
    try:
        names = [p for p in inspect.signature(factory).parameters if p != "self"]
    except ValueError:
        return "(unknown)"
    return ", ".join(names) if names else "(no parameters)"


def base_class(kind: str) -> type:
    """The abstract base class every component of `kind` subclasses."""
    return _kind(kind).base_class()


def config_packages() -> list[tuple[str, str]]:
    """(package, distribution) of every admitted plugin's Hydra presets (entry-point group
    `latentgen.configs`); imports nothing."""
    found = []
    for ep in importlib.metadata.entry_points(group=CONFIGS_GROUP):
        dist = ep.dist.name if ep.dist is not None else "<unknown>"
        if _admitted(dist) and (ep.value, dist) not in found:
            found.append((ep.value, dist))
    return sorted(found)

"""The contract rules every kind shares: naming the subject, rebuilding it from its configuration, and
carrying its weights through a safetensors file.

A check function (`check_codec`, `check_denoiser`, ...) wraps its argument in a `Subject`, which makes
fresh instances on demand and phrases every failure as an AssertionError naming the component and the
broken rule. The rebuild rules apply to a component built through `latentgen.registry.build` (it then
carries `registry_name` and `build_params`); the check functions return the names of the rules they
verified, so a test can assert that none was left out.
"""

from __future__ import annotations

import copy
import os
import tempfile
from typing import Any, Callable, NoReturn

import torch
from torch import nn

from latentgen import registry

# Rule names shared by the check functions' return values.
REGISTRY_RULE = "rebuilt by latentgen.registry.build from its name and build_params"
HYDRA_RULE = "rebuilt through its Hydra config option"
STATE_DICT_RULE = "state dict round trip through safetensors"


class Subject:
    """The component under test: a factory of fresh instances, and how to name it in a failure."""

    def __init__(self, kind: str, component: Any):
        base = registry.base_class(kind)
        self.kind = kind
        if isinstance(component, base):
            # Fresh deep copies: the checks change modes, dtypes and weights, never the caller's instance.
            self._make = lambda: copy.deepcopy(component)
        elif callable(component):
            self._make = component
        else:
            raise TypeError(f"check_{kind} takes a {base.__name__} or a callable returning one; got {type(component).__name__}")
        self.label = f"{kind} {type(component).__name__}"
        first = self.make()
        self.label = f"{kind} '{first.name}'" + (f" ({first.registry_distribution})"
                                                 if hasattr(first, "registry_distribution") else "")
        self.first = first

    def make(self) -> Any:
        """A fresh instance; an nn.Module comes in eval mode (dropout off) so that outputs are comparable."""
        component = self._make()
        base = registry.base_class(self.kind)
        if not isinstance(component, base):
            self.fail("factory", f"the factory returned a {type(component).__name__}, which is not a "
                                 f"{base.__module__}.{base.__qualname__}")
        if isinstance(component, nn.Module):
            component.eval()
        return component

    def fail(self, rule: str, detail: str) -> NoReturn:
        raise AssertionError(f"{self.label} breaks the {self.kind} contract: {rule}: {detail}")

    def require(self, condition: bool, rule: str, detail: str | Callable[[], str]) -> None:
        if not condition:
            self.fail(rule, detail() if callable(detail) else detail)

    def run(self, rule: str, call: Callable[[], Any]) -> Any:
        """Call `call`; an exception becomes a failure of `rule` that names the component."""
        try:
            return call()
        except AssertionError:
            raise
        except Exception as exc:
            self.fail(rule, f"raised {type(exc).__name__}: {exc}")


def same(a: Any, b: Any) -> bool:
    """Bitwise equality of tensors, or of dicts of tensors with the same keys."""
    if isinstance(a, dict) or isinstance(b, dict):
        return isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


def close(actual: torch.Tensor, expected: torch.Tensor, relative: float) -> bool:
    """Error relative to the expected tensor's largest magnitude (robust to entries near 0)."""
    scale = expected.double().abs().max().clamp_min(1e-6)
    return bool(((actual.double() - expected.double()).abs().max() / scale) <= relative)


def describe_difference(actual: torch.Tensor, expected: torch.Tensor) -> str:
    return f"max abs difference {(actual.double() - expected.double()).abs().max().item():.3g}"


@torch.no_grad()
def perturb_parameters(module: nn.Module, seed: int = 123) -> None:
    """Add noise to every floating-point parameter, so that a module whose weights were loaded afterwards
    cannot pass for one whose load silently did nothing."""
    generator = torch.Generator().manual_seed(seed)
    for parameter in module.parameters():
        if parameter.is_floating_point():
            parameter.add_(torch.randn(parameter.shape, generator=generator).to(parameter.dtype) * 0.1)


def state_dict_round_trip(subject: Subject, original: nn.Module, fresh: nn.Module,
                          outputs: Callable[[nn.Module], Any], rule: str = STATE_DICT_RULE,
                          expected: Any = None) -> None:
    """Save `original`'s state dict to a safetensors file, load it strictly into `fresh` (perturbed first)
    and require bitwise-identical outputs (`expected`: `outputs(original)`, if already known)."""
    from safetensors.torch import load_file, save_file

    expected = outputs(original) if expected is None else expected
    perturb_parameters(fresh)
    state = {key: value.detach().clone().contiguous().cpu() for key, value in original.state_dict().items()}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "weights.safetensors")
        subject.run(rule, lambda: save_file(state, path))
        loaded = load_file(path)
    result = fresh.load_state_dict(loaded, strict=False)
    subject.require(not result.missing_keys and not result.unexpected_keys, rule,
                    lambda: f"the saved state dict does not fit a fresh instance: missing {result.missing_keys[:3]}, "
                            f"unexpected {result.unexpected_keys[:3]}")
    subject.require(same(outputs(fresh), expected), rule,
                    "a fresh instance loaded with the saved weights gives different outputs (state that "
                    "is not in the state dict, or a non-deterministic forward pass)")


def registry_rebuild(subject: Subject, component: Any) -> Any | None:
    """The component rebuilt by `registry.build(kind, registry_name, **build_params)`, checked to be of the
    same type; None if it was not built through the registry."""
    if not hasattr(component, "registry_name"):
        return None
    name, params = component.registry_name, component.build_params
    rebuilt = subject.run(REGISTRY_RULE, lambda: registry.build(subject.kind, name, **params))
    subject.require(type(rebuilt) is type(component), REGISTRY_RULE,
                    f"registry.build('{subject.kind}', '{name}', **{params}) gives a {type(rebuilt).__name__}, "
                    f"not a {type(component).__name__}")
    if isinstance(rebuilt, nn.Module):
        rebuilt.eval()
    return rebuilt


_OPTIONS: dict[tuple[str, str], str | None] = {}


def hydra_option(kind: str, name: str) -> str | None:
    """The option of Hydra group `kind` that selects the registered component `name`: the option of that
    name, or else (for names Hydra cannot take as options, such as `null`) a YAML option naming it."""
    if (kind, name) not in _OPTIONS:
        from latentgen.config import compose, group_options

        options = group_options(kind)
        found = name if name in options else None
        for option in options if found is None else ():
            if compose("train", [f"{kind}={option}"])[kind].get("name") == name:  # what the search order gives
                found = option
                break
        _OPTIONS[(kind, name)] = found
    return _OPTIONS[(kind, name)]


def hydra_rebuild(subject: Subject, component: Any) -> Any | None:
    """The component rebuilt with `hydra.utils.instantiate` from its Hydra option's node (its `_target_`,
    `kind` and `name`) with `build_params` as the values; None if it was not built through the registry."""
    if not hasattr(component, "registry_name"):
        return None
    from hydra.utils import instantiate

    from latentgen.config import compose

    name = component.registry_name
    option = hydra_option(subject.kind, name)
    subject.require(option is not None, HYDRA_RULE,
                    f"no option of the Hydra group '{subject.kind}' selects it; every registered component "
                    f"is one (latentgen.config.register_component_options)")
    node = compose("train", [f"{subject.kind}={option}"])[subject.kind]
    identity = {"_target_": node.get("_target_"), "kind": node.get("kind"), "name": node.get("name")}
    subject.require(identity == {"_target_": "latentgen.registry.build", "kind": subject.kind, "name": name}, HYDRA_RULE,
                    f"option {subject.kind}={option} composes to {identity}; it must name the component through "
                    f"the registry: _target_: latentgen.registry.build, kind: {subject.kind}, name: {name}")
    rebuilt = subject.run(HYDRA_RULE, lambda: instantiate({**identity, **component.build_params}))
    subject.require(type(rebuilt) is type(component), HYDRA_RULE,
                    f"instantiating {subject.kind}={option} gives a {type(rebuilt).__name__}, not a "
                    f"{type(component).__name__}")
    if isinstance(rebuilt, nn.Module):
        rebuilt.eval()
    return rebuilt


def check_rebuilds(subject: Subject, original: Any, outputs: Callable[[Any], Any], checked: list[str],
                   declared: Callable[[Any], Any] | None = None) -> None:
    """State dict round trip (for modules) into a fresh instance, and, for a registry-built component, into
    its registry and Hydra rebuilds (for modules, loaded with the original's weights); each must reproduce
    `outputs` exactly and the `declared` capabilities."""
    fresh_instances = [(STATE_DICT_RULE, subject.make())] if isinstance(original, nn.Module) else []
    for rule, rebuild in ((REGISTRY_RULE, registry_rebuild), (HYDRA_RULE, hydra_rebuild)):
        rebuilt = rebuild(subject, original)
        if rebuilt is not None:
            fresh_instances.append((rule, rebuilt))
    expected = outputs(original)
    for rule, fresh in fresh_instances:
        if declared is not None:
            subject.require(declared(fresh) == declared(original), rule,
                            f"declares {declared(fresh)}, the original {declared(original)}")
        if isinstance(original, nn.Module):
            state_dict_round_trip(subject, original, fresh, outputs, rule, expected)
        else:
            subject.require(same(outputs(fresh), expected), rule, "gives different outputs")
        checked.append(rule)

"""Typed settings: dataclass schemas whose fields carry their allowed range, and one function that turns a
config node into a checked instance, failing with one line that names the key, the value and the range.

Types are converted by OmegaConf's structured configs (a Hydra override `steps=5` arrives as 5, `lr=1e-3`
as 0.001); ranges, choices and finiteness are checked here. The apps call `parse` on their composed
config before they compute anything.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import typing
from typing import Any, Mapping, Sequence, TypeVar

from latentgen.errors import ConfigError, SettingTypeError

T = TypeVar("T")
_MISSING = dataclasses.MISSING


def setting(default: Any = _MISSING, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
            lt: float | None = None, choices: Sequence[Any] | None = None, help: str = "",
            default_factory: Any = _MISSING) -> Any:
    """A dataclass field with its allowed values: bounds (ge/gt/le/lt) and/or choices; `help` says what it is."""
    metadata = {"ge": ge, "gt": gt, "le": le, "lt": lt, "choices": tuple(choices) if choices is not None else None,
                "help": help}
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def allowed(meta: Mapping[str, Any], annotation: Any) -> str:
    """The allowed values of a field (its metadata and type), in words: 'an integer >= 1', 'one of fp32,
    bf16, fp16', ..."""
    if meta.get("choices"):
        text = "one of " + ", ".join(str(choice) for choice in meta["choices"])
    else:
        bounds = [f"{symbol} {meta[key]}" for key, symbol in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
                  if meta.get(key) is not None]
        text = _type_name(annotation) + (" " + " and ".join(bounds) if bounds else "")
    return text + (" or null" if _optional(annotation) and annotation is not Any else "")


def parse(schema: type[T], node: Mapping[str, Any] | None, prefix: str = "") -> T:
    """`node` as a checked `schema` instance: unknown keys, unconvertible values and values out of range
    raise a ConfigError naming `prefix.key`, the value and what is allowed."""
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

    _refuse_numbers_as_switches(schema, node, prefix)
    structured = OmegaConf.structured(schema)
    try:
        merged = OmegaConf.merge(structured, node or {})
    except ConfigKeyError as exc:
        key = _dotted(prefix, str(exc.full_key or exc.key))
        names = [_dotted(prefix, name) for name in _field_names(schema, key, prefix)]
        close = difflib.get_close_matches(key, names, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise ConfigError(f"{key}: no such setting; {hint}the settings here are {', '.join(names)}") from None
    except OmegaConfBaseException as exc:
        key = str(exc.full_key or exc.key or "")
        value = _select(node, key)
        found = _field(schema, key)
        expected = allowed(*found) if found is not None else "a value of another type"
        raise ConfigError(f"{_dotted(prefix, key)}={value!r}: must be {expected}") from None
    instance = OmegaConf.to_object(merged)
    check(instance, prefix)
    return instance


def check(instance: Any, prefix: str = "") -> None:
    """Check every field of a schema instance (recursively) against its type and allowed values: what `parse`
    does after conversion, and what code building an instance directly (the Python API) relies on."""
    hints = typing.get_type_hints(type(instance))
    for field in dataclasses.fields(instance):
        value = getattr(instance, field.name)
        key = _dotted(prefix, field.name)
        if dataclasses.is_dataclass(value):
            check(value, key)
            continue
        if value is None:
            if not _optional(hints[field.name]):
                raise ConfigError(f"{key}=null: must be {allowed(field.metadata, hints[field.name])}")
            continue
        expected = allowed(field.metadata, hints[field.name])
        if _wrong_type(value, hints[field.name]):
            raise SettingTypeError(f"{key}={value!r}: must be {expected} (not a {type(value).__name__})")
        problem = _problem(value, field.metadata)
        if problem is not None:
            raise ConfigError(f"{key}={value!r}: must be {expected}{problem}")
    validate = getattr(instance, "validate", None)
    if validate is not None:
        validate(prefix)


def _refuse_numbers_as_switches(schema: type, node: Any, prefix: str) -> None:
    """OmegaConf turns any number into a bool (`tensorboard=2` becomes true); a switch takes true or false."""
    if not isinstance(node, Mapping):
        return
    hints = typing.get_type_hints(schema)
    for field in dataclasses.fields(schema):
        value, annotation = node.get(field.name), hints[field.name]
        if dataclasses.is_dataclass(annotation):
            _refuse_numbers_as_switches(annotation, value, _dotted(prefix, field.name))
        elif _scalar(annotation) is bool and isinstance(value, (int, float)) and not isinstance(value, bool):
            raise SettingTypeError(f"{_dotted(prefix, field.name)}={value!r}: must be true or false")


def as_plain(instance: Any) -> dict[str, Any]:
    """A schema instance as plain dicts and lists (what configs and checkpoints store)."""
    return dataclasses.asdict(instance)


def _wrong_type(value: Any, annotation: Any) -> bool:
    """Whether a non-None value is not of the field's scalar type (bool is no number; numpy scalars are)."""
    expected = _scalar(annotation)
    if expected is bool:
        return not isinstance(value, bool)
    if expected in (int, float):
        number = numbers.Integral if expected is int else numbers.Real
        return isinstance(value, bool) or not isinstance(value, number)
    if expected is str:
        return not isinstance(value, str)
    return False


_FAILS = {"ge": lambda value, bound: value < bound, "gt": lambda value, bound: value <= bound,
          "le": lambda value, bound: value > bound, "lt": lambda value, bound: value >= bound}


def _problem(value: Any, meta: Mapping[str, Any]) -> str | None:
    """None if `value` is allowed, else a remark to append to the message ('' when the range says it all)."""
    if meta.get("choices") and value not in meta["choices"]:
        return ""
    if isinstance(value, float) and not math.isfinite(value):
        return " (a finite number)"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if any(meta.get(key) is not None and fails(value, meta[key]) for key, fails in _FAILS.items()):
            return ""
    return None


def _scalar(annotation: Any) -> Any:
    """X for Optional[X], else the annotation itself."""
    if typing.get_origin(annotation) is typing.Union:
        return next(arg for arg in typing.get_args(annotation) if arg is not type(None))
    return annotation


def _type_name(annotation: Any) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    return names.get(_scalar(annotation), "a value")


def _optional(annotation: Any) -> bool:
    return annotation is Any or (typing.get_origin(annotation) is typing.Union
                                 and type(None) in typing.get_args(annotation))


def _dotted(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix and key else prefix or key


def _select(node: Any, key: str) -> Any:
    value = node
    for part in key.split(".") if key else []:
        value = value.get(part) if isinstance(value, Mapping) or hasattr(value, "get") else None
    return value


def _field(schema: type, key: str) -> tuple[Mapping[str, Any], Any] | None:
    """(metadata, type) of the field of a (nested) schema at a dotted key."""
    current, found = schema, None
    for part in key.split("."):
        if not (isinstance(current, type) and dataclasses.is_dataclass(current)):
            return None
        hints = typing.get_type_hints(current)
        field = next((f for f in dataclasses.fields(current) if f.name == part), None)
        if field is None:
            return None
        found, current = (field.metadata, hints[part]), hints[part]
    return found


def _field_names(schema: type, key: str, prefix: str) -> list[str]:
    """The names of the fields beside the unknown `key` (in the same nested schema)."""
    parts = key[len(prefix) + 1:].split(".") if prefix else key.split(".")
    current = schema
    for part in parts[:-1]:
        current = typing.get_type_hints(current).get(part, current)
    path = ".".join(parts[:-1])
    return [f"{path}.{f.name}" if path else f.name for f in dataclasses.fields(current)]

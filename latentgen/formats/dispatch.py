"""Which registered checkpoint format reads a file: ask every one's `sniff`, accept exactly one yes.

The pipeline loads and saves through here and so imports no format: latentgen's own and the original
Stable Diffusion file are registered under `latentgen.formats` exactly as a plugin's format is.
"""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path
from typing import Any, Mapping

from latentgen import registry
from latentgen.errors import CheckpointError, ConfigError, LatentgenError


def build_format(name: str) -> Any:
    return registry.build("format", str(name))


def format_for(path: str | Path, name: str | None = None) -> Any:
    """The format named `name`, or else the single registered format whose `sniff` claims `path`."""
    if name is not None:
        return build_format(name)
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint '{path}' does not exist; check the path (a training run writes "
                              f"<run dir>/checkpoints/last.safetensors)")
    claims = [fmt for fmt in _installed_formats() if _sniffs(fmt, path)]
    if len(claims) == 1:
        return claims[0]
    if claims:
        names = [f"'{fmt.name}' ({fmt.registry_distribution})" for fmt in claims]
        raise CheckpointError(f"'{path}' is claimed by {len(claims)} checkpoint formats: {', '.join(names)}; say which "
                              f"reads it: from_checkpoint(path, format='{claims[0].name}') "
                              f"(latentgen-sample: format={claims[0].name})")
    raise CheckpointError(_unclaimed(path))


def _installed_formats() -> list[Any]:
    formats = []
    for name in registry.available("format"):
        try:
            formats.append(build_format(name))
        except LatentgenError as exc:  # a broken format plugin must not stop the others from reading files
            warnings.warn(f"checkpoint format '{name}' skipped: {exc}", stacklevel=3)
    return formats


def _sniffs(fmt: Any, path: Path) -> bool:
    try:
        return bool(fmt.sniff(path))
    except Exception as exc:  # a plugin's sniff must never stop the others
        warnings.warn(f"checkpoint format '{fmt.name}' ({fmt.registry_distribution}) failed to sniff '{path}' "
                      f"({type(exc).__name__}: {exc}); treated as not reading it", stacklevel=3)
        return False


def _unclaimed(path: Path) -> str:
    """Why no format reads `path`: what is wrong with the file if it is a broken safetensors file, else
    which formats are installed and what each reads."""
    from latentgen.checkpoint import read_header

    if path.is_dir():
        what = "a directory no installed checkpoint format reads (pass the checkpoint file inside it)"
    else:
        header = read_header(path)  # raises, naming the problem, for an empty, truncated or corrupt file
        keys = [key for key in header if key != "__metadata__"]
        what = f"a safetensors file that no installed checkpoint format reads (first keys: {keys[:3]})"
    described = "; ".join(f"{fmt.name} ({fmt.registry_distribution}): {fmt.summary}" for fmt in _installed_formats())
    return (f"'{path}' is {what}. The installed formats: {described}. A plugin that registers a format under "
            f"'latentgen.formats' adds more")


def call_with_options(fmt: Any, method: str, args: tuple, options: Mapping[str, Any]) -> Any:
    """fmt.<method>(*args, **options), refusing options the format does not take by name."""
    check_options(fmt, method, args, options)
    return getattr(fmt, method)(*args, **options)


def check_options(fmt: Any, method: str, args: tuple, options: Mapping[str, Any]) -> None:
    """Refuse, by name, options that fmt.<method> does not take (before anything is read or written)."""
    function = getattr(fmt, method)
    try:
        inspect.signature(function).bind(*args, **options)
    except TypeError as exc:
        parameters = inspect.signature(function).parameters
        accepted = [name for name in parameters if name not in ("path", "pipeline")]
        unknown = [name for name in options if name not in parameters]
        what = f"does not take the option {', '.join(unknown)}" if unknown else f"cannot {method} with these options: {exc}"
        raise ConfigError(f"checkpoint format '{fmt.name}' {what} (to {method}); it takes "
                          f"{', '.join(accepted) or 'no options'}") from exc

"""The abstract base classes of the component kinds (one file each), and the conditioning vocabulary.

Every base class named in `latentgen.kinds.KINDS` under this package is importable from here
(`from latentgen.contracts import Codec`), imported when first asked for.
"""

from __future__ import annotations

from latentgen.kinds import KINDS

_BASES = {kind.base.rpartition(":")[2]: kind for kind in KINDS if kind.base.startswith(f"{__name__}.")}
__all__ = sorted(_BASES)


def __getattr__(name: str):
    if name in _BASES:
        return _BASES[name].base_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_BASES])

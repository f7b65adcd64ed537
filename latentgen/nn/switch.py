"""A process-wide on/off setting with a `with` block that sets it and restores what was there before."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Generic, Iterator, TypeVar

T = TypeVar("T")


class Switch(Generic[T]):
    """`value` is read where the setting applies; `set(v)` is a context manager for a stretch of code (to measure
    a lever or rule it out), restoring the previous value on the way out, also on an exception."""

    def __init__(self, value: T) -> None:
        self.value = value

    @contextmanager
    def set(self, value: T) -> Iterator[None]:
        previous, self.value = self.value, value
        try:
            yield
        finally:
            self.value = previous

"""The registry of quantization algorithms by name: each module registers its class with `register`."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import SpecError

if TYPE_CHECKING:
    from .base import Algorithm

ALGORITHMS: dict[str, type[Algorithm]] = {}


def register(cls: type[Algorithm]) -> type[Algorithm]:
    ALGORITHMS[cls.name] = cls
    return cls


def get_algorithm(name: str) -> type[Algorithm]:
    if name not in ALGORITHMS:
        raise SpecError(f"unknown algorithm {name!r}", f"choose one of {', '.join(sorted(ALGORITHMS))}")
    return ALGORITHMS[name]

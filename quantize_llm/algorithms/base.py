"""The Algorithm protocol and the context the runner hands it for each decoder block."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar, Protocol

from torch import Tensor, nn

from ..qweight import QuantizedWeight
from ..spec import QuantSpec


@dataclass
class LayerContext:
    """What an algorithm may use to quantize one decoder block.

    index     block number
    weights   local Linear name -> weight (out, in) on the work device, only those to quantize
    block     the materialized block module when the algorithm needs calibration, else None
    report    callback taking (linear name, metrics dict) for the per-layer report
    """

    index: int
    weights: dict[str, Tensor]
    block: nn.Module | None = None
    report: Callable[[str, dict], None] = field(default=lambda name, metrics: None)


class Algorithm(Protocol):
    name: ClassVar[str]
    needs_calibration: ClassVar[bool]

    def __init__(self, spec: QuantSpec, options: object | None = None) -> None: ...

    def observe(self, linear_name: str, x: Tensor) -> None:
        """Accumulate statistics from one Linear's input x (tokens, in)."""

    def quantize_layer(self, layer: LayerContext) -> dict[str, QuantizedWeight]:
        """Quantize the Linears of one block; returns local name -> result."""

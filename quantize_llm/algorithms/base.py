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
    input_of  local Linear name -> the name its input statistics were observed under (Linears
              that share an input, like q/k/v, are observed once, under the group's first name)
    block     the materialized block module when the algorithm needs calibration, else None
    report    callback taking (linear name, metrics dict) for the per-layer report
    """

    index: int
    weights: dict[str, Tensor]
    input_of: dict[str, str] = field(default_factory=dict)
    block: nn.Module | None = None
    report: Callable[[str, dict], None] = field(default=lambda name, metrics: None)


class Algorithm(Protocol):
    name: ClassVar[str]
    needs_calibration: ClassVar[bool]

    def __init__(self, spec: QuantSpec, options: object | None = None) -> None: ...

    def observe(self, linear_name: str, x: Tensor) -> None:
        """Accumulate statistics from the input x (..., in) of a Linear (or group sharing it)."""

    def quantize_layer(self, layer: LayerContext) -> dict[str, QuantizedWeight]:
        """Quantize the Linears of one block; returns local name -> result."""

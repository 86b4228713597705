"""The Format protocol: pack a QuantizedWeight into named tensors and read it back."""
from __future__ import annotations

from typing import Any, ClassVar, Mapping, Protocol

from torch import Tensor

from ..qweight import QuantizedWeight
from ..spec import QuantSpec


class Format(Protocol):
    """One on-disk layout. Stateless; formats never quantize, they pack and unpack."""

    name: ClassVar[str]
    tensor_names: ClassVar[tuple[str, ...]]   # local names a quantized module stores (no prefix)

    @staticmethod
    def supports(spec: QuantSpec) -> str | None:
        """None when the format can hold results of `spec`, else the reason and the fix."""

    @staticmethod
    def check_shape(spec: QuantSpec, out_features: int, in_features: int) -> str | None:
        """None when a Linear of this shape can be stored, else the reason."""

    @staticmethod
    def min_zero(spec: QuantSpec) -> int:
        """Smallest integer zero point the format can store for `spec`."""

    @staticmethod
    def encode(qw: QuantizedWeight) -> dict[str, Tensor]:
        """Tensors for one Linear, with local names (no module prefix)."""

    @staticmethod
    def decode(tensors: Mapping[str, Tensor], qconfig: Mapping[str, Any]) -> QuantizedWeight:
        """Inverse of `encode`, given the checkpoint's `quantization_config`."""

    @staticmethod
    def quantization_config(spec: QuantSpec, modules_in_block: list[list[str]],
                            extra: Mapping[str, Any]) -> dict[str, Any]:
        """The `quantization_config` object for config.json."""

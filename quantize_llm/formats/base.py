"""The Format protocol: pack a QuantizedWeight into named tensors and read it back."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping, Protocol, Sequence

import torch
from torch import Tensor

from ..qweight import QuantizedWeight
from ..spec import QuantSpec


@dataclass(frozen=True)
class ModuleHeader:
    """What a quantized module's stored tensors say about it (for `quantize-llm inspect`)."""

    bits: int
    group_size: int               # integer grids: weights per scale (-1 = channel); codebooks: block size
    sym: bool
    shape: tuple[int, int]        # (out_features, in_features)
    codebook: str = "int"


class Format(Protocol):
    """One on-disk layout. Stateless; formats never quantize, they pack and unpack."""

    name: ClassVar[str]
    quant_method: ClassVar[str]               # `quant_method` in quantization_config
    tensor_names: ClassVar[tuple[str, ...]]   # local names a quantized module stores (no prefix)
    markers: ClassVar[tuple[str, ...]]        # a module is quantized iff it stores one of these
    bias_dtype: ClassVar[torch.dtype | None]  # dtype biases are written in; None keeps the checkpoint's
    config_file: ClassVar[str | None]         # extra file holding quantization_config, if any
    description: ClassVar[str]                # "the ... layout that ... load", for the model card

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
    def describe(qconfig: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]],
                 read: Callable[[str], Tensor]) -> ModuleHeader:
        """A module's header from its local tensor shapes; `read(local name)` loads a small tensor."""

    @staticmethod
    def quantization_config(spec: QuantSpec, modules_in_block: list[list[str]], extra: Mapping[str, Any], *,
                            dense_modules: Sequence[str] = (), dtype: str | None = None) -> dict[str, Any]:
        """The `quantization_config` object for config.json.

        dense_modules: every Linear left unquantized (full names); dtype: the model's dtype name.
        """

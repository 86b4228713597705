"""Round-to-nearest: min-max scale and zero per group, no calibration."""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from ..primitives import default_g_idx, quantize_codes, rtn_group_params
from ..qweight import QuantizedWeight
from ..spec import QuantSpec
from . import register
from .base import LayerContext


@torch.no_grad()
def rtn_quantize(weight: Tensor, spec: QuantSpec) -> QuantizedWeight:
    """Quantize a (out, in) weight to the nearest point of its group's min-max grid.

    Does not modify `weight`; works in float32 whatever its dtype.
    """
    w = weight.float()
    scale, zero = rtn_group_params(w, spec.bits, spec.group_size, spec.sym, spec.min_zero)
    g_idx = default_g_idx(w.shape[1], spec.group_size, w.device)
    codes = quantize_codes(w, scale, zero, g_idx, spec.bits)
    return QuantizedWeight(codes=codes, scale=scale, zero=zero, g_idx=None, spec=spec)


@register
class RTN:
    name: ClassVar[str] = "rtn"
    needs_calibration: ClassVar[bool] = False

    def __init__(self, spec: QuantSpec, options: object | None = None) -> None:
        self.spec = spec

    def observe(self, linear_name: str, x: Tensor) -> None:
        """RTN needs no statistics."""

    def quantize_layer(self, layer: LayerContext) -> dict[str, QuantizedWeight]:
        return {name: rtn_quantize(w, self.spec) for name, w in layer.weights.items()}

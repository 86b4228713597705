"""Round-to-nearest: min-max scale and zero per group, no calibration."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..core.primitives import CLIPS, default_g_idx, quantize_codes, rtn_group_params
from ..core.qweight import QuantizedWeight
from ..core.spec import MethodRecord, QuantSpec
from ..errors import SpecError
from .base import LayerContext, naming
from .registry import register

ROWS_ELEMENTS = 1 << 22   # elements per slice of rows processed at once (16 MiB in float32)


@dataclass(frozen=True)
class RTNOptions:
    clip: str = "minmax"      # group range: min-max, or "mse" (shrink it where rounding error drops)

    def __post_init__(self) -> None:
        if self.clip not in CLIPS:
            raise SpecError(f"--clip {self.clip} is not known",
                            f"choose one of {', '.join(CLIPS)}; minmax is the default")


@torch.no_grad()
def rtn_quantize(weight: Tensor, spec: QuantSpec, clip: str = "minmax") -> QuantizedWeight:
    """Quantize a (out, in) weight to the nearest point of its group's min-max grid.

    Does not modify `weight`; works in float32 whatever its dtype.
    """
    out_features, in_features = weight.shape
    g_idx = default_g_idx(in_features, spec.group_size, weight.device)
    codes = torch.empty(out_features, in_features, dtype=torch.uint8, device=weight.device)
    n_groups = spec.n_groups(in_features)
    scale = torch.empty(out_features, n_groups, dtype=torch.float16, device=weight.device)
    zero = torch.empty(out_features, n_groups, dtype=torch.int32, device=weight.device)
    # Rows are independent: work on slices so float32 temporaries stay small for large layers.
    step = max(1, ROWS_ELEMENTS // in_features)
    for r in range(0, out_features, step):
        w = weight[r:r + step].float()                                  # (rows, in)
        s, z = rtn_group_params(w, spec.bits, spec.group_size, spec.sym, spec.min_zero, clip)
        codes[r:r + step] = quantize_codes(w, s, z, g_idx, spec.bits)
        scale[r:r + step], zero[r:r + step] = s, z
    return QuantizedWeight(codes=codes, scale=scale, zero=zero, g_idx=None, spec=spec)


@register
class RTN:
    name: ClassVar[str] = "rtn"
    needs_calibration: ClassVar[bool] = False
    codebooks: ClassVar[tuple[str, ...]] = ("int",)
    prepare_block = None

    def __init__(self, spec: QuantSpec, options: RTNOptions | None = None) -> None:
        self.spec = spec
        self.options = options or RTNOptions()

    def observe(self, linear_name: str, x: Tensor) -> None:
        """RTN needs no statistics."""

    def record(self) -> MethodRecord:
        return MethodRecord()

    def quantize_layer(self, layer: LayerContext) -> dict[str, QuantizedWeight]:
        results = {}
        for name, w in layer.weights.items():
            with naming(layer.full_name(name)):
                results[name] = rtn_quantize(w, layer.spec_of(name, self.spec), self.options.clip)
        return results

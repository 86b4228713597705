"""QuantizedWeight: the algorithm-neutral result for one Linear, and what it means."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .primitives import default_g_idx, dequantize_codes
from .spec import QuantSpec


@dataclass(frozen=True)
class QuantizedWeight:
    """One quantized Linear weight, unpacked, in canonical order.

    codes   uint8 (out, in)       integer codes in [0, 2^bits), original input-column order
    scale   float16 (out, G)      per-group scale, G = spec.n_groups(in)
    zero    int32 (out, G)        integer zero point; a symmetric spec holds 2^(bits-1) everywhere
    g_idx   int32 (in,) or None   group of each input column; None means i // group_size
    spec    QuantSpec             bits, group size, sym, ... that produced it

    Formats pack and unpack these fields; `dequantize()` defines what they mean.
    """

    codes: Tensor
    scale: Tensor
    zero: Tensor
    g_idx: Tensor | None
    spec: QuantSpec

    def __post_init__(self) -> None:
        out_features, in_features = self.codes.shape
        if self.scale.shape != self.zero.shape or self.scale.shape[0] != out_features:
            raise ValueError(f"scale {tuple(self.scale.shape)} and zero {tuple(self.zero.shape)} "
                             f"do not fit codes {tuple(self.codes.shape)}")
        if self.g_idx is not None and self.g_idx.shape != (in_features,):
            raise ValueError(f"g_idx {tuple(self.g_idx.shape)} does not fit {in_features} inputs")

    @property
    def shape(self) -> tuple[int, int]:
        """(out_features, in_features)."""
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def group_index(self) -> Tensor:
        """g_idx, or the default i // group_size when none is stored; int32 (in,)."""
        if self.g_idx is not None:
            return self.g_idx
        return default_g_idx(self.shape[1], self.spec.group_size, self.codes.device)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight this result stands for: (out, in) in `dtype`, w = scale * (code - zero)."""
        return dequantize_codes(self.codes, self.scale, self.zero, self.group_index(), dtype)

    def to(self, device: torch.device | str) -> "QuantizedWeight":
        move = (lambda t: None if t is None else t.to(device))  # noqa: E731
        return QuantizedWeight(move(self.codes), move(self.scale), move(self.zero),
                               move(self.g_idx), self.spec)

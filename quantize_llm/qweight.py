"""QuantizedWeight: the algorithm-neutral result for one Linear, and what it means."""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from . import nf4codes
from .primitives import default_g_idx, dequantize_codes
from .spec import QuantSpec


@dataclass(frozen=True)
class NestedAbsmax:
    """A double-quantized absmax: bitsandbytes' nested statistics (FORMATS.md §3.3).

    codes     uint8 (nblocks,)               index into code_map, one per weight block
    absmax    float32 (ceil(nblocks/256),)   max |absmax - offset| over each 256 consecutive blocks
    offset    float                          mean of the exact absmax (holds a float32 value)
    code_map  float32 (256,)                 the signed 8-bit dynamic map (nf4codes.dynamic_map)

    absmax[b] = code_map[codes[b]] * absmax[b // 256] + offset, in float32.
    """

    codes: Tensor
    absmax: Tensor
    offset: float
    code_map: Tensor

    def __post_init__(self) -> None:
        want = -(-self.codes.numel() // nf4codes.NESTED_BLOCKSIZE)
        if self.codes.dim() != 1 or tuple(self.absmax.shape) != (want,) or tuple(self.code_map.shape) != (256,):
            raise ValueError(f"nested absmax: codes {tuple(self.codes.shape)}, absmax "
                             f"{tuple(self.absmax.shape)} and code map {tuple(self.code_map.shape)} do not fit")

    @property
    def numel(self) -> int:
        return self.codes.numel()

    def dequantize(self) -> Tensor:
        """The absmax it stands for, float32 (nblocks,)."""
        return nf4codes.dequantize_absmax(self.codes, self.absmax, self.offset, self.code_map)

    def to(self, device: torch.device | str) -> "NestedAbsmax":
        return NestedAbsmax(self.codes.to(device), self.absmax.to(device), self.offset, self.code_map.to(device))


@dataclass(frozen=True)
class QuantizedWeight:
    """One quantized Linear weight, unpacked, in canonical order.

    Integer grid (spec.codebook == "int"):
    codes   uint8 (out, in)       integer codes in [0, 2^bits), original input-column order
    scale   float16 (out, G)      per-group scale, G = spec.n_groups(in)
    zero    int32 (out, G)        integer zero point; a symmetric spec holds 2^(bits-1) everywhere
    g_idx   int32 (in,) or None   group of each input column; None means i // group_size
    w = scale * (code - zero)

    4-bit codebook (spec.codebook "nf4" or "fp4", bitsandbytes' layout, FORMATS.md §3):
    codes   uint8 (out, in)       index into the codebook's 16 values (nf4codes.code_table)
    scale   float32 (nblocks,)    absmax of each block of spec.blocksize consecutive values of the
            or NestedAbsmax       row-major flattened weight (nblocks = ceil(out*in / blocksize),
                                  the last block may be partial); a NestedAbsmax when
                                  double-quantized (spec.double_quant)
    zero    None
    g_idx   None
    w = table[code] * absmax[flat index // blocksize], in float32

    Both:
    spec          QuantSpec             bits, group size, codebook, ... that produced it
    source_dtype  torch.dtype or None   dtype of the weight it was made from (bitsandbytes records
                                        it); None when unknown

    Formats pack and unpack these fields; `dequantize()` defines what they mean.
    """

    codes: Tensor
    scale: Tensor | NestedAbsmax
    zero: Tensor | None
    g_idx: Tensor | None
    spec: QuantSpec
    source_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        out_features, in_features = self.codes.shape
        if self.is_codebook:
            nblocks = -(-out_features * in_features // self.spec.blocksize)
            n = self.scale.numel if isinstance(self.scale, NestedAbsmax) else self.scale.numel()
            if self.zero is not None or self.g_idx is not None or n != nblocks:
                raise ValueError(f"a {self.spec.codebook} result needs {nblocks} absmax values for "
                                 f"codes {tuple(self.codes.shape)}, no zero and no g_idx")
            return
        if isinstance(self.scale, NestedAbsmax) or self.zero is None:
            raise ValueError("an integer-grid result needs a float16 scale and a zero tensor")
        if self.scale.shape != self.zero.shape or self.scale.shape[0] != out_features:
            raise ValueError(f"scale {tuple(self.scale.shape)} and zero {tuple(self.zero.shape)} "
                             f"do not fit codes {tuple(self.codes.shape)}")
        if self.g_idx is not None and self.g_idx.shape != (in_features,):
            raise ValueError(f"g_idx {tuple(self.g_idx.shape)} does not fit {in_features} inputs")

    @property
    def shape(self) -> tuple[int, int]:
        """(out_features, in_features)."""
        return tuple(self.codes.shape)  # type: ignore[return-value]

    @property
    def is_codebook(self) -> bool:
        """True for 4-bit codebook results (NF4/FP4), False for integer grids."""
        return self.spec.codebook != "int"

    def scale_tensor(self) -> Tensor:
        """The float scale: `scale` itself, or the nested absmax dequantized (float32 (nblocks,))."""
        return self.scale.dequantize() if isinstance(self.scale, NestedAbsmax) else self.scale

    def group_index(self) -> Tensor:
        """g_idx, or the default i // group_size when none is stored; int32 (in,)."""
        if self.is_codebook:
            raise ValueError("codebook results have blocks over the flattened weight, not groups")
        if self.g_idx is not None:
            return self.g_idx
        return default_g_idx(self.shape[1], self.spec.group_size, self.codes.device)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight this result stands for: (out, in) in `dtype` (see the class docstring)."""
        if self.is_codebook:
            w = nf4codes.dequantize_4bit(self.codes, self.scale_tensor(), self.spec.codebook, self.spec.blocksize)
            return w.to(dtype)
        return dequantize_codes(self.codes, self.scale, self.zero, self.group_index(), dtype)

    def dequantize_rows(self, start: int, stop: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """Rows start:stop of `dequantize()`, (stop - start, in), computing only those rows."""
        if not self.is_codebook:
            return dequantize_codes(self.codes[start:stop], self.scale[start:stop], self.zero[start:stop],
                                    self.group_index(), dtype)
        in_features, bs = self.shape[1], self.spec.blocksize
        absmax = self.scale_tensor()[start * in_features // bs: -(-stop * in_features // bs)]
        flat = torch.arange(start * in_features, stop * in_features, device=self.codes.device)  # (rows*in,)
        table = nf4codes.code_table(self.spec.codebook, self.codes.device)
        values = table[self.codes[start:stop].reshape(-1).long()] * absmax[flat // bs - start * in_features // bs]
        return values.view(-1, in_features).to(dtype)

    def to(self, device: torch.device | str) -> "QuantizedWeight":
        move = (lambda t: None if t is None else t.to(device))  # noqa: E731
        return replace(self, codes=move(self.codes), scale=move(self.scale), zero=move(self.zero),
                       g_idx=move(self.g_idx))

"""QuantizedWeight: the algorithm-neutral result for one Linear, and what it means."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, cast

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

    def to(self, device: torch.device | str) -> NestedAbsmax:
        return NestedAbsmax(self.codes.to(device), self.absmax.to(device), self.offset, self.code_map.to(device))


@dataclass(frozen=True)
class Outliers:
    """Weights kept in float16 beside the low-bit codes (the outlier split). Where an outlier sits,
    the codes dequantize to exactly 0 (code == zero point), so the weight is the sum of the two.

    mode "weight" (scattered weights, CSR over the rows):
        row_ptr  int32 (out+1,)      outliers of row r are entries row_ptr[r]:row_ptr[r+1]
        col_idx  int16 or int32 (nnz,)  their input columns, ascending within a row
        values   float16 (nnz,)
    mode "channel" (whole input columns):
        columns  int32 (k,)          the input columns kept, ascending
        values   float16 (out, k)
    """

    mode: str
    values: Tensor
    row_ptr: Tensor | None = None
    col_idx: Tensor | None = None
    columns: Tensor | None = None

    def __post_init__(self) -> None:
        if self.mode == "weight":
            if self.row_ptr is None or self.col_idx is None or self.values.dim() != 1 \
                    or self.col_idx.shape != self.values.shape:
                raise ValueError("weight-mode outliers need row_ptr, col_idx and values of one length")
        elif self.mode == "channel":
            if self.columns is None or self.values.dim() != 2 or self.values.shape[1] != self.columns.numel():
                raise ValueError("channel-mode outliers need columns (k,) and values (out, k)")
        else:
            raise ValueError(f"unknown outlier mode {self.mode!r}")

    @property
    def count(self) -> int:
        """Number of weights kept in float16."""
        return self.values.numel()

    # The mode's own fields, as __post_init__ checked they are set (for the type checker).
    @property
    def csr_row_ptr(self) -> Tensor:
        return cast(Tensor, self.row_ptr)

    @property
    def csr_col_idx(self) -> Tensor:
        return cast(Tensor, self.col_idx)

    @property
    def channel_columns(self) -> Tensor:
        return cast(Tensor, self.columns)

    def rows_of(self) -> Tensor:
        """Weight mode: the row of each stored value, int64 (nnz,)."""
        counts = (self.csr_row_ptr[1:] - self.csr_row_ptr[:-1]).long()
        return torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)

    def dense(self, shape: tuple[int, int], dtype: torch.dtype = torch.float32) -> Tensor:
        """The outliers as an (out, in) matrix, zeros elsewhere."""
        out = torch.zeros(shape, dtype=dtype, device=self.values.device)
        if self.mode == "weight":
            out[self.rows_of(), self.csr_col_idx.long()] = self.values.to(dtype)
        else:
            out[:, self.channel_columns.long()] = self.values.to(dtype)
        return out

    def dense_rows(self, start: int, stop: int, in_features: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """Rows start:stop of `dense()`, touching only those rows' outliers."""
        out = torch.zeros(stop - start, in_features, dtype=dtype, device=self.values.device)
        if self.mode == "weight":
            lo, hi = int(self.csr_row_ptr[start]), int(self.csr_row_ptr[stop])
            rows = self.rows_of()[lo:hi] - start
            out[rows, self.csr_col_idx[lo:hi].long()] = self.values[lo:hi].to(dtype)
        else:
            out[:, self.channel_columns.long()] = self.values[start:stop].to(dtype)
        return out

    def mask(self, shape: tuple[int, int]) -> Tensor:
        """Where the outliers sit: bool (out, in)."""
        m = torch.zeros(shape, dtype=torch.bool, device=self.values.device)
        if self.mode == "weight":
            m[self.rows_of(), self.csr_col_idx.long()] = True
        else:
            m[:, self.channel_columns.long()] = True
        return m

    def to(self, device: torch.device | str) -> Outliers:
        move: Any = (lambda t: None if t is None else t.to(device))  # noqa: E731
        return replace(self, values=move(self.values), row_ptr=move(self.row_ptr), col_idx=move(self.col_idx),
                       columns=move(self.columns))


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
    outliers      Outliers or None      weights kept in float16 (integer grids only), added to the
                                        dequantized codes

    Formats pack and unpack these fields; `dequantize()` defines what they mean.
    """

    codes: Tensor
    scale: Tensor | NestedAbsmax
    zero: Tensor | None
    g_idx: Tensor | None
    spec: QuantSpec
    source_dtype: torch.dtype | None = None
    outliers: Outliers | None = None

    def __post_init__(self) -> None:
        out_features, in_features = self.codes.shape
        if self.outliers is not None:
            if self.is_codebook:
                raise ValueError("outliers go with integer grids, not codebooks")
            if self.outliers.mode == "weight" and self.outliers.csr_row_ptr.shape != (out_features + 1,):
                raise ValueError(f"outlier row_ptr {tuple(self.outliers.csr_row_ptr.shape)} "
                                 f"does not fit {out_features} rows")
            if self.outliers.mode == "channel" and self.outliers.values.shape[0] != out_features:
                raise ValueError(f"outlier columns {tuple(self.outliers.values.shape)} do not fit {out_features} rows")
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

    @property
    def grid_scale(self) -> Tensor:
        """Integer grids: `scale`, a float16 (out, G) tensor as __post_init__ checked."""
        return cast(Tensor, self.scale)

    @property
    def grid_zero(self) -> Tensor:
        """Integer grids: `zero`, an int (out, G) tensor as __post_init__ checked."""
        return cast(Tensor, self.zero)

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
        w = dequantize_codes(self.codes, self.grid_scale, self.grid_zero, self.group_index(), dtype)
        if self.outliers is not None:
            w = w + self.outliers.dense(self.shape, dtype)
        return w

    def dequantize_rows(self, start: int, stop: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """Rows start:stop of `dequantize()`, (stop - start, in), computing only those rows."""
        if not self.is_codebook:
            w = dequantize_codes(self.codes[start:stop], self.grid_scale[start:stop], self.grid_zero[start:stop],
                                 self.group_index(), dtype)
            if self.outliers is not None:
                w = w + self.outliers.dense_rows(start, stop, self.shape[1], dtype)
            return w
        in_features, bs = self.shape[1], self.spec.blocksize
        absmax = self.scale_tensor()[start * in_features // bs: -(-stop * in_features // bs)]
        flat = torch.arange(start * in_features, stop * in_features, device=self.codes.device)  # (rows*in,)
        table = nf4codes.code_table(self.spec.codebook, self.codes.device)
        values = table[self.codes[start:stop].reshape(-1).long()] * absmax[flat // bs - start * in_features // bs]
        return values.view(-1, in_features).to(dtype)

    def to(self, device: torch.device | str) -> QuantizedWeight:
        move: Any = (lambda t: None if t is None else t.to(device))  # noqa: E731
        return replace(self, codes=move(self.codes), scale=move(self.scale), zero=move(self.zero),
                       g_idx=move(self.g_idx), outliers=move(self.outliers))

"""QuantLinear (integer grids, packed in the runtime layout of runtime/ops.py) and NF4Linear
(bitsandbytes' 4-bit codebooks): Linears whose weight is held packed."""
from __future__ import annotations

import logging
import warnings
from dataclasses import replace
from typing import Any, ClassVar, cast

import torch
from torch import Tensor, nn

from ..core import nf4codes
from ..core.packing import pack_int32, pack_nibbles, packed_length
from ..core.qweight import QuantizedWeight
from . import (
    ops,  # noqa: F401  (importing it defines torch.ops.quantize_llm's ops)
    reference,
)

logger = logging.getLogger(__name__)


class QuantLinear(nn.Module):
    """y = x W^T + b with W stored as packed integer codes (runtime layout, see runtime/ops.py).

    Buffers (persistent, so they move with `.to()` and show in `state_dict()`; note that the zeros
    are the TRUE zero points, not a checkpoint's v1 "zero - 1"):
        qweight  int32 (in*bits/32, out)   codes packed along in
        qzeros   int32 (G, out*bits/32)    true zero points packed along out
        scales   float16 (G, out)          kept in float16 whatever the model dtype: converting a
                                           float16 scale to bfloat16 would round it
        g_idx    int32 (in,)               group of each input column, non-decreasing
        perm     int32 (in,) or None        act-order checkpoints: the input columns are stored
                                           sorted by group (so a group's scales are read once);
                                           forward feeds x[:, perm]
        bias     model dtype (out,) or None
    """

    SUPPORTED_BITS: ClassVar[tuple[int, ...]] = reference.BITS   # the PyTorch path takes any group size
    backend: str = "auto"    # "torch": always the PyTorch reference, even on CUDA (load_quantized)
    compute_dtype: torch.dtype = torch.float32   # the model's dtype: what `weight` returns
    qweight: Tensor          # the buffers, declared for the type checker
    qzeros: Tensor
    scales: Tensor
    g_idx: Tensor
    perm: Tensor | None
    bias: Tensor | None

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int,
                 bias: bool = False, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if bits not in self.SUPPORTED_BITS:
            raise ValueError(f"QuantLinear supports {self.SUPPORTED_BITS}-bit codes, not {bits}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        n_groups = 1 if group_size == -1 else -(-in_features // group_size)
        i32: dict[str, Any] = dict(dtype=torch.int32, device=device)
        self.register_buffer("qweight", torch.zeros(packed_length(in_features, bits), out_features, **i32))
        self.register_buffer("qzeros", torch.zeros(n_groups, packed_length(out_features, bits), **i32))
        self.register_buffer("scales", torch.ones(n_groups, out_features, dtype=torch.float16, device=device))
        self.register_buffer("g_idx", torch.zeros(in_features, **i32))
        self.register_buffer("perm", None)
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: Tensor | None,
                       dtype: torch.dtype) -> QuantLinear:
        """Pack `qw` (codes (out, in), scale/zero (out, G)) into a new module on qw's device.

        Zero points outside [0, 2^bits) cannot be packed; they only come from a corrupt v1 write
        (a zero of 0 stored as -1, FORMATS.md §1.5) and are clamped, with a warning.
        """
        out_features, in_features = qw.shape
        bits = qw.spec.bits
        module = cls(in_features, out_features, bits, qw.spec.group_size, bias is not None,
                     dtype, qw.codes.device)
        zero = qw.grid_zero.to(torch.int32)                                   # (out, G)
        clamped = zero.clamp(0, 2 ** bits - 1)
        if not torch.equal(clamped, zero):
            logger.warning("%d zero points outside [0, %d] were clamped (a v1 checkpoint written "
                           "with a zero of 0?)", int((clamped != zero).sum()), 2 ** bits - 1)
        codes = qw.codes.t()                                                  # (in, out)
        g_idx = qw.group_index().to(torch.int32)                              # (in,)
        if bool((g_idx[1:] < g_idx[:-1]).any()):   # act-order: store the columns sorted by group
            perm = torch.argsort(g_idx, stable=True)
            codes, g_idx = codes[perm], g_idx[perm]
            module.perm = perm.to(torch.int32).contiguous()
        module.qweight = pack_int32(codes.contiguous(), bits, dim=0)          # (in*b/32, out)
        module.qzeros = pack_int32(clamped.t().contiguous(), bits, dim=1)     # (G, out*b/32)
        module.scales = qw.grid_scale.t().contiguous().to(torch.float16)      # (G, out)
        module.g_idx = g_idx.contiguous()                                     # (in,)
        if bias is not None:
            module.bias = bias.detach().to(dtype).contiguous()                # (out,)
        module.compute_dtype = dtype   # the model's dtype (the `weight` property)
        return module

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight this module applies, (out, in) in `dtype` (for tests and debugging)."""
        w = reference.dequantize_packed(self.qweight, self.scales, self.qzeros, self.g_idx, self.bits,
                                  dtype)                                      # (in, out), stored order
        if self.perm is not None:
            w = torch.empty_like(w).index_copy_(0, self.perm.long(), w)       # back to the original order
        return w.t().contiguous()

    @property
    def weight(self) -> Tensor:
        """The dequantized (out, in) weight, built on each read, for model code that reads a Linear's
        weight directly instead of calling it (RWKV's rescaling, some routers), in the model's dtype."""
        return self.dequantize_weight(getattr(self, "compute_dtype", torch.float32))

    def forward(self, x: Tensor) -> Tensor:
        """x (..., in) -> (..., out) in x.dtype."""
        op = reference.dequant_matmul_reference if self.backend == "torch" else torch.ops.quantize_llm.dequant_matmul
        x2 = x.reshape(-1, self.in_features)                                 # (tokens, in)
        if self.perm is not None:
            x2 = x2.index_select(1, self.perm)                               # the stored column order
        y = op(x2, self.qweight, self.scales, self.qzeros, self.g_idx, self.bits, self.group_size)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)                   # (..., out)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.bits}, group_size={self.group_size}, bias={self.bias is not None}")


class NF4Linear(nn.Module):
    """y = x W^T + b with W stored in bitsandbytes' 4-bit codebook layout (NF4 or FP4).

    Buffers (persistent):
        weight_packed  uint8 (ceil(out*in/2),)  codes of the row-major flattened weight, two per
                                                byte, high nibble first (FORMATS.md §3.2)
        absmax         float32 (nblocks,)       per block of `blocksize` flat values; a nested
                                                (double-quantized) absmax is expanded at load time,
                                                to the same float32 values bitsandbytes computes
        code           float32 (16,)            the codebook's table
        bias           model dtype (out,) or None
    forward() calls quantize_llm::nf4_matmul (runtime/ops.py): on CUDA a GEMV kernel for up to 16
    tokens; the PyTorch path dequantizes the whole weight in float32 (table[code] * absmax, as
    bitsandbytes does), then one matmul; float16/bfloat16 inputs are computed in float32.
    """

    backend: str = "auto"
    compute_dtype: torch.dtype = torch.float32   # the model's dtype: what `weight` returns
    weight_packed: Tensor    # the buffers, declared for the type checker
    absmax: Tensor
    code: Tensor
    bias: Tensor | None

    def __init__(self, in_features: int, out_features: int, codebook: str, blocksize: int,
                 bias: bool = False, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.codebook, self.blocksize = codebook, blocksize
        n = in_features * out_features
        self.register_buffer("weight_packed", torch.zeros(-(-n // 2), dtype=torch.uint8, device=device))
        self.register_buffer("absmax", torch.ones(-(-n // blocksize), dtype=torch.float32, device=device))
        self.register_buffer("code", nf4codes.code_table(codebook, device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: Tensor | None, dtype: torch.dtype) -> NF4Linear:
        """Pack a codebook result (codes (out, in), absmax flat or nested) on qw's device."""
        out_features, in_features = qw.shape
        module = cls(in_features, out_features, qw.spec.codebook, qw.spec.blocksize, bias is not None,
                     dtype, qw.codes.device)
        module.weight_packed = pack_nibbles(qw.codes).view(-1)                # (ceil(n/2),)
        module.absmax = qw.scale_tensor().float().contiguous()                # (nblocks,)
        if bias is not None:
            module.bias = bias.detach().to(dtype).contiguous()                # (out,)
        module.compute_dtype = dtype   # the model's dtype (the `weight` property)
        return module

    @property
    def weight(self) -> Tensor:
        """The dequantized (out, in) weight, built on each read (see QuantLinear.weight)."""
        return self.dequantize_weight(getattr(self, "compute_dtype", torch.float32))

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight this module applies, (out, in) in `dtype`."""
        return reference.nf4_dequantize(self.weight_packed, self.absmax, self.code, self.out_features, self.in_features,
                                  self.blocksize, dtype)

    def forward(self, x: Tensor) -> Tensor:
        """x (..., in) -> (..., out) in x.dtype."""
        op = reference.nf4_matmul_reference if self.backend == "torch" else torch.ops.quantize_llm.nf4_matmul
        y = op(x.reshape(-1, self.in_features), self.weight_packed, self.absmax, self.code, self.out_features,
               self.blocksize)                                                # (tokens, out)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"codebook={self.codebook}, blocksize={self.blocksize}, bias={self.bias is not None}")


def sparse_matmul(x: Tensor, row_ptr: Tensor, col_idx: Tensor, values: Tensor, out_features: int) -> Tensor:
    """x (tokens, in) @ S^T for S (out, in) given as CSR (row_ptr, col_idx, values); float32 result."""
    in_features = x.shape[1]
    # The CSR structure was validated when the checkpoint was read (formats/outlier.py); torch's
    # one-time "sparse CSR is in beta" notice says nothing a user can act on.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        s = torch.sparse_csr_tensor(row_ptr.long(), col_idx.long(), values.float(), size=(out_features, in_features),
                                    device=x.device, check_invariants=False)
    return torch.sparse.mm(s, x.float().t()).t()                             # (tokens, out)


class OutlierLinear(QuantLinear):
    """A QuantLinear plus float16 outliers: y = x (W_codes + W_outliers)^T + b.

    Extra buffers (see formats/outlier.py): weight mode outlier_row_ptr int32 (out+1,),
    outlier_col_idx int32 (nnz,), outlier_values float16 (nnz,); channel mode outlier_columns
    int32 (k,), outlier_values float16 (out, k). The outlier product runs in float32: a sparse
    matmul (weight mode) or a dense one over the k kept columns (channel mode).
    """

    mode: str                # "weight" or "channel"; then the buffers, declared for the type checker
    outlier_row_ptr: Tensor
    outlier_col_idx: Tensor
    outlier_columns: Tensor
    outlier_values: Tensor

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: Tensor | None, dtype: torch.dtype) -> OutlierLinear:
        if qw.outliers is None:
            raise ValueError("OutlierLinear needs a result with outliers")
        module = cast(OutlierLinear, super().from_quantized(replace(qw, outliers=None), bias, dtype))
        o = qw.outliers
        module.mode = o.mode
        if o.mode == "weight":
            module.register_buffer("outlier_row_ptr", o.csr_row_ptr.to(torch.int32).contiguous())
            module.register_buffer("outlier_col_idx", o.csr_col_idx.to(torch.int32).contiguous())
        else:
            module.register_buffer("outlier_columns", o.channel_columns.to(torch.int32).contiguous())
        module.register_buffer("outlier_values", o.values.to(torch.float16).contiguous())
        return module

    def outlier_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The outliers as a dense (out, in) matrix (for tests and debugging)."""
        w = torch.zeros(self.out_features, self.in_features, dtype=dtype, device=self.outlier_values.device)
        if self.mode == "weight":
            counts = (self.outlier_row_ptr[1:] - self.outlier_row_ptr[:-1]).long()
            rows = torch.repeat_interleave(torch.arange(self.out_features, device=w.device), counts)
            w[rows, self.outlier_col_idx.long()] = self.outlier_values.to(dtype)
        else:
            w[:, self.outlier_columns.long()] = self.outlier_values.to(dtype)
        return w

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return super().dequantize_weight(dtype) + self.outlier_weight(dtype)

    def forward(self, x: Tensor) -> Tensor:
        y = super().forward(x)
        x2 = x.reshape(-1, self.in_features)                                  # (tokens, in)
        if self.mode == "weight":
            if self.outlier_values.numel() == 0:
                return y
            extra = sparse_matmul(x2, self.outlier_row_ptr, self.outlier_col_idx, self.outlier_values,
                                  self.out_features)
        else:
            if self.outlier_columns.numel() == 0:
                return y
            extra = x2.float()[:, self.outlier_columns.long()] @ self.outlier_values.float().t()
        return y + extra.to(y.dtype).reshape(y.shape)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", outliers={self.mode}:{self.outlier_values.numel()}"

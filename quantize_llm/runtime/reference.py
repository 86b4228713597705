"""The plain-PyTorch meaning of the runtime ops (runtime/ops.py): argument checks, unpacking and
the reference matmuls that every device runs where no native kernel serves a call. The runtime
layout is described in ops.py's docstring."""
from __future__ import annotations

import torch
from torch import Tensor

from ..core.packing import packed_length, unpack_int32, unpack_nibbles

BITS = (2, 3, 4, 8)


def _check(x: Tensor, qweight: Tensor, scales: Tensor, qzeros: Tensor, g_idx: Tensor,
           bits: int, group_size: int) -> None:
    """Raise ValueError, naming the argument, when the inputs do not form a valid call."""
    if bits not in BITS:
        raise ValueError(f"dequant_matmul: bits must be one of {BITS}, got {bits}")
    if group_size == 0 or group_size < -1:
        raise ValueError(f"dequant_matmul: group_size must be positive or -1, got {group_size}")
    if x.dim() != 2 or not x.dtype.is_floating_point:
        raise ValueError(f"dequant_matmul: x must be a 2-D float tensor (tokens, in), got "
                         f"{x.dtype} {tuple(x.shape)}")
    for name, t, dim in (("qweight", qweight, 2), ("qzeros", qzeros, 2), ("g_idx", g_idx, 1)):
        if t.dtype != torch.int32 or t.dim() != dim:
            raise ValueError(f"dequant_matmul: {name} must be a {dim}-D int32 tensor, got "
                             f"{t.dtype} {tuple(t.shape)}")
    if scales.dim() != 2 or not scales.dtype.is_floating_point:
        raise ValueError(f"dequant_matmul: scales must be a 2-D float tensor (G, out), got "
                         f"{scales.dtype} {tuple(scales.shape)}")
    in_features, out_features = x.shape[1], qweight.shape[1]
    n_groups = scales.shape[0]
    try:
        want_rows, want_cols = packed_length(in_features, bits), packed_length(out_features, bits)
    except ValueError as exc:
        raise ValueError(f"dequant_matmul: {exc}") from None
    if qweight.shape[0] != want_rows:
        raise ValueError(f"dequant_matmul: qweight {tuple(qweight.shape)} does not hold "
                         f"{in_features} inputs at {bits} bits (need {want_rows} rows)")
    if scales.shape[1] != out_features:
        raise ValueError(f"dequant_matmul: scales {tuple(scales.shape)} does not fit "
                         f"{out_features} outputs")
    if tuple(qzeros.shape) != (n_groups, want_cols):
        raise ValueError(f"dequant_matmul: qzeros {tuple(qzeros.shape)} should be "
                         f"({n_groups}, {want_cols}) for {n_groups} groups, {out_features} outputs")
    if tuple(g_idx.shape) != (in_features,):
        raise ValueError(f"dequant_matmul: g_idx {tuple(g_idx.shape)} should be ({in_features},)")


def dequantize_packed(qweight: Tensor, scales: Tensor, qzeros: Tensor, g_idx: Tensor, bits: int,
                      dtype: torch.dtype = torch.float32) -> Tensor:
    """The weight the packed tensors stand for, transposed: (in, out) in `dtype`.

    Layout as in the module docstring; inputs are not modified.
    """
    in_features, out_features = g_idx.shape[0], qweight.shape[1]
    codes = unpack_int32(qweight, bits, in_features, dim=0)               # (in, out) uint8
    zero = unpack_int32(qzeros, bits, out_features, dim=1)                # (G, out) uint8
    n_groups = zero.shape[0]
    if in_features % n_groups == 0:
        gs = in_features // n_groups
        ordered = torch.arange(in_features, device=g_idx.device, dtype=g_idx.dtype) // gs
        if torch.equal(g_idx, ordered):   # consecutive groups: broadcast instead of gathering
            w = codes.view(n_groups, gs, out_features).to(dtype)
            w = (w - zero.to(dtype)[:, None]) * scales.to(dtype)[:, None]
            return w.view(in_features, out_features)
    g = g_idx.long()
    return (codes.to(dtype) - zero.to(dtype)[g]) * scales.to(dtype)[g]   # (in, out)


def dequant_matmul_reference(x: Tensor, qweight: Tensor, scales: Tensor, qzeros: Tensor, g_idx: Tensor,
                             bits: int, group_size: int) -> Tensor:
    """x (tokens, in) @ dequantized weight -> (tokens, out) in x.dtype (see the module docstring).

    The reference path: dequantizes the whole weight on every call. group_size is part of the
    schema for kernels; g_idx alone says which group each input column uses.
    """
    _check(x, qweight, scales, qzeros, g_idx, bits, group_size)
    # Half-precision inputs are computed in float32: the codes times the scale are exact there.
    compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    w = dequantize_packed(qweight, scales, qzeros, g_idx, bits, compute)  # (in, out)
    return (x.to(compute) @ w).to(x.dtype)                                # (tokens, out)


def _check_nf4(x: Tensor, weight_packed: Tensor, absmax: Tensor, code: Tensor, out_features: int,
               blocksize: int) -> None:
    if x.dim() != 2 or not x.dtype.is_floating_point:
        raise ValueError(f"nf4_matmul: x must be a 2-D float tensor (tokens, in), got {x.dtype} {tuple(x.shape)}")
    n = x.shape[1] * out_features
    if weight_packed.dtype != torch.uint8 or weight_packed.shape != ((n + 1) // 2,):
        raise ValueError(f"nf4_matmul: weight_packed must be uint8 ({(n + 1) // 2},), got "
                         f"{weight_packed.dtype} {tuple(weight_packed.shape)}")
    if blocksize <= 0 or absmax.shape != (-(-n // blocksize),):
        raise ValueError(f"nf4_matmul: absmax {tuple(absmax.shape)} does not fit blocksize {blocksize}")
    if code.shape != (16,):
        raise ValueError(f"nf4_matmul: code must have 16 entries, got {tuple(code.shape)}")


def nf4_dequantize(weight_packed: Tensor, absmax: Tensor, code: Tensor, out_features: int, in_features: int,
                   blocksize: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """The (out, in) weight: table[code] * absmax of each flat value's block, in float32, then `dtype`."""
    n = in_features * out_features
    codes = unpack_nibbles(weight_packed, n).long()                                  # (n,)
    block = torch.arange(n, device=codes.device) // blocksize
    w = code.float()[codes] * absmax.float()[block]                                   # (n,) float32
    return w.view(out_features, in_features).to(dtype)


def nf4_matmul_reference(x: Tensor, weight_packed: Tensor, absmax: Tensor, code: Tensor, out_features: int,
                         blocksize: int) -> Tensor:
    """x (tokens, in) @ W^T for W in bitsandbytes' layout -> (tokens, out) in x.dtype; half
    precision is computed in float32."""
    _check_nf4(x, weight_packed, absmax, code, out_features, blocksize)
    compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    w = nf4_dequantize(weight_packed, absmax, code, out_features, x.shape[1], blocksize, compute)
    return (x.to(compute) @ w.t()).to(x.dtype)

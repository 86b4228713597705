"""The `quantize_llm::dequant_matmul` op: y = x @ dequantize(packed weight)^T.

Defined once with `torch.library.custom_op`; its body is the plain-PyTorch reference
(`dequant_matmul_reference`), which `torch.library` uses for every device but CUDA. runtime/cuda.py
registers the CUDA implementation (compiled kernels, falling back to the reference where they
cannot serve a call); `kernel_status()` reports whether they loaded. `quantize_llm::nf4_matmul`
does the same for bitsandbytes' 4-bit codebook layout (runtime/qlinear.NF4Linear).

Runtime layout (GPTQ packing, FORMATS.md §1.2/§1.4, but with TRUE zero points, the v2 convention
of §1.5, so the op never needs to know which convention a checkpoint used):

    x        float (tokens, in)            activations; float16/bfloat16 are computed in float32
    qweight  int32 (in*bits/32, out)       codes packed along in
    scales   float (G, out)                per-group scale (float16 as stored, or any float)
    qzeros   int32 (G, out*bits/32)        true zero points packed along out
    g_idx    int32 (in,)                   group of every input column (act-order allowed)
    -> y     x.dtype (tokens, out)         y[t, o] = sum_i x[t, i] * scales[g, o] * (q[i, o] - z[g, o]),
                                           g = g_idx[i]
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .reference import _check, _check_nf4, dequant_matmul_reference, nf4_matmul_reference


@dataclass(frozen=True)
class KernelStatus:
    """Whether a native kernel serves the op on this machine, and why (not)."""

    available: bool
    reason: str


def kernel_status() -> KernelStatus:
    """What `quantize-llm env` reports about the CUDA kernels (loading them where a GPU is present)."""
    from . import cuda

    st = cuda.status()
    return KernelStatus(bool(st.available), st.reason)


@torch.library.custom_op("quantize_llm::dequant_matmul", mutates_args=())
def dequant_matmul(x: Tensor, qweight: Tensor, scales: Tensor, qzeros: Tensor, g_idx: Tensor,
                   bits: int, group_size: int) -> Tensor:
    """The op: the reference everywhere but on CUDA (runtime/cuda.py)."""
    return dequant_matmul_reference(x, qweight, scales, qzeros, g_idx, bits, group_size)


@dequant_matmul.register_fake
def _(x: Tensor, qweight: Tensor, scales: Tensor, qzeros: Tensor, g_idx: Tensor,
      bits: int, group_size: int) -> Tensor:
    _check(x, qweight, scales, qzeros, g_idx, bits, group_size)
    return x.new_empty(x.shape[0], qweight.shape[1])


# ---- bitsandbytes' 4-bit codebooks (NF4 / FP4) ----------------------------------------------------

@torch.library.custom_op("quantize_llm::nf4_matmul", mutates_args=())
def nf4_matmul(x: Tensor, weight_packed: Tensor, absmax: Tensor, code: Tensor, out_features: int,
               blocksize: int) -> Tensor:
    """The op: the reference everywhere but on CUDA (runtime/cuda.py)."""
    return nf4_matmul_reference(x, weight_packed, absmax, code, out_features, blocksize)


@nf4_matmul.register_fake
def _(x: Tensor, weight_packed: Tensor, absmax: Tensor, code: Tensor, out_features: int, blocksize: int) -> Tensor:
    _check_nf4(x, weight_packed, absmax, code, out_features, blocksize)
    return x.new_empty(x.shape[0], out_features)


def _register_cuda() -> None:
    from . import cuda

    cuda.register()


_register_cuda()

"""The CUDA kernels' own source, run on the CPU.

quantize_llm/csrc/dequant_matmul.cu is compiled for the host with emulate.h (one host thread per
CUDA thread, barriers for __syncthreads and warp shuffles, poisoned shared memory) and launched
through the same Python code that launches it on a GPU (runtime/cuda.py: gemv, dequantize,
nf4_gemv, the path choice), with CPU tensors. This checks the kernels' indexing, packing, group
handling, conversions and launch geometry against the PyTorch op on machines without a GPU; the
`cuda` tests in test_cuda.py check the compiled kernels on a GPU.
"""
from __future__ import annotations

import ctypes
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from runtime.test_cuda import nf4_args
from runtime.test_ops import make_args

from quantize_llm.algorithms.rtn import rtn_quantize
from quantize_llm.core.spec import QuantSpec
from quantize_llm.runtime import cuda
from quantize_llm.runtime.qlinear import QuantLinear
from quantize_llm.runtime.reference import dequant_matmul_reference, dequantize_packed, nf4_matmul_reference

HERE = Path(__file__).resolve().parent
pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not installed")


class EmulatedKernels:
    """Stands in for runtime/cuda.Kernels: same call, but the kernels run on the CPU."""

    FAMILIES = {"gemv": "emu_gemv", "dequant": "emu_dequant", "nf4": "emu_nf4"}

    def __init__(self, lib: ctypes.CDLL, sms: int = 3) -> None:
        self.lib, self.sms, self.device, self.choice, self.launched = lib, sms, torch.device("cpu"), {}, []

    def __call__(self, name: str, grid: tuple[int, int], block: int, shared: int, args: list) -> None:
        self.launched.append(name)
        fn = ctypes.cast(getattr(self.lib, name), ctypes.c_void_p)
        params, _holders = cuda.launch_params(args)
        values = [ctypes.c_void_p.from_address(p).value if not isinstance(a, ctypes._SimpleCData) else a
                  for p, a in zip(params, args, strict=True)]
        launcher = getattr(self.lib, self.FAMILIES[name.split("_")[0]])
        launcher(fn, ctypes.c_uint(grid[0]), ctypes.c_uint(grid[1]), ctypes.c_uint(block), ctypes.c_size_t(shared),
                 *[ctypes.c_void_p(v) if not isinstance(v, ctypes._SimpleCData) else v for v in values])


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    out = tmp_path_factory.mktemp("emu") / "kernels.so"
    subprocess.run(["g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread",
                    f'-DQLLM_SOURCE="{cuda.SOURCE}"', "-o", str(out), str(HERE / "emulate.cpp")],
                   check=True, capture_output=True)
    return EmulatedKernels(ctypes.CDLL(str(out)))


def _args(bits, group_size, sym, act_order, k, n, tokens, dtype, seed):
    """Random packed tensors; widths that are not multiples of 32 come from a real quantization
    (make_args covers whole 32-code blocks only)."""
    gen = torch.Generator().manual_seed(seed + 1)
    if n % 32 == 0 and k % 32 == 0:
        _, qweight, scales, qzeros, g_idx = make_args(bits, group_size, sym, act_order, in_features=k, out_features=n,
                                                      seed=seed)
    else:
        spec = QuantSpec(bits=bits, group_size=group_size, sym=sym, min_zero=0)
        qw = rtn_quantize(torch.randn(n, k, generator=gen), spec)
        if act_order:
            qw = replace(qw, g_idx=qw.group_index()[torch.randperm(k, generator=gen)].to(torch.int32))
        module = QuantLinear.from_quantized(qw, None, torch.float32)
        qweight, scales, qzeros, g_idx = module.qweight, module.scales, module.qzeros, module.g_idx
    x = torch.randn(tokens, k, generator=gen).to(dtype)
    return x, qweight, scales, qzeros, g_idx


def _rel(got, want):
    return float((got.double() - want).norm() / want.norm())


BOUND = {torch.float16: 2e-3, torch.bfloat16: 1.2e-2, torch.float32: 1e-5}


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size,sym,act_order", [(32, True, False), (64, False, True), (-1, False, False)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gemv_kernel_matches_the_pytorch_op(emu, bits, group_size, sym, act_order, dtype):
    for tokens, (k, n) in [(1, (256, 64)), (3, (136, 136)), (16, (512, 32))]:   # 136: partial blocks
        x, qweight, scales, qzeros, g_idx = _args(bits, group_size, sym, act_order, k, n, tokens, dtype,
                                                  seed=tokens + bits)
        want = x.double() @ dequantize_packed(qweight, scales, qzeros, g_idx, bits, torch.float64)
        got = cuda.gemv(emu, x, qweight, scales, qzeros, g_idx, bits)
        assert got.dtype == dtype and got.shape == (tokens, n)
        assert torch.isfinite(got).all()
        assert _rel(got, want) < BOUND[dtype], (tokens, k, n, _rel(got, want))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dequantize_kernel_writes_every_element_exactly(emu, bits, dtype):
    x, qweight, scales, qzeros, g_idx = _args(bits, 32, False, True, 136, 40, 1, dtype, seed=5)
    out = torch.full((136, 40), float("nan"), dtype=dtype)                              # poisoned
    got = cuda.dequantize(emu, qweight, scales, qzeros, g_idx, bits, dtype, out=out)
    assert torch.equal(got, dequantize_packed(qweight, scales, qzeros, g_idx, bits, torch.float32).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("blocksize", [64, 256])
def test_nf4_kernel_matches_the_pytorch_op(emu, dtype, blocksize):
    for tokens, (k, n) in [(1, (64, 24)), (5, (1056, 16))]:   # 1056: a second, partial 512-wide chunk
        x, wp, absmax, code = nf4_args(tokens, k, n, blocksize, dtype=dtype, seed=tokens)
        want = nf4_matmul_reference(x.double(), wp, absmax, code, n, blocksize)
        out = torch.full((tokens, n), float("nan"))                                     # poisoned
        got = cuda.nf4_gemv(emu, x, wp, absmax, code, n, blocksize, out=out)
        assert torch.isfinite(out).all()
        assert _rel(got, want) < BOUND[dtype], (tokens, k, n)


def test_the_op_picks_a_path_per_batch(emu, monkeypatch):
    """One token: the GEMV; 2 to 16: whichever timed faster (remembered); more: dequantize + matmul."""
    monkeypatch.setattr(cuda, "kernels", lambda device: emu)
    times = iter([2.0, 1.0])                            # GEMV slower than cuBLAS at this shape
    monkeypatch.setattr(cuda, "_time", lambda fn: (fn(), next(times))[1])
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    x, qweight, scales, qzeros, g_idx = _args(4, 32, True, False, 128, 64, 20, torch.float16, seed=9)
    for tokens, family in [(1, "gemv"), (20, "dequant"), (4, "dequant"), (3, "dequant")]:
        emu.launched.clear()
        got = cuda.dequant_matmul_cuda(x[:tokens], qweight, scales, qzeros, g_idx, 4, 32)
        want = dequant_matmul_reference(x[:tokens].double(), qweight, scales, qzeros, g_idx, 4, 32)
        assert _rel(got, want) < BOUND[torch.float16]
        assert emu.launched[-1].startswith(family), (tokens, emu.launched)
    assert list(emu.choice.values()) == ["cublas"]      # 3 and 4 tokens share the bucket of 4: timed once
    emu.launched.clear()
    cuda.dequant_matmul_cuda(x, qweight, scales.float(), qzeros, g_idx, 4, 32)   # float32 scales: PyTorch
    assert emu.launched == []

"""The CUDA kernels and their loader.

Without a GPU: the sources compile with nvcc (and NVRTC where its library is present), the binary
cache, the fallback to PyTorch with one warning, the status line, the launch geometry. Tests
marked `cuda` compare the kernels with the PyTorch op on fresh random inputs for every supported
combination, with poisoned outputs where the kernel allocates them.
"""
from __future__ import annotations

import ctypes
import shutil
import warnings

import pytest
import torch
from runtime.test_ops import make_args

from quantize_llm.runtime import cuda
from quantize_llm.runtime.reference import dequant_matmul_reference, dequantize_packed, nf4_matmul_reference

NAMES = [f"gemv_b{b}_m{m}_{d}" for b in (4, 8) for m in cuda.GEMV_BUCKETS for d in ("f16", "bf16", "f32")] + \
        [f"dequant_b{b}_{d}" for b in (4, 8) for d in ("f16", "bf16", "f32")] + \
        [f"nf4_m{m}_{d}" for m in cuda.GEMV_BUCKETS for d in ("f16", "bf16", "f32")]


@pytest.fixture(autouse=True)
def _fresh_loader(monkeypatch, tmp_path):
    monkeypatch.setenv("QUANTIZE_LLM_CACHE", str(tmp_path / "cache"))
    cuda.reset()
    yield
    cuda.reset()


# ---- building -----------------------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("capability", [(7, 5), (8, 0), (9, 0)])
def test_the_sources_compile_with_nvcc(capability):
    binary = cuda.compile_nvcc(cuda.SOURCE, capability)
    assert binary[:4] == b"\x7fELF"
    for name in NAMES:                                    # every entry point runtime/cuda.py launches
        assert name.encode() + b"\0" in binary, name


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_the_gemv_kernels_read_weights_with_wide_loads(tmp_path):
    """The packed words go through one 16-byte load per thread (NF4: 8 bytes), read-only path."""
    import subprocess

    ptx = tmp_path / "k.ptx"
    subprocess.run(["nvcc", "--ptx", "-arch=sm_90", "-o", str(ptx), str(cuda.SOURCE)], check=True)
    text = ptx.read_text()

    def body(entry: str) -> str:
        start = text.index(f".entry {entry}(")
        return text[start:text.index("\n}", start)]

    for bits in (4, 8):
        for m in cuda.GEMV_BUCKETS:
            assert body(f"gemv_b{bits}_m{m}_f16").count("ld.global.nc.v4.u32") == 1, (bits, m)
    assert body("nf4_m1_bf16").count("ld.global.nc.v2.u32") == 1


def _nvrtc_present() -> bool:
    try:
        cuda._load_nvrtc()
        return True
    except cuda.KernelUnavailable:
        return False


@pytest.mark.skipif(not _nvrtc_present(), reason="libnvrtc is not installed (torch's CUDA wheels ship it)")
def test_the_sources_compile_with_nvrtc():
    binary = cuda.compile_nvrtc(cuda.source_text(), (9, 0))
    assert binary[:4] == b"\x7fELF" and b"gemv_b4_m1_f16\0" in binary


@pytest.mark.skipif(not _nvrtc_present(), reason="libnvrtc is not installed")
def test_nvrtc_errors_name_the_first_error():
    with pytest.raises(cuda.KernelUnavailable, match="could not compile.*error"):
        cuda.compile_nvrtc("extern \"C\" __global__ void k() { undefined_thing(); }", (9, 0))


def test_binaries_are_cached_per_capability_and_source(monkeypatch, tmp_path):
    compiled = []
    monkeypatch.setattr(cuda, "_load_nvrtc", lambda: object())
    monkeypatch.setattr(cuda, "compile_nvrtc", lambda source, cap, lib: compiled.append(cap) or b"\x7fELF" + bytes(cap))
    binary, path, cached = cuda.build((9, 0))
    assert not cached and path.parent == tmp_path / "cache" / "kernels" and path.read_bytes() == binary
    assert "sm90" in path.name and path.suffix == ".cubin"
    assert cuda.build((9, 0)) == (binary, path, True) and compiled == [(9, 0)]   # from the cache
    assert cuda.build((8, 6))[1] != path and compiled == [(9, 0), (8, 6)]
    assert cuda.binary_name((9, 0), "a", "nvrtc") != cuda.binary_name((9, 0), "b", "nvrtc")
    assert cuda.binary_name((9, 0), "a", "nvrtc") != cuda.binary_name((9, 0), "a", "nvcc")


def test_the_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("QUANTIZE_LLM_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cuda.cache_dir() == tmp_path / "xdg" / "quantize-llm" / "kernels"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cuda.cache_dir() == tmp_path / "home" / ".cache" / "quantize-llm" / "kernels"


def test_without_nvrtc_or_nvcc_the_reason_is_given(monkeypatch):
    monkeypatch.setattr(cuda, "_load_nvrtc", lambda: (_ for _ in ()).throw(cuda.KernelUnavailable("NVRTC (libnvrtc) was not found")))
    monkeypatch.setattr(cuda.shutil, "which", lambda name: None)
    with pytest.raises(cuda.KernelUnavailable, match="NVRTC"):
        cuda.build((9, 0))


# ---- the fallback -----------------------------------------------------------------------------------

def _unavailable(monkeypatch, reason="no driver here"):
    def fail(device):
        raise cuda.KernelUnavailable(reason)
    monkeypatch.setattr(cuda, "kernels", fail)


def test_a_kernel_that_cannot_load_falls_back_with_one_warning(monkeypatch):
    _unavailable(monkeypatch)
    args = make_args(4, 32, False, act_order=True)
    with pytest.warns(RuntimeWarning, match=r"CUDA kernels are not used \(no driver here\); running the PyTorch"):
        got = cuda.dequant_matmul_cuda(*args, 4, 32)
    assert torch.equal(got, dequant_matmul_reference(*args, 4, 32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")                    # no second warning
        cuda.dequant_matmul_cuda(*args, 4, 32)
        x, wp, absmax, code = nf4_args(3, 64, 32, 64)
        assert torch.equal(cuda.nf4_matmul_cuda(x, wp, absmax, code, 32, 64),
                           nf4_matmul_reference(x, wp, absmax, code, 32, 64))


def test_bad_arguments_are_refused_before_any_kernel(monkeypatch):
    _unavailable(monkeypatch)
    x, qweight, scales, qzeros, g_idx = make_args(4, 32, False, act_order=False)
    with pytest.raises(ValueError, match="g_idx"):
        cuda.dequant_matmul_cuda(x, qweight, scales, qzeros, g_idx[:-1], 4, 32)


def test_status_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    assert cuda.status() == cuda.Status(False, f"this torch build ({torch.__version__}) has no CUDA support")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cuda.status() == cuda.Status(False, "no CUDA GPU is visible")


def test_status_gives_the_load_failure(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (6, 1))
    assert cuda.status() == cuda.Status(False, "compute capability 6.1 is older than 7.0")
    cuda.reset()
    monkeypatch.setenv("QUANTIZE_LLM_KERNEL", "off")
    assert cuda.status() == cuda.Status(False, "disabled by QUANTIZE_LLM_KERNEL")


def test_env_prints_the_kernel_status(capsys):
    from test_cli import cli

    assert cli("env") == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("dequant-matmul kernel"))
    st = cuda.status()
    assert ("not available" not in line) == bool(st.available) and st.reason in line


# ---- launch geometry ----------------------------------------------------------------------------

@pytest.mark.parametrize("k,n,sms,bits,tokens", [(4096, 4096, 132, 4, 1), (14336, 4096, 132, 4, 16),
                                                 (4096, 28672, 132, 8, 3), (576, 192, 132, 4, 9),
                                                 (8192, 8192, 8, 8, 16), (32, 8, 132, 4, 1)])
def test_gemv_chunks_fill_the_gpu_within_shared_memory(k, n, sms, bits, tokens):
    mt, pack = cuda.bucket(tokens), 32 // bits
    rows = k // pack
    per = cuda.split_rows(rows, n, sms, mt, pack)
    assert mt >= tokens and (mt + 1) * per * pack * 4 <= cuda.SHARED_LIMIT
    blocks = -(-n // 512) * -(-rows // per)
    assert blocks >= min(1.5 * sms, rows * -(-n // 512))               # about two blocks per SM where K allows


def test_gemv_supported_says_what_it_cannot_take():
    x, qweight, scales, qzeros, g_idx = make_args(4, 32, False, act_order=True)
    assert cuda.gemv_supported(x, qweight, scales, 4) is None
    assert cuda.gemv_supported(x, qweight, scales, 3) == "3-bit codes"
    assert cuda.gemv_supported(x, qweight, scales.float(), 4) == "torch.float32 scales"
    assert cuda.gemv_supported(x.double(), qweight, scales, 4) == "torch.float64 activations"
    assert cuda.gemv_supported(x, qweight[:, :60], scales, 4) == "shape 128 x 60"


# ---- on the GPU -----------------------------------------------------------------------------------

def nf4_args(tokens: int, in_features: int, out_features: int, blocksize: int, device="cpu", dtype=torch.float32,
             seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = in_features * out_features
    wp = torch.randint(0, 256, ((n + 1) // 2,), generator=gen, dtype=torch.int64).to(torch.uint8)
    absmax = torch.rand(-(-n // blocksize), generator=gen) * 0.1 + 0.01
    code = torch.sort(torch.rand(16, generator=gen) * 2 - 1).values
    x = torch.randn(tokens, in_features, generator=gen)
    return [t.to(device) for t in (x.to(dtype), wp, absmax, code)]


def _gpu_args(bits, group_size, sym, act_order, k, n, tokens, dtype, seed):
    x, qweight, scales, qzeros, g_idx = make_args(bits, group_size, sym, act_order, in_features=k,
                                                  out_features=n, seed=seed)
    x = torch.randn(tokens, k, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    return [t.cuda() for t in (x, qweight, scales, qzeros, g_idx)]


def _rel(got, want):
    return float((got.double() - want.to(got.device)).norm() / want.norm())


def _bound(dtype, k):
    """Relative error allowed: the output rounded to its dtype, plus float32 accumulation."""
    return {torch.float16: 2e-3, torch.bfloat16: 1.2e-2, torch.float32: 1e-5}[dtype] + 1e-6 * k ** 0.5


SHAPES = [(128, 64), (4096, 4096), (4096, 1024), (11008, 4096)]


@pytest.mark.cuda
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 128, -1])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_op_matches_the_pytorch_op(bits, group_size, sym, act_order, dtype):
    if act_order and group_size == -1:
        pytest.skip("act-order needs groups")
    k_ = cuda.kernels(torch.device("cuda"))
    for i, (k, n) in enumerate(SHAPES):
        _, qweight, scales, qzeros, g_idx = _gpu_args(bits, group_size, sym, act_order, k, n, 1, dtype, seed=100 * i)
        w64 = dequantize_packed(qweight, scales, qzeros, g_idx, bits, torch.float64)    # (k, n) on the GPU
        for tokens in (1, 2, 3, 5, 8, 13, 16, 17, 64):                                 # fresh x each time
            x = torch.randn(tokens, k, generator=torch.Generator().manual_seed(100 * i + tokens)).to(dtype).cuda()
            want = x.double() @ w64
            calls = [("op", torch.ops.quantize_llm.dequant_matmul(x, qweight, scales, qzeros, g_idx, bits,
                                                                  group_size))]
            if tokens <= 16:
                calls.append(("gemv", cuda.gemv(k_, x, qweight, scales, qzeros, g_idx, bits)))
            for path, got in calls:
                torch.cuda.synchronize()
                assert got.dtype == dtype and got.shape == (tokens, n)
                assert torch.isfinite(got).all(), (path, k, n, tokens)
                assert _rel(got, want) < _bound(dtype, k), (path, k, n, tokens, _rel(got, want))


@pytest.mark.cuda
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_dequantize_writes_every_element_exactly(bits, dtype):
    k_ = cuda.kernels(torch.device("cuda"))
    x, qweight, scales, qzeros, g_idx = _gpu_args(bits, 128, False, True, 4096, 1000, 1, dtype, seed=7)
    out = torch.full((4096, 1000), float("nan"), dtype=dtype, device="cuda")          # poisoned
    got = cuda.dequantize(k_, qweight, scales, qzeros, g_idx, bits, dtype, out=out)
    want = dequantize_packed(qweight, scales, qzeros, g_idx, bits, torch.float32).to(dtype)
    assert torch.equal(got, want)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("blocksize", [64, 128, 4096])
def test_cuda_nf4_matches_the_pytorch_op(dtype, blocksize):
    k_ = cuda.kernels(torch.device("cuda"))
    for k, n in [(64, 32), (4096, 4096), (11008, 4096), (4096, 11008)]:
        for tokens in (1, 2, 5, 16):
            x, wp, absmax, code = nf4_args(tokens, k, n, blocksize, "cuda", dtype, seed=k + tokens)
            want = nf4_matmul_reference(x.double(), wp, absmax, code, n, blocksize)
            out = torch.full((tokens, n), float("nan"), device="cuda")                  # poisoned
            got = cuda.nf4_gemv(k_, x, wp, absmax, code, n, blocksize, out=out)
            torch.cuda.synchronize()
            assert torch.isfinite(out).all()
            assert _rel(got, want) < _bound(dtype, k), (k, n, tokens)
            assert _rel(torch.ops.quantize_llm.nf4_matmul(x, wp, absmax, code, n, blocksize), want) < _bound(dtype, k)


@pytest.mark.cuda
def test_cuda_status_and_loader(tmp_path):
    st = cuda.status()
    assert st.available, st.reason
    assert list((tmp_path / "cache" / "kernels").glob("*.cubin"))                  # built and cached
    cuda.reset()
    assert "cached" in cuda.status().reason


@pytest.mark.cuda
@pytest.mark.parametrize("method", [["rtn", "--bits", "4"], ["rtn", "--bits", "8", "--asym"], ["nf4"]])
def test_a_model_on_the_kernels_matches_the_pytorch_path(tiny_model, tmp_path, method):
    from test_cli import cli

    from quantize_llm.runtime.load import load_quantized

    assert cli(*method[:1], tiny_model("llama"), "-o", tmp_path / "q", *method[1:]) == 0
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(3)).cuda()
    with torch.no_grad():
        fast = load_quantized(tmp_path / "q", device="cuda", dtype=torch.float16, backend="cuda")(ids).logits
        slow = load_quantized(tmp_path / "q", device="cuda", dtype=torch.float16, backend="torch")(ids).logits
        for step in range(1, 4):                                   # one-token decode steps take the GEMV path
            a = load_quantized(tmp_path / "q", device="cuda", dtype=torch.float16, backend="cuda")(ids[:, :step])
            b = load_quantized(tmp_path / "q", device="cuda", dtype=torch.float16, backend="torch")(ids[:, :step])
            assert _rel(a.logits.float(), b.logits.double()) < 5e-3
    assert _rel(fast.float(), slow.double()) < 5e-3


def test_launch_params_point_at_each_value():
    t = torch.arange(4, dtype=torch.int32)
    params, holders = cuda.launch_params([t, ctypes.c_int(7), ctypes.c_int(-3)])
    assert len(params) == 3
    assert ctypes.c_void_p.from_address(params[0]).value == t.data_ptr()
    assert ctypes.c_int.from_address(params[1]).value == 7 and ctypes.c_int.from_address(params[2]).value == -3

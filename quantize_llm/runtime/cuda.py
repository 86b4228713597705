"""The CUDA implementations of the runtime ops, built on first use for the GPU present.

csrc/dequant_matmul.cu is compiled to a CUBIN for the device's compute capability with NVRTC
(libnvrtc, which torch's CUDA wheels ship, so no CUDA toolkit is needed), or with `nvcc` where
NVRTC cannot be found and nvcc can. The binary is cached per (compute capability, hash of the
source and the compiler options) under $QUANTIZE_LLM_CACHE, else $XDG_CACHE_HOME/quantize-llm,
else ~/.cache/quantize-llm, in `kernels/`. It is loaded and launched through the CUDA driver API
(libcuda) on torch's current stream.

`register()` adds the "cuda" implementation of quantize_llm::dequant_matmul and
quantize_llm::nf4_matmul. Whenever the kernels cannot serve a call (they failed to build or load,
or the arguments are outside what they handle: 2/3-bit codes, widths that break their vector
loads, non-float16 scales), the call goes to the PyTorch implementation; a build or load failure
is warned about once, with the reason. `status()` says what happened, for `quantize-llm env`.

Paths per call (dequant_matmul): up to 16 tokens, the fused dequantize-GEMV kernel; more, the
weight is dequantized to the activation dtype by a kernel and multiplied by cuBLAS. Between 2
and 16 tokens the choice is measured once per (device, shape, bits, dtype, batch bucket) the
first time it is met (outside CUDA graph capture) and the faster kept.
"""
from __future__ import annotations

import ctypes
import glob
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "dequant_matmul.cu"
NVRTC_OPTIONS = ("-std=c++17", "-default-device")
GEMV_MAX_TOKENS = 16
GEMV_BUCKETS = (1, 2, 4, 8, 16)
GEMV_THREADS = 128
NF4_THREADS = 256
NF4_CHUNK = 512
SHARED_LIMIT = 48 * 1024
ACT_NAMES = {torch.float16: "f16", torch.bfloat16: "bf16", torch.float32: "f32"}


class KernelUnavailable(RuntimeError):
    """The kernels cannot be built or loaded here; the message says why."""


@dataclass(frozen=True)
class Status:
    available: bool | None        # None: not tried yet (no CUDA call so far)
    reason: str


def cache_dir() -> Path:
    root = os.environ.get("QUANTIZE_LLM_CACHE")
    if root:
        return Path(root).expanduser() / "kernels"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "quantize-llm" / "kernels"


def source_text() -> str:
    return SOURCE.read_text()


def binary_name(capability: tuple[int, int], source: str, compiler: str) -> str:
    """The cache file of the CUBIN for one compute capability, source text and compiler."""
    digest = hashlib.sha256("\0".join([source, compiler, *NVRTC_OPTIONS]).encode()).hexdigest()[:16]
    return f"dequant_matmul-sm{capability[0]}{capability[1]}-{compiler}-{digest}.cubin"


# ---- compilers -----------------------------------------------------------------------------------

def _load_nvrtc() -> ctypes.CDLL:
    """libnvrtc: torch's CUDA wheels ship it (and usually have it loaded already)."""
    major = (torch.version.cuda or "12").split(".")[0]
    names = [f"libnvrtc.so.{major}", "libnvrtc.so"] if sys.platform != "win32" else \
        [f"nvrtc64_{major}0_0.dll", f"nvrtc64_{major}1_0.dll"]
    for root in map(Path, sys.path):   # pip wheels: site-packages/nvidia/.../lib/libnvrtc.so.N
        names += sorted(glob.glob(str(root / "nvidia" / "**" / "libnvrtc.so*"), recursive=True))
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home:
        names += sorted(glob.glob(os.path.join(cuda_home, "lib*", "libnvrtc.so*")))
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise KernelUnavailable("NVRTC (libnvrtc) was not found; install a CUDA build of torch, or the CUDA "
                            "toolkit's nvcc")


def compile_nvrtc(source: str, capability: tuple[int, int], nvrtc: ctypes.CDLL | None = None) -> bytes:
    """CUBIN for sm_XY from NVRTC; KernelUnavailable with the compiler's log on failure."""
    lib = nvrtc or _load_nvrtc()
    prog = ctypes.c_void_p()

    def check(code: int, what: str) -> None:
        if code != 0:
            lib.nvrtcGetErrorString.restype = ctypes.c_char_p
            text = lib.nvrtcGetErrorString(code)
            raise KernelUnavailable(f"NVRTC {what} failed: {text.decode() if text else code}")

    check(lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"dequant_matmul.cu", 0, None, None), "setup")
    try:
        options = [f"--gpu-architecture=sm_{capability[0]}{capability[1]}".encode(),
                   *(o.encode() for o in NVRTC_OPTIONS)]
        array = (ctypes.c_char_p * len(options))(*options)
        code = lib.nvrtcCompileProgram(prog, len(options), array)
        if code != 0:
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetProgramLog(prog, log)
            first = next((line for line in log.value.decode(errors="replace").splitlines() if "error" in line),
                         "see the compiler log")
            raise KernelUnavailable(f"NVRTC could not compile the kernels for sm_{capability[0]}{capability[1]}: "
                                    f"{first.strip()}")
        size = ctypes.c_size_t()
        check(lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "getting the binary's size")
        binary = ctypes.create_string_buffer(size.value)
        check(lib.nvrtcGetCUBIN(prog, binary), "getting the binary")
        return binary.raw
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def compile_nvcc(source_path: Path, capability: tuple[int, int], nvcc: str = "nvcc") -> bytes:
    """CUBIN for sm_XY from nvcc (where NVRTC is missing); KernelUnavailable on failure."""
    with tempfile.TemporaryDirectory(prefix="quantize-llm-nvcc-") as tmp:
        out = Path(tmp) / "k.cubin"
        cmd = [nvcc, "--cubin", f"-arch=sm_{capability[0]}{capability[1]}", "-std=c++17", "-o", str(out),
               str(source_path)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            first = next((line for line in done.stderr.splitlines() if "error" in line), done.stderr.strip()[:200])
            raise KernelUnavailable(f"nvcc could not compile the kernels for "
                                    f"sm_{capability[0]}{capability[1]}: {first}")
        return out.read_bytes()


def build(capability: tuple[int, int]) -> tuple[bytes, Path, bool]:
    """The CUBIN for `capability`: from the cache, else compiled and cached (written atomically).

    Returns (binary, cache file, whether it came from the cache)."""
    source = source_text()
    try:
        nvrtc, compiler = _load_nvrtc(), "nvrtc"
    except KernelUnavailable:
        nvcc = shutil.which("nvcc")
        if nvcc is None:
            raise
        nvrtc, compiler = None, "nvcc"
    path = cache_dir() / binary_name(capability, source, compiler)
    if path.is_file():
        return path.read_bytes(), path, True
    binary = compile_nvrtc(source, capability, nvrtc) if compiler == "nvrtc" else compile_nvcc(SOURCE, capability)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".cubin")
        with os.fdopen(fd, "wb") as f:
            f.write(binary)
        os.replace(tmp, path)
    except OSError:   # a read-only cache is not fatal: compile again next time
        pass
    return binary, path, False


# ---- the driver API ---------------------------------------------------------------------------

class _Driver:
    """The few libcuda calls needed to load a CUBIN and launch its kernels."""

    def __init__(self) -> None:
        try:
            self.lib = ctypes.CDLL("libcuda.so.1" if sys.platform != "win32" else "nvcuda.dll")
        except OSError as exc:
            raise KernelUnavailable(f"the CUDA driver library could not be loaded ({exc})") from None

    def check(self, code: int, what: str) -> None:
        if code != 0:
            text = ctypes.c_char_p()
            self.lib.cuGetErrorString(code, ctypes.byref(text))
            raise KernelUnavailable(f"{what} failed: {text.value.decode() if text.value else code}")

    def load(self, binary: bytes) -> ctypes.c_void_p:
        module = ctypes.c_void_p()
        self.check(self.lib.cuModuleLoadData(ctypes.byref(module), binary), "loading the kernels")
        return module

    def function(self, module: ctypes.c_void_p, name: str) -> ctypes.c_void_p:
        fn = ctypes.c_void_p()
        self.check(self.lib.cuModuleGetFunction(ctypes.byref(fn), module, name.encode()), f"finding kernel {name}")
        return fn

    def launch(self, fn: ctypes.c_void_p, grid: tuple[int, int], block: int, shared: int, stream: int,
               args: list[Any]) -> None:
        params, holders = launch_params(args)
        code = self.lib.cuLaunchKernel(fn, ctypes.c_uint(grid[0]), ctypes.c_uint(grid[1]), ctypes.c_uint(1),
                                       ctypes.c_uint(block), ctypes.c_uint(1), ctypes.c_uint(1), ctypes.c_uint(shared),
                                       ctypes.c_void_p(stream), params, None)
        if code != 0:
            text = ctypes.c_char_p()
            self.lib.cuGetErrorString(code, ctypes.byref(text))
            raise RuntimeError(f"quantize-llm kernel launch failed: {text.value.decode() if text.value else code}")


def launch_params(args: list[Any]) -> tuple[ctypes.Array, list]:
    """cuLaunchKernel's `kernelParams`: an array of pointers to each argument's value (a tensor
    passes its data pointer, a ctypes scalar itself); the holders must outlive the launch."""
    holders = [a if isinstance(a, ctypes._SimpleCData) else ctypes.c_void_p(a.data_ptr()) for a in args]
    return (ctypes.c_void_p * len(holders))(*[ctypes.addressof(h) for h in holders]), holders


class Kernels:
    """The loaded module on one device, its functions looked up by name on first use."""

    def __init__(self, driver: _Driver, module: ctypes.c_void_p, device: torch.device, sms: int) -> None:
        self.driver, self.module, self.device, self.sms = driver, module, device, sms
        self._functions: dict[str, ctypes.c_void_p] = {}
        self.choice: dict[tuple, str] = {}      # measured GEMV-or-cuBLAS choices

    def __call__(self, name: str, grid: tuple[int, int], block: int, shared: int, args: list[Any]) -> None:
        fn = self._functions.get(name)
        if fn is None:
            fn = self._functions[name] = self.driver.function(self.module, name)
        stream = torch.cuda.current_stream(self.device).cuda_stream
        self.driver.launch(fn, grid, block, shared, stream, args)


_lock = threading.Lock()
_loaded: dict[int, Kernels] = {}
_failure: str | None = None
_warned = False
_built: str | None = None


def kernels(device: torch.device) -> Kernels:
    """The kernels on `device` (built or read from the cache on first use); KernelUnavailable."""
    global _failure, _built
    index = device.index if device.index is not None else torch.cuda.current_device()
    found = _loaded.get(index)
    if found is not None:
        return found
    if _failure is not None:
        raise KernelUnavailable(_failure)
    with _lock:
        if index in _loaded:
            return _loaded[index]
        try:
            if os.environ.get("QUANTIZE_LLM_KERNEL", "").lower() in ("0", "off", "torch"):
                raise KernelUnavailable("disabled by QUANTIZE_LLM_KERNEL")
            capability = torch.cuda.get_device_capability(index)
            if capability < (7, 0):
                raise KernelUnavailable(f"compute capability {capability[0]}.{capability[1]} is older than 7.0")
            driver = _Driver()
            binary, path, cached = build(capability)
            with torch.cuda.device(index):
                torch.cuda.synchronize(index)            # a runtime call: the primary context is now current
                module = driver.load(binary)
            sms = torch.cuda.get_device_properties(index).multi_processor_count
            _loaded[index] = Kernels(driver, module, torch.device("cuda", index), sms)
            _built = f"sm_{capability[0]}{capability[1]}, {'cached' if cached else 'built'} at {path}"
            return _loaded[index]
        except KernelUnavailable as exc:
            _failure = str(exc)
            raise


def status() -> Status:
    """Whether the kernels serve CUDA calls here, and why (not); tries to load them when a GPU is present."""
    if torch.version.cuda is None:
        return Status(False, f"this torch build ({torch.__version__}) has no CUDA support")
    if not torch.cuda.is_available():
        return Status(False, "no CUDA GPU is visible")
    try:
        kernels(torch.device("cuda", torch.cuda.current_device()))
    except KernelUnavailable as exc:
        return Status(False, str(exc))
    return Status(True, _built or "loaded")


def reset() -> None:
    """Forget loaded modules and failures (tests)."""
    global _failure, _warned, _built
    _loaded.clear()
    _failure, _warned, _built = None, False, None


def _fallback_warning(reason: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(f"quantize-llm: the CUDA kernels are not used ({reason}); running the PyTorch "
                      "implementation instead", RuntimeWarning, stacklevel=3)


# ---- dequant_matmul -------------------------------------------------------------------------------

def bucket(tokens: int) -> int:
    """The compiled GEMV variant (activations rows padded up to 1, 2, 4, 8 or 16) for `tokens`."""
    return next(b for b in GEMV_BUCKETS if b >= tokens)


def split_rows(rows: int, n: int, sms: int, mt: int, pack: int) -> int:
    """Packed rows per block for the GEMV kernel: enough blocks along K to give every SM two,
    with each chunk's activations and group indices within the shared-memory limit."""
    col_blocks = -(-n // (GEMV_THREADS * 4))
    splits = max(1, min(rows, -(-2 * sms // col_blocks)))
    per = -(-rows // splits)
    cap = max(1, SHARED_LIMIT // ((mt + 1) * 4 * pack))
    return max(1, min(per, cap))


def gemv_supported(x: Tensor, qweight: Tensor, scales: Tensor, bits: int) -> str | None:
    """None when the GEMV kernel handles the call, else why not."""
    if bits not in (4, 8):
        return f"{bits}-bit codes"
    if x.dtype not in ACT_NAMES:
        return f"{x.dtype} activations"
    if scales.dtype != torch.float16:
        return f"{scales.dtype} scales"
    n, k = qweight.shape[1], x.shape[1]
    if n % 8 or k % (32 // bits):
        return f"shape {k} x {n}"
    if qweight.data_ptr() % 16 or scales.data_ptr() % 8:
        return "unaligned tensors"
    return None


def _contiguous(*tensors: Tensor) -> list[Tensor]:
    return [t if t.is_contiguous() else t.contiguous() for t in tensors]


def gemv(k: Kernels, x: Tensor, qweight: Tensor, scales: Tensor, qzeros: Tensor, g_idx: Tensor, bits: int) -> Tensor:
    m, kin = x.shape
    n = qweight.shape[1]
    mt, pack = bucket(m), 32 // bits
    rows = kin // pack
    per = split_rows(rows, n, k.sms, mt, pack)
    out = torch.zeros(m, n, dtype=torch.float32, device=x.device)
    shared = (mt + 1) * per * pack * 4
    grid = (-(-n // (GEMV_THREADS * 4)), -(-rows // per))
    k(f"gemv_b{bits}_m{mt}_{ACT_NAMES[x.dtype]}", grid, GEMV_THREADS, shared,
      [x, qweight, scales, qzeros, g_idx, out, ctypes.c_int(m), ctypes.c_int(kin), ctypes.c_int(n), ctypes.c_int(per)])
    return out.to(x.dtype)


def dequantize(k: Kernels, qweight: Tensor, scales: Tensor, qzeros: Tensor, g_idx: Tensor, bits: int,
               dtype: torch.dtype, out: Tensor | None = None) -> Tensor:
    """The weight W^T (in, out) in `dtype`, by the dequantize kernel (into `out` when given)."""
    kin, n = g_idx.shape[0], qweight.shape[1]
    w = torch.empty(kin, n, dtype=dtype, device=qweight.device) if out is None else out
    total = kin // (32 // bits) * n                 # packed rows beyond K (padding) are not read
    k(f"dequant_b{bits}_{ACT_NAMES[dtype]}", (-(-total // 256), 1), 256, 0,
      [qweight, scales, qzeros, g_idx, w, ctypes.c_int(kin), ctypes.c_int(n)])
    return w


def _time(fn: Any, reps: int = 5) -> float:
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def dequant_matmul_cuda(x: Tensor, qweight: Tensor, scales: Tensor, qzeros: Tensor, g_idx: Tensor,
                        bits: int, group_size: int) -> Tensor:
    from .reference import _check, dequant_matmul_reference

    _check(x, qweight, scales, qzeros, g_idx, bits, group_size)
    try:
        k = kernels(x.device)
    except KernelUnavailable as exc:
        _fallback_warning(str(exc))
        return dequant_matmul_reference(x, qweight, scales, qzeros, g_idx, bits, group_size)
    if x.shape[0] == 0 or gemv_supported(x, qweight, scales, bits) is not None:
        return dequant_matmul_reference(x, qweight, scales, qzeros, g_idx, bits, group_size)
    x, qweight, scales, qzeros, g_idx = _contiguous(x, qweight, scales, qzeros, g_idx)
    m = x.shape[0]

    def via_gemv() -> Tensor:
        return gemv(k, x, qweight, scales, qzeros, g_idx, bits)

    def via_cublas() -> Tensor:
        return x @ dequantize(k, qweight, scales, qzeros, g_idx, bits, x.dtype)

    if m == 1:
        return via_gemv()
    if m > GEMV_MAX_TOKENS:
        return via_cublas()
    key = (tuple(qweight.shape), bits, x.dtype, bucket(m))
    choice = k.choice.get(key)
    if choice is None:
        if torch.cuda.is_current_stream_capturing():
            return via_gemv() if m <= 8 else via_cublas()
        choice = k.choice[key] = "gemv" if _time(via_gemv) <= _time(via_cublas) else "cublas"
    return via_gemv() if choice == "gemv" else via_cublas()


# ---- nf4_matmul -----------------------------------------------------------------------------------

def nf4_supported(x: Tensor, weight_packed: Tensor, blocksize: int) -> str | None:
    if x.dtype not in ACT_NAMES:
        return f"{x.dtype} activations"
    if x.shape[1] % 16 or blocksize % 16:
        return f"in_features {x.shape[1]} / blocksize {blocksize}"
    if weight_packed.data_ptr() % 8:
        return "unaligned tensors"
    if x.shape[0] > GEMV_MAX_TOKENS:
        return "more than 16 tokens"
    return None


def nf4_matmul_cuda(x: Tensor, weight_packed: Tensor, absmax: Tensor, code: Tensor, out_features: int,
                    blocksize: int) -> Tensor:
    from .reference import nf4_matmul_reference

    try:
        k = kernels(x.device)
    except KernelUnavailable as exc:
        _fallback_warning(str(exc))
        return nf4_matmul_reference(x, weight_packed, absmax, code, out_features, blocksize)
    if x.shape[0] == 0 or nf4_supported(x, weight_packed, blocksize) is not None:
        return nf4_matmul_reference(x, weight_packed, absmax, code, out_features, blocksize)
    xc, wc, ac, cc = _contiguous(x, weight_packed, absmax.float(), code.float())
    return nf4_gemv(k, xc, wc, ac, cc, out_features, blocksize)


def nf4_gemv(k: Kernels, x: Tensor, weight_packed: Tensor, absmax: Tensor, code: Tensor, out_features: int,
             blocksize: int, out: Tensor | None = None) -> Tensor:
    """The NF4 GEMV kernel (into the float32 `out` (tokens, out_features) when given)."""
    m, kin = x.shape
    mt = bucket(m)
    out = torch.empty(m, out_features, dtype=torch.float32, device=x.device) if out is None else out
    warps = NF4_THREADS // 32
    shared = (mt * (NF4_CHUNK + NF4_CHUNK // 16) + 16) * 4
    k(f"nf4_m{mt}_{ACT_NAMES[x.dtype]}", (-(-out_features // warps), 1), NF4_THREADS, shared,
      [x, weight_packed, absmax, code, out, ctypes.c_int(m), ctypes.c_int(kin), ctypes.c_int(out_features),
       ctypes.c_int(blocksize)])
    return out.to(x.dtype)


_registered = False


def register() -> None:
    """Add the "cuda" implementations to the ops (once; only in torch builds with CUDA)."""
    global _registered
    if _registered or torch.version.cuda is None:
        return
    torch.library.register_kernel("quantize_llm::dequant_matmul", "cuda", dequant_matmul_cuda)
    torch.library.register_kernel("quantize_llm::nf4_matmul", "cuda", nf4_matmul_cuda)
    _registered = True

// The kernels of quantize_llm/csrc/dequant_matmul.cu, compiled for the host with emulate.h, and
// one launcher per kernel family taking the kernel's address (looked up by name) and its grid.
#include "emulate.h"
#include QLLM_SOURCE

typedef void (*GemvFn)(const void*, const int*, const u16*, const int*, const int*, float*, int, int, int, int);
typedef void (*DequantFn)(const int*, const u16*, const int*, const int*, void*, int, int);
typedef void (*Nf4Fn)(const void*, const u8*, const float*, const float*, float*, int, int, int, int);

extern "C" void emu_gemv(void* fn, unsigned gx, unsigned gy, unsigned bx, std::size_t shared, const void* x,
                         const int* qweight, const u16* scales, const int* qzeros, const int* g_idx, float* out,
                         int M, int K, int N, int rows_per_chunk) {
    GemvFn f = reinterpret_cast<GemvFn>(fn);
    emu_launch(gx, gy, bx, shared, [=] { f(x, qweight, scales, qzeros, g_idx, out, M, K, N, rows_per_chunk); });
}

extern "C" void emu_dequant(void* fn, unsigned gx, unsigned gy, unsigned bx, std::size_t shared, const int* qweight,
                            const u16* scales, const int* qzeros, const int* g_idx, void* w, int K, int N) {
    DequantFn f = reinterpret_cast<DequantFn>(fn);
    emu_launch(gx, gy, bx, shared, [=] { f(qweight, scales, qzeros, g_idx, w, K, N); });
}

extern "C" void emu_nf4(void* fn, unsigned gx, unsigned gy, unsigned bx, std::size_t shared, const void* x,
                        const u8* wp, const float* absmax, const float* code, float* out, int M, int K, int N,
                        int blocksize) {
    Nf4Fn f = reinterpret_cast<Nf4Fn>(fn);
    emu_launch(gx, gy, bx, shared, [=] { f(x, wp, absmax, code, out, M, K, N, blocksize); });
}

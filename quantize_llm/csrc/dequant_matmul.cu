// Kernels behind quantize_llm::dequant_matmul (GPTQ layout, runtime/ops.py) and
// quantize_llm::nf4_matmul (bitsandbytes layout), built and launched by runtime/cuda.py.
//
// No CUDA headers are included, so the file compiles with NVRTC as shipped in torch's CUDA wheels
// (no toolkit needed) as well as with nvcc. 16-bit floats travel as unsigned short and are
// converted with PTX instructions (float16) or bit operations (bfloat16).
//
// Layouts (row-major, int32 words little-endian, code j of a word in bits [BITS*j, BITS*j+BITS)):
//   x        (M, K)          activations: float16, bfloat16 or float32 (DT)
//   qweight  (K/PACK, N)     int32, PACK = 32/BITS codes of consecutive k for one column n
//   scales   (G, N)          float16
//   qzeros   (G, ceil(N*BITS/32))  int32, TRUE zero points packed along n
//   g_idx    (K,)            int32 group of every input k (act-order allowed)
//   y[m, n] = sum_k x[m, k] * scales[g, n] * (q[k, n] - z[g, n]),  g = g_idx[k]

// QLLM_EMULATE: tests/runtime/emulate.h runs these kernels on the CPU (one host thread per CUDA
// thread) and supplies the built-ins below.

typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned char u8;

#ifndef QLLM_EMULATE
#define QLLM_DYNAMIC_SHARED(name) extern __shared__ float name[]
#endif

struct alignas(16) U4 { u32 x, y, z, w; };
struct alignas(8) U2 { u32 x, y; };

#define DT_F16 0
#define DT_BF16 1
#define DT_F32 2

__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }

#ifndef QLLM_EMULATE
__device__ __forceinline__ float f16_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ u16 f32_to_f16(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
#endif

__device__ __forceinline__ float bf16_to_f32(u16 b) { return __uint_as_float(((u32)b) << 16); }

__device__ __forceinline__ u16 f32_to_bf16(float f) {   // round to nearest even, NaN stays NaN
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (u16)(u >> 16);
}

template <int DT> __device__ __forceinline__ float load_act(const void* p, long i) {
    if (DT == DT_F16) return f16_to_f32(static_cast<const u16*>(p)[i]);
    if (DT == DT_BF16) return bf16_to_f32(static_cast<const u16*>(p)[i]);
    return static_cast<const float*>(p)[i];
}

template <int DT> __device__ __forceinline__ void store_act(void* p, long i, float v) {
    if (DT == DT_F16) static_cast<u16*>(p)[i] = f32_to_f16(v);
    else if (DT == DT_BF16) static_cast<u16*>(p)[i] = f32_to_bf16(v);
    else static_cast<float*>(p)[i] = v;
}

// ---- small batches: fused dequantize + GEMV ---------------------------------------------------
//
// A thread owns 4 adjacent columns and reads their packed words with one 16-byte load per packed
// row (a warp reads 512 contiguous bytes). Block (128 threads) = 512 columns x one chunk of
// packed rows (split-K over gridDim.y); the chunk's activations (MT x KC floats) and group
// indices sit in shared memory. A group's scales and zeros are loaded when the group changes
// (once per group for sorted g_idx, per k under act-order). Partial sums are added to a float32
// output with atomics (zeroed by the caller). Needs N % 8 == 0, K % PACK == 0.

template <int BITS, int MT, int DT>
__device__ __forceinline__ void gemv_body(const void* __restrict__ x, const int* __restrict__ qweight,
                                          const u16* __restrict__ scales, const int* __restrict__ qzeros,
                                          const int* __restrict__ g_idx, float* __restrict__ out,
                                          int M, int K, int N, int rows_per_chunk) {
    constexpr int PACK = 32 / BITS;
    constexpr u32 MASK = (1u << BITS) - 1u;
    QLLM_DYNAMIC_SHARED(smem);
    const int KC = rows_per_chunk * PACK;
    float* xs = smem;                                   // [MT][KC]
    int* gs = reinterpret_cast<int*>(smem + MT * KC);   // [KC]
    const int rows_total = K / PACK;
    const int r0 = blockIdx.y * rows_per_chunk;
    const int r1 = imin(r0 + rows_per_chunk, rows_total);
    const int k0 = r0 * PACK;
    const int kn = (r1 - r0) * PACK;
    for (int i = threadIdx.x; i < MT * KC; i += blockDim.x) {
        const int m = i / KC, k = i - (i / KC) * KC;
        xs[i] = (m < M && k < kn) ? load_act<DT>(x, (long)m * K + k0 + k) : 0.f;
    }
    for (int k = threadIdx.x; k < kn; k += blockDim.x) gs[k] = g_idx[k0 + k];
    __syncthreads();

    const int n0 = (blockIdx.x * blockDim.x + threadIdx.x) * 4;
    if (n0 >= N) return;
    const int zwords = (N * BITS + 31) / 32;
    const int zword = (n0 * BITS) / 32, zshift = (n0 * BITS) % 32;

    float acc[MT][4];
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[m][c] = 0.f;
    float s[4] = {0.f, 0.f, 0.f, 0.f}, nzs[4] = {0.f, 0.f, 0.f, 0.f};
    int cur = -1;

    for (int r = r0; r < r1; ++r) {
        const U4 q = *reinterpret_cast<const U4*>(qweight + (long)r * N + n0);
        const u32 qv[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
        for (int j = 0; j < PACK; ++j) {
            const int kl = (r - r0) * PACK + j;
            const int g = gs[kl];
            if (g != cur) {
                cur = g;
                const U2 sv = *reinterpret_cast<const U2*>(scales + (long)g * N + n0);
                const u32 zw = (u32)qzeros[(long)g * zwords + zword] >> zshift;
                const u16 sh[4] = {(u16)(sv.x & 0xffffu), (u16)(sv.x >> 16), (u16)(sv.y & 0xffffu), (u16)(sv.y >> 16)};
#pragma unroll
                for (int c = 0; c < 4; ++c) {
                    s[c] = f16_to_f32(sh[c]);
                    nzs[c] = -(float)((zw >> (BITS * c)) & MASK) * s[c];
                }
            }
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const float w = fmaf((float)((qv[c] >> (BITS * j)) & MASK), s[c], nzs[c]);
#pragma unroll
                for (int m = 0; m < MT; ++m) acc[m][c] = fmaf(xs[m * KC + kl], w, acc[m][c]);
            }
        }
    }
#pragma unroll
    for (int m = 0; m < MT; ++m) {
        if (m < M) {
#pragma unroll
            for (int c = 0; c < 4; ++c) atomicAdd(out + (long)m * N + n0 + c, acc[m][c]);
        }
    }
}

// ---- large batches: dequantize to the activation dtype, then cuBLAS (torch.matmul) -----------
//
// One thread per packed word: PACK values of one column, written to w (K, N) = W^T. Any N.

template <int BITS, int DT>
__device__ __forceinline__ void dequant_body(const int* __restrict__ qweight, const u16* __restrict__ scales,
                                             const int* __restrict__ qzeros, const int* __restrict__ g_idx,
                                             void* __restrict__ w, int K, int N) {
    constexpr int PACK = 32 / BITS;
    constexpr u32 MASK = (1u << BITS) - 1u;
    const long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
    const long total = (long)(K / PACK) * N;
    if (idx >= total) return;
    const int r = (int)(idx / N), n = (int)(idx - (idx / N) * N);
    const int zwords = (N * BITS + 31) / 32;
    const u32 q = (u32)qweight[idx];
#pragma unroll
    for (int j = 0; j < PACK; ++j) {
        const int k = r * PACK + j;
        const int g = g_idx[k];
        const float s = f16_to_f32(scales[(long)g * N + n]);
        const int z = (int)(((u32)qzeros[(long)g * zwords + (n * BITS) / 32] >> ((n * BITS) % 32)) & MASK);
        store_act<DT>(w, (long)k * N + n, (float)((int)((q >> (BITS * j)) & MASK) - z) * s);
    }
}

// ---- NF4 / FP4 (bitsandbytes layout), small batches -------------------------------------------
//
// Weight: codes of the row-major flattened (N, K) weight, two per byte, high nibble first;
// absmax float32 per `blocksize` flat values; code: the 16-entry table. A warp owns one output
// row; each lane reads 8 bytes (16 codes) per 512-wide chunk of k, whose activations the block's
// 8 warps share through shared memory (padded by one float every 16 against bank conflicts).
// Writes float32 y (M, N). Needs K % 16 == 0 and blocksize % 16 == 0.

#define NF4_IC 512
#define NF4_PAD(i) ((i) + ((i) >> 4))

template <int MT, int DT>
__device__ __forceinline__ void nf4_body(const void* __restrict__ x, const u8* __restrict__ wp,
                                         const float* __restrict__ absmax, const float* __restrict__ code,
                                         float* __restrict__ out, int M, int K, int N, int blocksize) {
    QLLM_DYNAMIC_SHARED(smem);
    constexpr int STRIDE = NF4_PAD(NF4_IC);
    float* xs = smem;                    // [MT][STRIDE]
    float* tbl = smem + MT * STRIDE;     // [16]
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int o = blockIdx.x * (blockDim.x >> 5) + warp;
    if (threadIdx.x < 16) tbl[threadIdx.x] = code[threadIdx.x];
    float acc[MT];
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[m] = 0.f;
    for (int i0 = 0; i0 < K; i0 += NF4_IC) {
        const int ic = imin(NF4_IC, K - i0);
        __syncthreads();
        for (int t = threadIdx.x; t < MT * NF4_IC; t += blockDim.x) {
            const int m = t / NF4_IC, i = t - (t / NF4_IC) * NF4_IC;
            xs[m * STRIDE + NF4_PAD(i)] = (m < M && i < ic) ? load_act<DT>(x, (long)m * K + i0 + i) : 0.f;
        }
        __syncthreads();
        const int il = lane * 16;
        if (o < N && il < ic) {
            const long flat = (long)o * K + i0 + il;
            const U2 b = *reinterpret_cast<const U2*>(wp + flat / 2);
            const float a = absmax[flat / blocksize];
#pragma unroll
            for (int bi = 0; bi < 8; ++bi) {
                const u32 byte = ((bi < 4 ? b.x : b.y) >> (8 * (bi & 3))) & 0xffu;
                const float w0 = tbl[byte >> 4] * a, w1 = tbl[byte & 15u] * a;
#pragma unroll
                for (int m = 0; m < MT; ++m) {
                    acc[m] = fmaf(xs[m * STRIDE + NF4_PAD(il + 2 * bi)], w0, acc[m]);
                    acc[m] = fmaf(xs[m * STRIDE + NF4_PAD(il + 2 * bi + 1)], w1, acc[m]);
                }
            }
        }
    }
#pragma unroll
    for (int m = 0; m < MT; ++m) {
        float v = acc[m];
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
        if (lane == 0 && o < N && m < M) out[(long)m * N + o] = v;
    }
}

// ---- entry points: extern "C" names that runtime/cuda.py looks up ----------------------------

#define GEMV(BITS, MT, DT, NAME)                                                                    \
    extern "C" __global__ void __launch_bounds__(128)                                               \
        gemv_b##BITS##_m##MT##_##NAME(const void* x, const int* qweight, const u16* scales,         \
                                      const int* qzeros, const int* g_idx, float* out, int M,       \
                                      int K, int N, int rows_per_chunk) {                           \
        gemv_body<BITS, MT, DT>(x, qweight, scales, qzeros, g_idx, out, M, K, N, rows_per_chunk);   \
    }

#define GEMV_ALL_M(BITS, DT, NAME) \
    GEMV(BITS, 1, DT, NAME) GEMV(BITS, 2, DT, NAME) GEMV(BITS, 4, DT, NAME) GEMV(BITS, 8, DT, NAME) GEMV(BITS, 16, DT, NAME)

GEMV_ALL_M(4, DT_F16, f16)
GEMV_ALL_M(4, DT_BF16, bf16)
GEMV_ALL_M(4, DT_F32, f32)
GEMV_ALL_M(8, DT_F16, f16)
GEMV_ALL_M(8, DT_BF16, bf16)
GEMV_ALL_M(8, DT_F32, f32)

#define DEQUANT(BITS, DT, NAME)                                                                     \
    extern "C" __global__ void __launch_bounds__(256)                                               \
        dequant_b##BITS##_##NAME(const int* qweight, const u16* scales, const int* qzeros,           \
                                 const int* g_idx, void* w, int K, int N) {                         \
        dequant_body<BITS, DT>(qweight, scales, qzeros, g_idx, w, K, N);                            \
    }

DEQUANT(4, DT_F16, f16)
DEQUANT(4, DT_BF16, bf16)
DEQUANT(4, DT_F32, f32)
DEQUANT(8, DT_F16, f16)
DEQUANT(8, DT_BF16, bf16)
DEQUANT(8, DT_F32, f32)

#define NF4(MT, DT, NAME)                                                                           \
    extern "C" __global__ void __launch_bounds__(256)                                               \
        nf4_m##MT##_##NAME(const void* x, const u8* wp, const float* absmax, const float* code,      \
                           float* out, int M, int K, int N, int blocksize) {                        \
        nf4_body<MT, DT>(x, wp, absmax, code, out, M, K, N, blocksize);                             \
    }

#define NF4_ALL_M(DT, NAME) NF4(1, DT, NAME) NF4(2, DT, NAME) NF4(4, DT, NAME) NF4(8, DT, NAME) NF4(16, DT, NAME)

NF4_ALL_M(DT_F16, f16)
NF4_ALL_M(DT_BF16, bf16)
NF4_ALL_M(DT_F32, f32)

// Host emulation of the CUDA built-ins used by quantize_llm/csrc/dequant_matmul.cu, for tests on
// machines without a GPU: every CUDA thread of a block is a std::thread, __syncthreads is a
// barrier over the block, warp shuffles go through a per-warp slot array and barrier, float
// atomics take a lock. Blocks run one after another. Built by tests/runtime/test_emulated.py.
#pragma once
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#define QLLM_EMULATE 1
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(x)

struct EmuDim { unsigned x, y, z; };
inline thread_local EmuDim threadIdx, blockIdx;
inline EmuDim blockDim, gridDim;
inline thread_local float* emu_shared;
inline thread_local std::barrier<>* emu_block_barrier;
inline thread_local std::barrier<>* emu_warp_barrier;
inline thread_local float* emu_warp_slots;
inline std::mutex emu_atomic_lock;

#define QLLM_DYNAMIC_SHARED(name) float* name = emu_shared

inline void __syncthreads() { emu_block_barrier->arrive_and_wait(); }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float f16_to_f32(unsigned short h) { _Float16 v; std::memcpy(&v, &h, 2); return (float)v; }
inline unsigned short f32_to_f16(float f) {
    _Float16 v = (_Float16)f;   // round to nearest even, like cvt.rn.f16.f32
    unsigned short h;
    std::memcpy(&h, &v, 2);
    return h;
}
inline float atomicAdd(float* p, float v) {
    std::lock_guard<std::mutex> hold(emu_atomic_lock);
    float old = *p;
    *p = old + v;
    return old;
}
inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
    const unsigned lane = threadIdx.x & 31u;
    emu_warp_slots[lane] = v;
    emu_warp_barrier->arrive_and_wait();
    const float r = emu_warp_slots[lane ^ (unsigned)lane_mask];
    emu_warp_barrier->arrive_and_wait();
    return r;
}

template <class Body>
void emu_launch(unsigned gx, unsigned gy, unsigned bx, std::size_t shared_bytes, Body body) {
    gridDim = {gx, gy, 1};
    blockDim = {bx, 1, 1};
    for (unsigned y = 0; y < gy; ++y) {
        for (unsigned x = 0; x < gx; ++x) {
            // poisoned shared memory: a kernel that reads what it did not write gives NaN
            std::vector<float> shared(shared_bytes / 4 + 1, std::nanf(""));
            std::barrier<> block(bx);
            std::vector<std::unique_ptr<std::barrier<>>> warps;
            for (unsigned w = 0; w < (bx + 31) / 32; ++w) warps.emplace_back(new std::barrier<>(32));
            std::vector<float> slots(((bx + 31) / 32) * 32);
            std::vector<std::thread> threads;
            for (unsigned t = 0; t < bx; ++t) {
                threads.emplace_back([&, t] {
                    threadIdx = {t, 0, 0};
                    blockIdx = {x, y, 0};
                    emu_shared = shared.data();
                    emu_block_barrier = &block;
                    emu_warp_barrier = warps[t / 32].get();
                    emu_warp_slots = slots.data() + (t / 32) * 32;
                    body();
                });
            }
            for (auto& th : threads) th.join();
        }
    }
}

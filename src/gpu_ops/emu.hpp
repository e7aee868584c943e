// The CUDA launch model on the CPU, for testing kernels.cu without a GPU: every block runs in
// turn, each of its threads an OS thread, __syncthreads a barrier, __shared__ a static (shared
// by the block's threads, and blocks never overlap). Slow, but it runs the kernels' own
// indexing, reductions and conversions.
#pragma once
#include <barrier>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <thread>
#include <vector>

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;
inline std::barrier<>* emu_block_barrier = nullptr;
// One barrier a warp: the warp collectives wait for their own warp only, so warps run ahead
// of each other between __syncthreads as on a GPU (a missing __syncthreads can show).
inline std::deque<std::barrier<>> emu_warp_barriers;

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct uint4 {
    unsigned x, y, z, w;
};
inline uint4 ld8(const uint16_t* p) {
    uint4 v;
    std::memcpy(&v, p, 16);
    return v;
}
inline void st8(uint16_t* p, uint4 v) { std::memcpy(p, &v, 16); }
inline unsigned ld2(const uint16_t* p) {
    unsigned v;
    std::memcpy(&v, p, 4);
    return v;
}
inline void st2(uint16_t* p, unsigned v) { std::memcpy(p, &v, 4); }

inline void __syncthreads() { emu_block_barrier->arrive_and_wait(); }
inline void emu_syncwarp() { emu_warp_barriers[threadIdx.x / 32].arrive_and_wait(); }
inline float rsqrtf(float v) { return 1.0f / std::sqrt(v); }
inline unsigned __float_as_uint(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
// GCC's _Float16 converts with IEEE round-to-nearest-even, as cvt.rn.f16.f32 does.
inline float f16_to_f32(uint16_t h) {
    _Float16 v;
    std::memcpy(&v, &h, 2);
    return (float)v;
}
inline uint16_t f32_to_f16(float f) {
    _Float16 v = (_Float16)f;
    uint16_t h;
    std::memcpy(&h, &v, 2);
    return h;
}

// Warp collectives. Every thread of a warp calls them together, as the kernels do: each
// puts its operands in its slot, all wait, each reads what its warp's slots give it, all wait.
inline float emu_lane_value[1024];
inline float shfl_xor(float v, int mask) {
    const unsigned t = threadIdx.x;
    emu_lane_value[t] = v;
    emu_syncwarp();
    const float r = emu_lane_value[(t & ~31u) | ((t & 31u) ^ (unsigned)mask)];
    emu_syncwarp();
    return r;
}

struct EmuFragments {
    unsigned a[4], b[2];
};
inline EmuFragments emu_fragments[1024];

// mma.m16n8k16.row.col with f32 accumulators, from the fragment layouts of the PTX ISA
// ("Matrix Fragments for mma.m16n8k16 with floating point type"), g = lane / 4, t = lane % 4:
// A element (row, col) is in lane 4 (row % 8) + (col % 8) / 2, register row / 8 + 2 (col / 8),
// half col % 2; B element (k, n) in lane 4 n + (k % 8) / 2, register k / 8, half k % 2; this
// lane's d[i] is D[g + 8 (i / 2)][2 t + i % 2].
template <float (*LOAD)(uint16_t)>
inline void emu_mma(float* d, const unsigned* a, const unsigned* b) {
    const unsigned t = threadIdx.x, warp = t & ~31u, lane = t & 31u;
    for (int i = 0; i < 4; ++i) emu_fragments[t].a[i] = a[i];
    for (int i = 0; i < 2; ++i) emu_fragments[t].b[i] = b[i];
    emu_syncwarp();
    auto half = [](unsigned w, int hi) { return LOAD((uint16_t)(hi ? w >> 16 : w & 0xffffu)); };
    auto elem_a = [&](int row, int col) {
        const EmuFragments& f = emu_fragments[warp + 4 * (row % 8) + (col % 8) / 2];
        return half(f.a[row / 8 + 2 * (col / 8)], col % 2);
    };
    auto elem_b = [&](int k, int n) {
        const EmuFragments& f = emu_fragments[warp + 4 * n + (k % 8) / 2];
        return half(f.b[k / 8], k % 2);
    };
    for (int i = 0; i < 4; ++i) {
        const int row = (int)lane / 4 + 8 * (i / 2), col = 2 * ((int)lane % 4) + i % 2;
        float acc = 0.f;
        for (int k = 0; k < 16; ++k) acc += elem_a(row, k) * elem_b(k, col);
        d[i] += acc;
    }
    emu_syncwarp();
}
// ldmatrix.m8n8.x4 (kernels.cu's ldsm_x4, ldsm_x4_t): lane l gives the address of row l % 8 of
// matrix l / 8; r[i] gets matrix i's [g][2t..2t+1], or transposed its [2t][g] and [2t+1][g].
inline const uint16_t* emu_rows[1024];
template <bool TRANS>
inline void emu_ldsm(unsigned* r, const uint16_t* row) {
    const unsigned t = threadIdx.x, warp = t & ~31u, g = (t & 31u) / 4, q = t % 4;
    emu_rows[t] = row;
    emu_syncwarp();
    for (unsigned i = 0; i < 4; ++i) {
        const uint16_t* const* m = emu_rows + warp + 8 * i;
        const uint16_t lo = TRANS ? m[2 * q][g] : m[g][2 * q];
        const uint16_t hi = TRANS ? m[2 * q + 1][g] : m[g][2 * q + 1];
        r[i] = lo | ((unsigned)hi << 16);
    }
    emu_syncwarp();
}
inline void ldsm_x4(unsigned* r, const uint16_t* row) { emu_ldsm<false>(r, row); }
inline void ldsm_x4_t(unsigned* r, const uint16_t* row) { emu_ldsm<true>(r, row); }
// cp.async lands at once here; the kernels' __syncthreads still order it as on the GPU.
inline void cp_async16(uint16_t* dst, const uint16_t* src, bool in) {
    if (in)
        std::memcpy(dst, src, 16);
    else
        std::memset(dst, 0, 16);
}
inline void cp_async_commit() {}
inline void cp_async_wait() {}
// cvt.rn.{f16,bf16}x2.f32: the same rounding as one at a time (f32_to_bf16 is kernels.cu's).
inline uint16_t f32_to_bf16(float f);
inline unsigned pack2_f16(float lo, float hi) { return f32_to_f16(lo) | (unsigned)f32_to_f16(hi) << 16; }
inline unsigned pack2_bf16(float lo, float hi) {
    return f32_to_bf16(lo) | (unsigned)f32_to_bf16(hi) << 16;
}
inline float fast_exp2(float x) { return std::exp2(x); }
inline void __trap() { std::abort(); }
inline float emu_bf16_to_f32(uint16_t h) { return __uint_as_float(((unsigned)h) << 16); }
inline void mma_f16(float* d, const unsigned* a, const unsigned* b) { emu_mma<f16_to_f32>(d, a, b); }
inline void mma_bf16(float* d, const unsigned* a, const unsigned* b) {
    emu_mma<emu_bf16_to_f32>(d, a, b);
}

// One OS thread per thread of a block, made once per launch and running the grid's blocks in
// turn (a thread per thread per block spent most of the tests' time creating threads under
// AddressSanitizer).
template <class Kernel>
void emu_launch(unsigned grid, unsigned block, Kernel kernel) {
    gridDim.x = grid;
    blockDim.x = block;
    std::barrier<> bar(block), block_done(block);
    emu_block_barrier = &bar;
    emu_warp_barriers.clear();
    for (unsigned w = 0; w < block; w += 32) emu_warp_barriers.emplace_back(std::min(32u, block - w));
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < block; ++t)
        threads.emplace_back([&, t] {
            threadIdx.x = t;
            for (unsigned b = 0; b < grid; ++b) {
                blockIdx.x = b;
                kernel();
                // Blocks never overlap: __shared__ statics belong to one block at a time.
                block_done.arrive_and_wait();
            }
        });
    for (auto& t : threads) t.join();
}

// The CUDA launch model on the CPU, for testing kernels.cu without a GPU: every block runs in
// turn, each of its threads an OS thread, __syncthreads a barrier, __shared__ a static (shared
// by the block's threads, and blocks never overlap). Slow, but it runs the kernels' own
// indexing, reductions and conversions.
#pragma once
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;
inline std::barrier<>* emu_block_barrier = nullptr;

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

inline void __syncthreads() { emu_block_barrier->arrive_and_wait(); }
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

// Warp collectives. Every thread of the block calls them together, as the kernels do: each
// puts its operands in its slot, all wait, each reads what its warp's slots give it, all wait.
inline float emu_lane_value[1024];
inline float shfl_xor(float v, int mask) {
    const unsigned t = threadIdx.x;
    emu_lane_value[t] = v;
    __syncthreads();
    const float r = emu_lane_value[(t & ~31u) | ((t & 31u) ^ (unsigned)mask)];
    __syncthreads();
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
    __syncthreads();
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
    __syncthreads();
}
inline float emu_bf16_to_f32(uint16_t h) { return __uint_as_float(((unsigned)h) << 16); }
inline void mma_f16(float* d, const unsigned* a, const unsigned* b) { emu_mma<f16_to_f32>(d, a, b); }
inline void mma_bf16(float* d, const unsigned* a, const unsigned* b) {
    emu_mma<emu_bf16_to_f32>(d, a, b);
}

template <class Kernel>
void emu_launch(unsigned grid, unsigned block, Kernel kernel) {
    gridDim.x = grid;
    blockDim.x = block;
    for (unsigned b = 0; b < grid; ++b) {
        std::barrier<> bar(block);
        emu_block_barrier = &bar;
        std::vector<std::thread> threads;
        for (unsigned t = 0; t < block; ++t)
            threads.emplace_back([&kernel, b, t] {
                blockIdx.x = b;
                threadIdx.x = t;
                kernel();
            });
        for (auto& t : threads) t.join();
    }
}

// dnd's own CUDA kernels: ops where candle's CUDA path takes several passes through memory
// (its broadcast kernels run at a few percent of the card's bandwidth). Compiled at run time
// by NVRTC (gpu_ops/cuda.rs) and, for the unit tests, as host C++ under a CPU emulation of the
// CUDA launch model (gpu_ops/emu.hpp), so they keep to what both take: one-dimensional grids,
// shared-memory reductions (no warp intrinsics) and __syncthreads only where the whole block
// arrives. Arithmetic is in f32 whatever the storage type, rounded once on the way out.

typedef unsigned short u16;
typedef unsigned long long u64;

#ifdef __CUDACC_RTC__
// Several loads in flight per thread in the memory-bound loops.
#define DND_UNROLL _Pragma("unroll 4")
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
#else
#define DND_UNROLL
#endif

__device__ __forceinline__ float bf16_to_f32(u16 h) {
    return __uint_as_float(((unsigned)h) << 16);
}
// Round to nearest even, as PyTorch and candle convert; NaN stays NaN.
__device__ __forceinline__ u16 f32_to_bf16(float f) {
    unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (u16)(u >> 16);
}

struct F32 {
    typedef float T;
    __device__ static float ld(float v) { return v; }
    __device__ static float st(float v) { return v; }
};
struct F16 {
    typedef u16 T;
    __device__ static float ld(u16 v) { return f16_to_f32(v); }
    __device__ static u16 st(float v) { return f32_to_f16(v); }
};
struct BF16 {
    typedef u16 T;
    __device__ static float ld(u16 v) { return bf16_to_f32(v); }
    __device__ static u16 st(float v) { return f32_to_bf16(v); }
};

// The sum of `v` over the block, on every thread. `buf` holds blockDim.x floats; blockDim.x is
// a power of two.
__device__ float block_sum(float v, float* buf) {
    const unsigned t = threadIdx.x;
    buf[t] = v;
    __syncthreads();
    for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
        if (t < s) buf[t] += buf[t + s];
        __syncthreads();
    }
    const float sum = buf[0];
    __syncthreads();
    return sum;
}

// GroupNorm over contiguous NCHW (`plane` = H*W) in two kernels, each over every chunk of
// `chunk` elements of every group (one block per chunk, so a few large groups, as in SD's VAE
// at 512 px, still fill the card):
// - group_stats: each chunk's count, mean and sum of squared deviations from that mean (two
//   passes over the chunk, the second mostly from cache): exact for the large, offset
//   activations of SD's decoder, where a one-pass variance cancels;
// - group_apply: combines its group's chunks (Chan et al.'s pairwise update), then writes the
//   normalised, affine-mapped chunk, with SiLU when `silu`.
// A group is one contiguous run of channels/groups planes.
template <class D>
__device__ void group_stats(const typename D::T* x, float* stats, u64 len, u64 chunk) {
    __shared__ float buf[1024];
    const u64 chunks = (len + chunk - 1) / chunk;
    const u64 g = blockIdx.x / chunks, c = blockIdx.x % chunks;
    const u64 n = len - c * chunk < chunk ? len - c * chunk : chunk;
    x += g * len + c * chunk;
    float s = 0.f;
    DND_UNROLL
    for (u64 i = threadIdx.x; i < n; i += blockDim.x) s += D::ld(x[i]);
    const float mean = block_sum(s, buf) / (float)n;
    float q = 0.f;
    DND_UNROLL
    for (u64 i = threadIdx.x; i < n; i += blockDim.x) {
        const float d = D::ld(x[i]) - mean;
        q += d * d;
    }
    const float m2 = block_sum(q, buf);
    if (threadIdx.x == 0) {
        stats[3 * blockIdx.x] = (float)n;
        stats[3 * blockIdx.x + 1] = mean;
        stats[3 * blockIdx.x + 2] = m2;
    }
}

template <class D>
__device__ void group_apply(const typename D::T* x, const float* stats,
                            const typename D::T* gamma, const typename D::T* beta,
                            typename D::T* y, int channels, int groups, u64 plane, u64 chunk,
                            float eps, int silu) {
    const int per_group = channels / groups;
    const u64 len = (u64)per_group * plane;
    const u64 chunks = (len + chunk - 1) / chunk;
    const u64 g = blockIdx.x / chunks, c = blockIdx.x % chunks;
    float count = 0.f, mean = 0.f, m2 = 0.f;
    for (u64 k = 0; k < chunks; ++k) {
        const float* s = stats + 3 * (g * chunks + k);
        const float total = count + s[0];
        const float d = s[1] - mean;
        mean += d * s[0] / total;
        m2 += s[2] + d * d * count * s[0] / total;
        count = total;
    }
    const float rstd = rsqrtf(m2 / count + eps);
    const int first = (int)(g % (u64)groups) * per_group;
    const u64 start = c * chunk;
    const u64 n = len - start < chunk ? len - start : chunk;
    x += g * len + start;
    y += g * len + start;
    DND_UNROLL
    for (u64 i = threadIdx.x; i < n; i += blockDim.x) {
        const int ch = first + (int)((start + i) / plane);
        float v = (D::ld(x[i]) - mean) * rstd * D::ld(gamma[ch]) + D::ld(beta[ch]);
        if (silu) v = v / (1.f + expf(-v));
        y[i] = D::st(v);
    }
}

// y = x + bias[(i / plane) % bias_len] (+ residual), then ReLU when `relu`: a convolution's or
// linear layer's epilogue in one pass over contiguous (N, C, plane). A bias of C elements is
// per channel; one of N*C elements per image and channel (a bias plus SD's time embedding).
// `residual` may be null. Grid-stride, so any grid covers `n`.
template <class D>
__device__ void bias_act(const typename D::T* x, const typename D::T* bias,
                         const typename D::T* residual, typename D::T* y, u64 n, u64 bias_len,
                         u64 plane, int relu) {
    const u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        float v = D::ld(x[i]) + D::ld(bias[(i / plane) % bias_len]);
        if (residual) v += D::ld(residual[i]);
        if (relu) v = fmaxf(v, 0.f);
        y[i] = D::st(v);
    }
}

// GEGLU over rows of 2 * inner: y[r, j] = x[r, j] * gelu(x[r, inner + j]), GELU the exact (erf)
// one, as diffusers' feed-forward computes it. Grid-stride over the rows * inner outputs.
template <class D>
__device__ void geglu(const typename D::T* x, typename D::T* y, u64 rows, u64 inner) {
    const u64 n = rows * inner;
    const u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const u64 r = i / inner, j = i % inner;
        const float a = D::ld(x[2 * inner * r + j]);
        const float g = D::ld(x[2 * inner * r + inner + j]);
        y[i] = D::st(a * 0.5f * g * (1.f + erff(g * 0.70710678118654752f)));
    }
}

#define DND_KERNELS(D, SUFFIX)                                                                  \
    extern "C" __global__ void group_stats_##SUFFIX(const D::T* x, float* stats, u64 len,        \
                                                    u64 chunk) {                                \
        group_stats<D>(x, stats, len, chunk);                                                   \
    }                                                                                           \
    extern "C" __global__ void group_apply_##SUFFIX(                                            \
        const D::T* x, const float* stats, const D::T* gamma, const D::T* beta, D::T* y,        \
        int channels, int groups, u64 plane, u64 chunk, float eps, int silu) {                  \
        group_apply<D>(x, stats, gamma, beta, y, channels, groups, plane, chunk, eps, silu);    \
    }                                                                                           \
    extern "C" __global__ void bias_act_##SUFFIX(const D::T* x, const D::T* bias,               \
                                                 const D::T* residual, D::T* y, u64 n,          \
                                                 u64 bias_len, u64 plane, int relu) {           \
        bias_act<D>(x, bias, residual, y, n, bias_len, plane, relu);                            \
    }                                                                                           \
    extern "C" __global__ void geglu_##SUFFIX(const D::T* x, D::T* y, u64 rows, u64 inner) {    \
        geglu<D>(x, y, rows, inner);                                                            \
    }

DND_KERNELS(F32, f32)
DND_KERNELS(F16, f16)
DND_KERNELS(BF16, bf16)

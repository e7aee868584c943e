// dnd's own CUDA kernels: ops where candle's CUDA path takes several passes through memory
// (its broadcast kernels run at a few percent of the card's bandwidth). Compiled at run time
// by NVRTC (gpu_ops/cuda.rs) and, for the unit tests, as host C++ under a CPU emulation of the
// CUDA launch model (gpu_ops/emu.hpp), so they keep to what both take: one-dimensional grids,
// shared-memory reductions, warp shuffles and mma only where every thread of the block takes
// part, and __syncthreads only where the whole block arrives. Arithmetic is in f32 whatever
// the storage type, rounded once on the way out.

typedef unsigned short u16;
typedef unsigned long long u64;

#ifdef __CUDACC_RTC__
// Several loads in flight per thread in the memory-bound loops.
#define DND_UNROLL _Pragma("unroll 4")
// Loops over register arrays: unrolled whole, so the arrays stay in registers.
#define DND_UNROLL_ALL _Pragma("unroll")
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
// Eight 16-bit values as one 16-byte load or store (p 16-byte aligned); two adjacent ones as
// one 32-bit load or store (p 4-byte aligned).
__device__ __forceinline__ uint4 ld8(const u16* p) { return *reinterpret_cast<const uint4*>(p); }
__device__ __forceinline__ void st8(u16* p, uint4 v) { *reinterpret_cast<uint4*>(p) = v; }
__device__ __forceinline__ unsigned ld2(const u16* p) {
    return *reinterpret_cast<const unsigned*>(p);
}
__device__ __forceinline__ void st2(u16* p, unsigned v) { *reinterpret_cast<unsigned*>(p) = v; }
__device__ __forceinline__ float shfl_xor(float v, int mask) {
    return __shfl_xor_sync(0xffffffffu, v, mask);
}
#if __CUDA_ARCH__ >= 800
#define DND_HAS_MMA
// D (16x8, f32) += A (16x16, row-major) * B (16x8, column-major), one warp, tensor cores.
// Fragments as the PTX ISA lays them out for mma.m16n8k16 (g = lane / 4, t = lane % 4): a[0]
// holds A[g][2t..2t+1], a[1] A[g+8][2t..], a[2] A[g][2t+8..], a[3] A[g+8][2t+8..]; b[0] holds
// B[2t..2t+1][g], b[1] B[2t+8..2t+9][g]; d[0..1] D[g][2t..2t+1], d[2..3] D[g+8][2t..2t+1].
// Two 16-bit values per register, the lower index in the lower half.
// One instruction per 16-bit type: `TY` is its name in PTX.
#define DND_MMA(NAME, TY)                                                                 \
    __device__ __forceinline__ void NAME(float* d, const unsigned* a, const unsigned* b) { \
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." TY "." TY ".f32 "            \
                     "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"               \
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                      \
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1])); \
    }
DND_MMA(mma_f16, "f16")
DND_MMA(mma_bf16, "bf16")
// Two f32 rounded to nearest even and packed, lo in the lower half: one instruction each type.
#define DND_PACK2(NAME, TY)                                                         \
    __device__ __forceinline__ unsigned NAME(float lo, float hi) {                  \
        unsigned r;                                                                 \
        asm("cvt.rn." TY "x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));        \
        return r;                                                                   \
    }
DND_PACK2(pack2_f16, "f16")
DND_PACK2(pack2_bf16, "bf16")
// Four 8x8 matrices of 16-bit elements from shared memory as mma fragments, one warp: lane l
// gives the address of row l % 8 of matrix l / 8 (16-byte aligned); r[i] then holds matrix i's
// [g][2t..2t+1], or with `_t` (transposed) its [2t][g] and [2t+1][g].
#define DND_LDSM(NAME, TRANS)                                                              \
    __device__ __forceinline__ void NAME(unsigned* r, const u16* row) {                   \
        const unsigned a = (unsigned)__cvta_generic_to_shared(row);                       \
        asm volatile("ldmatrix.sync.aligned.m8n8.x4" TRANS ".shared.b16 {%0,%1,%2,%3}, [%4];" \
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])                    \
                     : "r"(a));                                                          \
    }
DND_LDSM(ldsm_x4, "")
DND_LDSM(ldsm_x4_t, ".trans")
// 16 bytes from global to shared memory without a register in between, in flight until
// cp_async_wait; zeros instead where !in (src is then not read).
__device__ __forceinline__ void cp_async16(u16* dst, const u16* src, bool in) {
    const unsigned a = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(a), "l"(src),
                 "r"(in ? 16 : 0));
}
// 2^x in one MUFU.EX2 (flushing subnormal results to zero), where exp2f adds range fix-ups:
// the softmax's exponentials, whose results are at most 1.
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
// Every copy this thread started has landed (others' after the next __syncthreads).
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group 0;" ::: "memory");
}
#endif
#else
#define DND_UNROLL
#define DND_UNROLL_ALL
#define DND_HAS_MMA  // the emulator's mma_f16, mma_bf16, ldmatrix and cp.async (emu.hpp)
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

__device__ __forceinline__ float neg_inf() { return __uint_as_float(0xff800000u); }

struct F32 {
    typedef float T;
    __device__ static float ld(float v) { return v; }
    __device__ static float st(float v) { return v; }
};
struct F16 {
    typedef u16 T;
    __device__ static float ld(u16 v) { return f16_to_f32(v); }
    __device__ static u16 st(float v) { return f32_to_f16(v); }
#ifdef DND_HAS_MMA
    __device__ static void mma(float* d, const unsigned* a, const unsigned* b) { mma_f16(d, a, b); }
    __device__ static unsigned pack2(float lo, float hi) { return pack2_f16(lo, hi); }
#endif
};
struct BF16 {
    typedef u16 T;
    __device__ static float ld(u16 v) { return bf16_to_f32(v); }
    __device__ static u16 st(float v) { return f32_to_bf16(v); }
#ifdef DND_HAS_MMA
    __device__ static void mma(float* d, const unsigned* a, const unsigned* b) { mma_bf16(d, a, b); }
    __device__ static unsigned pack2(float lo, float hi) { return pack2_bf16(lo, hi); }
#endif
};

// Eight consecutive 16-bit elements of storage type D as f32, from or to 16-byte aligned p:
// the memory-bound kernels' vectorised paths, one 16-byte access in place of eight 2-byte
// ones. The host turns those paths on (`vec`) only for 16-bit types, aligned operands and
// lengths that are multiples of 8.
template <class D>
__device__ __forceinline__ void load8(const u16* p, float* v) {
    const uint4 w = ld8(p);
    const unsigned u[4] = {w.x, w.y, w.z, w.w};
    for (int i = 0; i < 4; ++i) {
        v[2 * i] = D::ld((u16)(u[i] & 0xffffu));
        v[2 * i + 1] = D::ld((u16)(u[i] >> 16));
    }
}
template <class D>
__device__ __forceinline__ void store8(u16* p, const float* v) {
    unsigned u[4];
    for (int i = 0; i < 4; ++i) u[i] = D::st(v[2 * i]) | ((unsigned)D::st(v[2 * i + 1]) << 16);
    st8(p, uint4{u[0], u[1], u[2], u[3]});
}
#define DND_IS_16BIT(D) (sizeof(typename D::T) == 2)

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

// The sum of f(element) over this thread's share of x[0..n), elements (or groups of eight)
// first, first + step, ...: with `vec` (16-bit types, n a multiple of 8), eight elements a load.
template <class D, class F>
__device__ __forceinline__ float thread_sum(const typename D::T* x, u64 n, int vec, F f,
                                            unsigned first, unsigned step) {
    float s = 0.f;
    if constexpr (DND_IS_16BIT(D)) {
        if (vec) {
            float v[8];
            DND_UNROLL
            for (u64 o = first; o < n / 8; o += step) {
                load8<D>(x + 8 * o, v);
                for (int k = 0; k < 8; ++k) s += f(v[k]);
            }
            return s;
        }
    }
    DND_UNROLL
    for (u64 i = first; i < n; i += step) s += f(D::ld(x[i]));
    return s;
}

// GroupNorm over contiguous NCHW (`plane` = H*W) in three kernels; the first and last over
// every chunk of `chunk` elements of every group (one block per chunk, so a few large groups,
// as in SD's VAE at 512 px, still fill the card):
// - group_stats: each chunk's count, mean and sum of squared deviations from that mean (two
//   passes over the chunk, the second mostly from cache): exact for the large, offset
//   activations of SD's decoder, where a one-pass variance cancels;
// - group_combine: one block per group combines its chunks' statistics into the group's mean
//   and 1 / std (the squared deviations summed around the group's mean, chunk by chunk);
// - group_apply: writes the normalised, affine-mapped chunk, with SiLU when `silu`.
// (Each apply block combined its group's chunks itself before: serial, dependent loads and
// divisions per chunk, which at the VAE's 128 chunks a group held the H200's apply pass to an
// eighth of the bandwidth its stats pass reached.)
// A group is one contiguous run of channels/groups planes. The vectorised paths (`vec`) need
// len and chunk multiples of 8 (group_stats), or plane and chunk (group_apply).
template <class D>
__device__ void group_stats(const typename D::T* x, float* stats, u64 len, u64 chunk, int vec) {
    __shared__ float buf[1024];
    const u64 chunks = (len + chunk - 1) / chunk;
    const u64 g = blockIdx.x / chunks, c = blockIdx.x % chunks;
    const u64 n = len - c * chunk < chunk ? len - c * chunk : chunk;
    x += g * len + c * chunk;
    const auto id = [](float v) { return v; };
    const unsigned t = threadIdx.x, step = blockDim.x;
    const float mean = block_sum(thread_sum<D>(x, n, vec, id, t, step), buf) / (float)n;
    const auto sq = [mean](float v) { return (v - mean) * (v - mean); };
    const float m2 = block_sum(thread_sum<D>(x, n, vec, sq, t, step), buf);
    if (threadIdx.x == 0) {
        stats[3 * blockIdx.x] = (float)n;
        stats[3 * blockIdx.x + 1] = mean;
        stats[3 * blockIdx.x + 2] = m2;
    }
}

__device__ void combine_chunks(const float* stats, float* norm, u64 chunks, float eps) {
    __shared__ float buf[1024];
    stats += 3 * blockIdx.x * chunks;
    float n = 0.f, sum = 0.f;
    for (u64 k = threadIdx.x; k < chunks; k += blockDim.x) {
        n += stats[3 * k];
        sum += stats[3 * k] * stats[3 * k + 1];
    }
    const float count = block_sum(n, buf);
    const float mean = block_sum(sum, buf) / count;
    float m2 = 0.f;
    for (u64 k = threadIdx.x; k < chunks; k += blockDim.x) {
        const float d = stats[3 * k + 1] - mean;
        m2 += stats[3 * k + 2] + stats[3 * k] * d * d;
    }
    m2 = block_sum(m2, buf);
    if (threadIdx.x == 0) {
        norm[2 * blockIdx.x] = mean;
        norm[2 * blockIdx.x + 1] = rsqrtf(m2 / count + eps);
    }
}

template <class D>
__device__ void group_apply(const typename D::T* x, const float* norm,
                            const typename D::T* gamma, const typename D::T* beta,
                            typename D::T* y, int channels, int groups, u64 plane, u64 chunk,
                            int silu, int vec) {
    const int per_group = channels / groups;
    const u64 len = (u64)per_group * plane;
    const u64 chunks = (len + chunk - 1) / chunk;
    const u64 g = blockIdx.x / chunks, c = blockIdx.x % chunks;
    const float mean = norm[2 * g], rstd = norm[2 * g + 1];
    const int first = (int)(g % (u64)groups) * per_group;
    const u64 start = c * chunk;
    const u64 n = len - start < chunk ? len - start : chunk;
    x += g * len + start;
    y += g * len + start;
    if constexpr (DND_IS_16BIT(D)) {
        // Eight elements of one channel at a time.
        if (vec) {
            DND_UNROLL
            for (u64 o = threadIdx.x; o < n / 8; o += blockDim.x) {
                const int ch = first + (int)((unsigned)(start + 8 * o) / (unsigned)plane);
                const float scale = rstd * D::ld(gamma[ch]), shift = D::ld(beta[ch]);
                float v[8];
                load8<D>(x + 8 * o, v);
                for (int k = 0; k < 8; ++k) {
                    v[k] = (v[k] - mean) * scale + shift;
                    if (silu) v[k] = v[k] / (1.f + expf(-v[k]));
                }
                store8<D>(y + 8 * o, v);
            }
            return;
        }
    }
    DND_UNROLL
    for (u64 i = threadIdx.x; i < n; i += blockDim.x) {
        // Within a group (under 2^32 elements, checked by the caller): 32-bit division.
        const int ch = first + (int)((unsigned)(start + i) / (unsigned)plane);
        float v = (D::ld(x[i]) - mean) * rstd * D::ld(gamma[ch]) + D::ld(beta[ch]);
        if (silu) v = v / (1.f + expf(-v));
        y[i] = D::st(v);
    }
}

// GroupNorm over channels-last storage (N, pixels, C), with the same three steps:
// - group_stats_nhwc: one block per chunk of `chunk_px` pixels of an image, all its groups at
//   once: the chunk is contiguous, so its reads are whole rows of C. Each thread keeps to fixed
//   channels, so a group's partial sums are those of the threads of its channels: the block's
//   B threads span `span` = min(B, C) channels, so they read B / span pixels at once where B
//   is a multiple of C (C up to 1024: the VAE's 128-512, the UNet's 320 and 640), or one
//   pixel in C / span slices of `span` channels where C is a multiple of B (the UNet's 1280:
//   two of 640), at most NHWC_SLICES of them. Two passes over the chunk (the second from
//   cache), as in group_stats; the statistics are laid out per group, chunk after chunk, as
//   group_combine reads them.
// - group_combine, unchanged;
// - group_apply_nhwc: grid-stride over the elements, each channel's group and each image's
//   statistics looked up; with `vec` (16-bit types, C a multiple of 8) eight channels a load.
constexpr int NHWC_SLICES = 4;
template <class D>
__device__ void group_stats_nhwc(const typename D::T* x, float* stats, u64 pixels, int c,
                                 int groups, u64 chunk_px) {
    // A sum per (pixel row of the block, channel): B or C of them.
    __shared__ float part[1024 * NHWC_SLICES];
    __shared__ float gmean[1024];
    const u64 chunks = (pixels + chunk_px - 1) / chunk_px;
    const u64 n = blockIdx.x / chunks, k = blockIdx.x % chunks;
    const u64 p0 = k * chunk_px;
    const u64 np = pixels - p0 < chunk_px ? pixels - p0 : chunk_px;
    x += (n * pixels + p0) * (u64)c;
    const unsigned t = threadIdx.x, cu = (unsigned)c;
    const unsigned span = blockDim.x < cu ? blockDim.x : cu;
    const unsigned rows = blockDim.x / span, slices = cu / span;
    const unsigned row = t / span, ch = t % span;
    const int cg = c / groups;
    // The sum over group `grp`'s threads: the block's pixel rows times its cg channels.
    const auto group_total = [&](int grp) {
        float acc = 0.f;
        for (unsigned r = 0; r < rows; ++r)
            for (int j = 0; j < cg; ++j) acc += part[r * cu + (unsigned)(grp * cg + j)];
        return acc;
    };
    // Both passes: each value of this thread's channels (`centred`: its squared deviation from
    // its group's mean), summed per slice into part.
    const auto pass = [&](bool centred) {
        float s[NHWC_SLICES] = {};
        for (u64 p = row; p < np; p += rows) {
            const typename D::T* px = x + p * (u64)c + ch;
            DND_UNROLL_ALL
            for (unsigned j = 0; j < (unsigned)NHWC_SLICES; ++j) {
                if (j >= slices) break;
                float v = D::ld(px[j * span]);
                if (centred) {
                    v -= gmean[(ch + j * span) / (unsigned)cg];
                    v *= v;
                }
                s[j] += v;
            }
        }
        DND_UNROLL_ALL
        for (unsigned j = 0; j < (unsigned)NHWC_SLICES; ++j)
            if (j < slices) part[row * cu + ch + j * span] = s[j];
        __syncthreads();
    };
    const float count = (float)(np * (u64)cg);
    pass(false);
    for (unsigned g = t; g < (unsigned)groups; g += blockDim.x) gmean[g] = group_total((int)g) / count;
    __syncthreads();
    pass(true);
    for (unsigned g = t; g < (unsigned)groups; g += blockDim.x) {
        const u64 at = 3 * (((u64)n * groups + g) * chunks + k);
        stats[at] = count;
        stats[at + 1] = gmean[g];
        stats[at + 2] = group_total((int)g);
    }
}

template <class D, class I>
__device__ void group_apply_nhwc(const typename D::T* x, const float* norm,
                                 const typename D::T* gamma, const typename D::T* beta,
                                 typename D::T* y, I total, I image, int c, int groups, int silu,
                                 int vec) {
    const I stride = (I)gridDim.x * blockDim.x;
    const int cg = c / groups;
    const auto one = [&](I i, int ch, float v) {
        const I at = 2 * ((i / image) * (I)groups + (I)(ch / cg));
        v = (v - norm[at]) * norm[at + 1] * D::ld(gamma[ch]) + D::ld(beta[ch]);
        return silu ? v / (1.f + expf(-v)) : v;
    };
    if constexpr (DND_IS_16BIT(D)) {
        if (vec) {
            for (I o = (I)blockIdx.x * blockDim.x + threadIdx.x; o < total / 8; o += stride) {
                const I i = 8 * o;
                const int ch = (int)(i % (I)c);
                float v[8];
                load8<D>(x + i, v);
                for (int j = 0; j < 8; ++j) v[j] = one(i, ch + j, v[j]);
                store8<D>(y + i, v);
            }
            return;
        }
    }
    for (I i = (I)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride)
        y[i] = D::st(one(i, (int)(i % (I)c), D::ld(x[i])));
}

// Nearest 2x upsampling of channels-last (N*H rows of W pixels of C) storage: each pixel's C
// values to four places; with `vec` (16-bit types, C a multiple of 8) eight channels a load.
template <class D>
__device__ void upsample2x_nhwc(const typename D::T* x, typename D::T* y, u64 rows, u64 w,
                                u64 c, int vec) {
    const u64 stride = (u64)gridDim.x * blockDim.x;
    const u64 per = vec ? 8 : 1, units = rows * w * (c / per);
    for (u64 o = (u64)blockIdx.x * blockDim.x + threadIdx.x; o < units; o += stride) {
        const u64 ch = (o % (c / per)) * per, px = o / (c / per);
        const u64 r = px / w, col = px % w;
        const u64 src = px * c + ch;
        const u64 top = (2 * r * 2 * w + 2 * col) * c + ch, below = top + 2 * w * c;
        const u64 at[4] = {top, top + c, below, below + c};
        if constexpr (DND_IS_16BIT(D)) {
            if (vec) {
                const uint4 v = ld8(x + src);
                for (int k = 0; k < 4; ++k) st8(y + at[k], v);
                continue;
            }
        }
        for (int k = 0; k < 4; ++k) y[at[k]] = x[src];
    }
}

// Nearest 2x upsampling then a 3x3 convolution, computed on the small input (channels-last):
// one convolution with 2x2 filters and padding 1 makes, for each of the four output phases
// (even/odd row, even/odd column), its K channels at (H+1) x (W+1) places, `x` (N, H+1, W+1,
// 4K). This pass puts each phase's values in its places of the (N, 2H, 2W, K) output, adding
// the bias: y[n, 2i+a, 2j+b, k] = x[n, i+a, j+b, (2a+b)K + k] + bias[k]. `vec` (16-bit types,
// K a multiple of 8, aligned operands): eight channels a load.
// `I`: the index type, 32-bit where both tensors' sizes fit.
template <class D, class I>
__device__ void interleave_phases_nhwc(const typename D::T* x, const typename D::T* bias,
                                       typename D::T* y, I n, I h, I w, I k, int vec) {
    const I stride = (I)gridDim.x * blockDim.x;
    const I per = vec ? 8 : 1, units = n * (2 * h) * (2 * w) * (k / per);
    for (I o = (I)blockIdx.x * blockDim.x + threadIdx.x; o < units; o += stride) {
        const I ch = (o % (k / per)) * per, px = o / (k / per);
        const I ox = px % (2 * w), oy = (px / (2 * w)) % (2 * h), img = px / (4 * h * w);
        const I a = oy % 2, b = ox % 2;
        const I src = ((img * (h + 1) + oy / 2 + a) * (w + 1) + ox / 2 + b) * 4 * k +
                      (2 * a + b) * k + ch;
        const I dst = px * k + ch;
        if constexpr (DND_IS_16BIT(D)) {
            if (vec) {
                float v[8], bv[8];
                load8<D>(x + src, v);
                load8<D>(bias + ch, bv);
                for (int j = 0; j < 8; ++j) v[j] += bv[j];
                store8<D>(y + dst, v);
                continue;
            }
        }
        y[dst] = D::st(D::ld(x[src]) + D::ld(bias[ch]));
    }
}

// Resized, cropped 8-bit images (N, S, S, 3), channels last as decoded, to a network's input
// (N, 3, S, S): (v / 255 - mean[c]) / std[c] in f32, the CPU's arithmetic, rounded once to the
// storage type. The host sends a quarter of the bytes f32 pixels take, and no f32 pass follows.
// `I`: the index type, 32-bit where the output's size fits.
template <class D, class I>
__device__ void normalise_pixels(const unsigned char* x, typename D::T* y, I n, I plane, float m0,
                                 float m1, float m2, float s0, float s1, float s2) {
    const I stride = (I)gridDim.x * blockDim.x, total = n * 3 * plane;
    for (I o = (I)blockIdx.x * blockDim.x + threadIdx.x; o < total; o += stride) {
        const I p = o % plane, c = (o / plane) % 3, img = o / (3 * plane);
        const float m = c == 0 ? m0 : c == 1 ? m1 : m2, s = c == 0 ? s0 : c == 1 ? s1 : s2;
        y[o] = D::st(((float)x[(img * plane + p) * 3 + c] / 255.f - m) / s);
    }
}

// LayerNorm with its affine map over rows of `c` elements (the last dimension, contiguous),
// one warp a row: the mean, then the mean squared deviation from it (a second pass, from
// cache, exact where E[x^2] - mean^2 would cancel), then the output. candle's kernel takes one
// block of 32 threads a row and loads an element at a time: a fifth of the card's bandwidth.
// `vec`: 16-bit types, c a multiple of 8, operands 16-byte aligned.
__device__ __forceinline__ float warp_sum(float v) {
    for (int m = 16; m > 0; m /= 2) v += shfl_xor(v, m);
    return v;
}
template <class D>
__device__ void layer_norm(const typename D::T* x, const typename D::T* gamma,
                           const typename D::T* beta, typename D::T* y, u64 rows, int c, float eps,
                           int vec) {
    const u64 row = (u64)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= rows) return;  // the whole warp: no block-wide barrier below
    const unsigned lane = threadIdx.x % 32;
    x += row * c;
    y += row * c;
    const auto id = [](float v) { return v; };
    const float mean = warp_sum(thread_sum<D>(x, c, vec, id, lane, 32)) / (float)c;
    const auto sq = [mean](float v) { return (v - mean) * (v - mean); };
    const float rstd = rsqrtf(warp_sum(thread_sum<D>(x, c, vec, sq, lane, 32)) / (float)c + eps);
    if constexpr (DND_IS_16BIT(D)) {
        if (vec) {
            float v[8], gm[8], bt[8];
            for (int o = lane; o < c / 8; o += 32) {
                load8<D>(x + 8 * o, v);
                load8<D>(gamma + 8 * o, gm);
                load8<D>(beta + 8 * o, bt);
                for (int k = 0; k < 8; ++k) v[k] = (v[k] - mean) * rstd * gm[k] + bt[k];
                store8<D>(y + 8 * o, v);
            }
            return;
        }
    }
    for (int i = lane; i < c; i += 32)
        y[i] = D::st((D::ld(x[i]) - mean) * rstd * D::ld(gamma[i]) + D::ld(beta[i]));
}

// The exact (erf) GELU, as PyTorch's default and diffusers' GEGLU compute it.
__device__ __forceinline__ float gelu(float v) {
    return 0.5f * v * (1.f + erff(v * 0.70710678118654752f));
}

// The activations of the epilogue, by `act`: 0 none, 1 ReLU, 2 GELU, 3 quick GELU (OpenAI
// CLIP's v * sigmoid(1.702 v)). The same codes as `nn::Act`.
__device__ __forceinline__ float activate(float v, int act) {
    switch (act) {
        case 1: return fmaxf(v, 0.f);
        case 2: return gelu(v);
        case 3: return v / (1.f + expf(-1.702f * v));
        default: return v;
    }
}

// y = act(x + bias[(i / plane) % bias_len] (+ residual)): a convolution's or linear layer's
// epilogue in one pass over contiguous (N, C, plane) (a linear layer's rows: plane 1). A bias
// of C elements is per channel; one of N*C elements per image and channel (a bias plus SD's
// time embedding). Over channels-last rows (N, pixels, C) with a bias per image and channel,
// plane is 1, bias_len C and `image` the elements of an image (pixels * C), which picks the
// image's row of the bias; 0 elsewhere. `residual` may be null. Grid-stride, so any grid covers
// `n`. Indices are of type I: 32-bit wherever they fit, as 64-bit division costs the GPU
// dozens of instructions an element. With `vec`, eight elements at a time: 1 where plane is a
// multiple of 8 (they share a bias), 2 where plane is 1 and bias_len a multiple of 8 (eight
// consecutive biases).
template <class D, class I>
__device__ void bias_act(const typename D::T* x, const typename D::T* bias,
                         const typename D::T* residual, typename D::T* y, I n, I bias_len,
                         I plane, I image, int act, int vec) {
    const I stride = (I)gridDim.x * blockDim.x;
    const auto at = [&](I i) { return (i / plane) % bias_len + (image ? i / image * bias_len : 0); };
    if constexpr (DND_IS_16BIT(D)) {
        if (vec) {
            for (I o = (I)blockIdx.x * blockDim.x + threadIdx.x; o < n / 8; o += stride) {
                const I i = 8 * o;
                float v[8], b[8], r[8];
                load8<D>(x + i, v);
                if (vec == 1)
                    for (int k = 0; k < 8; ++k) b[k] = D::ld(bias[at(i)]);
                else
                    load8<D>(bias + at(i), b);
                if (residual) load8<D>(residual + i, r);
                for (int k = 0; k < 8; ++k)
                    v[k] = activate(v[k] + b[k] + (residual ? r[k] : 0.f), act);
                store8<D>(y + i, v);
            }
            return;
        }
    }
    for (I i = (I)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        float v = D::ld(x[i]) + D::ld(bias[at(i)]);
        if (residual) v += D::ld(residual[i]);
        y[i] = D::st(activate(v, act));
    }
}

// GEGLU over rows of 2 * inner: y[r, j] = a * gelu(g), a = x[r, j] (+ bias[j]),
// g = x[r, inner + j] (+ bias[inner + j]), GELU the exact (erf) one, as diffusers' feed-forward
// computes it. `bias` (2 * inner values, or null) is the feed-forward's first linear layer's:
// added here, in f32, the product's output is read once where an epilogue pass would write it
// and read it again (at SD 1.x's 64 x 64 latents a 2560-wide row a token). Grid-stride over the
// rows * inner outputs, with indices of type I as above; with `vec` (inner a multiple of 8),
// eight at a time.
template <class D, class I>
__device__ void geglu(const typename D::T* x, const typename D::T* bias, typename D::T* y, I rows,
                      I inner, int vec) {
    const I n = rows * inner;
    const I stride = (I)gridDim.x * blockDim.x;
    if constexpr (DND_IS_16BIT(D)) {
        if (vec) {
            for (I o = (I)blockIdx.x * blockDim.x + threadIdx.x; o < n / 8; o += stride) {
                const I r = 8 * o / inner, j = 8 * o % inner;
                float a[8], g[8];
                load8<D>(x + 2 * inner * r + j, a);
                load8<D>(x + 2 * inner * r + inner + j, g);
                if (bias) {
                    float ba[8], bg[8];
                    load8<D>(bias + j, ba);
                    load8<D>(bias + inner + j, bg);
                    for (int k = 0; k < 8; ++k) a[k] += ba[k], g[k] += bg[k];
                }
                for (int k = 0; k < 8; ++k) a[k] *= gelu(g[k]);
                store8<D>(y + 8 * o, a);
            }
            return;
        }
    }
    for (I i = (I)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const I r = i / inner, j = i % inner;
        float a = D::ld(x[2 * inner * r + j]);
        float g = D::ld(x[2 * inner * r + inner + j]);
        if (bias) a += D::ld(bias[j]), g += D::ld(bias[inner + j]);
        y[i] = D::st(a * gelu(g));
    }
}

// Max pooling of channels-last (N, H, W, C) into (N, P, Q, C), windows of k x k at `stride`
// with `pad` rows and columns of -inf around (PyTorch's max_pool2d; NaN wins, as there): the
// ResNet stem's pool reads the convolution's NHWC output in place, where candle's pool wants
// NCHW and copies it there and back. Grid-stride over the outputs, with `vec` (C a multiple of
// 8) eight channels at a time.
template <class D, int LANES>
__device__ void max_pool_lanes(const typename D::T* x, typename D::T* y, int n, int h, int w,
                               int c, int p, int q, int k, int stride, int pad) {
    const int groups = c / LANES;
    const u64 total = (u64)n * p * q * groups;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (u64)gridDim.x * blockDim.x) {
        const int g = (int)(i % groups);
        u64 r = i / groups;
        const int oq = (int)(r % q);
        r /= q;
        const int op = (int)(r % p), b = (int)(r / p);
        float m[LANES], v[LANES];
        DND_UNROLL_ALL
        for (int j = 0; j < LANES; ++j) m[j] = neg_inf();
        for (int dy = 0; dy < k; ++dy) {
            const int iy = op * stride - pad + dy;
            if (iy < 0 || iy >= h) continue;
            for (int dx = 0; dx < k; ++dx) {
                const int ix = oq * stride - pad + dx;
                if (ix < 0 || ix >= w) continue;
                const u64 at = (((u64)b * h + iy) * w + ix) * c + (u64)g * LANES;
                if constexpr (LANES == 8)
                    load8<D>(x + at, v);
                else
                    v[0] = D::ld(x[at]);
                DND_UNROLL_ALL
                for (int j = 0; j < LANES; ++j) m[j] = (v[j] > m[j] || v[j] != v[j]) ? v[j] : m[j];
            }
        }
        if constexpr (LANES == 8)
            store8<D>(y + i * LANES, m);
        else
            y[i] = D::st(m[0]);
    }
}
template <class D>
__device__ void max_pool_nhwc(const typename D::T* x, typename D::T* y, int n, int h, int w, int c,
                              int p, int q, int k, int stride, int pad, int vec) {
    if constexpr (DND_IS_16BIT(D)) {
        if (vec) return max_pool_lanes<D, 8>(x, y, n, h, w, c, p, q, k, stride, pad);
    }
    max_pool_lanes<D, 1>(x, y, n, h, w, c, p, q, k, stride, pad);
}

// Nearest 2x upsampling of contiguous (rows, w) planes (NCHW: rows = N*C*H) into (2 rows,
// 2 w): input row r becomes output rows 2r and 2r+1, each element twice. candle's kernel
// computes every output's source from its strides, at a fraction of the bandwidth. With
// `vec` (16-bit, w a multiple of 8), eight inputs are one 16-byte load and four stores, the
// bits copied as they are.
template <class D>
__device__ void upsample2x(const typename D::T* x, typename D::T* y, u64 rows, u64 w, int vec) {
    const u64 stride = (u64)gridDim.x * blockDim.x;
    if constexpr (DND_IS_16BIT(D)) {
        if (vec) {
            const u64 groups = w / 8;
            for (u64 o = (u64)blockIdx.x * blockDim.x + threadIdx.x; o < rows * groups;
                 o += stride) {
                const u64 r = o / groups, j = o % groups;
                const uint4 a = ld8(x + r * w + 8 * j);
                const unsigned u[4] = {a.x, a.y, a.z, a.w};
                unsigned d[8];
                for (int i = 0; i < 4; ++i) {
                    const unsigned lo = u[i] & 0xffffu, hi = u[i] >> 16;
                    d[2 * i] = lo | (lo << 16);
                    d[2 * i + 1] = hi | (hi << 16);
                }
                const uint4 left{d[0], d[1], d[2], d[3]}, right{d[4], d[5], d[6], d[7]};
                u16* top = y + 4 * r * w + 16 * j;
                st8(top, left);
                st8(top + 8, right);
                st8(top + 2 * w, left);
                st8(top + 2 * w + 8, right);
            }
            return;
        }
    }
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < rows * w; i += stride) {
        const u64 r = i / w, j = i % w;
        const typename D::T v = x[i];
        typename D::T* top = y + 4 * r * w + 2 * j;
        top[0] = v;
        top[1] = v;
        top[2 * w] = v;
        top[2 * w + 1] = v;
    }
}

// Whether every index of an n-element (or 2n, for GEGLU's input) loop fits 32 bits.
__device__ __forceinline__ bool fits_u32(u64 n) { return 2 * n < 0xffffffffull; }

#ifdef DND_HAS_MMA
// Attention softmax(q k^T * scale) v without the T x T scores in memory (FlashAttention-2's
// scheme) over B x H heads: q (B, H, Tq, D), k and v (B, H, Tk, D), 16-bit, each at its own
// batch, head and row strides (elements; the last dimension contiguous), so heads split from
// (B, T, H*D) projections are read in place; out is written (B, Tq, H, D), contiguous, so the
// heads merge back for free.
// A block of 4 warps takes fa_rows(D8) query rows, each warp MT tiles of 16 rows, its q
// fragments held in registers; the keys and values go by in tiles of 64 through shared memory,
// zero-padded from D to 16 KS. Scores and the running softmax are f32 on tensor cores
// (mma.m16n8k16), so f16 storage cannot overflow in q k^T. D8 is the kernel's head size: D, or
// the next size up that there is a kernel for (a multiple of 8).
// The first version issued 17 instructions per mma at head size 40 and ran at 86 TFLOP/s,
// under a tenth of the H200's dense f16 peak: the loop is bound by instructions issued. So:
// two row tiles a warp where registers allow (each fragment read from shared memory feeds two
// mma), fragments read with ldmatrix (V transposed on the way), 64 keys a tile (the softmax's
// per-tile work spread over twice the keys), masking only in the last tile, the next tile's
// keys loading (cp.async) while this tile's values are multiplied, and this tile's values
// while its scores are computed.
#define FA_KEYS 64
#define FA_WARPS 4
struct Strides {
    u64 batch, head, row;
};
__device__ constexpr int fa_row_tiles(int d8) { return d8 <= 64 ? 2 : 1; }
// Query rows per block: the launcher's grid is B * H * ceil(Tq / fa_rows) blocks.
__device__ constexpr int fa_rows(int d8) { return FA_WARPS * 16 * fa_row_tiles(d8); }

// Rows [k0, k0 + FA_KEYS) of a (T, D) operand at `row` stride into a shared tile whose rows
// are S halves apart, columns [0, W), zero past t and d; asynchronous where `vec` says every
// row starts 16-byte aligned (the caller then waits with cp_async_wait).
template <int W, int S>
__device__ __forceinline__ void fa_load(u16* tile, const u16* src, u64 row, int k0, int t, int d,
                                        int vec) {
    // 16-byte chunks a row; the chunks of a tile are a whole number of rounds of the block.
    constexpr int CH = W / 8, ROUNDS = FA_KEYS * CH / (FA_WARPS * 32);
    if (vec) {
        DND_UNROLL_ALL
        for (int round = 0; round < ROUNDS; ++round) {
            const int i = threadIdx.x + round * FA_WARPS * 32, r = i / CH, col = 8 * (i % CH);
            const int key = k0 + r;
            const bool in = key < t && col < d;
            cp_async16(tile + r * S + col, in ? src + key * row + col : src, in);
        }
        cp_async_commit();
    } else {
        for (int i = threadIdx.x; i < FA_KEYS * W; i += FA_WARPS * 32) {
            const int r = i / W, col = i % W, key = k0 + r;
            tile[r * S + col] = key < t && col < d ? src[key * row + col] : (u16)0;
        }
    }
}

template <class D, int D8>
__device__ void flash_attention(const u16* q, const u16* k, const u16* v, u16* out, int heads,
                                int tq, int tk, int d, float scale_log2, Strides qs, Strides ks_,
                                Strides vs_, int vec, int rows) {
    constexpr int KS = (D8 + 15) / 16, NT = D8 / 8, MT = fa_row_tiles(D8), ROWS = fa_rows(D8);
    // Rows padded by 8 halves: the eight 16-byte rows of each ldmatrix phase then fall in
    // distinct banks (S / 8 is odd), and every row starts 16-byte aligned.
    constexpr int W = 16 * KS, S = W + 8;
    __shared__ __align__(16) u16 ks[FA_KEYS * S];
    __shared__ __align__(16) u16 vs[FA_KEYS * S];
    if (rows != ROWS) __trap();  // the launcher's grid would not cover the rows
    const int tiles = (tq + ROWS - 1) / ROWS;
    const u64 bh = blockIdx.x / tiles, b = bh / heads, h = bh % heads;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int row0 = (blockIdx.x % tiles) * ROWS + warp * 16 * MT;
    q += b * qs.batch + h * qs.head;
    k += b * ks_.batch + h * ks_.head;
    v += b * vs_.batch + h * vs_.head;
    const u64 out_row = (u64)heads * d;
    out += b * tq * out_row + h * d;

    // This warp's q rows as A fragments, zero past tq and d.
    unsigned qa[MT][KS][4];
    DND_UNROLL_ALL
    for (int mt = 0; mt < MT; ++mt)
        DND_UNROLL_ALL
        for (int c = 0; c < KS; ++c)
            DND_UNROLL_ALL
            for (int r = 0; r < 4; ++r) {
                const int row = row0 + 16 * mt + g + 8 * (r % 2), col = 16 * c + 2 * t + 8 * (r / 2);
                unsigned lo = 0, hi = 0;
                if (row < tq && col < d) {
                    lo = q[row * qs.row + col];
                    hi = q[row * qs.row + col + 1];
                }
                qa[mt][c][r] = lo | (hi << 16);
            }
    float o[MT][NT][4];
    DND_UNROLL_ALL
    for (int mt = 0; mt < MT; ++mt)
        DND_UNROLL_ALL
        for (int j = 0; j < NT; ++j)
            DND_UNROLL_ALL
            for (int r = 0; r < 4; ++r) o[mt][j][r] = 0.f;
    // Each row's running max (of the unscaled scores) and sum, this lane's share.
    float m[MT][2], l[MT][2];
    DND_UNROLL_ALL
    for (int mt = 0; mt < MT; ++mt)
        DND_UNROLL_ALL
        for (int i = 0; i < 2; ++i) {
            m[mt][i] = neg_inf();
            l[mt][i] = 0.f;
        }
    // The row of its ldmatrix matrix this lane addresses, and that matrix.
    const int mat = lane / 8, mrow = lane % 8;

    fa_load<W, S>(ks, k, ks_.row, 0, tk, d, vec);
    for (int k0 = 0; k0 < tk; k0 += FA_KEYS) {
        // This tile's keys are in (and every warp is done with the last tile's values).
        cp_async_wait();
        __syncthreads();
        fa_load<W, S>(vs, v, vs_.row, k0, tk, d, vec);
        // Scores of 16 rows x 64 keys per row tile: eight 16x8 tiles. Matrices 0 and 1 of a
        // load are keys 16 n .. + 7 at columns 16 c .. and 16 c + 8 .. (one B fragment), 2
        // and 3 the next eight keys.
        float s[MT][8][4];
        DND_UNROLL_ALL
        for (int mt = 0; mt < MT; ++mt)
            DND_UNROLL_ALL
            for (int n = 0; n < 8; ++n)
                DND_UNROLL_ALL
                for (int r = 0; r < 4; ++r) s[mt][n][r] = 0.f;
        DND_UNROLL_ALL
        for (int n = 0; n < 4; ++n)
            DND_UNROLL_ALL
            for (int c = 0; c < KS; ++c) {
                unsigned b[4];
                ldsm_x4(b, ks + (16 * n + 8 * (mat / 2) + mrow) * S + 16 * c + 8 * (mat % 2));
                DND_UNROLL_ALL
                for (int mt = 0; mt < MT; ++mt) {
                    D::mma(s[mt][2 * n], qa[mt][c], b);
                    D::mma(s[mt][2 * n + 1], qa[mt][c], b + 2);
                }
            }
        if (k0 + FA_KEYS > tk)
            DND_UNROLL_ALL
            for (int mt = 0; mt < MT; ++mt)
                DND_UNROLL_ALL
                for (int n = 0; n < 8; ++n)
                    DND_UNROLL_ALL
                    for (int r = 0; r < 4; ++r)
                        if (k0 + 8 * n + 2 * t + (r % 2) >= tk) s[mt][n][r] = neg_inf();
        // Online softmax, base 2 (scale > 0, so the max of the unscaled scores is the max of
        // the scaled ones): each row's max over its quad of lanes, then rescale. Two adjacent
        // score tiles in the accumulator layout are one A fragment of p.
        unsigned pa[MT][4][4];
        DND_UNROLL_ALL
        for (int mt = 0; mt < MT; ++mt) {
            float mx[2] = {m[mt][0], m[mt][1]};
            DND_UNROLL_ALL
            for (int n = 0; n < 8; ++n)
                DND_UNROLL_ALL
                for (int r = 0; r < 4; ++r) mx[r / 2] = fmaxf(mx[r / 2], s[mt][n][r]);
            float shift[2];
            DND_UNROLL_ALL
            for (int i = 0; i < 2; ++i) {
                mx[i] = fmaxf(mx[i], shfl_xor(mx[i], 1));
                mx[i] = fmaxf(mx[i], shfl_xor(mx[i], 2));
                const float alpha = fast_exp2((m[mt][i] - mx[i]) * scale_log2);
                m[mt][i] = mx[i];
                l[mt][i] *= alpha;
                DND_UNROLL_ALL
                for (int j = 0; j < NT; ++j) {
                    o[mt][j][2 * i] *= alpha;
                    o[mt][j][2 * i + 1] *= alpha;
                }
                shift[i] = mx[i] * scale_log2;
            }
            DND_UNROLL_ALL
            for (int n = 0; n < 8; ++n) {
                float p[4];
                DND_UNROLL_ALL
                for (int r = 0; r < 4; ++r) {
                    p[r] = fast_exp2(fmaf(s[mt][n][r], scale_log2, -shift[r / 2]));
                    l[mt][r / 2] += p[r];
                }
                pa[mt][n / 2][2 * (n % 2)] = D::pack2(p[0], p[1]);
                pa[mt][n / 2][2 * (n % 2) + 1] = D::pack2(p[2], p[3]);
            }
        }
        // This tile's values are in (and every warp is done with its keys).
        cp_async_wait();
        __syncthreads();
        if (k0 + FA_KEYS < tk) fa_load<W, S>(ks, k, ks_.row, k0 + FA_KEYS, tk, d, vec);
        // o += p v: matrices 0 and 1 of a transposed load are keys 16 c .. + 7 and + 8 .. + 15
        // at columns 8 j .. (one B fragment), 2 and 3 the same keys at columns 8 j + 8 .., read
        // but unused past the last column tile when NT is odd (still inside the row).
        DND_UNROLL_ALL
        for (int c = 0; c < 4; ++c)
            DND_UNROLL_ALL
            for (int j = 0; j < NT; j += 2) {
                unsigned b[4];
                ldsm_x4_t(b, vs + (16 * c + 8 * (mat % 2) + mrow) * S + 8 * j + 8 * (mat / 2));
                DND_UNROLL_ALL
                for (int mt = 0; mt < MT; ++mt) {
                    D::mma(o[mt][j], pa[mt][c], b);
                    if (j + 1 < NT) D::mma(o[mt][j + 1], pa[mt][c], b + 2);
                }
            }
    }
    DND_UNROLL_ALL
    for (int mt = 0; mt < MT; ++mt)
        DND_UNROLL_ALL
        for (int i = 0; i < 2; ++i) {
            l[mt][i] += shfl_xor(l[mt][i], 1);
            l[mt][i] += shfl_xor(l[mt][i], 2);
        }
    // Two adjacent columns a store (d is a multiple of 8, so both are in or neither).
    DND_UNROLL_ALL
    for (int mt = 0; mt < MT; ++mt)
        DND_UNROLL_ALL
        for (int i = 0; i < 2; ++i) {
            const int row = row0 + 16 * mt + g + 8 * i;
            const float inv = 1.f / l[mt][i];
            DND_UNROLL_ALL
            for (int j = 0; j < NT; ++j) {
                const int col = 8 * j + 2 * t;
                if (row < tq && col < d)
                    st2(out + row * out_row + col,
                        D::pack2(o[mt][j][2 * i] * inv, o[mt][j][2 * i + 1] * inv));
            }
        }
}
#endif

#define DND_KERNELS(D, SUFFIX)                                                                  \
    extern "C" __global__ void group_stats_##SUFFIX(const D::T* x, float* stats, u64 len,        \
                                                    u64 chunk, int vec) {                       \
        group_stats<D>(x, stats, len, chunk, vec);                                              \
    }                                                                                           \
    extern "C" __global__ void group_apply_##SUFFIX(                                            \
        const D::T* x, const float* norm, const D::T* gamma, const D::T* beta, D::T* y,         \
        int channels, int groups, u64 plane, u64 chunk, int silu, int vec) {                    \
        group_apply<D>(x, norm, gamma, beta, y, channels, groups, plane, chunk, silu, vec);     \
    }                                                                                           \
    extern "C" __global__ void group_stats_nhwc_##SUFFIX(const D::T* x, float* stats,           \
                                                         u64 pixels, int c, int groups,         \
                                                         u64 chunk_px) {                        \
        group_stats_nhwc<D>(x, stats, pixels, c, groups, chunk_px);                             \
    }                                                                                           \
    extern "C" __global__ void group_apply_nhwc_##SUFFIX(                                       \
        const D::T* x, const float* norm, const D::T* gamma, const D::T* beta, D::T* y,         \
        u64 total, u64 image, int c, int groups, int silu, int vec) {                           \
        if (fits_u32(total))                                                                    \
            group_apply_nhwc<D, unsigned>(x, norm, gamma, beta, y, (unsigned)total,             \
                                          (unsigned)image, c, groups, silu, vec);               \
        else                                                                                    \
            group_apply_nhwc<D, u64>(x, norm, gamma, beta, y, total, image, c, groups, silu,    \
                                     vec);                                                      \
    }                                                                                           \
    extern "C" __global__ void upsample2x_nhwc_##SUFFIX(const D::T* x, D::T* y, u64 rows, u64 w, \
                                                        u64 c, int vec) {                       \
        upsample2x_nhwc<D>(x, y, rows, w, c, vec);                                              \
    }                                                                                           \
    extern "C" __global__ void interleave_phases_nhwc_##SUFFIX(                                 \
        const D::T* x, const D::T* bias, D::T* y, u64 n, u64 h, u64 w, u64 k, int vec) {        \
        if (fits_u32(n * (h + 1) * (w + 1) * 4 * k))                                            \
            interleave_phases_nhwc<D, unsigned>(x, bias, y, (unsigned)n, (unsigned)h,           \
                                                (unsigned)w, (unsigned)k, vec);                 \
        else                                                                                    \
            interleave_phases_nhwc<D, u64>(x, bias, y, n, h, w, k, vec);                        \
    }                                                                                           \
    extern "C" __global__ void bias_act_##SUFFIX(const D::T* x, const D::T* bias,               \
                                                 const D::T* residual, D::T* y, u64 n,          \
                                                 u64 bias_len, u64 plane, u64 image, int act,   \
                                                 int vec) {                                     \
        if (fits_u32(n))                                                                        \
            bias_act<D, unsigned>(x, bias, residual, y, (unsigned)n, (unsigned)bias_len,        \
                                  (unsigned)plane, (unsigned)image, act, vec);                  \
        else                                                                                    \
            bias_act<D, u64>(x, bias, residual, y, n, bias_len, plane, image, act, vec);        \
    }                                                                                           \
    extern "C" __global__ void max_pool_nhwc_##SUFFIX(const D::T* x, D::T* y, int n, int h, int w, \
                                                      int c, int p, int q, int k, int stride,    \
                                                      int pad, int vec) {                        \
        max_pool_nhwc<D>(x, y, n, h, w, c, p, q, k, stride, pad, vec);                          \
    }                                                                                           \
    extern "C" __global__ void upsample2x_##SUFFIX(const D::T* x, D::T* y, u64 rows, u64 w,      \
                                                   int vec) {                                   \
        upsample2x<D>(x, y, rows, w, vec);                                                      \
    }                                                                                           \
    extern "C" __global__ void normalise_pixels_##SUFFIX(                                       \
        const unsigned char* x, D::T* y, u64 n, u64 plane, float m0, float m1, float m2,        \
        float s0, float s1, float s2) {                                                         \
        if (fits_u32(n * 3 * plane))                                                            \
            normalise_pixels<D, unsigned>(x, y, (unsigned)n, (unsigned)plane, m0, m1, m2, s0,   \
                                          s1, s2);                                              \
        else                                                                                    \
            normalise_pixels<D, u64>(x, y, n, plane, m0, m1, m2, s0, s1, s2);                   \
    }                                                                                           \
    extern "C" __global__ void layer_norm_##SUFFIX(const D::T* x, const D::T* gamma,             \
                                                   const D::T* beta, D::T* y, u64 rows, int c,   \
                                                   float eps, int vec) {                         \
        layer_norm<D>(x, gamma, beta, y, rows, c, eps, vec);                                    \
    }                                                                                           \
    extern "C" __global__ void geglu_##SUFFIX(const D::T* x, const D::T* bias, D::T* y,         \
                                              u64 rows, u64 inner, int vec) {                   \
        if (fits_u32(rows * inner))                                                             \
            geglu<D, unsigned>(x, bias, y, (unsigned)rows, (unsigned)inner, vec);               \
        else                                                                                    \
            geglu<D, u64>(x, bias, y, rows, inner, vec);                                        \
    }

// GroupNorm's middle kernel, whatever the storage type (the statistics are f32).
extern "C" __global__ void group_combine(const float* stats, float* norm, u64 chunks, float eps) {
    combine_chunks(stats, norm, chunks, eps);
}

DND_KERNELS(F32, f32)
DND_KERNELS(F16, f16)
DND_KERNELS(BF16, bf16)

#ifdef DND_HAS_MMA
// Flash attention for 16-bit types, per head size rounded up to 8 (tensor cores: sm_80 and
// later); `rows` is fa_rows of that size, which the launcher used for its grid.
#define DND_FLASH(D, SUFFIX, D8)                                                                \
    extern "C" __global__ void flash_attention_##SUFFIX##_##D8(                                 \
        const u16* q, const u16* k, const u16* v, u16* out, int heads, int tq, int tk, int d,   \
        float scale_log2, Strides qs, Strides ks, Strides vs, int vec, int rows) {              \
        flash_attention<D, D8>(q, k, v, out, heads, tq, tk, d, scale_log2, qs, ks, vs, vec, rows); \
    }
#define DND_FLASH_SIZES(D, SUFFIX)                                                              \
    DND_FLASH(D, SUFFIX, 32)                                                                    \
    DND_FLASH(D, SUFFIX, 40)                                                                    \
    DND_FLASH(D, SUFFIX, 48)                                                                    \
    DND_FLASH(D, SUFFIX, 64)                                                                    \
    DND_FLASH(D, SUFFIX, 80)                                                                    \
    DND_FLASH(D, SUFFIX, 96)                                                                    \
    DND_FLASH(D, SUFFIX, 128)                                                                   \
    DND_FLASH(D, SUFFIX, 160)
DND_FLASH_SIZES(F16, f16)
DND_FLASH_SIZES(BF16, bf16)
#endif

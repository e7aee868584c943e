// Runs one kernel of kernels.cu under the CPU emulation (emu.hpp) on raw little-endian files:
// the unit tests in gpu_ops/mod.rs write the inputs, run this, and compare the output with the
// CPU path.
//
//   emu group_norm DTYPE GRID BLOCK VEC CHANNELS GROUPS PLANE CHUNK EPS SILU x gamma beta out
//       (the three GroupNorm kernels; GRID is the number of groups in the batch, N * GROUPS)
//   emu bias_act   DTYPE GRID BLOCK VEC N BIAS_LEN PLANE IMAGE ACT x bias residual|- out
//   emu group_norm_nhwc DTYPE GRID BLOCK VEC N PIXELS C GROUPS CHUNK_PX EPS SILU x gamma beta out
//       (x and out channels-last; GRID: blocks of the apply kernel)
//   emu upsample2x_nhwc DTYPE GRID BLOCK VEC ROWS W C x out
//   emu layer_norm DTYPE GRID BLOCK VEC ROWS C EPS x gamma beta out
//   emu geglu      DTYPE GRID BLOCK VEC ROWS INNER x bias out   (bias may be -)
//   emu max_pool   DTYPE GRID BLOCK VEC N H W C P Q K STRIDE PAD x out   (x NHWC, out NPQC)
//   emu upsample2x DTYPE GRID BLOCK VEC ROWS W x out
//   emu interleave_phases_nhwc DTYPE GRID BLOCK VEC N H W K x bias out
//       (x (N, H+1, W+1, 4K), out (N, 2H, 2W, K))
//       (VEC: the kernels' vectorised path, 0 off)
//   emu normalise_pixels DTYPE GRID BLOCK VEC N PLANE MEAN(3) STD(3) x out
//       (x 8-bit (N, PLANE, 3), out DTYPE (N, 3, PLANE); VEC unused)
//   emu flash      DTYPE D8 B H TQ TK D SCALE_LOG2 QS(3) KS(3) VS(3) VEC ROWS q k v out
//                  (f16 or bf16; D8: the kernel's head size; QS, KS, VS: batch, head and row
//                  strides; ROWS: query rows a block, as the launcher reckons; out is
//                  (B, TQ, H, D))
#include "emu.hpp"
#include "kernels.cu"

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <string>

static std::vector<char> read(const char* path) {
    std::ifstream f(path, std::ios::binary);
    if (!f) {
        std::fprintf(stderr, "cannot read %s\n", path);
        std::exit(2);
    }
    // Exactly the file's size, so that the sanitizer sees any read past the end.
    std::vector<char> v(std::istreambuf_iterator<char>(f), {});
    v.shrink_to_fit();
    return v;
}

static void write(const char* path, const std::vector<char>& data) {
    std::ofstream(path, std::ios::binary).write(data.data(), (std::streamsize)data.size());
}

// The kernels' extern "C" entry points for one storage type.
template <class T>
struct Entry {
    void (*group_stats)(const T*, float*, u64, u64, int);
    void (*group_apply)(const T*, const float*, const T*, const T*, T*, int, int, u64, u64, int,
                        int);
    void (*bias_act)(const T*, const T*, const T*, T*, u64, u64, u64, u64, int, int);
    void (*group_stats_nhwc)(const T*, float*, u64, int, int, u64);
    void (*group_apply_nhwc)(const T*, const float*, const T*, const T*, T*, u64, u64, int, int,
                             int, int);
    void (*upsample2x_nhwc)(const T*, T*, u64, u64, u64, int);
    void (*layer_norm)(const T*, const T*, const T*, T*, u64, int, float, int);
    void (*geglu)(const T*, const T*, T*, u64, u64, int);
    void (*max_pool)(const T*, T*, int, int, int, int, int, int, int, int, int, int);
    void (*upsample2x)(const T*, T*, u64, u64, int);
    void (*interleave_phases_nhwc)(const T*, const T*, T*, u64, u64, u64, u64, int);
    void (*normalise_pixels)(const unsigned char*, T*, u64, u64, float, float, float, float, float,
                             float);
};

#define ENTRY(S)                                                                         \
    {group_stats_##S,      group_apply_##S,      bias_act_##S,                           \
     group_stats_nhwc_##S, group_apply_nhwc_##S, upsample2x_nhwc_##S,                    \
     layer_norm_##S,       geglu_##S,            max_pool_nhwc_##S,                      \
     upsample2x_##S,       interleave_phases_nhwc_##S, normalise_pixels_##S}

typedef void (*Flash)(const u16*, const u16*, const u16*, u16*, int, int, int, int, float,
                      Strides, Strides, Strides, int, int);

#define FLASH_TABLE(S)                                                                          \
    {32, flash_attention_##S##_32}, {40, flash_attention_##S##_40},                             \
        {48, flash_attention_##S##_48}, {64, flash_attention_##S##_64},                         \
        {80, flash_attention_##S##_80}, {96, flash_attention_##S##_96},                         \
        {128, flash_attention_##S##_128}, {160, flash_attention_##S##_160}

static int flash(char** a, const std::vector<std::pair<int, Flash>>& table) {
    const int hd = std::atoi(a[3]), b = std::atoi(a[4]), h = std::atoi(a[5]), tq = std::atoi(a[6]),
              tk = std::atoi(a[7]), d = std::atoi(a[8]);
    const float scale_log2 = std::strtof(a[9], nullptr);
    Strides st[3];
    for (int i = 0; i < 3; ++i)
        st[i] = {std::strtoull(a[10 + 3 * i], nullptr, 10),
                 std::strtoull(a[11 + 3 * i], nullptr, 10),
                 std::strtoull(a[12 + 3 * i], nullptr, 10)};
    const int vec = std::atoi(a[19]), rows = std::atoi(a[20]);
    auto q = read(a[21]), k = read(a[22]), v = read(a[23]);
    std::vector<char> out((size_t)b * h * tq * d * 2);
    for (const auto& [size, kernel] : table)
        if (size == hd) {
            emu_launch(b * h * ((tq + rows - 1) / rows), 128, [&] {
                kernel((const u16*)q.data(), (const u16*)k.data(), (const u16*)v.data(),
                       (u16*)out.data(), h, tq, tk, d, scale_log2, st[0], st[1], st[2], vec, rows);
            });
            write(a[24], out);
            return 0;
        }
    std::fprintf(stderr, "no flash attention kernel for head size %d\n", hd);
    return 2;
}

template <class T>
static int run(char** a, Entry<T> k) {
    const std::string kernel = a[1];
    const unsigned grid = std::atoi(a[3]), block = std::atoi(a[4]);
    const int vec = std::atoi(a[5]);
    a += 1;  // the arguments of each kernel below start at a[5]
    if (kernel == "group_norm") {
        const int channels = std::atoi(a[5]), groups = std::atoi(a[6]);
        const u64 plane = std::strtoull(a[7], nullptr, 10), chunk = std::strtoull(a[8], nullptr, 10);
        const float eps = std::strtof(a[9], nullptr);
        const int silu = std::atoi(a[10]);
        auto x = read(a[11]), gamma = read(a[12]), beta = read(a[13]);
        const u64 len = (u64)(channels / groups) * plane, chunks = (len + chunk - 1) / chunk;
        std::vector<float> stats(3 * grid * chunks), norm(2 * grid);
        std::vector<char> y(x.size());
        emu_launch(grid * chunks, block,
                   [&] { k.group_stats((const T*)x.data(), stats.data(), len, chunk, vec); });
        emu_launch(grid, block, [&] { group_combine(stats.data(), norm.data(), chunks, eps); });
        emu_launch(grid * chunks, block, [&] {
            k.group_apply((const T*)x.data(), norm.data(), (const T*)gamma.data(),
                          (const T*)beta.data(), (T*)y.data(), channels, groups, plane, chunk,
                          silu, vec);
        });
        write(a[14], y);
        return 0;
    }
    if (kernel == "bias_act") {
        const u64 n = std::strtoull(a[5], nullptr, 10);
        const u64 bias_len = std::strtoull(a[6], nullptr, 10);
        const u64 plane = std::strtoull(a[7], nullptr, 10);
        const u64 image = std::strtoull(a[8], nullptr, 10);
        const int act = std::atoi(a[9]);
        auto x = read(a[10]), bias = read(a[11]);
        std::vector<char> residual = std::string(a[12]) == "-" ? std::vector<char>() : read(a[12]);
        std::vector<char> y(x.size());
        emu_launch(grid, block, [&] {
            k.bias_act((const T*)x.data(), (const T*)bias.data(),
                        residual.empty() ? nullptr : (const T*)residual.data(), (T*)y.data(), n,
                        bias_len, plane, image, act, vec);
        });
        write(a[13], y);
        return 0;
    }
    if (kernel == "group_norm_nhwc") {
        // GRID: blocks of the apply kernel (grid-stride).
        const u64 n = std::strtoull(a[5], nullptr, 10), pixels = std::strtoull(a[6], nullptr, 10);
        const int c = std::atoi(a[7]), groups = std::atoi(a[8]);
        const u64 chunk_px = std::strtoull(a[9], nullptr, 10);
        const float eps = std::strtof(a[10], nullptr);
        const int silu = std::atoi(a[11]);
        auto x = read(a[12]), gamma = read(a[13]), beta = read(a[14]);
        const u64 chunks = (pixels + chunk_px - 1) / chunk_px;
        std::vector<float> stats(3 * n * groups * chunks), norm(2 * n * groups);
        std::vector<char> y(x.size());
        emu_launch(n * chunks, block, [&] {
            k.group_stats_nhwc((const T*)x.data(), stats.data(), pixels, c, groups, chunk_px);
        });
        // group_combine's block is a power of two (its sum halves it), whatever BLOCK is here.
        emu_launch(n * groups, 32, [&] { group_combine(stats.data(), norm.data(), chunks, eps); });
        emu_launch(grid, block, [&] {
            k.group_apply_nhwc((const T*)x.data(), norm.data(), (const T*)gamma.data(),
                               (const T*)beta.data(), (T*)y.data(), n * pixels * c, pixels * c, c,
                               groups, silu, vec);
        });
        write(a[15], y);
        return 0;
    }
    if (kernel == "upsample2x_nhwc") {
        const u64 rows = std::strtoull(a[5], nullptr, 10), w = std::strtoull(a[6], nullptr, 10);
        const u64 c = std::strtoull(a[7], nullptr, 10);
        auto x = read(a[8]);
        std::vector<char> y(4 * x.size());
        emu_launch(grid, block,
                   [&] { k.upsample2x_nhwc((const T*)x.data(), (T*)y.data(), rows, w, c, vec); });
        write(a[9], y);
        return 0;
    }
    if (kernel == "layer_norm") {
        const u64 rows = std::strtoull(a[5], nullptr, 10);
        const int c = std::atoi(a[6]);
        const float eps = std::strtof(a[7], nullptr);
        auto x = read(a[8]), gamma = read(a[9]), beta = read(a[10]);
        std::vector<char> y(x.size());
        emu_launch(grid, block, [&] {
            k.layer_norm((const T*)x.data(), (const T*)gamma.data(), (const T*)beta.data(),
                         (T*)y.data(), rows, c, eps, vec);
        });
        write(a[11], y);
        return 0;
    }
    if (kernel == "geglu") {
        const u64 rows = std::strtoull(a[5], nullptr, 10), inner = std::strtoull(a[6], nullptr, 10);
        auto x = read(a[7]);
        std::vector<char> bias = std::string(a[8]) == "-" ? std::vector<char>() : read(a[8]);
        std::vector<char> y(x.size() / 2);
        emu_launch(grid, block, [&] {
            k.geglu((const T*)x.data(), bias.empty() ? nullptr : (const T*)bias.data(),
                    (T*)y.data(), rows, inner, vec);
        });
        write(a[9], y);
        return 0;
    }
    if (kernel == "max_pool") {
        int d[9];
        for (int i = 0; i < 9; ++i) d[i] = std::atoi(a[5 + i]);
        auto x = read(a[14]);
        std::vector<char> y((size_t)d[0] * d[4] * d[5] * d[3] * sizeof(T));
        emu_launch(grid, block, [&] {
            k.max_pool((const T*)x.data(), (T*)y.data(), d[0], d[1], d[2], d[3], d[4], d[5], d[6],
                       d[7], d[8], vec);
        });
        write(a[15], y);
        return 0;
    }
    if (kernel == "upsample2x") {
        const u64 rows = std::strtoull(a[5], nullptr, 10), w = std::strtoull(a[6], nullptr, 10);
        auto x = read(a[7]);
        std::vector<char> y(4 * x.size());
        emu_launch(grid, block,
                   [&] { k.upsample2x((const T*)x.data(), (T*)y.data(), rows, w, vec); });
        write(a[8], y);
        return 0;
    }
    if (kernel == "interleave_phases_nhwc") {
        u64 d[4];
        for (int i = 0; i < 4; ++i) d[i] = std::strtoull(a[5 + i], nullptr, 10);
        auto x = read(a[9]), bias = read(a[10]);
        std::vector<char> y(d[0] * 4 * d[1] * d[2] * d[3] * sizeof(T));
        emu_launch(grid, block, [&] {
            k.interleave_phases_nhwc((const T*)x.data(), (const T*)bias.data(), (T*)y.data(), d[0],
                                     d[1], d[2], d[3], vec);
        });
        write(a[11], y);
        return 0;
    }
    if (kernel == "normalise_pixels") {
        const u64 n = std::strtoull(a[5], nullptr, 10), plane = std::strtoull(a[6], nullptr, 10);
        float ms[6];
        for (int i = 0; i < 6; ++i) ms[i] = std::strtof(a[7 + i], nullptr);
        auto x = read(a[13]);
        std::vector<char> y(x.size() * sizeof(T));
        emu_launch(grid, block, [&] {
            k.normalise_pixels((const unsigned char*)x.data(), (T*)y.data(), n, plane, ms[0], ms[1],
                               ms[2], ms[3], ms[4], ms[5]);
        });
        write(a[14], y);
        return 0;
    }
    std::fprintf(stderr, "unknown kernel %s\n", kernel.c_str());
    return 2;
}

int main(int argc, char** argv) {
    if (argc < 5) {
        std::fprintf(stderr, "usage: see the top of emu_main.cpp\n");
        return 2;
    }
    const std::string dtype = argv[2];
    if (std::string(argv[1]) == "flash" && dtype == "f16") return flash(argv, {FLASH_TABLE(f16)});
    if (std::string(argv[1]) == "flash" && dtype == "bf16") return flash(argv, {FLASH_TABLE(bf16)});
    if (dtype == "f32") return run<float>(argv, ENTRY(f32));
    if (dtype == "f16") return run<u16>(argv, ENTRY(f16));
    if (dtype == "bf16") return run<u16>(argv, ENTRY(bf16));
    std::fprintf(stderr, "unknown dtype %s\n", argv[2]);
    return 2;
}

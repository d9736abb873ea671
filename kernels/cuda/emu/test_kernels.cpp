// test_kernels.cpp: runs the convolution kernels (every tile shape, both kernel sizes, fp32 and TF32,
// all three passes, split-K) and a few ops through the CPU emulation in emu.hpp and compares them
// with straightforward double-precision loops. Build and run: kernels/cuda/emu/run.sh
#include "emu.hpp"
#define MF_CONV_FP32 1
#define MF_CONV_TF32 1
#include "../common.cu"
#include "../conv.cu"
#include "../ops.cu"
#include <cstdio>
#include <random>

typedef void (*ConvFn)(const float*, const float*, const float*, float*, int, int, int, int, int, int, int);

struct Tile {
    const char* name;
    int bm, bn, threads;
    ConvFn fwd[2][2], bwd_data[2][2], bwd_weight[2][2];  // [k==3][tf32]
};

#define TILE(NAME, BM, BN, THREADS)                                                                  \
    Tile{#NAME, BM, BN, THREADS,                                                                     \
         {{conv_fwd_##NAME##_k1_fp32, conv_fwd_##NAME##_k1_tf32},                                    \
          {conv_fwd_##NAME##_k3_fp32, conv_fwd_##NAME##_k3_tf32}},                                   \
         {{conv_bwd_data_##NAME##_k1_fp32, conv_bwd_data_##NAME##_k1_tf32},                          \
          {conv_bwd_data_##NAME##_k3_fp32, conv_bwd_data_##NAME##_k3_tf32}},                         \
         {{conv_bwd_weight_##NAME##_k1_fp32, conv_bwd_weight_##NAME##_k1_tf32},                      \
          {conv_bwd_weight_##NAME##_k3_fp32, conv_bwd_weight_##NAME##_k3_tf32}}}
// Tiles that exist for 3x3 kernels only.
#define TILE3(NAME, BM, BN, THREADS)                                                                 \
    Tile{#NAME, BM, BN, THREADS,                                                                     \
         {{nullptr, nullptr}, {conv_fwd_##NAME##_k3_fp32, conv_fwd_##NAME##_k3_tf32}},               \
         {{nullptr, nullptr}, {conv_bwd_data_##NAME##_k3_fp32, conv_bwd_data_##NAME##_k3_tf32}},     \
         {{nullptr, nullptr}, {conv_bwd_weight_##NAME##_k3_fp32, conv_bwd_weight_##NAME##_k3_tf32}}}

static int failures = 0;
static double rel_err(const std::vector<float>& got, const std::vector<double>& want) {
    double num = 0, den = 0;
    for (size_t i = 0; i < got.size(); ++i) {
        if (!std::isfinite(got[i])) return INFINITY;
        num += (got[i] - want[i]) * (got[i] - want[i]);
        den += want[i] * want[i];
    }
    return std::sqrt(num / (den > 0 ? den : 1));
}
static void check(const char* what, const std::vector<float>& got, const std::vector<double>& want, double tol) {
    const double e = rel_err(got, want);
    const bool ok = e <= tol;
    if (!ok) ++failures;
    std::printf("%-48s rel err %.2e %s\n", what, e, ok ? "ok" : "FAIL");
}

int main() {
    std::mt19937 rng(12345);
    std::uniform_real_distribution<float> U(-1.f, 1.f);
    const float NaN = std::nanf("");
    Tile tiles[] = {TILE3(t128x128, 128, 128, 256), TILE(t64x128, 64, 128, 128), TILE3(t32x128, 32, 128, 128),
                    TILE(t16x128, 16, 128, 128)};
    // chunk: pixels per backward-weight split. The last case has images larger than a 128-pixel tile
    // and five k-tiles per split, so the pipeline (three stages) wraps around its buffers there too.
    struct Case { int n, ci, co, h, w, chunk; };
    Case cases[] = {{2, 5, 7, 5, 9, 32}, {1, 3, 19, 7, 3, 32}, {2, 17, 33, 3, 11, 32}, {2, 6, 5, 13, 11, 80}};
    for (const Case& cs : cases)
        for (int ks : {1, 3})
            for (const Tile& tile : tiles)
                for (int tf : {0, 1}) {
                    if (!tile.fwd[ks == 3][tf]) continue;
                    const int n = cs.n, ci = cs.ci, co = cs.co, h = cs.h, w = cs.w, hw = h * w, P = n * hw;
                    const int KK = ks * ks, pad = ks / 2;
                    std::vector<float> x(n * ci * hw), wt(co * ci * KK), b(co), dy(n * co * hw);
                    for (auto& v : x) v = U(rng);
                    for (auto& v : wt) v = U(rng);
                    for (auto& v : b) v = U(rng);
                    for (auto& v : dy) v = U(rng);
                    // references
                    std::vector<double> y_ref(n * co * hw), dx_ref(n * ci * hw, 0.0), dw_ref(co * ci * KK, 0.0);
                    for (int im = 0; im < n; ++im)
                        for (int o = 0; o < co; ++o)
                            for (int yy = 0; yy < h; ++yy)
                                for (int xx = 0; xx < w; ++xx) {
                                    double s = b[o];
                                    for (int c = 0; c < ci; ++c)
                                        for (int kh = 0; kh < ks; ++kh)
                                            for (int kw = 0; kw < ks; ++kw) {
                                                const int iy = yy + kh - pad, ix = xx + kw - pad;
                                                if (iy < 0 || iy >= h || ix < 0 || ix >= w) continue;
                                                const double xv = x[((im * ci + c) * h + iy) * w + ix];
                                                const double wv = wt[((o * ci + c) * ks + kh) * ks + kw];
                                                s += xv * wv;
                                                const double g = dy[((im * co + o) * h + yy) * w + xx];
                                                dx_ref[((im * ci + c) * h + iy) * w + ix] += g * wv;
                                                dw_ref[((o * ci + c) * ks + kh) * ks + kw] += g * xv;
                                            }
                                    y_ref[((im * co + o) * h + yy) * w + xx] = s > 0 ? s : 0;  // relu
                                }
                    const double tol = tf ? 3e-3 : 1e-5;
                    char label[128];
                    const int kidx = ks == 3;
                    // forward
                    {
                        std::vector<float> y(n * co * hw, NaN);
                        dim3 grid{(unsigned)((P + tile.bn - 1) / tile.bn), (unsigned)((co + tile.bm - 1) / tile.bm), 1};
                        emu_launch(grid, dim3{(unsigned)tile.threads, 1, 1}, [&] {
                            tile.fwd[kidx][tf](wt.data(), x.data(), b.data(), y.data(), n, ci, co, h, w, 1, 0);
                        });
                        std::snprintf(label, sizeof label, "fwd %s k%d %s n%d ci%d co%d %dx%d", tile.name, ks, tf ? "tf32" : "fp32", n, ci, co, h, w);
                        check(label, y, y_ref, tol);
                    }
                    // backward data: M = ci, src channels = co
                    {
                        std::vector<float> dx(n * ci * hw, NaN);
                        dim3 grid{(unsigned)((P + tile.bn - 1) / tile.bn), (unsigned)((ci + tile.bm - 1) / tile.bm), 1};
                        emu_launch(grid, dim3{(unsigned)tile.threads, 1, 1}, [&] {
                            tile.bwd_data[kidx][tf](wt.data(), dy.data(), b.data(), dx.data(), n, co, ci, h, w, 0, 0);
                        });
                        std::snprintf(label, sizeof label, "bwd_data %s k%d %s", tile.name, ks, tf ? "tf32" : "fp32");
                        check(label, dx, dx_ref, tol);
                    }
                    // backward weight, split-K with chunks of 32 pixels, then the fixed-order reduction
                    {
                        const int chunk = cs.chunk, splits = (P + chunk - 1) / chunk, N = ci * KK, len = co * N;
                        std::vector<float> ws((size_t)splits * len, NaN), dw(len, NaN);
                        dim3 grid{(unsigned)((N + tile.bn - 1) / tile.bn), (unsigned)((co + tile.bm - 1) / tile.bm), (unsigned)splits};
                        emu_launch(grid, dim3{(unsigned)tile.threads, 1, 1}, [&] {
                            tile.bwd_weight[kidx][tf](dy.data(), x.data(), b.data(), ws.data(), n, ci, co, h, w, 0, chunk);
                        });
                        emu_launch(dim3{2, 1, 1}, dim3{64, 1, 1}, [&] { splitk_reduce(ws.data(), splits, len, dw.data()); });
                        std::snprintf(label, sizeof label, "bwd_weight %s k%d %s splits %d", tile.name, ks, tf ? "tf32" : "fp32", splits);
                        check(label, dw, dw_ref, tol);
                    }
                }
    // channel sums + reduce_rows (bias gradient path)
    {
        const int n = 3, c = 5, hw = 37, chunks = 3;
        std::vector<float> x(n * c * hw), partial(c * chunks, NaN), out(c, NaN);
        for (auto& v : x) v = U(rng);
        std::vector<double> ref(c, 0.0);
        for (int i = 0; i < n; ++i)
            for (int ch = 0; ch < c; ++ch)
                for (int p = 0; p < hw; ++p) ref[ch] += x[(i * c + ch) * hw + p];
        emu_launch(dim3{(unsigned)chunks, (unsigned)c, 1}, dim3{REDUCE_THREADS, 1, 1},
                   [&] { channel_partial_sums(x.data(), n, c, hw, x.data(), 0, partial.data()); });
        emu_launch(dim3{(unsigned)c, 1, 1}, dim3{REDUCE_THREADS, 1, 1}, [&] { reduce_rows(partial.data(), chunks, out.data()); });
        check("channel sums", out, ref, 1e-6);
    }
    std::printf("%s: %d failure(s)\n", failures ? "FAILED" : "passed", failures);
    return failures ? 1 : 0;
}

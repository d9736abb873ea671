// conv.cu: 2-D convolution (k = 1 or 3, stride 1, "same" padding) as implicit GEMM, forward and both
// backward passes, fp32 FFMA or TF32 tensor cores. Needs common.cu in front.
//
// The three passes are one GEMM C[M][N] = sum_k A[M][k] B[k][N] with operands gathered on the fly from
// the NCHW tensors (no im2col buffer). P = n*h*w pixels, KK = k*k:
//
//   mode        M        N          K          A (gathered)            B (gathered)           C
//   FWD         c_out    P          c_in*KK    w[co][ci][r]            x at (h+kh-1, w+kw-1)  y (+bias, ReLU)
//   BWD_DATA    c_in     P          c_out*KK   w[co][ci][r] (transp.)  dy at (h-kh+1, w-kw+1) dx
//   BWD_WEIGHT  c_out    c_in*KK    P (split)  dy[co][p]               x at (p shifted by r)  dw partials
//
// Backward-data is the forward GEMM on dy with the weights transposed (c_out <-> c_in) and the kernel
// flipped (the shift changes sign). Backward-weight reduces over all pixels; the pixel range is split
// across gridDim.z blocks ("split-K") and each split writes its own partial [M][N] slab; a second
// kernel (splitk_reduce in ops.cu) adds the slabs in a fixed order. No atomics anywhere, so the result
// is deterministic run to run. The bias gradient is a per-channel sum of dy (ops.cu).
//
// Block tile BM x BN x BK in shared memory, k-major (As[k][m], Bs[k][n]) and double-buffered: the
// gathers for tile t+1 are issued (cp.async on sm_80+, so they are in flight while the tile t
// arithmetic runs) before computing tile t, with one __syncthreads() per tile. Rows are padded by 8
// floats so that the tensor-core fragment reads (rows tig and tig+4, columns gid) hit 32 distinct
// banks. Every gather checks its bounds (image edges, M, N, K), so any size works.
//
// Warp tile WM x WN. FFMA path: each lane owns a TM x TN register block of C and reads float4 runs
// of As/Bs. TF32 path: each warp issues (WM/16) x (WN/8) mma.sync.m16n8k8 per 8-deep k-step, operands
// rounded with cvt.rna.tf32.f32, accumulation in fp32. Both keep WM*WN/32 accumulators per lane.
//
// Kernel names: conv_<mode>_<tile>_k<1|3>_<fp32|tf32>, tile in {t128x128, t64x128, t32x128, t16x128}
// (BM x BN; k1 only t64x128 and t16x128). The TF32 kernels exist only when compiling for sm_80+.

#define MODE_FWD 0
#define MODE_BWD_DATA 1
#define MODE_BWD_WEIGHT 2

template <int BM, int BN, int BK, int WM, int WN, int TM, int TN, int KS, int MODE, bool TF32>
__device__ __forceinline__ void conv_gemm(const float* MF_RESTRICT asrc,  // w (FWD, BWD_DATA) or dy
                                          const float* MF_RESTRICT bsrc,  // x (FWD, BWD_WEIGHT) or dy
                                          const float* MF_RESTRICT bias,  // FWD only
                                          float* MF_RESTRICT out, int n_img, int c_src, int c_dst, int h,
                                          int w, int relu, int k_chunk) {
    constexpr int WARPS_M = BM / WM;
    constexpr int WARPS_N = BN / WN;
    constexpr int THREADS = WARPS_M * WARPS_N * 32;
    constexpr int KK = KS * KS;
    constexpr int PAD = KS / 2;
    constexpr int LDA = BM + 8;
    constexpr int LDB = BN + 8;
    constexpr int A_PER = BM * BK / THREADS;
    constexpr int B_PER = BK * BN / THREADS;
    static_assert(BM * BK % THREADS == 0 && BK * BN % THREADS == 0, "tile loads must divide evenly");
    static_assert(THREADS % BN == 0 || MODE == MODE_BWD_WEIGHT, "one pixel column per thread");
    static_assert(THREADS % BK == 0, "one k row per thread (backward-weight)");
    static_assert((WM / TM) * (WN / TN) == 32, "FFMA lanes tile the warp tile");
    static_assert(WM % 16 == 0 && WN % 8 == 0 && BK % 8 == 0, "mma tile");

    __shared__ __align__(16) float As[2][BK][LDA];
    __shared__ __align__(16) float Bs[2][BK][LDB];

    const int tid = threadIdx.x;
    const int hw = h * w;
    const int P = n_img * hw;
    const int M = c_dst;
    const int Ngemm = (MODE == MODE_BWD_WEIGHT) ? c_src * KK : P;
    const int m0 = blockIdx.y * BM;
    const int n0 = blockIdx.x * BN;
    int k_begin = 0;
    int k_end = c_src * KK;
    if (MODE == MODE_BWD_WEIGHT) {
        k_begin = blockIdx.z * k_chunk;
        k_end = mf_min(k_begin + k_chunk, P);
    }
    const int k_tiles = k_end > k_begin ? (k_end - k_begin + BK - 1) / BK : 0;

    // ---- per-thread gather state ---------------------------------------------------------------
    // FWD / BWD_DATA: the thread always gathers the same pixel column of B (THREADS % BN == 0).
    const int b_col = tid % BN;
    const int b_row0 = tid / BN;
    int px_valid = 0, px_oh = 0, px_ow = 0;
    const float* px_base = bsrc;
    // BWD_WEIGHT: the thread always gathers the same k (= pixel) row of A and B, and walks it forward.
    const int k_lane = tid % BK;
    int wp_img = 0, wp_oh = 0, wp_ow = 0;
    if (MODE != MODE_BWD_WEIGHT) {
        const int p = n0 + b_col;
        px_valid = p < P;
        if (px_valid) {
            const int img = p / hw;
            const int rem = p - img * hw;
            px_oh = rem / w;
            px_ow = rem - px_oh * w;
            px_base = bsrc + (long long)img * c_src * hw;
        }
    } else {
        const int p = k_begin + k_lane;
        wp_img = p / hw;
        const int rem = p - wp_img * hw;
        wp_oh = rem / w;
        wp_ow = rem - wp_oh * w;
    }

    // Issues the gathers of k-tile `kt` into buffer `buf`.
    auto stage = [&](int kt, int buf) {
        const int k0 = k_begin + kt * BK;
        if (MODE != MODE_BWD_WEIGHT) {
#pragma unroll
            for (int i = 0; i < A_PER; ++i) {
                const int idx = tid + i * THREADS;
                const int am = idx / BK;
                const int ak = idx % BK;
                const int m = m0 + am;
                const int k = k0 + ak;
                const bool ok = m < M && k < k_end;
                long long off = 0;
                if (ok) {
                    if (MODE == MODE_FWD) {
                        off = (long long)m * k_end + k;
                    } else {
                        const int co = k / KK;
                        const int r = k - co * KK;
                        off = ((long long)co * c_dst + m) * KK + r;
                    }
                }
                cp_async4(&As[buf][ak][am], asrc + off, ok);
            }
#pragma unroll
            for (int i = 0; i < B_PER; ++i) {
                const int bk = b_row0 + i * (THREADS / BN);
                const int k = k0 + bk;
                const int c = k / KK;
                const int r = k - c * KK;
                const int kh = r / KS;
                const int kw = r - kh * KS;
                int ih, iw;
                if (MODE == MODE_FWD) {
                    ih = px_oh + kh - PAD;
                    iw = px_ow + kw - PAD;
                } else {
                    ih = px_oh - kh + PAD;
                    iw = px_ow - kw + PAD;
                }
                const bool ok = px_valid && k < k_end && ih >= 0 && ih < h && iw >= 0 && iw < w;
                const long long off = ok ? ((long long)c * h + ih) * w + iw : 0;
                cp_async4(&Bs[buf][bk][b_col], px_base + off, ok);
            }
        } else {
            // Pixel of this thread's k row in this tile: advance the walk to k0 + k_lane.
            const int p = k0 + k_lane;
            const bool p_ok = p < k_end;
            const long long img_a = (long long)wp_img * c_dst * hw;
            const long long img_b = (long long)wp_img * c_src * hw;
            const int rem = wp_oh * w + wp_ow;
#pragma unroll
            for (int i = 0; i < A_PER; ++i) {
                const int am = tid / BK + i * (THREADS / BK);
                const int m = m0 + am;
                const bool ok = p_ok && m < M;
                const long long off = ok ? img_a + (long long)m * hw + rem : 0;
                cp_async4(&As[buf][k_lane][am], asrc + off, ok);
            }
#pragma unroll
            for (int i = 0; i < B_PER; ++i) {
                const int bn = tid / BK + i * (THREADS / BK);
                const int j = n0 + bn;
                const int c = j / KK;
                const int r = j - c * KK;
                const int kh = r / KS;
                const int kw = r - kh * KS;
                const int ih = wp_oh + kh - PAD;
                const int iw = wp_ow + kw - PAD;
                const bool ok = p_ok && j < Ngemm && ih >= 0 && ih < h && iw >= 0 && iw < w;
                const long long off = ok ? img_b + ((long long)c * h + ih) * w + iw : 0;
                cp_async4(&Bs[buf][k_lane][bn], bsrc + off, ok);
            }
            // Walk to the next tile's pixel (BK further on), without a division.
            wp_ow += BK;
            while (wp_ow >= w) {
                wp_ow -= w;
                if (++wp_oh >= h) {
                    wp_oh = 0;
                    ++wp_img;
                }
            }
        }
    };

    // ---- accumulators and warp placement -------------------------------------------------------
    constexpr int ACC = WM * WN / 32;
    float acc[ACC];
#pragma unroll
    for (int i = 0; i < ACC; ++i) acc[i] = 0.0f;
    const int warp = tid / 32;
    const int lane = tid % 32;
    const int wm0 = (warp / WARPS_N) * WM;
    const int wn0 = (warp % WARPS_N) * WN;
    // FFMA lane block
    constexpr int LANES_N = WN / TN;
    const int rm0 = wm0 + (lane / LANES_N) * TM;
    const int cn0 = wn0 + (lane % LANES_N) * TN;
    // mma fragment coordinates
    const int gid = lane / 4;
    const int tig = lane % 4;
    constexpr int MI = WM / 16;
    constexpr int NI = WN / 8;

    if (k_tiles > 0) {
        stage(0, 0);
        cp_async_wait();
        __syncthreads();
    }
    for (int t = 0; t < k_tiles; ++t) {
        const int buf = t & 1;
        if (t + 1 < k_tiles) stage(t + 1, buf ^ 1);
        if (TF32) {
#pragma unroll
            for (int kk = 0; kk < BK; kk += 8) {
                unsigned af[MI][4];
                unsigned bf[NI][2];
#pragma unroll
                for (int mi = 0; mi < MI; ++mi) {
                    const int r = wm0 + mi * 16 + gid;
                    af[mi][0] = to_tf32(As[buf][kk + tig][r]);
                    af[mi][1] = to_tf32(As[buf][kk + tig][r + 8]);
                    af[mi][2] = to_tf32(As[buf][kk + tig + 4][r]);
                    af[mi][3] = to_tf32(As[buf][kk + tig + 4][r + 8]);
                }
#pragma unroll
                for (int ni = 0; ni < NI; ++ni) {
                    const int c = wn0 + ni * 8 + gid;
                    bf[ni][0] = to_tf32(Bs[buf][kk + tig][c]);
                    bf[ni][1] = to_tf32(Bs[buf][kk + tig + 4][c]);
                }
#pragma unroll
                for (int mi = 0; mi < MI; ++mi)
#pragma unroll
                    for (int ni = 0; ni < NI; ++ni) mma_tf32_16x8x8(&acc[(mi * NI + ni) * 4], af[mi], bf[ni]);
            }
        } else {
#pragma unroll
            for (int kk = 0; kk < BK; ++kk) {
                float a[TM], b[TN];
#pragma unroll
                for (int i = 0; i < TM; i += 4) {
                    const float4 v = *reinterpret_cast<const float4*>(&As[buf][kk][rm0 + i]);
                    a[i] = v.x;
                    a[i + 1] = v.y;
                    a[i + 2] = v.z;
                    a[i + 3] = v.w;
                }
#pragma unroll
                for (int j = 0; j < TN; j += 4) {
                    const float4 v = *reinterpret_cast<const float4*>(&Bs[buf][kk][cn0 + j]);
                    b[j] = v.x;
                    b[j + 1] = v.y;
                    b[j + 2] = v.z;
                    b[j + 3] = v.w;
                }
#pragma unroll
                for (int i = 0; i < TM; ++i)
#pragma unroll
                    for (int j = 0; j < TN; ++j) acc[i * TN + j] = fmaf(a[i], b[j], acc[i * TN + j]);
            }
        }
        cp_async_wait();
        __syncthreads();
    }

    // ---- epilogue --------------------------------------------------------------------------------
    // Writes C[m][n] (block-relative row/col) to its place in the output.
    auto emit = [&](int bm, int bn, float v) {
        const int m = m0 + bm;
        const int n = n0 + bn;
        if (m >= M || n >= Ngemm) return;
        if (MODE == MODE_BWD_WEIGHT) {
            out[(long long)blockIdx.z * M * Ngemm + (long long)m * Ngemm + n] = v;
        } else {
            if (MODE == MODE_FWD) {
                v += bias[m];
                if (relu && v < 0.0f) v = 0.0f;
            }
            const int img = n / hw;
            const int rem = n - img * hw;
            out[((long long)img * c_dst + m) * hw + rem] = v;
        }
    };
    if (TF32) {
#pragma unroll
        for (int mi = 0; mi < MI; ++mi)
#pragma unroll
            for (int ni = 0; ni < NI; ++ni) {
                const float* d = &acc[(mi * NI + ni) * 4];
                const int r = wm0 + mi * 16 + gid;
                const int c = wn0 + ni * 8 + tig * 2;
                emit(r, c, d[0]);
                emit(r, c + 1, d[1]);
                emit(r + 8, c, d[2]);
                emit(r + 8, c + 1, d[3]);
            }
    } else {
#pragma unroll
        for (int i = 0; i < TM; ++i)
#pragma unroll
            for (int j = 0; j < TN; ++j) emit(rm0 + i, cn0 + j, acc[i * TN + j]);
    }
}

// One extern "C" entry point per (mode, tile, kernel size, precision), so the host finds each by a
// plain name. Tile shapes (BM, BN, BK, WM, WN, TM, TN): 256 threads for the 128-row tile, 128 for the
// others; see kernels/src/cuda/conv.rs for which shape serves which layer.
#define MF_CONV_ENTRY(NAME, BM, BN, BK, WM, WN, TM, TN, KS, MODE, TF32)                                \
    extern "C" __global__ void __launch_bounds__((BM / WM) * (BN / WN) * 32)                            \
        NAME(const float* MF_RESTRICT asrc, const float* MF_RESTRICT bsrc,                              \
             const float* MF_RESTRICT bias, float* MF_RESTRICT out, int n_img, int c_src, int c_dst,    \
             int h, int w, int relu, int k_chunk) {                                                     \
        conv_gemm<BM, BN, BK, WM, WN, TM, TN, KS, MODE, TF32>(asrc, bsrc, bias, out, n_img, c_src,      \
                                                              c_dst, h, w, relu, k_chunk);              \
    }

// 3x3 convolutions get every tile height; 1x1 convolutions (the segmentation head: 16 -> k classes)
// only the two small ones, which keeps NVRTC's compile time down.
#define MF_CONV_TILES_K3(MODE_NAME, MODE, PREC_NAME, TF32)                                              \
    MF_CONV_ENTRY(conv_##MODE_NAME##_t128x128_k3_##PREC_NAME, 128, 128, 16, 64, 32, 8, 8, 3, MODE,     \
                  TF32)                                                                                 \
    MF_CONV_ENTRY(conv_##MODE_NAME##_t64x128_k3_##PREC_NAME, 64, 128, 16, 32, 64, 8, 8, 3, MODE, TF32) \
    MF_CONV_ENTRY(conv_##MODE_NAME##_t32x128_k3_##PREC_NAME, 32, 128, 16, 32, 32, 8, 4, 3, MODE, TF32) \
    MF_CONV_ENTRY(conv_##MODE_NAME##_t16x128_k3_##PREC_NAME, 16, 128, 16, 16, 32, 4, 4, 3, MODE, TF32)

#define MF_CONV_TILES_K1(MODE_NAME, MODE, PREC_NAME, TF32)                                              \
    MF_CONV_ENTRY(conv_##MODE_NAME##_t64x128_k1_##PREC_NAME, 64, 128, 16, 32, 64, 8, 8, 1, MODE, TF32) \
    MF_CONV_ENTRY(conv_##MODE_NAME##_t16x128_k1_##PREC_NAME, 16, 128, 16, 16, 32, 4, 4, 1, MODE, TF32)

#define MF_CONV_ALL(PREC_NAME, TF32)                                                                    \
    MF_CONV_TILES_K3(fwd, MODE_FWD, PREC_NAME, TF32)                                                    \
    MF_CONV_TILES_K3(bwd_data, MODE_BWD_DATA, PREC_NAME, TF32)                                          \
    MF_CONV_TILES_K3(bwd_weight, MODE_BWD_WEIGHT, PREC_NAME, TF32)                                      \
    MF_CONV_TILES_K1(fwd, MODE_FWD, PREC_NAME, TF32)                                                    \
    MF_CONV_TILES_K1(bwd_data, MODE_BWD_DATA, PREC_NAME, TF32)                                          \
    MF_CONV_TILES_K1(bwd_weight, MODE_BWD_WEIGHT, PREC_NAME, TF32)

// The host compiles this file twice, as two modules, in parallel: once with -DMF_CONV_FP32 and once
// with -DMF_CONV_TF32 (the latter only for sm_80 and newer).
#if defined(MF_CONV_FP32)
MF_CONV_ALL(fp32, false)
#endif
#if defined(MF_CONV_TF32) && (defined(MICROFED_EMU) || __CUDA_ARCH__ >= 800)
MF_CONV_ALL(tf32, true)
#endif

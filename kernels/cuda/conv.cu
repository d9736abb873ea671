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
// Block tile BM x BN x BK in shared memory, k-major (As[k][m], Bs[k][n]), STAGES tiles deep: the
// gathers for tiles t+1 .. t+STAGES-1 are in flight (cp.async groups on sm_80+) while tile t is
// multiplied, with one __syncthreads() per tile. Rows are padded by 8 floats so that the tensor-core
// fragment reads (rows tig and tig+4, columns gid) hit 32 distinct banks. Every gather checks its
// bounds (image edges, M, N, K), so any size works; to keep that cheap, a per-block table gives each
// GEMM row's (or, for the weight gradient, column's) offset and tap, and a 9-bit mask per pixel says
// which taps fall inside the image (see conv_gemm). kernels/cuda/PERF_NOTES.md has the numbers.
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

// One entry of a block's gather table (see conv_gemm): an offset and a tap index, read together.
struct __align__(8) TapEntry {
    unsigned off;
    unsigned tap;
};

template <int BM, int BN, int BK, int WM, int WN, int TM, int TN, int KS, int MODE, bool TF32, int STAGES>
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
    static_assert(THREADS % BK == 0, "one k column (A) / k row (backward-weight) per thread");
    static_assert((WM / TM) * (WN / TN) == 32, "FFMA lanes tile the warp tile");
    static_assert(WM % 16 == 0 && WN % 8 == 0 && BK % 8 == 0, "mma tile");
    static_assert(STAGES >= 2, "at least double buffering");
    static_assert(KK <= 9, "tap masks are 9 bits");

    __shared__ __align__(16) float As[STAGES][BK][LDA];
    __shared__ __align__(16) float Bs[STAGES][BK][LDB];
    // Gather tables, filled once per block, so that the per-element work in the k loop is a table
    // read, an add and a bit test instead of divisions by k·k and four bounds comparisons.
    //   FWD / BWD_DATA, entry s in [0, KK + BK): the GEMM row k = k0 + bk with s = k0 % KK + bk lies
    //     s / KK channels past c0 = k0 / KK, at tap s % KK. tab[s].off = its offset in the B source
    //     relative to channel c0 at the pixel's own position, tab[s].tap = the tap; tab_a[s] (backward-
    //     data) = its offset in w relative to w[c0][m][0].
    //   BWD_WEIGHT, entry = block column bn (GEMM column j = n0 + bn = c·KK + tap): tab[bn].off = offset
    //     of x[c] at the tap's shift, tab[bn].tap = the tap, or 31 (a bit no mask has) past the last
    //     column.
    constexpr int TAB = (MODE == MODE_BWD_WEIGHT) ? BN : KK + BK;
    static_assert(MODE == MODE_BWD_WEIGHT || KK + BK <= 32, "row validity is a 32-bit mask");
    __shared__ TapEntry tab[TAB];
    __shared__ unsigned tab_a[TAB];

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

    // Offset of tap r's source pixel relative to the output pixel (the shift's sign flips for the data
    // gradient, see the header).
    auto tap_shift = [&](int r) {
        const int kh = r / KS;
        const int kw = r - kh * KS;
        return MODE == MODE_BWD_DATA ? (PAD - kh) * w + (PAD - kw) : (kh - PAD) * w + (kw - PAD);
    };
    for (int s = tid; s < TAB; s += THREADS) {
        if (MODE != MODE_BWD_WEIGHT) {
            const int dc = s / KK;
            const int r = s - dc * KK;
            // Rows past the last channel are never valid (k < k_end fails): keep their entries small.
            const bool in = dc < c_src;
            tab[s].off = in ? (unsigned)(dc * hw + tap_shift(r)) : 0u;
            tab[s].tap = (unsigned)r;
            tab_a[s] = in ? (unsigned)(dc * c_dst * KK + r) : 0u;
        } else {
            const int j = n0 + s;
            const int c = j / KK;
            const int r = j - c * KK;
            const bool in = j < Ngemm;
            tab[s].off = in ? (unsigned)(c * hw + tap_shift(r)) : 0u;
            tab[s].tap = in ? (unsigned)r : 31u;
            tab_a[s] = 0u;
        }
    }

    // Bit r of the mask: tap r of the output pixel (oh, ow) reads inside the image.
    auto tap_mask = [&](int oh, int ow) {
        unsigned rows = 0, cols = 0;
#pragma unroll
        for (int t = 0; t < KS; ++t) {
            const int ih = MODE == MODE_BWD_DATA ? oh - t + PAD : oh + t - PAD;
            const int iw = MODE == MODE_BWD_DATA ? ow - t + PAD : ow + t - PAD;
            rows |= (ih >= 0 && ih < h) ? 1u << t : 0u;
            cols |= (iw >= 0 && iw < w) ? 1u << t : 0u;
        }
        unsigned m = 0;
#pragma unroll
        for (int t = 0; t < KS; ++t) m |= (rows >> t & 1u) ? cols << (t * KS) : 0u;
        return m;
    };

    // ---- per-thread gather state ---------------------------------------------------------------
    // FWD / BWD_DATA: the thread always gathers the same pixel column of B (THREADS % BN == 0) and the
    // same k column of A (THREADS % BK == 0).
    const int b_col = tid % BN;
    const int b_row0 = THREADS == BN ? 0 : tid / BN;
    // First A row of the thread (FWD / BWD_DATA), first A row and B column (BWD_WEIGHT).
    const int a_row0 = tid / BK;
    // Bit s: table row s (tap s % KK) reads inside the image at the thread's pixel (the pixel's tap
    // mask repeated every KK bits); 0 past the last pixel.
    unsigned px_rows = 0;
    unsigned px_pos = 0;  // oh * w + ow
    const float* px_img = bsrc;
    // BWD_WEIGHT: the thread always gathers the same k (= pixel) row of A and B, and walks it forward.
    const int k_lane = tid % BK;
    int wp_img = 0, wp_oh = 0, wp_ow = 0;
    if (MODE != MODE_BWD_WEIGHT) {
        const int p = n0 + b_col;
        if (p < P) {
            const int img = p / hw;
            const int rem = p - img * hw;
            const int oh = rem / w;
            const int ow = rem - oh * w;
            const unsigned m = tap_mask(oh, ow);
#pragma unroll
            for (int j = 0; j * KK < KK + BK; ++j) px_rows |= m << (j * KK);
            px_pos = (unsigned)rem;
            px_img = bsrc + (long long)img * c_src * hw;
        }
    } else {
        const int p = k_begin + k_lane;
        wp_img = p / hw;
        const int rem = p - wp_img * hw;
        wp_oh = rem / w;
        wp_ow = rem - wp_oh * w;
    }
    __syncthreads();  // the tables are complete

    // Issues the gathers of k-tile `kt` into buffer `buf`. Called for kt = 0, 1, 2, ... in order (the
    // backward-weight pixel walk relies on it).
    auto stage = [&](int kt, int buf) {
        const int k0 = k_begin + kt * BK;
        const int k_left = k_end - k0;  // rows bk >= k_left are past the end (last tile only)
        // All offsets and predicates first, then the copies back to back: each copy is an asm statement
        // with a memory clobber, so a table read between two copies would stay there (and sm_90 pads
        // each shared load that precedes an LDGSTS with three dead instructions).
        unsigned a_off[A_PER], b_off[B_PER];
        bool a_ok[A_PER], b_ok[B_PER];
        const float* a_ptr = asrc;
        const float* b_ptr = bsrc;
        if (MODE != MODE_BWD_WEIGHT) {
            const int c0 = k0 / KK;
            const int r0 = k0 - c0 * KK;
            const int ak = tid % BK;
            const bool ak_ok = ak < k_left;
            unsigned a_base;
            if (MODE == MODE_FWD) {
                a_base = (unsigned)k0 + ak;  // w[m][k]: row m at m * K
            } else {
                a_base = (unsigned)c0 * c_dst * KK + tab_a[r0 + ak];  // w[co][m][r]: row m at m * KK
            }
            const unsigned a_row = MODE == MODE_FWD ? (unsigned)k_end : (unsigned)KK;
#pragma unroll
            for (int i = 0; i < A_PER; ++i) {
                const int m = m0 + a_row0 + i * (THREADS / BK);
                a_ok[i] = ak_ok && m < M;
                a_off[i] = a_ok[i] ? a_base + (unsigned)m * a_row : 0u;
            }
            // Bit i: the thread's row b_row0 + i·(THREADS / BN) of this tile is valid for its pixel
            // (inside the image, and k < k_end).
            const unsigned k_bits = k_left >= 32 ? ~0u : (1u << k_left) - 1u;
            const unsigned rows = ((px_rows >> r0) & k_bits) >> b_row0;
            const unsigned chan = (unsigned)c0 * hw + px_pos;
            const TapEntry* t = &tab[r0 + b_row0];
#pragma unroll
            for (int i = 0; i < B_PER; ++i) {
                b_ok[i] = rows >> (i * (THREADS / BN)) & 1u;
                b_off[i] = b_ok[i] ? chan + t[i * (THREADS / BN)].off : 0u;
            }
            b_ptr = px_img;
#pragma unroll
            for (int i = 0; i < A_PER; ++i)
                cp_async4(&As[buf][ak][a_row0 + i * (THREADS / BK)], a_ptr + a_off[i], a_ok[i]);
#pragma unroll
            for (int i = 0; i < B_PER; ++i)
                cp_async4(&Bs[buf][b_row0 + i * (THREADS / BN)][b_col], b_ptr + b_off[i], b_ok[i]);
        } else {
            // Pixel of this thread's k row in this tile: the walk stands at k0 + k_lane.
            const bool p_ok = k_lane < k_left;
            const int pos = wp_oh * w + wp_ow;
            if (p_ok) {
                a_ptr = asrc + (long long)wp_img * c_dst * hw + pos;
                b_ptr = bsrc + (long long)wp_img * c_src * hw + pos;
            }
            const unsigned mask = p_ok ? tap_mask(wp_oh, wp_ow) : 0u;
#pragma unroll
            for (int i = 0; i < A_PER; ++i) {
                const int m = m0 + a_row0 + i * (THREADS / BK);
                a_ok[i] = p_ok && m < M;
                a_off[i] = a_ok[i] ? (unsigned)m * hw : 0u;
            }
#pragma unroll
            for (int i = 0; i < B_PER; ++i) {
                const TapEntry e = tab[a_row0 + i * (THREADS / BK)];
                b_ok[i] = mask >> e.tap & 1u;
                b_off[i] = b_ok[i] ? e.off : 0u;  // may be "negative" (a shift up or left): see below
            }
#pragma unroll
            for (int i = 0; i < A_PER; ++i)
                cp_async4(&As[buf][k_lane][a_row0 + i * (THREADS / BK)], a_ptr + a_off[i], a_ok[i]);
            // b_off holds c·hw + the tap's shift, which is negative for c = 0 and an upward or leftward
            // tap; as an int it is exact, and b_ptr + it stays inside x whenever b_ok.
#pragma unroll
            for (int i = 0; i < B_PER; ++i)
                cp_async4(&Bs[buf][k_lane][a_row0 + i * (THREADS / BK)], b_ptr + (int)b_off[i], b_ok[i]);
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
    // A warp whose rows are all >= M or columns all >= N (e.g. in the last column tile of dec0.conv2's
    // 144-column weight gradient, or of the head's 16 columns) skips the arithmetic: C row m needs
    // only A row m and C column n only B column n, so nothing it would compute is written out. The
    // branch is warp-uniform. (Skipping those rows' and columns' copies as well cost more branches
    // in every tile than it saved in the few wasted ones.)
    const bool warp_live = m0 + wm0 < M && n0 + wn0 < Ngemm;

    // Pipeline STAGES tiles deep: tiles t+1 .. t+STAGES-1 are in flight while tile t is multiplied.
    // One copy group per tile (empty past the end, so that the group count stays uniform).
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < k_tiles) stage(s, s);
        cp_async_commit();
    }
    for (int t = 0; t < k_tiles; ++t) {
        const int buf = t % STAGES;
        // Groups 0..t have landed (this thread's); the barrier makes every thread's copies visible and
        // also says that all threads are done with tile t-1, whose buffer the next stage() overwrites.
        cp_async_wait_pending<STAGES - 2>();
        __syncthreads();
        if (t + STAGES - 1 < k_tiles) stage(t + STAGES - 1, (t + STAGES - 1) % STAGES);
        cp_async_commit();
        if (!warp_live) {
            // Nothing of this warp's tile is written out (see the copies above).
        } else if (TF32) {
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
    }

    // ---- epilogue --------------------------------------------------------------------------------
    // Writes C[m][n] (block-relative row/col) to its place in the output. The image and position of
    // pixel n0 + bn are found from those of n0 (one division per thread, not one per element).
    const int img0 = MODE == MODE_BWD_WEIGHT ? 0 : n0 / hw;
    const int rem0 = n0 - img0 * hw;
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
            int img = img0;
            int rem = rem0 + bn;
            while (rem >= hw) {  // at most once when an image has BN pixels or more
                rem -= hw;
                ++img;
            }
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
// plain name. Tile shapes (BM, BN, BK, WM, WN, TM, TN, STAGES, MIN_BLOCKS): 256 threads for the 128-row
// tile, 128 for the others; see kernels/src/cuda/conv.rs for which shape serves which layer. MIN_BLOCKS
// is __launch_bounds__'s "resident blocks per SM" hint, which caps the registers per thread.
#define MF_CONV_ENTRY(NAME, BM, BN, BK, WM, WN, TM, TN, STAGES, MIN_BLOCKS, KS, MODE, TF32)            \
    extern "C" __global__ void __launch_bounds__((BM / WM) * (BN / WN) * 32, MIN_BLOCKS)                \
        NAME(const float* MF_RESTRICT asrc, const float* MF_RESTRICT bsrc,                              \
             const float* MF_RESTRICT bias, float* MF_RESTRICT out, int n_img, int c_src, int c_dst,    \
             int h, int w, int relu, int k_chunk) {                                                     \
        conv_gemm<BM, BN, BK, WM, WN, TM, TN, KS, MODE, TF32, STAGES>(asrc, bsrc, bias, out, n_img,     \
                                                                      c_src, c_dst, h, w, relu,         \
                                                                      k_chunk);                         \
    }

// 3x3 convolutions get every tile height; 1x1 convolutions (the segmentation head: 16 -> k classes)
// only the two small ones, which keeps NVRTC's compile time down. Static shared memory is capped at
// 48 KiB, which leaves the 128-row tile two stages (35 KiB) and the others three (40, 34, 31 KiB).
// MIN_BLOCKS caps the two big tiles at 128 registers, so that 2 (128-row) or 4 (64-row) blocks fit
// per SM instead of 1 or 3 (the 64-row weight gradient then spills 16 bytes, read from L1).
#define MF_CONV_TILES_K3(MODE_NAME, MODE, PREC_NAME, TF32)                                              \
    MF_CONV_ENTRY(conv_##MODE_NAME##_t128x128_k3_##PREC_NAME, 128, 128, 16, 64, 32, 8, 8, 2, 2, 3,     \
                  MODE, TF32)                                                                           \
    MF_CONV_ENTRY(conv_##MODE_NAME##_t64x128_k3_##PREC_NAME, 64, 128, 16, 32, 64, 8, 8, 3, 4, 3, MODE, \
                  TF32)                                                                                 \
    MF_CONV_ENTRY(conv_##MODE_NAME##_t32x128_k3_##PREC_NAME, 32, 128, 16, 32, 32, 8, 4, 3, 1, 3, MODE, \
                  TF32)                                                                                 \
    MF_CONV_ENTRY(conv_##MODE_NAME##_t16x128_k3_##PREC_NAME, 16, 128, 16, 16, 32, 4, 4, 3, 1, 3, MODE, \
                  TF32)

#define MF_CONV_TILES_K1(MODE_NAME, MODE, PREC_NAME, TF32)                                              \
    MF_CONV_ENTRY(conv_##MODE_NAME##_t64x128_k1_##PREC_NAME, 64, 128, 16, 32, 64, 8, 8, 3, 4, 1, MODE, \
                  TF32)                                                                                 \
    MF_CONV_ENTRY(conv_##MODE_NAME##_t16x128_k1_##PREC_NAME, 16, 128, 16, 16, 32, 4, 4, 3, 1, 1, MODE, \
                  TF32)

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

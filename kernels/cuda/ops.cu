// ops.cu: every non-convolution op of the Backend trait, plus the reductions the convolution's
// backward pass needs. Needs common.cu in front.
//
// Map:
//   fill_f32, axpy_f32, relu_backward_f32          elementwise, grid-stride loops
//   maxpool2_fwd, maxpool2_bwd                     one thread per 2x2 window
//   upcat_fwd, upcat_bwd_low, upcat_bwd_skip       nearest x2 upsampling fused with the channel concat
//   channel_affine                                 y = x*scale[c] + shift[c]
//   channel_partial_sums, reduce_rows              deterministic two-level per-channel sums: bias
//                                                  gradient, channel statistics (two-pass mean / var)
//   splitk_reduce                                  sums backward-weight split-K slabs in a fixed order
//   ce_partial, ce_grad                            softmax cross-entropy (class weights, ignore label)
//   dice_partial, dice_grad                        soft Dice over the batch
//   sgd_step, adamw_step                           fused optimiser steps
//
// Reductions never use atomics: each block writes its partial sums to its own slot, a second kernel
// adds the slots in a fixed order, so a loss or a gradient is bit-for-bit the same on every run.
// All reduction kernels run with 256 threads per block (REDUCE_THREADS; the host uses the same).

#define REDUCE_THREADS 256
#define IGNORE_LABEL 255

extern "C" __global__ void fill_f32(float* MF_RESTRICT y, int n, float v) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) y[i] = v;
}

extern "C" __global__ void axpy_f32(const float* MF_RESTRICT x, float* MF_RESTRICT y, int n, float a) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x)
        y[i] = fmaf(a, x[i], y[i]);
}

extern "C" __global__ void relu_backward_f32(const float* MF_RESTRICT y, float* MF_RESTRICT dy, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x)
        if (!(y[i] > 0.0f)) dy[i] = 0.0f;
}

// x: [planes][h][w] (planes = n*c), y: [planes][h/2][w/2]. The first maximum in row-major order wins,
// as in the backward pass (a NaN never compares greater, so it is skipped unless all four are NaN).
extern "C" __global__ void maxpool2_fwd(const float* MF_RESTRICT x, float* MF_RESTRICT y, int planes, int h,
                                        int w) {
    const int oh = h / 2, ow = w / 2;
    const int total = planes * oh * ow;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += blockDim.x * gridDim.x) {
        const int pl = i / (oh * ow);
        const int r = i - pl * oh * ow;
        const int yy = r / ow, xx = r - yy * ow;
        const float* src = x + ((long long)pl * h + 2 * yy) * w + 2 * xx;
        float best = src[0];
        if (src[1] > best) best = src[1];
        if (src[w] > best) best = src[w];
        if (src[w + 1] > best) best = src[w + 1];
        y[i] = best;
    }
}

extern "C" __global__ void maxpool2_bwd(const float* MF_RESTRICT x, const float* MF_RESTRICT dy,
                                        float* MF_RESTRICT dx, int planes, int h, int w) {
    const int oh = h / 2, ow = w / 2;
    const int total = planes * oh * ow;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += blockDim.x * gridDim.x) {
        const int pl = i / (oh * ow);
        const int r = i - pl * oh * ow;
        const int yy = r / ow, xx = r - yy * ow;
        const long long base = ((long long)pl * h + 2 * yy) * w + 2 * xx;
        const float v[4] = {x[base], x[base + 1], x[base + w], x[base + w + 1]};
        int arg = 0;
        for (int q = 1; q < 4; ++q)
            if (v[q] > v[arg]) arg = q;
        const float g = dy[i];
        dx[base] = arg == 0 ? g : 0.0f;
        dx[base + 1] = arg == 1 ? g : 0.0f;
        dx[base + w] = arg == 2 ? g : 0.0f;
        dx[base + w + 1] = arg == 3 ? g : 0.0f;
    }
}

// y[n][c_low + c_skip][2h][2w] = cat(nearest_up(low[n][c_low][h][w]), skip[n][c_skip][2h][2w]).
extern "C" __global__ void upcat_fwd(const float* MF_RESTRICT low, const float* MF_RESTRICT skip,
                                     float* MF_RESTRICT y, int n, int c_low, int c_skip, int h, int w) {
    const int H = 2 * h, W = 2 * w, HW = H * W;
    const int c_all = c_low + c_skip;
    const long long total = (long long)n * c_all * HW;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)blockDim.x * gridDim.x) {
        const long long plane = i / HW;
        const int r = (int)(i - plane * HW);
        const int img = (int)(plane / c_all);
        const int c = (int)(plane - (long long)img * c_all);
        float v;
        if (c < c_low) {
            const int yy = r / W, xx = r - yy * W;
            v = low[(((long long)img * c_low + c) * h + yy / 2) * w + xx / 2];
        } else {
            v = skip[((long long)img * c_skip + (c - c_low)) * HW + r];
        }
        y[i] = v;
    }
}

// dlow[n][c][y][x] = sum of the 2x2 block of dy's channel c (c < c_low), summed row by row.
extern "C" __global__ void upcat_bwd_low(const float* MF_RESTRICT dy, float* MF_RESTRICT dlow, int n,
                                         int c_low, int c_skip, int h, int w) {
    const int W = 2 * w;
    const int c_all = c_low + c_skip;
    const long long total = (long long)n * c_low * h * w;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)blockDim.x * gridDim.x) {
        const long long plane = i / (h * w);
        const int r = (int)(i - plane * h * w);
        const int img = (int)(plane / c_low);
        const int c = (int)(plane - (long long)img * c_low);
        const int yy = r / w, xx = r - yy * w;
        const float* src = dy + (((long long)img * c_all + c) * (2 * h) + 2 * yy) * W + 2 * xx;
        dlow[i] = (src[0] + src[1]) + (src[W] + src[W + 1]);
    }
}

extern "C" __global__ void upcat_bwd_skip(const float* MF_RESTRICT dy, float* MF_RESTRICT dskip, int n,
                                          int c_low, int c_skip, int h, int w) {
    const int HW = 4 * h * w;
    const int c_all = c_low + c_skip;
    const long long total = (long long)n * c_skip * HW;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)blockDim.x * gridDim.x) {
        const long long plane = i / HW;
        const int r = (int)(i - plane * HW);
        const int img = (int)(plane / c_skip);
        const int c = (int)(plane - (long long)img * c_skip);
        dskip[i] = dy[((long long)img * c_all + c_low + c) * HW + r];
    }
}

extern "C" __global__ void channel_affine(const float* MF_RESTRICT x, float* MF_RESTRICT y,
                                          const float* MF_RESTRICT scale, const float* MF_RESTRICT shift,
                                          int n, int c, int hw) {
    const long long total = (long long)n * c * hw;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)blockDim.x * gridDim.x) {
        const int ch = (int)((i / hw) % c);
        y[i] = fmaf(x[i], scale[ch], shift[ch]);
    }
}

// Block (chunk, ch) sums channel ch of x[n][c][hw] over its share of the n*hw positions and writes
// partial[ch * chunks + chunk]. With `centered`, it sums (x - center[ch])^2 instead: the second pass
// of a two-pass variance, which does not lose precision when the mean is large.
extern "C" __global__ void __launch_bounds__(REDUCE_THREADS)
    channel_partial_sums(const float* MF_RESTRICT x, int n, int c, int hw, const float* MF_RESTRICT center,
                         int centered, float* MF_RESTRICT partial) {
    __shared__ float sh[REDUCE_THREADS];
    const int chunks = gridDim.x;
    const int ch = blockIdx.y;
    const long long len = (long long)n * hw;
    const long long per = (len + chunks - 1) / chunks;
    const long long begin = per * blockIdx.x;
    const long long end = begin + per < len ? begin + per : len;
    const float mu = centered ? center[ch] : 0.0f;
    float acc = 0.0f;
    if (begin < end) {
        // Walk (img, pos) forward instead of dividing for every element.
        long long e = begin + threadIdx.x;
        int img = (int)(e / hw);
        int pos = (int)(e - (long long)img * hw);
        for (; e < end; e += REDUCE_THREADS) {
            const float v = x[((long long)img * c + ch) * hw + pos];
            if (centered) {
                const float d = v - mu;
                acc = fmaf(d, d, acc);
            } else {
                acc += v;
            }
            pos += REDUCE_THREADS;
            while (pos >= hw) {
                pos -= hw;
                ++img;
            }
        }
    }
    const float s = block_sum<REDUCE_THREADS>(acc, sh);
    if (threadIdx.x == 0) partial[ch * chunks + blockIdx.x] = s;
}

// out[row] = sum over col of partial[row * cols + col], in a fixed order; one block per row.
extern "C" __global__ void __launch_bounds__(REDUCE_THREADS)
    reduce_rows(const float* MF_RESTRICT partial, int cols, float* MF_RESTRICT out) {
    __shared__ float sh[REDUCE_THREADS];
    const float* row = partial + (long long)blockIdx.x * cols;
    float acc = 0.0f;
    for (int i = threadIdx.x; i < cols; i += REDUCE_THREADS) acc += row[i];
    const float s = block_sum<REDUCE_THREADS>(acc, sh);
    if (threadIdx.x == 0) out[blockIdx.x] = s;
}

// dw[i] = sum over s of ws[s * len + i], s = 0, 1, ... (the split-K slabs of conv_bwd_weight_*).
extern "C" __global__ void splitk_reduce(const float* MF_RESTRICT ws, int splits, int len,
                                         float* MF_RESTRICT dw) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < len; i += blockDim.x * gridDim.x) {
        float acc = 0.0f;
        for (int s = 0; s < splits; ++s) acc += ws[(long long)s * len + i];
        dw[i] = acc;
    }
}

// ---- softmax cross-entropy -----------------------------------------------------------------------
// Per pixel of logits[n][k][hw] with label l (not IGNORE_LABEL): loss = wt * (logsumexp(z) - z_l), with
// wt = class_weights[l] (or 1). Block b writes partial[q * blocks + b] for q = 0: sum of losses,
// 1: sum of weights, 2: number of labels >= k (a bad label; the host turns it into an error).
__device__ __forceinline__ float mf_logsumexp(const float* z, int k, int hw, float* zmax_out) {
    float zmax = -MF_FLT_MAX;
    for (int j = 0; j < k; ++j) zmax = fmaxf(zmax, z[(long long)j * hw]);
    float s = 0.0f;
    for (int j = 0; j < k; ++j) s += expf(z[(long long)j * hw] - zmax);
    *zmax_out = zmax;
    return zmax + logf(s);
}

extern "C" __global__ void __launch_bounds__(REDUCE_THREADS)
    ce_partial(const float* MF_RESTRICT logits, const unsigned char* MF_RESTRICT labels,
               const float* MF_RESTRICT class_weights, int weighted, int n, int k, int hw,
               float* MF_RESTRICT partial) {
    __shared__ float sh[REDUCE_THREADS];
    const int blocks = gridDim.x;
    const long long P = (long long)n * hw;
    float loss = 0.0f, wsum = 0.0f, bad = 0.0f;
    for (long long p = blockIdx.x * (long long)REDUCE_THREADS + threadIdx.x; p < P;
         p += (long long)REDUCE_THREADS * blocks) {
        const int l = labels[p];
        if (l == IGNORE_LABEL) continue;
        if (l >= k) {
            bad += 1.0f;
            continue;
        }
        const long long img = p / hw;
        const long long pos = p - img * hw;
        const float* z = logits + img * k * hw + pos;
        float zmax;
        const float lse = mf_logsumexp(z, k, hw, &zmax);
        const float wt = weighted ? class_weights[l] : 1.0f;
        loss += wt * (lse - z[(long long)l * hw]);
        wsum += wt;
    }
    const float a = block_sum<REDUCE_THREADS>(loss, sh);
    const float b = block_sum<REDUCE_THREADS>(wsum, sh);
    const float c = block_sum<REDUCE_THREADS>(bad, sh);
    if (threadIdx.x == 0) {
        partial[blockIdx.x] = a;
        partial[blocks + blockIdx.x] = b;
        partial[2 * blocks + blockIdx.x] = c;
    }
}

// dlogits = wt * (softmax(z) - onehot(l)) / sum of weights; 0 at ignored (or bad) pixels and
// everywhere when no pixel is labelled. totals = reduce_rows of ce_partial's slots.
extern "C" __global__ void ce_grad(const float* MF_RESTRICT logits, const unsigned char* MF_RESTRICT labels,
                                   const float* MF_RESTRICT class_weights, int weighted,
                                   const float* MF_RESTRICT totals, int n, int k, int hw,
                                   float* MF_RESTRICT dlogits) {
    const long long P = (long long)n * hw;
    const float inv = totals[1] > 0.0f ? 1.0f / totals[1] : 0.0f;
    for (long long p = blockIdx.x * (long long)blockDim.x + threadIdx.x; p < P;
         p += (long long)blockDim.x * gridDim.x) {
        const long long img = p / hw;
        const long long pos = p - img * hw;
        const float* z = logits + img * k * hw + pos;
        float* dz = dlogits + img * k * hw + pos;
        const int l = labels[p];
        if (l == IGNORE_LABEL || l >= k) {
            for (int j = 0; j < k; ++j) dz[(long long)j * hw] = 0.0f;
            continue;
        }
        float zmax;
        const float lse = mf_logsumexp(z, k, hw, &zmax);
        const float scale = (weighted ? class_weights[l] : 1.0f) * inv;
        for (int j = 0; j < k; ++j) {
            const float pj = expf(z[(long long)j * hw] - lse);
            dz[(long long)j * hw] = scale * (pj - (j == l ? 1.0f : 0.0f));
        }
    }
}

// ---- soft Dice -------------------------------------------------------------------------------------
// Block (b, cls) sums, over its share of the labelled pixels, I = p_cls * t_cls, S = p_cls and
// T = t_cls (t = onehot(label)), and writes partial[(cls * 4 + q) * blocks + b], q = 0: I, 1: S, 2: T,
// 3: bad labels.
extern "C" __global__ void __launch_bounds__(REDUCE_THREADS)
    dice_partial(const float* MF_RESTRICT logits, const unsigned char* MF_RESTRICT labels, int n, int k,
                 int hw, float* MF_RESTRICT partial) {
    __shared__ float sh[REDUCE_THREADS];
    const int blocks = gridDim.x;
    const int cls = blockIdx.y;
    const long long P = (long long)n * hw;
    float si = 0.0f, ss = 0.0f, st = 0.0f, bad = 0.0f;
    for (long long p = blockIdx.x * (long long)REDUCE_THREADS + threadIdx.x; p < P;
         p += (long long)REDUCE_THREADS * blocks) {
        const int l = labels[p];
        if (l == IGNORE_LABEL) continue;
        if (l >= k) {
            bad += 1.0f;
            continue;
        }
        const long long img = p / hw;
        const long long pos = p - img * hw;
        const float* z = logits + img * k * hw + pos;
        float zmax;
        const float lse = mf_logsumexp(z, k, hw, &zmax);
        const float pc = expf(z[(long long)cls * hw] - lse);
        const float t = l == cls ? 1.0f : 0.0f;
        si += pc * t;
        ss += pc;
        st += t;
    }
    const float a = block_sum<REDUCE_THREADS>(si, sh);
    const float b = block_sum<REDUCE_THREADS>(ss, sh);
    const float c = block_sum<REDUCE_THREADS>(st, sh);
    const float d = block_sum<REDUCE_THREADS>(bad, sh);
    if (threadIdx.x == 0) {
        partial[(cls * 4 + 0) * blocks + blockIdx.x] = a;
        partial[(cls * 4 + 1) * blocks + blockIdx.x] = b;
        partial[(cls * 4 + 2) * blocks + blockIdx.x] = c;
        partial[(cls * 4 + 3) * blocks + blockIdx.x] = d;
    }
}

// Loss L = 1 - (1/k) sum_c (2 I_c + eps) / (S_c + T_c + eps). With num_c = 2 I_c + eps and
// den_c = S_c + T_c + eps: dL/dp_c = -(1/k) (2 t_c den_c - num_c) / den_c^2 =: g_c, and through the
// softmax dL/dz_j = p_j (g_j - sum_c p_c g_c). Adds weight * dL/dz to dlogits at labelled pixels.
// sums = reduce_rows of dice_partial's slots: sums[cls * 4 + q].
extern "C" __global__ void dice_grad(const float* MF_RESTRICT logits, const unsigned char* MF_RESTRICT labels,
                                     const float* MF_RESTRICT sums, int n, int k, int hw, float weight,
                                     float eps, float* MF_RESTRICT dlogits) {
    const long long P = (long long)n * hw;
    const float inv_k = 1.0f / (float)k;
    for (long long p = blockIdx.x * (long long)blockDim.x + threadIdx.x; p < P;
         p += (long long)blockDim.x * gridDim.x) {
        const int l = labels[p];
        if (l == IGNORE_LABEL || l >= k) continue;
        const long long img = p / hw;
        const long long pos = p - img * hw;
        const float* z = logits + img * k * hw + pos;
        float* dz = dlogits + img * k * hw + pos;
        float zmax;
        const float lse = mf_logsumexp(z, k, hw, &zmax);
        // g_c for class c at this pixel.
        float dot = 0.0f;
        for (int c = 0; c < k; ++c) {
            const float num = 2.0f * sums[c * 4 + 0] + eps;
            const float den = sums[c * 4 + 1] + sums[c * 4 + 2] + eps;
            const float t = c == l ? 1.0f : 0.0f;
            const float g = -inv_k * (2.0f * t * den - num) / (den * den);
            dot += expf(z[(long long)c * hw] - lse) * g;
        }
        for (int j = 0; j < k; ++j) {
            const float num = 2.0f * sums[j * 4 + 0] + eps;
            const float den = sums[j * 4 + 1] + sums[j * 4 + 2] + eps;
            const float t = j == l ? 1.0f : 0.0f;
            const float g = -inv_k * (2.0f * t * den - num) / (den * den);
            const float pj = expf(z[(long long)j * hw] - lse);
            dz[(long long)j * hw] += weight * pj * (g - dot);
        }
    }
}

// ---- optimisers ------------------------------------------------------------------------------------
// PyTorch SGD (dampening 0, not Nesterov): v = momentum * v + (g + wd * p); p -= lr * v.
extern "C" __global__ void sgd_step(float* MF_RESTRICT p, const float* MF_RESTRICT g, float* MF_RESTRICT v,
                                    int n, float lr, float momentum, float wd) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
        const float gi = fmaf(wd, p[i], g[i]);
        const float vi = fmaf(momentum, v[i], gi);
        v[i] = vi;
        p[i] = fmaf(-lr, vi, p[i]);
    }
}

// AdamW (decoupled decay): p -= lr * wd * p; m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
// p -= lr * (m / bc1) / (sqrt(v / bc2) + eps), with bc1 = 1 - b1^t and bc2 = 1 - b2^t from the host.
extern "C" __global__ void adamw_step(float* MF_RESTRICT p, const float* MF_RESTRICT g, float* MF_RESTRICT m,
                                      float* MF_RESTRICT v, int n, float lr, float b1, float b2, float eps,
                                      float wd, float bc1, float bc2) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
        float pi = p[i];
        pi -= lr * wd * pi;
        const float gi = g[i];
        const float mi = fmaf(b1, m[i], (1.0f - b1) * gi);
        const float vi = fmaf(b2, v[i], (1.0f - b2) * gi * gi);
        m[i] = mi;
        v[i] = vi;
        pi -= lr * (mi / bc1) / (sqrtf(vi / bc2) + eps);
        p[i] = pi;
    }
}

// common.cu: helpers shared by every microfed kernel source. The host prepends this file to each
// kernel source before handing it to NVRTC, so nothing here may include a CUDA header: NVRTC provides
// threadIdx, __syncthreads, expf, ... as builtins. The same text also compiles as plain C++ under
// MICROFED_EMU (kernels/cuda/emu/emu.hpp), where a CPU harness runs the kernels thread by thread to
// check their indexing without a GPU.
//
// Map:
//   mf_min / mf_max            integer helpers (no <algorithm> on the device)
//   block_sum<T>               deterministic tree reduction over a block (fixed order, no atomics)
//   to_tf32 / mma_tf32_16x8x8  TF32 tensor-core helpers (sm_80+): cvt.rna + mma.sync m16n8k8
//   cp_async4                  4-byte asynchronous global->shared copy with zero fill (sm_80+),
//                              a plain load on older chips
//   cp_async_commit / _wait_pending<N>  copy groups, for a pipeline several tiles deep

#ifndef MICROFED_EMU
#define MF_RESTRICT __restrict__
#else
#define MF_RESTRICT
#endif

// Largest finite float: the start value of a running maximum (no INFINITY macro without headers).
#define MF_FLT_MAX 3.402823466e+38f

__device__ __forceinline__ int mf_min(int a, int b) { return a < b ? a : b; }
__device__ __forceinline__ int mf_max(int a, int b) { return a > b ? a : b; }

// Tree reduction over a block of T threads (T a power of two). Every thread gets the sum. The order of
// the additions depends only on T, never on scheduling, so results are bit-for-bit reproducible.
template <int T>
__device__ __forceinline__ float block_sum(float v, float* sh) {
    const int tid = threadIdx.x;
    sh[tid] = v;
    __syncthreads();
#pragma unroll
    for (int s = T / 2; s > 0; s >>= 1) {
        if (tid < s) sh[tid] += sh[tid + s];
        __syncthreads();
    }
    const float r = sh[0];
    __syncthreads();
    return r;
}

// ---- TF32 tensor cores --------------------------------------------------------------------------
// Rounds an fp32 value to TF32 (10-bit mantissa, round to nearest, ties away from zero) and returns the
// bit pattern that mma.sync expects in a .b32 register.
__device__ __forceinline__ unsigned to_tf32(float x) {
#if defined(MICROFED_EMU)
    return emu_to_tf32(x);
#elif __CUDA_ARCH__ >= 800
    unsigned r;
    asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
    return r;
#else
    return __float_as_uint(x);
#endif
}

// d = a * b + d for one warp: A 16x8 (row), B 8x8 (col), fp32 accumulators. Fragment layout (PTX ISA,
// "Matrix fragments for mma.m16n8k8" with .tf32), gid = lane / 4, tig = lane % 4:
//   a0 (gid, tig)  a1 (gid + 8, tig)  a2 (gid, tig + 4)  a3 (gid + 8, tig + 4)       [row, k]
//   b0 (tig, gid)  b1 (tig + 4, gid)                                                 [k, col]
//   d0 (gid, 2 tig)  d1 (gid, 2 tig + 1)  d2 (gid + 8, 2 tig)  d3 (gid + 8, 2 tig + 1) [row, col]
// Only called from kernels that exist on sm_80 and newer (see conv.cu).
__device__ __forceinline__ void mma_tf32_16x8x8(float* d, const unsigned* a, const unsigned* b) {
#if defined(MICROFED_EMU)
    emu_mma_tf32(d, a, b);
#elif __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    (void)d;
    (void)a;
    (void)b;
#endif
}

// ---- asynchronous copies ------------------------------------------------------------------------
// Copies one float from global to shared memory, or writes 0 when `valid` is false (the "zero fill"
// form: src-size 0 reads nothing, so `src` only has to be some valid address). On sm_80+ the copy is
// asynchronous and completes with its group (cp_async_commit, cp_async_wait_pending); before that it
// is an ordinary load + store.
__device__ __forceinline__ void cp_async4(float* dst_smem, const float* src, bool valid) {
#if !defined(MICROFED_EMU) && __CUDA_ARCH__ >= 800
    // The compiler's own conversion (not inline cvta), so that it sees that dst_smem is a shared
    // array plus an offset and folds each copy's address into an immediate.
    const unsigned s = (unsigned)__cvta_generic_to_shared(dst_smem);
    const int bytes = valid ? 4 : 0;
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(s), "l"(src), "r"(bytes)
                 : "memory");
#else
    *dst_smem = valid ? *src : 0.0f;
#endif
}

// Closes the group of cp_async4 copies this thread issued since the last commit (a group may be empty).
__device__ __forceinline__ void cp_async_commit() {
#if !defined(MICROFED_EMU) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most N of this thread's committed groups are still in flight (N = 0: all landed). A
// __syncthreads() must follow before other threads read the data. Before sm_80 the copies were
// synchronous, so there is nothing to wait for.
template <int N>
__device__ __forceinline__ void cp_async_wait_pending() {
#if !defined(MICROFED_EMU) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

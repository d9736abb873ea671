// emu.hpp: just enough of the CUDA execution model, in plain C++20, to run microfed's kernels on the CPU
// and check their indexing without a GPU. One block at a time; each of its threads is an std::thread;
// __syncthreads() is an std::barrier; __shared__ arrays are function-local statics (so every thread of
// the running block sees the same array). Warp-wide mma.sync is emulated by exchanging the fragments
// of the 32 lanes of a warp through a per-warp barrier. Slow, and only for small test sizes.
#pragma once
#define MICROFED_EMU 1
#include <barrier>
#include <cmath>
#include <math.h>
#include <cstdint>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;
inline std::barrier<>* emu_block_barrier = nullptr;
inline std::vector<std::barrier<>*> emu_warp_barriers;
// Per-thread fragment slots for the mma emulation: a[4], b[2] as floats, per thread of the block.
inline float emu_frag_a[1024][4];
inline float emu_frag_b[1024][2];

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
#define extern_C_dummy
inline void __syncthreads() { emu_block_barrier->arrive_and_wait(); }
inline float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline unsigned __float_as_uint(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    return u;
}

// cvt.rna.tf32.f32: round to nearest, ties away from zero, keep 10 mantissa bits (low 13 bits zero).
inline unsigned emu_to_tf32(float x) {
    unsigned u = __float_as_uint(x);
    if ((u & 0x7f800000u) == 0x7f800000u) return u;  // inf / nan unchanged
    u += 0x1000u;
    return u & 0xffffe000u;
}

inline void emu_mma_tf32(float* d, const unsigned* a, const unsigned* b) {
    const int tid = threadIdx.x;
    const int warp = tid / 32, lane = tid % 32;
    for (int i = 0; i < 4; ++i) emu_frag_a[tid][i] = __uint_as_float(a[i]);
    for (int i = 0; i < 2; ++i) emu_frag_b[tid][i] = __uint_as_float(b[i]);
    emu_warp_barriers[warp]->arrive_and_wait();
    float A[16][8], B[8][8];
    for (int l = 0; l < 32; ++l) {
        const int g = l / 4, t = l % 4;
        const float* fa = emu_frag_a[warp * 32 + l];
        const float* fb = emu_frag_b[warp * 32 + l];
        A[g][t] = fa[0];
        A[g + 8][t] = fa[1];
        A[g][t + 4] = fa[2];
        A[g + 8][t + 4] = fa[3];
        B[t][g] = fb[0];
        B[t + 4][g] = fb[1];
    }
    emu_warp_barriers[warp]->arrive_and_wait();
    const int g = lane / 4, t = lane % 4;
    const int rows[4] = {g, g, g + 8, g + 8};
    const int cols[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
    for (int i = 0; i < 4; ++i) {
        double s = d[i];
        for (int k = 0; k < 8; ++k) s += (double)A[rows[i]][k] * (double)B[k][cols[i]];
        d[i] = (float)s;
    }
}

// Runs `body` for every thread of every block, blocks one after another.
inline void emu_launch(dim3 grid, dim3 block, const std::function<void()>& body) {
    gridDim = grid;
    blockDim = block;
    const unsigned nthreads = block.x;
    std::barrier<> bar(nthreads);
    emu_block_barrier = &bar;
    std::vector<std::barrier<>*> warps;
    for (unsigned w = 0; w < (nthreads + 31) / 32; ++w) warps.push_back(new std::barrier<>(32));
    emu_warp_barriers = warps;
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                std::vector<std::thread> ts;
                for (unsigned t = 0; t < nthreads; ++t)
                    ts.emplace_back([&, t] {
                        threadIdx = dim3{t, 0, 0};
                        blockIdx = dim3{bx, by, bz};
                        body();
                    });
                for (auto& th : ts) th.join();
            }
    for (auto* w : warps) delete w;
}

// cuda/decode_persistent.cu: the persistent batch-1 decode of Mamba-1 layers (issue 16; option
// cuda_persistent_decode; cpp/op_params.h PersistentLayer / PersistentDecodeParams).
//
// One cooperative launch runs up to kPersistentMaxLayers layers of one decode step; the
// separate kernels' boundaries become grid-wide barriers (cooperative_groups grid.sync), and
// each warp loads its next stage's first weights before it waits (or, with the weight ring, each
// thread keeps its next weight vectors streaming into shared memory through the barriers: see
// Ring), so that the memory system keeps streaming weights while a barrier or a short stage
// resolves. Per layer,
// with r the residual stream (d), batch 1:
//   S1  x = norm(r) (RMSNorm or LayerNorm, every block computes it into shared memory);
//       proj = in_proj · x (+ bias) (2E rows); for n < E, Mamba-1's conv step on proj[n]:
//       xconv[n] = silu(conv_b + Σ_k w[n, k] window) and the window rolled
//   S2  xdbl = x_proj · xconv (R + 2N rows)
//   S3  δ = softplus(dt_proj[e] · xdbl[:R] + dt_bias[e]);
//       h[e, n] <- exp(δ A[e, n]) h[e, n] + δ xconv[e] B[n];
//       y[e] = (Σ_n C[n] h[e, n] + D[e] xconv[e]) silu(z[e])
//   S4  r += out_proj · y (+ bias)
// Each value is computed with the arithmetic of the separate kernel it replaces, in the same
// order (add_norm_kernel's 1024-thread reduction, gemv_kernel's warp per row or
// gemv_rows_kernel's block per row for fewer than kNarrow rows, the conv epilogue of the fused
// projection, mamba1_decode_kernel's lane groups), so the results equal the separate ops' bit
// for bit (tests/test_cuda.py test_persistent_decode_*).
// Grid: one block a multiprocessor (all co-resident: a cooperative launch) of 2 or 4 groups of
//   8 warps; a group stands for one block of the separate kernels (its own shared memory and
//   named barrier), virtual block vb = blockIdx.x * groups + group. Warp-row GEMVs: global warp
//   gw = vb * 8 + warp takes rows gw, gw + all warps, ...; group-row GEMVs: group vb takes rows
//   vb, vb + all groups, ...; the scan: warp gw takes channels in groups of 32 / g lanes
//   (g = min(32, next_pow2(N))), as mamba1_decode_kernel's warps do. Before each barrier a warp
//   loads its next stage's first weights (and the scan's operands) into registers.
// Data written by other blocks in the same launch is read through L2 (__ldcg): L1 is not
// coherent across blocks.
// Preconditions (launch_persistent_decode checks; it returns false instead of launching when
// they fail): every layer Mamba1 with one weight dtype, d and E multiples of the 16-byte vector
// (4 fp32 / 8 fp16 or bf16 values) and 16-byte aligned weights; N <= 256, the same N in one
// launch; 1 <= W <= kConvMaxWidth; max(d, E, R + 2N) floats of shared memory <= 48 KB.
#include <cooperative_groups.h>

#include <algorithm>

#include "common.cuh"
#include "kernels.h"
#include "vec.cuh"

namespace mambart {
namespace cuda {
namespace {

namespace cg = cooperative_groups;

// A block is 1, 2 or 4 groups of 8 warps (256 threads: the separate GEMVs' and the add_norm
// emulation's size); a group is the unit the separate kernels' blocks map to ("virtual block"),
// synchronised by its own named barrier.
constexpr int kPWarps = 8;
constexpr int kPThreads = kPWarps * 32;
constexpr int kPUnroll = 4;          // gemv_kernel's loads in flight per lane
constexpr int64_t kNarrow = 1024;    // gemv_rows_kernel below this many output rows (linear.cu)
constexpr int kNormVirt = 1024 / kPThreads;  // add_norm_kernel runs 1024 threads at decode
constexpr int kMaxDtPerLane = 16;    // dt_proj weights a lane preloads (R <= 16 g)

struct PArgs {
    PersistentLayer layers[kPersistentMaxLayers];
    int n;          // layers in this launch
    int g;          // lanes per scan channel
    int64_t d;
    int64_t xs_stride;  // floats of shared memory a group owns: xs (m), red (32), part (8)
    float eps;
    bool rms;
    bool prefetch;
    bool rows2;       // warp-row GEMVs stream two rows at once
    float* residual;  // (d)
};
static_assert(sizeof(PArgs) <= 4000, "the persistent decode's arguments exceed 4 KB");

// This thread's place: its group (virtual block) and the thread within it.
struct Place {
    int grp;      // group within the block
    int t;        // thread within the group
    int64_t vb;   // virtual block: blockIdx.x * groups + grp
    int64_t nvb;  // virtual blocks in the grid
    int64_t gw;   // global warp: vb * 8 + warp within the group
    int64_t tw;   // warps in the grid
};

__device__ __forceinline__ Place place() {
    Place p;
    const int groups = blockDim.x / kPThreads;
    p.grp = threadIdx.x / kPThreads;
    p.t = threadIdx.x % kPThreads;
    p.vb = int64_t(blockIdx.x) * groups + p.grp;
    p.nvb = int64_t(gridDim.x) * groups;
    p.gw = p.vb * kPWarps + (p.t >> 5);
    p.tw = p.nvb * kPWarps;
    return p;
}

// The group's barrier (named barrier 1 + grp over its 256 threads; 0 is __syncthreads').
__device__ __forceinline__ void group_sync(const Place& P) {
    asm volatile("bar.sync %0, %1;" ::"r"(P.grp + 1), "r"(kPThreads) : "memory");
}

// add_norm_kernel's block_sum over 1024 threads, thread t standing for threads t + 256 j.
__device__ __forceinline__ float sum_as_1024(const Place& P, const float (&s)[kNormVirt],
                                             float* red) {
    const int lane = P.t & 31, warp = P.t >> 5;
    group_sync(P);
#pragma unroll
    for (int j = 0; j < kNormVirt; ++j) {
        const float v = warp_sum(s[j]);
        if (lane == 0) red[warp + kPWarps * j] = v;
    }
    group_sync(P);
    return warp_sum(red[lane]);
}

// xs (d) = the block norm of the residual, add_norm_kernel's arithmetic (its add happened in the
// previous layer's S4, as the separate add_norm does it: r + h).
__device__ void norm_into(const Place& P, const PArgs& a, const PersistentLayer& L, float* xs,
                          float* red) {
    const int t = P.t;
    const int64_t d = a.d;
    const float* r = a.residual;
    constexpr int kStride = kNormVirt * kPThreads;
    float s[kNormVirt];
#pragma unroll
    for (int j = 0; j < kNormVirt; ++j) {
        s[j] = 0.0f;
        for (int64_t k = t + kPThreads * j; k < d; k += kStride) s[j] = add_norm_acc(s[j], __ldcg(r + k), a.rms);
    }
    const float tot = sum_as_1024(P, s, red);
    if (a.rms) {
        const float rstd = rsqrtf(tot / float(d) + a.eps);
        for (int64_t k = t; k < d; k += kPThreads) xs[k] = __ldcg(r + k) * rstd * (L.norm_w ? L.norm_w[k] : 1.0f);
    } else {
        const float mean = tot / float(d);
#pragma unroll
        for (int j = 0; j < kNormVirt; ++j) {
            s[j] = 0.0f;
            for (int64_t k = t + kPThreads * j; k < d; k += kStride) {
                const float c = __ldcg(r + k) - mean;
                s[j] = __fmaf_rn(c, c, s[j]);
            }
        }
        const float ss = sum_as_1024(P, s, red);
        const float rstd = rsqrtf(ss / float(d) + a.eps);
        for (int64_t k = t; k < d; k += kPThreads)
            xs[k] = (__ldcg(r + k) - mean) * rstd * (L.norm_w ? L.norm_w[k] : 1.0f) + (L.norm_b ? L.norm_b[k] : 0.0f);
    }
    group_sync(P);
}

// xs (K) = x, written by other blocks of this launch (through L2).
__device__ __forceinline__ void stage_in(const Place& P, float* xs, const float* x, int64_t K) {
    for (int64_t k = P.t; k < K; k += kPThreads) xs[k] = __ldcg(x + k);
    group_sync(P);
}

// A GEMV stage's first weight loads, issued before the grid barrier that precedes the stage
// (weights do not depend on it): the first row's first kPUnroll vectors of each lane (warp
// rows), or the first vector of each thread (group rows).
struct Pre {
    uint4 raw[kPUnroll];
};

template <typename T>
__device__ __forceinline__ void preload(const Place& P, const void* W, int64_t N, int64_t K,
                                        Pre& pre) {
    constexpr int kE = Vec<T>::kN;
    const int64_t nvec = K / kE;
    const T* w = static_cast<const T*>(W);
    if (N < kNarrow) {
        const uint4* wv = reinterpret_cast<const uint4*>(w + P.vb * K);
        pre.raw[0] = P.vb < N && P.t < nvec ? __ldcs(wv + P.t) : make_uint4(0, 0, 0, 0);
    } else {
        const int lane = P.t & 31;
        const uint4* wv = reinterpret_cast<const uint4*>(w + P.gw * K);
#pragma unroll
        for (int u = 0; u < kPUnroll; ++u) {
            const int64_t v = lane + int64_t(u) * 32;
            pre.raw[u] = P.gw < N && v < nvec ? __ldcs(wv + v) : make_uint4(0, 0, 0, 0);
        }
    }
}

// acc += one 16-byte weight vector · its kE activations, as the separate GEMVs add them.
template <typename T>
__device__ __forceinline__ void acc_vec(float& acc, const uint4& raw, const float* x) {
    constexpr int kE = Vec<T>::kN;
    float wf[kE];
    Vec<T>::unpack(raw, wf);
    const float4* xr = reinterpret_cast<const float4*>(x);
#pragma unroll
    for (int q = 0; q < kE / 4; ++q) {
        const float4 xv = xr[q];
        acc += wf[4 * q] * xv.x + wf[4 * q + 1] * xv.y + wf[4 * q + 2] * xv.z + wf[4 * q + 3] * xv.w;
    }
}

// One output row's dot product by one warp: gemv_kernel's loop for M = 1 (x in shared memory);
// `pre`: the row's first vectors, already loaded.
template <typename T>
__device__ __forceinline__ float dot_warp(const T* w, const float* xs, int64_t K, const Pre* pre) {
    constexpr int kE = Vec<T>::kN;
    const int lane = threadIdx.x & 31;
    const int64_t nvec = K / kE;
    const uint4* wv = reinterpret_cast<const uint4*>(w);
    float acc = 0.0f;
    for (int64_t v0 = lane; v0 < nvec; v0 += 32 * kPUnroll) {
        uint4 raw[kPUnroll];
        if (pre && v0 == lane) {
#pragma unroll
            for (int u = 0; u < kPUnroll; ++u) raw[u] = pre->raw[u];
        } else {
#pragma unroll
            for (int u = 0; u < kPUnroll; ++u) {
                const int64_t v = v0 + int64_t(u) * 32;
                raw[u] = v < nvec ? __ldcs(wv + v) : make_uint4(0, 0, 0, 0);
            }
        }
#pragma unroll
        for (int u = 0; u < kPUnroll; ++u) {
            const int64_t v = v0 + int64_t(u) * 32;
            if (v >= nvec) break;
            acc_vec<T>(acc, raw[u], xs + v * kE);
        }
    }
    return warp_sum(acc);
}

// Two output rows' dot products by one warp, their loads interleaved (twice the bytes in flight
// a lane), each summed exactly as dot_warp sums it; `has_b` uniform over the warp.
template <typename T>
__device__ __forceinline__ void dot_warp2(const T* wa, const T* wb, bool has_b, const float* xs,
                                          int64_t K, const Pre* pre, float& ta, float& tb) {
    constexpr int kE = Vec<T>::kN;
    const int lane = threadIdx.x & 31;
    const int64_t nvec = K / kE;
    const uint4* va = reinterpret_cast<const uint4*>(wa);
    const uint4* vb = reinterpret_cast<const uint4*>(wb);
    float acc_a = 0.0f, acc_b = 0.0f;
    for (int64_t v0 = lane; v0 < nvec; v0 += 32 * kPUnroll) {
        uint4 ra[kPUnroll], rb[kPUnroll];
#pragma unroll
        for (int u = 0; u < kPUnroll; ++u) {
            const int64_t v = v0 + int64_t(u) * 32;
            if (pre && v0 == lane)
                ra[u] = pre->raw[u];
            else
                ra[u] = v < nvec ? __ldcs(va + v) : make_uint4(0, 0, 0, 0);
            rb[u] = has_b && v < nvec ? __ldcs(vb + v) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < kPUnroll; ++u) {
            const int64_t v = v0 + int64_t(u) * 32;
            if (v >= nvec) break;
            acc_vec<T>(acc_a, ra[u], xs + v * kE);
            if (has_b) acc_vec<T>(acc_b, rb[u], xs + v * kE);
        }
    }
    ta = warp_sum(acc_a);
    tb = has_b ? warp_sum(acc_b) : 0.0f;
}

// One output row's dot product by the group: gemv_rows_kernel's loop for M = 1; the total is
// returned to the group's thread 0.
template <typename T>
__device__ __forceinline__ float dot_group(const Place& P, const T* w, const float* xs, int64_t K,
                                           float* part, const Pre* pre) {
    constexpr int kE = Vec<T>::kN;
    const int lane = P.t & 31, warp = P.t >> 5;
    const int64_t nvec = K / kE;
    const uint4* wv = reinterpret_cast<const uint4*>(w);
    float acc = 0.0f;
    for (int64_t v = P.t; v < nvec; v += kPThreads) {
        acc_vec<T>(acc, pre && v == P.t ? pre->raw[0] : __ldcs(wv + v), xs + v * kE);
    }
    const float v = warp_sum(acc);
    group_sync(P);  // part may still be read for the previous row
    if (lane == 0) part[warp] = v;
    group_sync(P);
    float tot = 0.0f;
    if (P.t == 0) {
#pragma unroll
        for (int w2 = 0; w2 < kPWarps; ++w2) tot += part[w2];
    }
    return tot;
}

// y[n] for n < N rows of W (N, K) · xs, stored by store(n, acc): a warp per row from kNarrow
// rows, else a group per row (the separate GEMV's choice); the first row from `pre`.
template <typename T, class Store>
__device__ __forceinline__ void gemv(const Place& P, const void* W, int64_t N, int64_t K,
                                     const float* xs, float* part, const Pre& pre, bool rows2,
                                     Store store) {
    const T* w = static_cast<const T*>(W);
    if (N < kNarrow) {
        for (int64_t n = P.vb; n < N; n += P.nvb) {
            const float t = dot_group<T>(P, w + n * K, xs, K, part, n == P.vb ? &pre : nullptr);
            if (P.t == 0) store(n, t);
        }
    } else if (rows2) {  // rows n and n + tw together
        for (int64_t n = P.gw; n < N; n += 2 * P.tw) {
            const bool has_b = n + P.tw < N;
            float ta, tb;
            dot_warp2<T>(w + n * K, w + (has_b ? n + P.tw : n) * K, has_b, xs, K,
                         n == P.gw ? &pre : nullptr, ta, tb);
            if ((P.t & 31) == 0) {
                store(n, ta);
                if (has_b) store(n + P.tw, tb);
            }
        }
    } else {
        for (int64_t n = P.gw; n < N; n += P.tw) {
            const float t = dot_warp<T>(w + n * K, xs, K, n == P.gw ? &pre : nullptr);
            if ((P.t & 31) == 0) store(n, t);
        }
    }
}

// L2 prefetch of the rows this group (or warp) takes in gemv() above.
template <typename T>
__device__ __forceinline__ void prefetch_rows(const Place& P, const void* W, int64_t N, int64_t K) {
    const T* w = static_cast<const T*>(W);
    const int64_t bytes = K * int64_t(sizeof(T));
    if (N < kNarrow) {
        for (int64_t n = P.vb; n < N; n += P.nvb) prefetch_l2(w + n * K, bytes, P.t, kPThreads);
    } else {
        for (int64_t n = P.gw; n < N; n += P.tw) prefetch_l2(w + n * K, bytes, P.t & 31, 32);
    }
}

// ---- the weight ring (option cuda_persistent_ring; RING = D > 0) ----------------------------
// Every thread owns D 16-byte slots of shared memory (slot s at ring[s * blockDim.x + thread])
// and keeps D cp.async copies of its own future weight vectors in flight, in the order it will
// consume them across stages and layers: per layer in_proj (job 3l), x_proj (3l + 1), out_proj
// (3l + 2); in each, its rows in gemv()'s order and, in each row, its vectors in the order the
// separate GEMVs add them (lane + 32 j for a warp row, t + 256 j for a group row). Weights do
// not depend on the step, so the copies run on through the grid barriers and the short stages
// (S2's tail, S3): the memory system keeps streaming while a dependency resolves. A thread reads
// only slots it filled itself, so cp.async.wait_group (per thread) is the only synchronisation;
// D groups are always pending (an empty group once its stream has ended), so the oldest is
// complete after wait_group D - 1.
__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(s), "l"(src) : "memory");
#else
    *static_cast<uint4*>(dst) = __ldcs(static_cast<const uint4*>(src));
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
#endif
}

template <typename T, int D>
struct Ring {
    uint4* slots;  // this thread's slot 0; slot s at slots[s * blockDim.x]
    int pos;       // the oldest pending slot, refilled as soon as it is read
    int njobs;     // 3 a layer of this launch
    // The next vector to copy: job, row n, vector v of the row; the job's matrix and steps.
    int job;
    int64_t n, v, N, nvec, n0, sn, v0, sv;
    const uint4* w;

    // Position at the first vector of job `k` or later that this thread has (job = njobs: none).
    __device__ void start(const Place& P, const PArgs& a, int k) {
        constexpr int kE = Vec<T>::kN;
        for (job = k; job < njobs; ++job) {
            const PersistentLayer& L = a.layers[job / 3];
            const int s = job % 3;
            const void* W = s == 0 ? L.in_proj : s == 1 ? L.x_proj : L.out_proj;
            N = s == 0 ? 2 * L.E : s == 1 ? L.R + 2 * L.N : a.d;
            nvec = (s == 0 ? a.d : L.E) / kE;
            w = static_cast<const uint4*>(W);
            if (N < kNarrow) {
                n0 = P.vb, sn = P.nvb, v0 = P.t, sv = kPThreads;
            } else {
                n0 = P.gw, sn = P.tw, v0 = P.t & 31, sv = 32;
            }
            n = n0, v = v0;
            if (n < N && v < nvec) return;
        }
    }
    // Copy the next vector into slot `pos` (or nothing once the stream has ended); one group.
    __device__ __forceinline__ void produce(const Place& P, const PArgs& a) {
        if (job < njobs) {
            cp_async16(slots + int64_t(pos) * blockDim.x, w + n * nvec + v);
            v += sv;
            if (v >= nvec) {
                v = v0;
                n += sn;
                if (n >= N) start(P, a, job + 1);
            }
        }
        cp_async_commit();
    }
    __device__ void init(const Place& P, const PArgs& a, uint4* base) {
        slots = base + threadIdx.x;
        pos = 0;
        njobs = 3 * a.n;
        start(P, a, 0);
#pragma unroll 1
        for (int i = 0; i < D; ++i) {
            produce(P, a);
            pos = pos + 1 == D ? 0 : pos + 1;
        }
    }
    // The oldest vector; its slot refilled with the next one.
    __device__ __forceinline__ uint4 take(const Place& P, const PArgs& a) {
        cp_async_wait<D - 1>();
        const uint4 raw = slots[int64_t(pos) * blockDim.x];
        produce(P, a);
        pos = pos + 1 == D ? 0 : pos + 1;
        return raw;
    }
};

// gemv() over the ring: the same rows, order and sums, the weights from the thread's slots.
template <typename T, int D, class Store>
__device__ __forceinline__ void gemv_ring(const Place& P, const PArgs& a, Ring<T, D>& ring,
                                          int64_t N, int64_t K, const float* xs, float* part,
                                          Store store) {
    constexpr int kE = Vec<T>::kN;
    const int64_t nvec = K / kE;
    const int lane = P.t & 31, warp = P.t >> 5;
    if (N < kNarrow) {
        for (int64_t n = P.vb; n < N; n += P.nvb) {
            float acc = 0.0f;
            for (int64_t v = P.t; v < nvec; v += kPThreads) acc_vec<T>(acc, ring.take(P, a), xs + v * kE);
            const float s = warp_sum(acc);
            group_sync(P);  // part may still be read for the previous row
            if (lane == 0) part[warp] = s;
            group_sync(P);
            if (P.t == 0) {
                float tot = 0.0f;
#pragma unroll
                for (int w2 = 0; w2 < kPWarps; ++w2) tot += part[w2];
                store(n, tot);
            }
        }
    } else {
        for (int64_t n = P.gw; n < N; n += P.tw) {
            float acc = 0.0f;
            for (int64_t v = lane; v < nvec; v += 32) acc_vec<T>(acc, ring.take(P, a), xs + v * kE);
            const float t = warp_sum(acc);
            if (lane == 0) store(n, t);
        }
    }
}

// S3's operands that do not depend on this step's earlier stages, loaded before its barrier for
// the warp's first channel group: the lane's dt_proj weights, A, the state, D and dt_bias.
template <int SPL>
struct ScanPre {
    float wdt[kMaxDtPerLane];
    float A[SPL], h[SPL];
    float D, dt_bias;
};

template <typename T, int SPL>
__device__ __forceinline__ void scan_load(const PersistentLayer& L, int g, int64_t e,
                                          ScanPre<SPL>& q) {
    const int j = (threadIdx.x & 31) % g;
    const T* wrow = static_cast<const T*>(L.dt_proj) + e * L.R;
#pragma unroll
    for (int i = 0; i < kMaxDtPerLane; ++i) {
        const int64_t r = j + int64_t(g) * i;
        q.wdt[i] = r < L.R ? to_f32(wrow[r]) : 0.0f;
    }
#pragma unroll
    for (int i = 0; i < SPL; ++i) {
        const int64_t n = j + int64_t(g) * i;
        q.A[i] = n < L.N ? L.A[e * L.N + n] : 0.0f;
        q.h[i] = n < L.N ? L.ssm_state[e * L.N + n] : 0.0f;
    }
    q.D = L.D[e];
    q.dt_bias = L.dt_bias[e];
}

// S3 for the channels of this warp: mamba1_decode_kernel's arithmetic (batch 1); xd = xdbl in
// shared memory; `pre` holds the first channel group's operands.
template <typename T, int SPL>
__device__ __forceinline__ void scan_channels(const Place& P, const PersistentLayer& L, int g,
                                              const float* xd, const ScanPre<SPL>& pre) {
    const int lane = P.t & 31;
    const int j = lane % g, cpw = 32 / g;
    const int64_t N = L.N, R = L.R, E = L.E;
    for (int64_t base = P.gw * cpw; base < E; base += P.tw * cpw) {
        const int64_t e_raw = base + lane / g;
        const bool valid = e_raw < E;
        const int64_t e = valid ? e_raw : E - 1;  // idle lanes still join the shuffles
        ScanPre<SPL> q;
        if (base == P.gw * cpw)
            q = pre;
        else
            scan_load<T, SPL>(L, g, e, q);
        float dt = 0.0f;
#pragma unroll
        for (int i = 0; i < kMaxDtPerLane; ++i)
            if (j + int64_t(g) * i < R) dt += q.wdt[i] * xd[j + g * i];
        for (int o = g >> 1; o > 0; o >>= 1) dt += __shfl_xor_sync(0xffffffffu, dt, o);
        const float delta = softplus_f(dt + q.dt_bias);
        const float u = __ldcg(L.xconv + e);
        const float du = delta * u;
        float acc = 0.0f;
        float hn[SPL];
#pragma unroll
        for (int i = 0; i < SPL; ++i) {
            const int64_t n = j + int64_t(g) * i;
            if (n < N) {
                hn[i] = expf(delta * q.A[i]) * q.h[i] + du * xd[R + n];
                acc += xd[R + N + n] * hn[i];
            }
        }
        for (int o = g >> 1; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
        if (valid) {
            float* state = L.ssm_state + e * N;
#pragma unroll
            for (int i = 0; i < SPL; ++i) {
                const int64_t n = j + int64_t(g) * i;
                if (n < N) state[n] = hn[i];
            }
            if (j == 0) L.y[e] = (acc + q.D * u) * silu_f(__ldcg(L.proj + E + e));
        }
    }
}

template <typename T, int SPL, int kThreads, int RING>
__global__ void __launch_bounds__(kThreads) persistent_decode_kernel(PArgs a) {
    // Shared memory, per group: xs (m) the stage's input, red (32), part (8); then (RING > 0)
    // the weight ring: RING 16-byte slots a thread.
    extern __shared__ float4 smem4[];
    const Place P = place();
    float* xs = reinterpret_cast<float*>(smem4) + P.grp * a.xs_stride;
    float* red = xs + (a.xs_stride - 40);
    float* part = red + 32;
    cg::grid_group grid = cg::this_grid();
    const int64_t d = a.d;
    const int cpw = 32 / a.g;
    constexpr int kRing = RING > 0 ? RING : 1;
    Ring<T, kRing> ring;
    if constexpr (RING > 0)
        ring.init(P, a, reinterpret_cast<uint4*>(reinterpret_cast<float*>(smem4) +
                                                 int64_t(kThreads / kPThreads) * a.xs_stride));
    Pre pre;
    // y[n] for the rows of W (N, K): from the ring, or streamed by gemv() after `pre`.
    auto run_gemv = [&](const void* W, int64_t N, int64_t K, auto store) {
        if constexpr (RING > 0)
            gemv_ring<T, kRing>(P, a, ring, N, K, xs, part, store);
        else
            gemv<T>(P, W, N, K, xs, part, pre, a.rows2, store);
    };
    for (int l = 0; l < a.n; ++l) {
        const PersistentLayer& L = a.layers[l];
        const int64_t E = L.E, X = L.R + 2 * L.N, W = L.W;
        // S1: norm, in_proj, conv step
        if constexpr (RING == 0) preload<T>(P, L.in_proj, 2 * E, d, pre);
        if (l > 0) grid.sync();
        norm_into(P, a, L, xs, red);
        run_gemv(L.in_proj, 2 * E, d, [&](int64_t n, float acc) {
            const float out = acc + (L.in_bias ? L.in_bias[n] : 0.0f);
            L.proj[n] = out;
            if (n < E) {  // the fused projection's conv epilogue (= conv1d_kernel at L = 1)
                float* st = L.conv_state + n * W;
                const float* cw = L.conv_w + n * W;
                float c = L.conv_b ? L.conv_b[n] : 0.0f;
                for (int64_t k = 0; k + 1 < W; ++k) c = conv_acc(c, cw[k], st[k + 1]);
                c = conv_acc(c, cw[W - 1], out);
                L.xconv[n] = silu_f(c);
                for (int64_t k = 0; k + 1 < W; ++k) st[k] = st[k + 1];
                st[W - 1] = out;
            }
        });
        if (RING == 0 && a.prefetch) prefetch_rows<T>(P, L.out_proj, d, E);
        // S2: x_proj
        if constexpr (RING == 0) preload<T>(P, L.x_proj, X, E, pre);
        grid.sync();
        stage_in(P, xs, L.xconv, E);
        run_gemv(L.x_proj, X, E, [&](int64_t n, float acc) { L.xdbl[n] = acc; });
        // S3: dt_proj, scan, gate
        {
            ScanPre<SPL> sp;
            const int64_t e0 = P.gw * cpw + (P.t & 31) / a.g;
            scan_load<T, SPL>(L, a.g, e0 < E ? e0 : E - 1, sp);
            grid.sync();
            stage_in(P, xs, L.xdbl, X);
            scan_channels<T, SPL>(P, L, a.g, xs, sp);
        }
        // S4: out_proj, the residual add
        if constexpr (RING == 0) preload<T>(P, L.out_proj, d, E, pre);
        grid.sync();
        stage_in(P, xs, L.y, E);
        run_gemv(L.out_proj, d, E, [&](int64_t n, float acc) {
            const float v = acc + (L.out_bias ? L.out_bias[n] : 0.0f);
            a.residual[n] = __ldcg(a.residual + n) + v;
        });
        if (RING == 0 && a.prefetch && l + 1 < a.n)
            prefetch_rows<T>(P, a.layers[l + 1].in_proj, 2 * a.layers[l + 1].E, d);
    }
    if constexpr (RING > 0) cp_async_wait<0>();  // only empty groups are left
}

// Shared memory of a block: its groups' xs / red / part, then RING slots a thread.
template <int kThreads, int RING>
size_t block_smem(int64_t xs_stride) {
    return size_t(kThreads / kPThreads) * size_t(xs_stride) * sizeof(float) +
           size_t(RING) * kThreads * sizeof(uint4);
}

int64_t xs_stride_for(int64_t m) { return (m + 3) / 4 * 4 + 40; }

// One block a multiprocessor of 16 warps (512 threads, up to 128 registers a thread) or 32
// warps (1,024 threads, 64 registers: some spill); `warps` >= 32 asks for the wider one.
template <typename T, int SPL, int kThreads, int RING>
void launch_block(const PArgs& a, int64_t m, cudaStream_t s) {
    auto* kernel = persistent_decode_kernel<T, SPL, kThreads, RING>;
    const int sms = device_attr(cudaDevAttrMultiProcessorCount);
    PArgs args = a;
    args.xs_stride = xs_stride_for(m);
    const size_t smem = block_smem<kThreads, RING>(args.xs_stride);
    check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)),
          "cudaFuncSetAttribute (persistent decode shared memory)");
    int fit = 0;
    check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&fit, kernel, kThreads, smem),
          "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
    if (fit < 1) throw Unsupported("launch_persistent_decode: the kernel does not fit a multiprocessor");
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(unsigned(sms));
    cfg.blockDim = dim3(unsigned(kThreads));
    cfg.dynamicSmemBytes = smem;
    cfg.stream = s;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeCooperative;
    attr[0].val.cooperative = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    check(cudaLaunchKernelEx(&cfg, kernel, args), "cudaLaunchKernelEx (persistent decode)");
}

// The ring's depth: the deepest of 24, 16, 8 slots a thread, at most `ring`, whose shared memory
// fits a block (512 threads); 0 where none does (the form without the ring runs).
int ring_depth(int ring, int64_t m) {
    const size_t optin = size_t(device_attr(cudaDevAttrMaxSharedMemoryPerBlockOptin));
    const int64_t st = xs_stride_for(m);
    if (ring >= 24 && block_smem<512, 24>(st) <= optin) return 24;
    if (ring >= 16 && block_smem<512, 16>(st) <= optin) return 16;
    if (ring >= 8 && block_smem<512, 8>(st) <= optin) return 8;
    return 0;
}

template <typename T, int SPL>
void launch_typed(const PArgs& a, int warps, int ring, int64_t m, cudaStream_t s) {
    switch (ring > 0 ? ring_depth(ring, m) : 0) {
        case 24: return launch_block<T, SPL, 512, 24>(a, m, s);
        case 16: return launch_block<T, SPL, 512, 16>(a, m, s);
        case 8: return launch_block<T, SPL, 512, 8>(a, m, s);
        default: break;
    }
    if (warps >= 32)
        launch_block<T, SPL, 1024, 0>(a, m, s);
    else
        launch_block<T, SPL, 512, 0>(a, m, s);
}

template <typename T>
void launch_spl(const PArgs& a, int spl, int warps, int ring, int64_t m, cudaStream_t s) {
    if (spl == 1)
        launch_typed<T, 1>(a, warps, ring, m, s);
    else if (spl == 2)
        launch_typed<T, 2>(a, warps, ring, m, s);
    else if (spl <= 4)
        launch_typed<T, 4>(a, warps, ring, m, s);
    else
        launch_typed<T, 8>(a, warps, ring, m, s);
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

bool persistent_decode_supported(const PersistentDecodeParams& p) {
    if (p.n_layers < 1 || !p.layers || !p.residual || p.d < 1) return false;
    const PersistentLayer& f = p.layers[0];
    const int64_t ve = f.dtype == DType::F32 ? 4 : 8;
    if (f.dtype != DType::F32 && f.dtype != DType::F16 && f.dtype != DType::BF16) return false;
    if (p.d % ve != 0) return false;
    for (int64_t i = 0; i < p.n_layers; ++i) {
        const PersistentLayer& L = p.layers[i];
        if (L.kind != PersistentLayer::Mamba1 || L.dtype != f.dtype || L.N != f.N) return false;
        if (L.E < 1 || L.E % ve != 0 || L.N < 1 || L.N > 256 || L.R < 1 || L.W < 1 ||
            L.W > kConvMaxWidth)
            return false;
        if (!aligned16(L.in_proj) || !aligned16(L.x_proj) || !aligned16(L.out_proj)) return false;
        const int64_t m = std::max(p.d, std::max(L.E, L.R + 2 * L.N));
        if (m * int64_t(sizeof(float)) > 48 * 1024) return false;
        int g = 1;
        while (g < L.N && g < 32) g <<= 1;
        if (L.R > int64_t(kMaxDtPerLane) * g) return false;  // S3's preloaded dt_proj weights
        if (!L.in_proj || !L.conv_w || !L.x_proj || !L.dt_proj || !L.dt_bias || !L.A || !L.D ||
            !L.out_proj || !L.conv_state || !L.ssm_state || !L.proj || !L.xconv || !L.xdbl || !L.y)
            return false;
    }
    return true;
}

bool launch_persistent_decode(const PersistentDecodeParams& p, int warps, int rows, bool prefetch,
                              int ring, cudaStream_t s) {
    if (!persistent_decode_supported(p)) return false;
    int g = 1;
    while (g < p.layers[0].N && g < 32) g <<= 1;
    const int spl = int(ceil_div(p.layers[0].N, g));
    for (int64_t l0 = 0; l0 < p.n_layers; l0 += kPersistentMaxLayers) {
        PArgs a{};
        a.n = int(std::min<int64_t>(kPersistentMaxLayers, p.n_layers - l0));
        a.g = g;
        a.d = p.d;
        a.eps = p.eps;
        a.rms = p.rms;
        a.prefetch = prefetch;
        a.rows2 = rows >= 2;
        a.residual = p.residual;
        int64_t m = p.d;
        for (int i = 0; i < a.n; ++i) {
            a.layers[i] = p.layers[l0 + i];
            m = std::max(m, std::max(a.layers[i].E, a.layers[i].R + 2 * a.layers[i].N));
        }
        switch (p.layers[0].dtype) {
            case DType::F32: launch_spl<float>(a, spl, warps, ring, m, s); break;
            case DType::F16: launch_spl<__half>(a, spl, warps, ring, m, s); break;
            default: launch_spl<__nv_bfloat16>(a, spl, warps, ring, m, s); break;
        }
        check_launch("persistent_decode_kernel", s);
    }
    return true;
}

}  // namespace cuda
}  // namespace mambart

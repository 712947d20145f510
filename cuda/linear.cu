// cuda/linear.cu: every projection, y[M, N] = x[M, K] · W[N, K]ᵀ (+ bias[N]).
//
// gemv_kernel (M <= kGemvMaxRows, decode): bandwidth-bound; each weight row is streamed once.
//   Grid: ceil(N / kGemvWarps); block: kGemvWarps warps; warp w owns output column
//   n = blockIdx.x * kGemvWarps + w for all M rows. Lanes stride over K with 16-byte weight
//   vectors (kVec: K % (16 / sizeof(T)) == 0, W and x 16-byte aligned, ldx % 4 == 0), several
//   in flight per lane; fp32 accumulation; a warp reduction at the end.
// gemv_tc_kernel (launch_gemv_tc; decode batches of 2..kGemvTcMaxRows rows, fp16/bf16
//   weights, K % 32 == 0, W and x 16-byte aligned, ldx % 4 == 0): bandwidth-bound like the
//   GEMV, with the products on tensor cores: mma.sync m16n8k16, W as the A operand (16 output
//   columns n a block), x rounded to the weight dtype as B (8 rows m per n-block, MB n-blocks),
//   fp32 accumulators. Within each 32-wide k step the k order is permuted, the same way for A and
//   B (each product still pairs W[n, k] with x[m, k]): lane (r, q) = (lane / 4, lane % 4) loads
//   the 16 bytes of k0 + 8q .. k0 + 8q + 7 of W rows n0 + r and n0 + r + 8 and of x row r, and
//   uses their first halves in the step's first mma and second halves in its second.
//   Grid: ceil(N / 16); block: 8 warps taking the K steps round robin (several loads in flight a
//   lane); the 8 partial 16 x 8 MB tiles summed in shared memory in warp order.
// gemm_tc_kernel (M > kGemvMaxRows, fp16/bf16 weights, aligned: K % 8 == 0, ldx % 4 == 0):
//   tensor cores (WMMA 16x16x16), x rounded to the weight dtype while staged into shared
//   memory, fp32 accumulation, the next K tile loaded into registers during the MMAs.
//   Grid: (ceil(N / BN), ceil(M / BM)); 128 x 128 tiles of 8 warps (64 x 32 per warp), or
//   32 x 64 tiles of 4 warps when M <= 64 (decode batches).
// gemm_wmma_kernel (the same, unaligned shapes): simple staged tiles, scalar loads.
//   Grid: (ceil(N / 64), ceil(M / 128)); block: 8 warps in a 4 (M) x 2 (N) layout, 32 x 32
//   outputs per warp; K in steps of 32; shared memory 23 KB.
// gemm_f32_kernel (M > kGemvMaxRows, fp32 weights): a 64 x 64 tile SIMT GEMM, 4 x 4 outputs
//   per thread, K in steps of 16, exact fp32 products.
// rows_to_half_kernel: out[m, k] = T(x[m * ldx + k]), the fp32 activations rounded for a library
//   GEMM (cuBLAS). Grid: (ceil(K / (4 * 256)), M); 4 consecutive elements per thread (a float4
//   load when K % 4 == 0, ldx % 4 == 0 and x is 16-byte aligned, else scalar).
// add_bias_kernel: y[m * ldy + n] += bias[n]. Grid: (ceil(N / 256), M).
// The fused decode projections (ProjParams, cpp/op_params.h) are the two GEMVs with a prologue
//   (kPro 1: each block norms the residual rows into shared memory; kPro 2: Mamba-2's gated norm
//   of x) emulating add_norm_kernel / gated_rmsnorm_kernel's 1024-thread reductions bit for bit,
//   and an epilogue (accumulate into y; Mamba-1's conv step for n < conv.C).
// Preconditions: y does not alias x; ldx >= K; ldy >= N.
#include <mma.h>

#include <type_traits>

#include "common.cuh"
#include "kernels.h"
#include "vec.cuh"

namespace mambart {
namespace cuda {
namespace {

constexpr int kGemvWarps = 8;
constexpr int kGemvUnroll = 4;

// The fused decode projection's norm prologue (ProjParams::norm, kPro 1): xs[m, :] = the normed row m
// of the residual, computed with add_norm_kernel's arithmetic as it runs for decode (a 1024-thread
// block: thread t sums elements t + 1024 i, then block_sum), by this block's 256 threads each
// standing for threads t + 256 j (j < 4) in the same order, so the values are bitwise add_norm's.
constexpr int kNormVirt = 1024 / (kGemvWarps * 32);
static_assert(kNormVirt * kGemvWarps * 32 == 1024, "the norm prologue stands for 1024 threads");

__device__ __forceinline__ float sum_as_1024(const float (&s)[kNormVirt], float* red) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();  // red may still be read by a previous call
#pragma unroll
    for (int j = 0; j < kNormVirt; ++j) {
        const float v = warp_sum(s[j]);
        if (lane == 0) red[warp + kGemvWarps * j] = v;  // the warp of thread t + 256 j
    }
    __syncthreads();
    return warp_sum(red[lane]);  // 32 warps: every lane reads one
}

template <int M>
__device__ void norm_rows(const ProjNorm& q, int64_t d, float* xs, float* red) {
    const int t = threadIdx.x;
    constexpr int kStride = kNormVirt * kGemvWarps * 32;
    for (int m = 0; m < M; ++m) {
        const float* r = q.residual + m * d;
        float* o = xs + m * d;
        float s[kNormVirt];
#pragma unroll
        for (int j = 0; j < kNormVirt; ++j) {
            s[j] = 0.0f;
            for (int64_t k = t + kGemvWarps * 32 * j; k < d; k += kStride) {
                const float v = r[k];
                s[j] = add_norm_acc(s[j], v, q.rms);
            }
        }
        const float tot = sum_as_1024(s, red);
        if (q.rms) {
            const float rstd = rsqrtf(tot / float(d) + q.eps);
            for (int64_t k = t; k < d; k += blockDim.x) o[k] = r[k] * rstd * (q.w ? q.w[k] : 1.0f);
        } else {
            const float mean = tot / float(d);
#pragma unroll
            for (int j = 0; j < kNormVirt; ++j) {
                s[j] = 0.0f;
                for (int64_t k = t + kGemvWarps * 32 * j; k < d; k += kStride) {
                    const float c = r[k] - mean;
                    s[j] = __fmaf_rn(c, c, s[j]);  // as add_norm_kernel
                }
            }
            const float ss = sum_as_1024(s, red);
            const float rstd = rsqrtf(ss / float(d) + q.eps);
            for (int64_t k = t; k < d; k += blockDim.x)
                o[k] = (r[k] - mean) * rstd * (q.w ? q.w[k] : 1.0f) + (q.b ? q.b[k] : 0.0f);
        }
    }
    __syncthreads();
}

// The gated prologue (ProjParams::gate): xs[m, :] = Mamba-2's grouped gated RMSNorm of x[m, :]
// with gated_rmsnorm_kernel's arithmetic as it runs for decode (1024 threads a group), emulated
// as in norm_rows.
template <int M>
__device__ void gate_rows(const LinearParams& p, float* xs, float* red) {
    const ProjGate& q = p.gate;
    const int t = threadIdx.x;
    constexpr int kStride = kNormVirt * kGemvWarps * 32;
    const int64_t gs = q.group_size;
    for (int m = 0; m < M; ++m) {
        for (int64_t g0 = 0; g0 < p.K; g0 += gs) {
            const float* y = p.x + m * p.ldx + g0;
            const float* z = q.z + m * q.ld_z + g0;
            float* o = xs + m * p.K + g0;
            float s[kNormVirt];
#pragma unroll
            for (int j = 0; j < kNormVirt; ++j) {
                s[j] = 0.0f;
                for (int64_t k = t + kGemvWarps * 32 * j; k < gs; k += kStride) {
                    const float v = y[k] * silu_f(z[k]);
                    s[j] = __fmaf_rn(v, v, s[j]);  // as gated_rmsnorm_kernel
                }
            }
            const float tot = sum_as_1024(s, red);
            const float rstd = rsqrtf(tot / float(gs) + q.eps);
            const float* w = q.w + g0;
            for (int64_t k = t; k < gs; k += blockDim.x) o[k] = y[k] * silu_f(z[k]) * rstd * w[k];
        }
    }
    __syncthreads();
}

// The epilogue of output (m, n): y = acc + bias, or y += acc + bias (accumulate); then, for
// n < conv.C, Mamba-1's conv step on the new y (conv1d_kernel's arithmetic at L = 1).
__device__ __forceinline__ void gemv_store(const LinearParams& p, int64_t m, int64_t n, float acc) {
    const float v = acc + (p.bias ? p.bias[n] : 0.0f);
    float* y = p.y + m * p.ldy + n;
    const float out = p.accumulate ? *y + v : v;
    *y = out;
    if (p.conv.state && n < p.conv.C) {
        const int64_t W = p.conv.W;
        float* st = p.conv.state + (m * p.conv.C + n) * W;
        const float* w = p.conv.w + n * W;
        float a = p.conv.bias ? p.conv.bias[n] : 0.0f;
        for (int64_t k = 0; k + 1 < W; ++k) a = conv_acc(a, w[k], st[k + 1]);
        a = conv_acc(a, w[W - 1], out);
        p.conv.out[m * p.conv.C + n] = silu_f(a);
        for (int64_t k = 0; k + 1 < W; ++k) st[k] = st[k + 1];
        st[W - 1] = out;
    }
}

// kPro: 0, x is read; 1 (norm) or 2 (gate), x is the block's prologue rows in shared memory.
template <typename T, int M, bool kVec, int kPro>
__global__ void __launch_bounds__(kGemvWarps * 32) gemv_kernel(LinearParams p) {
    extern __shared__ float4 smem4[];  // kPro != 0: (M, K) the prologue rows
    __shared__ float red[32];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int64_t n = int64_t(blockIdx.x) * kGemvWarps + warp;
    const T* w = static_cast<const T*>(p.W) + n * p.K;
    // PDL: the weight row does not depend on earlier kernels: start streaming it before waiting.
    if (p.prefetch && n < p.N) prefetch_l2(w, p.K * int64_t(sizeof(T)), lane, 32);
    pdl_wait();
    pdl_trigger();
    const float* x = p.x;
    int64_t ldx = p.ldx;
    if (kPro != 0) {
        float* xs = reinterpret_cast<float*>(smem4);
        if (kPro == 1)
            norm_rows<M>(p.norm, p.K, xs, red);
        else
            gate_rows<M>(p, xs, red);
        x = xs;
        ldx = p.K;
    }
    if (n >= p.N) return;
    float acc[M];
#pragma unroll
    for (int m = 0; m < M; ++m) acc[m] = 0.0f;
    if (kVec) {
        constexpr int kE = Vec<T>::kN;
        const int64_t nvec = p.K / kE;
        const uint4* wv = reinterpret_cast<const uint4*>(w);
        for (int64_t v0 = lane; v0 < nvec; v0 += 32 * kGemvUnroll) {
            uint4 raw[kGemvUnroll];
#pragma unroll
            for (int u = 0; u < kGemvUnroll; ++u) {
                const int64_t v = v0 + int64_t(u) * 32;
                raw[u] = v < nvec ? __ldcs(wv + v) : make_uint4(0, 0, 0, 0);
            }
#pragma unroll
            for (int u = 0; u < kGemvUnroll; ++u) {
                const int64_t v = v0 + int64_t(u) * 32;
                if (v >= nvec) break;
                float wf[kE];
                Vec<T>::unpack(raw[u], wf);
#pragma unroll
                for (int m = 0; m < M; ++m) {
                    const float4* xr = reinterpret_cast<const float4*>(x + m * ldx + v * kE);
#pragma unroll
                    for (int q = 0; q < kE / 4; ++q) {
                        const float4 xv = kPro != 0 ? xr[q] : __ldg(xr + q);
                        acc[m] += wf[4 * q] * xv.x + wf[4 * q + 1] * xv.y + wf[4 * q + 2] * xv.z +
                                  wf[4 * q + 3] * xv.w;
                    }
                }
            }
        }
    } else {
        for (int64_t k = lane; k < p.K; k += 32) {
            const float wk = to_f32(w[k]);
#pragma unroll
            for (int m = 0; m < M; ++m) acc[m] += wk * x[m * ldx + k];
        }
    }
#pragma unroll
    for (int m = 0; m < M; ++m) acc[m] = warp_sum(acc[m]);
    if (lane == 0) {
#pragma unroll
        for (int m = 0; m < M; ++m) gemv_store(p, m, n, acc[m]);
    }
}

// gemv_rows_kernel: the GEMV for narrow outputs (N < kGemvNarrow, e.g. x_proj, dt_proj at
// decode): one block per output column, its 8 warps splitting K, a shared-memory reduction.
constexpr int64_t kGemvNarrow = 1024;

template <typename T, int M, bool kVec, int kPro>
__global__ void __launch_bounds__(kGemvWarps * 32) gemv_rows_kernel(LinearParams p) {
    extern __shared__ float4 smem4[];  // kPro != 0: (M, K) the prologue rows
    __shared__ float part[kGemvWarps][M];
    __shared__ float red[32];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int64_t n = blockIdx.x;
    const T* w = static_cast<const T*>(p.W) + n * p.K;
    if (p.prefetch) prefetch_l2(w, p.K * int64_t(sizeof(T)), threadIdx.x, blockDim.x);  // PDL
    pdl_wait();
    pdl_trigger();
    const float* x = p.x;
    int64_t ldx = p.ldx;
    if (kPro != 0) {
        float* xs = reinterpret_cast<float*>(smem4);
        if (kPro == 1)
            norm_rows<M>(p.norm, p.K, xs, red);
        else
            gate_rows<M>(p, xs, red);
        x = xs;
        ldx = p.K;
    }
    float acc[M];
#pragma unroll
    for (int m = 0; m < M; ++m) acc[m] = 0.0f;
    if (kVec) {
        constexpr int kE = Vec<T>::kN;
        const int64_t nvec = p.K / kE;
        const uint4* wv = reinterpret_cast<const uint4*>(w);
        for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
            float wf[kE];
            Vec<T>::unpack(__ldcs(wv + v), wf);
#pragma unroll
            for (int m = 0; m < M; ++m) {
                const float4* xr = reinterpret_cast<const float4*>(x + m * ldx + v * kE);
#pragma unroll
                for (int q = 0; q < kE / 4; ++q) {
                    const float4 xv = kPro != 0 ? xr[q] : __ldg(xr + q);
                    acc[m] += wf[4 * q] * xv.x + wf[4 * q + 1] * xv.y + wf[4 * q + 2] * xv.z +
                              wf[4 * q + 3] * xv.w;
                }
            }
        }
    } else {
        for (int64_t k = threadIdx.x; k < p.K; k += blockDim.x) {
            const float wk = to_f32(w[k]);
#pragma unroll
            for (int m = 0; m < M; ++m) acc[m] += wk * x[m * ldx + k];
        }
    }
#pragma unroll
    for (int m = 0; m < M; ++m) {
        const float v = warp_sum(acc[m]);
        if (lane == 0) part[warp][m] = v;
    }
    __syncthreads();
    if (threadIdx.x < M) {
        float v = 0.0f;
#pragma unroll
        for (int w2 = 0; w2 < kGemvWarps; ++w2) v += part[w2][threadIdx.x];
        gemv_store(p, threadIdx.x, n, v);
    }
}

constexpr int kBM = 128, kBN = 64, kBK = 32, kPad = 8;

template <typename T>
__global__ void __launch_bounds__(256) gemm_wmma_kernel(LinearParams p) {
    using namespace nvcuda;
    __shared__ __align__(128) T As[kBM][kBK + kPad];  // x tile (m, k)
    __shared__ __align__(128) T Bs[kBN][kBK + kPad];  // W tile (n, k)
    __shared__ __align__(128) float Cs[8][16 * 16];   // per-warp epilogue staging
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int warp_m = warp & 3, warp_n = warp >> 2;
    const int64_t m0 = int64_t(blockIdx.y) * kBM, n0 = int64_t(blockIdx.x) * kBN;
    const T* W = static_cast<const T*>(p.W);

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

    for (int64_t k0 = 0; k0 < p.K; k0 += kBK) {
#pragma unroll
        for (int i = 0; i < kBM * kBK / 256; ++i) {
            const int idx = tid + i * 256, r = idx / kBK, c = idx % kBK;
            const int64_t gm = m0 + r, gk = k0 + c;
            const float v = (gm < p.M && gk < p.K) ? p.x[gm * p.ldx + gk] : 0.0f;
            As[r][c] = from_f32<T>(v);
        }
#pragma unroll
        for (int i = 0; i < kBN * kBK / 256; ++i) {
            const int idx = tid + i * 256, r = idx / kBK, c = idx % kBK;
            const int64_t gn = n0 + r, gk = k0 + c;
            Bs[r][c] = (gn < p.N && gk < p.K) ? W[gn * p.K + gk] : from_f32<T>(0.0f);
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < kBK; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[2];
            wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b[2];
#pragma unroll
            for (int i = 0; i < 2; ++i)
                wmma::load_matrix_sync(a[i], &As[warp_m * 32 + i * 16][kk], kBK + kPad);
#pragma unroll
            for (int j = 0; j < 2; ++j)
                wmma::load_matrix_sync(b[j], &Bs[warp_n * 32 + j * 16][kk], kBK + kPad);
#pragma unroll
            for (int i = 0; i < 2; ++i)
#pragma unroll
                for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            wmma::store_matrix_sync(Cs[warp], acc[i][j], 16, wmma::mem_row_major);
            __syncwarp();
            for (int e = lane; e < 256; e += 32) {
                const int64_t gm = m0 + warp_m * 32 + i * 16 + e / 16;
                const int64_t gn = n0 + warp_n * 32 + j * 16 + e % 16;
                if (gm < p.M && gn < p.N)
                    p.y[gm * p.ldy + gn] = Cs[warp][e] + (p.bias ? p.bias[gn] : 0.0f);
            }
            __syncwarp();
        }
}

// Pipelined tensor-core GEMM (the fast path of gemm_wmma_kernel): WM x WN warps, each owning
// FM x FN 16x16 fragments; K in steps of 32; 16-byte global loads (x as float4, converted to T
// when staged; W as 8-element vectors); the next K tile is loaded into registers while the
// current one is multiplied. Requires K % 8 == 0, ldx % 4 == 0, x and W 16-byte aligned.
template <typename T, int WM, int WN, int FM, int FN>
__global__ void __launch_bounds__(WM * WN * 32) gemm_tc_kernel(LinearParams p) {
    using namespace nvcuda;
    constexpr int kThreads = WM * WN * 32;
    constexpr int BM = WM * FM * 16, BN = WN * FN * 16, BK = 32, LD = BK + 8;
    constexpr int kA = BM * BK / 4 / kThreads;  // float4 loads of x per thread
    constexpr int kB = BN * BK / 8 / kThreads;  // 16-byte loads of W per thread
    static_assert(kA * kThreads * 4 == BM * BK && kB * kThreads * 8 == BN * BK, "tile split");
    __shared__ __align__(128) T As[BM][LD];
    __shared__ __align__(128) T Bs[BN][LD];
    __shared__ __align__(128) float Cs[WM * WN][16 * 16];
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int warp_m = warp % WM, warp_n = warp / WM;
    const int64_t m0 = int64_t(blockIdx.y) * BM, n0 = int64_t(blockIdx.x) * BN;
    const T* W = static_cast<const T*>(p.W);

    float4 ra[kA];
    uint4 rb[kB];
    auto load = [&](int64_t k0) {
#pragma unroll
        for (int i = 0; i < kA; ++i) {
            const int idx = tid + i * kThreads, r = idx / (BK / 4), c = (idx % (BK / 4)) * 4;
            const int64_t gm = m0 + r, gk = k0 + c;
            ra[i] = (gm < p.M && gk < p.K)
                        ? __ldg(reinterpret_cast<const float4*>(p.x + gm * p.ldx + gk))
                        : make_float4(0.f, 0.f, 0.f, 0.f);
        }
#pragma unroll
        for (int i = 0; i < kB; ++i) {
            const int idx = tid + i * kThreads, r = idx / (BK / 8), c = (idx % (BK / 8)) * 8;
            const int64_t gn = n0 + r, gk = k0 + c;
            rb[i] = (gn < p.N && gk < p.K) ? __ldg(reinterpret_cast<const uint4*>(W + gn * p.K + gk))
                                           : make_uint4(0, 0, 0, 0);
        }
    };
    auto store = [&]() {
#pragma unroll
        for (int i = 0; i < kA; ++i) {
            const int idx = tid + i * kThreads, r = idx / (BK / 4), c = (idx % (BK / 4)) * 4;
            T* dst = &As[r][c];
            dst[0] = from_f32<T>(ra[i].x);
            dst[1] = from_f32<T>(ra[i].y);
            dst[2] = from_f32<T>(ra[i].z);
            dst[3] = from_f32<T>(ra[i].w);
        }
#pragma unroll
        for (int i = 0; i < kB; ++i) {
            const int idx = tid + i * kThreads, r = idx / (BK / 8), c = (idx % (BK / 8)) * 8;
            *reinterpret_cast<uint4*>(&Bs[r][c]) = rb[i];
        }
    };

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[FM][FN];
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
        for (int j = 0; j < FN; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

    load(0);
    for (int64_t k0 = 0; k0 < p.K; k0 += BK) {
        store();
        __syncthreads();
        if (k0 + BK < p.K) load(k0 + BK);  // in flight during the MMAs below
#pragma unroll
        for (int kk = 0; kk < BK; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[FM];
            wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b[FN];
#pragma unroll
            for (int i = 0; i < FM; ++i)
                wmma::load_matrix_sync(a[i], &As[(warp_m * FM + i) * 16][kk], LD);
#pragma unroll
            for (int j = 0; j < FN; ++j)
                wmma::load_matrix_sync(b[j], &Bs[(warp_n * FN + j) * 16][kk], LD);
#pragma unroll
            for (int i = 0; i < FM; ++i)
#pragma unroll
                for (int j = 0; j < FN; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
        for (int j = 0; j < FN; ++j) {
            wmma::store_matrix_sync(Cs[warp], acc[i][j], 16, wmma::mem_row_major);
            __syncwarp();
            for (int e = lane; e < 256; e += 32) {
                const int64_t gm = m0 + (warp_m * FM + i) * 16 + e / 16;
                const int64_t gn = n0 + (warp_n * FN + j) * 16 + e % 16;
                if (gm < p.M && gn < p.N)
                    p.y[gm * p.ldy + gn] = Cs[warp][e] + (p.bias ? p.bias[gn] : 0.0f);
            }
            __syncwarp();
        }
}

template <typename T>
void gemm_tc_launch(const LinearParams& p, cudaStream_t s) {
    // Small M (decode batches) or few large tiles (narrow N, e.g. x_proj): small tiles, more
    // blocks.
    if (p.M <= 64 || ceil_div(p.N, 128) * ceil_div(p.M, 128) < 264) {
        const dim3 grid(unsigned(ceil_div(p.N, 64)), unsigned(ceil_div(p.M, 32)));
        gemm_tc_kernel<T, 1, 4, 2, 1><<<grid, 128, 0, s>>>(p);
    } else {
        const dim3 grid(unsigned(ceil_div(p.N, 128)), unsigned(ceil_div(p.M, 128)));
        gemm_tc_kernel<T, 2, 4, 4, 2><<<grid, 256, 0, s>>>(p);
    }
}

constexpr int kFT = 64, kFK = 16;

__global__ void __launch_bounds__(256) gemm_f32_kernel(LinearParams p) {
    __shared__ float As[kFK][kFT + 4];  // x tile transposed (k, m)
    __shared__ float Bs[kFK][kFT + 4];  // W tile transposed (k, n)
    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    const int64_t m0 = int64_t(blockIdx.y) * kFT, n0 = int64_t(blockIdx.x) * kFT;
    const float* W = static_cast<const float*>(p.W);
    float acc[4][4] = {};
    for (int64_t k0 = 0; k0 < p.K; k0 += kFK) {
#pragma unroll
        for (int i = 0; i < kFT * kFK / 256; ++i) {
            const int idx = tid + i * 256, r = idx / kFK, c = idx % kFK;
            const int64_t gk = k0 + c;
            As[c][r] = (m0 + r < p.M && gk < p.K) ? p.x[(m0 + r) * p.ldx + gk] : 0.0f;
            Bs[c][r] = (n0 + r < p.N && gk < p.K) ? W[(n0 + r) * p.K + gk] : 0.0f;
        }
        __syncthreads();
#pragma unroll
        for (int k = 0; k < kFK; ++k) {
            float a[4], b[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                a[i] = As[k][ty * 4 + i];
                b[i] = Bs[k][tx * 4 + i];
            }
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int64_t gm = m0 + ty * 4 + i, gn = n0 + tx * 4 + j;
            if (gm < p.M && gn < p.N) p.y[gm * p.ldy + gn] = acc[i][j] + (p.bias ? p.bias[gn] : 0.0f);
        }
}

constexpr int kGemvTcWarps = 8;
constexpr int kGemvTcUnroll = 4;

// Packs two floats into the weight dtype's 2-element register (x rounded to nearest).
template <typename T> __device__ __forceinline__ uint32_t pack2(float a, float b);
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float a, float b) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<const uint32_t*>(&h);
}
template <> __device__ __forceinline__ uint32_t pack2<__half>(float a, float b) {
    const __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<const uint32_t*>(&h);
}

// d += a · b, m16n8k16, row.col, fp32 accumulators.
template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                         uint32_t a3, uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    if constexpr (std::is_same<T, __nv_bfloat16>::value)
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    else
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
}

template <typename T, int MB>
__global__ void __launch_bounds__(kGemvTcWarps * 32) gemv_tc_kernel(LinearParams p) {
    __shared__ float part[kGemvTcWarps][MB][16][9];  // (warp, n-block, n, m) partial sums
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, r = lane >> 2, q = lane & 3;
    const int64_t n0 = int64_t(blockIdx.x) * 16, K = p.K, steps = K / 32;
    // rows past N read row N - 1 (their sums are not stored)
    const int64_t na = n0 + r < p.N ? n0 + r : p.N - 1;
    const int64_t nb = n0 + r + 8 < p.N ? n0 + r + 8 : p.N - 1;
    const uint4* wa = reinterpret_cast<const uint4*>(static_cast<const T*>(p.W) + na * K) + q;
    const uint4* wb = reinterpret_cast<const uint4*>(static_cast<const T*>(p.W) + nb * K) + q;
    pdl_wait();  // launched with launch_pdl (see common.cuh)
    pdl_trigger();
    float c[MB][4];
#pragma unroll
    for (int j = 0; j < MB; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) c[j][i] = 0.0f;
    for (int64_t s0 = warp; s0 < steps; s0 += int64_t(kGemvTcWarps) * kGemvTcUnroll) {
        uint4 A[kGemvTcUnroll], Bw[kGemvTcUnroll];
#pragma unroll
        for (int u = 0; u < kGemvTcUnroll; ++u) {
            const int64_t st = s0 + int64_t(u) * kGemvTcWarps;
            A[u] = st < steps ? __ldcs(wa + st * 4) : make_uint4(0, 0, 0, 0);
            Bw[u] = st < steps ? __ldcs(wb + st * 4) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < kGemvTcUnroll; ++u) {
            const int64_t st = s0 + int64_t(u) * kGemvTcWarps;
            if (st >= steps) break;  // warp-uniform
#pragma unroll
            for (int j = 0; j < MB; ++j) {
                const int64_t m = int64_t(j) * 8 + r;
                float4 x0 = make_float4(0.0f, 0.0f, 0.0f, 0.0f), x1 = x0;
                if (m < p.M) {
                    const float4* xr =
                        reinterpret_cast<const float4*>(p.x + m * p.ldx + st * 32 + 8 * q);
                    x0 = __ldg(xr);
                    x1 = __ldg(xr + 1);
                }
                const uint32_t b0 = pack2<T>(x0.x, x0.y), b1 = pack2<T>(x0.z, x0.w);
                const uint32_t b2 = pack2<T>(x1.x, x1.y), b3 = pack2<T>(x1.z, x1.w);
                mma16816<T>(c[j], A[u].x, Bw[u].x, A[u].y, Bw[u].y, b0, b1);
                mma16816<T>(c[j], A[u].z, Bw[u].z, A[u].w, Bw[u].w, b2, b3);
            }
        }
    }
    // c[j]: (n r, m 2q), (n r, m 2q + 1), (n r + 8, m 2q), (n r + 8, m 2q + 1) of n-block j
#pragma unroll
    for (int j = 0; j < MB; ++j) {
        part[warp][j][r][2 * q] = c[j][0];
        part[warp][j][r][2 * q + 1] = c[j][1];
        part[warp][j][r + 8][2 * q] = c[j][2];
        part[warp][j][r + 8][2 * q + 1] = c[j][3];
    }
    __syncthreads();
    for (int i = threadIdx.x; i < MB * 16 * 8; i += kGemvTcWarps * 32) {
        const int j = i / 128, nn = (i / 8) % 16, mm = i % 8;
        const int64_t m = int64_t(j) * 8 + mm, n = n0 + nn;
        if (m >= p.M || n >= p.N) continue;
        float acc = 0.0f;
#pragma unroll
        for (int w = 0; w < kGemvTcWarps; ++w) acc += part[w][j][nn][mm];
        gemv_store(p, m, n, acc);
    }
}

template <typename T>
void gemv_tc_dispatch(const LinearParams& p, cudaStream_t s) {
    const dim3 grid(unsigned(ceil_div(p.N, 16))), block(kGemvTcWarps * 32);
    if (p.M <= 8)
        launch_pdl(gemv_tc_kernel<T, 1>, grid, block, 0, s, p);
    else if (p.M <= 16)
        launch_pdl(gemv_tc_kernel<T, 2>, grid, block, 0, s, p);
    else
        launch_pdl(gemv_tc_kernel<T, 4>, grid, block, 0, s, p);
}

template <typename T, int M, bool kVec, int kPro>
void gemv_launch_m(const LinearParams& p, cudaStream_t s) {
    const int threads = kGemvWarps * 32;
    const size_t smem = kPro != 0 ? size_t(M * p.K) * sizeof(float) : 0;
    if (p.N < kGemvNarrow)
        launch_pdl(gemv_rows_kernel<T, M, kVec, kPro>, dim3(unsigned(p.N)), dim3(threads), smem, s, p);
    else
        launch_pdl(gemv_kernel<T, M, kVec, kPro>, dim3(unsigned(ceil_div(p.N, kGemvWarps))),
                   dim3(threads), smem, s, p);
}

template <typename T, bool kVec, int kPro>
void gemv_fused_m(const LinearParams& p, cudaStream_t s) {
    switch (p.M) {
        case 1: gemv_launch_m<T, 1, kVec, kPro>(p, s); break;
        case 2: gemv_launch_m<T, 2, kVec, kPro>(p, s); break;
        case 3: gemv_launch_m<T, 3, kVec, kPro>(p, s); break;
        case 4: gemv_launch_m<T, 4, kVec, kPro>(p, s); break;
    }
}

template <typename T, bool kVec>
void gemv_dispatch(const LinearParams& p, cudaStream_t s) {
    // the fused projection's prologues: M <= kFusedMaxRows
    if (p.norm.residual) return gemv_fused_m<T, kVec, 1>(p, s);
    if (p.gate.z) return gemv_fused_m<T, kVec, 2>(p, s);
    switch (p.M) {
        case 1: gemv_launch_m<T, 1, kVec, 0>(p, s); break;
        case 2: gemv_launch_m<T, 2, kVec, 0>(p, s); break;
        case 3: gemv_launch_m<T, 3, kVec, 0>(p, s); break;
        case 4: gemv_launch_m<T, 4, kVec, 0>(p, s); break;
        case 5: gemv_launch_m<T, 5, kVec, 0>(p, s); break;
        case 6: gemv_launch_m<T, 6, kVec, 0>(p, s); break;
        case 7: gemv_launch_m<T, 7, kVec, 0>(p, s); break;
        case 8: gemv_launch_m<T, 8, kVec, 0>(p, s); break;
    }
}

template <typename T>
void gemv_launch(const LinearParams& p, cudaStream_t s) {
    constexpr int kE = 16 / int(sizeof(T));
    const bool vec = p.K % kE == 0 && reinterpret_cast<uintptr_t>(p.W) % 16 == 0 &&
                     (p.norm.residual || p.gate.z ||  // x: the block's rows in shared memory
                      (p.ldx % 4 == 0 && reinterpret_cast<uintptr_t>(p.x) % 16 == 0));
    if (vec)
        gemv_dispatch<T, true>(p, s);
    else
        gemv_dispatch<T, false>(p, s);
}

template <typename T, bool kVec>
__global__ void rows_to_half_kernel(const float* __restrict__ x, int64_t ldx, int64_t K,
                                    T* __restrict__ out) {
    const int64_t m = blockIdx.y, k = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * 4;
    if (k >= K) return;
    const float* xr = x + m * ldx + k;
    T* o = out + m * K + k;
    if (kVec) {
        const float4 v = *reinterpret_cast<const float4*>(xr);
        o[0] = from_f32<T>(v.x);
        o[1] = from_f32<T>(v.y);
        o[2] = from_f32<T>(v.z);
        o[3] = from_f32<T>(v.w);
    } else {
        for (int i = 0; i < 4 && k + i < K; ++i) o[i] = from_f32<T>(xr[i]);
    }
}

__global__ void add_bias_kernel(float* __restrict__ y, int64_t ldy, const float* __restrict__ bias,
                                int64_t N) {
    const int64_t n = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (n < N) y[int64_t(blockIdx.y) * ldy + n] += bias[n];
}

}  // namespace

void launch_rows_to_half(const float* x, int64_t ldx, int64_t M, int64_t K, void* out,
                         DType dtype, cudaStream_t s) {
    MAMBART_CHECK_ARG(M >= 0 && K > 0 && ldx >= K, "launch_rows_to_half: bad sizes M=", M,
                      " K=", K, " ldx=", ldx);
    MAMBART_CHECK_ARG(dtype == DType::F16 || dtype == DType::BF16,
                      "launch_rows_to_half: dtype must be float16 or bfloat16");
    MAMBART_CHECK_ARG(x && out, "launch_rows_to_half: null pointer");
    MAMBART_CHECK_ARG(M <= 65535, "launch_rows_to_half: M=", M, " too large");
    if (M == 0) return;
    const dim3 grid(unsigned(ceil_div(K, 4 * 256)), unsigned(M));
    const bool vec = K % 4 == 0 && ldx % 4 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0;
    if (dtype == DType::F16) {
        if (vec)
            rows_to_half_kernel<__half, true><<<grid, 256, 0, s>>>(x, ldx, K, static_cast<__half*>(out));
        else
            rows_to_half_kernel<__half, false><<<grid, 256, 0, s>>>(x, ldx, K, static_cast<__half*>(out));
    } else {
        auto* o = static_cast<__nv_bfloat16*>(out);
        if (vec)
            rows_to_half_kernel<__nv_bfloat16, true><<<grid, 256, 0, s>>>(x, ldx, K, o);
        else
            rows_to_half_kernel<__nv_bfloat16, false><<<grid, 256, 0, s>>>(x, ldx, K, o);
    }
    check_launch("rows_to_half_kernel", s);
}

void launch_add_bias(float* y, int64_t ldy, const float* bias, int64_t M, int64_t N,
                     cudaStream_t s) {
    MAMBART_CHECK_ARG(M >= 0 && N > 0 && ldy >= N, "launch_add_bias: bad sizes M=", M, " N=", N,
                      " ldy=", ldy);
    MAMBART_CHECK_ARG(y && bias, "launch_add_bias: null pointer");
    MAMBART_CHECK_ARG(M <= 65535, "launch_add_bias: M=", M, " too large");
    if (M == 0) return;
    add_bias_kernel<<<dim3(unsigned(ceil_div(N, 256)), unsigned(M)), 256, 0, s>>>(y, ldy, bias, N);
    check_launch("add_bias_kernel", s);
}

void launch_linear(const LinearParams& params, cudaStream_t s) {
    LinearParams p = params;
    p.prefetch = weight_prefetch_enabled();
    MAMBART_CHECK_ARG(p.M >= 0 && p.N > 0 && p.K > 0, "launch_linear: bad sizes M=", p.M,
                      " N=", p.N, " K=", p.K);
    MAMBART_CHECK_ARG(p.norm.residual || p.ldx >= p.K, "launch_linear: ldx=", p.ldx, " < K=", p.K);
    MAMBART_CHECK_ARG(p.ldy >= p.N, "launch_linear: ldy=", p.ldy, " < N=", p.N);
    MAMBART_CHECK_ARG((p.x || p.norm.residual) && p.W && p.y, "launch_linear: null pointer");
    const bool prologue = p.norm.residual || p.gate.z;
    if (prologue || p.accumulate || p.conv.state) {  // a fused decode projection
        MAMBART_CHECK_ARG(p.M >= 1 && p.M <= (prologue ? kFusedMaxRows : kGemvMaxRows),
                          "launch_linear: a fused projection of ", p.M, " rows");
        MAMBART_CHECK_ARG(!prologue || p.M * p.K <= kFusedMaxNormElems,
                          "launch_linear: the prologue's ", p.M, " x ", p.K,
                          " rows exceed shared memory");
        MAMBART_CHECK_ARG(!(p.norm.residual && p.gate.z), "launch_linear: two prologues");
        MAMBART_CHECK_ARG(!p.gate.z || (p.x && p.gate.w && p.gate.group_size > 0 &&
                                        p.K % p.gate.group_size == 0 && p.gate.ld_z >= p.K),
                          "launch_linear: bad gated norm group_size=", p.gate.group_size);
        MAMBART_CHECK_ARG(!p.conv.state || (p.conv.C <= p.N && p.conv.W >= 1 &&
                                            p.conv.W <= kConvMaxWidth && p.conv.w && p.conv.out),
                          "launch_linear: bad conv step C=", p.conv.C, " W=", p.conv.W);
    }
    if (p.M == 0) return;
    if (p.M <= kGemvMaxRows) {
        MAMBART_CHECK_ARG(ceil_div(p.N, kGemvWarps) <= 0x7fffffff, "launch_linear: N too large");
        switch (p.dtype) {
            case DType::F32: gemv_launch<float>(p, s); break;
            case DType::F16: gemv_launch<__half>(p, s); break;
            case DType::BF16: gemv_launch<__nv_bfloat16>(p, s); break;
        }
        check_launch("gemv_kernel", s);
        return;
    }
    if (p.dtype == DType::F32) {
        const dim3 grid(unsigned(ceil_div(p.N, kFT)), unsigned(ceil_div(p.M, kFT)));
        MAMBART_CHECK_ARG(grid.y <= 65535, "launch_linear: M=", p.M, " too large");
        gemm_f32_kernel<<<grid, 256, 0, s>>>(p);
        check_launch("gemm_f32_kernel", s);
        return;
    }
    const dim3 grid(unsigned(ceil_div(p.N, kBN)), unsigned(ceil_div(p.M, kBM)));
    MAMBART_CHECK_ARG(grid.y <= 65535, "launch_linear: M=", p.M, " too large");
    const bool aligned = p.K % 8 == 0 && p.ldx % 4 == 0 &&
                         reinterpret_cast<uintptr_t>(p.W) % 16 == 0 &&
                         reinterpret_cast<uintptr_t>(p.x) % 16 == 0;
    if (aligned) {
        if (p.dtype == DType::F16)
            gemm_tc_launch<__half>(p, s);
        else
            gemm_tc_launch<__nv_bfloat16>(p, s);
        check_launch("gemm_tc_kernel", s);
        return;
    }
    if (p.dtype == DType::F16)
        gemm_wmma_kernel<__half><<<grid, 256, 0, s>>>(p);
    else
        gemm_wmma_kernel<__nv_bfloat16><<<grid, 256, 0, s>>>(p);
    check_launch("gemm_wmma_kernel", s);
}

bool gemv_tc_supported(const LinearParams& p) {
    return p.M >= 1 && p.M <= kGemvTcMaxRows && (p.dtype == DType::BF16 || p.dtype == DType::F16) &&
           p.K % 32 == 0 && p.ldx % 4 == 0 && p.ldy >= p.N && p.x && !p.norm.residual &&
           !p.gate.z && !p.accumulate && !p.conv.state &&
           reinterpret_cast<uintptr_t>(p.W) % 16 == 0 && reinterpret_cast<uintptr_t>(p.x) % 16 == 0;
}

void launch_gemv_tc(const LinearParams& p, cudaStream_t s) {
    MAMBART_CHECK_ARG(p.N > 0 && p.K > 0 && gemv_tc_supported(p),
                      "launch_gemv_tc: unsupported shape or layout M=", p.M, " N=", p.N, " K=", p.K,
                      " ldx=", p.ldx);
    MAMBART_CHECK_ARG(ceil_div(p.N, 16) <= 0x7fffffff, "launch_gemv_tc: N too large");
    if (p.dtype == DType::F16)
        gemv_tc_dispatch<__half>(p, s);
    else
        gemv_tc_dispatch<__nv_bfloat16>(p, s);
    check_launch("gemv_tc_kernel", s);
}

}  // namespace cuda
}  // namespace mambart

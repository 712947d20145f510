// cuda/decode_persistent.cu: the persistent batch-1 decode of Mamba-1 layers (issue 16; option
// cuda_persistent_decode; cpp/op_params.h PersistentLayer / PersistentDecodeParams).
//
// One cooperative launch runs up to kPersistentMaxLayers layers of one decode step; the
// separate kernels' boundaries become grid-wide barriers (cooperative_groups grid.sync), and
// each block prefetches the weight rows of its next stages into L2 before it waits, so that the
// memory system keeps streaming weights while a barrier or a short stage resolves. Per layer,
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
// Grid: (SMs x blocks per SM, all co-resident: a cooperative launch); block: 8 warps. Warp-row
//   GEMVs: global warp gw = blockIdx.x * 8 + warp takes rows gw, gw + 8 grid, ...; block-row
//   GEMVs: block b takes rows b, b + grid, ...; the scan: warp gw takes channels in groups of
//   32 / g lanes (g = min(32, next_pow2(N))), as mamba1_decode_kernel's warps do.
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

constexpr int kPWarps = 8;  // the separate GEMVs' and add_norm emulation's block size
constexpr int kPThreads = kPWarps * 32;
constexpr int kPUnroll = 4;          // gemv_kernel's loads in flight per lane
constexpr int64_t kNarrow = 1024;    // gemv_rows_kernel below this many output rows (linear.cu)
constexpr int kNormVirt = 1024 / kPThreads;  // add_norm_kernel runs 1024 threads at decode

struct PArgs {
    PersistentLayer layers[kPersistentMaxLayers];
    int n;          // layers in this launch
    int g;          // lanes per scan channel
    int64_t d;
    float eps;
    bool rms;
    bool prefetch;
    float* residual;  // (d)
};
static_assert(sizeof(PArgs) <= 4000, "the persistent decode's arguments exceed 4 KB");

// add_norm_kernel's block_sum over 1024 threads, thread t standing for threads t + 256 j.
__device__ __forceinline__ float sum_as_1024(const float (&s)[kNormVirt], float* red) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
#pragma unroll
    for (int j = 0; j < kNormVirt; ++j) {
        const float v = warp_sum(s[j]);
        if (lane == 0) red[warp + kPWarps * j] = v;
    }
    __syncthreads();
    return warp_sum(red[lane]);
}

// xs (d) = the block norm of the residual, add_norm_kernel's arithmetic (its add happened in the
// previous layer's S4, as the separate add_norm does it: r + h).
__device__ void norm_into(const PArgs& a, const PersistentLayer& L, float* xs, float* red) {
    const int t = threadIdx.x;
    const int64_t d = a.d;
    const float* r = a.residual;
    constexpr int kStride = kNormVirt * kPThreads;
    float s[kNormVirt];
#pragma unroll
    for (int j = 0; j < kNormVirt; ++j) {
        s[j] = 0.0f;
        for (int64_t k = t + kPThreads * j; k < d; k += kStride) s[j] = add_norm_acc(s[j], __ldcg(r + k), a.rms);
    }
    const float tot = sum_as_1024(s, red);
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
        const float ss = sum_as_1024(s, red);
        const float rstd = rsqrtf(ss / float(d) + a.eps);
        for (int64_t k = t; k < d; k += kPThreads)
            xs[k] = (__ldcg(r + k) - mean) * rstd * (L.norm_w ? L.norm_w[k] : 1.0f) + (L.norm_b ? L.norm_b[k] : 0.0f);
    }
    __syncthreads();
}

// xs (K) = x, written by other blocks of this launch.
__device__ __forceinline__ void stage_in(float* xs, const float* x, int64_t K) {
    for (int64_t k = threadIdx.x; k < K; k += kPThreads) xs[k] = __ldcg(x + k);
    __syncthreads();
}

// One output row's dot product by one warp: gemv_kernel's loop for M = 1 (x in shared memory).
template <typename T>
__device__ __forceinline__ float dot_warp(const T* w, const float* xs, int64_t K) {
    constexpr int kE = Vec<T>::kN;
    const int lane = threadIdx.x & 31;
    const int64_t nvec = K / kE;
    const uint4* wv = reinterpret_cast<const uint4*>(w);
    float acc = 0.0f;
    for (int64_t v0 = lane; v0 < nvec; v0 += 32 * kPUnroll) {
        uint4 raw[kPUnroll];
#pragma unroll
        for (int u = 0; u < kPUnroll; ++u) {
            const int64_t v = v0 + int64_t(u) * 32;
            raw[u] = v < nvec ? __ldcs(wv + v) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < kPUnroll; ++u) {
            const int64_t v = v0 + int64_t(u) * 32;
            if (v >= nvec) break;
            float wf[kE];
            Vec<T>::unpack(raw[u], wf);
            const float4* xr = reinterpret_cast<const float4*>(xs + v * kE);
#pragma unroll
            for (int q = 0; q < kE / 4; ++q) {
                const float4 xv = xr[q];
                acc += wf[4 * q] * xv.x + wf[4 * q + 1] * xv.y + wf[4 * q + 2] * xv.z +
                       wf[4 * q + 3] * xv.w;
            }
        }
    }
    return warp_sum(acc);
}

// One output row's dot product by the whole block: gemv_rows_kernel's loop for M = 1; the total
// is returned to thread 0.
template <typename T>
__device__ __forceinline__ float dot_block(const T* w, const float* xs, int64_t K, float* part) {
    constexpr int kE = Vec<T>::kN;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int64_t nvec = K / kE;
    const uint4* wv = reinterpret_cast<const uint4*>(w);
    float acc = 0.0f;
    for (int64_t v = threadIdx.x; v < nvec; v += kPThreads) {
        float wf[kE];
        Vec<T>::unpack(__ldcs(wv + v), wf);
        const float4* xr = reinterpret_cast<const float4*>(xs + v * kE);
#pragma unroll
        for (int q = 0; q < kE / 4; ++q) {
            const float4 xv = xr[q];
            acc += wf[4 * q] * xv.x + wf[4 * q + 1] * xv.y + wf[4 * q + 2] * xv.z +
                   wf[4 * q + 3] * xv.w;
        }
    }
    const float v = warp_sum(acc);
    __syncthreads();  // part may still be read for the previous row
    if (lane == 0) part[warp] = v;
    __syncthreads();
    float tot = 0.0f;
    if (threadIdx.x == 0) {
#pragma unroll
        for (int w2 = 0; w2 < kPWarps; ++w2) tot += part[w2];
    }
    return tot;
}

// y[n] for n < N rows of W (N, K) · xs, stored by store(n, acc): a warp per row from kNarrow
// rows, else a block per row (the separate GEMV's choice).
template <typename T, class Store>
__device__ __forceinline__ void gemv(const void* W, int64_t N, int64_t K, const float* xs,
                                     float* part, Store store) {
    const T* w = static_cast<const T*>(W);
    if (N < kNarrow) {
        for (int64_t n = blockIdx.x; n < N; n += gridDim.x) {
            const float t = dot_block<T>(w + n * K, xs, K, part);
            if (threadIdx.x == 0) store(n, t);
        }
    } else {
        const int64_t tw = int64_t(gridDim.x) * kPWarps;
        for (int64_t n = int64_t(blockIdx.x) * kPWarps + (threadIdx.x >> 5); n < N; n += tw) {
            const float t = dot_warp<T>(w + n * K, xs, K);
            if ((threadIdx.x & 31) == 0) store(n, t);
        }
    }
}

// L2 prefetch of the rows this block (or warp) takes in gemv() above.
template <typename T>
__device__ __forceinline__ void prefetch_rows(const void* W, int64_t N, int64_t K) {
    const T* w = static_cast<const T*>(W);
    const int64_t bytes = K * int64_t(sizeof(T));
    if (N < kNarrow) {
        for (int64_t n = blockIdx.x; n < N; n += gridDim.x)
            prefetch_l2(w + n * K, bytes, threadIdx.x, kPThreads);
    } else {
        const int64_t tw = int64_t(gridDim.x) * kPWarps;
        for (int64_t n = int64_t(blockIdx.x) * kPWarps + (threadIdx.x >> 5); n < N; n += tw)
            prefetch_l2(w + n * K, bytes, threadIdx.x & 31, 32);
    }
}

// S3 for the channels of this warp: mamba1_decode_kernel's arithmetic (batch 1); xd = xdbl in
// shared memory.
template <typename T, int SPL>
__device__ __forceinline__ void scan_channels(const PersistentLayer& L, int g, const float* xd) {
    const int lane = threadIdx.x & 31;
    const int j = lane % g, cpw = 32 / g;
    const int64_t N = L.N, R = L.R, E = L.E;
    const int64_t tw = int64_t(gridDim.x) * kPWarps;
    for (int64_t base = (int64_t(blockIdx.x) * kPWarps + (threadIdx.x >> 5)) * cpw; base < E;
         base += tw * cpw) {
        const int64_t e_raw = base + lane / g;
        const bool valid = e_raw < E;
        const int64_t e = valid ? e_raw : E - 1;  // idle lanes still join the shuffles
        const T* wrow = static_cast<const T*>(L.dt_proj) + e * R;
        float dt = 0.0f;
        for (int64_t r = j; r < R; r += g) dt += to_f32(wrow[r]) * xd[r];
        for (int o = g >> 1; o > 0; o >>= 1) dt += __shfl_xor_sync(0xffffffffu, dt, o);
        const float delta = softplus_f(dt + L.dt_bias[e]);
        const float u = __ldcg(L.xconv + e);
        const float du = delta * u;
        float* state = L.ssm_state + e * N;
        float acc = 0.0f;
        float hn[SPL];
#pragma unroll
        for (int i = 0; i < SPL; ++i) {
            const int64_t n = j + int64_t(g) * i;
            if (n < N) {
                hn[i] = expf(delta * L.A[e * N + n]) * state[n] + du * xd[R + n];
                acc += xd[R + N + n] * hn[i];
            }
        }
        for (int o = g >> 1; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
        if (valid) {
#pragma unroll
            for (int i = 0; i < SPL; ++i) {
                const int64_t n = j + int64_t(g) * i;
                if (n < N) state[n] = hn[i];
            }
            if (j == 0) L.y[e] = (acc + L.D[e] * u) * silu_f(__ldcg(L.proj + E + e));
        }
    }
}

template <typename T>
__device__ __forceinline__ void prefetch_dt_rows(const PersistentLayer& L, int g) {
    const int cpw = 32 / g;
    const int64_t tw = int64_t(gridDim.x) * kPWarps;
    const int64_t bytes = int64_t(cpw) * L.R * int64_t(sizeof(T));
    for (int64_t base = (int64_t(blockIdx.x) * kPWarps + (threadIdx.x >> 5)) * cpw; base < L.E;
         base += tw * cpw)
        prefetch_l2(static_cast<const T*>(L.dt_proj) + base * L.R,
                    base + cpw <= L.E ? bytes : (L.E - base) * L.R * int64_t(sizeof(T)),
                    threadIdx.x & 31, 32);
}

template <typename T, int SPL>
__global__ void __launch_bounds__(kPThreads) persistent_decode_kernel(PArgs a) {
    extern __shared__ float4 smem4[];  // (max(d, E, R + 2N)) the current stage's input
    float* xs = reinterpret_cast<float*>(smem4);
    __shared__ float red[32];
    __shared__ float part[kPWarps];
    cg::grid_group grid = cg::this_grid();
    const int64_t d = a.d;
    if (a.prefetch) prefetch_rows<T>(a.layers[0].in_proj, 2 * a.layers[0].E, d);
    for (int l = 0; l < a.n; ++l) {
        const PersistentLayer& L = a.layers[l];
        const int64_t E = L.E, X = L.R + 2 * L.N, W = L.W;
        // S1: norm, in_proj, conv step
        norm_into(a, L, xs, red);
        gemv<T>(L.in_proj, 2 * E, d, xs, part, [&](int64_t n, float acc) {
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
        if (a.prefetch) {
            prefetch_rows<T>(L.x_proj, X, E);
            prefetch_dt_rows<T>(L, a.g);
            prefetch_rows<T>(L.out_proj, d, E);
        }
        grid.sync();
        // S2: x_proj
        stage_in(xs, L.xconv, E);
        gemv<T>(L.x_proj, X, E, xs, part, [&](int64_t n, float acc) { L.xdbl[n] = acc; });
        grid.sync();
        // S3: dt_proj, scan, gate
        stage_in(xs, L.xdbl, X);
        scan_channels<T, SPL>(L, a.g, xs);
        grid.sync();
        // S4: out_proj, the residual add
        stage_in(xs, L.y, E);
        gemv<T>(L.out_proj, d, E, xs, part, [&](int64_t n, float acc) {
            const float v = acc + (L.out_bias ? L.out_bias[n] : 0.0f);
            a.residual[n] = __ldcg(a.residual + n) + v;
        });
        if (l + 1 < a.n) {
            if (a.prefetch) prefetch_rows<T>(a.layers[l + 1].in_proj, 2 * a.layers[l + 1].E, d);
            grid.sync();
        }
    }
}

template <typename T, int SPL>
void launch_typed(const PArgs& a, int ctas_per_sm, size_t smem, cudaStream_t s) {
    auto* kernel = persistent_decode_kernel<T, SPL>;
    int dev = 0, sms = 0, fit = 0;
    check(cudaGetDevice(&dev), "cudaGetDevice");
    check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), "cudaDeviceGetAttribute");
    check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&fit, kernel, kPThreads, smem),
          "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
    const int per_sm = std::max(1, std::min(ctas_per_sm, fit));
    if (fit < 1) throw Unsupported("launch_persistent_decode: the kernel does not fit a multiprocessor");
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(unsigned(sms * per_sm));
    cfg.blockDim = dim3(kPThreads);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = s;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeCooperative;
    attr[0].val.cooperative = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    check(cudaLaunchKernelEx(&cfg, kernel, a), "cudaLaunchKernelEx (persistent decode)");
}

template <typename T>
void launch_spl(const PArgs& a, int spl, int ctas_per_sm, size_t smem, cudaStream_t s) {
    if (spl == 1)
        launch_typed<T, 1>(a, ctas_per_sm, smem, s);
    else if (spl == 2)
        launch_typed<T, 2>(a, ctas_per_sm, smem, s);
    else if (spl <= 4)
        launch_typed<T, 4>(a, ctas_per_sm, smem, s);
    else
        launch_typed<T, 8>(a, ctas_per_sm, smem, s);
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
        if (!L.in_proj || !L.conv_w || !L.x_proj || !L.dt_proj || !L.dt_bias || !L.A || !L.D ||
            !L.out_proj || !L.conv_state || !L.ssm_state || !L.proj || !L.xconv || !L.xdbl || !L.y)
            return false;
    }
    return true;
}

bool launch_persistent_decode(const PersistentDecodeParams& p, int ctas_per_sm, bool prefetch,
                              cudaStream_t s) {
    if (!persistent_decode_supported(p)) return false;
    MAMBART_CHECK_ARG(ctas_per_sm >= 1, "launch_persistent_decode: ctas_per_sm=", ctas_per_sm);
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
        a.residual = p.residual;
        int64_t m = p.d;
        for (int i = 0; i < a.n; ++i) {
            a.layers[i] = p.layers[l0 + i];
            m = std::max(m, std::max(a.layers[i].E, a.layers[i].R + 2 * a.layers[i].N));
        }
        const size_t smem = size_t(m) * sizeof(float);
        switch (p.layers[0].dtype) {
            case DType::F32: launch_spl<float>(a, spl, ctas_per_sm, smem, s); break;
            case DType::F16: launch_spl<__half>(a, spl, ctas_per_sm, smem, s); break;
            default: launch_spl<__nv_bfloat16>(a, spl, ctas_per_sm, smem, s); break;
        }
        check_launch("persistent_decode_kernel", s);
    }
    return true;
}

}  // namespace cuda
}  // namespace mambart

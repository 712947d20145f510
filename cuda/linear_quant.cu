// cuda/linear_quant.cu: projections with quantized weights (issue 18; layouts in
// cpp/op_params.h Weight), y[M, N] = x[M, K] · dequant(W)[N, K]ᵀ (+ bias[N]).
//
// quant_gemv_kernel (M <= kGemvMaxRows, decode): bandwidth-bound, the weights dequantized in
//   registers, fp32 activations and accumulation.
//     int8: w[n, k] = s[n] · q[n, k]; the row's scale applied once to the warp's sum.
//     int4: w[n, k] = s[n, k / group] · (u[n, k] - 8); one 16-byte load is a whole block of 32
//           weights (byte j: weight j low nibble, weight j + 16 high nibble), scaled by its group.
//   Grid: ceil(N / kQuantWarps); block: kQuantWarps warps; warp w owns output row
//   n = blockIdx.x * kQuantWarps + w for all M rows. Lanes stride over the row's 16-byte chunks
//   (int8: 16 weights, int4: 32), kQuantUnroll chunks in flight per lane; a warp reduction.
//   Bytes to fp32 without I2F: 0x4B000000 | b is the float 2^23 + b, so subtracting 2^23 (+ the
//   offset: 8 for int4, 128 for int8 stored as b ^ 0x80) is exact.
//   Vector path preconditions (else a scalar path): x 16-byte aligned and ldx % 4 == 0, W 16-byte
//   aligned, int8 K % 16 == 0 (int4 K % 32 == 0 always).
// dequant_bf16_kernel (prefill / M > kGemvMaxRows): rows [r0, r0 + rows) of W dequantized to a
//   bf16 (rows, K) workspace, one thread per element (coalesced writes); the caller then runs the
//   bf16 GEMM (cuBLAS or the hand-written tensor-core GEMM) on it, a bounded slab of rows at a
//   time. Grid: (ceil(K / 256), rows).
// embedding_quant_kernel: out[i, :] = dequant(W)[ids[i], :] (a zero row for ids outside [0, V)).
//   Grid: n; block 256 threads over d.
#include "common.cuh"
#include "kernels.h"

namespace mambart {
namespace cuda {
namespace {

constexpr int kQuantWarps = 8;
constexpr int kQuantUnroll = 4;

__device__ __forceinline__ float u8f(uint32_t b) {  // b in [0, 255] -> float(b) + 2^23
    return __uint_as_float(0x4B000000u | b);
}

// One weight, scalar (the non-vector path, the dequant and embedding kernels).
template <QuantScheme Q>
__device__ __forceinline__ float dequant1(const uint8_t* W, const float* scales, int64_t K,
                                          int64_t group, int64_t n, int64_t k) {
    if (Q == QuantScheme::Int8) {
        return float(reinterpret_cast<const int8_t*>(W)[n * K + k]) * scales[n];
    } else {
        const int64_t j = k & 31;
        const uint8_t b = W[n * (K / 2) + (k >> 5) * 16 + (j & 15)];
        const int u = j < 16 ? (b & 15) : (b >> 4);
        return float(u - 8) * scales[n * (K / group) + k / group];
    }
}

template <QuantScheme Q, int M, bool kVec>
__global__ void __launch_bounds__(kQuantWarps * 32) quant_gemv_kernel(QuantLinearParams p) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int64_t n = int64_t(blockIdx.x) * kQuantWarps + warp;
    const int64_t rb = Q == QuantScheme::Int8 ? p.K : p.K / 2;  // bytes per weight row
    const uint8_t* w = static_cast<const uint8_t*>(p.W) + n * rb;
    // PDL: the weight row does not depend on earlier kernels: start streaming it before waiting.
    if (p.prefetch && n < p.N) prefetch_l2(w, rb, lane, 32);
    pdl_wait();
    pdl_trigger();
    if (n >= p.N) return;
    const int64_t G = p.K / p.group;
    const float* ws = p.scales + n * G;  // (G) this row's scales
    float acc[M];
#pragma unroll
    for (int m = 0; m < M; ++m) acc[m] = 0.0f;
    if (kVec) {
        const int64_t nvec = rb / 16;
        const uint4* wv = reinterpret_cast<const uint4*>(w);
        for (int64_t v0 = lane; v0 < nvec; v0 += 32 * kQuantUnroll) {
            uint4 raw[kQuantUnroll];
#pragma unroll
            for (int u = 0; u < kQuantUnroll; ++u) {
                const int64_t v = v0 + int64_t(u) * 32;
                raw[u] = v < nvec ? __ldcs(wv + v) : make_uint4(0, 0, 0, 0);
            }
#pragma unroll
            for (int u = 0; u < kQuantUnroll; ++u) {
                const int64_t v = v0 + int64_t(u) * 32;
                if (v >= nvec) break;
                const uint32_t r[4] = {raw[u].x, raw[u].y, raw[u].z, raw[u].w};
                if (Q == QuantScheme::Int8) {
                    float wf[16];  // weights k0 .. k0 + 16
#pragma unroll
                    for (int i = 0; i < 16; ++i)
                        wf[i] = u8f(((r[i >> 2] >> (8 * (i & 3))) & 0xFFu) ^ 0x80u) - 8388736.0f;
                    const int64_t k0 = v * 16;
#pragma unroll
                    for (int m = 0; m < M; ++m) {
                        const float4* xr = reinterpret_cast<const float4*>(p.x + m * p.ldx + k0);
                        float s = 0.0f;
#pragma unroll
                        for (int q = 0; q < 4; ++q) {
                            const float4 xv = __ldg(xr + q);
                            s += wf[4 * q] * xv.x + wf[4 * q + 1] * xv.y + wf[4 * q + 2] * xv.z +
                                 wf[4 * q + 3] * xv.w;
                        }
                        acc[m] += s;
                    }
                } else {
                    float lo[16], hi[16];  // weights k0 + j and k0 + 16 + j
#pragma unroll
                    for (int i = 0; i < 16; ++i) {
                        const uint32_t b = (r[i >> 2] >> (8 * (i & 3))) & 0xFFu;
                        lo[i] = u8f(b & 15u) - 8388616.0f;
                        hi[i] = u8f(b >> 4) - 8388616.0f;
                    }
                    const int64_t k0 = v * 32;
                    const float sc = __ldg(ws + k0 / p.group);
#pragma unroll
                    for (int m = 0; m < M; ++m) {
                        const float4* xl = reinterpret_cast<const float4*>(p.x + m * p.ldx + k0);
                        const float4* xh = xl + 4;
                        float s = 0.0f;
#pragma unroll
                        for (int q = 0; q < 4; ++q) {
                            const float4 a = __ldg(xl + q), b = __ldg(xh + q);
                            s += lo[4 * q] * a.x + lo[4 * q + 1] * a.y + lo[4 * q + 2] * a.z +
                                 lo[4 * q + 3] * a.w + hi[4 * q] * b.x + hi[4 * q + 1] * b.y +
                                 hi[4 * q + 2] * b.z + hi[4 * q + 3] * b.w;
                        }
                        acc[m] += sc * s;
                    }
                }
            }
        }
    } else {
        const uint8_t* W = static_cast<const uint8_t*>(p.W);
        for (int64_t k = lane; k < p.K; k += 32) {
            // int8: the row's scale is applied after the sum, as on the vector path
            const float wk = Q == QuantScheme::Int8
                                 ? float(reinterpret_cast<const int8_t*>(w)[k])
                                 : dequant1<Q>(W, p.scales, p.K, p.group, n, k);
#pragma unroll
            for (int m = 0; m < M; ++m) acc[m] += wk * p.x[m * p.ldx + k];
        }
    }
#pragma unroll
    for (int m = 0; m < M; ++m) acc[m] = warp_sum(acc[m]);
    if (lane == 0) {
        const float rs = Q == QuantScheme::Int8 ? ws[0] : 1.0f;
        const float b = p.bias ? p.bias[n] : 0.0f;
#pragma unroll
        for (int m = 0; m < M; ++m) p.y[m * p.ldy + n] = acc[m] * rs + b;
    }
}

template <QuantScheme Q, bool kVec>
void gemv_rows(const QuantLinearParams& p, cudaStream_t s) {
    const dim3 grid(unsigned(ceil_div(p.N, kQuantWarps)));
    const dim3 block(kQuantWarps * 32);
    switch (p.M) {
        case 1: launch_pdl(quant_gemv_kernel<Q, 1, kVec>, grid, block, 0, s, p); break;
        case 2: launch_pdl(quant_gemv_kernel<Q, 2, kVec>, grid, block, 0, s, p); break;
        case 3: launch_pdl(quant_gemv_kernel<Q, 3, kVec>, grid, block, 0, s, p); break;
        case 4: launch_pdl(quant_gemv_kernel<Q, 4, kVec>, grid, block, 0, s, p); break;
        case 5: launch_pdl(quant_gemv_kernel<Q, 5, kVec>, grid, block, 0, s, p); break;
        case 6: launch_pdl(quant_gemv_kernel<Q, 6, kVec>, grid, block, 0, s, p); break;
        case 7: launch_pdl(quant_gemv_kernel<Q, 7, kVec>, grid, block, 0, s, p); break;
        default: launch_pdl(quant_gemv_kernel<Q, 8, kVec>, grid, block, 0, s, p); break;
    }
}

template <QuantScheme Q>
__global__ void dequant_bf16_kernel(const uint8_t* __restrict__ W, const float* __restrict__ scales,
                                    int64_t K, int64_t group, int64_t r0,
                                    __nv_bfloat16* __restrict__ out) {
    const int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x, r = blockIdx.y;
    if (k >= K) return;
    out[r * K + k] = __float2bfloat16(dequant1<Q>(W, scales, K, group, r0 + r, k));
}

template <QuantScheme Q>
__global__ void embedding_quant_kernel(const int32_t* __restrict__ ids, const uint8_t* __restrict__ W,
                                       const float* __restrict__ scales, int64_t group,
                                       float* __restrict__ out, int64_t d, int64_t V) {
    pdl_wait();  // launched with launch_pdl (see common.cuh)
    pdl_trigger();
    const int64_t i = blockIdx.x, id = ids[i];
    float* o = out + i * d;
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x)
        o[j] = (id < 0 || id >= V) ? 0.0f : dequant1<Q>(W, scales, d, group, id, j);
}

void check_quant(QuantScheme q, int64_t K, int64_t group, const char* who) {
    MAMBART_CHECK_ARG(q == QuantScheme::Int8 || q == QuantScheme::Int4, who,
                      ": scheme ", quant_scheme_name(q), " is not supported on CUDA (int8, int4)");
    if (q == QuantScheme::Int8)
        MAMBART_CHECK_ARG(group == K, who, ": int8 scales are per row (group == K)");
    else
        MAMBART_CHECK_ARG(K % 32 == 0 && group > 0 && group % 32 == 0 && K % group == 0, who,
                          ": int4 needs K % 32 == 0 and a group (", group,
                          ") that is a multiple of 32 dividing K=", K);
}

}  // namespace

void launch_linear_quant(const QuantLinearParams& params, cudaStream_t s) {
    QuantLinearParams p = params;
    p.prefetch = weight_prefetch_enabled();
    MAMBART_CHECK_ARG(p.M >= 0 && p.M <= kGemvMaxRows && p.N > 0 && p.K > 0,
                      "launch_linear_quant: bad sizes M=", p.M, " (<= ", kGemvMaxRows, ") N=",
                      p.N, " K=", p.K);
    MAMBART_CHECK_ARG(p.ldx >= p.K && p.ldy >= p.N, "launch_linear_quant: ldx=", p.ldx,
                      " ldy=", p.ldy);
    MAMBART_CHECK_ARG(p.x && p.W && p.scales && p.y, "launch_linear_quant: null pointer");
    check_quant(p.quant, p.K, p.group, "launch_linear_quant");
    MAMBART_CHECK_ARG(ceil_div(p.N, kQuantWarps) <= 0x7fffffff, "launch_linear_quant: N too large");
    if (p.M == 0) return;
    const bool vec = p.ldx % 4 == 0 && reinterpret_cast<uintptr_t>(p.x) % 16 == 0 &&
                     reinterpret_cast<uintptr_t>(p.W) % 16 == 0 &&
                     (p.quant == QuantScheme::Int4 || p.K % 16 == 0);
    if (p.quant == QuantScheme::Int8) {
        if (vec) gemv_rows<QuantScheme::Int8, true>(p, s);
        else gemv_rows<QuantScheme::Int8, false>(p, s);
    } else {
        if (vec) gemv_rows<QuantScheme::Int4, true>(p, s);
        else gemv_rows<QuantScheme::Int4, false>(p, s);
    }
    check_launch("quant_gemv_kernel", s);
}

void launch_dequant_bf16(const void* W, QuantScheme q, const float* scales, int64_t group,
                         int64_t K, int64_t r0, int64_t rows, void* out, cudaStream_t s) {
    MAMBART_CHECK_ARG(W && scales && out && K > 0 && r0 >= 0 && rows >= 0,
                      "launch_dequant_bf16: bad arguments");
    MAMBART_CHECK_ARG(rows <= 65535, "launch_dequant_bf16: rows=", rows, " > 65535");
    check_quant(q, K, group, "launch_dequant_bf16");
    if (rows == 0) return;
    const dim3 grid(unsigned(ceil_div(K, 256)), unsigned(rows));
    const uint8_t* w = static_cast<const uint8_t*>(W);
    auto* o = static_cast<__nv_bfloat16*>(out);
    if (q == QuantScheme::Int8)
        dequant_bf16_kernel<QuantScheme::Int8><<<grid, 256, 0, s>>>(w, scales, K, group, r0, o);
    else
        dequant_bf16_kernel<QuantScheme::Int4><<<grid, 256, 0, s>>>(w, scales, K, group, r0, o);
    check_launch("dequant_bf16_kernel", s);
}

void launch_embedding_quant(const EmbeddingParams& p, QuantScheme q, const float* scales,
                            int64_t group, cudaStream_t s) {
    MAMBART_CHECK_ARG(p.n >= 0 && p.d > 0 && p.V > 0, "launch_embedding_quant: bad sizes n=",
                      p.n, " d=", p.d, " V=", p.V);
    MAMBART_CHECK_ARG(p.ids && p.table && p.out && scales, "launch_embedding_quant: null pointer");
    check_quant(q, p.d, group, "launch_embedding_quant");
    if (p.n == 0) return;
    MAMBART_CHECK_ARG(p.n <= 0x7fffffff, "launch_embedding_quant: n=", p.n, " too large");
    const uint8_t* w = static_cast<const uint8_t*>(p.table);
    if (q == QuantScheme::Int8)
        launch_pdl(embedding_quant_kernel<QuantScheme::Int8>, dim3(unsigned(p.n)), dim3(256), 0, s,
                   p.ids, w, scales, group, p.out, p.d, p.V);
    else
        launch_pdl(embedding_quant_kernel<QuantScheme::Int4>, dim3(unsigned(p.n)), dim3(256), 0, s,
                   p.ids, w, scales, group, p.out, p.d, p.V);
    check_launch("embedding_quant_kernel", s);
}

}  // namespace cuda
}  // namespace mambart

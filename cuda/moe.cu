// cuda/moe.cu: routed SwiGLU experts (Backend::moe; MoeParams in cpp/op_params.h), a simple
// correct version: every (row, slot) pair reads its expert's rows directly (a gather GEMV), no
// grouping by expert, no host round trip (the routing stays on the device, so decode steps
// record into graphs). Decode reads each routed expert once per row, which is what a step must
// read; long prefills re-read an expert for every row routed to it (a grouped GEMM is the
// faster form, left for later).
//
// moe_route_kernel:  per row r, the k largest logits (descending; ties to the lower id) by k
//   warp argmax passes over the experts not yet taken; weights: softmax over the k selected
//   (normalize) or the full softmax over X at them; route[r] = [ids (int32 bits) | weights].
//   Grid: (R); block: 32 (one warp). Preconditions: 1 <= k <= min(X, kMoeMaxTopK).
// moe_up_kernel:     h[r, j I + i] = silu(W_in[e, i] · x_r) * (W_in[e, I + i] · x_r), e = id(r, j)
//   Grid: (R k, ceil(I / 8)); block: 256 = 8 warps, one output feature i per warp, the lanes
//   striding over d (coalesced weight rows), fp32 accumulation.
// moe_down_kernel:   out[r, n] += scale Σ_j w(r, j) · (W_out[e_j, n] · h[r, j I : (j+1) I])
//   Grid: (R, ceil(d / 8)); block: 256 = 8 warps, one output feature n per warp (no atomics:
//   each out element has one writer).
#include <cfloat>

#include "common.cuh"
#include "kernels.h"

namespace mambart {
namespace cuda {
namespace {

constexpr int kWarpsPerBlock = 8;

__global__ void moe_route_kernel(const float* __restrict__ logits, float* __restrict__ route,
                                 int64_t X, int64_t k, bool normalize) {
    __shared__ int32_t ids[kMoeMaxTopK];
    const int64_t r = blockIdx.x;
    const int lane = threadIdx.x;
    const float* lg = logits + r * X;
    for (int64_t j = 0; j < k; ++j) {
        float bv = -FLT_MAX;
        int64_t bi = -1;
        for (int64_t e = lane; e < X; e += 32) {
            bool taken = false;
            for (int64_t t = 0; t < j; ++t) taken = taken || ids[t] == e;
            if (taken) continue;
            if (bi < 0 || lg[e] > bv) {  // lanes scan ascending ids: ties keep the lower
                bv = lg[e];
                bi = e;
            }
        }
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
            const int64_t oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (oi >= 0 && (bi < 0 || ov > bv || (ov == bv && oi < bi))) {
                bv = ov;
                bi = oi;
            }
        }
        if (lane == 0) ids[j] = int32_t(bi < 0 ? 0 : bi);
        __syncwarp();
    }
    const float m = lg[ids[0]];
    float z = 0.0f;
    if (normalize) {
        for (int64_t j = lane; j < k; j += 32) z += expf(lg[ids[j]] - m);
    } else {
        for (int64_t e = lane; e < X; e += 32) z += expf(lg[e] - m);
    }
    z = warp_sum(z);
    float* out = route + r * 2 * k;
    for (int64_t j = lane; j < k; j += 32) {
        out[j] = __int_as_float(ids[j]);
        out[k + j] = expf(lg[ids[j]] - m) / z;
    }
}

template <typename T>
__device__ __forceinline__ float row_dot(const T* __restrict__ w, const float* __restrict__ x,
                                         int64_t K, int lane) {
    float acc = 0.0f;
    for (int64_t c = lane; c < K; c += 32) acc = fmaf(to_f32(w[c]), x[c], acc);
    return warp_sum(acc);
}

template <typename T>
__global__ void moe_up_kernel(const float* __restrict__ x, const float* __restrict__ route,
                              const T* __restrict__ w_in, float* __restrict__ h, int64_t d,
                              int64_t k, int64_t I) {
    const int64_t rj = blockIdx.x, r = rj / k, j = rj % k;
    const int64_t i = int64_t(blockIdx.y) * kWarpsPerBlock + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (i >= I) return;
    const int64_t e = __float_as_int(route[r * 2 * k + j]);
    const T* we = w_in + e * 2 * I * d;
    const float* xr = x + r * d;
    const float g = row_dot(we + i * d, xr, d, lane);
    const float u = row_dot(we + (I + i) * d, xr, d, lane);
    if (lane == 0) h[r * k * I + j * I + i] = silu_f(g) * u;
}

template <typename T>
__global__ void moe_down_kernel(const float* __restrict__ h, const float* __restrict__ route,
                                const T* __restrict__ w_out, float* __restrict__ out, int64_t d,
                                int64_t k, int64_t I, float scale) {
    const int64_t r = blockIdx.x;
    const int64_t n = int64_t(blockIdx.y) * kWarpsPerBlock + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (n >= d) return;
    float acc = 0.0f;
    for (int64_t j = 0; j < k; ++j) {
        const int64_t e = __float_as_int(route[r * 2 * k + j]);
        const float w = route[r * 2 * k + k + j];
        acc += w * row_dot(w_out + (e * d + n) * I, h + r * k * I + j * I, I, lane);
    }
    if (lane == 0) out[r * d + n] += scale * acc;
}

template <typename T>
void launch_experts(const MoeParams& p, cudaStream_t s) {
    const dim3 up(unsigned(p.R * p.k), unsigned(ceil_div(p.I, kWarpsPerBlock)));
    moe_up_kernel<T><<<up, 32 * kWarpsPerBlock, 0, s>>>(
        p.x, p.route, static_cast<const T*>(p.w_in.data), p.h, p.d, p.k, p.I);
    check_launch("moe_up_kernel", s);
    const dim3 down(unsigned(p.R), unsigned(ceil_div(p.d, kWarpsPerBlock)));
    moe_down_kernel<T><<<down, 32 * kWarpsPerBlock, 0, s>>>(
        p.h, p.route, static_cast<const T*>(p.w_out.data), p.out, p.d, p.k, p.I, p.scale);
    check_launch("moe_down_kernel", s);
}

}  // namespace

void launch_moe(const MoeParams& p, cudaStream_t s) {
    MAMBART_CHECK_ARG(p.R >= 0 && p.d > 0 && p.X > 0 && p.k >= 1 && p.k <= p.X &&
                          p.k <= kMoeMaxTopK && p.I > 0,
                      "launch_moe: bad sizes R=", p.R, " d=", p.d, " X=", p.X, " k=", p.k,
                      " I=", p.I);
    MAMBART_CHECK_ARG(p.w_in.rows == p.X && p.w_in.cols == 2 * p.I * p.d &&
                          p.w_out.rows == p.X && p.w_out.cols == p.d * p.I &&
                          p.w_in.dtype == p.w_out.dtype,
                      "launch_moe: expert matrices do not match X=", p.X, " I=", p.I, " d=", p.d);
    MAMBART_CHECK_ARG(p.x && p.logits && p.route && p.h && p.out, "launch_moe: null pointer");
    MAMBART_CHECK_ARG(p.R * p.k <= 0x7fffffff && ceil_div(p.I, kWarpsPerBlock) <= 65535 &&
                          ceil_div(p.d, kWarpsPerBlock) <= 65535 && p.X <= 0x7fffffff,
                      "launch_moe: R=", p.R, " k=", p.k, " I=", p.I, " d=", p.d,
                      " exceed the grid");
    if (p.R == 0) return;
    moe_route_kernel<<<unsigned(p.R), 32, 0, s>>>(p.logits, p.route, p.X, p.k, p.normalize);
    check_launch("moe_route_kernel", s);
    switch (p.w_in.dtype) {
        case DType::F32: launch_experts<float>(p, s); break;
        case DType::F16: launch_experts<__half>(p, s); break;
        case DType::BF16: launch_experts<__nv_bfloat16>(p, s); break;
    }
}

}  // namespace cuda
}  // namespace mambart

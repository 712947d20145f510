// cuda/norm.cu: the fused residual add + RMSNorm / LayerNorm, and Mamba-2's grouped gated RMSNorm.
//
// add_norm:  r = residual + hidden (written back to residual, fp32);
//            RMSNorm:   out = r * rsqrt(mean(r²) + eps) * w
//            LayerNorm: out = (r - mean(r)) * rsqrt(var(r) + eps) * w + b
//            (w == nullptr: no weight, i.e. 1; out may alias residual when hidden is nullptr;
//            out == nullptr: the add alone)
//   Grid: (n rows); block: 256 threads (1024 when n < 64) striding over d; fp32 block reductions.
//
// gated_rmsnorm (norm_before_gate=False): v = y * silu(z);
//            out = v * rsqrt(mean_group(v²) + eps) * w, per group of group_size along E
//   Grid: (n rows, E / group_size groups); block: 256 threads (1024 for fewer than 64 blocks)
//   striding over the group; groups of up to 16 elements a thread keep y silu(z) in registers
//   (with load_ahead_enabled(); else y and z are read again for the output).
//   Requires E % group_size == 0.
#include "common.cuh"
#include "kernels.h"

namespace mambart {
namespace cuda {
namespace {

constexpr int kThreads = 256;

__global__ void add_norm_kernel(AddNormParams p) {
    __shared__ float red[32];
    pdl_wait();  // launched with launch_pdl (see common.cuh)
    pdl_trigger();
    const int64_t i = blockIdx.x, d = p.d;
    float* r = p.residual + i * d;
    const float* h = p.hidden ? p.hidden + i * d : nullptr;
    float s = 0.0f;
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
        float v = r[j];
        if (h) {
            v += h[j];
            r[j] = v;
        }
        s = add_norm_acc(s, v, p.rms);
    }
    if (!p.out) return;  // the add alone (uniform across the block)
    s = block_sum(s, red);
    float* o = p.out + i * d;
    if (p.rms) {
        const float rstd = rsqrtf(s / float(d) + p.eps);
        for (int64_t j = threadIdx.x; j < d; j += blockDim.x)
            o[j] = r[j] * rstd * (p.w ? p.w[j] : 1.0f);
    } else {
        const float mean = s / float(d);
        float ss = 0.0f;
        for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
            const float c = r[j] - mean;
            ss = __fmaf_rn(c, c, ss);
        }
        ss = block_sum(ss, red);
        const float rstd = rsqrtf(ss / float(d) + p.eps);
        for (int64_t j = threadIdx.x; j < d; j += blockDim.x)
            o[j] = (r[j] - mean) * rstd * (p.w ? p.w[j] : 1.0f) + (p.b ? p.b[j] : 0.0f);
    }
}

// kPer > 0: the group fits kPer elements a thread (group_size <= kPer blockDim.x), and v stays
// in registers between the reduction and the output (one read of y and z, one silu each);
// kPer == 0: any group size, v recomputed in a second pass. Both sum the same terms in the same
// order per thread: the same results.
template <int kPer>
__global__ void gated_rmsnorm_kernel(GatedRmsNormParams p) {
    __shared__ float red[32];
    pdl_wait();  // launched with launch_pdl (see common.cuh)
    pdl_trigger();
    const int64_t i = blockIdx.x, g0 = int64_t(blockIdx.y) * p.group_size;
    const float* y = p.y + i * p.E + g0;
    const float* z = p.z + i * p.ld_z + g0;
    float* o = p.out + i * p.E + g0;
    const float* w = p.w + g0;
    const int64_t T = blockDim.x, G = p.group_size;
    float s = 0.0f;
    if constexpr (kPer > 0) {
        float yv[kPer], zv[kPer];
#pragma unroll
        for (int k = 0; k < kPer; ++k) {
            const int64_t j = threadIdx.x + k * T;
            yv[k] = j < G ? y[j] : 0.0f;
            zv[k] = j < G ? z[j] : 0.0f;
        }
#pragma unroll
        for (int k = 0; k < kPer; ++k) {
            if (threadIdx.x + k * T < G) {
                yv[k] *= silu_f(zv[k]);
                s = __fmaf_rn(yv[k], yv[k], s);
            }
        }
        s = block_sum(s, red);
        const float rstd = rsqrtf(s / float(G) + p.eps);
#pragma unroll
        for (int k = 0; k < kPer; ++k) {
            const int64_t j = threadIdx.x + k * T;
            if (j < G) o[j] = yv[k] * rstd * w[j];
        }
    } else {
        for (int64_t j = threadIdx.x; j < G; j += T) {
            const float v = y[j] * silu_f(z[j]);
            s = __fmaf_rn(v, v, s);
        }
        s = block_sum(s, red);
        const float rstd = rsqrtf(s / float(G) + p.eps);
        for (int64_t j = threadIdx.x; j < G; j += T) o[j] = y[j] * silu_f(z[j]) * rstd * w[j];
    }
}

}  // namespace

void launch_add_norm(const AddNormParams& p, cudaStream_t s) {
    MAMBART_CHECK_ARG(p.n >= 0 && p.d > 0, "launch_add_norm: bad sizes n=", p.n, " d=", p.d);
    MAMBART_CHECK_ARG(p.residual && (p.out || p.hidden), "launch_add_norm: null pointer");
    MAMBART_CHECK_ARG(p.n <= 0x7fffffff, "launch_add_norm: n=", p.n, " too large");
    if (p.n == 0) return;
    // few rows (decode): wide blocks, so one row's reductions finish quickly
    launch_pdl(add_norm_kernel, dim3(unsigned(p.n)), dim3(p.n < 64 ? 1024 : kThreads), 0, s, p);
    check_launch("add_norm_kernel", s);
}

void launch_gated_rmsnorm(const GatedRmsNormParams& p, cudaStream_t s) {
    MAMBART_CHECK_ARG(p.n >= 0 && p.E > 0 && p.group_size > 0 && p.E % p.group_size == 0,
                      "launch_gated_rmsnorm: E=", p.E, " must be a positive multiple of group_size=",
                      p.group_size);
    MAMBART_CHECK_ARG(p.ld_z >= p.E, "launch_gated_rmsnorm: ld_z=", p.ld_z, " < E=", p.E);
    MAMBART_CHECK_ARG(p.E / p.group_size <= 65535, "launch_gated_rmsnorm: too many groups");
    if (p.n == 0) return;
    const int threads = p.n * (p.E / p.group_size) < 64 ? 1024 : kThreads;
    const dim3 grid(unsigned(p.n), unsigned(p.E / p.group_size));
    const int64_t per = ceil_div(p.group_size, threads);
    if (!load_ahead_enabled())
        launch_pdl(gated_rmsnorm_kernel<0>, grid, dim3(threads), 0, s, p);
    else if (per <= 4)
        launch_pdl(gated_rmsnorm_kernel<4>, grid, dim3(threads), 0, s, p);
    else if (per <= 16)
        launch_pdl(gated_rmsnorm_kernel<16>, grid, dim3(threads), 0, s, p);
    else
        launch_pdl(gated_rmsnorm_kernel<0>, grid, dim3(threads), 0, s, p);
    check_launch("gated_rmsnorm_kernel", s);
}

}  // namespace cuda
}  // namespace mambart

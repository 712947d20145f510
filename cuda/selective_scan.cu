// cuda/selective_scan.cu: the Mamba-1 selective scan (prefill and the L = 1 decode step).
//
//   δ_t = softplus(dt[t, e] + dt_bias[e])            (threshold 20)
//   h[e, n] <- exp(δ_t A[e, n]) h[e, n] + δ_t u[t, e] B[t, n]        (fp32 state)
//   y[t, e] = (Σ_n C[t, n] h[e, n] + D[e] u[t, e]) · silu(z[t, e])
//
// Grid: (ceil(E / channels per block), B); block: 4 warps. A channel e is owned by a group of
// g = min(32, next_pow2(N)) lanes; lane j of the group holds states n = j + g·i (i < SPL =
// ceil(N / g)) in registers for the whole sequence, so the scan over L is sequential and the
// reduction over n is a shuffle within the group. The inputs of kT tokens are loaded into
// registers before their recurrence steps run (latency hiding). The final state is written back.
// Preconditions: 1 <= N <= 256; ld_bc >= N (B and C rows are slices of x_proj's output);
// ld_z >= E; y does not alias the inputs.
#include "common.cuh"
#include "kernels.h"

namespace mambart {
namespace cuda {
namespace {

constexpr int kScanWarps = 4;

template <int SPL>
__global__ void __launch_bounds__(kScanWarps * 32) selective_scan_kernel(SelectiveScanParams p, int g) {
    constexpr int kT = SPL <= 2 ? 8 : (SPL <= 4 ? 4 : 2);  // tokens prefetched per group
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int j = lane % g, cpw = 32 / g;
    const int64_t e_raw = (int64_t(blockIdx.x) * kScanWarps + warp) * cpw + lane / g;
    const bool valid = e_raw < p.E;
    const int64_t e = valid ? e_raw : p.E - 1;  // idle lanes still join the shuffles
    const int64_t b = blockIdx.y, E = p.E, N = p.N;
    float h[SPL], A[SPL];
    float* state = p.ssm_state + (b * E + e) * N;
#pragma unroll
    for (int i = 0; i < SPL; ++i) {
        const int64_t n = j + int64_t(g) * i;
        h[i] = n < N ? state[n] : 0.0f;
        A[i] = n < N ? p.A[e * N + n] : 0.0f;
    }
    const float dtb = p.dt_bias[e], Dv = p.D[e];
    // Tokens in groups of kT: every load of a group is issued before the group's sequential
    // recurrence runs, so global-memory latency is paid once per group, not per token.
    for (int64_t t0 = 0; t0 < p.L; t0 += kT) {
        float dtv[kT], uv[kT], zv[kT], Bv[kT][SPL], Cv[kT][SPL];
#pragma unroll
        for (int s = 0; s < kT; ++s) {
            const int64_t t = t0 + s;
            const bool in = t < p.L;
            const int64_t bt = b * p.L + (in ? t : 0);
            dtv[s] = in ? p.dt[bt * E + e] : 0.0f;
            uv[s] = in ? p.x[bt * E + e] : 0.0f;
            zv[s] = in ? p.z[bt * p.ld_z + e] : 0.0f;
#pragma unroll
            for (int i = 0; i < SPL; ++i) {
                const int64_t n = j + int64_t(g) * i;
                Bv[s][i] = (in && n < N) ? p.Bm[bt * p.ld_bc + n] : 0.0f;
                Cv[s][i] = (in && n < N) ? p.Cm[bt * p.ld_bc + n] : 0.0f;
            }
        }
#pragma unroll
        for (int s = 0; s < kT; ++s) {
            const int64_t t = t0 + s;
            if (t >= p.L) break;  // uniform across the block
            const float delta = softplus_f(dtv[s] + dtb);
            const float du = delta * uv[s];
            float acc = 0.0f;
#pragma unroll
            for (int i = 0; i < SPL; ++i) {
                const int64_t n = j + int64_t(g) * i;
                if (n < N) {
                    h[i] = expf(delta * A[i]) * h[i] + du * Bv[s][i];
                    acc += Cv[s][i] * h[i];
                }
            }
            for (int o = g >> 1; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
            if (j == 0 && valid) p.y[(b * p.L + t) * E + e] = (acc + Dv * uv[s]) * silu_f(zv[s]);
        }
    }
    if (valid) {
#pragma unroll
        for (int i = 0; i < SPL; ++i) {
            const int64_t n = j + int64_t(g) * i;
            if (n < N) state[n] = h[i];
        }
    }
}

}  // namespace

void launch_selective_scan(const SelectiveScanParams& p, cudaStream_t s) {
    MAMBART_CHECK_ARG(p.B >= 0 && p.L >= 0 && p.E > 0, "launch_selective_scan: bad sizes B=",
                      p.B, " L=", p.L, " E=", p.E);
    if (!(p.N >= 1 && p.N <= 256))
        throw Unsupported(str_cat("launch_selective_scan: d_state=", p.N, " unsupported (1..256)"));
    MAMBART_CHECK_ARG(p.ld_bc >= p.N && p.ld_z >= p.E, "launch_selective_scan: bad strides");
    MAMBART_CHECK_ARG(p.x && p.dt && p.Bm && p.Cm && p.z && p.A && p.D && p.dt_bias &&
                          p.ssm_state && p.y,
                      "launch_selective_scan: null pointer");
    MAMBART_CHECK_ARG(p.B <= 65535, "launch_selective_scan: batch ", p.B, " too large");
    if (p.B == 0) return;
    int g = 1;
    while (g < p.N && g < 32) g <<= 1;
    const int spl = int(ceil_div(p.N, g));
    const int64_t per_block = int64_t(kScanWarps) * (32 / g);
    const dim3 grid(unsigned(ceil_div(p.E, per_block)), unsigned(p.B));
    const int threads = kScanWarps * 32;
    if (spl == 1)
        selective_scan_kernel<1><<<grid, threads, 0, s>>>(p, g);
    else if (spl == 2)
        selective_scan_kernel<2><<<grid, threads, 0, s>>>(p, g);
    else if (spl <= 4)
        selective_scan_kernel<4><<<grid, threads, 0, s>>>(p, g);
    else
        selective_scan_kernel<8><<<grid, threads, 0, s>>>(p, g);
    check_launch("selective_scan_kernel", s);
}

}  // namespace cuda
}  // namespace mambart

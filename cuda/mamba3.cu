// cuda/mamba3.cu: the Mamba-3 layer scan, recurrent form (any L: decode steps and prefill),
// SISO and MIMO of rank Rm (spec section 4; the formula is Mamba3ScanParams' in cpp/op_params.h):
//
//   A = min(-f(dd_A), -a_floor); DT = softplus(dd_dt + dt_bias); λ = sigmoid(trap);
//   θ[i] = (θ[i] + π tanh(angles[i]) DT) mod 2π;
//   k_r = rot_θ(rms_N(B_r) w_B + B_bias[h, r]), q_r likewise with C (pairwise or halved pairs);
//   h ← α h + β Σ_r (v ⊙ mimo_x_r) ⊗ k_prev_r + γ Σ_r (x ⊙ mimo_x_r) ⊗ k_r,
//     α = exp(A DT), β = (1 - λ) DT α, γ = λ DT;
//   y_r = h q_r + D x_r; gate (or per-head norm + gate); y = Σ_r y_r ⊙ mimo_o_r.
//
// mamba3_scan_kernel: Grid: (H, B); block: kM3Threads threads (4 warps), one block per (row,
//   head) walking its L tokens in order. Per token: one thread the head's scalars, S threads the
//   angles, one warp per B/C vector its RMS norm, threads over (vector, pair) the rotation; then
//   warp w updates state rows p = w, w + 4, ... with lanes over n (coalesced), accumulating the
//   Rm readout dots and reducing them over the warp; then threads over p the gate and rank sum.
//   The state stays in global memory (read once and written once per token); q, k, the previous
//   k, x and the per-rank rows live in shared memory.
// Preconditions: 2 <= N <= 256 even, 1 <= P <= 256, 1 <= Rm <= 8, H % G == 0, 1 <= S <= N / 2,
//   B <= 65535, H <= 2^31 - 1; y does not alias proj or a state.
#include <cmath>

#include "common.cuh"
#include "kernels.h"

namespace mambart {
namespace cuda {
namespace {

constexpr int kM3Threads = 128;
constexpr int kM3Warps = kM3Threads / 32;
constexpr int kM3MaxRank = 8;

struct M3Smem {  // offsets (floats) into the dynamic shared memory
    int64_t q, k, kp, theta, xr, vr, yr, xprev, scal, total;
};

__host__ __device__ inline M3Smem m3_smem(int64_t Rm, int64_t N, int64_t P, int64_t S) {
    M3Smem m{};
    m.q = 0;
    m.k = m.q + Rm * N;
    m.kp = m.k + Rm * N;
    m.theta = m.kp + Rm * N;
    m.xr = m.theta + S;
    m.vr = m.xr + Rm * P;
    m.yr = m.vr + Rm * P;
    m.xprev = m.yr + Rm * P;
    m.scal = m.xprev + P;  // DT, alpha, beta, gamma, then one inverse norm per rank
    m.total = m.scal + 4 + kM3MaxRank;
    return m;
}

__global__ void __launch_bounds__(kM3Threads) mamba3_scan_kernel(Mamba3ScanParams p) {
    extern __shared__ float sm[];
    pdl_wait();  // launched with launch_pdl (see common.cuh)
    pdl_trigger();
    const int64_t h = blockIdx.x, b = blockIdx.y;
    const int64_t H = p.H, P = p.P, N = p.N, G = p.G, Rm = p.Rm, S = p.S, E = H * P;
    const int64_t g = h / (H / G);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const M3Smem o = m3_smem(Rm, N, P, S);
    float* q = sm + o.q;          // (Rm, N) this token's rotated q
    float* k = sm + o.k;          // (Rm, N) this token's rotated k
    float* kp = sm + o.kp;        // (Rm, N) the previous token's k
    float* theta = sm + o.theta;  // (S)
    float* xr = sm + o.xr;        // (Rm, P) x ⊙ mimo_x
    float* vr = sm + o.vr;        // (Rm, P) previous x ⊙ mimo_x
    float* yr = sm + o.yr;        // (Rm, P)
    float* xprev = sm + o.xprev;  // (P) previous x
    float* sc = sm + o.scal;      // DT, alpha, beta, gamma, inv norms (Rm)
    float* hs = p.ssm_state + (b * H + h) * P * N;
    const float two_pi = 6.283185307179586f, pi = 3.141592653589793f;
    for (int64_t i = tid; i < Rm * N; i += kM3Threads) {
        const int64_t r = i / N, n = i % N;
        kp[i] = p.k_state[((b * Rm + r) * H + h) * N + n];
    }
    for (int64_t i = tid; i < S; i += kM3Threads) theta[i] = p.angle_state[(b * H + h) * S + i];
    for (int64_t i = tid; i < P; i += kM3Threads) xprev[i] = p.v_state[(b * H + h) * P + i];
    __syncthreads();
    const int64_t off_B = 2 * E, off_C = off_B + Rm * G * N, off_dt = off_C + Rm * G * N;
    for (int64_t t = 0; t < p.L; ++t) {
        const float* row = p.proj + (b * p.L + t) * p.ld_proj;
        const float* z = row + h * P;
        const float* x = row + E + h * P;
        if (tid == 0) {
            const float DT = softplus_f(row[off_dt + h] + p.dt_bias[h]);
            const float a = row[off_dt + H + h];
            const float fa = p.softplus_a ? softplus_f(a) : (a >= 0.0f ? 1.0f + a : 1.0f / (1.0f - a));
            const float A = fminf(-fa, -p.a_floor);
            const float lam = 1.0f / (1.0f + expf(-row[off_dt + 2 * H + h]));
            const float alpha = expf(A * DT);
            sc[0] = DT;
            sc[1] = alpha;
            sc[2] = (1.0f - lam) * DT * alpha;
            sc[3] = lam * DT;
        }
        __syncthreads();
        const float DT = sc[0];
        for (int64_t i = tid; i < S; i += kM3Threads) {
            float th = fmodf(theta[i] + pi * tanhf(row[off_dt + 3 * H + i]) * DT, two_pi);
            theta[i] = th < 0.0f ? th + two_pi : th;
        }
        // RMS norm + weight + bias of the 2 Rm vectors (k_r: which 0, q_r: which 1).
        for (int64_t v = warp; v < 2 * Rm; v += kM3Warps) {
            const int which = int(v / Rm);
            const int64_t r = v % Rm;
            const float* src = row + (which ? off_C : off_B) + (r * G + g) * N;
            float ss = 0.0f;
            for (int64_t n = lane; n < N; n += 32) ss += src[n] * src[n];
            ss = warp_sum(ss);
            const float inv = rsqrtf(ss / float(N) + p.eps);
            const float* w = which ? p.C_norm_w : p.B_norm_w;
            const float* bias = (which ? p.C_bias : p.B_bias) + (h * Rm + r) * N;
            float* dst = (which ? q : k) + r * N;
            for (int64_t n = lane; n < N; n += 32) dst[n] = src[n] * inv * w[n] + bias[n];
        }
        for (int64_t i = tid; i < Rm * P; i += kM3Threads) {
            const int64_t r = i / P, pp = i % P;
            const float m = p.mimo_x ? p.mimo_x[(h * Rm + r) * P + pp] : 1.0f;
            xr[i] = x[pp] * m;
            vr[i] = xprev[pp] * m;
        }
        __syncthreads();
        // Rotation of every (vector, pair).
        for (int64_t i = tid; i < 2 * Rm * S; i += kM3Threads) {
            const int64_t v = i / S, j = i % S;
            float* dst = (v < Rm ? k : q) + (v % Rm) * N;
            const int64_t i0 = p.halved ? j : 2 * j, i1 = p.halved ? j + N / 2 : 2 * j + 1;
            float sn, cs;
            sincosf(theta[j], &sn, &cs);
            const float v0 = dst[i0], v1 = dst[i1];
            dst[i0] = v0 * cs - v1 * sn;
            dst[i1] = v0 * sn + v1 * cs;
        }
        __syncthreads();
        // State rows: update and readout.
        const float alpha = sc[1], beta = sc[2], gamma = sc[3], Dh = p.D[h];
        for (int64_t pp = warp; pp < P; pp += kM3Warps) {
            float acc[kM3MaxRank];
#pragma unroll
            for (int r = 0; r < kM3MaxRank; ++r) acc[r] = 0.0f;
            float* hrow = hs + pp * N;
            for (int64_t n = lane; n < N; n += 32) {
                float hv = hrow[n] * alpha;
                for (int64_t r = 0; r < Rm; ++r)
                    hv += beta * vr[r * P + pp] * kp[r * N + n] + gamma * xr[r * P + pp] * k[r * N + n];
                hrow[n] = hv;
#pragma unroll
                for (int r = 0; r < kM3MaxRank; ++r)
                    if (r < Rm) acc[r] += hv * q[r * N + n];
            }
#pragma unroll
            for (int r = 0; r < kM3MaxRank; ++r) {
                if (r >= Rm) break;
                const float s = warp_sum(acc[r]);
                if (lane == 0) yr[r * P + pp] = s + Dh * xr[r * P + pp];
            }
        }
        __syncthreads();
        if (p.norm_w) {  // per-head RMSNorm of each rank's row before the gate
            for (int64_t r = warp; r < Rm; r += kM3Warps) {
                float ss = 0.0f;
                for (int64_t i = lane; i < P; i += 32) ss += yr[r * P + i] * yr[r * P + i];
                ss = warp_sum(ss);
                if (lane == 0) sc[4 + r] = rsqrtf(ss / float(P) + p.eps);
            }
            __syncthreads();
        }
        float* y = p.y + (b * p.L + t) * E + h * P;
        for (int64_t i = tid; i < P; i += kM3Threads) {
            float out = 0.0f;
            for (int64_t r = 0; r < Rm; ++r) {
                const int64_t m = (h * Rm + r) * P + i;
                float v = yr[r * P + i];
                if (p.norm_w) v *= sc[4 + r] * p.norm_w[h * P + i];
                v *= silu_f(z[i] * (p.mimo_z ? p.mimo_z[m] : 1.0f));
                out += v * (p.mimo_o ? p.mimo_o[m] : 1.0f);
            }
            y[i] = out;
            xprev[i] = x[i];
        }
        for (int64_t i = tid; i < Rm * N; i += kM3Threads) kp[i] = k[i];
        __syncthreads();
    }
    for (int64_t i = tid; i < Rm * N; i += kM3Threads) {
        const int64_t r = i / N, n = i % N;
        p.k_state[((b * Rm + r) * H + h) * N + n] = kp[i];
    }
    for (int64_t i = tid; i < S; i += kM3Threads) p.angle_state[(b * H + h) * S + i] = theta[i];
    for (int64_t i = tid; i < P; i += kM3Threads) p.v_state[(b * H + h) * P + i] = xprev[i];
}

}  // namespace

void launch_mamba3_scan(const Mamba3ScanParams& p, cudaStream_t s) {
    MAMBART_CHECK_ARG(p.B >= 0 && p.L >= 0 && p.H >= 1 && p.G >= 1 && p.H % p.G == 0,
                      "launch_mamba3_scan: bad sizes B=", p.B, " L=", p.L, " H=", p.H, " G=", p.G);
    if (!(p.N >= 2 && p.N <= 256 && p.N % 2 == 0 && p.P >= 1 && p.P <= 256 && p.Rm >= 1 &&
          p.Rm <= kM3MaxRank && p.S >= 1 && 2 * p.S <= p.N))
        throw Unsupported(str_cat("launch_mamba3_scan: d_state=", p.N, " headdim=", p.P,
                                  " mimo_rank=", p.Rm, " rotary pairs=", p.S, " unsupported"));
    MAMBART_CHECK_ARG(p.ld_proj >= 2 * p.H * p.P + 2 * p.Rm * p.G * p.N + 3 * p.H + p.S,
                      "launch_mamba3_scan: bad stride ld_proj=", p.ld_proj);
    MAMBART_CHECK_ARG(p.proj && p.dt_bias && p.B_bias && p.C_bias && p.B_norm_w && p.C_norm_w &&
                          p.D && p.angle_state && p.ssm_state && p.k_state && p.v_state && p.y,
                      "launch_mamba3_scan: null pointer");
    MAMBART_CHECK_ARG((p.mimo_x != nullptr) == (p.mimo_z != nullptr) &&
                          (p.mimo_x != nullptr) == (p.mimo_o != nullptr),
                      "launch_mamba3_scan: give all three MIMO projections or none");
    MAMBART_CHECK_ARG(p.B <= 65535 && p.H <= 0x7fffffff, "launch_mamba3_scan: grid too large");
    if (p.B == 0 || p.L == 0) return;
    const size_t smem = size_t(m3_smem(p.Rm, p.N, p.P, p.S).total) * sizeof(float);
    static_assert(kM3Threads % 32 == 0, "whole warps");
    if (smem > 48 * 1024)
        check(cudaFuncSetAttribute(mamba3_scan_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                   int(smem)),
              "cudaFuncSetAttribute (mamba3_scan_kernel)");
    launch_pdl(mamba3_scan_kernel, dim3(unsigned(p.H), unsigned(p.B)), dim3(kM3Threads), smem, s,
               p);
    check_launch("mamba3_scan_kernel", s);
}

}  // namespace cuda
}  // namespace mambart

// cuda/mamba3_chunked.cu: the Mamba-3 layer scan (SISO and MIMO of rank Rm) in its chunked
// ("attention", SSD) form for prefill; the same results as the recurrent form (cuda/mamba3.cu,
// Mamba3ScanParams in cpp/op_params.h) up to rounding, final states included. Spec mamba.md §4.4
// ("Equivalent attention (chunked) form") and §3.5 (SSD). Per row b and head h (group g):
//
//   DT_t, A_t, λ_t, θ_t, q'_{t,r}, k'_{t,r}, x_{t,r} = x_t ⊙ mimo_x[h, r] as in the recurrent form;
//   γ_t = λ_t DT_t;  pre_t = (1 − λ_t) DT_t;  scale_s = γ_s + pre_{s+1} (s < L − 1), γ_{L−1};
//   u_s = Σ_r x_{s,r} ⊗ k'_{s,r}.
// Unrolling h_t = α_t h_{t−1} + β_t u_{t−1} + γ_t u_t (β_t = pre_t α_t) gives, with
// G_0 = h_init + pre_0 u_init (u_init from the input v and k states) and Λ the cumsum of A DT,
//   h_t = exp(Λ_t) G_0 + Σ_{s<t} exp(Λ_t − Λ_s) scale_s u_s + γ_t u_t,
// an SSD whose decay weight is scale_s off the diagonal and γ_t on it. In chunks of Qk tokens
// (c: tokens t0 .. t0 + Lc − 1; Λ chunk-local):
//   dS_c[p, n] = Σ_{s, r} x_{s,r}[p] exp(Λ_last − Λ_s) scale_s k'_{s,r}[n]          (chunk state)
//   G_{c+1} = exp(Λ_last(c)) G_c + dS_c;  final ssm state = G_nc = h_{L−1} (γ-only last term)
//   y_{t,r} = exp(Λ_t) q'_{t,r} · G_c + Σ_{s<=t, r'} M(t, s) (q'_{t,r} · k'_{s,r'}) x_{s,r'} + D x_{t,r}
//     with M(t, s) = exp(Λ_t − Λ_s) scale_s (s < t), γ_t (s = t)
//   then the gate (or the per-head norm and the gate) and the rank sum, as the recurrent form.
// The rank is folded into the chunk: row i = l Rm + r of a chunk is token t0 + l, rank r; Qk =
// max(1, 64 / Rm) tokens, so a chunk is at most one 64-row tile (F = Lc Rm <= 64 rows).
//
// Kernels in launch order (128 threads unless noted):
//   m3c_coef_kernel   (nc, H, B) x 64     DT, γ, pre, Λ; the chunk's angle increments' sum per
//                                         pair; chunk 0 folds pre_0 u_init into ssm_state (G_0)
//   m3c_angle_kernel  (H, B)              angle at each chunk's start (serial over chunks, mod
//                                         2π); the final angle state
//   m3c_qk_kernel     (nc, H, B)          q', k' (B/C RMS norm, weight, bias, rotation) into the
//                                         workspace; the last chunk writes the k and v states
//   m3c_state_kernel  (nc, H tilesP tilesN, B)   dS_c (Xᵀ · (w ∘ K') on tensor cores)
//   m3c_pass_kernel   (ceil(P N / 256), H, B) x 256   G_c in place of dS_c; final ssm_state
//   m3c_scan_kernel   (nc, H tilesP, B)   y: Q''·G_cᵀ, CB = Q'·K'ᵀ, (CB ∘ M)·X on tensor cores,
//                                         then D x, the norm, the gate and the rank sum
// Matrix products: WMMA TF32 (cuda/wmma_tf32.cuh), split into hi + lo by default (fp32-like);
// plain TF32 with Mamba3ChunkedParams::tf32. Everything else fp32.
//
// Workspace (floats, parts aligned to 64 floats; base 32-byte aligned):
//   Λ, γ, pre, DT (B, H, L) each; angles (B, H, nc, S) (chunk sums, then chunk starts);
//   q', k' (B, H, L Rm, N) each; chunk states (B, nc, H, P, N).
// Preconditions (launcher; mamba3_chunked_supported): the recurrent kernel's, and P <= 64 when
// the output norm is on (the norm needs a head's whole row in one tile); grid limits.
#include <cmath>
#include <cstdint>

#include "common.cuh"
#include "kernels.h"
#include "wmma_tf32.cuh"

namespace mambart {
namespace cuda {
namespace {

constexpr int kRows = 64;        // folded rows per chunk (Qk Rm <= kRows)
constexpr int kMaxRank = 8;
constexpr int kPass = 256;
constexpr float kPi = 3.141592653589793f, kTwoPi = 6.283185307179586f;

__host__ __device__ inline int64_t m3_cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
__host__ __device__ inline int64_t m3_align(int64_t n) { return (n + 63) / 64 * 64; }
__device__ __forceinline__ int64_t m3_min(int64_t a, int64_t b) { return a < b ? a : b; }
__device__ __forceinline__ float wrap_angle(float th) {  // as the recurrent form: fmod, then >= 0
    th = fmodf(th, kTwoPi);
    return th < 0.0f ? th + kTwoPi : th;
}

struct Ws {
    float* cum;     // (B, H, L) Λ, chunk-local
    float* gam;     // (B, H, L) γ
    float* pre;     // (B, H, L) (1 − λ) DT
    float* dt;      // (B, H, L) DT
    float* ang;     // (B, H, nc, S) angle increments' chunk sums, then chunk start angles
    float* q;       // (B, H, L Rm, N) q'
    float* k;       // (B, H, L Rm, N) k'
    float* states;  // (B, nc, H, P, N) dS_c, then G_c
    int64_t Qk, nc, tilesP, tilesN;
    bool vec;       // N % 4 == 0: 16-byte loads of q', k' and state rows
};

struct WsSizes {
    int64_t scal, ang, qk, states;
};

inline int64_t tokens_per_chunk(int64_t Rm) { return Rm >= kRows ? 1 : kRows / Rm; }

inline WsSizes ws_sizes(const Mamba3ScanParams& s) {
    const int64_t nc = m3_cdiv(s.L, tokens_per_chunk(s.Rm));
    return {m3_align(s.B * s.H * s.L), m3_align(s.B * s.H * nc * s.S),
            m3_align(s.B * s.H * s.L * s.Rm * s.N), m3_align(s.B * nc * s.H * s.P * s.N)};
}

// Offsets in a proj row (see Mamba3ScanParams).
struct Off {
    int64_t E, B, C, dt;
};
__device__ __forceinline__ Off offsets(const Mamba3ScanParams& p) {
    const int64_t E = p.H * p.P, B = 2 * E, C = B + p.Rm * p.G * p.N;
    return {E, B, C, C + p.Rm * p.G * p.N};
}

// Stages kR folded rows i0 .. i0 + kR − 1 of x_{s,r} (a 64-wide slice of p from p0) into shared
// dst (row stride ldd): dst[i][k] = x_{t0 + (i0+i)/Rm}[p0 + k] · mimo_x[h, (i0+i) % Rm, p0 + k]
// · (scale ? scale[i] : 1) for i < nrows and p0 + k < P, else 0.
template <int kR>
__device__ __forceinline__ void stage_x(float* dst, int ldd, const Mamba3ScanParams& p, int64_t b,
                                        int64_t h, int64_t t0, int i0, int nrows, int64_t p0,
                                        const float* scale) {
    const int64_t E = p.H * p.P;
    for (int idx = threadIdx.x; idx < kR * kT; idx += kThreads) {
        const int i = idx / kT, k = idx % kT;
        float v = 0.0f;
        if (i < nrows && p0 + k < p.P) {
            const int64_t fi = i0 + i, t = t0 + fi / p.Rm, r = fi % p.Rm, pp = p0 + k;
            v = p.proj[(b * p.L + t) * p.ld_proj + E + h * p.P + pp];
            if (p.mimo_x) v *= p.mimo_x[(h * p.Rm + r) * p.P + pp];
            if (scale) v *= scale[i];
        }
        dst[i * ldd + k] = v;
    }
}

// m3c_coef_kernel: per chunk c and head h, thread l = token t0 + l (l < Lc <= 64):
//   DT, γ, pre, Λ (block scan of A DT); per pair i < S the sum over the chunk of π tanh(angles_l[i])
//   DT_l (in token order, as m3c_qk_kernel's running sum); chunk 0: ssm_state += pre_0 u_init.
// Grid: (nc, H, B); block: kRows threads.
__global__ void __launch_bounds__(kRows) m3c_coef_kernel(Mamba3ScanParams p, Ws w) {
    __shared__ float dts[kRows];
    __shared__ float wtot[kRows / 32];
    __shared__ float pre0;
    const int64_t c = blockIdx.x, h = blockIdx.y, b = blockIdx.z, H = p.H;
    const int64_t t0 = c * w.Qk, Lc = m3_min(p.L, t0 + w.Qk) - t0;
    const int l = threadIdx.x, lane = l & 31, warp = l >> 5;
    const Off o = offsets(p);
    float DT = 0.0f, adt = 0.0f;
    const int64_t base = (b * H + h) * p.L + t0;
    if (l < Lc) {
        const float* row = p.proj + (b * p.L + t0 + l) * p.ld_proj;
        DT = softplus_f(row[o.dt + h] + p.dt_bias[h]);
        const float a = row[o.dt + H + h];
        const float fa = p.softplus_a ? softplus_f(a) : (a >= 0.0f ? 1.0f + a : 1.0f / (1.0f - a));
        const float A = fminf(-fa, -p.a_floor);
        const float lam = 1.0f / (1.0f + expf(-row[o.dt + 2 * H + h]));
        adt = A * DT;
        w.dt[base + l] = DT;
        w.gam[base + l] = lam * DT;
        w.pre[base + l] = (1.0f - lam) * DT;
        if (c == 0 && l == 0) pre0 = (1.0f - lam) * DT;
    }
    dts[l] = DT;
    float v = adt;
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
        const float n = __shfl_up_sync(0xffffffffu, v, d);
        if (lane >= d) v += n;
    }
    if (lane == 31) wtot[warp] = v;
    __syncthreads();
    for (int k = 0; k < warp; ++k) v += wtot[k];
    if (l < Lc) w.cum[base + l] = v;
    const float* ang = p.proj + (b * p.L + t0) * p.ld_proj + o.dt + 3 * H;
    for (int64_t i = l; i < p.S; i += kRows) {
        float tot = 0.0f;
        for (int64_t j = 0; j < Lc; ++j) tot += kPi * tanhf(ang[j * p.ld_proj + i]) * dts[j];
        w.ang[((b * H + h) * w.nc + c) * p.S + i] = tot;
    }
    if (c == 0) {  // G_0 = h_init + pre_0 Σ_r (v ⊙ mimo_x_r) ⊗ k_r
        const float f = pre0;
        float* hs = p.ssm_state + (b * H + h) * p.P * p.N;
        const float* vs = p.v_state + (b * H + h) * p.P;
        for (int64_t e = l; e < p.P * p.N; e += kRows) {
            const int64_t pp = e / p.N, n = e % p.N;
            float acc = 0.0f;
            for (int64_t r = 0; r < p.Rm; ++r) {
                const float m = p.mimo_x ? p.mimo_x[(h * p.Rm + r) * p.P + pp] : 1.0f;
                acc += vs[pp] * m * p.k_state[((b * p.Rm + r) * H + h) * p.N + n];
            }
            hs[e] += f * acc;
        }
    }
}

// m3c_angle_kernel: θ = angle_state; per chunk c: slot c <- θ (the chunk's start), θ <- wrap(θ +
// the chunk's sum); angle_state <- θ. Grid: (H, B); block: kThreads, thread per pair i < S.
__global__ void __launch_bounds__(kThreads) m3c_angle_kernel(Mamba3ScanParams p, Ws w) {
    const int64_t h = blockIdx.x, b = blockIdx.y;
    for (int64_t i = threadIdx.x; i < p.S; i += kThreads) {
        float th = p.angle_state[(b * p.H + h) * p.S + i];
        for (int64_t c = 0; c < w.nc; ++c) {
            float* a = w.ang + ((b * p.H + h) * w.nc + c) * p.S + i;
            const float tot = *a;
            *a = th;
            th = wrap_angle(th + tot);
        }
        p.angle_state[(b * p.H + h) * p.S + i] = th;
    }
}

// m3c_qk_kernel: per chunk and head, θ_l = wrap(start + running sum of the increments) (cos and
// sin in dynamic shared memory, (Lc, S) each); then warp per (folded row, k | q): the RMS norm over
// N, weight, bias, rotation (pairwise or halved) into w.k / w.q. The last chunk writes k_state
// (the last token's k') and v_state (its x). Grid: (nc, H, B); block: kThreads.
__global__ void __launch_bounds__(kThreads) m3c_qk_kernel(Mamba3ScanParams p, Ws w) {
    extern __shared__ float cs_sn[];  // cos (Lc, S), then sin (Lc, S)
    const int64_t c = blockIdx.x, h = blockIdx.y, b = blockIdx.z, H = p.H, N = p.N, S = p.S;
    const int64_t t0 = c * w.Qk, Lc = m3_min(p.L, t0 + w.Qk) - t0, Rm = p.Rm;
    const int64_t g = h / (H / p.G);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const Off o = offsets(p);
    float* cs = cs_sn;
    float* sn = cs_sn + w.Qk * S;
    const float* dt = w.dt + (b * H + h) * p.L + t0;
    for (int64_t i = threadIdx.x; i < S; i += kThreads) {
        const float start = w.ang[((b * H + h) * w.nc + c) * S + i];
        const float* ang = p.proj + (b * p.L + t0) * p.ld_proj + o.dt + 3 * H + i;
        float cum = 0.0f;
        for (int64_t l = 0; l < Lc; ++l) {
            cum += kPi * tanhf(ang[l * p.ld_proj]) * dt[l];
            sincosf(wrap_angle(start + cum), &sn[l * S + i], &cs[l * S + i]);
        }
    }
    __syncthreads();
    const int64_t rows = (b * H + h) * p.L * Rm + t0 * Rm;  // the chunk's first folded row
    for (int64_t v = warp; v < 2 * Lc * Rm; v += kThreads / 32) {
        const int which = int(v & 1);  // 0: k (B), 1: q (C)
        const int64_t fi = v >> 1, l = fi / Rm, r = fi % Rm;
        const float* src =
            p.proj + (b * p.L + t0 + l) * p.ld_proj + (which ? o.C : o.B) + (r * p.G + g) * N;
        float ss = 0.0f;
        for (int64_t n = lane; n < N; n += 32) ss += src[n] * src[n];
        ss = warp_sum(ss);
        const float inv = rsqrtf(ss / float(N) + p.eps);
        const float* wn = which ? p.C_norm_w : p.B_norm_w;
        const float* bias = (which ? p.C_bias : p.B_bias) + (h * Rm + r) * N;
        float* dst = (which ? w.q : w.k) + (rows + fi) * N;
        for (int64_t j = lane; j < N / 2; j += 32) {
            const int64_t i0 = p.halved ? j : 2 * j, i1 = p.halved ? j + N / 2 : 2 * j + 1;
            const float v0 = src[i0] * inv * wn[i0] + bias[i0];
            const float v1 = src[i1] * inv * wn[i1] + bias[i1];
            if (j < S) {
                const float cv = cs[l * S + j], sv = sn[l * S + j];
                dst[i0] = v0 * cv - v1 * sv;
                dst[i1] = v0 * sv + v1 * cv;
            } else {
                dst[i0] = v0;
                dst[i1] = v1;
            }
        }
    }
    if (c != w.nc - 1) return;  // uniform over the block
    __syncthreads();  // this block's k' rows written (global writes visible within the block)
    const int64_t last = (b * H + h) * p.L * Rm + (p.L - 1) * Rm;
    for (int64_t i = threadIdx.x; i < Rm * N; i += kThreads) {
        const int64_t r = i / N, n = i % N;
        p.k_state[((b * Rm + r) * H + h) * N + n] = w.k[(last + r) * N + n];
    }
    const float* x = p.proj + (b * p.L + p.L - 1) * p.ld_proj + o.E + h * p.P;
    for (int64_t i = threadIdx.x; i < p.P; i += kThreads) p.v_state[(b * H + h) * p.P + i] = x[i];
}

// Decay weights of a chunk's folded rows: el_i = exp(Λ_t), gam_i = γ_t, scl_i = scale_t, cum_i =
// Λ_t for row i (token t = t0 + i / Rm), zeros past F rows. Threads < kRows.
__device__ __forceinline__ void load_row_coefs(const Mamba3ScanParams& p, const Ws& w, int64_t b,
                                               int64_t h, int64_t t0, int64_t F, float* cum_i,
                                               float* el, float* gam_i, float* scl) {
    if (threadIdx.x >= kRows) return;
    const int i = threadIdx.x;
    float cv = 0.0f, ev = 0.0f, gv = 0.0f, sv = 0.0f;
    if (i < F) {
        const int64_t t = t0 + i / p.Rm, base = (b * p.H + h) * p.L;
        cv = w.cum[base + t];
        ev = expf(cv);
        gv = w.gam[base + t];
        sv = gv + (t + 1 < p.L ? w.pre[base + t + 1] : 0.0f);
    }
    if (cum_i) cum_i[i] = cv;
    if (el) el[i] = ev;
    if (gam_i) gam_i[i] = gv;
    if (scl) scl[i] = sv;
}

// m3c_state_kernel: dS_c[p, n] = Σ_i x_i[p] · wt_i k'_i[n], wt_i = exp(Λ_last − Λ_t) scale_t, for a
// 64 (p) x 64 (n) tile: Xᵀ (p x i) · (wt ∘ K') (i x n), rows i in slices of 32 (36 KB static
// shared memory). Grid: (nc, H tilesP tilesN, B); block: kThreads (4 warps over the tile).
template <bool kSplit>
__global__ void __launch_bounds__(kThreads) m3c_state_kernel(Mamba3ScanParams p, Ws w) {
    __shared__ __align__(128) float Xs[kKs * kLdT];  // (i, p) weighted x
    __shared__ __align__(128) float Ks[kKs * kLdT];  // (i, n)
    __shared__ __align__(128) float Os[kT * kLdT];   // (p, n)
    __shared__ float wt[kRows], scl[kRows], cum_i[kRows];
    const int64_t c = blockIdx.x, b = blockIdx.z;
    const int64_t h = blockIdx.y / (w.tilesP * w.tilesN), rem = blockIdx.y % (w.tilesP * w.tilesN);
    const int64_t p0 = (rem / w.tilesN) * kT, n0 = (rem % w.tilesN) * kT;
    const int64_t t0 = c * w.Qk, Lc = m3_min(p.L, t0 + w.Qk) - t0, F = Lc * p.Rm;
    const int warp = threadIdx.x >> 5, wm = (warp >> 1) * 32, wn = (warp & 1) * 32;
    load_row_coefs(p, w, b, h, t0, F, cum_i, nullptr, nullptr, scl);
    __syncthreads();
    const float last = w.cum[(b * p.H + h) * p.L + t0 + Lc - 1];
    if (threadIdx.x < kRows) {
        const int i = threadIdx.x;
        wt[i] = i < F ? expf(last - cum_i[i]) * scl[i] : 0.0f;
    }
    const float* kg = w.k + ((b * p.H + h) * p.L * p.Rm + t0 * p.Rm) * p.N;
    FragC acc[2][2];
    zero(acc);
    for (int i0 = 0; i0 < F; i0 += kKs) {
        __syncthreads();  // wt written; the previous slice's reads done
        const int ni = int(m3_min(kKs, F - i0));
        stage_x<kKs>(Xs, kLdT, p, b, h, t0, i0, ni, p0, wt + i0);
        stage<kKs, kT>(Ks, kLdT, kg + int64_t(i0) * p.N, p.N, ni, n0, p.N, w.vec, nullptr);
        __syncthreads();
        // A = Xᵀ (p x i): element (p, i) at Xs[i][p], column-major; B = K' (i x n) row-major
        warp_mma<kSplit, wmma::col_major, wmma::row_major>(acc, Xs + wm, kLdT, Ks + wn, kLdT, kKs);
    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j)
            wmma::store_matrix_sync(Os + (wm + 16 * i) * kLdT + wn + 16 * j, acc[i][j], kLdT,
                                    wmma::mem_row_major);
    __syncthreads();
    float* out = w.states + ((b * w.nc + c) * p.H + h) * p.P * p.N;
    for (int idx = threadIdx.x; idx < kT * kT; idx += kThreads) {
        const int i = idx / kT, j = idx % kT;
        const int64_t pp = p0 + i, n = n0 + j;
        if (pp < p.P && n < p.N) out[pp * p.N + n] = Os[i * kLdT + j];
    }
}

// m3c_pass_kernel: G = ssm_state (G_0); per chunk: slot c <- G (replacing dS_c), G <- exp(Λ_last)
// G + dS_c; ssm_state <- G. Grid: (ceil(P N / 256), H, B); block: kPass, one element each.
__global__ void __launch_bounds__(kPass) m3c_pass_kernel(Mamba3ScanParams p, Ws w) {
    const int64_t e = int64_t(blockIdx.x) * kPass + threadIdx.x;
    const int64_t h = blockIdx.y, b = blockIdx.z, PN = p.P * p.N;
    if (e >= PN) return;
    float* state = p.ssm_state + (b * p.H + h) * PN;
    float G = state[e];
    for (int64_t c = 0; c < w.nc; ++c) {
        float* slot = w.states + ((b * w.nc + c) * p.H + h) * PN + e;
        const float dS = *slot;
        *slot = G;
        const int64_t tl = m3_min(p.L, (c + 1) * w.Qk) - 1;
        G = expf(w.cum[(b * p.H + h) * p.L + tl]) * G + dS;
    }
    state[e] = G;
}

// m3c_scan_kernel: y for one chunk, head and 64-wide p tile, the chunk's F <= 64 folded rows:
//   acc = (el ∘ Q') · G_cᵀ (n in slices of 32), CB = Q' · K'ᵀ (a second accumulator);
//   M = CB ∘ coef (coef(i, j) = exp(Λ_i − Λ_j) scale_j for token(j) < token(i), γ on equal
//   tokens, 0 after); acc += M · X; then, through shared memory: + D x, per-row norm (output
//   norm, P <= 64), the gate silu(z ⊙ mimo_z), the rank sum with mimo_o, the store of y.
// 35 KB static shared memory (phases reuse it). Grid: (nc, H tilesP, B); block: kThreads.
template <bool kSplit>
__global__ void __launch_bounds__(kThreads) m3c_scan_kernel(Mamba3ScanParams p, Ws w) {
    __shared__ __align__(128) float sm[2 * kT * kLdT];
    __shared__ float cum_i[kRows], el[kRows], gam_i[kRows], scl[kRows], inv[kRows];
    const int64_t c = blockIdx.x, b = blockIdx.z;
    const int64_t h = blockIdx.y / w.tilesP, p0 = (blockIdx.y % w.tilesP) * kT;
    const int64_t H = p.H, P = p.P, N = p.N, Rm = p.Rm, E = H * P;
    const int64_t t0 = c * w.Qk, Lc = m3_min(p.L, t0 + w.Qk) - t0, F = Lc * Rm;
    const int np = int(m3_min(kT, P - p0));
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int wm = (warp >> 1) * 32, wn = (warp & 1) * 32;
    load_row_coefs(p, w, b, h, t0, F, cum_i, el, gam_i, scl);
    const float* qg = w.q + ((b * H + h) * p.L * Rm + t0 * Rm) * N;
    const float* kg = w.k + ((b * H + h) * p.L * Rm + t0 * Rm) * N;
    const float* Sg = w.states + ((b * w.nc + c) * H + h) * P * N + p0 * N;
    FragC acc[2][2], cb[2][2];
    zero(acc);
    zero(cb);
    {
        float* As = sm;              // (i, n) 64 x 32: Q'' then Q'
        float* Bs = sm + kT * kLdK;  // (p, n) G_c, then (j, n) K'
        for (int64_t n0 = 0; n0 < N; n0 += kKs) {
            __syncthreads();  // el written; the previous slice's reads done
            stage<kT, kKs>(As, kLdK, qg, N, int(F), n0, N, w.vec, el);
            stage<kT, kKs>(Bs, kLdK, Sg, N, np, n0, N, w.vec, nullptr);
            __syncthreads();
            warp_mma<kSplit, wmma::row_major, wmma::col_major>(acc, As + wm * kLdK, kLdK,
                                                               Bs + wn * kLdK, kLdK, kKs);
            __syncthreads();
            stage<kT, kKs>(As, kLdK, qg, N, int(F), n0, N, w.vec, nullptr);
            stage<kT, kKs>(Bs, kLdK, kg, N, int(F), n0, N, w.vec, nullptr);
            __syncthreads();
            warp_mma<kSplit, wmma::row_major, wmma::col_major>(cb, As + wm * kLdK, kLdK,
                                                               Bs + wn * kLdK, kLdK, kKs);
        }
    }
    float* Ms = sm;              // (i, j) 64 x 64
    float* Xs = sm + kT * kLdT;  // (j, p) 64 x 64, x unweighted (also the D term)
    __syncthreads();
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j)
            wmma::store_matrix_sync(Ms + (wm + 16 * i) * kLdT + wn + 16 * j, cb[i][j], kLdT,
                                    wmma::mem_row_major);
    stage_x<kT>(Xs, kLdT, p, b, h, t0, 0, int(F), p0, nullptr);
    __syncthreads();
    for (int idx = threadIdx.x; idx < kT * kT; idx += kThreads) {
        const int i = idx / kT, j = idx % kT;
        float coef = 0.0f;
        if (i < F && j < F) {
            const int64_t ti = i / Rm, sj = j / Rm;
            if (sj < ti) coef = expf(cum_i[i] - cum_i[j]) * scl[j];
            else if (sj == ti) coef = gam_i[j];
        }
        Ms[i * kLdT + j] *= coef;
    }
    __syncthreads();
    warp_mma<kSplit, wmma::row_major, wmma::row_major>(acc, Ms + wm * kLdT, kLdT, Xs + wn, kLdT,
                                                       kT);
    __syncthreads();  // Ms reads done
    float* Os = sm;   // (i, p) 64 x 64
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j)
            wmma::store_matrix_sync(Os + (wm + 16 * i) * kLdT + wn + 16 * j, acc[i][j], kLdT,
                                    wmma::mem_row_major);
    __syncthreads();
    const float Dh = p.D[h];
    for (int idx = threadIdx.x; idx < F * kT; idx += kThreads) {
        const int i = idx / kT, k = idx % kT;
        Os[i * kLdT + k] += Dh * Xs[i * kLdT + k];
    }
    __syncthreads();
    if (p.norm_w) {  // tilesP == 1: the row holds the head's P outputs
        for (int i = warp; i < F; i += kThreads / 32) {
            float ss = 0.0f;
            for (int k = lane; k < np; k += 32) ss += Os[i * kLdT + k] * Os[i * kLdT + k];
            ss = warp_sum(ss);
            if (lane == 0) inv[i] = rsqrtf(ss / float(P) + p.eps);
        }
        __syncthreads();
    }
    for (int idx = threadIdx.x; idx < Lc * kT; idx += kThreads) {
        const int l = idx / kT, k = idx % kT;
        if (k >= np) continue;
        const int64_t pp = p0 + k, row = b * p.L + t0 + l;
        const float zv = p.proj[row * p.ld_proj + h * P + pp];
        float out = 0.0f;
        for (int64_t r = 0; r < Rm; ++r) {
            const int64_t i = l * Rm + r, m = (h * Rm + r) * P + pp;
            float v = Os[i * kLdT + k];
            if (p.norm_w) v *= inv[i] * p.norm_w[h * P + pp];
            v *= silu_f(zv * (p.mimo_z ? p.mimo_z[m] : 1.0f));
            out += v * (p.mimo_o ? p.mimo_o[m] : 1.0f);
        }
        p.y[row * E + h * P + pp] = out;
    }
}

template <bool kSplit>
void launch_all(const Mamba3ScanParams& p, const Ws& w, cudaStream_t st) {
    const unsigned nc = unsigned(w.nc), H = unsigned(p.H), B = unsigned(p.B);
    m3c_coef_kernel<<<dim3(nc, H, B), kRows, 0, st>>>(p, w);
    check_launch("m3c_coef_kernel", st);
    m3c_angle_kernel<<<dim3(H, B), kThreads, 0, st>>>(p, w);
    check_launch("m3c_angle_kernel", st);
    const size_t qk_smem = size_t(2 * w.Qk * p.S) * sizeof(float);
    if (qk_smem > 48 * 1024)
        check(cudaFuncSetAttribute(m3c_qk_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                   int(qk_smem)),
              "cudaFuncSetAttribute (m3c_qk_kernel)");
    m3c_qk_kernel<<<dim3(nc, H, B), kThreads, qk_smem, st>>>(p, w);
    check_launch("m3c_qk_kernel", st);
    m3c_state_kernel<kSplit>
        <<<dim3(nc, unsigned(p.H * w.tilesP * w.tilesN), B), kThreads, 0, st>>>(p, w);
    check_launch("m3c_state_kernel", st);
    m3c_pass_kernel<<<dim3(unsigned(m3_cdiv(p.P * p.N, kPass)), H, B), kPass, 0, st>>>(p, w);
    check_launch("m3c_pass_kernel", st);
    m3c_scan_kernel<kSplit><<<dim3(nc, unsigned(p.H * w.tilesP), B), kThreads, 0, st>>>(p, w);
    check_launch("m3c_scan_kernel", st);
}

}  // namespace

bool mamba3_chunked_supported(const Mamba3ScanParams& s) {
    return s.N >= 2 && s.N <= 256 && s.N % 2 == 0 && s.P >= 1 && s.P <= 256 && s.Rm >= 1 &&
           s.Rm <= kMaxRank && s.S >= 1 && 2 * s.S <= s.N && s.H >= 1 && s.G >= 1 &&
           s.H % s.G == 0 && (!s.norm_w || s.P <= kT) && s.B <= 65535 &&
           s.H * m3_cdiv(s.P, kT) * m3_cdiv(s.N, kT) <= 65535;
}

int64_t mamba3_chunked_workspace_floats(const Mamba3ScanParams& s) {
    if (s.L < 1 || s.B < 1) return 0;
    const WsSizes z = ws_sizes(s);
    return 4 * z.scal + z.ang + 2 * z.qk + z.states;
}

void launch_mamba3_chunked(const Mamba3ChunkedParams& q, cudaStream_t st) {
    const Mamba3ScanParams& p = q.s;
    MAMBART_CHECK_ARG(p.B >= 0 && p.L >= 0 && p.H >= 1 && p.G >= 1 && p.H % p.G == 0,
                      "launch_mamba3_chunked: bad sizes B=", p.B, " L=", p.L, " H=", p.H,
                      " G=", p.G);
    if (!mamba3_chunked_supported(p))
        throw Unsupported(str_cat("launch_mamba3_chunked: d_state=", p.N, " headdim=", p.P,
                                  " mimo_rank=", p.Rm, " rotary pairs=", p.S, " nheads=", p.H,
                                  " rows=", p.B, p.norm_w ? " with the output norm" : "",
                                  " unsupported"));
    MAMBART_CHECK_ARG(p.ld_proj >= 2 * p.H * p.P + 2 * p.Rm * p.G * p.N + 3 * p.H + p.S,
                      "launch_mamba3_chunked: bad stride ld_proj=", p.ld_proj);
    MAMBART_CHECK_ARG(p.proj && p.dt_bias && p.B_bias && p.C_bias && p.B_norm_w && p.C_norm_w &&
                          p.D && p.angle_state && p.ssm_state && p.k_state && p.v_state && p.y &&
                          q.ws,
                      "launch_mamba3_chunked: null pointer");
    MAMBART_CHECK_ARG((p.mimo_x != nullptr) == (p.mimo_z != nullptr) &&
                          (p.mimo_x != nullptr) == (p.mimo_o != nullptr),
                      "launch_mamba3_chunked: give all three MIMO projections or none");
    MAMBART_CHECK_ARG(reinterpret_cast<uintptr_t>(q.ws) % 32 == 0,
                      "launch_mamba3_chunked: the workspace must be 32-byte aligned");
    if (p.B == 0 || p.L == 0) return;
    const WsSizes z = ws_sizes(p);
    Ws w{};
    w.Qk = tokens_per_chunk(p.Rm);
    w.nc = m3_cdiv(p.L, w.Qk);
    MAMBART_CHECK_ARG(w.nc <= 0x7fffffff, "launch_mamba3_chunked: too many chunks (L=", p.L, ")");
    w.cum = q.ws;
    w.gam = w.cum + z.scal;
    w.pre = w.gam + z.scal;
    w.dt = w.pre + z.scal;
    w.ang = w.dt + z.scal;
    w.q = w.ang + z.ang;
    w.k = w.q + z.qk;
    w.states = w.k + z.qk;
    w.tilesP = m3_cdiv(p.P, kT);
    w.tilesN = m3_cdiv(p.N, kT);
    w.vec = p.N % 4 == 0;
    if (q.tf32)
        launch_all<false>(p, w, st);
    else
        launch_all<true>(p, w, st);
}

}  // namespace cuda
}  // namespace mambart

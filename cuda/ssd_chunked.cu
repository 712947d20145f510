// cuda/ssd_chunked.cu: the Mamba-2 SSD scan over a sequence in its chunked form (prefill), as
// five kernels over chunks of Q tokens (Mamba-2 paper, Listing 1; spec mamba.md §3.5). Per row
// b, head h (group g = h / (H / G)), chunk c of tokens t = cQ .. cQ + Lc - 1 (Lc <= Q):
//
//   δ_t = clamp(softplus(dt[t, h] + dt_bias[h]), dt_min, dt_max)      (threshold 20)
//   Λ_l = Σ_{i<=l} δ_i A[h]     (cumulative within the chunk, fp32; Λ <= 0, decreasing)
//   CB_c[l, s]  = Σ_n C_l[n] B_s[n]                   (per group, s <= l tiles only)
//   dS_c[p, n]  = Σ_s x_s[p] · exp(Λ_last − Λ_s) δ_s B_s[n]      (chunk state: Xᵀ · (w ∘ B))
//   S_0 = ssm_state;  S_{c+1} = exp(Λ_last(c)) S_c + dS_c;  ssm_state <- S_last  (passing)
//   y_l[p] = Σ_n (exp(Λ_l) C_l[n]) S_c[p, n]                       (Y_off = C' · S_cᵀ)
//          + Σ_{s<=l} CB_c[l, s] exp(Λ_l − Λ_s) δ_s x_s[p]       (Y_diag = M · X, stable segsum)
//          + D[h] x_l[p]     (· silu(z_l[p]) when z is given)
//
// The four matrix products (C·Bᵀ, M·X, Xᵀ·(w ∘ B), C'·Sᵀ) run on tensor cores: WMMA
// m16n16k8 with TF32 operands and fp32 accumulation, on 64 x 64 output tiles (4 warps, each a
// 32 x 32 quarter = 2 x 2 fragments) whose operands are staged in shared memory (16-byte loads
// where the inputs are 16-byte aligned). Two precisions (SsdChunkedParams::tf32):
//   - split TF32 (default, "3xTF32"): each fp32 operand v is split into hi = tf32(v) and
//     lo = tf32(v − hi) and a·b is accumulated as a_lo·b_hi + a_hi·b_lo + a_hi·b_hi. That keeps
//     about 21 bits of each operand (relative error ~2^-21 per product, near fp32's 2^-24), at
//     three tensor-core products per one; results match the fp32 CPU reference to fp32-like
//     tolerances.
//   - plain TF32 (tf32 = true): one product of operands rounded to TF32 (10-bit mantissa,
//     relative rounding error <= 2^-11 per operand); outputs carry ~1e-3 relative error
//     (tests/test_cuda.py, test_ssd_chunked_tf32_*, states the bound).
// Everything else (δ, Λ, the decay weights, state passing, D skip, gate) is fp32; Λ is a
// block-parallel scan (a different summation order from the CPU's running sum, same fp32 error).
//
// Kernels in launch order (T = Qp / 64 tiles per chunk, 128 threads unless noted):
//   ssd_chunk_cumsum_kernel   (nc, H, B) x 256 threads         δ, Λ
//   ssd_chunk_cb_kernel       (nc * T (T + 1) / 2, G, B)         CB tiles, 18 KB shared
//   ssd_chunk_state_kernel    (nc, H * ceil(P/64) * ceil(N/64), B)   dS_c, 36 KB shared
//   ssd_state_passing_kernel  (ceil(P*N / 256), H, B) x 256 threads  S_c, final ssm_state
//   ssd_chunk_scan_kernel     (nc * T, H * ceil(P/64), B)        y, 36 KB shared
//
// Chunk: the kernels run chunks of Qk = min(Q, kQMax = 256) tokens. The algorithm is exact for
// any chunk length, so Qk < Q (config chunk_size > 256) only changes rounding.
//
// Workspace (floats, each part aligned to 64 floats = 256 bytes; the base must be 32-byte
// aligned, as cudaMalloc's is):
//   δ (B, H, L), Λ (B, H, L), chunk states (B, nc, H, P, N) (dS_c, then S_c in place),
//   CB (B, nc, G, Qp, Qp) with Qp = Qk rounded up to 64 (lower-triangular 64 x 64 tiles written).
// Preconditions (launcher): Q >= 1, H % G == 0, ld_xbc >= H*P, ld_dt >= H, y does not alias
// the inputs, grid sizes below within CUDA's limits. Needs sm_80+ (TF32 WMMA).
#include <cstdint>

#include "common.cuh"
#include "kernels.h"
#include "wmma_tf32.cuh"

namespace mambart {
namespace cuda {
namespace {

constexpr int kQMax = 256;     // longest chunk the kernels run (cumsum block size)
constexpr int kPassThreads = 256;

__host__ __device__ inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
__host__ __device__ inline int64_t align64(int64_t n) { return (n + 63) / 64 * 64; }
__device__ __forceinline__ int64_t lmin(int64_t a, int64_t b) { return a < b ? a : b; }

// The workspace parts and the chunking, computed once on the host.
struct Ws {
    float* delta;   // (B, H, L)            δ
    float* cum;     // (B, H, L)            Λ (chunk-local)
    float* states;  // (B, nc, H, P, N)     dS_c, then S_c
    float* cb;      // (B, nc, G, Qp, Qp)   C_l · B_s
    int64_t Q;      // chunk length the kernels run (<= kQMax)
    int64_t nc;     // number of chunks, ceil(L / Q)
    int64_t Qp;     // Q rounded up to kT
    int64_t tilesP, tilesN;  // ceil(P / kT), ceil(N / kT)
    bool vec;       // x, B, C rows (and states) allow 16-byte loads
};

struct WsSizes {
    int64_t delta, cum, states, cb;
};

inline WsSizes ws_sizes(const SsdParams& s, int64_t Qk) {
    const int64_t nc = cdiv(s.L, Qk), Qp = cdiv(Qk, kT) * kT;
    return {align64(s.B * s.H * s.L), align64(s.B * s.H * s.L), align64(s.B * nc * s.H * s.P * s.N),
            align64(s.B * nc * s.G * Qp * Qp)};
}

inline int64_t chunk_len(int64_t Q) { return Q < kQMax ? Q : kQMax; }

// ---- kernels -------------------------------------------------------------------------------

// ssd_chunk_cumsum_kernel: δ_t and the chunk-local inclusive cumsum Λ_l = Σ_{i<=l} δ_i A[h].
// Grid: (nc, H, B); block: kQMax threads, thread l = token t0 + l of the chunk (l < Lc); a
// block-wide scan (warp shuffles, then the 8 warp totals).
__global__ void __launch_bounds__(kQMax) ssd_chunk_cumsum_kernel(SsdParams s, Ws w) {
    __shared__ float warp_tot[kQMax / 32];
    const int64_t c = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int64_t t0 = c * w.Q, Lc = lmin(s.L, t0 + w.Q) - t0;
    const int l = threadIdx.x, lane = l & 31, warp = l >> 5;
    float d = 0.0f;
    if (l < Lc)
        d = fminf(fmaxf(softplus_f(s.dt[(b * s.L + t0 + l) * s.ld_dt + h] + s.dt_bias[h]),
                        s.dt_min),
                  s.dt_max);
    float v = d * s.A[h];
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const float n = __shfl_up_sync(0xffffffffu, v, o);
        if (lane >= o) v += n;
    }
    if (lane == 31) warp_tot[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float t = lane < kQMax / 32 ? warp_tot[lane] : 0.0f;
#pragma unroll
        for (int o = 1; o < kQMax / 32; o <<= 1) {
            const float n = __shfl_up_sync(0xffffffffu, t, o);
            if (lane >= o) t += n;
        }
        if (lane < kQMax / 32) warp_tot[lane] = t;
    }
    __syncthreads();
    if (warp > 0) v += warp_tot[warp - 1];
    if (l < Lc) {
        w.delta[(b * s.H + h) * s.L + t0 + l] = d;
        w.cum[(b * s.H + h) * s.L + t0 + l] = v;
    }
}

// ssd_chunk_cb_kernel: CB_c[l, s] = Σ_n C_l[n] B_s[n] for the 64 x 64 tiles (lt, st), st <= lt,
// of each chunk and group (rows/cols past the chunk's end are 0).
// Grid: (nc * T (T + 1) / 2, G, B), T = Qp / 64; block: 4 warps over the 64 x 64 tile; n in
// slices of 32 staged in shared memory (C (l, n), B (s, n): 18 KB). Tiles that start past the
// last chunk's end exit (the scan never reads them).
template <bool kSplit>
__global__ void __launch_bounds__(kThreads) ssd_chunk_cb_kernel(SsdParams s, Ws w) {
    __shared__ __align__(128) float Cs[kT * kLdK];  // (l, n)
    __shared__ __align__(128) float Bs[kT * kLdK];  // (s, n)
    const int64_t T = w.Qp / kT, ntri = T * (T + 1) / 2;
    const int64_t c = blockIdx.x / ntri, g = blockIdx.y, b = blockIdx.z;
    int64_t lt = 0, st = blockIdx.x % ntri;  // st -> (lt, st) with st <= lt
    while (st > lt) {
        st -= lt + 1;
        ++lt;
    }
    const int64_t t0 = c * w.Q, Lc = lmin(s.L, t0 + w.Q) - t0;
    const int64_t l0 = lt * kT, s0 = st * kT;
    const int warp = threadIdx.x >> 5, wm = (warp >> 1) * 32, wn = (warp & 1) * 32;
    if (l0 >= Lc) return;  // past the (last, short) chunk's end: never read; uniform
    const int nl = int(lmin(kT, Lc - l0)), ns = int(lmin(kT, Lc - s0));  // >= 1: s0 <= l0
    const float* Cg = s.Cm + (b * s.L + t0 + l0) * s.ld_xbc + g * s.N;
    const float* Bg = s.Bm + (b * s.L + t0 + s0) * s.ld_xbc + g * s.N;
    FragC acc[2][2];
    zero(acc);
    for (int64_t n0 = 0; n0 < s.N; n0 += kKs) {
        __syncthreads();
        stage<kT, kKs>(Cs, kLdK, Cg, s.ld_xbc, nl, n0, s.N, w.vec, nullptr);
        stage<kT, kKs>(Bs, kLdK, Bg, s.ld_xbc, ns, n0, s.N, w.vec, nullptr);
        __syncthreads();
        // A = C (l x n) row-major; B = Bᵀ (n x s): element (n, s) at Bs[s][n], column-major
        warp_mma<kSplit, wmma::row_major, wmma::col_major>(acc, Cs + wm * kLdK, kLdK,
                                                           Bs + wn * kLdK, kLdK, kKs);
    }
    float* out = w.cb + ((b * w.nc + c) * s.G + g) * w.Qp * w.Qp + (l0 + wm) * w.Qp + s0 + wn;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j)
            wmma::store_matrix_sync(out + 16 * i * w.Qp + 16 * j, acc[i][j], unsigned(w.Qp),
                                    wmma::mem_row_major);
}

// ssd_chunk_state_kernel: dS_c[p, n] = Σ_s x_s[p] · w_s B_s[n], w_s = exp(Λ_last − Λ_s) δ_s,
// for a 64 (p) x 64 (n) tile: Xᵀ (p x s) · (w ∘ B) (s x n), tokens s in slices of 32 staged in
// shared memory (x weighted by w_s, B), the result staged through shared memory for the
// bounds-checked store (36 KB static shared memory).
// Grid: (nc, H * tilesP * tilesN, B); block: 4 warps over the 64 x 64 tile.
template <bool kSplit>
__global__ void __launch_bounds__(kThreads) ssd_chunk_state_kernel(SsdParams s, Ws w) {
    __shared__ __align__(128) float Xs[kKs * kLdT];  // (s, p) weighted x
    __shared__ __align__(128) float Bs[kKs * kLdT];  // (s, n)
    __shared__ __align__(128) float Os[kT * kLdT];   // (p, n) the result tile
    __shared__ float wt[kQMax];                      // (s) w_s
    const int64_t c = blockIdx.x, b = blockIdx.z;
    const int64_t h = blockIdx.y / (w.tilesP * w.tilesN);
    const int64_t rem = blockIdx.y % (w.tilesP * w.tilesN);
    const int64_t p0 = (rem / w.tilesN) * kT, n0 = (rem % w.tilesN) * kT;
    const int64_t g = h / (s.H / s.G);
    const int64_t t0 = c * w.Q, Lc = lmin(s.L, t0 + w.Q) - t0;
    const int warp = threadIdx.x >> 5, wm = (warp >> 1) * 32, wn = (warp & 1) * 32;
    const float* dl = w.delta + (b * s.H + h) * s.L + t0;
    const float* cm = w.cum + (b * s.H + h) * s.L + t0;
    const float last = cm[Lc - 1];
    for (int i = threadIdx.x; i < Lc; i += kThreads) wt[i] = expf(last - cm[i]) * dl[i];
    const float* xg = s.x + (b * s.L + t0) * s.ld_xbc + h * s.P;
    const float* Bg = s.Bm + (b * s.L + t0) * s.ld_xbc + g * s.N;
    FragC acc[2][2];
    zero(acc);
    for (int64_t s0 = 0; s0 < Lc; s0 += kKs) {
        __syncthreads();  // wt written; the previous slice's reads done
        const int ns = int(lmin(kKs, Lc - s0));
        stage<kKs, kT>(Xs, kLdT, xg + s0 * s.ld_xbc, s.ld_xbc, ns, p0, s.P, w.vec, wt + s0);
        stage<kKs, kT>(Bs, kLdT, Bg + s0 * s.ld_xbc, s.ld_xbc, ns, n0, s.N, w.vec, nullptr);
        __syncthreads();
        // A = Xᵀ (p x s): element (p, s) at Xs[s][p], column-major; B = (w ∘ B) (s x n) row-major
        warp_mma<kSplit, wmma::col_major, wmma::row_major>(acc, Xs + wm, kLdT, Bs + wn, kLdT,
                                                           kKs);
    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j)
            wmma::store_matrix_sync(Os + (wm + 16 * i) * kLdT + wn + 16 * j, acc[i][j], kLdT,
                                    wmma::mem_row_major);
    __syncthreads();
    float* out = w.states + ((b * w.nc + c) * s.H + h) * s.P * s.N;
    for (int idx = threadIdx.x; idx < kT * kT; idx += kThreads) {
        const int i = idx / kT, j = idx % kT;
        const int64_t p = p0 + i, n = n0 + j;
        if (p < s.P && n < s.N) out[p * s.N + n] = Os[i * kLdT + j];
    }
}

// ssd_state_passing_kernel: S_0 = ssm_state; per chunk c: slot c <- S_c (replacing dS_c),
// S_{c+1} = exp(Λ_last(c)) S_c + dS_c; ssm_state <- S_nc.
// Grid: (ceil(P*N / 256), H, B); block: 256 threads, one state element each, chunks in order.
template <int kPass>
__global__ void __launch_bounds__(kPassThreads) ssd_state_passing_kernel(SsdParams s, Ws w) {
    const int64_t e = int64_t(blockIdx.x) * kPassThreads + threadIdx.x;
    const int64_t h = blockIdx.y, b = blockIdx.z, PN = s.P * s.N;
    if (e >= PN) return;
    float* state = s.ssm_state + (b * s.H + h) * PN;
    float S = state[e];
    // kPass chunks at a time: their dS_c and Λ_last loaded first (all in flight, for kPass > 1:
    // load_ahead_enabled()), then the recurrence over them.
    for (int64_t c0 = 0; c0 < w.nc; c0 += kPass) {
        float dS[kPass], lam[kPass];
#pragma unroll
        for (int k = 0; k < kPass; ++k) {
            const int64_t c = c0 + k;
            if (c < w.nc) {
                dS[k] = w.states[((b * w.nc + c) * s.H + h) * PN + e];
                lam[k] = w.cum[(b * s.H + h) * s.L + lmin(s.L, (c + 1) * w.Q) - 1];
            }
        }
#pragma unroll
        for (int k = 0; k < kPass; ++k) {
            const int64_t c = c0 + k;
            if (c < w.nc) {
                w.states[((b * w.nc + c) * s.H + h) * PN + e] = S;
                S = expf(lam[k]) * S + dS[k];
            }
        }
    }
    state[e] = S;
}

// ssd_chunk_scan_kernel: y for a 64 (l) x 64 (p) tile of one chunk and head:
//   Y_off = C' · S_cᵀ with C'_l = exp(Λ_l) C_l (n in slices of 32: C' (l, n), S_c (p, n)), then
//   Y_diag over the causal token tiles s0 <= l0: M = CB ∘ exp(Λ_l − Λ_s) δ_s masked to s <= l,
//   acc += M · X (M (l, s) and X (s, p) 64 x 64 each); then, through shared memory, D x, the
//   gate and the bounds-checked store. 36 KB static shared memory (the phases reuse it).
// Grid: (nc * T, H * tilesP, B), T = Qp / 64; block: 4 warps over the 64 x 64 tile. Blocks
// whose l tile starts past the (last, short) chunk's end exit.
template <bool kSplit>
__global__ void __launch_bounds__(kThreads) ssd_chunk_scan_kernel(SsdParams s, Ws w) {
    __shared__ __align__(128) float sm[2 * kT * kLdT];
    __shared__ float cum_l[kT], el[kT], cum_s[kT], del_s[kT];
    const int64_t T = w.Qp / kT;
    const int64_t c = blockIdx.x / T, l0 = (blockIdx.x % T) * kT;
    const int64_t h = blockIdx.y / w.tilesP, p0 = (blockIdx.y % w.tilesP) * kT;
    const int64_t b = blockIdx.z, g = h / (s.H / s.G);
    const int64_t t0 = c * w.Q, Lc = lmin(s.L, t0 + w.Q) - t0;
    if (l0 >= Lc) return;  // uniform over the block
    const int nl = int(lmin(kT, Lc - l0));
    const int np = int(lmin(kT, s.P - p0));
    const int warp = threadIdx.x >> 5, wm = (warp >> 1) * 32, wn = (warp & 1) * 32;
    const float* dl = w.delta + (b * s.H + h) * s.L + t0;
    const float* cm = w.cum + (b * s.H + h) * s.L + t0;
    if (threadIdx.x < kT) {
        const int i = threadIdx.x;
        cum_l[i] = i < nl ? cm[l0 + i] : 0.0f;
        el[i] = i < nl ? expf(cm[l0 + i]) : 0.0f;
    }
    FragC acc[2][2];
    zero(acc);
    // Y_off = C' · S_cᵀ
    {
        float* Cs = sm;              // (l, n) 64 x 32, row stride kLdK
        float* Ss = sm + kT * kLdK;  // (p, n) 64 x 32
        const float* Cg = s.Cm + (b * s.L + t0 + l0) * s.ld_xbc + g * s.N;
        const float* Sg = w.states + ((b * w.nc + c) * s.H + h) * s.P * s.N + p0 * s.N;
        for (int64_t n0 = 0; n0 < s.N; n0 += kKs) {
            __syncthreads();  // el written; the previous slice's reads done
            stage<kT, kKs>(Cs, kLdK, Cg, s.ld_xbc, nl, n0, s.N, w.vec, el);
            stage<kT, kKs>(Ss, kLdK, Sg, s.N, np, n0, s.N, w.vec, nullptr);
            __syncthreads();
            // A = C' (l x n) row-major; B = Sᵀ (n x p): element (n, p) at Ss[p][n], column-major
            warp_mma<kSplit, wmma::row_major, wmma::col_major>(acc, Cs + wm * kLdK, kLdK,
                                                               Ss + wn * kLdK, kLdK, kKs);
        }
    }
    // Y_diag = Σ_{s tiles <= l tile} M · X
    {
        float* Ms = sm;              // (l, s) 64 x 64, row stride kLdT
        float* Xs = sm + kT * kLdT;  // (s, p) 64 x 64
        const float* cb = w.cb + ((b * w.nc + c) * s.G + g) * w.Qp * w.Qp;
        for (int64_t s0 = 0; s0 <= l0; s0 += kT) {
            const int ns = int(lmin(kT, Lc - s0));  // >= 1: s0 <= l0 < Lc
            __syncthreads();  // the previous tile's reads (or Y_off's) done
            if (threadIdx.x < kT) {
                const int j = threadIdx.x;
                cum_s[j] = j < ns ? cm[s0 + j] : 0.0f;
                del_s[j] = j < ns ? dl[s0 + j] : 0.0f;
            }
            stage<kT, kT>(Xs, kLdT, s.x + (b * s.L + t0 + s0) * s.ld_xbc + h * s.P, s.ld_xbc,
                          ns, p0, s.P, w.vec, nullptr);
            __syncthreads();
            for (int idx = threadIdx.x; idx < kT * kT; idx += kThreads) {
                const int i = idx / kT, j = idx % kT;
                const int64_t l = l0 + i, st = s0 + j;
                float v = 0.0f;
                if (st <= l && i < nl && j < ns)
                    v = cb[l * w.Qp + st] * expf(cum_l[i] - cum_s[j]) * del_s[j];
                Ms[i * kLdT + j] = v;
            }
            __syncthreads();
            // A = M (l x s) row-major; B = X (s x p) row-major
            warp_mma<kSplit, wmma::row_major, wmma::row_major>(acc, Ms + wm * kLdT, kLdT, Xs + wn,
                                                               kLdT, kT);
        }
    }
    // epilogue: y = acc + D x (· silu(z))
    __syncthreads();
    float* Os = sm;  // (l, p) 64 x 64
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j)
            wmma::store_matrix_sync(Os + (wm + 16 * i) * kLdT + wn + 16 * j, acc[i][j], kLdT,
                                    wmma::mem_row_major);
    __syncthreads();
    const float Dv = s.D[h];
    for (int idx = threadIdx.x; idx < kT * kT; idx += kThreads) {
        const int i = idx / kT, j = idx % kT;
        if (i >= nl || j >= np) continue;
        const int64_t r = b * s.L + t0 + l0 + i, p = p0 + j;
        float v = Os[i * kLdT + j] + Dv * s.x[r * s.ld_xbc + h * s.P + p];
        if (s.z) v *= silu_f(s.z[r * s.ld_z + h * s.P + p]);
        s.y[r * s.H * s.P + h * s.P + p] = v;
    }
}

template <bool kSplit>
void launch_all(const SsdParams& p, const Ws& w, cudaStream_t st) {
    const int64_t T = w.Qp / kT;
    ssd_chunk_cumsum_kernel<<<dim3(unsigned(w.nc), unsigned(p.H), unsigned(p.B)), kQMax, 0, st>>>(
        p, w);
    check_launch("ssd_chunk_cumsum_kernel", st);
    ssd_chunk_cb_kernel<kSplit>
        <<<dim3(unsigned(w.nc * T * (T + 1) / 2), unsigned(p.G), unsigned(p.B)), kThreads, 0, st>>>(
            p, w);
    check_launch("ssd_chunk_cb_kernel", st);
    ssd_chunk_state_kernel<kSplit>
        <<<dim3(unsigned(w.nc), unsigned(p.H * w.tilesP * w.tilesN), unsigned(p.B)), kThreads, 0,
           st>>>(p, w);
    check_launch("ssd_chunk_state_kernel", st);
    const dim3 pgrid(unsigned(cdiv(p.P * p.N, kPassThreads)), unsigned(p.H), unsigned(p.B));
    if (load_ahead_enabled())
        ssd_state_passing_kernel<8><<<pgrid, kPassThreads, 0, st>>>(p, w);
    else
        ssd_state_passing_kernel<1><<<pgrid, kPassThreads, 0, st>>>(p, w);
    check_launch("ssd_state_passing_kernel", st);
    ssd_chunk_scan_kernel<kSplit>
        <<<dim3(unsigned(w.nc * T), unsigned(p.H * w.tilesP), unsigned(p.B)), kThreads, 0, st>>>(
            p, w);
    check_launch("ssd_chunk_scan_kernel", st);
}

inline bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

}  // namespace

int64_t ssd_chunked_workspace_floats(const SsdParams& s, int64_t Q) {
    if (Q < 1 || s.L < 1) return 0;
    const WsSizes z = ws_sizes(s, chunk_len(Q));
    return z.delta + z.cum + z.states + z.cb;
}

void launch_ssd_chunked(const SsdChunkedParams& q, cudaStream_t st) {
    const SsdParams& p = q.s;
    MAMBART_CHECK_ARG(p.B >= 0 && p.L >= 0 && p.H > 0 && p.G > 0 && p.P > 0 && p.N > 0,
                      "launch_ssd_chunked: bad sizes B=", p.B, " L=", p.L, " H=", p.H, " G=", p.G,
                      " P=", p.P, " N=", p.N);
    MAMBART_CHECK_ARG(p.H % p.G == 0, "launch_ssd_chunked: nheads=", p.H,
                      " is not a multiple of ngroups=", p.G);
    MAMBART_CHECK_ARG(q.Q >= 1, "launch_ssd_chunked: chunk_size=", q.Q, " must be >= 1");
    MAMBART_CHECK_ARG(p.ld_xbc >= p.H * p.P && p.ld_dt >= p.H && (!p.z || p.ld_z >= p.H * p.P),
                      "launch_ssd_chunked: bad strides");
    MAMBART_CHECK_ARG(p.x && p.Bm && p.Cm && p.dt && p.A && p.D && p.dt_bias && p.ssm_state &&
                          p.y && q.ws,
                      "launch_ssd_chunked: null pointer");
    MAMBART_CHECK_ARG(reinterpret_cast<uintptr_t>(q.ws) % 32 == 0,
                      "launch_ssd_chunked: the workspace must be 32-byte aligned");
    if (p.B == 0 || p.L == 0) return;
    const int64_t Qk = chunk_len(q.Q);
    const WsSizes z = ws_sizes(p, Qk);
    Ws w{};
    w.delta = q.ws;
    w.cum = w.delta + z.delta;
    w.states = w.cum + z.cum;
    w.cb = w.states + z.states;
    w.Q = Qk;
    w.nc = cdiv(p.L, Qk);
    w.Qp = cdiv(Qk, kT) * kT;
    w.tilesP = cdiv(p.P, kT);
    w.tilesN = cdiv(p.N, kT);
    // 16-byte loads: rows of x, B, C (and the states' rows of N floats) start 16-byte aligned
    // and every staged column offset (h*P, g*N, multiples of 4 within) is a multiple of 4.
    w.vec = aligned16(p.x) && aligned16(p.Bm) && aligned16(p.Cm) && p.ld_xbc % 4 == 0 &&
            p.P % 4 == 0 && p.N % 4 == 0;
    const int64_t T = w.Qp / kT;
    MAMBART_CHECK_ARG(p.B <= 65535 && p.H <= 65535 && p.G <= 65535 &&
                          p.H * w.tilesP * w.tilesN <= 65535 &&
                          w.nc * T * (T + 1) / 2 <= 0x7fffffff &&
                          cdiv(p.P * p.N, kPassThreads) <= 0x7fffffff,
                      "launch_ssd_chunked: grid too large (B=", p.B, " L=", p.L, " H=", p.H,
                      " P=", p.P, " N=", p.N, ")");
    if (q.tf32)
        launch_all<false>(p, w, st);
    else
        launch_all<true>(p, w, st);
}

}  // namespace cuda
}  // namespace mambart

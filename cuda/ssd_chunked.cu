// cuda/ssd_chunked.cu: the Mamba-2 SSD scan over a sequence in its chunked form (prefill), as
// four kernels over chunks of Q tokens (Mamba-2 paper, Listing 1; spec mamba.md §3.5). Per row
// b, head h (group g = h / (H / G)), chunk c of tokens t = cQ .. cQ + Lc - 1 (Lc <= Q):
//
//   δ_t = clamp(softplus(dt[t, h] + dt_bias[h]), dt_min, dt_max)      (threshold 20)
//   Λ_l = Σ_{i<=l} δ_i A[h]     (cumulative within the chunk, fp32; Λ <= 0, decreasing)
//   dS_c[p, n]  = Σ_s exp(Λ_last − Λ_s) δ_s x_s[p] B_s[n]            (chunk state)
//   S_0 = ssm_state;  S_{c+1} = exp(Λ_last(c)) S_c + dS_c;  ssm_state <- S_last  (passing)
//   y_l[p] = exp(Λ_l) Σ_n C_l[n] S_c[p, n]                           (Y_off)
//          + Σ_{s<=l} (Σ_n C_l[n] B_s[n]) exp(Λ_l − Λ_s) δ_s x_s[p]  (Y_diag, stable segsum)
//          + D[h] x_l[p]     (· silu(z_l[p]) when z is given)
//
// All arithmetic is fp32 (FMA tiles of 32 x 32 in shared memory). Workspace (floats):
//   δ (B, H, L), Λ (B, H, L), chunk states (B, nchunks, H, P, N) (dS_c, then S_c in place).
// Preconditions (launcher): Q >= 1, H % G == 0, ld_xbc >= H*P, ld_dt >= H, y does not alias
// the inputs, grid sizes below within CUDA's limits.
#include "common.cuh"
#include "kernels.h"

namespace mambart {
namespace cuda {
namespace {

constexpr int kTile = 32;          // tile edge
constexpr int kThreads = 256;      // 8 warps; a thread owns one column and kTile / 8 rows
constexpr int kRows = kTile / 8;

__host__ __device__ inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct Ws {
    float* delta;   // (B, H, L)
    float* cum;     // (B, H, L)
    float* states;  // (B, nc, H, P, N)
};

__host__ __device__ inline Ws split_ws(float* ws, const SsdParams& s) {
    Ws w;
    w.delta = ws;
    w.cum = ws + s.B * s.H * s.L;
    w.states = ws + 2 * s.B * s.H * s.L;
    return w;
}

// ssd_chunk_cumsum_kernel: δ and the chunk-local cumsum Λ.
// Grid: (nchunks, B); block: 128 threads, one head each (strided over H); each walks the
// chunk's Lc tokens sequentially.
__global__ void __launch_bounds__(128) ssd_chunk_cumsum_kernel(SsdParams s, int64_t Q, float* ws) {
    const Ws w = split_ws(ws, s);
    const int64_t c = blockIdx.x, b = blockIdx.y;
    const int64_t t0 = c * Q, t1 = min(s.L, t0 + Q);
    for (int64_t h = threadIdx.x; h < s.H; h += blockDim.x) {
        const float A = s.A[h], dtb = s.dt_bias[h];
        float run = 0.0f;
        for (int64_t t = t0; t < t1; ++t) {
            const float d = fminf(fmaxf(softplus_f(s.dt[(b * s.L + t) * s.ld_dt + h] + dtb),
                                        s.dt_min), s.dt_max);
            run += d * A;
            w.delta[(b * s.H + h) * s.L + t] = d;
            w.cum[(b * s.H + h) * s.L + t] = run;
        }
    }
}

// ssd_chunk_state_kernel: dS_c[p, n] = Σ_s exp(Λ_last − Λ_s) δ_s x_s[p] B_s[n].
// Grid: (nchunks, H * ceil(P/32) * ceil(N/32), B); block: 256 threads over a 32 (p) x 32 (n)
// output tile: column n = tid % 32, rows p = tid / 32 + 8 i. Tokens s in tiles of 32 staged in
// shared memory (x weighted, B).
__global__ void __launch_bounds__(kThreads) ssd_chunk_state_kernel(SsdParams s, int64_t Q, float* ws) {
    __shared__ float Xs[kTile][kTile + 1];  // (s, p) weighted x
    __shared__ float Bs[kTile][kTile + 1];  // (s, n)
    const Ws w = split_ws(ws, s);
    const int64_t nc = cdiv(s.L, Q);
    const int64_t tilesP = cdiv(s.P, kTile), tilesN = cdiv(s.N, kTile);
    const int64_t c = blockIdx.x, b = blockIdx.z;
    const int64_t h = blockIdx.y / (tilesP * tilesN);
    const int64_t rem = blockIdx.y % (tilesP * tilesN);
    const int64_t p0 = (rem / tilesN) * kTile, n0 = (rem % tilesN) * kTile;
    const int64_t g = h / (s.H / s.G);
    const int64_t t0 = c * Q, Lc = min(s.L, t0 + Q) - t0;
    const int tx = threadIdx.x % kTile, ty = threadIdx.x / kTile;
    const float* dl = w.delta + (b * s.H + h) * s.L + t0;
    const float* cm = w.cum + (b * s.H + h) * s.L + t0;
    const float last = cm[Lc - 1];
    float acc[kRows] = {};
    for (int64_t s0 = 0; s0 < Lc; s0 += kTile) {
        __syncthreads();
        for (int i = ty; i < kTile; i += 8) {
            const int64_t st = s0 + i;
            const bool in = st < Lc;
            const int64_t row = (b * s.L + t0 + (in ? st : 0)) * s.ld_xbc;
            const float wt = in ? expf(last - cm[st]) * dl[st] : 0.0f;
            Xs[i][tx] = (in && p0 + tx < s.P) ? s.x[row + h * s.P + p0 + tx] * wt : 0.0f;
            Bs[i][tx] = (in && n0 + tx < s.N) ? s.Bm[row + g * s.N + n0 + tx] : 0.0f;
        }
        __syncthreads();
#pragma unroll 8
        for (int k = 0; k < kTile; ++k) {
            const float bv = Bs[k][tx];
#pragma unroll
            for (int i = 0; i < kRows; ++i) acc[i] += Xs[k][ty + 8 * i] * bv;
        }
    }
    float* out = w.states + ((b * nc + c) * s.H + h) * s.P * s.N;
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
        const int64_t p = p0 + ty + 8 * i, n = n0 + tx;
        if (p < s.P && n < s.N) out[p * s.N + n] = acc[i];
    }
}

// ssd_state_passing_kernel: S_0 = ssm_state; per chunk c: slot c <- S_c (replacing dS_c),
// S_{c+1} = exp(Λ_last(c)) S_c + dS_c; ssm_state <- S_nc.
// Grid: (ceil(P*N / 256), H, B); block: 256 threads, one state element each, chunks in order.
__global__ void __launch_bounds__(kThreads) ssd_state_passing_kernel(SsdParams s, int64_t Q, float* ws) {
    const Ws w = split_ws(ws, s);
    const int64_t e = int64_t(blockIdx.x) * kThreads + threadIdx.x;
    const int64_t h = blockIdx.y, b = blockIdx.z, PN = s.P * s.N;
    if (e >= PN) return;
    const int64_t nc = cdiv(s.L, Q);
    float* state = s.ssm_state + (b * s.H + h) * PN;
    float S = state[e];
    for (int64_t c = 0; c < nc; ++c) {
        float* slot = w.states + ((b * nc + c) * s.H + h) * PN + e;
        const float dS = *slot;
        *slot = S;
        const int64_t tl = min(s.L, (c + 1) * Q) - 1;
        S = expf(w.cum[(b * s.H + h) * s.L + tl]) * S + dS;
    }
    state[e] = S;
}

// ssd_chunk_scan_kernel: y for a 32 (l) x 32 (p) tile of one chunk and head:
//   Y_off (C tile · S_cᵀ over n tiles, scaled by exp(Λ_l)), then Y_diag over the causal token
//   tiles s0 <= l: M = (C · Bᵀ) ∘ exp(Λ_l − Λ_s) δ_s masked to s <= l, acc += M · X; then D x
//   and the gate.
// Grid: (nchunks * ceil(Q/32), H * ceil(P/32), B); block: 256 threads, column p = tid % 32,
// rows l = tid / 32 + 8 i. Blocks whose l tile starts past the (last, short) chunk's end exit.
__global__ void __launch_bounds__(kThreads) ssd_chunk_scan_kernel(SsdParams s, int64_t Q, float* ws) {
    __shared__ float Cs[kTile][kTile + 1];  // (l, n)
    __shared__ float Ks[kTile][kTile + 1];  // (p, n) state tile, then (s, n) B tile
    __shared__ float Ms[kTile][kTile + 1];  // (l, s)
    __shared__ float Xs[kTile][kTile + 1];  // (s, p)
    __shared__ float cum_l[kTile], cum_s[kTile], del_s[kTile];
    const Ws w = split_ws(ws, s);
    const int64_t nc = cdiv(s.L, Q), ltiles = cdiv(Q, kTile);
    const int64_t c = blockIdx.x / ltiles, l0 = (blockIdx.x % ltiles) * kTile;
    const int64_t tilesP = cdiv(s.P, kTile);
    const int64_t h = blockIdx.y / tilesP, p0 = (blockIdx.y % tilesP) * kTile;
    const int64_t b = blockIdx.z, g = h / (s.H / s.G);
    const int64_t t0 = c * Q, Lc = min(s.L, t0 + Q) - t0;
    if (l0 >= Lc) return;  // uniform over the block
    const int tx = threadIdx.x % kTile, ty = threadIdx.x / kTile;
    const float* dl = w.delta + (b * s.H + h) * s.L + t0;
    const float* cm = w.cum + (b * s.H + h) * s.L + t0;
    const float* S = w.states + ((b * nc + c) * s.H + h) * s.P * s.N;
    if (threadIdx.x < kTile) cum_l[tx] = l0 + tx < Lc ? cm[l0 + tx] : 0.0f;
    auto row_of = [&](int64_t l) { return (b * s.L + t0 + l); };
    // Y_off = C_l · S_cᵀ
    float acc[kRows] = {};
    for (int64_t n0 = 0; n0 < s.N; n0 += kTile) {
        __syncthreads();
        for (int i = ty; i < kTile; i += 8) {
            const int64_t l = l0 + i, n = n0 + tx, p = p0 + i;
            Cs[i][tx] = (l < Lc && n < s.N) ? s.Cm[row_of(l) * s.ld_xbc + g * s.N + n] : 0.0f;
            Ks[i][tx] = (p < s.P && n < s.N) ? S[p * s.N + n] : 0.0f;
        }
        __syncthreads();
#pragma unroll 8
        for (int k = 0; k < kTile; ++k) {
            const float sv = Ks[tx][k];
#pragma unroll
            for (int i = 0; i < kRows; ++i) acc[i] += Cs[ty + 8 * i][k] * sv;
        }
    }
#pragma unroll
    for (int i = 0; i < kRows; ++i) acc[i] *= expf(cum_l[ty + 8 * i]);
    // Y_diag over token tiles s0 <= the tile's last row
    for (int64_t s0 = 0; s0 < Lc && s0 <= l0 + kTile - 1; s0 += kTile) {
        float cb[kRows] = {};
        for (int64_t n0 = 0; n0 < s.N; n0 += kTile) {
            __syncthreads();
            for (int i = ty; i < kTile; i += 8) {
                const int64_t l = l0 + i, st = s0 + i, n = n0 + tx;
                Cs[i][tx] = (l < Lc && n < s.N) ? s.Cm[row_of(l) * s.ld_xbc + g * s.N + n] : 0.0f;
                Ks[i][tx] = (st < Lc && n < s.N) ? s.Bm[row_of(st) * s.ld_xbc + g * s.N + n] : 0.0f;
            }
            if (n0 == 0 && threadIdx.x < kTile) {
                cum_s[tx] = s0 + tx < Lc ? cm[s0 + tx] : 0.0f;
                del_s[tx] = s0 + tx < Lc ? dl[s0 + tx] : 0.0f;
            }
            __syncthreads();
#pragma unroll 8
            for (int k = 0; k < kTile; ++k) {
                const float bv = Ks[tx][k];
#pragma unroll
                for (int i = 0; i < kRows; ++i) cb[i] += Cs[ty + 8 * i][k] * bv;
            }
        }
        // here tx is the token column s; rows l = ty + 8 i
        for (int i = ty, r = 0; r < kRows; i += 8, ++r) {
            const int64_t l = l0 + i, st = s0 + tx;
            Ms[i][tx] = (st <= l && st < Lc && l < Lc)
                            ? cb[r] * expf(cum_l[i] - cum_s[tx]) * del_s[tx]
                            : 0.0f;
        }
        for (int i = ty; i < kTile; i += 8) {
            const int64_t st = s0 + i, p = p0 + tx;
            Xs[i][tx] = (st < Lc && p < s.P) ? s.x[row_of(st) * s.ld_xbc + h * s.P + p] : 0.0f;
        }
        __syncthreads();
#pragma unroll 8
        for (int k = 0; k < kTile; ++k) {
            const float xv = Xs[k][tx];
#pragma unroll
            for (int i = 0; i < kRows; ++i) acc[i] += Ms[ty + 8 * i][k] * xv;
        }
    }
    const float Dv = s.D[h];
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
        const int64_t l = l0 + ty + 8 * i, p = p0 + tx;
        if (l >= Lc || p >= s.P) continue;
        const int64_t r = row_of(l);
        float v = acc[i] + Dv * s.x[r * s.ld_xbc + h * s.P + p];
        if (s.z) v *= silu_f(s.z[r * s.ld_z + h * s.P + p]);
        s.y[r * s.H * s.P + h * s.P + p] = v;
    }
}

}  // namespace

int64_t ssd_chunked_workspace_floats(const SsdParams& s, int64_t Q) {
    if (Q < 1 || s.L < 1) return 0;
    return 2 * s.B * s.H * s.L + s.B * ceil_div(s.L, Q) * s.H * s.P * s.N;
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
    if (p.B == 0 || p.L == 0) return;
    const int64_t nc = ceil_div(p.L, q.Q);
    const int64_t tilesP = ceil_div(p.P, kTile), tilesN = ceil_div(p.N, kTile);
    const int64_t gx_scan = nc * ceil_div(q.Q, kTile);
    MAMBART_CHECK_ARG(p.B <= 65535 && p.H * tilesP * tilesN <= 65535 && gx_scan <= 0x7fffffff &&
                          p.H <= 65535,
                      "launch_ssd_chunked: grid too large");
    ssd_chunk_cumsum_kernel<<<dim3(unsigned(nc), unsigned(p.B)), 128, 0, st>>>(p, q.Q, q.ws);
    check_launch("ssd_chunk_cumsum_kernel", st);
    ssd_chunk_state_kernel<<<dim3(unsigned(nc), unsigned(p.H * tilesP * tilesN), unsigned(p.B)),
                             kThreads, 0, st>>>(p, q.Q, q.ws);
    check_launch("ssd_chunk_state_kernel", st);
    ssd_state_passing_kernel<<<dim3(unsigned(ceil_div(p.P * p.N, kThreads)), unsigned(p.H),
                                    unsigned(p.B)),
                               kThreads, 0, st>>>(p, q.Q, q.ws);
    check_launch("ssd_state_passing_kernel", st);
    ssd_chunk_scan_kernel<<<dim3(unsigned(gx_scan), unsigned(p.H * tilesP), unsigned(p.B)),
                            kThreads, 0, st>>>(p, q.Q, q.ws);
    check_launch("ssd_chunk_scan_kernel", st);
}

}  // namespace cuda
}  // namespace mambart

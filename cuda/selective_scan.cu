// cuda/selective_scan.cu: the Mamba-1 selective scan (prefill and the L = 1 decode step).
//
//   δ_t = softplus(dt[t, e] + dt_bias[e])            (threshold 20)
//   h[e, n] <- exp(δ_t A[e, n]) h[e, n] + δ_t u[t, e] B[t, n]        (fp32 state)
//   y[t, e] = (Σ_n C[t, n] h[e, n] + D[e] u[t, e]) · silu(z[t, e])
//
// Two channel mappings:
// - Channel per thread (N <= kCptMaxN = 16, every published Mamba-1: d_state 16). Thread e of a
//   block of kCptThreads owns channel e and all its N states in registers, so δ, du and silu(z)
//   are computed once per (t, e) and the sum over n needs no shuffle. The block stages the B and
//   C rows of kCptTile tokens in shared memory (read as broadcasts); a thread loads dt, x and z
//   of kCptGroup tokens before stepping them. exp(δ A) is computed as exp2(δ · A log2(e)).
// - Lane group (N > 16, or MAMBART_CUDA_SCAN=lanes): a channel e is owned by a group of
//   g = min(32, next_pow2(N)) lanes; lane j of the group holds states n = j + g·i (i < SPL =
//   ceil(N / g)) in registers, so the reduction over n is a shuffle within the group. A block is
//   4 warps = 4·(32 / g) channels. Tokens are walked in groups of kT whose inputs are all loaded
//   before the group's recurrence steps run (latency hiding).
//
// Two forms, each in both mappings:
// - Sequential (launch_selective_scan; decode and short prompts). Grid: (ceil(E / channels per
//   block), B); each channel walks all L tokens from ssm_state and writes the final state back.
// - Chunked (launch_selective_scan_chunked; long prompts). The L tokens of a row are cut into
//   nseg segments of T tokens (the last may be shorter). The recurrence is linear, so a
//   segment s maps its entry state h_in(s) to its exit state by
//     h_out(s) = P_s h_in(s) + S_s,   P_s = Π_{t∈s} exp(δ_t A) = exp(A Δ_s),   Δ_s = Σ_{t∈s} δ_t,
//     S_s = Σ_{t∈s} (Π_{t'∈s, t'>t} exp(δ_t' A)) δ_t u_t B_t   (the state from a zero start).
//   Three kernels, in stream order:
//   1. segment state: S_s and Δ_s of every segment. Grid: (ceil(E / channels per block), nseg,
//      B).
//   2. scan_segment_pass_kernel: h_in(0) = ssm_state, h_in(s+1) = exp(A Δ_s) h_in(s) + S_s
//      (sequential over s), ssm_state <- h_out(nseg-1). Grid: ceil(B·E·N / 256); block: 256
//      threads, one (b, e, n) each.
//   3. segment output: each segment again from h_in(s), writing y. Grid as 1.
//   Workspace (floats): S (B, nseg, E, N), overwritten in place by h_in in kernel 2; Δ (B,
//   nseg, E). P_s as exp(A Δ_s) rounds differently from the sequential form's running product
//   (a few ulps of the segment's decay); everything is fp32.
// With state_trace (speculative verification, issue 25), the output pass also stores each
// token's state: trace[b, t, e, :] = h after token t (the sequential form is used then).
// State storage S of the sequential form: float, or bf16 (ssm_state_bf16, option state_dtype):
// read as bf16, stepped in fp32, rounded to bf16 (nearest even) after every token (op_params.h
// BF16_STATE_RULE), the trace bf16 too. The chunked form takes an fp32 state only.
// Preconditions: 1 <= N <= 256; ld_bc >= N (B and C rows are slices of x_proj's output);
// ld_z >= E; y does not alias the inputs; B <= 65535 (chunked: nseg <= 65535).
#include <algorithm>

#include "common.cuh"
#include "kernels.h"

namespace mambart {
namespace cuda {
namespace {

constexpr int kScanWarps = 4;
constexpr int kPassThreads = 256;
constexpr int kPassBatch = 8;  // segments whose S and Δ the pass kernel loads together
// The chunked scan's segment length: enough segments that kernels 1 and 3 run about
// kScanTargetThreads threads (4 to 8 waves on an H100: 132 SMs x 640 to 1024 resident threads
// at these kernels' 61 to 109 registers), whole prefetch groups of 8 tokens, at least
// kScanMinSegment tokens (each segment adds a state store, a pass step and a state load).
constexpr int64_t kScanTargetThreads = int64_t(1) << 19;
constexpr int64_t kScanMinSegment = 32;

// Channel-per-thread mapping.
constexpr int kCptThreads = 128;  // channels per block
constexpr int kCptTile = 32;      // tokens whose B and C rows a block stages in shared memory
constexpr int kCptGroup = 8;      // tokens whose dt, x and z a thread loads before stepping them
// Threads the chunked form aims for with this mapping (about 2.5 waves on an H100 at ~80
// registers a thread): each thread does N lanes' work of the lane-group mapping.
constexpr int64_t kCptTargetThreads = int64_t(1) << 18;
constexpr float kLog2e = 1.4426950408889634f;

// Lanes per channel: min(32, next_pow2(N)).
inline int group_lanes(int64_t N) {
    int g = 1;
    while (g < N && g < 32) g <<= 1;
    return g;
}

// This thread's place in the channel mapping (see the top of the file).
struct Channel {
    int64_t e;   // the channel; clamped to E - 1 for idle lanes (they still join the shuffles)
    int j;       // lane within the channel's group
    bool valid;  // e < E
};

__device__ __forceinline__ Channel channel_of(int64_t E, int g) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int64_t e_raw = (int64_t(blockIdx.x) * kScanWarps + warp) * (32 / g) + lane / g;
    Channel c;
    c.valid = e_raw < E;
    c.e = c.valid ? e_raw : E - 1;
    c.j = lane % g;
    return c;
}

template <int SPL, typename S>
__device__ __forceinline__ void store_states(const float (&v)[SPL], S* row, int j, int g,
                                             int64_t N);

// Runs the recurrence over tokens t_begin .. t_end - 1 (t_begin < t_end <= L, uniform across
// the block) of row b on the states h (this lane's n = j + g·i), returning Σ_t δ_t.
// kOutput: also writes y[b, t, e] (lane j == 0 of a valid channel); else C and z are not read.
// S: the state's storage (bf16: h rounded after every token, the trace stored as bf16).
template <int SPL, bool kOutput, typename S = float>
__device__ __forceinline__ float scan_tokens(const SelectiveScanParams& p, int64_t b,
                                             const Channel& c, int g, int64_t t_begin,
                                             int64_t t_end, float (&h)[SPL],
                                             const float (&A)[SPL]) {
    constexpr int kT = SPL <= 2 ? 8 : (SPL <= 4 ? 4 : 2);  // tokens prefetched per group
    const int64_t E = p.E, N = p.N, e = c.e;
    const float dtb = p.dt_bias[e], Dv = p.D[e];
    S* const trace = trace_ptr<S>(p);  // (B, L, E, N) or nullptr
    float delta_sum = 0.0f;
    for (int64_t t0 = t_begin; t0 < t_end; t0 += kT) {
        float dtv[kT], uv[kT], zv[kT], Bv[kT][SPL], Cv[kT][SPL];
#pragma unroll
        for (int s = 0; s < kT; ++s) {
            const int64_t t = t0 + s;
            const bool in = t < t_end;
            const int64_t bt = b * p.L + (in ? t : t_begin);
            dtv[s] = in ? p.dt[bt * E + e] : 0.0f;
            uv[s] = in ? p.x[bt * E + e] : 0.0f;
            zv[s] = (kOutput && in) ? p.z[bt * p.ld_z + e] : 0.0f;
#pragma unroll
            for (int i = 0; i < SPL; ++i) {
                const int64_t n = c.j + int64_t(g) * i;
                Bv[s][i] = (in && n < N) ? p.Bm[bt * p.ld_bc + n] : 0.0f;
                Cv[s][i] = (kOutput && in && n < N) ? p.Cm[bt * p.ld_bc + n] : 0.0f;
            }
        }
#pragma unroll
        for (int s = 0; s < kT; ++s) {
            const int64_t t = t0 + s;
            if (t >= t_end) break;  // uniform across the block
            const float delta = softplus_f(dtv[s] + dtb);
            const float du = delta * uv[s];
            delta_sum += delta;
            float acc = 0.0f;
#pragma unroll
            for (int i = 0; i < SPL; ++i) {
                const int64_t n = c.j + int64_t(g) * i;
                if (n < N) {
                    h[i] = expf(delta * A[i]) * h[i] + du * Bv[s][i];
                    if (kOutput) acc += Cv[s][i] * h[i];
                }
            }
            if constexpr (sizeof(S) == 2) {  // the stored state after every token
#pragma unroll
                for (int i = 0; i < SPL; ++i) h[i] = state_round<S>(h[i]);
            }
            if (kOutput) {
                for (int o = g >> 1; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
                if (c.j == 0 && c.valid)
                    p.y[(b * p.L + t) * E + e] = (acc + Dv * uv[s]) * silu_f(zv[s]);
                if (trace && c.valid)  // the state after token t (issue 25)
                    store_states(h, trace + ((b * p.L + t) * E + e) * N, c.j, g, N);
            }
        }
    }
    return delta_sum;
}

// Loads this lane's states n = j + g·i of a row of N values (float or bf16; 0 beyond N).
template <int SPL, typename S>
__device__ __forceinline__ void load_states(float (&v)[SPL], const S* row, int j, int g,
                                            int64_t N) {
#pragma unroll
    for (int i = 0; i < SPL; ++i) {
        const int64_t n = j + int64_t(g) * i;
        v[i] = n < N ? to_f32(row[n]) : 0.0f;
    }
}

template <int SPL, typename S>
__device__ __forceinline__ void store_states(const float (&v)[SPL], S* row, int j, int g,
                                             int64_t N) {
#pragma unroll
    for (int i = 0; i < SPL; ++i) {
        const int64_t n = j + int64_t(g) * i;
        if (n < N) row[n] = from_f32<S>(v[i]);
    }
}

// The workspace of the chunked form.
struct SegmentWs {
    float* S;      // (B, nseg, E, N): S_s, then h_in(s)
    float* delta;  // (B, nseg, E): Δ_s
};

__host__ __device__ inline SegmentWs split_ws(float* ws, const SelectiveScanParams& p,
                                              int64_t nseg) {
    return SegmentWs{ws, ws + p.B * nseg * p.E * p.N};
}

// selective_scan_kernel: the sequential form. Grid: (ceil(E / channels per block), B).
template <int SPL, typename S>
__global__ void __launch_bounds__(kScanWarps * 32)
    selective_scan_kernel(SelectiveScanParams p, int g) {
    const Channel c = channel_of(p.E, g);
    const int64_t b = blockIdx.y;
    S* state = state_ptr<S>(p) + (b * p.E + c.e) * p.N;  // (N) row of (B, E, N)
    float h[SPL], A[SPL];
    load_states(h, state, c.j, g, p.N);
    load_states(A, p.A + c.e * p.N, c.j, g, p.N);
    scan_tokens<SPL, true, S>(p, b, c, g, 0, p.L, h, A);
    if (c.valid) store_states(h, state, c.j, g, p.N);
}

// scan_segment_state_kernel (chunked, 1): S_s (zero start) and Δ_s of segment s = blockIdx.y
// of row b = blockIdx.z. Grid: (ceil(E / channels per block), nseg, B).
template <int SPL>
__global__ void __launch_bounds__(kScanWarps * 32)
    scan_segment_state_kernel(SelectiveScanParams p, int g, int64_t T, float* ws) {
    const Channel c = channel_of(p.E, g);
    const int64_t s = blockIdx.y, nseg = gridDim.y, b = blockIdx.z;
    const int64_t t0 = s * T, t1 = min(p.L, t0 + T);
    float h[SPL], A[SPL];
#pragma unroll
    for (int i = 0; i < SPL; ++i) h[i] = 0.0f;
    load_states(A, p.A + c.e * p.N, c.j, g, p.N);
    const float delta_sum = scan_tokens<SPL, false>(p, b, c, g, t0, t1, h, A);
    if (c.valid) {
        const SegmentWs w = split_ws(ws, p, nseg);
        const int64_t bse = (b * nseg + s) * p.E + c.e;
        store_states(h, w.S + bse * p.N, c.j, g, p.N);
        if (c.j == 0) w.delta[bse] = delta_sum;
    }
}

// scan_segment_pass_kernel (chunked, 2): h_in(s) for every segment (in place of S_s) and the
// final state. Grid: ceil(B·E·N / kPassThreads); thread i = (b·E + e)·N + n.
__global__ void __launch_bounds__(kPassThreads)
    scan_segment_pass_kernel(SelectiveScanParams p, int64_t nseg, float* ws) {
    const int64_t EN = p.E * p.N;
    const int64_t i = int64_t(blockIdx.x) * kPassThreads + threadIdx.x;
    if (i >= p.B * EN) return;
    const int64_t b = i / EN, en = i % EN, e = en / p.N;
    const SegmentWs w = split_ws(ws, p, nseg);
    float* S = w.S + b * nseg * EN + en;                 // segment s at S[s·E·N]
    const float* delta = w.delta + b * nseg * p.E + e;   // segment s at delta[s·E]
    const float A = p.A[en];
    float h = p.ssm_state[i];
    for (int64_t s0 = 0; s0 < nseg; s0 += kPassBatch) {
        float Sv[kPassBatch], dv[kPassBatch];
#pragma unroll
        for (int k = 0; k < kPassBatch; ++k) {
            const bool in = s0 + k < nseg;
            Sv[k] = in ? S[(s0 + k) * EN] : 0.0f;
            dv[k] = in ? delta[(s0 + k) * p.E] : 0.0f;
        }
#pragma unroll
        for (int k = 0; k < kPassBatch; ++k) {
            if (s0 + k >= nseg) break;
            S[(s0 + k) * EN] = h;  // h_in(s0 + k)
            h = expf(A * dv[k]) * h + Sv[k];
        }
    }
    p.ssm_state[i] = h;
}

// scan_segment_output_kernel (chunked, 3): segment s = blockIdx.y of row b = blockIdx.z again
// from h_in(s), writing y. Grid: (ceil(E / channels per block), nseg, B).
template <int SPL>
__global__ void __launch_bounds__(kScanWarps * 32)
    scan_segment_output_kernel(SelectiveScanParams p, int g, int64_t T, float* ws) {
    const Channel c = channel_of(p.E, g);
    const int64_t s = blockIdx.y, nseg = gridDim.y, b = blockIdx.z;
    const int64_t t0 = s * T, t1 = min(p.L, t0 + T);
    const SegmentWs w = split_ws(ws, p, nseg);
    float h[SPL], A[SPL];
    load_states(h, w.S + ((b * nseg + s) * p.E + c.e) * p.N, c.j, g, p.N);
    load_states(A, p.A + c.e * p.N, c.j, g, p.N);
    scan_tokens<SPL, true>(p, b, c, g, t0, t1, h, A);
}

// ---- channel per thread (N <= kCptMaxN) -------------------------------------------------------

// This thread's channel: e = blockIdx.x · kCptThreads + threadIdx.x, clamped to E - 1 for idle
// threads (they still take part in the block's shared-memory staging and barriers).
struct CptChannel {
    int64_t e;
    bool valid;
};

__device__ __forceinline__ CptChannel cpt_channel_of(int64_t E) {
    const int64_t e_raw = int64_t(blockIdx.x) * kCptThreads + threadIdx.x;
    CptChannel c;
    c.valid = e_raw < E;
    c.e = c.valid ? e_raw : E - 1;
    return c;
}

// v[n] = row[n] for n < N, 0 beyond (float4 loads where N == NS and a float row is 16-byte
// aligned; a bf16 row (option state_dtype) element by element).
template <int NS, typename S>
__device__ __forceinline__ void cpt_load(float (&v)[NS], const S* row, int64_t N) {
    if (sizeof(S) == 4 && N == NS && (reinterpret_cast<uintptr_t>(row) & 15) == 0) {
#pragma unroll
        for (int n = 0; n < NS; n += 4) {
            const float4 q = *reinterpret_cast<const float4*>(row + n);
            v[n] = q.x, v[n + 1] = q.y, v[n + 2] = q.z, v[n + 3] = q.w;
        }
        return;
    }
#pragma unroll
    for (int n = 0; n < NS; ++n) v[n] = n < N ? to_f32(row[n]) : 0.0f;
}

template <int NS, typename S>
__device__ __forceinline__ void cpt_store(const float (&v)[NS], S* row, int64_t N) {
    if (sizeof(S) == 4 && N == NS && (reinterpret_cast<uintptr_t>(row) & 15) == 0) {
#pragma unroll
        for (int n = 0; n < NS; n += 4)
            *reinterpret_cast<float4*>(row + n) = make_float4(v[n], v[n + 1], v[n + 2], v[n + 3]);
        return;
    }
#pragma unroll
    for (int n = 0; n < NS; ++n)
        if (n < N) row[n] = from_f32<S>(v[n]);
}

// A[e, n] · log2(e) for n < N, 0 beyond: states n >= N then stay exactly 0 (their B is 0 too).
template <int NS>
__device__ __forceinline__ void cpt_load_a2(float (&A2)[NS], const float* Arow, int64_t N) {
    cpt_load(A2, Arow, N);
#pragma unroll
    for (int n = 0; n < NS; ++n) A2[n] *= kLog2e;
}

// Runs tokens t_begin .. t_end - 1 (t_begin < t_end <= L, uniform across the block) of row b
// on the states h of channel c, returning Σ_t δ_t. Every thread of the block calls it (it holds
// barriers). kOutput: also writes y[b, t, e] (valid channels); else C and z are not read.
// S: the state's storage (bf16: h rounded after every token, the trace stored as bf16).
template <int NS, bool kOutput, typename S = float>
__device__ __forceinline__ float cpt_tokens(const SelectiveScanParams& p, int64_t b,
                                            const CptChannel& c, int64_t t_begin, int64_t t_end,
                                            float (&h)[NS], const float (&A2)[NS]) {
    __shared__ __align__(16) float Bs[kCptTile][NS];               // B rows of the tile
    __shared__ __align__(16) float Cs[kOutput ? kCptTile : 1][NS];  // C rows (kOutput)
    const int64_t E = p.E, N = p.N, e = c.e;
    const float dtb = p.dt_bias[e], Dv = kOutput ? p.D[e] : 0.0f;
    S* const trace = trace_ptr<S>(p);  // (B, L, E, N) or nullptr
    float delta_sum = 0.0f;
    for (int64_t t0 = t_begin; t0 < t_end; t0 += kCptTile) {
        const int nt = int(t_end - t0 < kCptTile ? t_end - t0 : kCptTile);
        __syncthreads();  // the previous tile's B and C rows are consumed
        for (int i = threadIdx.x; i < kCptTile * NS; i += kCptThreads) {
            const int s = i / NS, n = i % NS;
            const bool in = s < nt && n < N;
            const int64_t row = (b * p.L + t0 + (s < nt ? s : 0)) * p.ld_bc;
            Bs[s][n] = in ? p.Bm[row + n] : 0.0f;
            if (kOutput) Cs[s][n] = in ? p.Cm[row + n] : 0.0f;
        }
        __syncthreads();
        for (int s0 = 0; s0 < nt; s0 += kCptGroup) {
            float dtv[kCptGroup], uv[kCptGroup], zv[kCptGroup];
#pragma unroll
            for (int k = 0; k < kCptGroup; ++k) {
                const int64_t bt = b * p.L + t0 + (s0 + k < nt ? s0 + k : 0);  // in bounds
                dtv[k] = p.dt[bt * E + e];
                uv[k] = p.x[bt * E + e];
                zv[k] = kOutput ? p.z[bt * p.ld_z + e] : 0.0f;
            }
#pragma unroll
            for (int k = 0; k < kCptGroup; ++k) {
                const int s = s0 + k;
                if (s >= nt) break;  // uniform across the block
                const float delta = softplus_f(dtv[k] + dtb);
                const float du = delta * uv[k];
                delta_sum += delta;
                float acc = 0.0f;
#pragma unroll
                for (int n = 0; n < NS; ++n) {
                    h[n] = exp2f(delta * A2[n]) * h[n] + du * Bs[s][n];
                    if (kOutput) acc += Cs[s][n] * h[n];
                }
                if constexpr (sizeof(S) == 2) {  // the stored state after every token
#pragma unroll
                    for (int n = 0; n < NS; ++n) h[n] = state_round<S>(h[n]);
                }
                if (kOutput && c.valid)
                    p.y[(b * p.L + t0 + s) * E + e] = (acc + Dv * uv[k]) * silu_f(zv[k]);
                if (kOutput && c.valid && trace)  // the state after the token (issue 25)
                    cpt_store(h, trace + ((b * p.L + t0 + s) * E + e) * N, N);
            }
        }
    }
    return delta_sum;
}

// selective_scan_cpt_kernel: the sequential form. Grid: (ceil(E / kCptThreads), B).
template <int NS, typename S>
__global__ void __launch_bounds__(kCptThreads) selective_scan_cpt_kernel(SelectiveScanParams p) {
    const CptChannel c = cpt_channel_of(p.E);
    const int64_t b = blockIdx.y;
    S* state = state_ptr<S>(p) + (b * p.E + c.e) * p.N;  // (N) row of (B, E, N)
    float h[NS], A2[NS];
    cpt_load(h, state, p.N);
    cpt_load_a2(A2, p.A + c.e * p.N, p.N);
    cpt_tokens<NS, true, S>(p, b, c, 0, p.L, h, A2);
    if (c.valid) cpt_store(h, state, p.N);
}

// scan_cpt_segment_state_kernel (chunked, 1): S_s (zero start) and Δ_s of segment s =
// blockIdx.y of row b = blockIdx.z. Grid: (ceil(E / kCptThreads), nseg, B).
template <int NS>
__global__ void __launch_bounds__(kCptThreads)
    scan_cpt_segment_state_kernel(SelectiveScanParams p, int64_t T, float* ws) {
    const CptChannel c = cpt_channel_of(p.E);
    const int64_t s = blockIdx.y, nseg = gridDim.y, b = blockIdx.z;
    const int64_t t0 = s * T, t1 = min(p.L, t0 + T);
    float h[NS], A2[NS];
#pragma unroll
    for (int n = 0; n < NS; ++n) h[n] = 0.0f;
    cpt_load_a2(A2, p.A + c.e * p.N, p.N);
    const float delta_sum = cpt_tokens<NS, false>(p, b, c, t0, t1, h, A2);
    if (c.valid) {
        const SegmentWs w = split_ws(ws, p, nseg);
        const int64_t bse = (b * nseg + s) * p.E + c.e;
        cpt_store(h, w.S + bse * p.N, p.N);
        w.delta[bse] = delta_sum;
    }
}

// scan_cpt_segment_output_kernel (chunked, 3): segment s = blockIdx.y of row b = blockIdx.z
// again from h_in(s), writing y. Grid as kernel 1.
template <int NS>
__global__ void __launch_bounds__(kCptThreads)
    scan_cpt_segment_output_kernel(SelectiveScanParams p, int64_t T, float* ws) {
    const CptChannel c = cpt_channel_of(p.E);
    const int64_t s = blockIdx.y, nseg = gridDim.y, b = blockIdx.z;
    const int64_t t0 = s * T, t1 = min(p.L, t0 + T);
    const SegmentWs w = split_ws(ws, p, nseg);
    float h[NS], A2[NS];
    cpt_load(h, w.S + ((b * nseg + s) * p.E + c.e) * p.N, p.N);
    cpt_load_a2(A2, p.A + c.e * p.N, p.N);
    cpt_tokens<NS, true>(p, b, c, t0, t1, h, A2);
}

// NS bucket (4, 8, 16) of N <= kCptMaxN.
inline int cpt_bucket(int64_t N) { return N <= 4 ? 4 : (N <= 8 ? 8 : 16); }

inline bool use_cpt(const SelectiveScanParams& p, bool lanes) { return p.N <= kCptMaxN && !lanes; }

void validate(const SelectiveScanParams& p, const char* who) {
    MAMBART_CHECK_ARG(p.B >= 0 && p.L >= 0 && p.E > 0, who, ": bad sizes B=", p.B, " L=", p.L,
                      " E=", p.E);
    if (!(p.N >= 1 && p.N <= 256))
        throw Unsupported(str_cat(who, ": d_state=", p.N, " unsupported (1..256)"));
    MAMBART_CHECK_ARG(p.ld_bc >= p.N && p.ld_z >= p.E, who, ": bad strides");
    const bool bf16 = p.ssm_state_bf16 != nullptr;  // option state_dtype
    MAMBART_CHECK_ARG(p.x && p.dt && p.Bm && p.Cm && p.z && p.A && p.D && p.dt_bias && p.y &&
                          (bf16 ? !p.ssm_state && !p.state_trace
                                : p.ssm_state && !p.state_trace_bf16),
                      who, ": null pointer, or fp32 and bf16 state pointers mixed");
    MAMBART_CHECK_ARG(p.B <= 65535, who, ": batch ", p.B, " too large");
}

// SPL bucket (1, 2, 4, 8) of a channel group of g lanes.
inline int spl_bucket(int64_t N, int g) {
    const int spl = int(ceil_div(N, g));
    return spl <= 2 ? spl : (spl <= 4 ? 4 : 8);
}

// The sequential form with state storage S (float, or bf16: option state_dtype).
template <typename S>
void launch_sequential(const SelectiveScanParams& p, bool lanes, cudaStream_t s) {
    if (use_cpt(p, lanes)) {
        const dim3 grid(unsigned(ceil_div(p.E, kCptThreads)), unsigned(p.B));
        switch (cpt_bucket(p.N)) {
            case 4: selective_scan_cpt_kernel<4, S><<<grid, kCptThreads, 0, s>>>(p); break;
            case 8: selective_scan_cpt_kernel<8, S><<<grid, kCptThreads, 0, s>>>(p); break;
            default: selective_scan_cpt_kernel<16, S><<<grid, kCptThreads, 0, s>>>(p); break;
        }
        check_launch("selective_scan_cpt_kernel", s);
        return;
    }
    const int g = group_lanes(p.N);
    const int64_t per_block = int64_t(kScanWarps) * (32 / g);
    const dim3 grid(unsigned(ceil_div(p.E, per_block)), unsigned(p.B));
    const int threads = kScanWarps * 32;
    switch (spl_bucket(p.N, g)) {
        case 1: selective_scan_kernel<1, S><<<grid, threads, 0, s>>>(p, g); break;
        case 2: selective_scan_kernel<2, S><<<grid, threads, 0, s>>>(p, g); break;
        case 4: selective_scan_kernel<4, S><<<grid, threads, 0, s>>>(p, g); break;
        default: selective_scan_kernel<8, S><<<grid, threads, 0, s>>>(p, g); break;
    }
    check_launch("selective_scan_kernel", s);
}

}  // namespace

void launch_selective_scan(const SelectiveScanParams& p, bool lanes, cudaStream_t s) {
    validate(p, "launch_selective_scan");
    if (p.B == 0) return;
    if (p.ssm_state_bf16)
        launch_sequential<__nv_bfloat16>(p, lanes, s);
    else
        launch_sequential<float>(p, lanes, s);
}

int64_t selective_scan_segment_len(const SelectiveScanParams& p, bool lanes) {
    const bool cpt = use_cpt(p, lanes);
    const int64_t per_segment =
        std::max<int64_t>(1, p.B * p.E * (cpt ? 1 : group_lanes(p.N)));  // threads
    const int64_t target = cpt ? kCptTargetThreads : kScanTargetThreads;
    const int64_t nseg = std::max<int64_t>(1, ceil_div(target, per_segment));
    const int64_t T = ceil_div(ceil_div(std::max<int64_t>(p.L, 1), nseg), 8) * 8;
    return std::max(kScanMinSegment, T);
}

int64_t selective_scan_chunked_workspace_floats(const SelectiveScanParams& p, int64_t T) {
    if (T < 1 || p.L < 1) return 0;
    return p.B * ceil_div(p.L, T) * p.E * (p.N + 1);
}

void launch_selective_scan_chunked(const SelectiveScanChunkedParams& q, cudaStream_t s) {
    const SelectiveScanParams& p = q.s;
    validate(p, "launch_selective_scan_chunked");
    MAMBART_CHECK_ARG(!p.ssm_state_bf16, "launch_selective_scan_chunked: an fp32 state only "
                      "(a bf16 state takes the sequential form)");
    MAMBART_CHECK_ARG(q.T >= 1, "launch_selective_scan_chunked: segment length T=", q.T,
                      " must be >= 1");
    MAMBART_CHECK_ARG(q.ws, "launch_selective_scan_chunked: null workspace");
    if (p.B == 0 || p.L == 0) return;
    const int64_t nseg = ceil_div(p.L, q.T);
    const int g = group_lanes(p.N);
    const int64_t per_block = int64_t(kScanWarps) * (32 / g);
    const int64_t pass_blocks = ceil_div(p.B * p.E * p.N, kPassThreads);
    MAMBART_CHECK_ARG(nseg <= 65535 && pass_blocks <= 0x7fffffff &&
                          ceil_div(p.E, per_block) <= 0x7fffffff,
                      "launch_selective_scan_chunked: grid too large (L=", p.L, ", T=", q.T,
                      ": ", nseg, " segments; at most 65535)");
    if (use_cpt(p, q.lanes)) {
        const dim3 grid(unsigned(ceil_div(p.E, kCptThreads)), unsigned(nseg), unsigned(p.B));
        const int ns = cpt_bucket(p.N);
        switch (ns) {
            case 4: scan_cpt_segment_state_kernel<4><<<grid, kCptThreads, 0, s>>>(p, q.T, q.ws); break;
            case 8: scan_cpt_segment_state_kernel<8><<<grid, kCptThreads, 0, s>>>(p, q.T, q.ws); break;
            default: scan_cpt_segment_state_kernel<16><<<grid, kCptThreads, 0, s>>>(p, q.T, q.ws); break;
        }
        check_launch("scan_cpt_segment_state_kernel", s);
        scan_segment_pass_kernel<<<unsigned(pass_blocks), kPassThreads, 0, s>>>(p, nseg, q.ws);
        check_launch("scan_segment_pass_kernel", s);
        switch (ns) {
            case 4: scan_cpt_segment_output_kernel<4><<<grid, kCptThreads, 0, s>>>(p, q.T, q.ws); break;
            case 8: scan_cpt_segment_output_kernel<8><<<grid, kCptThreads, 0, s>>>(p, q.T, q.ws); break;
            default: scan_cpt_segment_output_kernel<16><<<grid, kCptThreads, 0, s>>>(p, q.T, q.ws); break;
        }
        check_launch("scan_cpt_segment_output_kernel", s);
        return;
    }
    const dim3 grid(unsigned(ceil_div(p.E, per_block)), unsigned(nseg), unsigned(p.B));
    const int threads = kScanWarps * 32;
    const int spl = spl_bucket(p.N, g);
    switch (spl) {
        case 1: scan_segment_state_kernel<1><<<grid, threads, 0, s>>>(p, g, q.T, q.ws); break;
        case 2: scan_segment_state_kernel<2><<<grid, threads, 0, s>>>(p, g, q.T, q.ws); break;
        case 4: scan_segment_state_kernel<4><<<grid, threads, 0, s>>>(p, g, q.T, q.ws); break;
        default: scan_segment_state_kernel<8><<<grid, threads, 0, s>>>(p, g, q.T, q.ws); break;
    }
    check_launch("scan_segment_state_kernel", s);
    scan_segment_pass_kernel<<<unsigned(pass_blocks), kPassThreads, 0, s>>>(p, nseg, q.ws);
    check_launch("scan_segment_pass_kernel", s);
    switch (spl) {
        case 1: scan_segment_output_kernel<1><<<grid, threads, 0, s>>>(p, g, q.T, q.ws); break;
        case 2: scan_segment_output_kernel<2><<<grid, threads, 0, s>>>(p, g, q.T, q.ws); break;
        case 4: scan_segment_output_kernel<4><<<grid, threads, 0, s>>>(p, g, q.T, q.ws); break;
        default: scan_segment_output_kernel<8><<<grid, threads, 0, s>>>(p, g, q.T, q.ws); break;
    }
    check_launch("scan_segment_output_kernel", s);
}

}  // namespace cuda
}  // namespace mambart

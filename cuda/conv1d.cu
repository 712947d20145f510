// cuda/conv1d.cu: causal depthwise conv1d + bias (+ SiLU) over [conv_state | x], and the conv
// state roll. Serves prefill (L tokens) and the single-token decode update (L = 1).
//
//   out[b, t, c] = silu(bias[c] + Σ_{k<W} w[c, k] · in[b, t - W + 1 + k, c])  (no silu: p.silu
//                  false)
//   in[b, τ, c]  = x[b, τ, c] for τ >= 0, else conv_state[b, c, W + τ]   (oldest first)
//   conv_state[b, c, :] <- the last W entries of [conv_state | x]
//
// conv1d_kernel: Grid: (ceil(C / 128), ceil(L / kConvTokens), B); block: 128 threads, one
//   channel each, kConvTokens consecutive tokens per thread (coalesced over channels; the
//   thread's input window is loaded into registers before any output is computed, with
//   load_ahead_enabled(); else each output reads its W inputs in turn). When the
//   grid has one token block, each thread also rolls its own state after reading it
//   (kUpdateState); otherwise conv_state_kernel does so afterwards (then L > kConvTokens >= W).
// With state_trace (speculative verification, issue 25): trace[b, t, c, :] = the window
// in[b, t - W + 1 .. t, c] after token t.
// Preconditions: 1 <= W <= kConvMaxWidth; ld_x >= C; out does not alias x or conv_state.
#include "common.cuh"
#include "kernels.h"

namespace mambart {
namespace cuda {
namespace {

constexpr int kConvThreads = 128;
constexpr int kConvTokens = 32;
constexpr int kMaxW = int(kConvMaxWidth);
static_assert(kConvTokens >= kMaxW, "the state kernel assumes L > kConvTokens >= W");

template <bool kUpdateState, bool kWindow>
__global__ void __launch_bounds__(kConvThreads) conv1d_kernel(Conv1dParams p) {
    pdl_wait();  // launched with launch_pdl (see common.cuh)
    pdl_trigger();
    const int64_t c = int64_t(blockIdx.x) * kConvThreads + threadIdx.x;
    if (c >= p.C) return;
    const int64_t b = blockIdx.z, W = p.W, L = p.L;
    const int64_t t0 = int64_t(blockIdx.y) * kConvTokens;
    const int64_t t1 = min(L, t0 + kConvTokens);
    const float* xb = p.x + b * L * p.ld_x + c;
    float* st = p.conv_state + (b * p.C + c) * W;
    float w[kMaxW];
#pragma unroll
    for (int k = 0; k < kMaxW; ++k) w[k] = k < W ? p.weight[c * W + k] : 0.0f;
    // Every load below picks its address first and reads only inside this row's x and state.
    const float bias = p.bias ? p.bias[c] : 0.0f;
    float* ob = p.out + b * L * p.C + c;
    const bool window = kWindow && !p.state_trace;
    if (window) {
        // The window in[t0 - kMaxW + 1 .. t1 - 1] loaded into registers first (every load in
        // flight together, each input read once), the taps aligned right: w2[kMaxW - W + k] =
        // w[k], zero before, so token t0 + i sums w2[j] · win[i + j] over j < kMaxW with
        // compile-time indices. The leading zero taps add fma(0, 0, acc) = acc exactly: the
        // same sums, in the same order, as the loop below.
        constexpr int kWin = kConvTokens + kMaxW - 1;
        const int nt = int(t1 - t0);
        float win[kWin];
#pragma unroll
        for (int j = 0; j < kWin; ++j) {
            const int64_t tau = t0 - (kMaxW - 1) + j;
            const bool used = j >= kMaxW - W && j < nt + kMaxW - 1;
            win[j] = !used ? 0.0f : (tau >= 0 ? xb[tau * p.ld_x] : st[W + tau]);
        }
        float w2[kMaxW];
#pragma unroll
        for (int j = 0; j < kMaxW; ++j)
            w2[j] = j >= kMaxW - W ? p.weight[c * W + j - (kMaxW - W)] : 0.0f;
#pragma unroll
        for (int i = 0; i < kConvTokens; ++i) {
            if (i >= nt) break;
            float acc = bias;
#pragma unroll
            for (int j = 0; j < kMaxW; ++j) acc = conv_acc(acc, w2[j], win[i + j]);
            ob[(t0 + i) * p.C] = p.silu ? silu_f(acc) : acc;
        }
    }
    for (int64_t t = window ? t1 : t0; t < t1; ++t) {
        float acc = bias;
#pragma unroll
        for (int k = 0; k < kMaxW; ++k) {
            if (k < W) {
                const int64_t tau = t - (W - 1) + k;
                const float* src = tau >= 0 ? xb + tau * p.ld_x : st + (W + tau);
                acc = conv_acc(acc, w[k], *src);
            }
        }
        ob[t * p.C] = p.silu ? silu_f(acc) : acc;
        if (p.state_trace) {  // the window after token t (issue 25), before the state rolls
            float* tr = p.state_trace + ((b * L + t) * p.C + c) * W;
            for (int64_t j = 0; j < W; ++j) {
                const int64_t tau = t - (W - 1) + j;
                tr[j] = tau >= 0 ? xb[tau * p.ld_x] : st[W + tau];
            }
        }
    }
    if (kUpdateState) {
        if (L >= W) {
            for (int64_t j = 0; j < W; ++j) st[j] = xb[(L - W + j) * p.ld_x];
        } else {
            for (int64_t j = 0; j < W - L; ++j) st[j] = st[j + L];
            for (int64_t j = 0; j < L; ++j) st[W - L + j] = xb[j * p.ld_x];
        }
    }
}

// conv_state[b, c, j] = x[b, L - W + j, c]   (requires L >= W)
__global__ void conv_state_kernel(Conv1dParams p) {
    const int64_t c = int64_t(blockIdx.x) * kConvThreads + threadIdx.x;
    if (c >= p.C) return;
    const int64_t b = blockIdx.y;
    const float* xb = p.x + b * p.L * p.ld_x + c;
    float* st = p.conv_state + (b * p.C + c) * p.W;
    for (int64_t j = 0; j < p.W; ++j) st[j] = xb[(p.L - p.W + j) * p.ld_x];
}

}  // namespace

void launch_conv1d(const Conv1dParams& p, cudaStream_t s) {
    MAMBART_CHECK_ARG(p.B >= 0 && p.L >= 0 && p.C > 0, "launch_conv1d: bad sizes B=", p.B,
                      " L=", p.L, " C=", p.C);
    if (!(p.W >= 1 && p.W <= kConvMaxWidth))
        throw Unsupported(str_cat("launch_conv1d: d_conv=", p.W, " unsupported (1..",
                                  kConvMaxWidth, ")"));
    MAMBART_CHECK_ARG(p.ld_x >= p.C, "launch_conv1d: ld_x=", p.ld_x, " < C=", p.C);
    MAMBART_CHECK_ARG(p.x && p.conv_state && p.weight && p.out, "launch_conv1d: null pointer");
    MAMBART_CHECK_ARG(p.B <= 65535, "launch_conv1d: batch ", p.B, " too large");
    if (p.B == 0 || p.L == 0) return;
    const int64_t tblocks = ceil_div(p.L, kConvTokens);
    MAMBART_CHECK_ARG(tblocks <= 65535, "launch_conv1d: L=", p.L, " too large for one call");
    const dim3 grid(unsigned(ceil_div(p.C, kConvThreads)), unsigned(tblocks), unsigned(p.B));
    const bool ahead = load_ahead_enabled();
    if (tblocks == 1) {
        if (ahead)
            launch_pdl(conv1d_kernel<true, true>, grid, dim3(kConvThreads), 0, s, p);
        else
            launch_pdl(conv1d_kernel<true, false>, grid, dim3(kConvThreads), 0, s, p);
        check_launch("conv1d_kernel", s);
    } else {
        if (ahead)
            conv1d_kernel<false, true><<<grid, kConvThreads, 0, s>>>(p);
        else
            conv1d_kernel<false, false><<<grid, kConvThreads, 0, s>>>(p);
        check_launch("conv1d_kernel", s);
        conv_state_kernel<<<dim3(grid.x, unsigned(p.B)), kConvThreads, 0, s>>>(p);
        check_launch("conv_state_kernel", s);
    }
}

}  // namespace cuda
}  // namespace mambart

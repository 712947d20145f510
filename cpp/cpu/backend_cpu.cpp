// The CPU backend: the reference implementation of every op, multi-threaded on its own thread
// pool (cpu/pool.h: each op sets it as the current pool for its duration).
// Projections go to cpu::linear (cpp/cpu/linear.cpp); the scans are written so that their inner
// loops (over d_state N or headdim P) vectorize.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <vector>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "backend.h"
#include "cpu/attention.h"
#include "cpu/linear.h"
#include "cpu/moe.h"
#include "cpu/pool.h"
#include "cpu/vec.h"
#include "error.h"
#include "options.h"

namespace mambart {
namespace {

inline float silu(float v) { return cpu::silu1(v); }
inline float softplus(float v) { return cpu::softplus1(v); }
inline float exp_neg(float v) { return cpu::exp1(v); }

// The vector type of the elementwise loops: 8 lanes (one AVX register, two SSE), or on aarch64
// 4 lanes (one NEON register: GCC keeps 8-lane values in memory there; cpu/vec.h).
#if defined(__aarch64__)
typedef cpu::f4 Vec;
#else
typedef cpu::f8 Vec;
#endif
constexpr int kVecLanes = sizeof(Vec) / sizeof(float);

// The Mamba-1 scan's channel block: 16 channels in one AVX-512 register where this file is
// built for such a CPU, else 8 (one AVX2 register, two NEON / SSE). Each lane does the same
// arithmetic whatever the width, so the results do not depend on it.
#if defined(__AVX512F__)
typedef cpu::f16 ScanVec;
constexpr int kScanBlock = 16;
#else
typedef Vec ScanVec;
constexpr int kScanBlock = 8;
#endif
constexpr int kScanLanes = sizeof(ScanVec) / sizeof(float);

// Runs body(begin, end) over [0, n) on the current pool when `parallel`, else in one call (on
// the pool's terms all the same: flush-to-zero as on its threads).
template <class F>
inline void par(bool parallel, int64_t n, F&& body) {
    cpu::parallel_for(n, parallel ? 1 : std::max<int64_t>(n, 1), std::forward<F>(body));
}

class CpuBackend final : public Backend {
 public:
    // threads: the pool's size (>= 1).
    explicit CpuBackend(int threads)
        : m3_mode_(runtime_options().cpu_mamba3),
          pool_(std::make_unique<cpu::ThreadPool>(threads)),
          ssd_form_(runtime_options().cpu_ssd) {
        // The projection kernels are chosen (reading options: the environment) here, on the
        // thread that makes the backend, never first inside an op on a runtime thread.
        (void)cpu::linear_kernels();
    }
    DeviceKind kind() const override { return DeviceKind::CPU; }
    std::string name() const override {
        return str_cat("cpu (", pool_->threads(), " threads, ", cpu::linear_kernels(), ")");
    }
    int threads() const override { return pool_->threads(); }

    void* alloc(size_t bytes, const char* what) override {
        void* p = std::aligned_alloc(64, ((bytes + 63) / 64) * 64 + 64);
        if (!p) throw Error(str_cat("out of host memory allocating ", bytes, " bytes for ", what));
        return p;
    }
    void dealloc(void* p) noexcept override { std::free(p); }
    void copy_to_device(void* dst, const void* src, size_t n) override { std::memcpy(dst, src, n); }
    void copy_to_host(void* dst, const void* src, size_t n) override { std::memcpy(dst, src, n); }
    void copy_device(void* dst, const void* src, size_t n) override { std::memmove(dst, src, n); }
    void zero(void* dst, size_t n) override { std::memset(dst, 0, n); }

    const void* place_weight(const void* src, DType src_dtype, size_t numel, DType dtype,
                             bool* owned) override {
        const bool aligned = reinterpret_cast<uintptr_t>(src) % dtype_size(src_dtype) == 0;
        if (src_dtype == dtype && aligned) {  // zero-copy view into the mapping
            *owned = false;
            return src;
        }
        if (src_dtype == dtype) {  // misaligned in the file: an aligned copy
            void* dst = alloc(numel * dtype_size(dtype), "an aligned weight copy");
            std::memcpy(dst, src, numel * dtype_size(dtype));
            *owned = true;
            return dst;
        }
        void* dst = alloc(numel * dtype_size(dtype), "a converted weight");
        if (dtype == DType::F32) {
            convert_to_f32(src, src_dtype, static_cast<float*>(dst), numel);
        } else {
            std::vector<float> tmp(std::min<size_t>(numel, size_t(1) << 20));
            for (size_t off = 0; off < numel; off += tmp.size()) {
                const size_t n = std::min(tmp.size(), numel - off);
                convert_to_f32(static_cast<const char*>(src) + off * dtype_size(src_dtype),
                               src_dtype, tmp.data(), n);
                convert_from_f32(tmp.data(), static_cast<char*>(dst) + off * dtype_size(dtype),
                                 dtype, n);
            }
        }
        *owned = true;
        return dst;
    }

    void embedding(const int32_t* ids, int64_t n, const Weight& table, float* out) override {
        const int64_t d = table.cols;
        if (table.quant != QuantScheme::None) {  // a quantized table: the rows dequantized
            for (int64_t i = 0; i < n; ++i) cpu::dequantize_rows(table, ids[i], 1, out + i * d);
            return;
        }
        const size_t es = dtype_size(table.dtype);
        for (int64_t i = 0; i < n; ++i)
            convert_to_f32(static_cast<const char*>(table.data) + size_t(ids[i]) * d * es,
                           table.dtype, out + i * d, size_t(d));
    }

    void add_norm(float* residual, const float* hidden, const Param& w, const Param& b,
                  NormKind kind, float eps, int64_t n, int64_t d, float* out) override {
        cpu::PoolScope scope(pool_.get());
        par(n > 4, n, [&](int64_t i0, int64_t i1) {
            for (int64_t i = i0; i < i1; ++i) {
                float* r = residual + i * d;
                if (hidden) {
                    const float* h = hidden + i * d;
                    for (int64_t j = 0; j < d; ++j) r[j] += h[j];
                }
                if (!out) continue;  // the add alone
                float* o = out + i * d;
                if (kind == NormKind::RMSNorm) {
                    double ss = 0.0;
                    for (int64_t j = 0; j < d; ++j) ss += double(r[j]) * r[j];
                    const float rstd = 1.0f / std::sqrt(float(ss / d) + eps);
                    if (w.data)
                        for (int64_t j = 0; j < d; ++j) o[j] = r[j] * rstd * w.data[j];
                    else
                        for (int64_t j = 0; j < d; ++j) o[j] = r[j] * rstd;
                } else {
                    double s = 0.0;
                    for (int64_t j = 0; j < d; ++j) s += r[j];
                    const float mean = float(s / d);
                    double ss = 0.0;
                    for (int64_t j = 0; j < d; ++j) ss += double(r[j] - mean) * (r[j] - mean);
                    const float rstd = 1.0f / std::sqrt(float(ss / d) + eps);
                    for (int64_t j = 0; j < d; ++j)
                        o[j] = (r[j] - mean) * rstd * (w.data ? w.data[j] : 1.0f) +
                               (b.data ? b.data[j] : 0.0f);
                }
            }
        });
    }

    // The fused decode projection as the separate ops (the oracle of the CUDA kernel, and what
    // lets the model's fused path be tested here): bitwise the unfused path's results.
    bool fused_projection(int64_t M, int64_t K, int64_t) const override { return M >= 1 && K >= 1; }
    // A bf16 SSM state (option state_dtype): the scans follow BF16_STATE_RULE (op_params.h).
    bool supports_state_dtype(DType dt) const override {
        return dt == DType::F32 || dt == DType::BF16;
    }
    void project(const ProjParams& p) override {
        MAMBART_CHECK_ARG(p.M >= 1 && p.N >= 1 && p.N <= p.W.rows && p.y && p.ldy >= p.N,
                          "project: bad sizes M=", p.M, " N=", p.N);
        const int64_t K = p.W.cols;
        const float* x = p.x;
        int64_t ldx = p.ldx;
        if (p.norm.residual) {
            MAMBART_CHECK_ARG(p.scratch_x, "project: the norm prologue needs scratch_x");
            add_norm(const_cast<float*>(p.norm.residual), nullptr, Param{p.norm.w, K},
                     Param{p.norm.b, p.norm.b ? K : 0},
                     p.norm.rms ? NormKind::RMSNorm : NormKind::LayerNorm, p.norm.eps, p.M, K,
                     p.scratch_x);
            x = p.scratch_x;
            ldx = K;
        }
        MAMBART_CHECK_ARG(x && ldx >= K, "project: no input rows");
        if (p.gate.z) {
            MAMBART_CHECK_ARG(p.scratch_x && !p.norm.residual, "project: the gated norm needs "
                              "scratch_x and no residual norm");
            MAMBART_CHECK_ARG(ldx == K, "project: the gated norm reads contiguous rows");
            gated_rmsnorm(x, p.gate.z, p.gate.ld_z, p.gate.w, p.M, K, p.gate.group_size,
                          p.gate.eps, p.scratch_x);
            x = p.scratch_x;
        }
        if (p.accumulate) {
            MAMBART_CHECK_ARG(p.scratch_y, "project: accumulate needs scratch_y");
            linear(x, ldx, p.M, p.W, p.N, p.bias, p.scratch_y, p.N);
            for (int64_t m = 0; m < p.M; ++m)
                for (int64_t n = 0; n < p.N; ++n)
                    p.y[m * p.ldy + n] = p.y[m * p.ldy + n] + p.scratch_y[m * p.N + n];
        } else {
            linear(x, ldx, p.M, p.W, p.N, p.bias, p.y, p.ldy);
        }
        if (p.conv.state) {
            MAMBART_CHECK_ARG(p.conv.C <= p.N, "project: conv channels ", p.conv.C, " > N ", p.N);
            conv1d(ConvParams{p.y, p.ldy, p.conv.state, p.conv.w, p.conv.bias, p.conv.out, p.M, 1,
                              p.conv.C, p.conv.W});
        }
    }

    void linear(const float* x, int64_t ldx, int64_t M, const Weight& W, int64_t N,
                const float* bias, float* y, int64_t ldy) override {
        cpu::PoolScope scope(pool_.get());
        if (W.quant != QuantScheme::None)
            cpu::linear_quant(x, ldx, M, W, N, bias, y, ldy);
        else
            cpu::linear(x, ldx, M, W.cols, W.data, W.dtype, N, bias, y, ldy);
    }

    // Causal depthwise conv over [history | x]: out[t, c] = silu(bias[c] + Σ_k w[c, k]·in[t-W+1+k, c])
    // where in[τ] = x[τ] for τ >= 0 and the conv state (the previous W inputs, oldest first)
    // for τ < 0. The state then becomes the last W inputs. Threads split the channels; the inner
    // loop runs over a contiguous block of channels of one token row.
    static constexpr int64_t kMaxConvW = 64;  // config.cpp bounds d_conv to [1, 64]

    void conv1d(const ConvParams& p) override {
        cpu::PoolScope scope(pool_.get());
        const int64_t C = p.C, W = p.W, L = p.L;
        if (W > kMaxConvW) throw Unsupported(str_cat("conv1d: d_conv = ", W, " > ", kMaxConvW));
        if (L == 1 && !p.state_trace) return conv1d_step(p);
        constexpr int64_t kBlock = 64;
        const int64_t nblocks = (C + kBlock - 1) / kBlock;
        for (int64_t b = 0; b < p.B; ++b) {
            float* state = p.conv_state + b * C * W;
            const float* xb = p.x + b * L * p.ld_x;
            float* ob = p.out + b * L * C;
            par(C * L > 4096, nblocks, [&](int64_t blk0, int64_t blk1) {
                for (int64_t blk = blk0; blk < blk1; ++blk) {
                    const int64_t c0 = blk * kBlock, c1 = std::min(C, c0 + kBlock);
                    float wt[kMaxConvW][kBlock];  // (W, block) the block's taps, channel-contiguous
                    for (int64_t k = 0; k < W; ++k)
                        for (int64_t c = c0; c < c1; ++c) wt[k][c - c0] = p.weight[c * W + k];
                    for (int64_t t = 0; t < L; ++t) {
                        float* o = ob + t * C;
                        for (int64_t c = c0; c < c1; ++c) o[c] = p.bias ? p.bias[c] : 0.0f;
                        for (int64_t k = 0; k < W; ++k) {
                            const int64_t tau = t - (W - 1) + k;
                            const float* wk = wt[k] - c0;
                            if (tau >= 0) {
                                const float* xr = xb + tau * p.ld_x;
                                for (int64_t c = c0; c < c1; ++c) o[c] += wk[c] * xr[c];
                            } else {
                                for (int64_t c = c0; c < c1; ++c)
                                    o[c] += wk[c] * state[c * W + (W + tau)];
                            }
                        }
                        if (p.silu) silu_inplace(o + c0, c1 - c0);
                        if (p.state_trace) {  // the window after token t: in[t - W + 1 .. t]
                            // = the window before it (token t - 1's trace row, or the state at
                            // t = 0) shifted by one, then x_t: one contiguous copy of the
                            // block's (c1 - c0) W values offset by one (each channel's last
                            // slot gets its neighbour's first, overwritten next), then x_t.
                            float* tr = p.state_trace + (b * L + t) * C * W;  // (C, W) of token t
                            const float* prev = t == 0 ? state : tr - C * W;
                            std::memcpy(tr + c0 * W, prev + c0 * W + 1,
                                        size_t((c1 - c0) * W - 1) * sizeof(float));
                            const float* xt = xb + t * p.ld_x;
                            for (int64_t c = c0; c < c1; ++c) tr[c * W + W - 1] = xt[c];
                        }
                    }
                    // New state: the last W inputs of [history | x].
                    for (int64_t c = c0; c < c1; ++c) {
                        float* win = state + c * W;
                        if (L >= W) {
                            for (int64_t j = 0; j < W; ++j) win[j] = xb[(L - W + j) * p.ld_x + c];
                        } else {
                            for (int64_t j = 0; j < W - L; ++j) win[j] = win[j + L];
                            for (int64_t j = 0; j < L; ++j) win[W - L + j] = xb[j * p.ld_x + c];
                        }
                    }
                }
            });
        }
    }

    // conv1d for one token (decode steps): the general loop's arithmetic, expression for
    // expression (the same values: prefill == decode steps), without its transposed weight
    // tile, which costs more than the arithmetic at L = 1.
    void conv1d_step(const ConvParams& p) {
        const int64_t C = p.C, W = p.W;
        par(p.B * C > 16384, p.B, [&](int64_t b0, int64_t b1) {
            for (int64_t b = b0; b < b1; ++b) {
                float* state = p.conv_state + b * C * W;  // (C, W) this row's windows
                const float* xr = p.x + b * p.ld_x;       // (C) this row's input
                float* o = p.out + b * C;                 // (C)
                for (int64_t c = 0; c < C; ++c) o[c] = p.bias ? p.bias[c] : 0.0f;
                for (int64_t k = 0; k < W; ++k) {
                    const int64_t tau = k - (W - 1);
                    if (tau >= 0) {
                        for (int64_t c = 0; c < C; ++c) o[c] += p.weight[c * W + k] * xr[c];
                    } else {
                        for (int64_t c = 0; c < C; ++c)
                            o[c] += p.weight[c * W + k] * state[c * W + (W + tau)];
                    }
                }
                if (p.silu) silu_inplace(o, C);
                for (int64_t c = 0; c < C; ++c) {
                    float* win = state + c * W;
                    for (int64_t j = 0; j + 1 < W; ++j) win[j] = win[j + 1];
                    win[W - 1] = xr[c];
                }
            }
        });
    }

    // Mamba-1: Δ = softplus(dt + dt_bias); h = exp(Δ A) h + Δ B u; y = (C·h + D u) silu(z).
    // Threads split the channels E into blocks of kScanBlock (16 with AVX-512, else 8); a
    // block's state (N x block, fp32) and A live in thread-local tiles, transposed so that one
    // vector holds the block's channels of one state entry n (moved in and out by 8 x 8
    // transposes); the tokens then run in order with every operation a block wide. B_t[n] and
    // C_t[n] are broadcast (shared by all channels). The state is read once and written once
    // per call (and once per token into the trace of a verification pass). A bf16 state
    // (ssm_state_bf16) is widened into the tile, and the tile rounded to bf16 after every token
    // (BF16_STATE_RULE, op_params.h).
    static constexpr int64_t kMaxScanN = 256;  // larger d_state takes the scalar path

    void selective_scan(const SelectiveScanParams& p) override {
        cpu::PoolScope scope(pool_.get());
        if (p.N > kMaxScanN) return selective_scan_scalar(p);
        constexpr int BW = kScanBlock;
        const int64_t E = p.E, N = p.N, L = p.L;
        const int64_t nblk = (E + BW - 1) / BW;
        const bool bf = p.ssm_state_bf16 != nullptr;
        for (int64_t b = 0; b < p.B; ++b) {
            par(nblk * L * N * BW > 65536, nblk, [&](int64_t blk0, int64_t blk1) {
                for (int64_t blk = blk0; blk < blk1; ++blk) {
                    const int64_t e0 = blk * BW, ne = std::min<int64_t>(BW, E - e0);
                    alignas(64) float h[kMaxScanN][BW];   // (N, BW) state of channels e0..
                    alignas(64) float At[kMaxScanN][BW];  // (N, BW) A of those channels
                    // (ne, N) rows of the state: fp32, or bf16 (st16)
                    float* st = bf ? nullptr : p.ssm_state + (b * E + e0) * N;
                    uint16_t* st16 = bf ? p.ssm_state_bf16 + (b * E + e0) * N : nullptr;
                    const float* Ab = p.A + e0 * N;  // (ne, N) rows of A
                    int64_t nt = 0;  // the first n not yet moved: blocks of 8 when ne == BW
                    if (ne == BW)
                        for (; nt + 8 <= N; nt += 8)
                            for (int jb = 0; jb < BW; jb += 8) {
                                if (st) transpose8x8(st + jb * N + nt, N, &h[nt][jb], BW);
                                transpose8x8(Ab + jb * N + nt, N, &At[nt][jb], BW);
                            }
                    for (int64_t n = nt; n < N; ++n)
                        for (int64_t j = 0; j < BW; ++j) {
                            h[n][j] = j < ne && st ? st[j * N + n] : 0.0f;
                            At[n][j] = j < ne ? Ab[j * N + n] : 0.0f;
                        }
                    if (bf)
                        for (int64_t n = 0; n < N; ++n)
                            for (int64_t j = 0; j < BW; ++j)
                                h[n][j] = j < ne ? bf16_to_f32(st16[j * N + n]) : 0.0f;
                    // The block's inputs, padded with zeros past ne (the padded lanes compute
                    // finite values that are never stored).
                    alignas(64) float bias[BW], D[BW];
                    copy_part(bias, p.dt_bias + e0, ne);
                    copy_part(D, p.D + e0, ne);
                    for (int64_t t = 0; t < L; ++t) {
                        const int64_t bt = b * L + t;
                        alignas(64) float dt[BW], x[BW], z[BW], y[BW];
                        copy_part(dt, p.dt + bt * E + e0, ne);
                        copy_part(x, p.x + bt * E + e0, ne);
                        copy_part(z, p.z + bt * p.ld_z + e0, ne);
                        const float* Bt = p.Bm + bt * p.ld_bc;
                        const float* Ct = p.Cm + bt * p.ld_bc;
                        for (int j0 = 0; j0 < BW; j0 += kScanLanes)
                            scan_step<ScanVec>(j0, N, h, At, bias, D, dt, x, z, Bt, Ct, y);
                        for (int64_t j = 0; j < ne; ++j) p.y[bt * E + e0 + j] = y[j];
                        if (bf) round_tile_bf16(h, N);
                        if (p.state_trace)  // the state after token t: (ne, N) rows at e0
                            store_state(h, ne, N, p.state_trace + (bt * E + e0) * N);
                        if (p.state_trace_bf16)
                            store_state_bf16(h, ne, N, p.state_trace_bf16 + (bt * E + e0) * N);
                    }
                    if (bf)
                        store_state_bf16(h, ne, N, st16);
                    else
                        store_state(h, ne, N, st);
                }
            });
        }
    }

    // The same recurrence one channel at a time (d_state > kMaxScanN); a bf16 state row is
    // widened into hb, rounded after every token and written back.
    static constexpr int64_t kMaxDState = 4096;  // the d_state bound of the layer configs

    void selective_scan_scalar(const SelectiveScanParams& p) {
        const int64_t E = p.E, N = p.N, L = p.L;
        const bool bf = p.ssm_state_bf16 != nullptr;
        MAMBART_CHECK_ARG(!bf || N <= kMaxDState, "selective_scan: d_state ", N, " > ",
                          kMaxDState, " with a bf16 state");
        for (int64_t b = 0; b < p.B; ++b) {
            par(E * L > 256, E, [&](int64_t e0, int64_t e1) {
                float hb[kMaxDState];  // (N) a bf16 state row, widened
                for (int64_t e = e0; e < e1; ++e) {
                    uint16_t* h16 = bf ? p.ssm_state_bf16 + (b * E + e) * N : nullptr;
                    if (bf) convert_to_f32(h16, DType::BF16, hb, size_t(N));
                    float* h = bf ? hb : p.ssm_state + (b * E + e) * N;
                    const float* A = p.A + e * N;
                    for (int64_t t = 0; t < L; ++t) {
                        const int64_t bt = b * L + t;
                        const float delta = cpu::softplus1(p.dt[bt * E + e] + p.dt_bias[e]);
                        const float u = p.x[bt * E + e];
                        const float* Bt = p.Bm + bt * p.ld_bc;
                        const float* Ct = p.Cm + bt * p.ld_bc;
                        float acc = 0.0f;
                        for (int64_t n = 0; n < N; ++n) {
                            const float hn = cpu::exp1(delta * A[n]) * h[n] + delta * u * Bt[n];
                            h[n] = hn;
                            acc += Ct[n] * hn;
                        }
                        p.y[bt * E + e] = (acc + p.D[e] * u) * cpu::silu1(p.z[bt * p.ld_z + e]);
                        if (bf) round_bf16(h, N, h16);
                        if (p.state_trace)
                            std::memcpy(p.state_trace + (bt * E + e) * N, h, size_t(N) * sizeof(float));
                        if (p.state_trace_bf16)
                            std::memcpy(p.state_trace_bf16 + (bt * E + e) * N, h16,
                                        size_t(N) * sizeof(uint16_t));
                    }
                }
            });
        }
    }

    // One time step of the channel-blocked scan for lanes [j0, j0 + lanes of V) of the block:
    // h[n] = e^(delta A[n]) h[n] + delta u B[n];  y = (Σ_n h[n] C[n] + D u) silu(z).
    template <class V>
    static void scan_step(int j0, int64_t N, float (*h)[kScanBlock], const float (*At)[kScanBlock],
                          const float* bias, const float* D, const float* dt, const float* x,
                          const float* z, const float* Bt, const float* Ct, float* y) {
        const V delta = cpu::softplusv(cpu::vload<V>(dt + j0) + cpu::vload<V>(bias + j0));
        const V u = cpu::vload<V>(x + j0);
        const V du = delta * u;
        V acc = cpu::vsplat<V>(0.0f);
        for (int64_t n = 0; n < N; ++n) {
            const V hn = cpu::expv(delta * cpu::vload<V>(At[n] + j0)) * cpu::vload<V>(h[n] + j0) +
                         du * Bt[n];
            cpu::vstore(h[n] + j0, hn);
            acc += hn * Ct[n];
        }
        const V yv = (acc + cpu::vload<V>(D + j0) * u) * cpu::siluv(cpu::vload<V>(z + j0));
        cpu::vstore(y + j0, yv);
    }
    // dst[i * ldd + j] = src[j * lds + i], i, j < 8 (an 8 x 8 block transposed; with AVX in
    // registers: 24 shuffles in place of 64 scalar moves).
    static void transpose8x8(const float* src, int64_t lds, float* dst, int64_t ldd) {
#if defined(__AVX__)
        __m256 r[8], t[8];
        for (int j = 0; j < 8; ++j) r[j] = _mm256_loadu_ps(src + j * lds);
        for (int j = 0; j < 8; j += 2) {
            t[j] = _mm256_unpacklo_ps(r[j], r[j + 1]);      // a0 b0 a1 b1 | a4 b4 a5 b5
            t[j + 1] = _mm256_unpackhi_ps(r[j], r[j + 1]);  // a2 b2 a3 b3 | a6 b6 a7 b7
        }
        for (int j = 0; j < 8; j += 4) {
            r[j] = _mm256_shuffle_ps(t[j], t[j + 2], 0x44);      // a0 b0 c0 d0 | a4 b4 c4 d4
            r[j + 1] = _mm256_shuffle_ps(t[j], t[j + 2], 0xEE);  // a1 b1 c1 d1 | a5 ..
            r[j + 2] = _mm256_shuffle_ps(t[j + 1], t[j + 3], 0x44);
            r[j + 3] = _mm256_shuffle_ps(t[j + 1], t[j + 3], 0xEE);
        }
        for (int i = 0; i < 4; ++i) {
            _mm256_storeu_ps(dst + i * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
            _mm256_storeu_ps(dst + (i + 4) * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
        }
#else
        for (int i = 0; i < 8; ++i)
            for (int j = 0; j < 8; ++j) dst[i * ldd + j] = src[j * lds + i];
#endif
    }
    // The scan tile h (N, kScanBlock) back to state rows: dst[j * N + n] = h[n][j], j < ne.
    static void store_state(const float (*h)[kScanBlock], int64_t ne, int64_t N, float* dst) {
        int64_t nt = 0;
        if (ne == kScanBlock)
            for (; nt + 8 <= N; nt += 8)
                for (int jb = 0; jb < kScanBlock; jb += 8)
                    transpose8x8(&h[nt][jb], kScanBlock, dst + jb * N + nt, N);
        for (int64_t n = nt; n < N; ++n)
            for (int64_t j = 0; j < ne; ++j) dst[j * N + n] = h[n][j];
    }
    // The same into bf16 rows: the tile holds bf16 values (rounded after each token): exact.
    static void store_state_bf16(const float (*h)[kScanBlock], int64_t ne, int64_t N,
                                 uint16_t* dst) {
        for (int64_t j = 0; j < ne; ++j)
            for (int64_t n = 0; n < N; ++n) dst[j * N + n] = f32_to_bf16(h[n][j]);
    }
    // The scan tile h (N, kScanBlock) rounded to bf16 values (nearest even), in place.
    static void round_tile_bf16(float (*h)[kScanBlock], int64_t N) {
        for (int64_t n = 0; n < N; ++n)
            for (int j = 0; j < kScanBlock; ++j) h[n][j] = bf16_to_f32(f32_to_bf16(h[n][j]));
    }
    // v[0 .. n) rounded to bf16 (nearest even) into dst, and v given the rounded values.
    static void round_bf16(float* v, int64_t n, uint16_t* dst) {
        for (int64_t i = 0; i < n; ++i) {
            dst[i] = f32_to_bf16(v[i]);
            v[i] = bf16_to_f32(dst[i]);
        }
    }
    // dst[0 .. kScanBlock) = src[0 .. n), zeros past n.
    static void copy_part(float* dst, const float* src, int64_t n) {
        if (n == kScanBlock) {
            std::memcpy(dst, src, kScanBlock * sizeof(float));
            return;
        }
        for (int64_t j = 0; j < kScanBlock; ++j) dst[j] = j < n ? src[j] : 0.0f;
    }
    // v[i] = silu(v[i]), a vector at a time (each lane as silu1 computes it).
    static void silu_inplace(float* v, int64_t n) {
        int64_t i = 0;
        for (; i + kVecLanes <= n; i += kVecLanes)
            cpu::vstore(v + i, cpu::siluv(cpu::vload<Vec>(v + i)));
        for (; i < n; ++i) v[i] = silu(v[i]);
    }

    void ssd_scan(const SsdParams& p) override {
        cpu::PoolScope scope(pool_.get());
        // Per-token states (a speculative verification, L = k + 1 small) come from the
        // recurrent form, which has them anyway. Otherwise: the recurrent form does 2 P N
        // multiply-adds a token and head, the chunked one 2 P N + Q P (+ Q N for C·Bᵀ per
        // group): more whenever Q >= N, and its small GEMMs did not make up for it (issue 22,
        // mamba2-130m shape, 1 and 2 threads: the recurrent form 8-20% faster at 256 and 2048
        // tokens). The cpu_ssd option forces either (not with state_trace).
        // A bf16 state (option state_dtype) is rounded after every token (BF16_STATE_RULE):
        // the recurrent form.
        const bool recurrent = p.L == 1 || p.state_trace || p.ssm_state_bf16 ||
                               ssd_form_ == CpuSsd::Recurrent ||
                               (ssd_form_ == CpuSsd::Auto && p.chunk_size >= p.N);
        if (recurrent)
            ssd_recurrent(p);
        else
            ssd_chunked(p);
    }

    void gated_rmsnorm(const float* y, const float* z, int64_t ld_z, const float* w, int64_t n,
                       int64_t E, int64_t group_size, float eps, float* out) override {
        cpu::PoolScope scope(pool_.get());
        const int64_t groups = E / group_size;
        par(n > 4, n, [&](int64_t i0, int64_t i1) {
            for (int64_t i = i0; i < i1; ++i) {
                const float* yi = y + i * E;
                const float* zi = z + i * ld_z;
                float* oi = out + i * E;
                // y silu(z), a vector at a time (the scalar silu is lane 0 of the same code:
                // identical values)
                int64_t j = 0;
                for (; j + kVecLanes <= E; j += kVecLanes)
                    cpu::vstore(oi + j, cpu::vload<Vec>(yi + j) * cpu::siluv(cpu::vload<Vec>(zi + j)));
                for (; j < E; ++j) oi[j] = yi[j] * silu(zi[j]);
                for (int64_t g = 0; g < groups; ++g) {
                    float* og = oi + g * group_size;
                    // Σ og² in double, four running sums (a sequential double sum waits on
                    // each add); the float below rounds the same but for the rarest ties
                    double s4[4] = {0.0, 0.0, 0.0, 0.0};
                    int64_t k = 0;
                    for (; k + 4 <= group_size; k += 4)
                        for (int q = 0; q < 4; ++q) s4[q] += double(og[k + q]) * og[k + q];
                    for (; k < group_size; ++k) s4[0] += double(og[k]) * og[k];
                    const double ss = (s4[0] + s4[1]) + (s4[2] + s4[3]);
                    const float rstd = 1.0f / std::sqrt(float(ss / group_size) + eps);
                    const float* wg = w + g * group_size;
                    for (int64_t j = 0; j < group_size; ++j) og[j] = og[j] * rstd * wg[j];
                }
            }
        });
    }

    // Head h's output for one token (P) from its per-rank readouts yr (Rm, P), both forms: per
    // rank the optional per-head RMSNorm (norm_before_gate=True), the gate silu(z * mimo_z), and
    // the sum over ranks weighted by mimo_o (SISO: Rm = 1, no mimo weights).
    static void mamba3_gate_out(const Mamba3ScanParams& p, int64_t h, const float* yr,
                                const float* z, float* y) {
        const int64_t P = p.P, Rm = p.Rm;
        auto mix = [&](const float* m, int64_t r, int64_t i) {  // mimo_* [h, r, i] or 1
            return m ? m[(h * Rm + r) * P + i] : 1.0f;
        };
        for (int64_t i = 0; i < P; ++i) y[i] = 0.0f;
        for (int64_t r = 0; r < Rm; ++r) {
            const float* yv = yr + r * P;
            float inv = 1.0f;
            if (p.norm_w) {
                double ss = 0.0;
                for (int64_t i = 0; i < P; ++i) ss += double(yv[i]) * yv[i];
                inv = 1.0f / std::sqrt(float(ss / P) + p.eps);
            }
            for (int64_t i = 0; i < P; ++i) {
                float v = yv[i] * inv;
                if (p.norm_w) v *= p.norm_w[h * P + i];
                v *= silu(z[i] * mix(p.mimo_z, r, i));
                y[i] += v * mix(p.mimo_o, r, i);
            }
        }
    }

    // Mamba-3, the recurrent form (op_params.h: Mamba3ScanParams), parallel over (row, head),
    // sequential over tokens. Scratch on the stack (sizes bounded by kM3Max*, checked here).
    static constexpr int64_t kM3MaxN = 256, kM3MaxP = 256, kM3MaxRank = 8;
    void mamba3_scan(const Mamba3ScanParams& p) override {
        cpu::PoolScope scope(pool_.get());
        MAMBART_CHECK_ARG(p.N >= 2 && p.N <= kM3MaxN && p.P >= 1 && p.P <= kM3MaxP &&
                              p.Rm >= 1 && p.Rm <= kM3MaxRank && p.G >= 1 && p.H % p.G == 0 &&
                              2 * p.S <= p.N,
                          "mamba3_scan: sizes out of range (N=", p.N, " P=", p.P, " Rm=", p.Rm,
                          " G=", p.G, " H=", p.H, " S=", p.S, ")");
        const int64_t BH = p.B * p.H;
        const bool chunked = m3_mode_ == CpuMamba3::Chunked ||
                             (m3_mode_ == CpuMamba3::Auto && p.L * p.Rm >= kM3ChunkedMinRows);
        if (chunked) {
            par(BH > 1, BH, [&](int64_t i0, int64_t i1) {
                M3Scratch sc(p);  // per pool chunk, sized once per chunk
                for (int64_t bh = i0; bh < i1; ++bh)
                    mamba3_chunked_row_head(p, bh / p.H, bh % p.H, sc);
            });
            return;
        }
        par(BH > 1 && p.L * p.P * p.N > 4096, BH, [&](int64_t i0, int64_t i1) {
            for (int64_t bh = i0; bh < i1; ++bh) mamba3_row_head(p, bh / p.H, bh % p.H);
        });
    }

    // Mamba-3 in the chunked ("attention", SSD) form, per (row, head), chunks of Qk = 64 / Rm
    // tokens with the rank folded in (row i = l Rm + r of a chunk: token t0 + l, rank r; F = Lc Rm
    // rows). The same decomposition as cuda/mamba3_chunked.cu (its header has the derivation):
    //   G = ssm_state + pre_0 Σ_r (v ⊙ mimo_x_r) ⊗ k_r;  per chunk, with Λ chunk-local:
    //   Y = el ∘ (Q' · Gᵀ) + (CB ∘ M) · X + D X,  CB = Q' · K'ᵀ,  M(i, j) = exp(Λ_i − Λ_j) scale_j
    //       (token(j) < token(i)), γ (same token), 0 after;
    //   G <- exp(Λ_last) G + (wt ∘ X)ᵀ · K',  wt_j = exp(Λ_last − Λ_j) scale_j;
    //   scale_s = γ_s + pre_{s+1} (γ_s for the last token of the sequence);
    // then the norm / gate / rank sum per token. The products run through cpu::linear.
    static constexpr int64_t kM3Rows = 64;         // folded rows per chunk
    // auto: the chunked form from one full chunk (L Rm >= 64 rows), the recurrent form below.
    // Measured (2 cores, AMD EPYC; H = 24, P = 64, N = 128, the _ops op): SISO L = 64 equal,
    // 512: 91 vs 144 ms, 2048: 331 vs 605 ms; MIMO Rm = 4 L = 16: 16 vs 20 ms, 2048: 1027 vs
    // 2258 ms (chunked vs recurrent).
    static constexpr int64_t kM3ChunkedMinRows = 64;
    struct M3Scratch {
        std::vector<float> q, k, kt, x, xt, xw, yo, cb, y, dS;  // (F, N) (F, N) (N, F) (F, P)
        std::vector<float> cum, gam, scl, dt, th;               // (P, F) (P, F) (F, P) (F, F)
        explicit M3Scratch(const Mamba3ScanParams& p)           // (F, P) (P, N); per row / pair
            : q(size_t(kM3Rows * p.N)), k(size_t(kM3Rows * p.N)), kt(size_t(kM3Rows * p.N)),
              x(size_t(kM3Rows * p.P)), xt(size_t(kM3Rows * p.P)), xw(size_t(kM3Rows * p.P)),
              yo(size_t(kM3Rows * p.P)), cb(size_t(kM3Rows * kM3Rows)),
              y(size_t(kM3Rows * p.P)), dS(size_t(p.P * p.N)), cum(size_t(kM3Rows)),
              gam(size_t(kM3Rows)), scl(size_t(kM3Rows)), dt(size_t(kM3Rows)),
              th(size_t(p.S)) {}
    };

    static void mamba3_chunked_row_head(const Mamba3ScanParams& p, int64_t b, int64_t h,
                                        M3Scratch& sc) {
        const int64_t H = p.H, P = p.P, N = p.N, G = p.G, Rm = p.Rm, S = p.S, E = H * P, L = p.L;
        const int64_t g = h / (H / G);
        const int64_t Qk = kM3Rows / Rm;
        const float two_pi = 6.283185307179586f, pi = 3.141592653589793f;
        const int64_t off_B = 2 * E, off_C = off_B + Rm * G * N, off_dt = off_C + Rm * G * N;
        float* Gs = p.ssm_state + (b * H + h) * P * N;  // (P, N) G_c, in place
        float* theta = p.angle_state + (b * H + h) * S;
        float* vst = p.v_state + (b * H + h) * P;
        auto proj_row = [&](int64_t t) { return p.proj + (b * L + t) * p.ld_proj; };
        auto mix = [&](const float* m, int64_t r, int64_t i) {
            return m ? m[(h * Rm + r) * P + i] : 1.0f;
        };
        auto coefs = [&](int64_t t, float* DT, float* lam, float* adt) {
            const float* row = proj_row(t);
            *DT = softplus(row[off_dt + h] + p.dt_bias[h]);
            const float a = row[off_dt + H + h];
            const float fa = p.softplus_a ? softplus(a) : (a >= 0.0f ? 1.0f + a : 1.0f / (1.0f - a));
            *adt = std::min(-fa, -p.a_floor) * *DT;
            *lam = 1.0f / (1.0f + std::exp(-row[off_dt + 2 * H + h]));
        };
        auto wrap = [&](float v) {
            v = std::fmod(v, two_pi);
            return v < 0.0f ? v + two_pi : v;
        };
        {  // G_0 = h_init + pre_0 Σ_r (v ⊙ mimo_x_r) ⊗ k_r
            float DT, lam, adt;
            coefs(0, &DT, &lam, &adt);
            const float pre0 = (1.0f - lam) * DT;
            for (int64_t r = 0; r < Rm; ++r) {
                const float* kr = p.k_state + ((b * Rm + r) * H + h) * N;
                for (int64_t i = 0; i < P; ++i) {
                    const float f = pre0 * vst[i] * mix(p.mimo_x, r, i);
                    float* gr = Gs + i * N;
                    for (int64_t n = 0; n < N; ++n) gr[n] += f * kr[n];
                }
            }
        }
        float* q = sc.q.data();
        float* k = sc.k.data();
        float* x = sc.x.data();
        for (int64_t t0 = 0; t0 < L; t0 += Qk) {
            const int64_t Lc = std::min(Qk, L - t0), F = Lc * Rm;
            float run = 0.0f;
            for (int64_t l = 0; l < Lc; ++l) {
                float DT, lam, adt;
                coefs(t0 + l, &DT, &lam, &adt);
                run += adt;
                sc.cum[size_t(l)] = run;
                sc.gam[size_t(l)] = lam * DT;
                sc.dt[size_t(l)] = DT;
            }
            for (int64_t l = 0; l < Lc; ++l) {
                float nxt = 0.0f;  // pre of the next token (none after the last)
                if (t0 + l + 1 < L) {
                    float DT, lam, adt;
                    coefs(t0 + l + 1, &DT, &lam, &adt);
                    nxt = (1.0f - lam) * DT;
                }
                sc.scl[size_t(l)] = sc.gam[size_t(l)] + nxt;
            }
            // θ per token (start of chunk + running sum, wrapped), q', k', x rows
            const float* th0 = theta;
            for (int64_t i = 0; i < S; ++i) sc.th[size_t(i)] = 0.0f;
            for (int64_t l = 0; l < Lc; ++l) {
                const float* row = proj_row(t0 + l);
                const float* ang = row + off_dt + 3 * H;
                const float DT = sc.dt[size_t(l)];
                for (int64_t r = 0; r < Rm; ++r) {
                    for (int which = 0; which < 2; ++which) {
                        const float* src = row + (which ? off_C : off_B) + (r * G + g) * N;
                        const float* w = which ? p.C_norm_w : p.B_norm_w;
                        const float* bias = (which ? p.C_bias : p.B_bias) + (h * Rm + r) * N;
                        float* dst = (which ? q : k) + (l * Rm + r) * N;
                        double ss = 0.0;
                        for (int64_t n = 0; n < N; ++n) ss += double(src[n]) * src[n];
                        const float inv = 1.0f / std::sqrt(float(ss / N) + p.eps);
                        for (int64_t n = 0; n < N; ++n) dst[n] = src[n] * inv * w[n] + bias[n];
                    }
                    const float* xs = row + E + h * P;
                    for (int64_t i = 0; i < P; ++i) x[(l * Rm + r) * P + i] = xs[i] * mix(p.mimo_x, r, i);
                }
                for (int64_t i = 0; i < S; ++i) {
                    sc.th[size_t(i)] += pi * std::tanh(ang[i]) * DT;
                    const float th = wrap(th0[i] + sc.th[size_t(i)]);
                    const float c = std::cos(th), s = std::sin(th);
                    const int64_t i0 = p.halved ? i : 2 * i, i1 = p.halved ? i + N / 2 : 2 * i + 1;
                    for (int64_t r = 0; r < 2 * Rm; ++r) {
                        float* dst = (r < Rm ? k : q) + (l * Rm + r % Rm) * N;
                        const float v0 = dst[i0], v1 = dst[i1];
                        dst[i0] = v0 * c - v1 * s;
                        dst[i1] = v0 * s + v1 * c;
                    }
                }
            }
            for (int64_t i = 0; i < S; ++i) theta[i] = wrap(th0[i] + sc.th[size_t(i)]);
            const float last = sc.cum[size_t(Lc - 1)];
            auto tok = [&](int64_t i) { return size_t(i / Rm); };
            // Yo = Q' · Gᵀ (F, P);  CB = Q' · K'ᵀ (F, F)
            cpu::linear(q, N, F, N, Gs, DType::F32, P, nullptr, sc.yo.data(), P);
            cpu::linear(q, N, F, N, k, DType::F32, F, nullptr, sc.cb.data(), F);
            for (int64_t i = 0; i < F; ++i)
                for (int64_t j = 0; j < F; ++j) {
                    float coef = 0.0f;
                    if (tok(j) < tok(i))
                        coef = exp_neg(sc.cum[tok(i)] - sc.cum[tok(j)]) * sc.scl[tok(j)];
                    else if (tok(j) == tok(i))
                        coef = sc.gam[tok(j)];
                    sc.cb[size_t(i * F + j)] *= coef;
                }
            // Y = el ∘ Yo + M · X + D X   (M · X: W = Xᵀ (P, F))
            for (int64_t i = 0; i < F; ++i)
                for (int64_t pp = 0; pp < P; ++pp) {
                    sc.xt[size_t(pp * F + i)] = x[i * P + pp];
                    sc.xw[size_t(pp * F + i)] =
                        x[i * P + pp] * exp_neg(last - sc.cum[tok(i)]) * sc.scl[tok(i)];
                }
            cpu::linear(sc.cb.data(), F, F, F, sc.xt.data(), DType::F32, P, nullptr, sc.y.data(), P);
            const float Dh = p.D[h];
            for (int64_t i = 0; i < F; ++i) {
                const float el = exp_neg(sc.cum[tok(i)]);
                for (int64_t pp = 0; pp < P; ++pp)
                    sc.y[size_t(i * P + pp)] += el * sc.yo[size_t(i * P + pp)] + Dh * x[i * P + pp];
            }
            // G <- exp(Λ_last) G + (wt ∘ X)ᵀ · K'   (W = K'ᵀ (N, F))
            for (int64_t i = 0; i < F; ++i)
                for (int64_t n = 0; n < N; ++n) sc.kt[size_t(n * F + i)] = k[i * N + n];
            cpu::linear(sc.xw.data(), F, P, F, sc.kt.data(), DType::F32, N, nullptr, sc.dS.data(), N);
            const float total = exp_neg(last);
            for (int64_t i = 0; i < P * N; ++i) Gs[i] = Gs[i] * total + sc.dS[size_t(i)];
            // per token: norm, gate, rank sum
            for (int64_t l = 0; l < Lc; ++l) {
                const float* z = proj_row(t0 + l) + h * P;
                mamba3_gate_out(p, h, sc.y.data() + l * Rm * P, z,
                                p.y + (b * L + t0 + l) * E + h * P);
            }
            if (t0 + Lc == L) {  // the last token's k' and x
                for (int64_t r = 0; r < Rm; ++r)
                    std::memcpy(p.k_state + ((b * Rm + r) * H + h) * N, k + ((Lc - 1) * Rm + r) * N,
                                size_t(N) * sizeof(float));
                std::memcpy(vst, proj_row(L - 1) + E + h * P, size_t(P) * sizeof(float));
            }
        }
    }

    static void mamba3_row_head(const Mamba3ScanParams& p, int64_t b, int64_t h) {
        const int64_t H = p.H, P = p.P, N = p.N, G = p.G, Rm = p.Rm, S = p.S, E = H * P;
        const int64_t g = h / (H / G);
        const float two_pi = 6.283185307179586f, pi = 3.141592653589793f;
        float q[kM3MaxRank * kM3MaxN], k[kM3MaxRank * kM3MaxN];     // (Rm, N) this token
        float xr[kM3MaxRank * kM3MaxP], vr[kM3MaxRank * kM3MaxP];   // (Rm, P) x, previous x
        float yr[kM3MaxRank * kM3MaxP];                             // (Rm, P)
        float* theta = p.angle_state + (b * H + h) * S;             // (S)
        float* hs = p.ssm_state + (b * H + h) * P * N;              // (P, N)
        float* vst = p.v_state + (b * H + h) * P;                   // (P)
        auto kprev = [&](int64_t r) { return p.k_state + ((b * Rm + r) * H + h) * N; };
        auto mix = [&](const float* m, int64_t r, int64_t i) {      // mimo_* [h, r, i] or 1
            return m ? m[(h * Rm + r) * P + i] : 1.0f;
        };
        const int64_t off_B = 2 * E, off_C = off_B + Rm * G * N, off_dt = off_C + Rm * G * N;
        for (int64_t t = 0; t < p.L; ++t) {
            const float* row = p.proj + (b * p.L + t) * p.ld_proj;
            const float* z = row + h * P;
            const float* x = row + E + h * P;
            const float DT = softplus(row[off_dt + h] + p.dt_bias[h]);
            const float a = row[off_dt + H + h];
            const float fa = p.softplus_a ? softplus(a) : (a >= 0.0f ? 1.0f + a : 1.0f / (1.0f - a));
            const float A = std::min(-fa, -p.a_floor);
            const float lam = 1.0f / (1.0f + std::exp(-row[off_dt + 2 * H + h]));
            const float* ang = row + off_dt + 3 * H;
            for (int64_t i = 0; i < S; ++i) {
                float th = theta[i] + pi * std::tanh(ang[i]) * DT;
                th = std::fmod(th, two_pi);
                if (th < 0.0f) th += two_pi;
                theta[i] = th;
            }
            // k_r, q_r: RMSNorm over N, weight, per-head bias, rotation by θ.
            for (int64_t r = 0; r < Rm; ++r) {
                for (int which = 0; which < 2; ++which) {
                    const float* src = row + (which ? off_C : off_B) + (r * G + g) * N;
                    const float* w = which ? p.C_norm_w : p.B_norm_w;
                    const float* bias = (which ? p.C_bias : p.B_bias) + (h * Rm + r) * N;
                    float* dst = (which ? q : k) + r * N;
                    double ss = 0.0;
                    for (int64_t n = 0; n < N; ++n) ss += double(src[n]) * src[n];
                    const float inv = 1.0f / std::sqrt(float(ss / N) + p.eps);
                    for (int64_t n = 0; n < N; ++n) dst[n] = src[n] * inv * w[n] + bias[n];
                    for (int64_t i = 0; i < S; ++i) {
                        const int64_t i0 = p.halved ? i : 2 * i, i1 = p.halved ? i + N / 2 : 2 * i + 1;
                        const float c = std::cos(theta[i]), s = std::sin(theta[i]);
                        const float v0 = dst[i0], v1 = dst[i1];
                        dst[i0] = v0 * c - v1 * s;
                        dst[i1] = v0 * s + v1 * c;
                    }
                }
            }
            for (int64_t r = 0; r < Rm; ++r)
                for (int64_t i = 0; i < P; ++i) {
                    xr[r * P + i] = x[i] * mix(p.mimo_x, r, i);
                    vr[r * P + i] = vst[i] * mix(p.mimo_x, r, i);
                }
            const float alpha = std::exp(A * DT), beta = (1.0f - lam) * DT * alpha,
                        gamma = lam * DT, Dh = p.D[h];
            for (int64_t i = 0; i < P; ++i) {
                float* hrow = hs + i * N;
                for (int64_t n = 0; n < N; ++n) hrow[n] *= alpha;
                for (int64_t r = 0; r < Rm; ++r) {
                    const float bv = beta * vr[r * P + i], gx = gamma * xr[r * P + i];
                    const float* kp = kprev(r);
                    const float* kr = k + r * N;
                    for (int64_t n = 0; n < N; ++n) hrow[n] += bv * kp[n] + gx * kr[n];
                }
                for (int64_t r = 0; r < Rm; ++r) {
                    const float* qr = q + r * N;
                    float acc = 0.0f;
                    for (int64_t n = 0; n < N; ++n) acc += hrow[n] * qr[n];
                    yr[r * P + i] = acc + Dh * xr[r * P + i];
                }
            }
            mamba3_gate_out(p, h, yr, z, p.y + (b * p.L + t) * E + h * P);
            for (int64_t r = 0; r < Rm; ++r) std::memcpy(kprev(r), k + r * N, size_t(N) * sizeof(float));
            std::memcpy(vst, x, size_t(P) * sizeof(float));
        }
    }

    void relu_sq(float* y, int64_t n, int64_t E) override {
        for (int64_t i = 0; i < n * E; ++i) {
            const float r = std::max(y[i], 0.0f);
            y[i] = r * r;
        }
    }

    void attention(const AttentionParams& p) override {
        cpu::PoolScope scope(pool_.get());
        cpu::attention(p);
    }

    void moe(const MoeParams& p) override {
        cpu::PoolScope scope(pool_.get());
        cpu::moe(p);
    }

    void scale(float* y, int64_t n, float s) override {
        for (int64_t i = 0; i < n; ++i) y[i] *= s;
    }

    void silu_gate(float* y, const float* z, int64_t ld_z, int64_t n, int64_t E) override {
        for (int64_t i = 0; i < n; ++i)
            for (int64_t j = 0; j < E; ++j) y[i * E + j] *= silu(z[i * ld_z + j]);
    }

    void gelu_gate(float* y, const float* z, int64_t ld_z, int64_t n, int64_t E) override {
        for (int64_t i = 0; i < n; ++i)
            for (int64_t j = 0; j < E; ++j) {
                const float v = z[i * ld_z + j];
                y[i * E + j] *= 0.5f * v * (1.0f + std::erf(v * 0.70710678118654752f));
            }
    }

 private:
    CpuMamba3 m3_mode_;  // the cpu_mamba3 option (cpp/options.h), read at construction
    std::unique_ptr<cpu::ThreadPool> pool_;  // every op's threads (the caller and its workers)
    CpuSsd ssd_form_;                         // the cpu_ssd option when the backend was made

    static float dt_value(const SsdParams& p, int64_t bt, int64_t h) {
        const float v = softplus(p.dt[bt * p.ld_dt + h] + p.dt_bias[h]);
        return std::min(std::max(v, p.dt_min), p.dt_max);
    }

    // The recurrent form, token by token (decode steps, prefill where it is the faster form,
    // and verifications that keep per-token states): s = s·exp(Δ A) + Δ·x ⊗ B;
    // y = s·C + D x  (+ gate); with state_trace, s after each token is copied to its trace row.
    // Threads split the (row, head) pairs; a head's state (P x N) stays in L1 while its tokens
    // run. Each token does exactly the arithmetic of a decode step (L = 1), so a prompt
    // prefilled this way leaves the state that decoding it token by token would.
    // A bf16 state is read a row (pp) at a time into sb and rounded back after every token.
    void ssd_recurrent(const SsdParams& p) {
        const int64_t H = p.H, P = p.P, N = p.N, L = p.L, heads_per_group = p.H / p.G;
        const bool bf = p.ssm_state_bf16 != nullptr;
        MAMBART_CHECK_ARG(!bf || N <= kMaxDState, "ssd_scan: d_state ", N, " > ", kMaxDState,
                          " with a bf16 state");
        par(p.B * H * P * N * L > 16384, p.B * H, [&](int64_t i0, int64_t i1) {
            float sb[kMaxDState];  // (N) a row of a bf16 state, widened
            for (int64_t bh = i0; bh < i1; ++bh) {
                const int64_t b = bh / H, h = bh % H, g = h / heads_per_group;
                float* s = bf ? nullptr : p.ssm_state + (b * H + h) * P * N;
                uint16_t* s16 = bf ? p.ssm_state_bf16 + (b * H + h) * P * N : nullptr;
                for (int64_t t = 0; t < L; ++t) {
                    const int64_t bt = b * L + t;  // token row
                    const float delta = dt_value(p, bt, h);
                    const float dA = exp_neg(delta * p.A[h]);
                    const float* x = p.x + bt * p.ld_xbc + h * P;
                    const float* Bv = p.Bm + bt * p.ld_xbc + g * N;
                    const float* Cv = p.Cm + bt * p.ld_xbc + g * N;
                    float* y = p.y + bt * H * P + h * P;
                    int64_t pp = 0;
                    if (!bf) {
                        // four state rows at a time, each summed as the one-row loop below sums
                        // it (its own accumulator): the rows' reduction chains overlap
                        for (; pp + 4 <= P; pp += 4) {
                            const float dx0 = delta * x[pp], dx1 = delta * x[pp + 1],
                                        dx2 = delta * x[pp + 2], dx3 = delta * x[pp + 3];
                            float* s0 = s + pp * N;
                            float* s1 = s0 + N;
                            float* s2 = s1 + N;
                            float* s3 = s2 + N;
                            float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
                            for (int64_t n = 0; n < N; ++n) {
                                const float v0 = s0[n] * dA + dx0 * Bv[n];
                                const float v1 = s1[n] * dA + dx1 * Bv[n];
                                const float v2 = s2[n] * dA + dx2 * Bv[n];
                                const float v3 = s3[n] * dA + dx3 * Bv[n];
                                s0[n] = v0;
                                s1[n] = v1;
                                s2[n] = v2;
                                s3[n] = v3;
                                a0 += v0 * Cv[n];
                                a1 += v1 * Cv[n];
                                a2 += v2 * Cv[n];
                                a3 += v3 * Cv[n];
                            }
                            y[pp] = a0 + p.D[h] * x[pp];
                            y[pp + 1] = a1 + p.D[h] * x[pp + 1];
                            y[pp + 2] = a2 + p.D[h] * x[pp + 2];
                            y[pp + 3] = a3 + p.D[h] * x[pp + 3];
                        }
                    }
                    for (; pp < P; ++pp) {
                        const float dx = delta * x[pp];
                        float* sp = bf ? sb : s + pp * N;
                        if (bf) convert_to_f32(s16 + pp * N, DType::BF16, sb, size_t(N));
                        float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
                        for (int64_t n = 0; n < N; ++n) {
                            const float v = sp[n] * dA + dx * Bv[n];
                            sp[n] = v;
                            acc += v * Cv[n];
                        }
                        y[pp] = acc + p.D[h] * x[pp];
                        if (bf) round_bf16(sb, N, s16 + pp * N);
                    }
                    if (p.z) {
                        const float* z = p.z + bt * p.ld_z + h * P;
                        int64_t q = 0;
                        for (; q + kVecLanes <= P; q += kVecLanes)
                            cpu::vstore(y + q, cpu::vload<Vec>(y + q) * cpu::siluv(cpu::vload<Vec>(z + q)));
                        for (; q < P; ++q) y[q] *= silu(z[q]);
                    }
                    if (p.state_trace)
                        std::memcpy(p.state_trace + (bt * H + h) * P * N, s,
                                    size_t(P * N) * sizeof(float));
                    if (p.state_trace_bf16)
                        std::memcpy(p.state_trace_bf16 + (bt * H + h) * P * N, s16,
                                    size_t(P * N) * sizeof(uint16_t));
                }
            }
        });
    }

    // The SSD chunked algorithm (Mamba-2 paper, Listing 1), per row and chunk of Q tokens:
    //   a_t = Δ_t A_h,  Λ_l = Σ_{i<=l} a_i  (within the chunk),  X_s = Δ_s x_s
    //   Y_diag[l] = Σ_{s<=l} (C_l·B_s) exp(Λ_l − Λ_s) X_s            (intra-chunk, "stable segsum")
    //   Y_off[l]  = exp(Λ_l) C_l·S                                    (S: state at chunk start)
    //   S        <- exp(Λ_last) S + Σ_s exp(Λ_last − Λ_s) X_s ⊗ B_s   (state passing)
    //   y = Y_diag + Y_off + D x (+ z gate)
    // Each of the three sums is a small matrix product and runs through cpu::linear (the packed
    // GEMM) on per-thread scratch: Y_off = C·Sᵀ, Y_diag = M·Xᵀ with M[l,s] the decayed C_l·B_s,
    // and the state update Xwᵀ·B. C_l·B_s is computed once per group (threads split its rows),
    // then threads split the heads (the GEMMs inside run on one thread).
    void ssd_chunked(const SsdParams& p) {
        const int64_t H = p.H, P = p.P, N = p.N, G = p.G, Q = p.chunk_size;
        const int64_t heads_per_group = H / G;
        const int64_t T = p.L;  // tokens per row
        for (int64_t b = 0; b < p.B; ++b) {
            for (int64_t c0 = 0; c0 < T; c0 += Q) {
                const int64_t Lc = std::min(Q, T - c0);
                auto row = [&](int64_t l) { return (b * T + c0 + l); };  // token row in the batch
                // Each group's C, B (transposed) and C_l·B_s, once for all its heads.
                std::vector<float> Cga(size_t(G * Lc * N));   // (G, Lc, N) C of each group
                std::vector<float> Bta(size_t(G * N * Lc));   // (G, N, Lc) B of each group, transposed
                std::vector<float> CBa(size_t(G * Lc * Lc));  // (G, Lc, Lc) C_l·B_s, s <= l
                for (int64_t g = 0; g < G; ++g)
                    for (int64_t l = 0; l < Lc; ++l) {
                        const float* Cl = p.Cm + row(l) * p.ld_xbc + g * N;
                        const float* Bl = p.Bm + row(l) * p.ld_xbc + g * N;
                        for (int64_t n = 0; n < N; ++n) {
                            Cga[size_t((g * Lc + l) * N + n)] = Cl[n];
                            Bta[size_t((g * N + n) * Lc + l)] = Bl[n];
                        }
                    }
                par(true, G * Lc, [&](int64_t r0, int64_t r1) {
                    for (int64_t r = r0; r < r1; ++r) {
                        const int64_t g = r / Lc;
                        ssd_cb(Cga.data() + g * Lc * N, Bta.data() + g * N * Lc, Lc, N,
                               CBa.data() + g * Lc * Lc, r % Lc);
                    }
                });
                par(true, H, [&](int64_t h0, int64_t h1) {
                    std::vector<float> Mx(size_t(Lc * Lc));  // (Lc, Lc) decayed, masked C_l·B_s Δ_s
                    std::vector<float> Xt(size_t(P * Lc));   // (P, Lc) x of the head, transposed
                    std::vector<float> Xw(size_t(P * Lc));   // (P, Lc) x weighted to the chunk end
                    std::vector<float> Yo(size_t(Lc * P));   // (Lc, P) C·Sᵀ
                    std::vector<float> Yd(size_t(Lc * P));   // (Lc, P) M·Xᵀ
                    std::vector<float> dS(size_t(P * N));    // (P, N) state increment
                    std::vector<float> delta(static_cast<size_t>(Lc)), cum(static_cast<size_t>(Lc));
                    for (int64_t h = h0; h < h1; ++h) {
                        const int64_t g = h / heads_per_group;
                        const float* Cg = Cga.data() + g * Lc * N;  // (Lc, N)
                        const float* Bt = Bta.data() + g * N * Lc;  // (N, Lc)
                        const float* CB = CBa.data() + g * Lc * Lc; // (Lc, Lc)
                        float run = 0.0f;
                        for (int64_t l = 0; l < Lc; ++l) {
                            delta[size_t(l)] = dt_value(p, row(l), h);
                            run += delta[size_t(l)] * p.A[h];
                            cum[size_t(l)] = run;
                        }
                        const float last = cum[size_t(Lc - 1)];
                        for (int64_t s2 = 0; s2 < Lc; ++s2) {
                            const float* xs = p.x + row(s2) * p.ld_xbc + h * P;
                            const float wend = exp_neg(last - cum[size_t(s2)]) * delta[size_t(s2)];
                            for (int64_t pp = 0; pp < P; ++pp) {
                                Xt[size_t(pp * Lc + s2)] = xs[pp];
                                Xw[size_t(pp * Lc + s2)] = xs[pp] * wend;
                            }
                        }
                        for (int64_t l = 0; l < Lc; ++l) {  // 8 columns s at a time
                            float* mrow = Mx.data() + l * Lc;
                            const float* cbrow = CB + l * Lc;
                            const cpu::f8 cl = cpu::splat(cum[size_t(l)]);
                            int64_t s2 = 0;
                            for (; s2 + 8 <= l + 1; s2 += 8)
                                cpu::store8(mrow + s2, cpu::load8(cbrow + s2) *
                                                           cpu::exp8(cl - cpu::load8(&cum[size_t(s2)])) *
                                                           cpu::load8(&delta[size_t(s2)]));
                            for (; s2 <= l; ++s2)
                                mrow[s2] = cbrow[s2] * exp_neg(cum[size_t(l)] - cum[size_t(s2)]) *
                                           delta[size_t(s2)];
                            for (; s2 < Lc; ++s2) mrow[s2] = 0.0f;
                        }
                        float* S = p.ssm_state + (b * H + h) * P * N;  // (P, N)
                        cpu::linear(Cg, N, Lc, N, S, DType::F32, P, nullptr, Yo.data(), P);
                        cpu::linear(Mx.data(), Lc, Lc, Lc, Xt.data(), DType::F32, P, nullptr,
                                    Yd.data(), P);
                        for (int64_t l = 0; l < Lc; ++l) {
                            const float* xl = p.x + row(l) * p.ld_xbc + h * P;
                            float* y = p.y + row(l) * H * P + h * P;
                            const float off = exp_neg(cum[size_t(l)]);
                            for (int64_t pp = 0; pp < P; ++pp)
                                y[pp] = off * Yo[size_t(l * P + pp)] + Yd[size_t(l * P + pp)] +
                                        p.D[h] * xl[pp];
                            if (p.z) {
                                const float* z = p.z + row(l) * p.ld_z + h * P;
                                for (int64_t pp = 0; pp < P; ++pp) y[pp] *= silu(z[pp]);
                            }
                        }
                        // S <- exp(Λ_last) S + Xw · B   (Bt is (N, Lc): W rows = B columns)
                        cpu::linear(Xw.data(), Lc, P, Lc, Bt, DType::F32, N, nullptr,
                                    dS.data(), N);
                        const float total = exp_neg(last);
                        for (int64_t i = 0; i < P * N; ++i) S[i] = S[i] * total + dS[size_t(i)];
                    }
                });
            }
        }
    }

    // Row l of CB: CB[l, s] = Σ_n C[l, n] B[s, n] for s <= l (the causal half; the rest is
    // never read), from Cg (Lc, N) and the transposed Bt (N, Lc).
    static void ssd_cb(const float* Cg, const float* Bt, int64_t Lc, int64_t N, float* CB,
                       int64_t l) {
        float* out = CB + l * Lc;
        for (int64_t s2 = 0; s2 <= l; ++s2) out[s2] = 0.0f;
        for (int64_t n = 0; n < N; ++n) {
            const float c = Cg[l * N + n];
            const float* bn = Bt + n * Lc;
#pragma omp simd
            for (int64_t s2 = 0; s2 <= l; ++s2) out[s2] += c * bn[s2];
        }
    }
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(int threads) {
    if (threads <= 0) threads = int(runtime_options().cpu_threads);
    if (threads <= 0) {  // OMP_NUM_THREADS, as before the pool (a positive integer), else the cores
        std::string buf;
        const char* omp = environment_value("OMP_NUM_THREADS", &buf);  // options.h
        char* end = nullptr;
        const long v = omp ? std::strtol(omp, &end, 10) : 0;
        threads = omp && *omp && *end == '\0' && v >= 1 && v <= 4096 ? int(v) : cpu::affinity_cores();
    }
    return std::make_unique<CpuBackend>(threads);
}

}  // namespace mambart

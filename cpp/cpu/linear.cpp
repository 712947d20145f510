// CPU projections: y[M, N] = x[M, K] · W[N, K]ᵀ + bias[N]   (see linear.h)
//
// Both regimes are register-tiled micro-kernels over the whole K (no K blocking: K <= a few
// thousand, so a panel stays in L2).
//   - GEMV (M <= kGemvMaxM, decode): weight rows are widened to fp32 on the fly, each weight
//     row read from memory once per call; threads split the N weight rows.
//   - GEMM (M > kGemvMaxM, prefill): threads split N into panels of 16 weight rows; each panel
//     is widened to fp32 and packed transposed (K, 16) once into thread-local scratch, then
//     every 6-row tile of x runs an outer-product micro-kernel (6 x 16 accumulators) over it,
//     so the conversion is amortised over M.
// The AVX2 + FMA (+ F16C) path is picked at run time (__builtin_cpu_supports), so one binary
// runs on any x86-64; other machines take the portable path, which computes the same sums.
#include "cpu/linear.h"
#include "options.h"

#include <omp.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define MAMBART_X86 1
#endif

namespace mambart {
namespace cpu {
namespace {

constexpr int64_t kGemvMaxM = 8;   // up to this many rows: bandwidth-bound GEMV path

// ---- portable path ---------------------------------------------------------------------------

inline float load_w(const void* W, DType dt, size_t i) {
    switch (dt) {
        case DType::F32: return static_cast<const float*>(W)[i];
        case DType::F16: return f16_to_f32(static_cast<const uint16_t*>(W)[i]);
        case DType::BF16: return bf16_to_f32(static_cast<const uint16_t*>(W)[i]);
    }
    return 0.0f;
}

void linear_portable(const float* x, int64_t ldx, int64_t M, int64_t K, const void* W, DType dt,
                     int64_t N, const float* bias, float* y, int64_t ldy) {
#pragma omp parallel
    {
        thread_local std::vector<float> wrow;  // (K) one weight row widened to fp32, grown once
        if (wrow.size() < static_cast<size_t>(K)) wrow.resize(static_cast<size_t>(K));
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; ++n) {
            for (int64_t k = 0; k < K; ++k) wrow[size_t(k)] = load_w(W, dt, size_t(n * K + k));
            const float b = bias ? bias[n] : 0.0f;
            for (int64_t m = 0; m < M; ++m) {
                const float* xm = x + m * ldx;
                float acc = 0.0f;
                for (int64_t k = 0; k < K; ++k) acc += xm[k] * wrow[size_t(k)];
                y[m * ldy + n] = acc + b;
            }
        }
    }
}

#ifdef MAMBART_X86

// ---- AVX2 + FMA path ---------------------------------------------------------------------------

#define MAMBART_AVX2 __attribute__((target("avx2,fma,f16c")))

// Loads 8 consecutive weights starting at element k of a row, widened to fp32.
template <DType D>
MAMBART_AVX2 inline __m256 load8(const void* row, int64_t k) {
    if constexpr (D == DType::F32) {
        return _mm256_loadu_ps(static_cast<const float*>(row) + k);
    } else if constexpr (D == DType::F16) {
        const __m128i h = _mm_loadu_si128(
            reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(row) + k));
        return _mm256_cvtph_ps(h);
    } else {
        const __m128i h = _mm_loadu_si128(
            reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(row) + k));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
}

template <DType D>
inline float load1(const void* row, int64_t k) {
    if constexpr (D == DType::F32) return static_cast<const float*>(row)[k];
    else if constexpr (D == DType::F16) return f16_to_f32(static_cast<const uint16_t*>(row)[k]);
    else return bf16_to_f32(static_cast<const uint16_t*>(row)[k]);
}

MAMBART_AVX2 inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// out[i][j] = Σ_k x[i][k] · w_j[k] for an MR x NR tile; w rows in dtype D with row stride ldw
// (elements); writes y[i * ldy + j] = out + bias[j].
template <int MR, int NR, DType D>
MAMBART_AVX2 inline void tile(const float* x, int64_t ldx, int64_t K, const void* w, int64_t ldw,
                              const float* bias, float* y, int64_t ldy) {
    const size_t es = D == DType::F32 ? 4 : 2;
    const void* wr[NR];
    for (int j = 0; j < NR; ++j) wr[j] = static_cast<const char*>(w) + size_t(j * ldw) * es;
    __m256 acc[MR][NR];
    for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 wv[NR];
        for (int j = 0; j < NR; ++j) wv[j] = load8<D>(wr[j], k);
        for (int i = 0; i < MR; ++i) {
            const __m256 xv = _mm256_loadu_ps(x + i * ldx + k);
            for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
        }
    }
    for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NR; ++j) {
            float s = hsum(acc[i][j]);
            for (int64_t kk = k; kk < K; ++kk) s += x[i * ldx + kk] * load1<D>(wr[j], kk);
            y[i * ldy + j] = s + (bias ? bias[j] : 0.0f);
        }
}

// Rows [m0, m0 + MR) of x against weight rows [n0, n1) (any count), tiles of NR with a 1-row tail.
template <int MR, int NR, DType D>
MAMBART_AVX2 void sweep_n(const float* x, int64_t ldx, int64_t K, const void* W, int64_t ldw,
                          int64_t n0, int64_t n1, const float* bias, float* y, int64_t ldy) {
    const size_t es = D == DType::F32 ? 4 : 2;
    auto wptr = [&](int64_t n) { return static_cast<const char*>(W) + size_t(n * ldw) * es; };
    int64_t n = n0;
    for (; n + NR <= n1; n += NR)
        tile<MR, NR, D>(x, ldx, K, wptr(n), ldw, bias ? bias + n : nullptr, y + n, ldy);
    for (; n < n1; ++n)
        tile<MR, 1, D>(x, ldx, K, wptr(n), ldw, bias ? bias + n : nullptr, y + n, ldy);
}

// GEMV: M <= 8 rows; weight rows widened on the fly; threads split N in chunks of 16 rows.
template <int MR, DType D>
MAMBART_AVX2 void gemv(const float* x, int64_t ldx, int64_t K, const void* W, int64_t N,
                       const float* bias, float* y, int64_t ldy) {
    constexpr int NR = MR == 1 ? 4 : MR <= 2 ? 4 : MR <= 4 ? 2 : 1;
    constexpr int64_t kChunk = 16;
    const int64_t chunks = (N + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) if (N * K > 32768)
    for (int64_t c = 0; c < chunks; ++c) {
        const int64_t n0 = c * kChunk, n1 = std::min(N, n0 + kChunk);
        sweep_n<MR, NR, D>(x, ldx, K, W, K, n0, n1, bias, y, ldy);
    }
}

template <DType D>
MAMBART_AVX2 void gemv_dispatch(const float* x, int64_t ldx, int64_t M, int64_t K, const void* W,
                                int64_t N, const float* bias, float* y, int64_t ldy) {
    switch (M) {
        case 1: gemv<1, D>(x, ldx, K, W, N, bias, y, ldy); break;
        case 2: gemv<2, D>(x, ldx, K, W, N, bias, y, ldy); break;
        case 3: gemv<3, D>(x, ldx, K, W, N, bias, y, ldy); break;
        case 4: gemv<4, D>(x, ldx, K, W, N, bias, y, ldy); break;
        case 5: gemv<5, D>(x, ldx, K, W, N, bias, y, ldy); break;
        case 6: gemv<6, D>(x, ldx, K, W, N, bias, y, ldy); break;
        case 7: gemv<7, D>(x, ldx, K, W, N, bias, y, ldy); break;
        default: gemv<8, D>(x, ldx, K, W, N, bias, y, ldy); break;
    }
}

// GEMM micro-kernel, outer-product form: acc[i][v] (MR rows x 16 columns) += x[i][k] * wp[k][16].
// wp is a packed panel of 16 weight rows, transposed to (K, 16) fp32, so each k step loads two
// vectors of weights and broadcasts MR activations: 2 loads + MR broadcasts per 2*MR FMAs.
template <int MR>
MAMBART_AVX2 inline void panel_tile(const float* x, int64_t ldx, int64_t K, const float* wp,
                                    const float* bias, float* y, int64_t ldy, int64_t ncols) {
    static_assert(MR >= 1 && MR <= 6, "panel_tile: 1..6 rows");
    // Named accumulators (an array of __m256 gets spilled to the stack every k step by GCC).
    __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00,
           a30 = a00, a31 = a00, a40 = a00, a41 = a00, a50 = a00, a51 = a00;
    const float* x0 = x;
    const float* x1 = x + 1 * ldx;
    const float* x2 = x + 2 * ldx;
    const float* x3 = x + 3 * ldx;
    const float* x4 = x + 4 * ldx;
    const float* x5 = x + 5 * ldx;
    // Sums run in blocks of kKBlock k-steps, each block's sum added into `tot`: the rounding
    // error grows with K / kKBlock + kKBlock rather than with K (a long fp32 chain over K = 1536
    // doubled the model's error against a float64 reference).
    constexpr int64_t kKBlock = 64;
    __m256 tot[6][2];
    for (int i = 0; i < 6; ++i) tot[i][0] = tot[i][1] = _mm256_setzero_ps();
    for (int64_t kb = 0; kb < K; kb += kKBlock) {
        const int64_t ke = std::min(K, kb + kKBlock);
        for (int64_t k = kb; k < ke; ++k) {
            const __m256 w0 = _mm256_loadu_ps(wp + k * 16), w1 = _mm256_loadu_ps(wp + k * 16 + 8);
            __m256 xv = _mm256_broadcast_ss(x0 + k);
            a00 = _mm256_fmadd_ps(xv, w0, a00);
            a01 = _mm256_fmadd_ps(xv, w1, a01);
            if (MR > 1) {
                xv = _mm256_broadcast_ss(x1 + k);
                a10 = _mm256_fmadd_ps(xv, w0, a10);
                a11 = _mm256_fmadd_ps(xv, w1, a11);
            }
            if (MR > 2) {
                xv = _mm256_broadcast_ss(x2 + k);
                a20 = _mm256_fmadd_ps(xv, w0, a20);
                a21 = _mm256_fmadd_ps(xv, w1, a21);
            }
            if (MR > 3) {
                xv = _mm256_broadcast_ss(x3 + k);
                a30 = _mm256_fmadd_ps(xv, w0, a30);
                a31 = _mm256_fmadd_ps(xv, w1, a31);
            }
            if (MR > 4) {
                xv = _mm256_broadcast_ss(x4 + k);
                a40 = _mm256_fmadd_ps(xv, w0, a40);
                a41 = _mm256_fmadd_ps(xv, w1, a41);
            }
            if (MR > 5) {
                xv = _mm256_broadcast_ss(x5 + k);
                a50 = _mm256_fmadd_ps(xv, w0, a50);
                a51 = _mm256_fmadd_ps(xv, w1, a51);
            }
        }
        const __m256 blk[6][2] = {{a00, a01}, {a10, a11}, {a20, a21},
                                  {a30, a31}, {a40, a41}, {a50, a51}};
        for (int i = 0; i < MR; ++i) {
            tot[i][0] = _mm256_add_ps(tot[i][0], blk[i][0]);
            tot[i][1] = _mm256_add_ps(tot[i][1], blk[i][1]);
        }
        a00 = a01 = a10 = a11 = a20 = a21 = a30 = a31 = a40 = a41 = a50 = a51 =
            _mm256_setzero_ps();
    }
    alignas(32) float out[16];
    for (int i = 0; i < MR; ++i) {
        _mm256_store_ps(out, tot[i][0]);
        _mm256_store_ps(out + 8, tot[i][1]);
        float* yi = y + i * ldy;
        for (int64_t j = 0; j < ncols; ++j) yi[j] = out[j] + (bias ? bias[j] : 0.0f);
    }
}

// Packs weight rows [n0, n0 + ncols) (ncols <= 16) into wp (K, 16) fp32, zero-padded.
template <DType D>
MAMBART_AVX2 void pack_panel(const void* W, int64_t K, int64_t n0, int64_t ncols, float* wp) {
    const size_t es = D == DType::F32 ? 4 : 2;
    for (int64_t j = 0; j < 16; ++j) {
        if (j >= ncols) {
            for (int64_t k = 0; k < K; ++k) wp[k * 16 + j] = 0.0f;
            continue;
        }
        const void* row = static_cast<const char*>(W) + size_t((n0 + j) * K) * es;
        int64_t k = 0;
        alignas(32) float tmp[8];
        for (; k + 8 <= K; k += 8) {
            _mm256_store_ps(tmp, load8<D>(row, k));
            for (int q = 0; q < 8; ++q) wp[(k + q) * 16 + j] = tmp[q];
        }
        for (; k < K; ++k) wp[k * 16 + j] = load1<D>(row, k);
    }
}

// GEMM: threads split N into panels of 16 weight rows; each panel is widened and packed once
// (K x 16 fp32, thread-local), then every 6-row tile of x runs the outer-product micro-kernel
// over it.
template <DType D>
MAMBART_AVX2 void gemm(const float* x, int64_t ldx, int64_t M, int64_t K, const void* W,
                       int64_t N, const float* bias, float* y, int64_t ldy) {
    constexpr int MR = 6;
    const int64_t npanels = (N + 15) / 16;
#pragma omp parallel
    {
        // (K, 16) packed panel; thread-local and grown once, so decode at batch > kGemvMaxM
        // allocates nothing per step.
        thread_local std::vector<float> wp;
        if (wp.size() < static_cast<size_t>(K * 16)) wp.resize(static_cast<size_t>(K * 16));
#pragma omp for schedule(dynamic, 1)
        for (int64_t pnl = 0; pnl < npanels; ++pnl) {
            const int64_t n0 = pnl * 16, nc = std::min<int64_t>(16, N - n0);
            pack_panel<D>(W, K, n0, nc, wp.data());
            const float* bb = bias ? bias + n0 : nullptr;
            int64_t m = 0;
            for (; m + MR <= M; m += MR)
                panel_tile<MR>(x + m * ldx, ldx, K, wp.data(), bb, y + m * ldy + n0, ldy, nc);
            switch (M - m) {
                case 5: panel_tile<5>(x + m * ldx, ldx, K, wp.data(), bb, y + m * ldy + n0, ldy, nc); break;
                case 4: panel_tile<4>(x + m * ldx, ldx, K, wp.data(), bb, y + m * ldy + n0, ldy, nc); break;
                case 3: panel_tile<3>(x + m * ldx, ldx, K, wp.data(), bb, y + m * ldy + n0, ldy, nc); break;
                case 2: panel_tile<2>(x + m * ldx, ldx, K, wp.data(), bb, y + m * ldy + n0, ldy, nc); break;
                case 1: panel_tile<1>(x + m * ldx, ldx, K, wp.data(), bb, y + m * ldy + n0, ldy, nc); break;
                default: break;
            }
        }
    }
}

template <DType D>
MAMBART_AVX2 void linear_avx2(const float* x, int64_t ldx, int64_t M, int64_t K, const void* W,
                              int64_t N, const float* bias, float* y, int64_t ldy) {
    if (M <= kGemvMaxM)
        gemv_dispatch<D>(x, ldx, M, K, W, N, bias, y, ldy);
    else
        gemm<D>(x, ldx, M, K, W, N, bias, y, ldy);
}

bool have_avx2() {
    // The cpu_portable option (MAMBART_CPU_PORTABLE=1) forces the portable path (to test it on
    // an AVX2 machine).
    static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                           __builtin_cpu_supports("f16c") && !runtime_options().cpu_portable;
    return ok;
}

#endif  // MAMBART_X86

}  // namespace

void linear(const float* x, int64_t ldx, int64_t M, int64_t K, const void* W, DType w_dtype,
            int64_t N, const float* bias, float* y, int64_t ldy) {
    if (M <= 0 || N <= 0) return;
    if (K == 0) {  // an empty sum: y = bias
        for (int64_t m = 0; m < M; ++m)
            for (int64_t n = 0; n < N; ++n) y[m * ldy + n] = bias ? bias[n] : 0.0f;
        return;
    }
#ifdef MAMBART_X86
    if (have_avx2()) {
        switch (w_dtype) {
            case DType::F32: return linear_avx2<DType::F32>(x, ldx, M, K, W, N, bias, y, ldy);
            case DType::F16: return linear_avx2<DType::F16>(x, ldx, M, K, W, N, bias, y, ldy);
            case DType::BF16: return linear_avx2<DType::BF16>(x, ldx, M, K, W, N, bias, y, ldy);
        }
    }
#endif
    linear_portable(x, ldx, M, K, W, w_dtype, N, bias, y, ldy);
}

}  // namespace cpu
}  // namespace mambart

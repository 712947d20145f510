// CPU projections: y[M, N] = x[M, K] · W[N, K]ᵀ + bias[N]   (see linear.h)
//
// Both regimes are written as register-tiled dot products: a micro-kernel computes an MR x NR
// block of y (MR activation rows x NR weight rows) over the whole K, 8 lanes at a time, with
// MR*NR vector accumulators and one horizontal sum per output at the end.
//   - GEMV (M <= kGemvMaxM, decode): weight rows are widened to fp32 on the fly, each weight
//     row read from memory once per call; threads split the N weight rows.
//   - GEMM (M > kGemvMaxM, prefill): threads split N into blocks of kNBlock weight rows; each
//     thread widens its block to fp32 once into thread-local scratch, then sweeps every MR-row
//     tile of x over it, so the conversion is amortised over M.
// The AVX2 + FMA (+ F16C) path is picked at run time (__builtin_cpu_supports), so one binary
// runs on any x86-64; other machines take the portable path, which computes the same sums.
#include "cpu/linear.h"

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
constexpr int64_t kNBlock = 48;    // GEMM: weight rows widened per block (a multiple of NR)

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
        std::vector<float> wrow(static_cast<size_t>(K));  // (K) one weight row widened to fp32
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

// Widens weight rows [n0, n1) into fp32 scratch (rows of K floats).
template <DType D>
MAMBART_AVX2 void widen_rows(const void* W, int64_t K, int64_t n0, int64_t n1, float* dst) {
    if constexpr (D == DType::F32) {
        std::memcpy(dst, static_cast<const float*>(W) + n0 * K, size_t((n1 - n0) * K) * 4);
    } else {
        const uint16_t* src = static_cast<const uint16_t*>(W) + n0 * K;
        const int64_t total = (n1 - n0) * K;
        int64_t i = 0;
        for (; i + 8 <= total; i += 8) _mm256_storeu_ps(dst + i, load8<D>(src, i));
        for (; i < total; ++i) dst[i] = load1<D>(src, i);
    }
}

// GEMM: threads split N into blocks of kNBlock rows; each block is widened to fp32 once and
// every 4-row tile of x is swept over it with 4 x 3 register tiles.
template <DType D>
MAMBART_AVX2 void gemm(const float* x, int64_t ldx, int64_t M, int64_t K, const void* W,
                       int64_t N, const float* bias, float* y, int64_t ldy) {
    constexpr int MR = 4, NR = 3;
    const int64_t nblocks = (N + kNBlock - 1) / kNBlock;
#pragma omp parallel
    {
        std::vector<float> wblk(static_cast<size_t>(kNBlock * K));  // (kNBlock, K) widened weight rows
#pragma omp for schedule(dynamic, 1)
        for (int64_t b = 0; b < nblocks; ++b) {
            const int64_t n0 = b * kNBlock, n1 = std::min(N, n0 + kNBlock);
            widen_rows<D>(W, K, n0, n1, wblk.data());
            const float* bb = bias ? bias + n0 : nullptr;
            int64_t m = 0;
            for (; m + MR <= M; m += MR)
                sweep_n<MR, NR, DType::F32>(x + m * ldx, ldx, K, wblk.data(), K, 0, n1 - n0, bb,
                                            y + m * ldy + n0, ldy);
            for (; m < M; ++m)
                sweep_n<1, 4, DType::F32>(x + m * ldx, ldx, K, wblk.data(), K, 0, n1 - n0, bb,
                                          y + m * ldy + n0, ldy);
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
    // MAMBART_CPU_PORTABLE=1 forces the portable path (to test it on an AVX2 machine).
    static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                           __builtin_cpu_supports("f16c") && !std::getenv("MAMBART_CPU_PORTABLE");
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

// CPU projections: y[M, N] = x[M, K] · W[N, K]ᵀ + bias[N]   (see linear.h)
//
// Both regimes are register-tiled micro-kernels over the whole K (no K blocking: K <= a few
// thousand, so a panel stays in L2).
//   - GEMV (M <= kGemvMaxM = 16: decode, speculative verification passes): weight rows are
//     widened to fp32 on the fly, each weight row read from memory once per call (the rows of
//     x in blocks of 8 over each chunk of weight rows), every output summed as at M = 1;
//     threads split the N weight rows. On CPUs with AVX-512 F + DQ the GEMV runs in 16-lane
//     registers with the same sums (avx512 below).
//   - GEMM (M > kGemvMaxM, prefill): threads split N into panels of 16 weight rows; each panel
//     is widened to fp32 and packed transposed (K, 16) once into thread-local scratch, then
//     every tile of kGemmRows rows of x (6 on x86-64, 4 on aarch64) runs an outer-product
//     micro-kernel (kGemmRows x 16 accumulators) over it, so the conversion is amortised over M.
//     On CPUs with AVX-512 F + DQ the micro-kernel holds a panel's 16 columns in one 512-bit
//     register per row of x, 12 rows a tile, with the same sums (avx512::gemm).
// The kernels are written once (cpu/linear_simd.inc) over an 8-lane vector and compiled here
// for AVX2 + FMA + F16C (x86-64, function-level target attributes) and NEON (aarch64); on
// aarch64 CPUs with BF16 the bf16 weights' GEMM has a BFMMLA kernel of its own (neon_bf16
// below). The instruction set is chosen at run time from the CPU (CPUID, HWCAP / HWCAP2), never
// from the compiler flags, so one binary runs on any x86-64 or aarch64 CPU; elsewhere, or with
// the cpu_portable option, the generic scalar path runs (the same sums in another order).
#include "cpu/linear.h"
#include "cpu/pool.h"
#include "error.h"
#include "options.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#if defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define MAMBART_X86 1
#elif defined(__aarch64__)
#include <arm_neon.h>
#include <sys/auxv.h>
#define MAMBART_ARM64 1
#endif

namespace mambart {
namespace cpu {
namespace {

// Up to this many rows: the GEMV path (weights streamed once, each output summed as at M = 1).
// 16: a speculative verification pass of up to 16 tokens (k <= 15) gets a decode step's sums.
constexpr int64_t kGemvMaxM = 16;
// The quantized GEMVs (int8 / int4) take up to 8 rows; more rows take the quantized GEMM.
constexpr int64_t kQuantGemvMaxM = 8;

// The GEMV tiles prefetch the weights at least this many bytes ahead of the rows they read (the
// same place in the next tile's rows, or further where a tile is smaller): int4 rows of a
// d_model 768 matrix are 384 bytes, so a tile of 4 rows ahead was 1.5 KB, too close to cover
// the memory latency at full bandwidth; 8 KB measured best (mamba-130m int4 decode on one core
// of an EPYC: 4.2-4.5 -> 2.6-2.8 ms/token; 4, 12, 16 and 32 KB no better; issue 18).
constexpr size_t kPrefetchMinBytes = 8192;
inline size_t prefetch_ahead(size_t tile_bytes) { return std::max(tile_bytes, kPrefetchMinBytes); }

// ---- portable path ---------------------------------------------------------------------------

inline float load_w(const void* W, DType dt, size_t i) {
    switch (dt) {
        case DType::F32: return static_cast<const float*>(W)[i];
        case DType::F16: return f16_to_f32(static_cast<const uint16_t*>(W)[i]);
        case DType::BF16: return bf16_to_f32(static_cast<const uint16_t*>(W)[i]);
        default: break;
    }
    return 0.0f;
}

void linear_portable(const float* x, int64_t ldx, int64_t M, int64_t K, const void* W, DType dt,
                     int64_t N, const float* bias, float* y, int64_t ldy) {
    parallel_for(N, 1, [&](int64_t n0, int64_t n1) {
        thread_local std::vector<float> wrow;  // (K) one weight row widened to fp32, grown once
        if (wrow.size() < static_cast<size_t>(K)) wrow.resize(static_cast<size_t>(K));
        for (int64_t n = n0; n < n1; ++n) {
            for (int64_t k = 0; k < K; ++k) wrow[size_t(k)] = load_w(W, dt, size_t(n * K + k));
            const float b = bias ? bias[n] : 0.0f;
            for (int64_t m = 0; m < M; ++m) {
                const float* xm = x + m * ldx;
                float acc = 0.0f;
                for (int64_t k = 0; k < K; ++k) acc += xm[k] * wrow[size_t(k)];
                y[m * ldy + n] = acc + b;
            }
        }
    });
}

// Row n of a quantized weight dequantized, scalar: out (K) fp32 (layouts in op_params.h).
void dequant_row_portable(const Weight& W, int64_t n, float* out) {
    const int64_t K = W.cols, groups = K / W.group;
    const float* sc = W.scales + n * groups;
    if (W.quant == QuantScheme::Int8) {
        const int8_t* r = static_cast<const int8_t*>(W.data) + n * K;
        for (int64_t k = 0; k < K; ++k) out[k] = float(r[k]) * sc[0];
        return;
    }
    const uint8_t* r = static_cast<const uint8_t*>(W.data) + n * (K / 2);
    for (int64_t k = 0; k < K; k += 32)
        for (int64_t j = 0; j < 16; ++j) {
            const uint8_t b = r[k / 2 + j];
            out[k + j] = float(int(b & 15) - 8) * sc[k / W.group];
            out[k + 16 + j] = float(int(b >> 4) - 8) * sc[(k + 16) / W.group];
        }
}

void linear_quant_portable(const float* x, int64_t ldx, int64_t M, const Weight& W, int64_t N,
                           const float* bias, float* y, int64_t ldy) {
    const int64_t K = W.cols;
    parallel_for(N, 1, [&](int64_t n0, int64_t n1) {
        thread_local std::vector<float> wrow;  // (K) one weight row dequantized, grown once
        if (wrow.size() < static_cast<size_t>(K)) wrow.resize(static_cast<size_t>(K));
        for (int64_t n = n0; n < n1; ++n) {
            dequant_row_portable(W, n, wrow.data());
            const float b = bias ? bias[n] : 0.0f;
            for (int64_t m = 0; m < M; ++m) {
                const float* xm = x + m * ldx;
                float acc = 0.0f;
                for (int64_t k = 0; k < K; ++k) acc += xm[k] * wrow[size_t(k)];
                y[m * ldy + n] = acc + b;
            }
        }
    });
}

// Thread-local (n) scratch of T, one buffer a (T, Tag) and thread, grown once (never shrunk), so
// decode at batch > kGemvMaxM allocates nothing per step.
template <typename T, int Tag>
T* thread_scratch(int64_t n) {
    thread_local std::vector<T> v;
    if (v.size() < static_cast<size_t>(n)) v.resize(static_cast<size_t>(n));
    return v.data();
}
// The GEMM's packed panel (n floats).
float* panel_scratch(int64_t n) { return thread_scratch<float, 0>(n); }

#ifdef MAMBART_X86

// ---- AVX2 + FMA + F16C (x86-64) ----------------------------------------------------------------

namespace avx2 {

#define MAMBART_SIMD __attribute__((target("avx2,fma,f16c"), always_inline))

typedef __m256 V8;
MAMBART_SIMD inline V8 v_zero() { return _mm256_setzero_ps(); }
MAMBART_SIMD inline V8 v_load(const float* p) { return _mm256_loadu_ps(p); }
MAMBART_SIMD inline V8 v_bcast(float s) { return _mm256_set1_ps(s); }
MAMBART_SIMD inline V8 v_fma(V8 a, V8 b, V8 c) { return _mm256_fmadd_ps(a, b, c); }
MAMBART_SIMD inline V8 v_add(V8 a, V8 b) { return _mm256_add_ps(a, b); }
MAMBART_SIMD inline void v_store(float* p, V8 v) { _mm256_storeu_ps(p, v); }
constexpr int kGemmRows = 6;  // 12 accumulators + 2 weight vectors + a broadcast: 15 of 16 ymm
MAMBART_SIMD inline void v_store_t4(float* p, int64_t ld, V8 r0, V8 r1, V8 r2, V8 r3) {
    for (int half = 0; half < 2; ++half) {
        __m128 a = half ? _mm256_extractf128_ps(r0, 1) : _mm256_castps256_ps128(r0);
        __m128 b = half ? _mm256_extractf128_ps(r1, 1) : _mm256_castps256_ps128(r1);
        __m128 c = half ? _mm256_extractf128_ps(r2, 1) : _mm256_castps256_ps128(r2);
        __m128 d = half ? _mm256_extractf128_ps(r3, 1) : _mm256_castps256_ps128(r3);
        _MM_TRANSPOSE4_PS(a, b, c, d);
        float* q = p + half * 4 * ld;
        _mm_storeu_ps(q, a);
        _mm_storeu_ps(q + ld, b);
        _mm_storeu_ps(q + 2 * ld, c);
        _mm_storeu_ps(q + 3 * ld, d);
    }
}
typedef const float* X4;
MAMBART_SIMD inline X4 x4_load(const float* p) { return p; }
template <int L>
MAMBART_SIMD inline V8 v_fma_lane(X4 q, V8 w, V8 c) {
    return _mm256_fmadd_ps(_mm256_broadcast_ss(q + L), w, c);
}
MAMBART_SIMD inline float v_hsum(V8 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
template <DType D>
MAMBART_SIMD inline V8 v_load_w(const void* row, int64_t k) {
    if constexpr (D == DType::F32) {
        return _mm256_loadu_ps(static_cast<const float*>(row) + k);
    } else {
        const __m128i h = _mm_loadu_si128(
            reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(row) + k));
        if constexpr (D == DType::F16) return _mm256_cvtph_ps(h);
        else return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
}
MAMBART_SIMD inline V8 v_load_q8(const int8_t* p) {
    return _mm256_cvtepi32_ps(
        _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
MAMBART_SIMD inline void v_load_q4(const uint8_t* p, V8& lo, V8& hi) {
    const __m256i b =
        _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    const __m256i eight = _mm256_set1_epi32(8);
    lo = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(b, _mm256_set1_epi32(15)), eight));
    hi = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(b, 4), eight));
}
#undef MAMBART_SIMD
#define MAMBART_SIMD __attribute__((target("avx2,fma,f16c")))
#include "cpu/linear_simd.inc"
#undef MAMBART_SIMD

}  // namespace avx2

// ---- AVX-512 (x86-64 with AVX-512 F + DQ): the GEMV -------------------------------------------
// The same sums as the AVX2 GEMV, lane for lane and in the same order, twice as many per
// instruction: a 16-lane register holds the 8-lane accumulators of two weight rows side by side
// (lanes 0..7 row j, 8..15 row j + 1), each multiplied by the same 8 activations (broadcast to
// both halves), and each half reduced by the AVX2 kernel's v_hsum order at the end. So every
// output is bit for bit the AVX2 path's (and the NEON path's), at every M: only the instruction
// count changes (a verification pass of 8 tokens is compute-bound on one core; issue 25). It
// runs for 2 to kGemvMaxM rows: one row (decode) and the GEMM (M > kGemvMaxM) keep the AVX2
// kernels.

namespace avx512 {

#define MAMBART_SIMD512 __attribute__((target("avx512f,avx512dq,avx2,fma,f16c"), always_inline))

// Weights k..k+8 of rows r0 (lanes 0..7) and r1 (lanes 8..15), widened to fp32 (exact).
template <DType D>
MAMBART_SIMD512 inline __m512 load_pair(const void* r0, const void* r1, int64_t k) {
    if constexpr (D == DType::F32) {
        return _mm512_insertf32x8(
            _mm512_castps256_ps512(_mm256_loadu_ps(static_cast<const float*>(r0) + k)),
            _mm256_loadu_ps(static_cast<const float*>(r1) + k), 1);
    } else {
        const __m256i h = _mm256_inserti128_si256(
            _mm256_castsi128_si256(_mm_loadu_si128(
                reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(r0) + k))),
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(r1) + k)),
            1);
        if constexpr (D == DType::F16) return _mm512_cvtph_ps(h);
        else return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
}

// avx2::v_hsum of the 8 halves of four accumulators at once, in its order
// ((v0 + v4) + (v2 + v6)) + ((v1 + v5) + (v3 + v7)) (every add of its tree, done for all eight
// halves by one instruction): out = [a.lo, a.hi, b.lo, b.hi, c.lo, c.hi, d.lo, d.hi].
// Quarters (128 bits) of a: a0 a1 (row lo: lanes 0..3, 4..7), a2 a3 (row hi).
MAMBART_SIMD512 inline void hsum8x8(__m512 a, __m512 b, __m512 c, __m512 d, float* out) {
    // s = v_0..3 + v_4..7 of each half: [a0+a1, a2+a3, b0+b1, b2+b3], likewise c, d
    const __m512 sab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x88),   // a0 a2 b0 b2
                                     _mm512_shuffle_f32x4(a, b, 0xDD));  // a1 a3 b1 b3
    const __m512 scd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x88),
                                     _mm512_shuffle_f32x4(c, d, 0xDD));
    // t = (s0 + s2, s1 + s3) per quarter: lanes 0, 1 from sab, lanes 2, 3 from scd
    const __m512 t = _mm512_add_ps(_mm512_shuffle_ps(sab, scd, 0x44),   // s0 s1 | s0 s1
                                   _mm512_shuffle_ps(sab, scd, 0xEE));  // s2 s3 | s2 s3
    // r = t0 + t1 in lanes 0 and 2 of each quarter
    const __m512 r = _mm512_add_ps(t, _mm512_movehdup_ps(t));
    const __m512i idx = _mm512_setr_epi32(0, 4, 8, 12, 2, 6, 10, 14, 0, 0, 0, 0, 0, 0, 0, 0);
    _mm256_storeu_ps(out, _mm512_castps512_ps256(_mm512_permutexvar_ps(idx, r)));
}

// out[i][j] = Σ_k x[i][k] · w_j[k] for MR rows of x and `rows` (<= 2 NP) weight rows from w
// (row stride ldw elements; a missing row of the last pair reads row 0 again, never stored);
// y[i * ldy + j] = out + bias[j]. As avx2::tile: a cache line of every row at a time with the
// line 2 NP rows further on prefetched, the K % 8 tail one product at a time after the sums.
template <int MR, int NP, DType D>
MAMBART_SIMD512 inline void tile(const float* x, int64_t ldx, int64_t K, const void* w,
                                 int64_t ldw, int rows, const float* bias, float* y,
                                 int64_t ldy) {
    constexpr size_t es = D == DType::F32 ? 4 : 2;
    const char* wr[2 * NP];
    for (int j = 0; j < 2 * NP; ++j)
        wr[j] = static_cast<const char*>(w) + size_t((j < rows ? j : 0) * ldw) * es;
    __m512 acc[MR][NP];
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
        for (int p = 0; p < NP; ++p) acc[i][p] = _mm512_setzero_ps();
    constexpr int64_t kLine = 64 / int64_t(es);
    const size_t ahead = prefetch_ahead(size_t(2 * NP * ldw) * es);
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        if (k % kLine == 0)
#pragma GCC unroll 8
            for (int j = 0; j < 2 * NP; ++j) __builtin_prefetch(wr[j] + ahead + size_t(k) * es, 0, 3);
        __m512 wv[NP];
#pragma GCC unroll 4
        for (int p = 0; p < NP; ++p) wv[p] = load_pair<D>(wr[2 * p], wr[2 * p + 1], k);
#pragma GCC unroll 8
        for (int i = 0; i < MR; ++i) {
            const __m512 xv = _mm512_broadcast_f32x8(_mm256_loadu_ps(x + i * ldx + k));
#pragma GCC unroll 4
            for (int p = 0; p < NP; ++p) acc[i][p] = _mm512_fmadd_ps(xv, wv[p], acc[i][p]);
        }
    }
    // The horizontal sums four accumulators at a time (the last group padded by repeats).
    constexpr int kAcc = MR * NP, kGroups = (kAcc + 3) / 4;
    float sums[MR][2 * NP];
    float red[kGroups * 4][2];  // (accumulator, half)
#pragma GCC unroll 4
    for (int g = 0; g < kGroups; ++g) {
        const int q0 = 4 * g, q1 = q0 + 1 < kAcc ? q0 + 1 : q0, q2 = q0 + 2 < kAcc ? q0 + 2 : q0,
                  q3 = q0 + 3 < kAcc ? q0 + 3 : q0;
        hsum8x8(acc[q0 / NP][q0 % NP], acc[q1 / NP][q1 % NP], acc[q2 / NP][q2 % NP],
                acc[q3 / NP][q3 % NP], red[q0]);
    }
    for (int i = 0; i < MR; ++i)
        for (int p = 0; p < NP; ++p) {
            sums[i][2 * p] = red[i * NP + p][0];
            sums[i][2 * p + 1] = red[i * NP + p][1];
        }
    for (int i = 0; i < MR; ++i)
        for (int j = 0; j < rows; ++j) {
            float s = sums[i][j];
            for (int64_t kk = k; kk < K; ++kk) {
                const float wk = D == DType::F32 ? reinterpret_cast<const float*>(wr[j])[kk]
                                 : D == DType::F16
                                     ? f16_to_f32(reinterpret_cast<const uint16_t*>(wr[j])[kk])
                                     : bf16_to_f32(reinterpret_cast<const uint16_t*>(wr[j])[kk]);
                s += x[i * ldx + kk] * wk;
            }
            y[i * ldy + j] = s + (bias ? bias[j] : 0.0f);
        }
}

// Rows [0, MR) of x against weight rows [n0, n1): tiles of 2 NP rows, then pairs, then one row.
template <int MR, DType D>
__attribute__((target("avx512f,avx512dq,avx2,fma,f16c"))) void sweep(
    const float* x, int64_t ldx, int64_t K, const void* W, int64_t n0, int64_t n1,
    const float* bias, float* y, int64_t ldy) {
    constexpr int NP = MR <= 4 ? 4 : 2;  // accumulators: MR x NP <= 16 of 32 registers
    constexpr size_t es = D == DType::F32 ? 4 : 2;
    const char* w = static_cast<const char*>(W);
    auto at = [&](int64_t n) { return w + size_t(n * K) * es; };
    int64_t n = n0;
    for (; n + 2 * NP <= n1; n += 2 * NP)
        tile<MR, NP, D>(x, ldx, K, at(n), K, 2 * NP, bias ? bias + n : nullptr, y + n, ldy);
    for (; n < n1; n += 2) {
        const int rows = n + 2 <= n1 ? 2 : 1;
        tile<MR, 1, D>(x, ldx, K, at(n), K, rows, bias ? bias + n : nullptr, y + n, ldy);
    }
}

// GEMV, M <= kGemvMaxM: as linear_simd.inc's gemv (chunks of 16 weight rows split by the
// threads, the rows of x in blocks of at most 8 within a chunk).
template <DType D>
__attribute__((target("avx512f,avx512dq,avx2,fma,f16c"))) void gemv(
    const float* x, int64_t ldx, int64_t M, int64_t K, const void* W, int64_t N,
    const float* bias, float* y, int64_t ldy) {
    constexpr int64_t kChunk = 16;
    const int64_t chunks = (N + kChunk - 1) / kChunk;
    const int64_t grain = N * K > 32768 ? (32768 + kChunk * K - 1) / (kChunk * K) : chunks;
    parallel_for(chunks, grain, [&](int64_t c0, int64_t c1) {
        const int64_t n0 = c0 * kChunk, n1 = c1 * kChunk < N ? c1 * kChunk : N;
        for (int64_t m0 = 0; m0 < M; m0 += 8) {
            const float* xm = x + m0 * ldx;
            float* ym = y + m0 * ldy;
            switch (M - m0 < 8 ? M - m0 : 8) {
                case 1: sweep<1, D>(xm, ldx, K, W, n0, n1, bias, ym, ldy); break;
                case 2: sweep<2, D>(xm, ldx, K, W, n0, n1, bias, ym, ldy); break;
                case 3: sweep<3, D>(xm, ldx, K, W, n0, n1, bias, ym, ldy); break;
                case 4: sweep<4, D>(xm, ldx, K, W, n0, n1, bias, ym, ldy); break;
                case 5: sweep<5, D>(xm, ldx, K, W, n0, n1, bias, ym, ldy); break;
                case 6: sweep<6, D>(xm, ldx, K, W, n0, n1, bias, ym, ldy); break;
                case 7: sweep<7, D>(xm, ldx, K, W, n0, n1, bias, ym, ldy); break;
                default: sweep<8, D>(xm, ldx, K, W, n0, n1, bias, ym, ldy); break;
            }
        }
    });
}

// ---- AVX-512 GEMM (M > kGemvMaxM: prefill, large batches) ----
// As avx2's gemm (linear_simd.inc): panels of 16 weight rows widened and packed (K, 16) by
// avx2::pack_panel, then an outer-product micro-kernel; here the panel's 16 columns are the 16
// lanes of one 512-bit accumulator per row of x instead of two 256-bit ones. Every output's sum
// is formed as there (k in order within blocks of 64, each block's sum added into a running
// total, the bias last), so the bits are the AVX2 GEMM's; only the vector width and the tile
// height (12 rows of x: 12 accumulators + 12 totals in 32 registers) change.
constexpr int kGemmRows512 = 12;

template <int MR>
MAMBART_SIMD512 inline void panel_tile(const float* x, int64_t ldx, int64_t K, const float* wp,
                                       const float* bias, float* y, int64_t ldy,
                                       int64_t ncols) {
    constexpr int64_t kKBlock = 64;  // as avx2::panel_tile
    __m512 tot[MR], acc[MR];
#pragma GCC unroll 12
    for (int i = 0; i < MR; ++i) tot[i] = _mm512_setzero_ps();
    for (int64_t kb = 0; kb < K; kb += kKBlock) {
        const int64_t ke = K < kb + kKBlock ? K : kb + kKBlock;
#pragma GCC unroll 12
        for (int i = 0; i < MR; ++i) acc[i] = _mm512_setzero_ps();
        for (int64_t k = kb; k < ke; ++k) {
            const __m512 w = _mm512_loadu_ps(wp + k * 16);
#pragma GCC unroll 12
            for (int i = 0; i < MR; ++i)
                acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(x[i * ldx + k]), w, acc[i]);
        }
#pragma GCC unroll 12
        for (int i = 0; i < MR; ++i) tot[i] = _mm512_add_ps(tot[i], acc[i]);
    }
    alignas(64) float out[16];
    for (int i = 0; i < MR; ++i) {
        _mm512_store_ps(out, tot[i]);
        float* yi = y + i * ldy;
        for (int64_t j = 0; j < ncols; ++j) yi[j] = out[j] + (bias ? bias[j] : 0.0f);
    }
}

template <int R>
MAMBART_SIMD512 inline void panel_rows(const float* x, int64_t ldx, int64_t K, const float* wp,
                                       const float* bias, float* y, int64_t ldy, int64_t nc,
                                       int64_t rows) {
    if constexpr (R >= 1) {
        if (rows == R) return panel_tile<R>(x, ldx, K, wp, bias, y, ldy, nc);
        return panel_rows<R - 1>(x, ldx, K, wp, bias, y, ldy, nc, rows);
    }
}

// Every 12-row tile of x (M rows) over one packed panel wp (K, 16) of nc columns: y[:, 0..nc).
MAMBART_SIMD512 inline void panel_tiles(const float* x, int64_t ldx, int64_t M, int64_t K,
                                        const float* wp, const float* bias, float* y,
                                        int64_t ldy, int64_t nc) {
    constexpr int MR = kGemmRows512;
    int64_t m = 0;
    for (; m + MR <= M; m += MR) panel_tile<MR>(x + m * ldx, ldx, K, wp, bias, y + m * ldy, ldy, nc);
    if (m < M) panel_rows<MR - 1>(x + m * ldx, ldx, K, wp, bias, y + m * ldy, ldy, nc, M - m);
}

// Panels [p0, p1): each packed into this thread's scratch, then the row tiles over it.
template <DType D>
__attribute__((target("avx512f,avx512dq,avx2,fma,f16c"))) void gemm_panels(
    const float* x, int64_t ldx, int64_t M, int64_t K, const void* W, int64_t N,
    const float* bias, float* y, int64_t ldy, int64_t p0, int64_t p1) {
    float* wp = panel_scratch(K * 16);  // (K, 16) packed panel, this thread's
    for (int64_t pnl = p0; pnl < p1; ++pnl) {
        const int64_t n0 = pnl * 16, nc = N - n0 < 16 ? N - n0 : 16;
        avx2::pack_panel<D>(W, K, n0, nc, wp);
        panel_tiles(x, ldx, M, K, wp, bias ? bias + n0 : nullptr, y + n0, ldy, nc);
    }
}

// The quantized GEMM's panels [p0, p1): rows dequantized as avx2::qgemm does (the same fp32
// weights), packed, then the row tiles: the bits of avx2::qgemm.
template <QuantScheme Q>
__attribute__((target("avx512f,avx512dq,avx2,fma,f16c"))) void qgemm_panels(
    const float* x, int64_t ldx, int64_t M, const Weight& W, int64_t N, const float* bias,
    float* y, int64_t ldy, int64_t p0, int64_t p1) {
    const int64_t K = W.cols;
    float* wp = panel_scratch(K * 17);  // (K, 16) packed panel, then (K) a row
    float* row = wp + K * 16;
    for (int64_t pnl = p0; pnl < p1; ++pnl) {
        const int64_t n0 = pnl * 16, nc = N - n0 < 16 ? N - n0 : 16;
        for (int64_t j = 0; j < 16; ++j) {
            if (j < nc) {
                avx2::qdequant_row<Q>(W, n0 + j, row);
                for (int64_t k = 0; k < K; ++k) wp[k * 16 + j] = row[k];
            } else {
                for (int64_t k = 0; k < K; ++k) wp[k * 16 + j] = 0.0f;
            }
        }
        panel_tiles(x, ldx, M, K, wp, bias ? bias + n0 : nullptr, y + n0, ldy, nc);
    }
}

template <QuantScheme Q>
void qgemm(const float* x, int64_t ldx, int64_t M, const Weight& W, int64_t N, const float* bias,
           float* y, int64_t ldy) {
    parallel_for((N + 15) / 16, 1, [&](int64_t p0, int64_t p1) {
        qgemm_panels<Q>(x, ldx, M, W, N, bias, y, ldy, p0, p1);
    });
}

template <DType D>
void gemm(const float* x, int64_t ldx, int64_t M, int64_t K, const void* W, int64_t N,
          const float* bias, float* y, int64_t ldy) {
    const int64_t npanels = (N + 15) / 16;
    parallel_for(npanels, 1, [&](int64_t p0, int64_t p1) {
        gemm_panels<D>(x, ldx, M, K, W, N, bias, y, ldy, p0, p1);
    });
}

#undef MAMBART_SIMD512

}  // namespace avx512


// ---- AVX-512 VNNI (x86-64 with AVX512F/BW/VL/VNNI): the quantized GEMV --------------------------
// Decode (M <= kQuantGemvMaxM) with int8 / int4 weights, K % 32 == 0. The fp32 activations are rounded
// to int8 per block of 32, x ~= sx[b] * xq, on the calling thread, once per call; then VPDPBUSD
// (u8 x s8, 32 products a 256-bit instruction, int32 sums) takes the products: int8 weights as
// |w| x sign(x, w), int4 weights as the unsigned nibbles u against xq, the offset of
// Σ (u - 8) xq = Σ u xq - 8 Σ xq added per group from the activations' block sums. Each block's
// int32 sum is scaled by its sx in fp32 (int4: each group's sum then by the group's scale).
// Rounding the activations costs at most half a step, max|x_block| / 254, per activation (the
// bound of tests/test_quant.py); llama.cpp's CPU kernels do the same with its Q8 activation
// blocks of 32. The GEMM (prefill) keeps fp32 activations (linear_simd.inc qgemm).

namespace vnni {

#define MAMBART_VNNI __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))

constexpr int64_t kBlock = 32;  // activations per int8 scale

// The activations of one call, rounded: q (M, K) int8, s (M, K / 32) scales; for int4 weights
// off (M, K / group) = Σ_{blocks b of the group} -8 · sx[b] · Σ_{k in b} xq[k].
// With int4 groups of a multiple of 64 (pairs), also xp: q with each 64 permuted to the order of
// one 32-byte load's nibbles, [b0 k0..16 | b1 k0..16 | b0 k16..32 | b1 k16..32] (b0, b1 the
// pair's two blocks), and s2 (M, K / 64, 8): [sx[b0] x 4 | sx[b1] x 4], the scales of the
// lanes of VPDPBUSD's sums.
struct QX {
    const int8_t* q;
    const float* s;
    const float* off;
    int64_t K, nb, G;
    const int8_t* xp = nullptr;
    const float* s2 = nullptr;
};

MAMBART_VNNI inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// x (M, K) fp32 row stride ldx -> QX in thread-local scratch of the calling thread (grown once).
// group: the int4 group (0 for int8 weights: no offsets).
MAMBART_VNNI QX quantize_x(const float* x, int64_t ldx, int64_t M, int64_t K, int64_t group) {
    thread_local std::vector<int8_t> q;
    thread_local std::vector<float> s, off;
    const int64_t nb = K / kBlock, G = group ? K / group : 0;
    if (q.size() < size_t(M * K)) q.resize(size_t(M * K));
    if (s.size() < size_t(M * nb)) s.resize(size_t(M * nb));
    if (off.size() < size_t(M * G)) off.resize(size_t(M * G));
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    for (int64_t m = 0; m < M; ++m) {
        const float* xr = x + m * ldx;
        for (int64_t g = 0; g < G; ++g) off[size_t(m * G + g)] = 0.0f;
        for (int64_t b = 0; b < nb; ++b) {
            const int64_t k0 = b * kBlock;
            __m256 v[4];
            __m256 mx = _mm256_setzero_ps();
            for (int t = 0; t < 4; ++t) {
                v[t] = _mm256_loadu_ps(xr + k0 + 8 * t);
                mx = _mm256_max_ps(mx, _mm256_and_ps(v[t], absmask));
            }
            __m128 h = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
            h = _mm_max_ps(h, _mm_movehl_ps(h, h));
            h = _mm_max_ss(h, _mm_movehdup_ps(h));
            const float amax = _mm_cvtss_f32(h);
            // a NaN or Inf activation: its block's scale is NaN / Inf, and so is the result
            const bool finite = std::isfinite(amax);
            const __m256 inv = _mm256_set1_ps(amax > 0.0f && finite ? 127.0f / amax : 0.0f);
            __m256i tot = _mm256_setzero_si256();
            for (int t = 0; t < 4; ++t) {
                const __m256i qi = _mm256_cvtps_epi32(_mm256_mul_ps(v[t], inv));
                tot = _mm256_add_epi32(tot, qi);
                _mm256_mask_cvtepi32_storeu_epi8(q.data() + m * K + k0 + 8 * t, 0xff, qi);
            }
            const float sc = finite ? amax / 127.0f : amax;
            s[size_t(m * nb + b)] = sc;
            if (G) {
                __m128i t = _mm_add_epi32(_mm256_castsi256_si128(tot),
                                          _mm256_extracti128_si256(tot, 1));
                t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4e));
                t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xb1));
                off[size_t(m * G + k0 / group)] += -8.0f * sc * float(_mm_cvtsi128_si32(t));
            }
        }
    }
    QX out{q.data(), s.data(), off.data(), K, nb, G};
    if (group && group % 64 == 0) {
        thread_local std::vector<int8_t> xp;
        thread_local std::vector<float> s2;
        const int64_t P = K / 64;
        if (xp.size() < size_t(M * K)) xp.resize(size_t(M * K));
        if (s2.size() < size_t(M * P * 8)) s2.resize(size_t(M * P * 8));
        for (int64_t m = 0; m < M; ++m)
            for (int64_t pr = 0; pr < P; ++pr) {
                const int8_t* src = q.data() + m * K + pr * 64;
                int8_t* dst = xp.data() + m * K + pr * 64;
                std::memcpy(dst, src, 16);            // b0 k0..16
                std::memcpy(dst + 16, src + 32, 16);  // b1 k0..16
                std::memcpy(dst + 32, src + 16, 16);  // b0 k16..32
                std::memcpy(dst + 48, src + 48, 16);  // b1 k16..32
                float* sv = s2.data() + (m * P + pr) * 8;
                for (int l = 0; l < 8; ++l) sv[l] = s[size_t(m * nb + 2 * pr + l / 4)];
            }
        out.xp = xp.data();
        out.s2 = s2.data();
    }
    return out;
}

// int8 weights, MR x NR tile: y[i][j] = ws[j] · Σ_b sx[i][b] · Σ_{k in b} xq[i][k] · q_j[k] (+ bias).
// Two blocks of 32 a step in 512-bit registers (lanes 0..7 of the int32 sums hold block b,
// lanes 8..15 block b + 1, scaled by [sx[b] x 8 | sx[b + 1] x 8]); an odd last block in 256
// bits. The product of u8 |w| and s8 x·sign(w): VPDPBUSD needs one unsigned operand, and
// AVX-512 has no VPSIGNB, so x is negated under the mask of w's sign bits.
template <int MR, int NR>
MAMBART_VNNI inline void tile8(const QX& X, const int8_t* w, const float* ws, const float* bias,
                               float* y, int64_t ldy) {
    const int64_t K = X.K;
    const int64_t ahead = int64_t(prefetch_ahead(size_t(NR * K)));  // bytes ahead of the rows
    __m512 tot[MR][NR];
    for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NR; ++j) tot[i][j] = _mm512_setzero_ps();
    int64_t b = 0;
    for (; b + 2 <= X.nb; b += 2) {
        const int64_t k = b * kBlock;
        for (int j = 0; j < NR; ++j) __builtin_prefetch(w + j * K + k + ahead, 0, 3);
        __m512i aw[NR];
        __mmask64 neg[NR];
        for (int j = 0; j < NR; ++j) {
            const __m512i wv = _mm512_loadu_si512(w + j * K + k);
            aw[j] = _mm512_abs_epi8(wv);
            neg[j] = _mm512_movepi8_mask(wv);
        }
        for (int i = 0; i < MR; ++i) {
            const __m512i xv = _mm512_loadu_si512(X.q + i * K + k);
            const __m512 sx = _mm512_castpd_ps(_mm512_insertf64x4(  // (AVX512F: no DQ needed)
                _mm512_castps_pd(_mm512_castps256_ps512(_mm256_set1_ps(X.s[i * X.nb + b]))),
                _mm256_castps_pd(_mm256_set1_ps(X.s[i * X.nb + b + 1])), 1));
            for (int j = 0; j < NR; ++j) {
                const __m512i xs = _mm512_mask_sub_epi8(xv, neg[j], _mm512_setzero_si512(), xv);
                const __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), aw[j], xs);
                tot[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), sx, tot[i][j]);
            }
        }
    }
    __m256 tail[MR][NR];
    for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NR; ++j) tail[i][j] = _mm256_setzero_ps();
    if (b < X.nb) {  // an odd last block
        const int64_t k = b * kBlock;
        __m256i wv[NR], aw[NR];
        for (int j = 0; j < NR; ++j) {
            wv[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + j * K + k));
            aw[j] = _mm256_abs_epi8(wv[j]);
        }
        for (int i = 0; i < MR; ++i) {
            const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(X.q + i * K + k));
            const __m256 sx = _mm256_set1_ps(X.s[i * X.nb + b]);
            for (int j = 0; j < NR; ++j) {
                const __m256i d = _mm256_dpbusd_epi32(_mm256_setzero_si256(), aw[j],
                                                      _mm256_sign_epi8(xv, wv[j]));
                tail[i][j] = _mm256_mul_ps(_mm256_cvtepi32_ps(d), sx);
            }
        }
    }
    for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NR; ++j) {
            const __m256 t = _mm256_add_ps(
                _mm512_castps512_ps256(tot[i][j]),
                _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(tot[i][j]), 1)));
            y[i * ldy + j] = hsum8(_mm256_add_ps(t, tail[i][j])) * ws[j] + (bias ? bias[j] : 0.0f);
        }
}

// int4 weights (groups of K / G), MR x NR tile: y[i][j] = Σ_g ws[j][g] · (Σ_{b in g} sx[i][b] ·
// Σ_{k in b} u_j[k] · xq[i][k] + off[i][g]) (+ bias).
template <int MR, int NR>
MAMBART_VNNI inline void tile4(const QX& X, const uint8_t* w, const float* ws, const float* bias,
                               float* y, int64_t ldy) {
    const int64_t K = X.K, rb = K / 2, G = X.G, group = K / G;
    const int64_t ahead = int64_t(prefetch_ahead(size_t(NR * rb)));  // bytes ahead of the rows
    const __m128i lo4 = _mm_set1_epi8(0x0f);
    __m256 tot[MR][NR];
    float corr[MR][NR];
    for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NR; ++j) {
            tot[i][j] = _mm256_setzero_ps();
            corr[i][j] = 0.0f;
        }
    for (int64_t g = 0; g < G; ++g) {
        __m256 gs[MR][NR];
        for (int i = 0; i < MR; ++i)
            for (int j = 0; j < NR; ++j) gs[i][j] = _mm256_setzero_ps();
        for (int64_t k = g * group; k < (g + 1) * group; k += kBlock) {
            if (k % 128 == 0)
                for (int j = 0; j < NR; ++j) __builtin_prefetch(w + j * rb + k / 2 + ahead, 0, 3);
            __m256i u[NR];
            for (int j = 0; j < NR; ++j) {
                const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + j * rb + k / 2));
                u[j] = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_and_si128(b, lo4)),
                                               _mm_and_si128(_mm_srli_epi16(b, 4), lo4), 1);
            }
            for (int i = 0; i < MR; ++i) {
                const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(X.q + i * K + k));
                const __m256 sx = _mm256_set1_ps(X.s[i * X.nb + k / kBlock]);
                for (int j = 0; j < NR; ++j) {
                    const __m256i d = _mm256_dpbusd_epi32(_mm256_setzero_si256(), u[j], xv);
                    gs[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), sx, gs[i][j]);
                }
            }
        }
        for (int j = 0; j < NR; ++j) {
            const float wsc = ws[j * G + g];
            const __m256 wv = _mm256_set1_ps(wsc);
            for (int i = 0; i < MR; ++i) {
                tot[i][j] = _mm256_fmadd_ps(gs[i][j], wv, tot[i][j]);
                corr[i][j] += X.off[i * G + g] * wsc;
            }
        }
    }
    for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NR; ++j)
            y[i * ldy + j] = hsum8(tot[i][j]) + corr[i][j] + (bias ? bias[j] : 0.0f);
}

// tile4 for groups of a multiple of 64: two blocks of 32 weights per 32-byte load, their low
// and high nibbles each one VPDPBUSD operand against X.xp, the lanes scaled by X.s2.
template <int MR, int NR>
MAMBART_VNNI inline void tile4p(const QX& X, const uint8_t* w, const float* ws, const float* bias,
                                float* y, int64_t ldy) {
    const int64_t K = X.K, rb = K / 2, G = X.G, group = K / G, P = K / 64;
    const int64_t ahead = int64_t(prefetch_ahead(size_t(NR * rb)));  // bytes ahead of the rows
    const __m256i lo4 = _mm256_set1_epi8(0x0f);
    __m256 tot[MR][NR];
    float corr[MR][NR];
    for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NR; ++j) {
            tot[i][j] = _mm256_setzero_ps();
            corr[i][j] = 0.0f;
        }
    for (int64_t g = 0; g < G; ++g) {
        __m256 gs[MR][NR];
        for (int i = 0; i < MR; ++i)
            for (int j = 0; j < NR; ++j) gs[i][j] = _mm256_setzero_ps();
        for (int64_t k = g * group; k < (g + 1) * group; k += 64) {
            if (k % 128 == 0)
                for (int j = 0; j < NR; ++j) __builtin_prefetch(w + j * rb + k / 2 + ahead, 0, 3);
            __m256i lo[NR], hi[NR];
            for (int j = 0; j < NR; ++j) {
                const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + j * rb + k / 2));
                lo[j] = _mm256_and_si256(b, lo4);
                hi[j] = _mm256_and_si256(_mm256_srli_epi16(b, 4), lo4);
            }
            for (int i = 0; i < MR; ++i) {
                const int8_t* xr = X.xp + i * K + k;
                const __m256i xa = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr));
                const __m256i xb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + 32));
                const __m256 sv = _mm256_loadu_ps(X.s2 + (i * P + k / 64) * 8);
                for (int j = 0; j < NR; ++j) {
                    const __m256i d = _mm256_dpbusd_epi32(
                        _mm256_dpbusd_epi32(_mm256_setzero_si256(), lo[j], xa), hi[j], xb);
                    gs[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), sv, gs[i][j]);
                }
            }
        }
        for (int j = 0; j < NR; ++j) {
            const float wsc = ws[j * G + g];
            const __m256 wv = _mm256_set1_ps(wsc);
            for (int i = 0; i < MR; ++i) {
                tot[i][j] = _mm256_fmadd_ps(gs[i][j], wv, tot[i][j]);
                corr[i][j] += X.off[i * G + g] * wsc;
            }
        }
    }
    for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NR; ++j)
            y[i * ldy + j] = hsum8(tot[i][j]) + corr[i][j] + (bias ? bias[j] : 0.0f);
}

template <int MR>
MAMBART_VNNI void gemv(const QX& X, const Weight& W, int64_t N, const float* bias, float* y,
                       int64_t ldy) {
    constexpr int NR = MR <= 2 ? 4 : MR <= 4 ? 2 : 1;
    const bool k8 = W.quant == QuantScheme::Int8;
    const int64_t K = W.cols, rb = k8 ? K : K / 2, G = K / W.group;
    constexpr int64_t kChunk = 16;
    const int64_t chunks = (N + kChunk - 1) / kChunk;
    const int64_t grain = N * K > 65536 ? (65536 + kChunk * K - 1) / (kChunk * K) : chunks;
    const uint8_t* w = static_cast<const uint8_t*>(W.data);
    parallel_for(chunks, grain, [&](int64_t c0, int64_t c1) {
        const int64_t n0 = c0 * kChunk, n1 = c1 * kChunk < N ? c1 * kChunk : N;
        int64_t n = n0;
        for (; n + NR <= n1; n += NR) {
            if (k8)
                tile8<MR, NR>(X, reinterpret_cast<const int8_t*>(w + n * rb), W.scales + n,
                              bias ? bias + n : nullptr, y + n, ldy);
            else if (X.xp)
                tile4p<MR, NR>(X, w + n * rb, W.scales + n * G, bias ? bias + n : nullptr, y + n, ldy);
            else
                tile4<MR, NR>(X, w + n * rb, W.scales + n * G, bias ? bias + n : nullptr, y + n, ldy);
        }
        for (; n < n1; ++n) {
            if (k8)
                tile8<MR, 1>(X, reinterpret_cast<const int8_t*>(w + n * rb), W.scales + n,
                             bias ? bias + n : nullptr, y + n, ldy);
            else if (X.xp)
                tile4p<MR, 1>(X, w + n * rb, W.scales + n * G, bias ? bias + n : nullptr, y + n, ldy);
            else
                tile4<MR, 1>(X, w + n * rb, W.scales + n * G, bias ? bias + n : nullptr, y + n, ldy);
        }
    });
}

MAMBART_VNNI void linear_quant(const float* x, int64_t ldx, int64_t M, const Weight& W, int64_t N,
                               const float* bias, float* y, int64_t ldy) {
    const QX X = quantize_x(x, ldx, M, W.cols, W.quant == QuantScheme::Int4 ? W.group : 0);
    switch (M) {
        case 1: gemv<1>(X, W, N, bias, y, ldy); break;
        case 2: gemv<2>(X, W, N, bias, y, ldy); break;
        case 3: gemv<3>(X, W, N, bias, y, ldy); break;
        case 4: gemv<4>(X, W, N, bias, y, ldy); break;
        case 5: gemv<5>(X, W, N, bias, y, ldy); break;
        case 6: gemv<6>(X, W, N, bias, y, ldy); break;
        case 7: gemv<7>(X, W, N, bias, y, ldy); break;
        default: gemv<8>(X, W, N, bias, y, ldy); break;
    }
}

#undef MAMBART_VNNI

}  // namespace vnni

// ---- AMX (x86-64 with AMX-TILE + AMX-BF16, Sapphire Rapids and later): bf16 weights' GEMM ------
// Only the GEMM of bf16 weights (prefill, and batches past kGemvMaxM) changes; every GEMV and the
// other weight dtypes keep the AVX-512 / AVX2 kernels. TDPBF16PS multiplies a 16 x 32 bf16 tile
// by a 32 x 16 one into 16 x 16 fp32 sums: 512 multiply-adds a cycle against AVX-512 FMA's 32.
// As for BFMMLA (neon_bf16 above), each fp32 activation is split exactly into three bf16 parts,
//     x = h + m + l,   h = x's top 16 bits,  m = the top 16 bits of x - h,  l = the rest,
// so every product of a part and a bf16 weight is exact in fp32 and the three parts' sums are the
// fp32 projection with fp32 sums. TDPBF16PS adds each product into its fp32 accumulator with
// round-to-nearest-even, inputs and outputs subnormal flushed to zero (as the pool's FTZ/DAZ).
// The results are not the AVX-512 path's bit for bit (other sums in another order) and are held
// to the same bound against float64 (tests/test_cpu_kernels.py). Option cpu_amx (on).
//
// Layout: the weights are read in place as the A operand (16 weight rows x 32 k: tileloadd with
// the row stride K); the activations are split and packed once a call into B tiles
// xp[mb][kb][s] (16 k pairs x 16 rows of x x 2, VNNI order), 1 KB each. C tile (i, j) holds
// C[n][m] = Σ_k W[n][k] x[m][k] for 16 weight rows x 16 rows of x, stored transposed into y.
// Tiles: 0..3 C (weight rows n0 / n0 + 16 x rows of x m0 / m0 + 16), 4, 5 A, 6, 7 B.
// K must be a multiple of 32 (every published model's projections but Mamba-1's dt_proj, whose K
// is dt_rank; the rest take the AVX-512 GEMM).

namespace amx {

#define MAMBART_AMX \
    __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl,amx-tile,amx-bf16")))

constexpr int64_t kChunkRows = 512;  // rows of x packed at a time (scratch: 6 K bytes a row)

// Linux gives a process the AMX tile data state only on request (arch_prctl
// ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA, kernel 5.16+); false where it refuses.
bool request_tiles() {
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

// CPUID leaf 7: EDX bit 22 AMX-BF16, bit 24 AMX-TILE; the split needs AVX-512 F/BW/DQ/VL.
bool cpu_has_amx() {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) == 0) return false;
    return ((edx >> 22) & 1u) && ((edx >> 24) & 1u) && __builtin_cpu_supports("avx512f") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vl");
}

// Whether this process runs the AMX GEMM: the CPU has it, the option allows it, the OS grants
// the tile state; read once.
bool enabled() {
    static const bool on = runtime_options().cpu_amx && cpu_has_amx() && request_tiles();
    return on;
}

struct alignas(64) TileConfig {
    uint8_t palette = 1, start_row = 0;
    uint8_t reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
};

// Eight tiles of 16 rows x 64 bytes; per thread (tile configuration is thread state).
MAMBART_AMX inline void configure() {
    TileConfig c;
    for (int t = 0; t < 8; ++t) c.colsb[t] = 64, c.rows[t] = 16;
    _tile_loadconfig(&c);
}

// Sixteen activations split into their three bf16 parts; infinities and NaNs go whole into h (a
// NaN kept a NaN by its quiet bit), m = l = 0 (neon_bf16::split4's rule).
MAMBART_AMX inline void split16(__m512 v, __m256i& h, __m256i& m, __m256i& l) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i hi16 = _mm512_set1_epi32(int(0xFFFF0000u));
    const __m512i expm = _mm512_set1_epi32(0x7F800000);
    const __mmask16 finite = _mm512_cmplt_epu32_mask(_mm512_and_si512(u, expm), expm);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    const __m512i hb = _mm512_and_si512(_mm512_mask_or_epi32(u, nan, u, _mm512_set1_epi32(0x00400000)), hi16);
    // x - h and (x - h) - m are exact (Sterbenz); zero for the non-finite lanes
    const __m512 r1 = _mm512_maskz_sub_ps(finite, v, _mm512_castsi512_ps(_mm512_and_si512(u, hi16)));
    const __m512i mb = _mm512_and_si512(_mm512_castps_si512(r1), hi16);
    const __m512 r2 = _mm512_sub_ps(r1, _mm512_castsi512_ps(mb));
    // (zero-masked forms: GCC 12 warns of the unmasked ones' undefined pass-through)
    h = _mm512_maskz_cvtepi32_epi16(0xFFFF, _mm512_maskz_srli_epi32(0xFFFF, hb, 16));
    m = _mm512_maskz_cvtepi32_epi16(0xFFFF, _mm512_maskz_srli_epi32(0xFFFF, mb, 16));
    l = _mm512_maskz_cvtepi32_epi16(0xFFFF, _mm512_maskz_srli_epi32(0xFFFF, _mm512_castps_si512(r2), 16));
}

// B tiles of rows [m0, m0 + 16) of x (rows past M zero), k in [0, KB * 32):
//   xp[kb][s][p][j] = the bf16 pair (part s of x[m0 + j][k0 + 2p], of x[m0 + j][k0 + 2p + 1])
// as 32-bit words, k0 = 32 kb.      xp: (KB, 3, 16, 16) uint32
MAMBART_AMX void pack_block(const float* x, int64_t ldx, int64_t M, int64_t m0, int64_t KB,
                            uint32_t* xp) {
    alignas(64) uint32_t w[3][16];
    for (int j = 0; j < 16; ++j) {
        const bool row = m0 + j < M;
        const float* xr = x + (m0 + j) * ldx;
        for (int64_t kb = 0; kb < KB; ++kb) {
            uint32_t* t = xp + kb * 768;
            if (!row) {
                for (int s = 0; s < 3; ++s)
                    for (int p = 0; p < 16; ++p) t[s * 256 + p * 16 + j] = 0;
                continue;
            }
            for (int half = 0; half < 2; ++half) {
                __m256i h, m, l;
                split16(_mm512_loadu_ps(xr + kb * 32 + half * 16), h, m, l);
                _mm256_store_si256(reinterpret_cast<__m256i*>(w[0] + half * 8), h);
                _mm256_store_si256(reinterpret_cast<__m256i*>(w[1] + half * 8), m);
                _mm256_store_si256(reinterpret_cast<__m256i*>(w[2] + half * 8), l);
            }
            for (int s = 0; s < 3; ++s)
                for (int p = 0; p < 16; ++p) t[s * 256 + p * 16 + j] = w[s][p];
        }
    }
}

// Thread-local scratch (thread_scratch): the packed activations (the call's) and a zero-padded
// copy of a last, partial weight panel (each worker's).
uint32_t* xp_scratch(int64_t n) { return thread_scratch<uint32_t, 1>(n); }
uint16_t* w_scratch(int64_t n) { return thread_scratch<uint16_t, 2>(n); }

// y[m0 + j][n0 + i] = C tiles of weight rows [n0, n0 + nrows) x rows [m0, m0 + mrows)
// (+ bias[n0 + i] where bias is given).
MAMBART_AMX inline void store_block(float* y, int64_t ldy, int64_t nrows, int64_t mrows,
                                    const float* bias) {
    alignas(64) float c[4][16][16];
    _tile_stored(0, c[0], 64);
    _tile_stored(1, c[1], 64);
    _tile_stored(2, c[2], 64);
    _tile_stored(3, c[3], 64);
    for (int64_t j = 0; j < mrows; ++j) {
        float* yr = y + j * ldy;
        const int mh = int(j / 16), jj = int(j % 16);
        for (int64_t i = 0; i < nrows; ++i)
            yr[i] = c[(i / 16) * 2 + mh][i % 16][jj] + (bias ? bias[i] : 0.0f);
    }
}

// Panels [p0, p1) of 32 weight rows against the packed rows [0, Mc) of the chunk.
MAMBART_AMX void panels(const uint16_t* W, int64_t K, int64_t N, const uint32_t* xp, int64_t KB,
                        int64_t Mc, const float* bias, float* y, int64_t ldy, int64_t p0,
                        int64_t p1) {
    configure();
    const int64_t ldw = K * 2;  // bytes
    const int64_t mbs = (Mc + 15) / 16;  // m blocks holding rows (gemm packs an even count)
    // A last, partial panel in these: its rows zero-padded to 32, copied once
    const uint16_t* last = nullptr;
    if (p1 * 32 > N) {
        const int64_t n0 = (p1 - 1) * 32, nrows = N - n0;
        uint16_t* ws = w_scratch(32 * K);
        for (int64_t i = 0; i < 32; ++i)
            for (int64_t k = 0; k < K; ++k) ws[i * K + k] = i < nrows ? W[(n0 + i) * K + k] : 0;
        last = ws;
    }
    for (int64_t mb = 0; mb < mbs; mb += 2) {
        const uint32_t* b0 = xp + mb * KB * 768;
        const uint32_t* b1 = b0 + KB * 768;
        const int64_t mrows = std::min<int64_t>(32, Mc - mb * 16);
        for (int64_t pnl = p0; pnl < p1; ++pnl) {
            const int64_t n0 = pnl * 32, nrows = std::min<int64_t>(32, N - n0);
            const uint16_t* w = nrows < 32 ? last : W + n0 * K;
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            for (int64_t kb = 0; kb < KB; ++kb) {
                _tile_loadd(4, w + kb * 32, ldw);
                _tile_loadd(5, w + 16 * K + kb * 32, ldw);
                for (int s = 0; s < 3; ++s) {
                    _tile_loadd(6, b0 + kb * 768 + s * 256, 64);
                    _tile_loadd(7, b1 + kb * 768 + s * 256, 64);
                    _tile_dpbf16ps(0, 4, 6);
                    _tile_dpbf16ps(1, 4, 7);
                    _tile_dpbf16ps(2, 5, 6);
                    _tile_dpbf16ps(3, 5, 7);
                }
            }
            store_block(y + mb * 16 * ldy + n0, ldy, nrows, mrows, bias ? bias + n0 : nullptr);
        }
    }
    _tile_release();
}

// y[M, N] = x[M, K] · W[N, K]ᵀ + bias, bf16 W, K a positive multiple of 32 (linear_typed
// sends other K to the AVX-512 GEMM): chunks of kChunkRows rows of x, each split and packed by
// the pool's threads (one m block each), then the weight panels split by the threads.
MAMBART_AMX void gemm(const float* x, int64_t ldx, int64_t M, int64_t K, const void* Wv,
                      int64_t N, const float* bias, float* y, int64_t ldy) {
    const uint16_t* W = static_cast<const uint16_t*>(Wv);
    const int64_t KB = K / 32;
    for (int64_t c0 = 0; c0 < M; c0 += kChunkRows) {
        const int64_t Mc = std::min(kChunkRows, M - c0);
        const float* xc = x + c0 * ldx;
        const int64_t mbs = (Mc + 31) / 32 * 2;  // m blocks, an even count
        uint32_t* xp = xp_scratch(mbs * KB * 768);
        parallel_for(mbs, 1, [&](int64_t b0, int64_t b1) {
            for (int64_t b = b0; b < b1; ++b) pack_block(xc, ldx, Mc, b * 16, KB, xp + b * KB * 768);
        });
        parallel_for((N + 31) / 32, 1, [&](int64_t p0, int64_t p1) {
            panels(W, K, N, xp, KB, Mc, bias, y + c0 * ldy, ldy, p0, p1);
        });
    }
}

#undef MAMBART_AMX

}  // namespace amx

#endif  // MAMBART_X86

#ifdef MAMBART_ARM64

// ---- NEON (aarch64: Advanced SIMD is part of the base architecture) ---------------------------
// fp16 weights are widened with FCVTL/FCVTL2 and bf16 with SHLL/SHLL2 (both base ARMv8.0-A);
// the sums are fp32 FMLA, as on x86.

namespace neon {

#define MAMBART_SIMD __attribute__((always_inline))

struct V8 {
    float32x4_t lo, hi;  // lanes 0..3, 4..7
};
MAMBART_SIMD inline V8 v_zero() { return V8{vdupq_n_f32(0.0f), vdupq_n_f32(0.0f)}; }
MAMBART_SIMD inline V8 v_load(const float* p) { return V8{vld1q_f32(p), vld1q_f32(p + 4)}; }
MAMBART_SIMD inline V8 v_bcast(float s) { return V8{vdupq_n_f32(s), vdupq_n_f32(s)}; }
MAMBART_SIMD inline V8 v_fma(V8 a, V8 b, V8 c) {
    return V8{vfmaq_f32(c.lo, a.lo, b.lo), vfmaq_f32(c.hi, a.hi, b.hi)};
}
MAMBART_SIMD inline V8 v_add(V8 a, V8 b) { return V8{vaddq_f32(a.lo, b.lo), vaddq_f32(a.hi, b.hi)}; }
MAMBART_SIMD inline void v_store(float* p, V8 v) {
    vst1q_f32(p, v.lo);
    vst1q_f32(p + 4, v.hi);
}
constexpr int kGemmRows = 4;  // 16 accumulators + 4 X4 + 4 weight registers: 24 of 32
// The 4 x 4 blocks of lanes 0..3 and 4..7 transposed with TRN1 / TRN2 (32- then 64-bit).
MAMBART_SIMD inline void t4_store(float* p, int64_t ld, float32x4_t a, float32x4_t b,
                                  float32x4_t c, float32x4_t d) {
    const float32x4_t ab0 = vtrn1q_f32(a, b), ab1 = vtrn2q_f32(a, b);
    const float32x4_t cd0 = vtrn1q_f32(c, d), cd1 = vtrn2q_f32(c, d);
    const float64x2_t x0 = vreinterpretq_f64_f32(ab0), x1 = vreinterpretq_f64_f32(ab1);
    const float64x2_t y0 = vreinterpretq_f64_f32(cd0), y1 = vreinterpretq_f64_f32(cd1);
    vst1q_f32(p, vreinterpretq_f32_f64(vtrn1q_f64(x0, y0)));
    vst1q_f32(p + ld, vreinterpretq_f32_f64(vtrn1q_f64(x1, y1)));
    vst1q_f32(p + 2 * ld, vreinterpretq_f32_f64(vtrn2q_f64(x0, y0)));
    vst1q_f32(p + 3 * ld, vreinterpretq_f32_f64(vtrn2q_f64(x1, y1)));
}
MAMBART_SIMD inline void v_store_t4(float* p, int64_t ld, V8 r0, V8 r1, V8 r2, V8 r3) {
    t4_store(p, ld, r0.lo, r1.lo, r2.lo, r3.lo);
    t4_store(p + 4 * ld, ld, r0.hi, r1.hi, r2.hi, r3.hi);
}
typedef float32x4_t X4;
MAMBART_SIMD inline X4 x4_load(const float* p) { return vld1q_f32(p); }
template <int L>
MAMBART_SIMD inline V8 v_fma_lane(X4 q, V8 w, V8 c) {
    return V8{vfmaq_laneq_f32(c.lo, w.lo, q, L), vfmaq_laneq_f32(c.hi, w.hi, q, L)};
}
MAMBART_SIMD inline float v_hsum(V8 v) {
    const float32x4_t s = vaddq_f32(v.lo, v.hi);                       // v_i + v_{i+4}
    const float32x2_t t = vadd_f32(vget_low_f32(s), vget_high_f32(s));  // (s0 + s2, s1 + s3)
    return vget_lane_f32(t, 0) + vget_lane_f32(t, 1);
}
template <DType D>
MAMBART_SIMD inline V8 v_load_w(const void* row, int64_t k) {
    if constexpr (D == DType::F32) {
        return v_load(static_cast<const float*>(row) + k);
    } else if constexpr (D == DType::F16) {
        const float16x8_t h = vld1q_f16(reinterpret_cast<const float16_t*>(
            static_cast<const uint16_t*>(row) + k));
        return V8{vcvt_f32_f16(vget_low_f16(h)), vcvt_high_f32_f16(h)};
    } else {
        const uint16x8_t h = vld1q_u16(static_cast<const uint16_t*>(row) + k);
        return V8{vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(h), 16)),
                  vreinterpretq_f32_u32(vshll_high_n_u16(h, 16))};
    }
}
// int8 / int4 weights: SXTL / USHR widening, then SCVTF.
MAMBART_SIMD inline V8 v_widen_s8(int8x8_t b) {
    const int16x8_t h = vmovl_s8(b);
    return V8{vcvtq_f32_s32(vmovl_s16(vget_low_s16(h))), vcvtq_f32_s32(vmovl_high_s16(h))};
}
MAMBART_SIMD inline V8 v_load_q8(const int8_t* p) { return v_widen_s8(vld1_s8(p)); }
MAMBART_SIMD inline void v_load_q4(const uint8_t* p, V8& lo, V8& hi) {
    const uint8x8_t b = vld1_u8(p);
    const int8x8_t eight = vdup_n_s8(8);
    lo = v_widen_s8(vsub_s8(vreinterpret_s8_u8(vand_u8(b, vdup_n_u8(15))), eight));
    hi = v_widen_s8(vsub_s8(vreinterpret_s8_u8(vshr_n_u8(b, 4)), eight));
}
#undef MAMBART_SIMD
#define MAMBART_SIMD
#include "cpu/linear_simd.inc"
#undef MAMBART_SIMD

}  // namespace neon

// ---- NEON + BF16 (aarch64 with FEAT_BF16: BFMMLA), bf16 weights ------------------------------
// Compiled for armv8.2-a+bf16 with a function-level target attribute and run only where HWCAP2
// has BF16, so the binary stays ARMv8.0-A. Only the GEMM (prefill, and decode batches past
// kGemvMaxM) changes: its micro-kernel multiplies with BFMMLA, 16 multiply-adds per instruction
// against FMLA's 4, and packs the weight panel as bf16 (no widening, half the bytes). fp32 and
// fp16 weights, and every GEMV, keep the NEON kernels above (see docs/platforms.md for why).
//
// BFMMLA takes bf16 on both sides, and rounding the activations to bf16 would cost 8 of their 24
// bits. Instead each fp32 activation is split exactly into three bf16 parts,
//     x = h + m + l,   h = x's top 16 bits,  m = the top 16 bits of x - h,  l = the rest
// (x - h - m has at most 8 significant bits, so l holds it exactly). A product of a part and a
// bf16 weight is exact in fp32 (8 x 8 significant bits), so the sum over the three parts is the
// fp32 projection with fp32 sums: BFMMLA adds each pair of products and then the accumulator
// with fp32 precision, rounding to odd and flushing subnormals to zero (ARMv8.6-A's BFMMLA
// without FEAT_EBF16). Three BFMMLA per activation: 5.3 useful multiply-adds per instruction.
// The results are not those of the NEON path bit for bit (other sums in another order), and are
// held to the same bound against float64 (tests/test_cpu_kernels.py).

namespace neon_bf16 {

#define MAMBART_BF16 __attribute__((target("arch=armv8.2-a+bf16")))

// Thread-local (n) bf16 scratch (thread_scratch): the split activations (the calling thread's)
// and the packed weight panel (each worker's).
uint16_t* x_scratch(int64_t n) { return thread_scratch<uint16_t, 3>(n); }
uint16_t* panel_scratch16(int64_t n) { return thread_scratch<uint16_t, 4>(n); }

// Four activations split into their three bf16 parts (the top halves of h, m, l as fp32 bits).
// Infinities and NaNs go whole into h (a NaN kept a NaN by its quiet bit), m = l = 0.
MAMBART_BF16 inline void split4(float32x4_t v, uint16x4_t& h, uint16x4_t& m, uint16x4_t& l) {
    const uint32x4_t hi16 = vdupq_n_u32(0xFFFF0000u);
    const uint32x4_t u = vreinterpretq_u32_f32(v);
    const uint32x4_t finite = vcltq_u32(vandq_u32(u, vdupq_n_u32(0x7F800000u)),
                                        vdupq_n_u32(0x7F800000u));
    const uint32x4_t quiet = vbicq_u32(vdupq_n_u32(0x00400000u), vceqq_f32(v, v));  // NaN lanes
    const uint32x4_t hb = vandq_u32(vorrq_u32(u, quiet), hi16);
    // x - h and (x - h) - m are exact (Sterbenz); zero for the non-finite lanes
    const float32x4_t r1 = vreinterpretq_f32_u32(vandq_u32(
        vreinterpretq_u32_f32(vsubq_f32(v, vreinterpretq_f32_u32(vandq_u32(u, hi16)))), finite));
    const uint32x4_t mb = vandq_u32(vreinterpretq_u32_f32(r1), hi16);
    const float32x4_t r2 = vsubq_f32(r1, vreinterpretq_f32_u32(mb));
    h = vshrn_n_u32(hb, 16);
    m = vshrn_n_u32(mb, 16);
    l = vshrn_n_u32(vreinterpretq_u32_f32(r2), 16);
}

// xs[p][kb][s][0..8) = part s (h, m, l) of rows 2p and 2p+1 at k = 4kb..4kb+4, as BFMMLA's 2 x 4
// operand (row 2p's four values, then row 2p+1's); a missing last row and k >= K are zeros.
//   x:  (M, K) fp32, row stride ldx;   xs: (ceil(M / 2), KB, 3, 8) bf16, KB = ceil(K / 4)
MAMBART_BF16 void split_x(const float* x, int64_t ldx, int64_t M, int64_t K, int64_t KB,
                          uint16_t* xs) {
    const int64_t K4 = K / 4 * 4;
    for (int64_t r = 0; r < M; r += 2) {
        const float* a = x + r * ldx;
        const float* b = r + 1 < M ? a + ldx : nullptr;
        uint16_t* out = xs + (r / 2) * KB * 24;
        for (int64_t kb = 0; kb < KB; ++kb, out += 24) {
            const int64_t k = kb * 4;
            float32x4_t va, vb = vdupq_n_f32(0.0f);
            if (k < K4) {
                va = vld1q_f32(a + k);
                if (b) vb = vld1q_f32(b + k);
            } else {  // the K % 4 tail, zero-padded
                float ta[4] = {0, 0, 0, 0}, tb[4] = {0, 0, 0, 0};
                for (int64_t q = 0; k + q < K; ++q) {
                    ta[q] = a[k + q];
                    if (b) tb[q] = b[k + q];
                }
                va = vld1q_f32(ta);
                vb = vld1q_f32(tb);
            }
            uint16x4_t ha, ma, la, hb, mb, lb;
            split4(va, ha, ma, la);
            split4(vb, hb, mb, lb);
            vst1q_u16(out, vcombine_u16(ha, hb));
            vst1q_u16(out + 8, vcombine_u16(ma, mb));
            vst1q_u16(out + 16, vcombine_u16(la, lb));
        }
    }
}

// Packs bf16 weight rows [n0, n0 + ncols) (ncols <= 16) as 8 row pairs: wp[kb][c][0..8) = row
// n0+2c's weights k = 4kb..4kb+4, then row n0+2c+1's (BFMMLA's other operand); missing rows and
// k >= K are zeros.   wp: (KB, 8, 8) bf16
MAMBART_BF16 void pack_panel(const uint16_t* W, int64_t K, int64_t KB, int64_t n0, int64_t ncols,
                             uint16_t* wp) {
    const int64_t K8 = K / 8 * 8;
    for (int c = 0; c < 8; ++c) {
        const uint16_t* ra = 2 * c < ncols ? W + (n0 + 2 * c) * K : nullptr;
        const uint16_t* rb = 2 * c + 1 < ncols ? W + (n0 + 2 * c + 1) * K : nullptr;
        uint16_t* out = wp + c * 8;
        int64_t k = 0;
        if (ra && rb) {
            for (; k < K8; k += 8) {  // two k blocks of the pair per 16-byte load of each row
                const uint64x2_t qa = vreinterpretq_u64_u16(vld1q_u16(ra + k));
                const uint64x2_t qb = vreinterpretq_u64_u16(vld1q_u16(rb + k));
                vst1q_u16(out + (k / 4) * 64, vreinterpretq_u16_u64(vzip1q_u64(qa, qb)));
                vst1q_u16(out + (k / 4 + 1) * 64, vreinterpretq_u16_u64(vzip2q_u64(qa, qb)));
            }
        }
        for (; k < KB * 4; ++k) {  // the tails, a missing row, the K % 4 padding
            uint16_t* o = out + (k / 4) * 64 + (k % 4);
            o[0] = ra && k < K ? ra[k] : 0;
            o[4] = rb && k < K ? rb[k] : 0;
        }
    }
}

// Micro-kernel: rows [0, rows) of x (P row pairs, rows <= 2P) times the 16 packed weight rows:
//   y[i][j] = Σ_k x[i][k] · w_j[k] (+ bias[j]),  i < rows, j < ncols
// acc[p][c] holds BFMMLA's 2 x 2 block (row 2p, 2p+1) x (weight row 2c, 2c+1); each k block
// runs 3 BFMMLA per (p, c), one per part of x. Sums run in blocks of 16 k blocks (64 k, as the
// NEON kernel's kKBlock), each block added into tot.
template <int P>
MAMBART_BF16 inline void panel_tile(const uint16_t* xs, int64_t KB, const uint16_t* wp,
                                    const float* bias, float* y, int64_t ldy, int rows,
                                    int64_t ncols) {
    static_assert(P == 1 || P == 2, "panel_tile: 1 or 2 row pairs");
    const bfloat16_t* xp = reinterpret_cast<const bfloat16_t*>(xs);
    const bfloat16_t* wq = reinterpret_cast<const bfloat16_t*>(wp);
    float32x4_t tot[P][8];
    for (int p = 0; p < P; ++p)
        for (int c = 0; c < 8; ++c) tot[p][c] = vdupq_n_f32(0.0f);
    constexpr int64_t kBlock = 16;
    for (int64_t kb0 = 0; kb0 < KB; kb0 += kBlock) {
        const int64_t kb1 = KB < kb0 + kBlock ? KB : kb0 + kBlock;
        float32x4_t acc[P][8];
#pragma GCC unroll 2
        for (int p = 0; p < P; ++p)
#pragma GCC unroll 8
            for (int c = 0; c < 8; ++c) acc[p][c] = vdupq_n_f32(0.0f);
        for (int64_t kb = kb0; kb < kb1; ++kb) {
            bfloat16x8_t xh[P], xm[P], xl[P];
#pragma GCC unroll 2
            for (int p = 0; p < P; ++p) {
                const bfloat16_t* q = xp + (p * KB + kb) * 24;
                xh[p] = vld1q_bf16(q);
                xm[p] = vld1q_bf16(q + 8);
                xl[p] = vld1q_bf16(q + 16);
            }
            const bfloat16_t* w = wq + kb * 64;
#pragma GCC unroll 8
            for (int c = 0; c < 8; ++c) {
                const bfloat16x8_t wv = vld1q_bf16(w + c * 8);
#pragma GCC unroll 2
                for (int p = 0; p < P; ++p) {
                    acc[p][c] = vbfmmlaq_f32(acc[p][c], xh[p], wv);
                    acc[p][c] = vbfmmlaq_f32(acc[p][c], xm[p], wv);
                    acc[p][c] = vbfmmlaq_f32(acc[p][c], xl[p], wv);
                }
            }
        }
#pragma GCC unroll 2
        for (int p = 0; p < P; ++p)
#pragma GCC unroll 8
            for (int c = 0; c < 8; ++c) tot[p][c] = vaddq_f32(tot[p][c], acc[p][c]);
    }
    for (int p = 0; p < P; ++p) {
        float out[2][16];  // rows 2p, 2p+1
        for (int c = 0; c < 8; c += 2) {
            const float64x2_t a = vreinterpretq_f64_f32(tot[p][c]);
            const float64x2_t b = vreinterpretq_f64_f32(tot[p][c + 1]);
            vst1q_f32(out[0] + 2 * c, vreinterpretq_f32_f64(vzip1q_f64(a, b)));
            vst1q_f32(out[1] + 2 * c, vreinterpretq_f32_f64(vzip2q_f64(a, b)));
        }
        for (int i = 0; i < 2 && 2 * p + i < rows; ++i) {
            float* yi = y + (2 * p + i) * ldy;
            for (int64_t j = 0; j < ncols; ++j) yi[j] = out[i][j] + (bias ? bias[j] : 0.0f);
        }
    }
}

// GEMM, bf16 weights: the activations split once (the calling thread), then the pool's threads
// split N into panels of 16 weight rows, each packed once and run against every 4-row tile of x.
MAMBART_BF16 void gemm(const float* x, int64_t ldx, int64_t M, int64_t K, const void* W,
                       int64_t N, const float* bias, float* y, int64_t ldy) {
    const int64_t KB = (K + 3) / 4, pairs = (M + 1) / 2;
    uint16_t* xs = x_scratch(pairs * KB * 24);  // (pairs, KB, 3, 8) bf16
    split_x(x, ldx, M, K, KB, xs);
    const uint16_t* w16 = static_cast<const uint16_t*>(W);
    const int64_t npanels = (N + 15) / 16;
    parallel_for(npanels, 1, [&](int64_t pnl0, int64_t pnl1) {
        uint16_t* wp = panel_scratch16(KB * 64);  // (KB, 8, 8) bf16, this thread's
        for (int64_t pnl = pnl0; pnl < pnl1; ++pnl) {
            const int64_t n0 = pnl * 16, nc = N - n0 < 16 ? N - n0 : 16;
            pack_panel(w16, K, KB, n0, nc, wp);
            const float* bb = bias ? bias + n0 : nullptr;
            int64_t p = 0;
            for (; p + 2 <= pairs; p += 2)
                panel_tile<2>(xs + p * KB * 24, KB, wp, bb, y + 2 * p * ldy + n0, ldy,
                              int(std::min<int64_t>(4, M - 2 * p)), nc);
            if (p < pairs)
                panel_tile<1>(xs + p * KB * 24, KB, wp, bb, y + 2 * p * ldy + n0, ldy,
                              int(M - 2 * p), nc);
        }
    });
}

#undef MAMBART_BF16

}  // namespace neon_bf16

#endif  // MAMBART_ARM64

// ---- run-time choice -------------------------------------------------------------------------

enum class Kernels { Generic, Avx2, Avx512, Neon, NeonBf16 };

#ifdef MAMBART_ARM64
// Linux's AT_HWCAP / AT_HWCAP2 bits (arch/arm64/include/uapi/asm/hwcap.h), spelled out so that
// older C libraries build.
constexpr unsigned long kHwcapFp = 1ul << 0, kHwcapAsimd = 1ul << 1, kHwcapFphp = 1ul << 9,
                        kHwcapAsimdhp = 1ul << 10, kHwcapAsimddp = 1ul << 20,
                        kHwcapSve = 1ul << 22;
constexpr unsigned long kHwcap2I8mm = 1ul << 13, kHwcap2Bf16 = 1ul << 14;
#endif

#ifdef MAMBART_X86
// F16C: CPUID leaf 1, ecx bit 29 (read directly: clang 14's __builtin_cpu_supports has no
// "f16c"); it needs AVX, whose register state __builtin_cpu_supports("avx2") already checks.
bool cpu_has_f16c() {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (__get_cpuid(1, &eax, &ebx, &ecx, &edx) == 0) return false;
    return (ecx >> 29) & 1u;
}
#endif

std::string detect_features() {
    std::string f;
    auto add = [&](bool on, const char* name) {
        if (!on) return;
        if (!f.empty()) f += ' ';
        f += name;
    };
#if defined(MAMBART_X86)
    __builtin_cpu_init();
    add(__builtin_cpu_supports("avx2"), "avx2");
    add(__builtin_cpu_supports("fma"), "fma");
    add(cpu_has_f16c(), "f16c");
    add(__builtin_cpu_supports("avx512f"), "avx512f");
    add(__builtin_cpu_supports("avx512dq"), "avx512dq");
    add(__builtin_cpu_supports("avx512bf16"), "avx512bf16");
#elif defined(MAMBART_ARM64)
    const unsigned long hw = getauxval(AT_HWCAP), hw2 = getauxval(AT_HWCAP2);
    add(hw & kHwcapFp, "fp");
    add(hw & kHwcapAsimd, "asimd");
    add(hw & kHwcapFphp, "fphp");
    add(hw & kHwcapAsimdhp, "asimdhp");
    add(hw & kHwcapAsimddp, "asimddp");
    add(hw & kHwcapSve, "sve");
    add(hw2 & kHwcap2Bf16, "bf16");
    add(hw2 & kHwcap2I8mm, "i8mm");
#endif
    (void)add;
    return f;
}

Kernels detect_kernels() {
    // The cpu_portable option (MAMBART_CPU_PORTABLE=1) forces the generic path, to test it (and
    // the choice) on a machine with SIMD.
    if (runtime_options().cpu_portable) return Kernels::Generic;
#if defined(MAMBART_X86)
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && cpu_has_f16c())
        return runtime_options().cpu_avx512 && __builtin_cpu_supports("avx512f") &&
                       __builtin_cpu_supports("avx512dq")
                   ? Kernels::Avx512
                   : Kernels::Avx2;
#elif defined(MAMBART_ARM64)
    // Advanced SIMD and FP are in every ARMv8-A profile Linux runs on; checked all the same.
    // BF16 (BFMMLA) for bf16 weights where HWCAP2 has it; NEON for the rest.
    const unsigned long hw = getauxval(AT_HWCAP), hw2 = getauxval(AT_HWCAP2);
    if ((hw & kHwcapFp) && (hw & kHwcapAsimd))
        return (hw2 & kHwcap2Bf16) ? Kernels::NeonBf16 : Kernels::Neon;
#endif
    return Kernels::Generic;
}

#ifdef MAMBART_X86
// The VNNI quantized GEMV (vnni above): AVX512F/BW/VL + AVX512-VNNI, read once.
bool quant_vnni() {
    static const bool v = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
    return v;
}
#endif

// Read once, at the first projection (the option is documented as read once).
Kernels kernels() {
    static const Kernels k = detect_kernels();
    return k;
}

template <DType D>
void linear_typed(Kernels k, const float* x, int64_t ldx, int64_t M, int64_t K, const void* W,
                  int64_t N, const float* bias, float* y, int64_t ldy) {
    switch (k) {
#ifdef MAMBART_X86
        case Kernels::Avx2: return avx2::linear_simd<D>(x, ldx, M, K, W, N, bias, y, ldy);
        case Kernels::Avx512:
            // One row (decode) keeps AVX2's GEMV: bandwidth-bound, and the row pairs' inserts
            // made fp32 weights slower from the cache (measured); the same sums either way.
            if (M >= 2 && M <= kGemvMaxM)
                return avx512::gemv<D>(x, ldx, M, K, W, N, bias, y, ldy);
            if (M > kGemvMaxM) {
                if constexpr (D == DType::BF16) {
                    if (K % 32 == 0 && amx::enabled())
                        return amx::gemm(x, ldx, M, K, W, N, bias, y, ldy);
                }
                return avx512::gemm<D>(x, ldx, M, K, W, N, bias, y, ldy);
            }
            return avx2::linear_simd<D>(x, ldx, M, K, W, N, bias, y, ldy);
#endif
#ifdef MAMBART_ARM64
        case Kernels::Neon: return neon::linear_simd<D>(x, ldx, M, K, W, N, bias, y, ldy);
        case Kernels::NeonBf16:
            if constexpr (D == DType::BF16) {
                if (M > kGemvMaxM) return neon_bf16::gemm(x, ldx, M, K, W, N, bias, y, ldy);
            }
            return neon::linear_simd<D>(x, ldx, M, K, W, N, bias, y, ldy);
#endif
        default: return linear_portable(x, ldx, M, K, W, D, N, bias, y, ldy);
    }
}

}  // namespace

std::vector<double> read_bandwidth(int64_t bytes, int passes) {
    constexpr int64_t kBlock = 16384;  // floats a claim: 64 KiB
    const int64_t n = std::max<int64_t>(kBlock, bytes / 4 / kBlock * kBlock);
    std::vector<float> buf(size_t(n), 1.0f);  // (n) written once: every page present
    const int64_t blocks = n / kBlock;
    std::vector<double> out;
    const Kernels k = kernels();
    float sink = 0.0f;
    for (int pass = 0; pass < passes; ++pass) {
        std::atomic<int> dummy{0};
        const auto t0 = std::chrono::steady_clock::now();
        parallel_for(blocks, 1, [&](int64_t b0, int64_t b1) {
            float s = 0.0f;
            for (int64_t b = b0; b < b1; ++b) {
                const float* p = buf.data() + b * kBlock;
                switch (k) {
#ifdef MAMBART_X86
                    case Kernels::Avx2:
                    case Kernels::Avx512: s += avx2::read_sum(p, kBlock); break;
#endif
#ifdef MAMBART_ARM64
                    case Kernels::Neon: s += neon::read_sum(p, kBlock); break;
#endif
                    default:
                        for (int64_t i = 0; i < kBlock; ++i) s += p[i];
                }
            }
            dummy.fetch_add(s > 0.0f ? 1 : 0, std::memory_order_relaxed);  // keeps the sums
        });
        const double secs =
            std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        sink += float(dummy.load());
        out.push_back(double(n) * 4.0 / std::max(secs, 1e-9));
    }
    if (sink < 0.0f) out.push_back(0.0);  // never: the sums must not be optimised away
    return out;
}

const char* linear_kernels() {
    switch (kernels()) {
        case Kernels::Avx2: return "avx2";
        case Kernels::Avx512:
#ifdef MAMBART_X86
            if (amx::enabled()) return "avx512+amx";
#endif
            return "avx512";
        case Kernels::Neon: return "neon";
        case Kernels::NeonBf16: return "neon+bf16";
        case Kernels::Generic: break;
    }
    return "generic";
}

const std::string& cpu_features() {
    static const std::string f = detect_features();
    return f;
}

void linear(const float* x, int64_t ldx, int64_t M, int64_t K, const void* W, DType w_dtype,
            int64_t N, const float* bias, float* y, int64_t ldy) {
    if (M <= 0 || N <= 0) return;
    if (K == 0) {  // an empty sum: y = bias
        for (int64_t m = 0; m < M; ++m)
            for (int64_t n = 0; n < N; ++n) y[m * ldy + n] = bias ? bias[n] : 0.0f;
        return;
    }
    const Kernels k = kernels();
    switch (w_dtype) {
        case DType::F32: return linear_typed<DType::F32>(k, x, ldx, M, K, W, N, bias, y, ldy);
        case DType::F16: return linear_typed<DType::F16>(k, x, ldx, M, K, W, N, bias, y, ldy);
        case DType::BF16: return linear_typed<DType::BF16>(k, x, ldx, M, K, W, N, bias, y, ldy);
        default: break;
    }
    throw InvalidArgument(str_cat("cpu::linear: ", dtype_name(w_dtype),
                                  " weights need linear_quant"));
}

void linear_quant(const float* x, int64_t ldx, int64_t M, const Weight& W, int64_t N,
                  const float* bias, float* y, int64_t ldy) {
    if (M <= 0 || N <= 0) return;
    const Kernels k = kernels();
    const bool int8 = W.quant == QuantScheme::Int8;
    switch (k) {
#ifdef MAMBART_X86
        case Kernels::Avx2:
        case Kernels::Avx512:  // the GEMV: VNNI or AVX2's; the GEMM: AVX-512's panel tiles
            if (M <= kQuantGemvMaxM && W.cols % 32 == 0 && quant_vnni())
                return vnni::linear_quant(x, ldx, M, W, N, bias, y, ldy);
            if (k == Kernels::Avx512 && M > kQuantGemvMaxM) {
                if (int8) return avx512::qgemm<QuantScheme::Int8>(x, ldx, M, W, N, bias, y, ldy);
                return avx512::qgemm<QuantScheme::Int4>(x, ldx, M, W, N, bias, y, ldy);
            }
            if (int8) return avx2::linear_quant_simd<QuantScheme::Int8>(x, ldx, M, W, N, bias, y, ldy);
            return avx2::linear_quant_simd<QuantScheme::Int4>(x, ldx, M, W, N, bias, y, ldy);
#endif
#ifdef MAMBART_ARM64
        case Kernels::Neon:
        case Kernels::NeonBf16:
            if (int8) return neon::linear_quant_simd<QuantScheme::Int8>(x, ldx, M, W, N, bias, y, ldy);
            return neon::linear_quant_simd<QuantScheme::Int4>(x, ldx, M, W, N, bias, y, ldy);
#endif
        default: return linear_quant_portable(x, ldx, M, W, N, bias, y, ldy);
    }
}

const char* linear_quant_kernels() {
    switch (kernels()) {
#ifdef MAMBART_X86
        case Kernels::Avx2:
        case Kernels::Avx512: return quant_vnni() ? "avx512vnni" : "avx2";
#endif
        case Kernels::Neon:
        case Kernels::NeonBf16: return "neon";
        default: return "generic";
    }
}

void dequantize_rows(const Weight& W, int64_t r0, int64_t n, float* out) {
    for (int64_t i = 0; i < n; ++i) dequant_row_portable(W, r0 + i, out + i * W.cols);
}

}  // namespace cpu
}  // namespace mambart

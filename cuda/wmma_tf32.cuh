// cuda/wmma_tf32.cuh: the tensor-core tile helpers of the chunked scans (cuda/ssd_chunked.cu,
// cuda/mamba3_chunked.cu): 64 x 64 fp32 output tiles computed by 4 warps (each a 32 x 32 quarter
// = 2 x 2 WMMA m16n16k8 fragments) from operands staged in shared memory, with TF32 operands
// (plain, or split into hi + lo for fp32-like accuracy: see ssd_chunked.cu's header) and fp32
// accumulation. Needs sm_80+. Include only from .cu files (an anonymous namespace inside).
#pragma once

#include <mma.h>

#include <cstdint>
#include <type_traits>

namespace mambart {
namespace cuda {
namespace {

using namespace nvcuda;

constexpr int kT = 64;         // output tile edge (l, s, p, n)
constexpr int kKs = 32;        // k-slice staged per step (C·Bᵀ, C·Sᵀ over n; Xᵀ·B over s)
constexpr int kThreads = 128;  // 4 warps; warp w owns rows 32 (w / 2) .. +31, cols 32 (w % 2) ..
constexpr int kLdT = kT + 4;   // shared row stride of 64-wide tiles (multiple of 4: WMMA ldm)
constexpr int kLdK = kKs + 4;  // shared row stride of 32-wide tiles

// ---- tensor-core helpers -----------------------------------------------------------------------

using FragC = wmma::fragment<wmma::accumulator, 16, 16, 8, float>;
template <typename Layout>
using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, Layout>;
template <typename Layout>
using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, Layout>;

// Rounds a loaded fragment to TF32 in place (hi) and, for the split form, writes the rounded
// remainder (lo = tf32(v − hi)). Fragment elements are handled one by one: valid for any layout.
template <bool kSplit, typename Frag>
__device__ __forceinline__ void to_tf32(Frag& hi, Frag& lo) {
#pragma unroll
    for (int i = 0; i < hi.num_elements; ++i) {
        const float v = hi.x[i];
        const float h = wmma::__float_to_tf32(v);
        hi.x[i] = h;
        if (kSplit) lo.x[i] = wmma::__float_to_tf32(v - h);
    }
}

// Address of the 16 x 8 (A) or 8 x 16 (B) fragment at (row r, col k) / (row k, col c) of a
// shared matrix in the given layout with leading dimension ld.
template <typename Layout>
__device__ __forceinline__ const float* at(const float* m, int ld, int row, int col) {
    return std::is_same<Layout, wmma::row_major>::value ? m + row * ld + col : m + col * ld + row;
}

// A warp's 32 x 32 product: acc[i][j] += A[16 i .., 0 .. K) · B[0 .. K, 16 j ..), with A (32 x K)
// and B (K x 32) in shared memory (already offset to the warp's rows / columns). K % 8 == 0.
// Pointers 32-byte aligned, ld % 4 == 0 (WMMA's requirements for tf32/float).
template <bool kSplit, typename LA, typename LB>
__device__ __forceinline__ void warp_mma(FragC (&acc)[2][2], const float* A, int lda,
                                         const float* B, int ldb, int K) {
    for (int k0 = 0; k0 < K; k0 += 8) {
        FragA<LA> a[2], a_lo[2];
        FragB<LB> b[2], b_lo[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            wmma::load_matrix_sync(a[i], at<LA>(A, lda, 16 * i, k0), lda);
            to_tf32<kSplit>(a[i], a_lo[i]);
        }
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            wmma::load_matrix_sync(b[j], at<LB>(B, ldb, k0, 16 * j), ldb);
            to_tf32<kSplit>(b[j], b_lo[j]);
        }
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                if (kSplit) {  // small terms first
                    wmma::mma_sync(acc[i][j], a_lo[i], b[j], acc[i][j]);
                    wmma::mma_sync(acc[i][j], a[i], b_lo[j], acc[i][j]);
                }
                wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
            }
    }
}

__device__ __forceinline__ void zero(FragC (&acc)[2][2]) {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
}

// Stages a kRows x kW tile into shared dst (row stride ldd, 16-byte aligned rows):
//   dst[r][k] = src[r * ld + c0 + k] · (scale ? scale[r] : 1)   for r < nrows, c0 + k < ncols,
//   0 elsewhere. `vec`: src rows and c0 allow 16-byte loads (src, ld, c0 multiples of 4 floats).
template <int kRows, int kW>
__device__ __forceinline__ void stage(float* dst, int ldd, const float* src, int64_t ld,
                                      int nrows, int64_t c0, int64_t ncols, bool vec,
                                      const float* scale) {
    constexpr int kV = kW / 4;  // float4 per row
    for (int idx = threadIdx.x; idx < kRows * kV; idx += kThreads) {
        const int r = idx / kV, k = (idx % kV) * 4;
        const int64_t col = c0 + k;
        float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (r < nrows && col < ncols) {
            const float* p = src + r * ld + col;
            const int64_t rem = ncols - col;
            if (vec && rem >= 4) {
                v = *reinterpret_cast<const float4*>(p);
            } else {
                v.x = p[0];
                if (rem > 1) v.y = p[1];
                if (rem > 2) v.z = p[2];
                if (rem > 3) v.w = p[3];
            }
            if (scale) {
                const float f = scale[r];
                v.x *= f;
                v.y *= f;
                v.z *= f;
                v.w *= f;
            }
        }
        *reinterpret_cast<float4*>(dst + r * ldd + k) = v;
    }
}

}  // namespace
}  // namespace cuda
}  // namespace mambart

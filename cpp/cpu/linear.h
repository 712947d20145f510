// CPU matrix kernels behind every projection: y = x · Wᵀ (+ bias).
//
// The weight keeps its storage dtype (fp32, fp16 or bf16) and is converted to fp32 on the fly;
// activations and accumulation are fp32. Two regimes:
//   - M small (decode, batch 1..16, a speculative verification pass): bandwidth-bound GEMV,
//     each weight row read once per call, each output summed as at M = 1;
//   - M large (prefill): compute-bound GEMM.
// Both run on the current thread pool (cpu/pool.h; serially where there is none) and never
// allocate on the decode path beyond thread-local scratch sized once.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "dtype.h"
#include "op_params.h"

namespace mambart {
namespace cpu {

// y[M, N] = x[M, K] · W[N, K]ᵀ + bias[N]
//   x:    (M, K) fp32, row stride ldx (elements, >= K)
//   W:    (N, K) in `w_dtype`, contiguous rows (row stride K)
//   bias: (N) fp32 or nullptr
//   y:    (M, N) fp32, row stride ldy (elements, >= N); must not alias x
void linear(const float* x, int64_t ldx, int64_t M, int64_t K,
            const void* W, DType w_dtype, int64_t N,
            const float* bias,
            float* y, int64_t ldy);

// y[M, N] = x[M, K] · dequant(W)[N, K]ᵀ + bias[N] for a quantized weight (W.quant Int8 or
// Int4, layout in op_params.h), K = W.cols, N <= W.rows. The weights are dequantized in
// registers: the GEMV (M <= 8, decode) sums each scale group's products and scales the group's
// sum; the GEMM dequantizes each panel of 16 rows to fp32 once and runs the float micro-kernel.
void linear_quant(const float* x, int64_t ldx, int64_t M, const Weight& W, int64_t N,
                  const float* bias, float* y, int64_t ldy);

// The quantized GEMV's kernels: "avx512vnni" (x86-64 with AVX512F/BW/VL/VNNI: the activations
// rounded to int8 per block, integer dot products; see linear.cpp), "avx2", "neon" or "generic"
// (both fp32 activations). The GEMM keeps fp32 activations everywhere.
const char* linear_quant_kernels();

// Rows [r0, r0 + n) of a quantized weight, dequantized: out (n, W.cols) fp32.
void dequantize_rows(const Weight& W, int64_t r0, int64_t n, float* out);

// The machine's read bandwidth as the projections could see it: a buffer of `bytes` (allocated
// and written once here) summed `passes` times on the current pool (cpu/pool.h), each pass
// split into 64 KiB blocks claimed by its threads. Returns each pass's bytes per second.
std::vector<double> read_bandwidth(int64_t bytes, int passes);

// The projection kernels this process runs: "avx2" (x86-64 with AVX2, FMA and F16C), "avx512"
// (those and AVX-512 F + DQ: the GEMV of 2 to 16 rows in 16-lane registers, the same
// sums as avx2's), "neon"
// (aarch64), "neon+bf16" (aarch64 with BF16: bf16 weights' GEMM through BFMMLA, the rest NEON)
// or "generic" (any other CPU, or the cpu_portable option set). Chosen once, at the first call,
// from the CPU itself (CPUID, HWCAP / HWCAP2), not from the compiler flags.
const char* linear_kernels();

// The CPU's SIMD features as read for that choice, space-separated (x86-64: "avx2 fma f16c
// avx512f avx512dq avx512bf16"; aarch64: "fp asimd fphp asimdhp asimddp sve bf16 i8mm"), those present.
const std::string& cpu_features();

}  // namespace cpu
}  // namespace mambart

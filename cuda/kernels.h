// cuda/kernels.h: the host-side API of the CUDA kernels: one POD params struct and one launcher
// per kernel. The only CUDA-facing header that cpp/cuda/backend_cuda.cpp sees.
//
// Conventions: sizes and strides in elements (int64_t); pointers are device pointers; every
// launcher validates its params (throws InvalidArgument / Unsupported naming the field) and then
// enqueues asynchronously on `stream`, checking the launch (CudaError names the kernel).
// Activations are fp32; large weights are fp32, fp16 or bf16 (`dtype`); states are fp32.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "dtype.h"

namespace mambart {
namespace cuda {

struct EmbeddingParams {
    const int32_t* ids;   // (n)
    const void* table;    // (V, d) in `dtype`
    DType dtype;
    float* out;           // (n, d)
    int64_t n, d;
};
void launch_embedding(const EmbeddingParams& p, cudaStream_t stream);

struct AddNormParams {
    float* residual;      // (n, d) inout: residual += hidden
    const float* hidden;  // (n, d) or nullptr
    const float* w;       // (d)
    const float* b;       // (d) or nullptr (LayerNorm only)
    bool rms;             // RMSNorm (true) or LayerNorm
    float eps;
    float* out;           // (n, d)
    int64_t n, d;
};
void launch_add_norm(const AddNormParams& p, cudaStream_t stream);

struct LinearParams {
    const float* x;       // (M, K) row stride ldx
    int64_t ldx;
    const void* W;        // (>= N, K) in `dtype`, contiguous rows
    DType dtype;
    const float* bias;    // (N) or nullptr
    float* y;             // (M, N) row stride ldy
    int64_t ldy;
    int64_t M, N, K;
    bool prefetch;        // set by launch_linear (weight_prefetch_enabled()); callers leave it
};
// M <= kGemvMaxRows: a bandwidth-bound GEMV; larger M: a tiled tensor-core GEMM (fp16/bf16
// weights; x rounded to the weight dtype, fp32 accumulation) or an fp32 SIMT GEMM.
constexpr int64_t kGemvMaxRows = 8;
void launch_linear(const LinearParams& p, cudaStream_t stream);

// The operand of a library GEMM (cpp/cuda/cublas_gemm.h): out[m, k] = dtype(x[m * ldx + k]),
// contiguous (M, K) in `dtype` (F16 or BF16, round to nearest even).
void launch_rows_to_half(const float* x, int64_t ldx, int64_t M, int64_t K, void* out,
                         DType dtype, cudaStream_t stream);
// y[m * ldy + n] += bias[n] for m < M, n < N.
void launch_add_bias(float* y, int64_t ldy, const float* bias, int64_t M, int64_t N,
                     cudaStream_t stream);

struct Conv1dParams {
    const float* x;       // (B, L, C) row stride ld_x
    int64_t ld_x;
    float* conv_state;    // (B, C, W) inout, oldest first
    const float* weight;  // (C, W)
    const float* bias;    // (C) or nullptr
    float* out;           // (B, L, C) contiguous, post-SiLU
    int64_t B, L, C, W;
};
constexpr int64_t kConvMaxWidth = 8;
void launch_conv1d(const Conv1dParams& p, cudaStream_t stream);

struct SelectiveScanParams {
    const float* x;       // (B, L, E)
    const float* dt;      // (B, L, E) before bias + softplus
    const float* Bm;      // (B, L, N) row stride ld_bc
    const float* Cm;      // (B, L, N) row stride ld_bc
    int64_t ld_bc;
    const float* z;       // (B, L, E) row stride ld_z
    int64_t ld_z;
    const float* A;       // (E, N)
    const float* D;       // (E)
    const float* dt_bias; // (E)
    float* ssm_state;     // (B, E, N) inout
    float* y;             // (B, L, E)
    int64_t B, L, E, N;
    bool lanes;           // the lane-group kernels even where N <= kCptMaxN (comparison switch)
};
// d_state up to which the scans map a channel to one thread (selective_scan.cu).
constexpr int64_t kCptMaxN = 16;
// The sequential form (any L; used for L == 1 and short prompts).
void launch_selective_scan(const SelectiveScanParams& p, cudaStream_t stream);

// The chunked (time-parallel) form for long prompts: segments of T tokens scanned in parallel
// from a zero state, a sequential pass over segments, then each segment again for y.
struct SelectiveScanChunkedParams {
    SelectiveScanParams s;  // the scan's inputs and outputs (as for launch_selective_scan)
    int64_t T;              // segment length, >= 1; ceil(L / T) <= 65535
    float* ws;              // workspace of selective_scan_chunked_workspace_floats(s, T) floats
};
// Prompts shorter than this use the sequential form.
constexpr int64_t kScanChunkedMinL = 64;
// The segment length for `s` (a heuristic: enough segments to fill the GPU, >= 32 tokens); the
// chunked form only pays when it is < L.
int64_t selective_scan_segment_len(const SelectiveScanParams& s);
int64_t selective_scan_chunked_workspace_floats(const SelectiveScanParams& s, int64_t T);
void launch_selective_scan_chunked(const SelectiveScanChunkedParams& p, cudaStream_t stream);

struct SsdParams {
    const float* x;       // (B, L, H*P) row stride ld_xbc
    const float* Bm;      // (B, L, G*N) row stride ld_xbc
    const float* Cm;      // (B, L, G*N) row stride ld_xbc
    int64_t ld_xbc;
    const float* dt;      // (B, L, H) row stride ld_dt
    int64_t ld_dt;
    const float* z;       // (B, L, H*P) row stride ld_z, or nullptr
    int64_t ld_z;
    const float* A;       // (H)
    const float* D;       // (H)
    const float* dt_bias; // (H)
    float dt_min, dt_max;
    float* ssm_state;     // (B, H, P, N) inout
    float* y;             // (B, L, H*P)
    int64_t B, L, H, P, G, N;
};
// The recurrent form (any L; used for L == 1, the decode step).
void launch_ssd_scan(const SsdParams& p, cudaStream_t stream);

// The chunked SSD algorithm (prefill): chunk cumsum, C·Bᵀ, chunk states, state passing, chunk
// output, the matrix products on tensor cores (TF32 WMMA; see cuda/ssd_chunked.cu).
struct SsdChunkedParams {
    SsdParams s;          // the scan's inputs and outputs (as for launch_ssd_scan)
    int64_t Q;            // chunk length (config chunk_size), >= 1; the kernels run min(Q, 256)
    float* ws;            // workspace of ssd_chunked_workspace_floats(s, Q) floats, 32-byte aligned
    bool tf32 = false;    // false: split-TF32 products (3 per product, fp32-like accuracy);
                          // true: plain TF32 (one product, ~1e-3 relative error)
};
int64_t ssd_chunked_workspace_floats(const SsdParams& s, int64_t Q);
void launch_ssd_chunked(const SsdChunkedParams& p, cudaStream_t stream);

// Fused Mamba-1 decode step (L = 1), after conv and x_proj:
//   dt = dt_proj(xdbl[:, :R]) (weights in `dtype`); δ = softplus(dt + dt_bias);
//   h <- exp(δ A) h + δ x B;  y = (C·h + D x) · silu(z)
struct Mamba1DecodeParams {
    const float* x;       // (B, E) post-conv x, contiguous
    const float* xdbl;    // (B, ld_xdbl): [dt_low (R) | B (N) | C (N)]
    int64_t ld_xdbl;
    const void* W_dt;     // (E, R) in `dtype`
    DType dtype;
    const float* z;       // (B, E) row stride ld_z
    int64_t ld_z;
    const float* A;       // (E, N)
    const float* D;       // (E)
    const float* dt_bias; // (E)
    float* ssm_state;     // (B, E, N) inout
    float* y;             // (B, E)
    int64_t B, E, N, R;
};
void launch_mamba1_decode(const Mamba1DecodeParams& p, cudaStream_t stream);

// Fused Mamba-2 decode step (L = 1): conv update + SiLU of [x | B | C], dt softplus + clamp,
// SSM state update, C·s + D x, optional silu(z) gate.
struct Mamba2DecodeParams {
    const float* xbc;     // (B, ld_xbc): pre-conv [x (H*P) | B (G*N) | C (G*N)]
    int64_t ld_xbc;
    const float* dt;      // (B, ld_dt)
    int64_t ld_dt;
    float* conv_state;    // (B, H*P + 2*G*N, W) inout, oldest first
    const float* conv_w;  // (H*P + 2*G*N, W)
    const float* conv_b;  // (H*P + 2*G*N) or nullptr
    int64_t W;
    const float* z;       // (B, H*P) row stride ld_z, or nullptr
    int64_t ld_z;
    const float* A;       // (H)
    const float* D;       // (H)
    const float* dt_bias; // (H)
    float dt_min, dt_max;
    float* ssm_state;     // (B, H, P, N) inout
    float* y;             // (B, H*P)
    int* counters;        // (B*G) device ints, zero between launches (the kernel restores them)
    int64_t B, H, P, G, N;
};
constexpr int64_t kDecodeCounters = 1 << 16;
void launch_mamba2_decode(const Mamba2DecodeParams& p, cudaStream_t stream);

struct GatedRmsNormParams {
    const float* y;       // (n, E)
    const float* z;       // (n, E) row stride ld_z
    int64_t ld_z;
    const float* w;       // (E)
    float* out;           // (n, E)
    int64_t n, E, group_size;
    float eps;
};
void launch_gated_rmsnorm(const GatedRmsNormParams& p, cudaStream_t stream);

struct SiluGateParams {
    float* y;             // (n, E) inout
    const float* z;       // (n, E) row stride ld_z
    int64_t ld_z;
    int64_t n, E;
};
void launch_silu_gate(const SiluGateParams& p, cudaStream_t stream);

struct SampleParams {
    const float* logits;        // (B, V) row stride ld
    int64_t ld;
    int64_t B, V;
    float temperature;          // 0: greedy
    int64_t top_k;              // 0: off
    float top_p;                // 1: off
    float min_p;                // 0: off
    float repetition_penalty;   // 1: off (then `seen` may be null)
    const uint64_t* rng;        // (B, 3) device: per row (seed, stream, counter) of the draw
                                // uniform(seed, stream, counter), read when the kernel runs
    uint8_t* seen;              // (B, V) inout: ids seen per row (the sampled id is marked)
    int32_t* out;               // (B) the sampled ids; -1 where the row has a non-finite logit
};
// Samples one token per row with the semantics of mambart::Sampler (cpp/sampling.h).
void launch_sample(const SampleParams& p, cudaStream_t stream);

// Programmatic dependent launch for the decode chain's kernels (see common.cuh): on for devices of
// compute capability 9.0 and newer unless MAMBART_CUDA_PDL=0 (the backend decides; per process).
void set_programmatic_launch(bool on);
// Whether the GEMVs prefetch their weight rows into L2 before pdl_wait() (only useful with PDL:
// the prefetch overlaps the previous kernel). On by default; MAMBART_CUDA_PREFETCH=0 turns it off.
void set_weight_prefetch(bool on);

// Converts n elements of `src` (src_dtype) into `dst` (dst_dtype), on the device.
void launch_convert(const void* src, DType src_dtype, void* dst, DType dst_dtype, int64_t n,
                    cudaStream_t stream);

}  // namespace cuda
}  // namespace mambart

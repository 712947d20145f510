// cuda/kernels.h: the host-side API of the CUDA kernels: one POD params struct and one launcher
// per kernel. The only CUDA-facing header that cpp/cuda/backend_cuda.cpp sees. The ops that the
// Backend interface has take the Backend's own params structs (cpp/op_params.h: ConvParams,
// SelectiveScanParams, SsdParams, Mamba1DecodeParams, Mamba2DecodeParams, DeviceSampleParams),
// defined once for backend and kernel alike; the kernel-only ops define theirs here.
//
// Conventions: sizes and strides in elements (int64_t); pointers are device pointers; every
// launcher validates its params (throws InvalidArgument / Unsupported naming the field) and then
// enqueues asynchronously on `stream`, checking the launch (CudaError names the kernel).
// Activations are fp32; large weights are fp32, fp16 or bf16 (`dtype`); states are fp32.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "dtype.h"
#include "op_params.h"

namespace mambart {
namespace cuda {

struct EmbeddingParams {
    const int32_t* ids;   // (n)
    const void* table;    // (V, d) in `dtype`
    DType dtype;
    float* out;           // (n, d)
    int64_t n, d;
    int64_t V;            // table rows: an id outside [0, V) gives a zero row
};
void launch_embedding(const EmbeddingParams& p, cudaStream_t stream);

struct AddNormParams {
    float* residual;      // (n, d) inout: residual += hidden
    const float* hidden;  // (n, d) or nullptr
    const float* w;       // (d) or nullptr (no weight)
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
    // The fused decode projection (ProjParams, cpp/op_params.h; GEMV rows only): the norm
    // prologue (x is then not read; M <= kFusedMaxRows, M K <= kFusedMaxNormElems), the
    // accumulating epilogue and Mamba-1's conv step.
    ProjNorm norm = {};
    ProjGate gate = {};   // Mamba-2's gated norm of x as the prologue (same limits as norm)
    bool accumulate = false;
    ProjConv conv = {};
};
// M <= kGemvMaxRows: a bandwidth-bound GEMV; larger M: a tiled tensor-core GEMM (fp16/bf16
// weights; x rounded to the weight dtype, fp32 accumulation) or an fp32 SIMT GEMM.
constexpr int64_t kGemvMaxRows = 8;
constexpr int64_t kFusedMaxRows = 4;
constexpr int64_t kFusedMaxNormElems = 11264;  // 44 KB of prologue rows in shared memory (with
                                               // the static arrays, within the 48 KB default)
void launch_linear(const LinearParams& p, cudaStream_t stream);
// Decode batches on tensor cores (cuda/linear.cu, gemv_tc_kernel): x rounded to the weight
// dtype, fp32 sums; for 1 <= M <= kGemvTcMaxRows fp16/bf16 weights with K % 32 == 0, W and x
// 16-byte aligned, ldx % 4 == 0, and none of the fused projection's parts (gemv_tc_supported).
constexpr int64_t kGemvTcMaxRows = 32;
bool gemv_tc_supported(const LinearParams& p);
void launch_gemv_tc(const LinearParams& p, cudaStream_t stream);

// Quantized weights (issue 18; cuda/linear_quant.cu, layouts in op_params.h Weight).
struct QuantLinearParams {
    const float* x;       // (M, K) row stride ldx
    int64_t ldx;
    const void* W;        // int8 (>= N, K) or int4 bytes (>= N, K / 2), contiguous rows
    QuantScheme quant;    // Int8 or Int4
    const float* scales;  // (>= N, K / group) fp32
    int64_t group;        // Int8: K
    const float* bias;    // (N) or nullptr
    float* y;             // (M, N) row stride ldy
    int64_t ldy;
    int64_t M, N, K;      // M <= kGemvMaxRows
    bool prefetch;        // set by the launcher (weight_prefetch_enabled()); callers leave it
};
// The decode GEMV, dequantizing in registers (M <= kGemvMaxRows).
void launch_linear_quant(const QuantLinearParams& p, cudaStream_t stream);
// out (rows, K) bf16 = dequant(W) rows [r0, r0 + rows): the operand of a bf16 GEMM (prefill).
void launch_dequant_bf16(const void* W, QuantScheme q, const float* scales, int64_t group,
                         int64_t K, int64_t r0, int64_t rows, void* out, cudaStream_t stream);
// launch_embedding for a quantized table (p.table: the quantized data, p.dtype ignored).
void launch_embedding_quant(const EmbeddingParams& p, QuantScheme q, const float* scales,
                            int64_t group, cudaStream_t stream);

// The operand of a library GEMM (cpp/cuda/cublas_gemm.h): out[m, k] = dtype(x[m * ldx + k]),
// contiguous (M, K) in `dtype` (F16 or BF16, round to nearest even).
void launch_rows_to_half(const float* x, int64_t ldx, int64_t M, int64_t K, void* out,
                         DType dtype, cudaStream_t stream);
// y[m * ldy + n] += bias[n] for m < M, n < N.
void launch_add_bias(float* y, int64_t ldy, const float* bias, int64_t M, int64_t N,
                     cudaStream_t stream);

using Conv1dParams = ConvParams;  // cpp/op_params.h
constexpr int64_t kConvMaxWidth = 8;
void launch_conv1d(const Conv1dParams& p, cudaStream_t stream);

// d_state up to which the scans map a channel to one thread (selective_scan.cu).
constexpr int64_t kCptMaxN = 16;
// The sequential form (any L; used for L == 1 and short prompts). `lanes`: the lane-group
// kernels even where N <= kCptMaxN (the cuda_scan=lanes comparison switch).
void launch_selective_scan(const SelectiveScanParams& p, bool lanes, cudaStream_t stream);

// The chunked (time-parallel) form for long prompts: segments of T tokens scanned in parallel
// from a zero state, a sequential pass over segments, then each segment again for y.
struct SelectiveScanChunkedParams {
    SelectiveScanParams s;  // the scan's inputs and outputs (as for launch_selective_scan)
    int64_t T;              // segment length, >= 1; ceil(L / T) <= 65535
    float* ws;              // workspace of selective_scan_chunked_workspace_floats(s, T) floats
    bool lanes;             // as for launch_selective_scan
};
// Prompts shorter than this use the sequential form.
constexpr int64_t kScanChunkedMinL = 64;
// The segment length for `s` (a heuristic: enough segments to fill the GPU, >= 32 tokens); the
// chunked form only pays when it is < L.
int64_t selective_scan_segment_len(const SelectiveScanParams& s, bool lanes);
int64_t selective_scan_chunked_workspace_floats(const SelectiveScanParams& s, int64_t T);
void launch_selective_scan_chunked(const SelectiveScanChunkedParams& p, cudaStream_t stream);

// The recurrent form (any L; used for L == 1, the decode step).
void launch_ssd_scan(const SsdParams& p, cudaStream_t stream);

// The chunked SSD algorithm (prefill): chunk cumsum, C·Bᵀ, chunk states, state passing, chunk
// output, the matrix products on tensor cores (TF32 WMMA; see cuda/ssd_chunked.cu).
struct SsdChunkedParams {
    SsdParams s;          // the scan's inputs and outputs (as for launch_ssd_scan; chunk_size
                          // is not read: Q is)
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
void launch_mamba1_decode(const Mamba1DecodeParams& p, cudaStream_t stream);

// Fused Mamba-2 decode step (L = 1): conv update + SiLU of [x | B | C], dt softplus + clamp,
// SSM state update, C·s + D x, optional silu(z) gate. `counters`: (B*G) device ints, zero
// between launches (the kernel restores them).
constexpr int64_t kDecodeCounters = 1 << 16;
// wide: 64 rows a block where that still fills the GPU (batched decode), else 8 (see
// decode_fused.cu).
void launch_mamba2_decode(const Mamba2DecodeParams& p, bool wide, int* counters,
                          cudaStream_t stream);

// The Mamba-3 layer scan, recurrent form (cuda/mamba3.cu; Mamba3ScanParams in cpp/op_params.h).
void launch_mamba3_scan(const Mamba3ScanParams& p, cudaStream_t stream);

// The Mamba-3 layer scan in the chunked form (prefill; cuda/mamba3_chunked.cu): the same results
// and final states as launch_mamba3_scan up to rounding, the matrix products on tensor cores.
struct Mamba3ChunkedParams {
    Mamba3ScanParams s;   // as for launch_mamba3_scan
    float* ws;            // mamba3_chunked_workspace_floats(s) floats, 32-byte aligned
    bool tf32 = false;    // false: split-TF32 products (fp32-like); true: plain TF32
};
// Prompts shorter than this use the recurrent form (the chunked form's fixed cost: 6 launches).
constexpr int64_t kMamba3ChunkedMinL = 32;
// Whether the chunked kernels take these sizes (else the recurrent form runs).
bool mamba3_chunked_supported(const Mamba3ScanParams& s);
int64_t mamba3_chunked_workspace_floats(const Mamba3ScanParams& s);
void launch_mamba3_chunked(const Mamba3ChunkedParams& p, cudaStream_t stream);

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
// y[i, j] *= gelu(z[i * ld_z + j]) (exact erf GELU), the same params.
void launch_gelu_gate(const SiluGateParams& p, cudaStream_t stream);

// y[i] = relu(y[i])^2 for i < n.
void launch_relu_sq(float* y, int64_t n, cudaStream_t stream);
// y[i] *= s (cuda/elementwise.cu)
void launch_scale(float* y, int64_t n, float s, cudaStream_t stream);
// Routed SwiGLU experts (cuda/moe.cu; MoeParams in cpp/op_params.h): routing, then gather
// GEMVs per (row, slot); p.xy is not used.
void launch_moe(const MoeParams& p, cudaStream_t stream);

// Attention with a KV cache (cuda/attention.cu; AttentionParams in cpp/op_params.h): RoPE and
// the cache append, then a tiled online-softmax kernel (any L), or for L == 1 with scratch
// (partial, max_splits >= 2) split-K over the cache in min(max_splits, kAttnMaxSplits) parts
// and a combine; then pos += L. head_dim <= 256.
constexpr int64_t kAttnMaxSplits = 64;
void launch_attention(const AttentionParams& p, cudaStream_t stream);

using SampleParams = DeviceSampleParams;  // cpp/op_params.h
// Samples one token per row with the semantics of mambart::Sampler (cpp/sampling.h).
void launch_sample(const SampleParams& p, cudaStream_t stream);

// Programmatic dependent launch for the decode chain's kernels (see common.cuh): on for devices of
// compute capability 9.0 and newer unless MAMBART_CUDA_PDL=0 (the backend decides; per process).
void set_programmatic_launch(bool on);
// Whether the GEMVs prefetch their weight rows into L2 before pdl_wait() (only useful with PDL:
// the prefetch overlaps the previous kernel). On by default; MAMBART_CUDA_PREFETCH=0 turns it off.
void set_weight_prefetch(bool on);
// conv1d, the gated RMSNorm and the SSD state passing with their inputs loaded into registers
// ahead of use (MAMBART_CUDA_LOAD_AHEAD; per process).
void set_load_ahead(bool on);

// Converts n elements of `src` (src_dtype) into `dst` (dst_dtype), on the device.
void launch_convert(const void* src, DType src_dtype, void* dst, DType dst_dtype, int64_t n,
                    cudaStream_t stream);

// The persistent batch-1 decode (cuda/decode_persistent.cu, op_params.h PersistentDecodeParams):
// whether it can run these layers, and the launches (one per kPersistentMaxLayers layers, each
// cooperative, one block a multiprocessor of 16 warps, or 32 where warps >= 32; rows: 1, or 2 for
// warp-row GEMVs streaming two rows at once; prefetch: each block prefetches later stages'
// weight rows into L2; ring > 0: the weight ring of up to `ring` 16-byte cp.async copies in
// flight a thread, 16 warps, where its shared memory fits: 24, 16 or 8). Returns false,
// launching nothing, where persistent_decode_supported() is false.
constexpr int kPersistentMaxLayers = 16;
bool persistent_decode_supported(const PersistentDecodeParams& p);
bool launch_persistent_decode(const PersistentDecodeParams& p, int warps, int rows, bool prefetch,
                              int ring, cudaStream_t stream);

}  // namespace cuda
}  // namespace mambart

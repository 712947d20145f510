// L2 compute: the Backend interface. The model (L3) expresses a forward pass as a sequence of
// these ops on device buffers; a backend implements them (CPU: cpp/cpu/, CUDA: cpp/cuda/ over
// cuda/). The ops' parameter structs are in op_params.h, shared with the CUDA kernels.
//
// Conventions shared by every op:
//   - Activations are fp32 at this interface (a backend may compute in lower precision inside an
//     op, e.g. tensor-core GEMMs, but inputs and outputs are fp32 buffers). Conv states are fp32;
//     SSM states fp32, or bf16 on a backend that supports_state_dtype(BF16) when the option
//     state_dtype asks for it (the scan ops read bf16, compute in fp32, round when they write).
//   - Large weights keep their storage dtype (Weight::dtype); small per-channel parameters (norm
//     weights, conv weights and biases, A, D, dt biases) are fp32 (Param).
//   - Shapes use mamba_ssm's names: B batch rows, L tokens per row, d d_model, E d_inner, N
//     d_state, W d_conv, H nheads, P headdim, G ngroups. Row-major; "ld" is a row stride in
//     elements, letting ops read column slices of a wider buffer (e.g. x and z inside xz).
//   - All pointers are device pointers of the backend. Ops are asynchronous on backends that can
//     be; copy_to_host synchronises.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "config.h"
#include "dtype.h"
#include "op_params.h"

namespace mambart {

enum class DeviceKind { CPU, CUDA };

class Backend {
 public:
    virtual ~Backend() = default;
    virtual DeviceKind kind() const = 0;
    virtual std::string name() const = 0;
    // Host threads the ops run on (the CPU backend's pool, the caller included); 0 for device
    // backends.
    virtual int threads() const { return 0; }

    // ---- memory (allocation happens at load / stream set-up, never per token) ----
    virtual void* alloc(size_t bytes, const char* what) = 0;
    virtual void dealloc(void* p) noexcept = 0;
    virtual void copy_to_device(void* dst, const void* src, size_t bytes) = 0;
    virtual void copy_to_host(void* dst, const void* src, size_t bytes) = 0;
    virtual void copy_device(void* dst, const void* src, size_t bytes) = 0;
    virtual void zero(void* dst, size_t bytes) = 0;
    // Host memory for asynchronous copies (page-locked where the backend has it, so that a copy
    // does not wait for the device); free with dealloc_host. Throws OutOfMemory-like Error.
    virtual void* alloc_host(size_t bytes, const char* what);
    virtual void dealloc_host(void* p) noexcept;
    // copy_to_host without waiting: `dst` (from alloc_host on device backends) holds the bytes
    // once the work enqueued before this call has run, i.e. after wait_marker() of a marker
    // recorded after it. Synchronous backends copy at once.
    virtual void copy_to_host_async(void* dst, const void* src, size_t bytes) {
        copy_to_host(dst, src, bytes);
    }
    // A point in the backend's queue (0 on synchronous backends), and a wait for the work
    // enqueued before it (errors of that work are thrown here). Markers are recycled: a marker
    // kMaxMarkers or more records old waits for a later point (correct, possibly longer).
    static constexpr int kMaxMarkers = 16;
    virtual uint64_t record_marker() { return 0; }
    virtual void wait_marker(uint64_t marker) { (void)marker; }
    // `rows` blocks of `bytes` each, block k at dst + k * dst_pitch / src + k * src_pitch (one
    // State row across its layers). Device backends do it in one call (cudaMemcpy2DAsync).
    virtual void copy_device_2d(void* dst, size_t dst_pitch, const void* src, size_t src_pitch,
                                size_t bytes, size_t rows) {
        for (size_t k = 0; k < rows; ++k)
            copy_device(static_cast<char*>(dst) + k * dst_pitch,
                        static_cast<const char*>(src) + k * src_pitch, bytes);
    }
    virtual void zero_2d(void* dst, size_t pitch, size_t bytes, size_t rows) {
        for (size_t k = 0; k < rows; ++k) zero(static_cast<char*>(dst) + k * pitch, bytes);
    }
    // Bytes the backend can still allocate (device backends: free device memory), checked
    // before a model's weights are placed; UINT64_MAX where not known.
    virtual uint64_t free_memory() const { return UINT64_MAX; }
    // Places a weight from host memory (e.g. an mmap'd file) on the device in `dtype`. `keepalive`
    // is host memory that outlives the backend's use of `src` (CPU zero-copy views rely on it).
    // Returns the device pointer; `*owned` says whether dealloc() must free it.
    virtual const void* place_weight(const void* src, DType src_dtype, size_t numel, DType dtype,
                                     bool* owned) = 0;
    // Ops run on at most `rows` token rows of at most `cols` features each from now on: a backend
    // that needs scratch for that (e.g. CUDA's low-precision copy of a GEMM operand) allocates it
    // here, outside the hot path and outside graph captures. Called by Model::reserve.
    virtual void reserve_scratch(int64_t rows, int64_t cols) {
        (void)rows;
        (void)cols;
    }
    // Quantized weights of at most `cols` input features are placed (issue 18): a backend whose
    // prefill GEMM dequantizes them into a workspace allocates it here (CUDA: a bounded bf16
    // slab of rows), at load, outside the hot path. Bytes it holds are returned.
    virtual uint64_t reserve_dequant(int64_t cols) {
        (void)cols;
        return 0;
    }
    // Bytes reserve_scratch(rows, cols) holds afterwards (for estimates made before it runs).
    virtual uint64_t scratch_bytes(int64_t rows, int64_t cols) const {
        (void)rows;
        (void)cols;
        return 0;
    }

    // ---- ops ----
    // out[n, :] = table[ids[n], :]  (table rows >= max id; ids validated by the caller)
    virtual void embedding(const int32_t* ids, int64_t n, const Weight& table, float* out) = 0;
    // residual (n, d) inout: residual += hidden (when hidden != nullptr);
    // out (n, d) = norm(residual) * w (+ b for LayerNorm); w.data == nullptr: no weight (1).
    // out may be residual when hidden is nullptr (an in-place norm); out == nullptr: the add
    // alone (no norm; w and b unused).
    virtual void add_norm(float* residual, const float* hidden, const Param& w, const Param& b,
                          NormKind kind, float eps, int64_t n, int64_t d, float* out) = 0;
    // y[M, N] = x[M, K] · Wᵀ + bias, with row strides ldx / ldy; N may be < W.rows (first N rows).
    virtual void linear(const float* x, int64_t ldx, int64_t M, const Weight& W, int64_t N,
                        const float* bias, float* y, int64_t ldy) = 0;
    virtual void conv1d(const ConvParams& p) = 0;
    virtual void selective_scan(const SelectiveScanParams& p) = 0;
    virtual void ssd_scan(const SsdParams& p) = 0;
    // Grouped gated RMSNorm (norm_before_gate=False): v = y * silu(z);
    // out = v * rsqrt(mean_group(v²) + eps) * w, groups of `group_size` along each row of E.
    virtual void gated_rmsnorm(const float* y, const float* z, int64_t ld_z, const float* w,
                               int64_t n, int64_t E, int64_t group_size, float eps, float* out) = 0;
    // y (n, E) contiguous *= silu(z (n, E) row stride ld_z)
    virtual void silu_gate(float* y, const float* z, int64_t ld_z, int64_t n, int64_t E) = 0;
    // y (n, E) contiguous *= gelu(z (n, E) row stride ld_z), the exact (erf) GELU:
    // gelu(v) = v/2 (1 + erf(v / sqrt 2)) (a GeGLU MLP, Zamba2's "gelu").
    virtual void gelu_gate(float* y, const float* z, int64_t ld_z, int64_t n, int64_t E) = 0;
    // y (n, E) contiguous = relu(y)^2 (the MLP activation of Nemotron-H's relu2).
    virtual void relu_sq(float* y, int64_t n, int64_t E) = 0;
    // y (n) contiguous *= s (Granite's embedding / residual / logits multipliers).
    virtual void scale(float* y, int64_t n, float s) = 0;
    // Attention with a KV cache (op_params.h: AttentionParams); default: Unsupported naming the
    // backend.
    virtual void attention(const AttentionParams& p);
    // Mamba-3 layer scan (op_params.h); default: Unsupported naming the backend.
    virtual void mamba3_scan(const Mamba3ScanParams& p);
    // Routed SwiGLU experts (op_params.h: MoeParams); default: Unsupported naming the backend.
    virtual void moe(const MoeParams& p);
    // Fused decode steps (see Mamba1DecodeParams / Mamba2DecodeParams): false = not done.
    virtual bool mamba1_decode_fused(const Mamba1DecodeParams& p) {
        (void)p;
        return false;
    }
    virtual bool mamba2_decode_fused(const Mamba2DecodeParams& p) {
        (void)p;
        return false;
    }

    // A decode projection with its norm / residual add / conv step folded in (ProjParams):
    // whether this backend runs it for M rows of K input features (with a gated norm of
    // `groups` groups, or 0), and the op (default: Unsupported; callers ask first).
    virtual bool fused_projection(int64_t M, int64_t K, int64_t groups = 0) const {
        (void)M;
        (void)K;
        (void)groups;
        return false;
    }
    virtual void project(const ProjParams& p);

    // The persistent batch-1 decode of a run of layers (PersistentDecodeParams): false = not
    // done (nothing enqueued; the model runs the separate ops).
    virtual bool persistent_decode(const PersistentDecodeParams& p) {
        (void)p;
        return false;
    }

    // ---- decode fast path (optional; backends whose supports_graphs() is true) ----
    // Whether the SSM scan ops take a state of this dtype (op_params.h: ssm_state_bf16; option
    // state_dtype, issue 18). F32 always.
    virtual bool supports_state_dtype(DType dt) const { return dt == DType::F32; }
    virtual bool supports_graphs() const { return false; }
    // Runs what `record` enqueues. Graph backends record it once per `key` into a graph and
    // replay that graph for later calls with the same key: `record` must only enqueue ops (no
    // host reads, allocation or synchronisation), and the key must change whenever a buffer it
    // uses does (or clear_graphs()).
    virtual void run_graph(uint64_t key, const std::function<void()>& record) {
        (void)key;
        record();
    }
    virtual void clear_graphs() {}
    virtual void sample(const DeviceSampleParams& p);  // default: throws Unsupported
    virtual void synchronize() {}
};

// threads: the CPU pool's size; 0 takes the cpu_threads option, and where that is 0 too the
// cores this process may run on (its CPU affinity).
std::unique_ptr<Backend> make_cpu_backend(int threads = 0);
// Device names: "cpu", "cuda", "cuda:N", "auto". Throws InvalidArgument / Unsupported.
// `threads` (>= 0) is the CPU backend's (make_cpu_backend); device backends ignore it.
std::unique_ptr<Backend> make_backend(const std::string& device, int threads = 0);
bool cuda_available();

}  // namespace mambart

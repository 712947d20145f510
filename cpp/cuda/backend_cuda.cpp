// The CUDA backend: owns the device, a stream, the pinned staging buffers for weight uploads and
// the cache of decode graphs; fills the kernels' params structs (cuda/kernels.h). The only file
// under cpp/ that sees cuda/.
//
// Everything is enqueued on one non-blocking stream; copy_to_host is the only synchronisation.
// Weights are uploaded through two pinned staging buffers (double-buffered async copies),
// converted to the requested dtype on the host while staged.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <unordered_map>
#include <vector>

#include "backend.h"
#include "cublas_gemm.h"
#include "error.h"
#include "options.h"
#include "../../cuda/check.h"
#include "../../cuda/kernels.h"

namespace mambart {
namespace {

using cuda::check;

class CudaBackend final : public Backend {
 public:
    explicit CudaBackend(int device) : device_(device) {
        int count = 0;
        if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
            (void)cudaGetLastError();
            throw Unsupported("device='cuda': no CUDA device is available");
        }
        if (device < 0 || device >= count)
            throw InvalidArgument(str_cat("device='cuda:", device, "': only ", count,
                                          " CUDA device(s) present"));
        check(cudaSetDevice(device_), "cudaSetDevice");
        cudaDeviceProp prop{};
        check(cudaGetDeviceProperties(&prop, device_), "cudaGetDeviceProperties");
        gpu_name_ = prop.name;
        if (prop.major < 8)
            throw Unsupported(str_cat("device='cuda:", device, "': ", gpu_name_, " has compute capability ",
                                      prop.major, ".", prop.minor, "; mambart needs 8.0 or newer"));
        check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
        // The runtime options (cpp/options.h, docs/options.md): read once, here.
        const RuntimeOptions opt = runtime_options();
        graphs_enabled_ = opt.cuda_graphs;  // false: run decode steps eagerly
        persistent_warps_ = int(opt.cuda_persistent_warps);
        persistent_rows_ = int(opt.cuda_persistent_rows);
        cooperative_ = prop.cooperativeLaunch != 0;
        persistent_prefetch_ = opt.cuda_persistent_prefetch;
        persistent_ring_ = int(opt.cuda_persistent_ring);
        fused_enabled_ = opt.cuda_fused;    // false: decode steps run the unfused ops
        ssd_chunked_ = opt.cuda_ssd != CudaSsd::Recurrent;  // prefill SSD in the chunked form
        ssd_tf32_ = opt.cuda_ssd == CudaSsd::Tf32;          // plain TF32 products
        ssd_auto_ = opt.cuda_ssd == CudaSsd::Auto;          // plain TF32 for half layers
        // The Mamba-1 prefill scan (cuda/selective_scan.cu). Default: the time-parallel
        // (chunked) form for long scans with a thread per channel (d_state <= 16), the
        // sequential form with lane groups (d_state > 16; in the lane-group mapping the chunked
        // form measured slower at mamba-1.4b's shape: BENCHMARKS.md, History). "chunked": the
        // chunked form for every long scan;
        // "sequential": never; "lanes": the sequential lane-group kernel even for d_state <= 16
        // (the previous default, kept for comparison).
        if (opt.cuda_scan == CudaScan::Chunked) scan_mode_ = ScanMode::Chunked;
        if (opt.cuda_scan == CudaScan::Sequential) scan_mode_ = ScanMode::Sequential;
        if (opt.cuda_scan == CudaScan::Lanes) scan_mode_ = ScanMode::Lanes;
        // cuBLAS for the projections of M >= cublas_min_rows_ token rows (fp16/bf16 weights),
        // where libcublas loads; cublas = false keeps the hand-written GEMM everywhere.
        if (opt.cublas) cublas_ = std::make_unique<cublas::Gemm>(stream_);
        cublas_min_rows_ = opt.cublas_min_rows;
        gemv_tc_ = opt.cuda_gemv_tc;
        m2_wide_ = opt.cuda_m2_decode_wide;
        // The fused decode steps up to this many rows; larger batches run the separate ops.
        // Mamba-2: each fused block redoes the group's B/C conv, which costs more than it saves
        // at large batches (mamba2-1.3b b128 7,282 vs 6,153 tokens/s on an H100). Mamba-1: the
        // separate ops run dt_proj as one GEMM and the scan with a thread per channel, which
        // many rows fill (mamba-1.4b b32 10,038 vs 7,928, b128 23,518 vs 12,870 tokens/s; at
        // b8 3,160 vs 3,109).
        fused_max_batch_ = opt.cuda_fused_max_batch;
        // Programmatic dependent launch (Hopper and newer) for the decode chain's kernels.
        cuda::set_programmatic_launch(prop.major >= 9 && opt.cuda_pdl);
        // The GEMVs' L2 prefetch of their weight rows ahead of pdl_wait (with PDL only).
        cuda::set_weight_prefetch(opt.cuda_prefetch);
        cuda::set_load_ahead(opt.cuda_load_ahead);
        free_bytes_limit_ = opt.cuda_free_bytes_limit;
        // (B * G) counters of the fused Mamba-2 decode kernel; zero, restored by each launch.
        counters_ = static_cast<int*>(alloc(size_t(cuda::kDecodeCounters) * sizeof(int),
                                            "decode counters"));
        check(cudaMemset(counters_, 0, size_t(cuda::kDecodeCounters) * sizeof(int)),
              "cudaMemset (decode counters)");
    }

    ~CudaBackend() override {
        cudaSetDevice(device_);
        clear_graphs();
        if (stream_) cudaStreamSynchronize(stream_);
        cublas_.reset();
        if (half_x_) cudaFree(half_x_);
        if (dq_) cudaFree(dq_);
        if (counters_) cudaFree(counters_);
        if (ws_) cudaFree(ws_);
        for (int i = 0; i < 2; ++i) {
            if (staging_[i]) cudaFreeHost(staging_[i]);
            if (staged_[i]) cudaEventDestroy(staged_[i]);
        }
        for (cudaEvent_t e : markers_)
            if (e) cudaEventDestroy(e);
        if (stream_) cudaStreamDestroy(stream_);
    }

    DeviceKind kind() const override { return DeviceKind::CUDA; }
    std::string name() const override {
        return str_cat("cuda:", device_, " (", gpu_name_, "; GEMM: ", gemm_info(), ")");
    }

    // ---- memory ----
    void* alloc(size_t bytes, const char* what) override {
        dev();
        void* p = nullptr;
        const cudaError_t e = cudaMalloc(&p, std::max<size_t>(bytes, 1));
        if (e != cudaSuccess) {
            (void)cudaGetLastError();
            size_t free_b = 0, total_b = 0;
            cudaMemGetInfo(&free_b, &total_b);
            throw CudaError(str_cat("out of device memory allocating ", bytes, " bytes for ", what,
                                    " on cuda:", device_, " (", free_b >> 20, " MiB free of ",
                                    total_b >> 20, " MiB): ", cudaGetErrorString(e)));
        }
        return p;
    }
    // Free device memory (cudaMemGetInfo); the cuda_free_bytes_limit option
    // (MAMBART_CUDA_FREE_BYTES_LIMIT, bytes) caps it, so that tests can exercise the load-time
    // check without a model larger than the GPU.
    uint64_t free_memory() const override {
        dev();
        size_t free_b = 0, total_b = 0;
        check(cudaMemGetInfo(&free_b, &total_b), "cudaMemGetInfo");
        uint64_t f = free_b;
        if (free_bytes_limit_) f = std::min<uint64_t>(f, free_bytes_limit_);
        return f;
    }
    void dealloc(void* p) noexcept override {
        if (!p) return;
        cudaSetDevice(device_);
        cudaFree(p);
    }
    void copy_to_device(void* dst, const void* src, size_t n) override {
        dev();
        check(cudaMemcpyAsync(dst, src, n, cudaMemcpyHostToDevice, stream_), "copy_to_device");
    }
    void copy_to_host(void* dst, const void* src, size_t n) override {
        dev();
        check(cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToHost, stream_), "copy_to_host");
        check(cudaStreamSynchronize(stream_), "copy_to_host (a kernel before it failed)");
    }
    void* alloc_host(size_t bytes, const char* what) override {
        dev();
        void* p = nullptr;
        const cudaError_t e = cudaHostAlloc(&p, std::max<size_t>(bytes, 1), cudaHostAllocDefault);
        if (e != cudaSuccess) {
            (void)cudaGetLastError();
            throw CudaError(str_cat("could not allocate ", bytes, " bytes of page-locked host "
                                    "memory for ", what, ": ", cudaGetErrorString(e)));
        }
        return p;
    }
    void dealloc_host(void* p) noexcept override {
        if (!p) return;
        cudaSetDevice(device_);
        cudaFreeHost(p);
    }
    void copy_to_host_async(void* dst, const void* src, size_t n) override {
        dev();
        check(cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToHost, stream_), "copy_to_host_async");
    }
    uint64_t record_marker() override {
        dev();
        const int i = int(markers_recorded_ % kMaxMarkers);
        if (!markers_[i])
            check(cudaEventCreateWithFlags(&markers_[i], cudaEventDisableTiming),
                  "cudaEventCreate (marker)");
        check(cudaEventRecord(markers_[i], stream_), "cudaEventRecord (marker)");
        return ++markers_recorded_;  // marker m is event (m - 1) % kMaxMarkers
    }
    void wait_marker(uint64_t m) override {
        if (m == 0 || m > markers_recorded_) return;
        // A marker whose event was recorded again stands for a later point of the same stream:
        // waiting for that one is later than needed, never too early.
        dev();
        check(cudaEventSynchronize(markers_[(m - 1) % kMaxMarkers]),
              "wait_marker (a kernel before it failed)");
    }
    void copy_device(void* dst, const void* src, size_t n) override {
        dev();
        check(cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToDevice, stream_), "copy_device");
    }
    void zero(void* dst, size_t n) override {
        dev();
        check(cudaMemsetAsync(dst, 0, n, stream_), "zero");
    }
    // The 2D calls take pitches up to cudaDeviceProp::memPitch (2^31 - 1 bytes): beyond that
    // (a state slot of a very large batch) one call per block, as the base class does.
    static constexpr size_t kMaxPitch = (size_t(1) << 31) - 1;
    void copy_device_2d(void* dst, size_t dst_pitch, const void* src, size_t src_pitch,
                        size_t bytes, size_t rows) override {
        if (dst_pitch > kMaxPitch || src_pitch > kMaxPitch)
            return Backend::copy_device_2d(dst, dst_pitch, src, src_pitch, bytes, rows);
        dev();
        check(cudaMemcpy2DAsync(dst, dst_pitch, src, src_pitch, bytes, rows,
                                cudaMemcpyDeviceToDevice, stream_),
              "copy_device_2d");
    }
    void zero_2d(void* dst, size_t pitch, size_t bytes, size_t rows) override {
        if (pitch > kMaxPitch) return Backend::zero_2d(dst, pitch, bytes, rows);
        dev();
        check(cudaMemset2DAsync(dst, pitch, 0, bytes, rows, stream_), "zero_2d");
    }

    const void* place_weight(const void* src, DType src_dtype, size_t numel, DType dtype,
                             bool* owned) override {
        dev();
        const size_t out_es = dtype_size(dtype), in_es = dtype_size(src_dtype);
        void* dst = alloc(numel * out_es, "a weight");
        *owned = true;
        try {
            ensure_staging();
            const size_t chunk = kStagingBytes / std::max(out_es, in_es) / 4 * 4;
            std::vector<float> tmp;
            for (size_t off = 0, i = 0; off < numel; off += chunk, ++i) {
                const size_t n = std::min(chunk, numel - off);
                const int buf = int(i % 2);
                check(cudaEventSynchronize(staged_[buf]), "place_weight (staging)");
                char* stage = static_cast<char*>(staging_[buf]);
                const char* s = static_cast<const char*>(src) + off * in_es;
                if (src_dtype == dtype) {
                    std::memcpy(stage, s, n * out_es);
                } else if (dtype == DType::F32) {
                    convert_to_f32(s, src_dtype, reinterpret_cast<float*>(stage), n);
                } else {
                    tmp.resize(n);
                    convert_to_f32(s, src_dtype, tmp.data(), n);
                    convert_from_f32(tmp.data(), stage, dtype, n);
                }
                check(cudaMemcpyAsync(static_cast<char*>(dst) + off * out_es, stage, n * out_es,
                                      cudaMemcpyHostToDevice, stream_),
                      "place_weight (copy)");
                check(cudaEventRecord(staged_[buf], stream_), "place_weight (event)");
            }
        } catch (...) {
            dealloc(dst);
            throw;
        }
        return dst;
    }

    // ---- ops ----
    void embedding(const int32_t* ids, int64_t n, const Weight& table, float* out) override {
        dev();
        if (table.quant != QuantScheme::None) {
            cuda::launch_embedding_quant({ids, table.data, table.dtype, out, n, table.cols, table.rows},
                                         table.quant, table.scales, table.group, stream_);
            return;
        }
        cuda::launch_embedding({ids, table.data, table.dtype, out, n, table.cols, table.rows}, stream_);
    }

    void add_norm(float* residual, const float* hidden, const Param& w, const Param& b,
                  NormKind kind, float eps, int64_t n, int64_t d, float* out) override {
        dev();
        cuda::launch_add_norm(
            {residual, hidden, w.data, b.data, kind == NormKind::RMSNorm, eps, out, n, d}, stream_);
    }

    void linear(const float* x, int64_t ldx, int64_t M, const Weight& W, int64_t N,
                const float* bias, float* y, int64_t ldy) override {
        dev();
        MAMBART_CHECK_ARG(N <= W.rows, "linear: N=", N, " exceeds the weight's ", W.rows, " rows");
        const int64_t K = W.cols;
        if (W.quant != QuantScheme::None) {
            if (M <= cuda::kGemvMaxRows) {  // decode: dequantized in registers
                cuda::launch_linear_quant({x, ldx, W.data, W.quant, W.scales, W.group, bias, y,
                                           ldy, M, N, K, false}, stream_);
                return;
            }
            // prefill: slabs of rows dequantized to bf16 (the workspace of reserve_dequant),
            // each through the bf16 GEMM below
            MAMBART_CHECK_ARG(dq_ && K <= dq_cols_, "linear: a quantized weight of K=", K,
                              " with M=", M, " needs reserve_dequant (the load does it)");
            // rows per slab: the workspace's, at most 65535 (the dequant kernel's grid.y)
            const int64_t slab = std::min<int64_t>(int64_t(dq_bytes_ / (size_t(K) * 2)), 65535);
            for (int64_t n0 = 0; n0 < N; n0 += slab) {
                const int64_t nr = std::min(slab, N - n0);
                cuda::launch_dequant_bf16(W.data, W.quant, W.scales, W.group, K, n0, nr, dq_,
                                          stream_);
                Weight t;
                t.data = dq_;
                t.dtype = DType::BF16;
                t.rows = nr;
                t.cols = K;
                linear(x, ldx, M, t, nr, bias ? bias + n0 : nullptr, y + n0, ldy);
            }
            return;
        }
        if (gemv_tc_ && M >= cublas_min_rows_ && M <= cuda::kGemvTcMaxRows) {
            // decode batches: the tensor-core GEMV (x rounded to the weight dtype in registers)
            const cuda::LinearParams lp{x, ldx, W.data, W.dtype, bias, y, ldy, M, N, K, false};
            if (cuda::gemv_tc_supported(lp)) {
                cuda::launch_gemv_tc(lp, stream_);
                return;
            }
        }
        if (cublas_ && cublas_->available() && M >= cublas_min_rows_ && M <= 65535 &&
            W.dtype != DType::F32 && size_t(M * K) * 2 <= half_x_bytes_) {
            // x rounded to the weight dtype (as the hand-written tensor-core GEMM does), then
            // cuBLAS with fp32 accumulation and fp32 output.
            cuda::launch_rows_to_half(x, ldx, M, K, half_x_, W.dtype, stream_);
            cublas_->run(half_x_, W.data, W.dtype, y, ldy, M, N, K);
            if (bias) cuda::launch_add_bias(y, ldy, bias, M, N, stream_);
            return;
        }
        cuda::launch_linear({x, ldx, W.data, W.dtype, bias, y, ldy, M, N, K, false}, stream_);
    }

    uint64_t reserve_dequant(int64_t cols) override {
        // (slab, cols) bf16: at most kDequantBytes, at least one row; grows only
        const size_t bytes = std::max<size_t>(kDequantBytes / (size_t(cols) * 2), 1) * size_t(cols) * 2;
        if (cols <= dq_cols_ && bytes <= dq_bytes_) return 0;
        dev();
        check(cudaStreamSynchronize(stream_), "reserve_dequant");
        const size_t old = dq_bytes_;
        if (dq_) cudaFree(dq_);
        dq_ = nullptr;
        dq_bytes_ = 0;
        dq_ = alloc(bytes, "the dequantized-weight workspace");
        dq_bytes_ = bytes;
        dq_cols_ = cols;
        return bytes > old ? bytes - old : 0;
    }

    // The fused decode projections run where linear() would run the GEMV (fewer rows than
    // cuBLAS takes), up to kFusedMaxRows rows whose normed inputs fit shared memory.
    bool fused_projection(int64_t M, int64_t K, int64_t groups) const override {
        const bool gemm = cublas_ && cublas_->available() && M >= cublas_min_rows_;
        // a gated norm is emulated as gated_rmsnorm_kernel runs it for fewer than 64 blocks
        return M >= 1 && M <= cuda::kFusedMaxRows && M * K <= cuda::kFusedMaxNormElems && !gemm &&
               M * groups < 64;
    }
    void project(const ProjParams& p) override {
        dev();
        MAMBART_CHECK_ARG(p.N <= p.W.rows, "project: N=", p.N, " exceeds the weight's ", p.W.rows,
                          " rows");
        MAMBART_CHECK_ARG(p.W.quant == QuantScheme::None, "project: ",
                          quant_scheme_name(p.W.quant), " weights are not fused (the model runs "
                          "quantized weights' projections unfused)");
        const int64_t groups = p.gate.z ? p.W.cols / std::max<int64_t>(p.gate.group_size, 1) : 0;
        MAMBART_CHECK_ARG(p.norm.residual || p.gate.z ? fused_projection(p.M, p.W.cols, groups)
                                                      : fused_projection(p.M, 1, 0),
                          "project: ", p.M, " rows of ", p.W.cols, " are not fused here");
        cuda::LinearParams q{p.x, p.x ? p.ldx : p.W.cols, p.W.data, p.W.dtype, p.bias, p.y, p.ldy,
                             p.M, p.N, p.W.cols, false};
        q.norm = p.norm;
        q.gate = p.gate;
        q.accumulate = p.accumulate;
        q.conv = p.conv;
        cuda::launch_linear(q, stream_);
    }

    uint64_t scratch_bytes(int64_t rows, int64_t cols) const override {
        if (!cublas_ || !cublas_->available() || rows < cublas_min_rows_) return half_x_bytes_;
        // (rows, cols) fp16/bf16 GEMM operand; it only grows
        return std::max<uint64_t>(half_x_bytes_, uint64_t(rows * cols) * 2);
    }
    void reserve_scratch(int64_t rows, int64_t cols) override {
        if (!cublas_ || !cublas_->available() || rows < cublas_min_rows_) return;
        const size_t bytes = size_t(rows * cols) * 2;  // (rows, cols) fp16/bf16 GEMM operand
        if (bytes <= half_x_bytes_) return;
        dev();
        check(cudaStreamSynchronize(stream_), "reserve_scratch");
        if (half_x_) cudaFree(half_x_);
        half_x_ = nullptr;
        half_x_bytes_ = 0;
        half_x_ = alloc(bytes, "the GEMM operand scratch");
        half_x_bytes_ = bytes;
    }

    // "cuBLAS 13.1.0", or why the hand-written GEMM runs instead.
    std::string gemm_info() const {
        if (!cublas_) return "hand-written (MAMBART_CUBLAS=0)";
        return cublas_->available() ? cublas_->version() : "hand-written (" + cublas_->reason() + ")";
    }

    void conv1d(const ConvParams& p) override {
        dev();
        cuda::launch_conv1d(p, stream_);
    }

    void selective_scan(const SelectiveScanParams& p) override {
        dev();
        const bool lanes = scan_mode_ == ScanMode::Lanes;
        const bool chunked = scan_mode_ == ScanMode::Chunked ||
                             (scan_mode_ == ScanMode::Auto && p.N <= cuda::kCptMaxN);
        // A trace (speculative verification, issue 25: L = k + 1 small) takes the sequential
        // form, which has every token's state anyway; so does a bf16 state (option
        // state_dtype), rounded after every token (BF16_STATE_RULE).
        const int64_t T = chunked && !p.state_trace && !p.ssm_state_bf16 &&
                                  p.L >= cuda::kScanChunkedMinL
                              ? cuda::selective_scan_segment_len(p, lanes)
                              : p.L;  // p.L: the sequential kernel
        if (T >= p.L) {  // decode, short L, or the chunked form not asked for
            cuda::launch_selective_scan(p, lanes, stream_);
            return;
        }
        const int64_t need = cuda::selective_scan_chunked_workspace_floats(p, T);
        cuda::launch_selective_scan_chunked({p, T, workspace(need, "selective_scan"), lanes},
                                            stream_);
    }

    void ssd_scan(const SsdParams& p) override {
        dev();
        // decode step, a trace (issue 25) or a bf16 state (option state_dtype, rounded after
        // every token: BF16_STATE_RULE): the recurrent form
        if (p.L <= 1 || !ssd_chunked_ || p.state_trace || p.ssm_state_bf16) {
            cuda::launch_ssd_scan(p, stream_);
            return;
        }
        MAMBART_CHECK_ARG(p.chunk_size >= 1, "ssd_scan: chunk_size=", p.chunk_size,
                          " must be >= 1");
        const int64_t need = cuda::ssd_chunked_workspace_floats(p, p.chunk_size);
        cuda::launch_ssd_chunked({p, p.chunk_size, workspace(need, "ssd_scan"),
                                   ssd_tf32_ || (ssd_auto_ && p.half_weights)},
                                 stream_);
    }

    void mamba3_scan(const Mamba3ScanParams& p) override {
        dev();
        // Decode steps and short prompts: the recurrent form; prefill: the chunked form (off with
        // MAMBART_CUDA_SSD=recurrent; plain TF32 products with MAMBART_CUDA_SSD=tf32).
        if (p.L < cuda::kMamba3ChunkedMinL || !ssd_chunked_ || !cuda::mamba3_chunked_supported(p)) {
            cuda::launch_mamba3_scan(p, stream_);
            return;
        }
        const int64_t need = cuda::mamba3_chunked_workspace_floats(p);
        cuda::launch_mamba3_chunked({p, workspace(need, "mamba3_scan"), ssd_tf32_}, stream_);
    }

    // A bf16 SSM state (option state_dtype): the sequential scan and recurrent SSD kernels
    // (cuda/selective_scan.cu, cuda/ssd_scan.cu) take it; prefill then runs those forms.
    bool supports_state_dtype(DType dt) const override {
        return dt == DType::F32 || dt == DType::BF16;
    }

    bool mamba1_decode_fused(const Mamba1DecodeParams& p) override {
        if (!fused_enabled_ || p.B > fused_max_batch_ || p.dt_proj.cols != p.R ||
            p.dt_proj.rows < p.E)
            return false;
        dev();
        cuda::launch_mamba1_decode(p, stream_);
        return true;
    }

    bool mamba2_decode_fused(const Mamba2DecodeParams& p) override {
        const ConvParams& c = p.conv;
        const SsdParams& s = p.ssd;
        // up to cuda_fused_max_batch rows, or every batch size with cuda_m2_decode_wide (its
        // 64-rows-a-block form amortises the per-block work when batched)
        if (!fused_enabled_ || (!m2_wide_ && c.B > fused_max_batch_) || c.L != 1 || s.L != 1 ||
            c.B != s.B ||
            c.C != s.H * s.P + 2 * s.G * s.N || s.B * s.G > cuda::kDecodeCounters)
            return false;
        dev();
        cuda::launch_mamba2_decode(p, m2_wide_, counters_, stream_);
        return true;
    }

    bool persistent_decode(const PersistentDecodeParams& p) override {
        if (!cooperative_) return false;
        dev();  // the launcher checks persistent_decode_supported and declines (false) itself
        return cuda::launch_persistent_decode(p, persistent_warps_, persistent_rows_,
                                              persistent_prefetch_, persistent_ring_, stream_);
    }

    void gated_rmsnorm(const float* y, const float* z, int64_t ld_z, const float* w, int64_t n,
                       int64_t E, int64_t group_size, float eps, float* out) override {
        dev();
        cuda::launch_gated_rmsnorm({y, z, ld_z, w, out, n, E, group_size, eps}, stream_);
    }

    void silu_gate(float* y, const float* z, int64_t ld_z, int64_t n, int64_t E) override {
        dev();
        cuda::launch_silu_gate({y, z, ld_z, n, E}, stream_);
    }

    void gelu_gate(float* y, const float* z, int64_t ld_z, int64_t n, int64_t E) override {
        dev();
        cuda::launch_gelu_gate({y, z, ld_z, n, E}, stream_);
    }

    void relu_sq(float* y, int64_t n, int64_t E) override {
        dev();
        cuda::launch_relu_sq(y, n * E, stream_);
    }

    void scale(float* y, int64_t n, float s) override {
        dev();
        cuda::launch_scale(y, n, s, stream_);
    }

    void moe(const MoeParams& p) override {
        dev();
        cuda::launch_moe(p, stream_);
    }

    void attention(const AttentionParams& p) override {
        dev();
        cuda::launch_attention(p, stream_);
    }

    // ---- decode fast path ----
    bool supports_graphs() const override { return true; }

    void run_graph(uint64_t key, const std::function<void()>& record) override {
        dev();
        if (!graphs_enabled_) {
            record();
            return;
        }
        auto it = graphs_.find(key);
        if (it == graphs_.end()) {
            if (graphs_.size() >= kMaxGraphs) clear_graphs();
            cudaGraph_t graph = nullptr;
            check(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal),
                  "cudaStreamBeginCapture (decode graph)");
            try {
                record();
            } catch (...) {
                cudaStreamEndCapture(stream_, &graph);
                if (graph) cudaGraphDestroy(graph);
                (void)cudaGetLastError();
                throw;
            }
            check(cudaStreamEndCapture(stream_, &graph), "cudaStreamEndCapture (decode graph)");
            cudaGraphExec_t exec = nullptr;
            const cudaError_t e = cudaGraphInstantiate(&exec, graph, 0);
            cudaGraphDestroy(graph);
            check(e, "cudaGraphInstantiate (decode graph)");
            it = graphs_.emplace(key, exec).first;
        }
        check(cudaGraphLaunch(it->second, stream_), "cudaGraphLaunch (decode graph)");
    }

    void clear_graphs() override {
        for (auto& kv : graphs_) cudaGraphExecDestroy(kv.second);
        graphs_.clear();
    }

    void sample(const DeviceSampleParams& p) override {
        dev();
        cuda::launch_sample(p, stream_);
    }

    void synchronize() override {
        dev();
        check(cudaStreamSynchronize(stream_), "synchronize");
    }

 private:
    static constexpr size_t kStagingBytes = size_t(16) << 20;
    static constexpr size_t kMaxGraphs = 16;

    void dev() const {
        const cudaError_t e = cudaSetDevice(device_);
        if (e != cudaSuccess) check(e, "cudaSetDevice");
    }

    // The chunked scans' workspace (SSD, Mamba-1), grown on demand (prefill only: never inside a
    // graph capture). `op` names the caller in errors.
    float* workspace(int64_t floats, const char* op) {
        const size_t bytes = size_t(std::max<int64_t>(floats, 1)) * sizeof(float);
        if (bytes <= ws_bytes_) return ws_;
        cudaStreamCaptureStatus cs = cudaStreamCaptureStatusNone;
        check(cudaStreamIsCapturing(stream_, &cs), "cudaStreamIsCapturing");
        if (cs != cudaStreamCaptureStatusNone)
            throw Unsupported(str_cat(op, ": the chunked scan's workspace cannot grow during a "
                                      "graph capture"));
        check(cudaStreamSynchronize(stream_), str_cat(op, " (workspace)").c_str());
        if (ws_) cudaFree(ws_);
        ws_ = nullptr;
        ws_bytes_ = 0;
        ws_ = static_cast<float*>(alloc(bytes, "the chunked scans' workspace"));
        ws_bytes_ = bytes;
        return ws_;
    }

    void ensure_staging() {
        for (int i = 0; i < 2; ++i) {
            if (staging_[i]) continue;
            check(cudaHostAlloc(&staging_[i], kStagingBytes, cudaHostAllocDefault),
                  "cudaHostAlloc (pinned staging for weight uploads)");
            check(cudaEventCreateWithFlags(&staged_[i], cudaEventDisableTiming),
                  "cudaEventCreate");
        }
    }

    int device_;
    std::string gpu_name_;
    cudaStream_t stream_ = nullptr;
    void* staging_[2] = {nullptr, nullptr};       // pinned host, kStagingBytes each
    cudaEvent_t staged_[2] = {nullptr, nullptr};  // the last copy out of each staging buffer
    cudaEvent_t markers_[kMaxMarkers] = {};       // record_marker's ring, created on first use
    uint64_t markers_recorded_ = 0;
    std::unordered_map<uint64_t, cudaGraphExec_t> graphs_;
    bool graphs_enabled_ = true;
    bool fused_enabled_ = true;  // fused decode mixer steps (MAMBART_CUDA_FUSED=0: off)
    bool ssd_chunked_ = true;    // chunked SSD for L > 1 (MAMBART_CUDA_SSD=recurrent: off)
    bool ssd_tf32_ = false;      // chunked SSD in plain TF32 (MAMBART_CUDA_SSD=tf32), else split
    bool ssd_auto_ = false;      // cuda_ssd auto: plain TF32 where SsdParams::half_weights
    int persistent_warps_ = 16;       // option cuda_persistent_warps
    int persistent_rows_ = 2;         // option cuda_persistent_rows
    bool cooperative_ = false;        // the device takes cooperative launches
    bool persistent_prefetch_ = false; // option cuda_persistent_prefetch
    int persistent_ring_ = 0;         // option cuda_persistent_ring
    int* counters_ = nullptr;    // (kDecodeCounters) device ints, see launch_mamba2_decode
    enum class ScanMode { Auto, Chunked, Sequential, Lanes };
    ScanMode scan_mode_ = ScanMode::Auto;  // the Mamba-1 prefill scan (MAMBART_CUDA_SCAN)
    float* ws_ = nullptr;        // the chunked scans' workspace (ws_bytes_)
    size_t ws_bytes_ = 0;
    std::unique_ptr<cublas::Gemm> cublas_;  // null with MAMBART_CUBLAS=0
    // cuBLAS from 4 rows: on an H100 (mamba-1.4b decode) 4 rows ran at 1,758 tokens/s with
    // cuBLAS and 1,286 with the GEMV, 8 rows at 3,130 and 1,731. 2 rows with cuBLAS took
    // 2.27 ms a step, more than the GEMV's 1-row step (1.9 ms, the same weight bytes); the
    // GEMV at 2 and 3 rows was not measured.
    int64_t cublas_min_rows_ = 4;  // MAMBART_CUBLAS_MIN_ROWS
    bool gemv_tc_ = false;         // MAMBART_CUDA_GEMV_TC: decode batches on gemv_tc_kernel
    bool m2_wide_ = false;         // MAMBART_CUDA_M2_DECODE_WIDE: Mamba-2's batched decode form
    int64_t fused_max_batch_ = 8;  // MAMBART_CUDA_FUSED_MAX_BATCH
    uint64_t free_bytes_limit_ = 0;  // MAMBART_CUDA_FREE_BYTES_LIMIT (0: none)
    // Quantized weights' prefill: rows dequantized to bf16, a slab of at most kDequantBytes
    // (reserve_dequant): (dq_bytes_ / (2 K), K) for a weight of K input features.
    static constexpr size_t kDequantBytes = size_t(32) << 20;
    void* dq_ = nullptr;
    size_t dq_bytes_ = 0;
    int64_t dq_cols_ = 0;
    void* half_x_ = nullptr;  // (rows, cols) fp16/bf16: the GEMM operand (reserve_scratch)
    size_t half_x_bytes_ = 0;
};

}  // namespace

// Called by make_backend / cuda_available (cpp/backend.cpp) in CUDA builds.
std::unique_ptr<Backend> make_cuda_backend(int device) {
    return std::make_unique<CudaBackend>(device);
}

bool cuda_device_present() {
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess) {
        (void)cudaGetLastError();
        return false;
    }
    return count > 0;
}

}  // namespace mambart

// L2 compute, CUDA backend only: the projections of prefill and batched decode as cuBLAS GEMMs,
// with libcublas loaded at run time (dlopen), so that the module builds and imports where cuBLAS
// is absent (CPU-only machines, toolkits without it) and keeps the hand-written GEMM there.
//
// Built with cuBLAS's headers (CMake finds cublas_v2.h: MAMBART_HAVE_CUBLAS=1); otherwise every
// Gemm reports available() == false with the reason.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "dtype.h"

namespace mambart {
namespace cublas {

class Gemm {
 public:
    // Loads libcublas (once per process) and creates a handle on the current device, bound to
    // `stream`, with a workspace of its own (allocated here, so that GEMMs inside CUDA graph
    // captures allocate nothing). Never throws: available() says whether it worked, reason()
    // why not.
    explicit Gemm(cudaStream_t stream);
    ~Gemm();
    Gemm(const Gemm&) = delete;
    Gemm& operator=(const Gemm&) = delete;

    bool available() const { return handle_ != nullptr; }
    const std::string& reason() const { return reason_; }  // why not available
    const std::string& version() const { return version_; }  // e.g. "cuBLAS 13.1.0"

    // y[M, N] (fp32, row stride ldy) = a[M, K] (`dtype`, contiguous rows) · W[N, K]ᵀ (`dtype`,
    // contiguous rows), fp32 accumulation. dtype: F16 or BF16. Throws CudaError on failure.
    void run(const void* a, const void* W, DType dtype, float* y, int64_t ldy, int64_t M,
             int64_t N, int64_t K);

 private:
    void* handle_ = nullptr;     // cublasHandle_t
    void* workspace_ = nullptr;  // device, kWorkspaceBytes
    std::string reason_, version_;
};

}  // namespace cublas
}  // namespace mambart

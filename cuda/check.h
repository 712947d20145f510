// cuda/check.h: CUDA error handling usable from host-only code (cpp/cuda/backend_cuda.cpp) and
// from the kernel files.
#pragma once

#include <cuda_runtime_api.h>

#include "error.h"

namespace mambart {

// A CUDA runtime failure (RuntimeError in Python); the message names the kernel or allocation.
class CudaError : public Error {
 public:
    explicit CudaError(const std::string& msg) : Error(msg) {}
};

namespace cuda {

// Throws CudaError("<what>: <cuda error string>") when `e` is not cudaSuccess.
void check(cudaError_t e, const char* what);
// After a kernel launch: checks the launch, and with MAMBART_CUDA_SYNC=1 (env) synchronises the
// stream so that an asynchronous fault is reported against the kernel that caused it.
void check_launch(const char* kernel, cudaStream_t stream);

}  // namespace cuda
}  // namespace mambart

// cuda/common.cu: CUDA error checks.
#include <atomic>
#include <cstdlib>
#include <cstring>

#include "common.cuh"
#include "options.h"

namespace mambart {
namespace cuda {

void check(cudaError_t e, const char* what) {
    if (e == cudaSuccess) return;
    (void)cudaGetLastError();  // clear a non-sticky error so later calls are not blamed
    throw CudaError(str_cat(what, ": ", cudaGetErrorName(e), " (", cudaGetErrorString(e), ")"));
}

namespace {
std::atomic<bool> g_pdl{false};
std::atomic<bool> g_prefetch{true};
std::atomic<bool> g_load_ahead{true};

bool sync_after_launch() {
    static const bool on = runtime_options().cuda_sync;  // MAMBART_CUDA_SYNC
    return on;
}
}  // namespace

int device_attr(cudaDeviceAttr attr) {
    int dev = 0, v = 0;
    check(cudaGetDevice(&dev), "cudaGetDevice");
    check(cudaDeviceGetAttribute(&v, attr, dev), "cudaDeviceGetAttribute");
    return v;
}

bool pdl_enabled() { return g_pdl.load(std::memory_order_relaxed); }
void set_programmatic_launch(bool on) { g_pdl.store(on, std::memory_order_relaxed); }
bool weight_prefetch_enabled() {
    return g_prefetch.load(std::memory_order_relaxed) && pdl_enabled();
}
void set_weight_prefetch(bool on) { g_prefetch.store(on, std::memory_order_relaxed); }
bool load_ahead_enabled() { return g_load_ahead.load(std::memory_order_relaxed); }
void set_load_ahead(bool on) { g_load_ahead.store(on, std::memory_order_relaxed); }

void check_launch(const char* kernel, cudaStream_t stream) {
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess)
        throw CudaError(str_cat("launching ", kernel, ": ", cudaGetErrorName(e), " (",
                                cudaGetErrorString(e), ")"));
    if (sync_after_launch()) {
        cudaStreamCaptureStatus cs = cudaStreamCaptureStatusNone;
        cudaStreamIsCapturing(stream, &cs);
        if (cs == cudaStreamCaptureStatusNone) {
            e = cudaStreamSynchronize(stream);
            if (e != cudaSuccess)
                throw CudaError(str_cat("running ", kernel, ": ", cudaGetErrorName(e), " (",
                                        cudaGetErrorString(e), ")"));
        }
    }
}

}  // namespace cuda
}  // namespace mambart

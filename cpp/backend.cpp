#include "backend.h"

#include <cstdlib>

#include "error.h"

namespace mambart {

void Backend::mamba3_scan(const Mamba3ScanParams&) {
    throw Unsupported(str_cat("Mamba-3 layers are not implemented by the ", name(),
                              " backend yet (they run on device='cpu')"));
}

void Backend::project(const ProjParams&) {
    throw Unsupported(str_cat("the ", name(), " backend has no fused decode projection"));
}

void Backend::attention(const AttentionParams&) {
    throw Unsupported(str_cat("attention layers are not implemented by the ", name(),
                              " backend"));
}

void Backend::moe(const MoeParams&) {
    throw Unsupported(str_cat("MoE layers are not implemented by the ", name(), " backend"));
}

void* Backend::alloc_host(size_t bytes, const char* what) {
    void* p = std::malloc(std::max<size_t>(bytes, 1));
    if (!p) throw Error(str_cat("out of host memory allocating ", bytes, " bytes for ", what));
    return p;
}

void Backend::dealloc_host(void* p) noexcept { std::free(p); }

void Backend::sample(const DeviceSampleParams&) {
    throw Unsupported(str_cat("device-side sampling is not implemented by the ", name(), " backend"));
}

#ifdef MAMBART_WITH_CUDA
// cpp/cuda/backend_cuda.cpp
std::unique_ptr<Backend> make_cuda_backend(int device);
bool cuda_device_present();

bool cuda_available() { return cuda_device_present(); }
#else
bool cuda_available() { return false; }
#endif

std::unique_ptr<Backend> make_backend(const std::string& device, int threads) {
    if (device == "cpu") return make_cpu_backend(threads);
    if (device == "auto")
        return cuda_available() ? make_backend("cuda") : make_cpu_backend(threads);
    if (device == "cuda" || device.rfind("cuda:", 0) == 0) {
#ifdef MAMBART_WITH_CUDA
        int index = 0;
        if (device.size() > 5) {
            const std::string num = device.substr(5);
            char* end = nullptr;
            const long v = std::strtol(num.c_str(), &end, 10);
            if (num.empty() || *end != '\0' || v < 0 || v > 1024)
                throw InvalidArgument(str_cat("device: bad CUDA device '", device,
                                              "' (expected 'cuda' or 'cuda:N')"));
            index = int(v);
        }
        return make_cuda_backend(index);
#else
        throw Unsupported(str_cat("device='", device,
                                  "': this build of mambart has no CUDA backend (CPU only)"));
#endif
    }
    throw InvalidArgument(str_cat("device: unknown device '", device,
                                  "' (expected 'cpu', 'cuda', 'cuda:N' or 'auto')"));
}

}  // namespace mambart

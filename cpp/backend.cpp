#include "backend.h"

#include "error.h"

namespace mambart {

bool cuda_available() { return false; }

std::unique_ptr<Backend> make_backend(const std::string& device) {
    if (device == "cpu" || device == "auto") return make_cpu_backend();
    if (device == "cuda" || device.rfind("cuda:", 0) == 0)
        throw Unsupported(str_cat("device='", device,
                                  "': this build of mambart has no CUDA backend (CPU only)"));
    throw InvalidArgument(str_cat("device: unknown device '", device,
                                  "' (expected 'cpu', 'cuda', 'cuda:N' or 'auto')"));
}

}  // namespace mambart

#include "weights.h"

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <set>

#include "error.h"
#include "host_memory.h"
#include "options.h"

namespace mambart {

namespace {

// Bytes of host memory a load may take: the host_memory_limit option when set, else what the
// process may still take (host_memory_available: MemAvailable, the cgroup, RLIMIT_AS).
uint64_t load_memory_limit() {
    if (const uint64_t v = runtime_options().host_memory_limit) return v;
    return host_memory_available();
}

}  // namespace

ModelWeights::ModelWeights(const std::string& dir, const ModelConfig& c, Backend& backend,
                           DType dt)
    : dtype(dt), backend_(backend) {
    const std::string path = dir + "/model.safetensors";
    file_ = std::make_unique<SafetensorsFile>(path);
    const std::vector<TensorSpec> specs = c.tensors();
    std::set<std::string> matrix_names;
    for (const TensorSpec& s : specs)
        if (s.matrix) matrix_names.insert(s.name);

    // Resource limit (issue 6): on the CPU, weights that must be copied (another dtype, or
    // misaligned in the file) and the fp32 small parameters take host memory, while the rest are
    // zero-copy views of the mapping. Refuse up front, with the numbers, when that exceeds the
    // memory available, instead of letting the OOM killer end the process midway.
    if (backend.kind() == DeviceKind::CPU) {
        uint64_t need = 0;
        for (const auto& kv : file_->tensors()) {
            const TensorInfo& t = kv.second;
            if (matrix_names.count(kv.first)) {
                const bool aligned = reinterpret_cast<uintptr_t>(t.data) % dtype_size(t.dtype) == 0;
                if (t.dtype != dt || !aligned) need += uint64_t(t.numel()) * dtype_size(dt);
            } else {
                need += uint64_t(t.numel()) * sizeof(float);
            }
        }
        const uint64_t avail = load_memory_limit();
        if (need > avail)
            throw ModelLoadError(str_cat(path, ": loading needs ", need,
                                         " bytes of host memory (weights as ", dtype_name(dt),
                                         ", parameters as float32) but ", avail,
                                         " bytes are available"));
    } else {
        // Device backends: every weight is copied to the device. Refuse before the first
        // allocation when it cannot fit.
        uint64_t need = 0;
        for (const auto& kv : file_->tensors())
            need += uint64_t(kv.second.numel()) *
                    (matrix_names.count(kv.first) ? dtype_size(dt) : sizeof(float));
        const uint64_t avail = backend.free_memory();
        if (need > avail)
            throw ModelLoadError(str_cat(path, ": the weights need ", need,
                                         " bytes of device memory (as ", dtype_name(dt),
                                         ", parameters as float32) but ", backend.name(),
                                         " has ", avail, " bytes free"));
    }

    std::set<std::string> used;
    auto fetch = [&](const TensorSpec& s) -> const TensorInfo& {
        const TensorInfo& t = file_->get(s.name);
        if (t.shape != s.shape)
            throw ModelLoadError(str_cat(path, ": tensor '", s.name, "' has shape ",
                                         shape_str(t.shape), " but the config implies ",
                                         shape_str(s.shape)));
        used.insert(s.name);
        return t;
    };
    auto track = [&](const void* p, bool owned, size_t bytes) {
        if (owned) {
            owned_.push_back(const_cast<void*>(p));
            device_bytes += bytes;
        }
    };
    // A large matrix: (shape[0], product of the rest), placed in the load dtype.
    auto place_matrix = [&](const TensorSpec& s) {
        const TensorInfo& t = fetch(s);
        const int64_t rows = s.shape[0];
        int64_t cols = 1;
        for (size_t i = 1; i < s.shape.size(); ++i) cols *= s.shape[i];
        bool owned = false;
        Weight w;
        w.data = backend.place_weight(t.data, t.dtype, size_t(rows * cols), dt, &owned);
        track(w.data, owned, size_t(rows * cols) * dtype_size(dt));
        w.dtype = dt;
        w.rows = rows;
        w.cols = cols;
        return w;
    };
    // Small parameters: fp32 on the device; A_log specs become -exp(A_log) on the host first.
    auto place_param = [&](const TensorSpec& s) {
        const TensorInfo& t = fetch(s);
        const size_t n = size_t(t.numel());
        std::vector<float> host(n);
        convert_to_f32(t.data, t.dtype, host.data(), n);
        if (s.neg_exp)
            for (float& v : host) v = -std::exp(v);
        for (float v : host)
            if (!std::isfinite(v))
                throw ModelLoadError(str_cat(path, ": tensor '", s.name, "' holds NaN or Inf"));
        bool owned = false;
        const void* p = backend.place_weight(host.data(), DType::F32, n, DType::F32, &owned);
        if (!owned) {  // the CPU backend returns views: copy, since `host` dies here
            void* q = backend.alloc(n * 4, s.name.c_str());
            backend.copy_to_device(q, host.data(), n * 4);
            p = q;
            owned = true;
        }
        track(p, owned, n * 4);
        return Param{static_cast<const float*>(p), int64_t(n)};
    };

    try {
        for (const TensorSpec& s : specs) {
            if (s.matrix)
                matrices_[s.name] = place_matrix(s);
            else
                params_[s.name] = place_param(s);
        }
        for (const auto& kv : file_->tensors())
            if (!used.count(kv.first))
                throw ModelLoadError(str_cat(path, ": unexpected tensor '", kv.first,
                                             "' (not part of a ", c.layer_types_summary(),
                                             " model with this config)"));
        embedding = matrix("embedding.weight");
        norm_f_w = param("norm_f.weight");
        if (c.norm == NormKind::LayerNorm) norm_f_b = param("norm_f.bias");
        lm_head = c.tie_embeddings ? embedding : matrix("lm_head.weight");
    } catch (...) {
        for (void* p : owned_) backend_.dealloc(p);
        owned_.clear();
        throw;
    }
}

Weight ModelWeights::matrix(const std::string& name) const {
    auto it = matrices_.find(name);
    if (it == matrices_.end())
        throw InvalidArgument(str_cat("no weight matrix '", name, "' in this model"));
    return it->second;
}

Param ModelWeights::param(const std::string& name) const {
    auto it = params_.find(name);
    if (it == params_.end())
        throw InvalidArgument(str_cat("no parameter '", name, "' in this model"));
    return it->second;
}

ModelWeights::~ModelWeights() {
    for (void* p : owned_) backend_.dealloc(p);
}

}  // namespace mambart

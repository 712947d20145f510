#include "weights.h"

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <set>

#include "error.h"

namespace mambart {

namespace {

// The large matrices (placed by Backend::place_weight in the load dtype); every other tensor is
// a small parameter kept in fp32.
bool is_large_weight(const std::string& name) {
    static const char* kSuffixes[] = {"embedding.weight", "lm_head.weight", "in_proj.weight",
                                      "x_proj.weight", "dt_proj.weight", "out_proj.weight"};
    for (const char* s : kSuffixes) {
        const size_t n = std::strlen(s);
        if (name.size() >= n && name.compare(name.size() - n, n, s) == 0) return true;
    }
    return false;
}

// Bytes of host memory a load may take: MAMBART_HOST_MEMORY_LIMIT (bytes) when set, else the
// kernel's MemAvailable; no limit when neither can be read.
uint64_t host_memory_available() {
    if (const char* env = std::getenv("MAMBART_HOST_MEMORY_LIMIT")) {
        char* end = nullptr;
        const unsigned long long v = std::strtoull(env, &end, 10);
        if (end && end != env && *end == '\0') return v;
    }
    std::ifstream f("/proc/meminfo");
    std::string key;
    uint64_t kb = 0;
    std::string unit;
    while (f >> key >> kb >> unit)
        if (key == "MemAvailable:") return kb * 1024;
    return UINT64_MAX;
}

std::string shape_str(const std::vector<int64_t>& s) {
    std::string out = "(";
    for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
    return out + (s.size() == 1 ? ",)" : ")");
}

}  // namespace

ModelWeights::ModelWeights(const std::string& dir, const ModelConfig& c, Backend& backend,
                           DType dt)
    : dtype(dt), backend_(backend) {
    const std::string path = dir + "/model.safetensors";
    file_ = std::make_unique<SafetensorsFile>(path);
    std::set<std::string> used;

    // Resource limit (issue 6): on the CPU, weights that must be copied (another dtype, or
    // misaligned in the file) and the fp32 small parameters take host memory, while the rest are
    // zero-copy views of the mapping. Refuse up front, with the numbers, when that exceeds the
    // memory available, instead of letting the OOM killer end the process midway.
    if (backend.kind() == DeviceKind::CPU) {
        uint64_t need = 0;
        for (const auto& kv : file_->tensors()) {
            const TensorInfo& t = kv.second;
            if (is_large_weight(kv.first)) {
                const bool aligned = reinterpret_cast<uintptr_t>(t.data) % dtype_size(t.dtype) == 0;
                if (t.dtype != dt || !aligned) need += uint64_t(t.numel()) * dtype_size(dt);
            } else {
                need += uint64_t(t.numel()) * sizeof(float);
            }
        }
        const uint64_t avail = host_memory_available();
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
                    (is_large_weight(kv.first) ? dtype_size(dt) : sizeof(float));
        const uint64_t avail = backend.free_memory();
        if (need > avail)
            throw ModelLoadError(str_cat(path, ": the weights need ", need,
                                         " bytes of device memory (as ", dtype_name(dt),
                                         ", parameters as float32) but ", backend.name(),
                                         " has ", avail, " bytes free"));
    }

    auto fetch = [&](const std::string& name, std::vector<int64_t> shape) -> const TensorInfo& {
        const TensorInfo& t = file_->get(name);
        if (t.shape != shape)
            throw ModelLoadError(str_cat(path, ": tensor '", name, "' has shape ",
                                         shape_str(t.shape), " but the config implies ",
                                         shape_str(shape)));
        used.insert(name);
        return t;
    };
    auto track = [&](const void* p, bool owned, size_t bytes) {
        if (owned) {
            owned_.push_back(const_cast<void*>(p));
            device_bytes += bytes;
        }
    };
    auto weight = [&](const std::string& name, int64_t rows, int64_t cols) {
        const TensorInfo& t = fetch(name, {rows, cols});
        bool owned = false;
        Weight w;
        w.data = backend.place_weight(t.data, t.dtype, size_t(rows * cols), dt, &owned);
        track(w.data, owned, size_t(rows * cols) * dtype_size(dt));
        w.dtype = dt;
        w.rows = rows;
        w.cols = cols;
        return w;
    };
    // Small parameters: fp32 on the device; `transform` is applied on the host first.
    auto param = [&](const std::string& name, std::vector<int64_t> shape,
                     float (*transform)(float) = nullptr) {
        const TensorInfo& t = fetch(name, shape);
        const size_t n = size_t(t.numel());
        std::vector<float> host(n);
        convert_to_f32(t.data, t.dtype, host.data(), n);
        if (transform)
            for (float& v : host) v = transform(v);
        for (float v : host)
            if (!std::isfinite(v))
                throw ModelLoadError(str_cat(path, ": tensor '", name, "' holds NaN or Inf"));
        bool owned = false;
        const void* p = backend.place_weight(host.data(), DType::F32, n, DType::F32, &owned);
        if (!owned) {  // the CPU backend returns views: copy, since `host` dies here
            void* q = backend.alloc(n * 4, name.c_str());
            backend.copy_to_device(q, host.data(), n * 4);
            p = q;
            owned = true;
        }
        track(p, owned, n * 4);
        return Param{static_cast<const float*>(p), int64_t(n)};
    };
    auto neg_exp = [](float v) { return -std::exp(v); };

    const int64_t d = c.d_model, E = c.d_inner, N = c.d_state, W = c.d_conv;
    const bool ln = c.norm == NormKind::LayerNorm;
    try {
        embedding = weight("embedding.weight", c.vocab_size_padded, d);
        norm_f_w = param("norm_f.weight", {d});
        if (ln) norm_f_b = param("norm_f.bias", {d});
        lm_head = c.tie_embeddings ? embedding : weight("lm_head.weight", c.vocab_size_padded, d);
        layers.resize(size_t(c.n_layer));
        for (int64_t i = 0; i < c.n_layer; ++i) {
            LayerWeights& L = layers[size_t(i)];
            const std::string pre = str_cat("layers.", i, ".");
            const std::string mx = pre + "mixer.";
            L.norm_w = param(pre + "norm.weight", {d});
            if (ln) L.norm_b = param(pre + "norm.bias", {d});
            L.in_proj = weight(mx + "in_proj.weight", c.d_in_proj(), d);
            if (c.bias) L.in_proj_b = param(mx + "in_proj.bias", {c.d_in_proj()});
            L.conv_w = param(mx + "conv1d.weight", {c.conv_dim(), 1, W});
            if (c.conv_bias) L.conv_b = param(mx + "conv1d.bias", {c.conv_dim()});
            if (c.arch == Arch::Mamba1) {
                L.x_proj = weight(mx + "x_proj.weight", c.x_proj_dim(), E);
                L.dt_proj = weight(mx + "dt_proj.weight", E, c.dt_rank);
                L.dt_bias = param(mx + "dt_proj.bias", {E});
                L.A = param(mx + "A_log", {E, N}, neg_exp);
                L.D = param(mx + "D", {E});
            } else {
                L.dt_bias = param(mx + "dt_bias", {c.nheads});
                L.A = param(mx + "A_log", {c.nheads}, neg_exp);
                L.D = param(mx + "D", {c.nheads});
                if (c.gated_norm) L.gated_norm_w = param(mx + "norm.weight", {E});
            }
            L.out_proj = weight(mx + "out_proj.weight", d, E);
            if (c.bias) L.out_proj_b = param(mx + "out_proj.bias", {d});
        }
        for (const auto& kv : file_->tensors())
            if (!used.count(kv.first))
                throw ModelLoadError(str_cat(path, ": unexpected tensor '", kv.first,
                                             "' (not part of a ", arch_name(c.arch),
                                             " model with this config)"));
    } catch (...) {
        for (void* p : owned_) backend_.dealloc(p);
        owned_.clear();
        throw;
    }
}

ModelWeights::~ModelWeights() {
    for (void* p : owned_) backend_.dealloc(p);
}

}  // namespace mambart

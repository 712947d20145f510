#include "weights.h"

#include <algorithm>
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
    file_ = std::make_unique<SafetensorsFile>(path, !c.quant.empty());
    const std::vector<TensorSpec> specs = c.tensors();
    std::set<std::string> matrix_names, quant_names;  // quant_names: quantized data, as stored
    for (const TensorSpec& s : specs) {
        if (s.matrix && s.quant == QuantScheme::None) matrix_names.insert(s.name);
        if (s.quant != QuantScheme::None) quant_names.insert(s.name);
    }

    // Resource limit (issue 6): on the CPU, weights that must be copied (another dtype, or
    // misaligned in the file) and the fp32 small parameters take host memory, while the rest are
    // zero-copy views of the mapping. Refuse up front, with the numbers, when that exceeds the
    // memory available, instead of letting the OOM killer end the process midway.
    if (backend.kind() == DeviceKind::CPU) {
        uint64_t need = 0;
        for (const auto& kv : file_->tensors()) {
            const TensorInfo& t = kv.second;
            if (quant_names.count(kv.first)) {
                // zero-copy views (byte data)
            } else if (matrix_names.count(kv.first)) {
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
            need += quant_names.count(kv.first)
                        ? uint64_t(kv.second.nbytes)
                        : uint64_t(kv.second.numel()) *
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
        if (!dtype_is_float(t.dtype))
            throw ModelLoadError(str_cat(path, ": tensor '", s.name, "' holds ",
                                         dtype_name(t.dtype), " data but config.json does not "
                                         "mark it quantized (expected float32, float16 or "
                                         "bfloat16)"));
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

    // A quantized matrix (op_params.h Weight): its data as stored (int8, or int4 packed in
    // bytes) and its scales `name_scale` as fp32, every one checked finite and >= 0.
    auto place_quant = [&](const TensorSpec& s) {
        const char* scheme = quant_scheme_name(s.quant);
        const std::string what = str_cat(path, ": tensor '", s.name, "' (quantized ", scheme, ")");
        const int64_t N = s.shape[0], K = s.shape[1];
        const bool int4 = s.quant == QuantScheme::Int4;
        const DType want = int4 ? DType::U8 : DType::I8;
        const std::vector<int64_t> data_shape{N, int4 ? K / 2 : K};
        const TensorInfo& t = file_->get(s.name);
        if (t.dtype != want)
            throw ModelLoadError(str_cat(what, " holds ", dtype_name(t.dtype), " data; ", scheme,
                                         " weights are stored as ", dtype_name(want)));
        if (t.shape != data_shape)
            throw ModelLoadError(str_cat(what, " has shape ", shape_str(t.shape), " but ",
                                         scheme, " of ", shape_str(s.shape), " is stored as ",
                                         shape_str(data_shape)));
        used.insert(s.name);
        const std::string sname = s.name + "_scale";
        const std::vector<int64_t> scale_shape =
            int4 ? std::vector<int64_t>{N, K / s.group} : std::vector<int64_t>{N};
        if (!file_->contains(sname))
            throw ModelLoadError(str_cat(what, ": its scales '", sname, "' ",
                                         shape_str(scale_shape), " are missing"));
        const TensorInfo& st = file_->get(sname);
        if (st.shape != scale_shape)
            throw ModelLoadError(str_cat(what, ": its scales '", sname, "' have shape ",
                                         shape_str(st.shape), " but ", scheme, " needs ",
                                         shape_str(scale_shape)));
        if (!dtype_is_float(st.dtype))
            throw ModelLoadError(str_cat(what, ": its scales '", sname, "' are ",
                                         dtype_name(st.dtype), ", not a float type"));
        used.insert(sname);
        const size_t ns = size_t(st.numel());
        std::vector<float> host(ns);  // (N, K / group)
        convert_to_f32(st.data, st.dtype, host.data(), ns);
        for (float v : host)
            if (!std::isfinite(v) || v < 0.0f)
                throw ModelLoadError(str_cat(what, ": its scales '", sname, "' hold ",
                                             std::isnan(v) ? "NaN" : v < 0 ? "a negative value"
                                                                           : "Inf"));
        Weight w;
        bool owned = false;
        w.data = backend.place_weight(t.data, want, size_t(t.numel()), want, &owned);
        track(w.data, owned, t.nbytes);
        const void* p = backend.place_weight(host.data(), DType::F32, ns, DType::F32, &owned);
        if (!owned) {  // the CPU backend returns views: copy, since `host` dies here
            void* q = backend.alloc(ns * 4, sname.c_str());
            backend.copy_to_device(q, host.data(), ns * 4);
            p = q;
            owned = true;
        }
        track(p, owned, ns * 4);
        w.dtype = want;
        w.rows = N;
        w.cols = K;
        w.quant = s.quant;
        w.scales = static_cast<const float*>(p);
        w.group = s.group;
        return w;
    };

    try {
        for (const TensorSpec& s : specs) {
            if (s.quant != QuantScheme::None)
                matrices_[s.name] = place_quant(s);
            else if (s.matrix)
                matrices_[s.name] = place_matrix(s);
            else
                params_[s.name] = place_param(s);
        }
        int64_t max_qcols = 0;
        for (const auto& kv : matrices_)
            if (kv.second.quant != QuantScheme::None)
                max_qcols = std::max(max_qcols, kv.second.cols);
        if (max_qcols > 0) device_bytes += backend.reserve_dequant(max_qcols);
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

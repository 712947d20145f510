#include "config.h"

#include <sys/stat.h>

#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>

#include "config_reader.h"
#include "error.h"
#include "regular_file.h"
#include "strict_json.h"

namespace mambart {

using nlohmann::json;

std::string shape_str(const std::vector<int64_t>& s) {
    std::string out = "(";
    for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
    return out + (s.size() == 1 ? ",)" : ")");
}

int64_t StateSpec::numel() const {
    int64_t n = 1;
    for (int64_t v : shape) n *= v;
    return n;
}

void ConfigReader::float_range(const char* key, float* lo_out, float* hi_out) {
    const json& lim = need(key);
    if (!lim.is_array() || lim.size() != 2 || !lim[0].is_number() ||
        !(lim[1].is_number() || lim[1].is_null()))
        fail(key, "must be [min, max or null]");
    // Checked as doubles: converting an out-of-range double to float is undefined.
    const double lo = lim[0].get<double>();
    const double hi = lim[1].is_null() ? std::numeric_limits<double>::infinity()
                                       : lim[1].get<double>();
    const double fmax = std::numeric_limits<float>::max();
    if (!(lo >= 0.0 && lo < fmax) || !(hi > lo) || (std::isfinite(hi) && hi > fmax))
        fail(key, "must satisfy 0 <= min < max (finite float32 values, max may be null)");
    *lo_out = static_cast<float>(lo);
    *hi_out = std::isfinite(hi) ? static_cast<float>(hi) : std::numeric_limits<float>::infinity();
    if (!(*hi_out > *lo_out)) fail(key, "must satisfy 0 <= min < max");
}

std::vector<TensorSpec> ModelConfig::tensors() const {
    const int64_t d = d_model;
    const bool ln = norm == NormKind::LayerNorm;
    std::vector<TensorSpec> out;
    out.push_back({"embedding.weight", {vocab_size_padded, d}, true, false});
    out.push_back({"norm_f.weight", {d}, false, false});
    if (ln) out.push_back({"norm_f.bias", {d}, false, false});
    if (!tie_embeddings) out.push_back({"lm_head.weight", {vocab_size_padded, d}, true, false});
    for (size_t i = 0; i < layers.size(); ++i) {
        const std::string pre = str_cat("layers.", i, ".");
        // Every layer is a pre-norm residual block: the block norm is the model's, unless the
        // layer norms its own input.
        if (!layers[i]->norms_own_input()) {
            out.push_back({pre + "norm.weight", {d}, false, false});
            if (ln) out.push_back({pre + "norm.bias", {d}, false, false});
        }
        for (TensorSpec t : layers[i]->tensors(*this)) {
            t.name = pre + t.name;
            out.push_back(std::move(t));
        }
    }
    for (TensorSpec& t : out) {
        auto it = quant.find(t.name);
        if (it == quant.end()) continue;
        t.quant = it->second;
        t.group = t.quant == QuantScheme::Int4 ? int4_group : t.shape.back();
    }
    return out;
}

int64_t ModelConfig::num_params() const {
    int64_t total = 0;
    for (const TensorSpec& t : tensors()) {
        int64_t n = 1;
        for (int64_t v : t.shape) n *= v;
        total += n;
    }
    return total;
}

int64_t ModelConfig::max_context() const {
    int64_t m = 0;
    for (const auto& l : layers) {
        const int64_t x = l->max_context();
        if (x > 0 && (m == 0 || x < m)) m = x;
    }
    return m;
}

std::string ModelConfig::layer_types_summary() const {
    std::string out;
    std::map<std::string, int> seen;
    for (const auto& l : layers)
        if (seen[l->type()]++ == 0) out += (out.empty() ? "" : ", ") + std::string(l->type());
    return out;
}

namespace {

// The flat form of mambart_format 1 (no `layers` key; written before the layer list existed):
// every layer is of type `architecture` and the layer fields sit at the top level, all of
// them present whatever the type. Their types and ranges are checked here as that form always
// did; the layer's unit then reads the fields it uses from the same object.
void check_flat_layer_fields(ConfigReader& r) {
    r.integer("d_inner", 1, kMaxDim);
    r.integer("d_state", 1, 4096);
    r.integer("d_conv", 1, 64);
    r.boolean("conv_bias");
    r.boolean("bias");
    r.integer("dt_rank", 0, kMaxDim);
    r.integer("headdim", 0, kMaxDim);
    r.integer("nheads", 0, kMaxDim);
    r.integer("ngroups", 1, kMaxDim);
    r.integer("chunk_size", 0, 1 << 16);
    float lo, hi;
    r.float_range("dt_limit", &lo, &hi);
    r.boolean("gated_norm");
    if (r.boolean("norm_before_gate"))
        throw Unsupported(str_cat(r.origin(), ": norm_before_gate=true is not supported"));
}

}  // namespace

ModelConfig ModelConfig::from_json_text(const std::string& text, const std::string& origin,
                                        const LayerTypes& types) {
    json j;
    try {
        j = parse_json_strict(text.data(), text.data() + text.size());
    } catch (const StrictJsonError& e) {
        if (e.duplicate_key) throw ModelLoadError(str_cat(origin, ": ", e.what()));
        throw ModelLoadError(str_cat(origin, ": not valid JSON (", e.what(), ")"));
    }
    if (!j.is_object()) throw ModelLoadError(str_cat(origin, ": not a JSON object"));
    if (!j.contains("mambart_format"))
        throw ModelLoadError(str_cat(
            origin, ": not a mambart model config (no 'mambart_format' key); convert the "
                    "checkpoint first with `mambart convert SRC DST` or pass its directory to "
                    "mambart.Generator, which converts it"));
    ConfigReader r(j, origin);
    ModelConfig c;
    const int64_t fmt = r.integer("mambart_format", 0, 1 << 20);
    if (fmt != 1)
        r.fail("mambart_format", str_cat("= ", fmt, " is not supported by this version (expected 1)"));
    c.architecture = r.string("architecture");
    const bool listed = j.contains("layers");
    if (!listed && !types.flat(c.architecture))
        r.fail("architecture",
               str_cat("= '", c.architecture, "' is not supported in this form (",
                       types.flat_names(), "; other layer types (", types.names(),
                       ") are given as a 'layers' list)"));

    c.d_model = r.integer("d_model", 1, kMaxDim);
    c.n_layer = r.integer("n_layer", 1, 4096);
    c.vocab_size = r.integer("vocab_size", 1, kMaxDim);
    c.vocab_size_padded = r.integer("vocab_size_padded", 1, kMaxDim);
    if (c.vocab_size_padded < c.vocab_size)
        r.fail("vocab_size_padded", "must be >= vocab_size");
    if (!listed) check_flat_layer_fields(r);
    const std::string norm = r.string("norm");
    if (norm == "rmsnorm") c.norm = NormKind::RMSNorm;
    else if (norm == "layernorm") c.norm = NormKind::LayerNorm;
    else r.fail("norm", str_cat("= '", norm, "' is not supported (rmsnorm, layernorm)"));
    const double eps = r.number("norm_eps");
    if (!(eps > 0.0 && eps < 1.0)) r.fail("norm_eps", "must be in (0, 1)");
    c.norm_eps = static_cast<float>(eps);
    c.residual_in_fp32 = r.boolean("residual_in_fp32");
    c.tie_embeddings = r.boolean("tie_embeddings");
    c.bos_token_id = r.id_or_null("bos_token_id");
    c.eos_token_id = r.id_or_null("eos_token_id");
    c.pad_token_id = r.id_or_null("pad_token_id");
    c.dtype = [&] {
        const std::string s = r.string("dtype");
        try {
            return dtype_from_name(s, "dtype");
        } catch (const InvalidArgument&) {
            r.fail("dtype", str_cat("= '", s, "' is not float32, float16 or bfloat16"));
        }
    }();
    r.skip("source");
    // "quantization": {"int4_group_size": g, "tensors": {name: "int8" | "int4", ...}}, checked
    // against the tensors below once the layers are known.
    if (r.has("quantization")) {
        const json& q = r.need("quantization");
        const std::string qo = str_cat(origin, ": quantization");
        if (!q.is_object()) r.fail("quantization", "must be an object");
        ConfigReader qr(q, qo);
        c.int4_group = qr.integer("int4_group_size", 32, 1 << 16);
        if (c.int4_group % 32 != 0) qr.fail("int4_group_size", "must be a multiple of 32");
        const json& t = qr.need("tensors");
        if (!t.is_object()) qr.fail("tensors", "must be an object {tensor name: scheme}");
        for (auto it = t.begin(); it != t.end(); ++it) {
            QuantScheme s = QuantScheme::None;
            if (!it.value().is_string() || !quant_scheme_from_name(it.value().get<std::string>(), &s))
                throw ModelLoadError(str_cat(qo, ": tensor '", it.key(), "' has scheme ",
                                             it.value().dump(), ", which this build does not "
                                             "support (int8, int4)"));
            c.quant[it.key()] = s;
        }
        qr.reject_unknown();
    }
    for (auto [key, field] : {std::pair<const char*, double*>{"embedding_multiplier",
                                                              &c.embedding_multiplier},
                              {"residual_multiplier", &c.residual_multiplier},
                              {"logits_scaling", &c.logits_scaling}}) {
        if (!r.has(key)) continue;
        *field = r.number(key);
        if (!(*field > 1e-6 && *field < 1e6)) r.fail(key, "must be in (1e-6, 1e6)");
    }

    if (listed) {
        // One entry per layer: {"type": ..., the type's fields}; each read by its unit.
        const json& list = r.need("layers");
        if (!list.is_array())
            r.fail("layers", "must be a list with one entry per layer");
        if (int64_t(list.size()) != c.n_layer)
            r.fail("layers", str_cat("has ", list.size(), " entries but n_layer is ", c.n_layer));
        r.reject_unknown();
        for (size_t i = 0; i < list.size(); ++i) {
            const std::string where = str_cat(origin, ": layers[", i, "]");
            if (!list[i].is_object())
                throw ModelLoadError(str_cat(where, ": must be an object with a 'type' key"));
            ConfigReader lr(list[i], where);
            const std::string type = lr.string("type");
            if (!types.known(type))
                lr.fail("type", str_cat("= '", type, "' is not a known layer type (",
                                        types.names(), ")"));
            c.layers.push_back(types.parse(type, lr, c));
            lr.reject_unknown();
        }
    } else {
        r.reject_unknown();
        // The flat form: one config for every layer, read once and shared.
        ConfigReader lr(j, origin);
        auto layer = types.parse(c.architecture, lr, c);
        c.layers.assign(size_t(c.n_layer), layer);
    }

    if (c.eos_token_id >= c.vocab_size) r.fail("eos_token_id", "is outside the vocabulary");
    if (!c.quant.empty()) {
        // Every quantized name is a large matrix of this config, and int4 fits its group.
        std::map<std::string, TensorSpec> mats;
        for (TensorSpec& t : c.tensors())
            if (t.matrix) mats[t.name] = t;
        for (const auto& kv : c.quant) {
            auto it = mats.find(kv.first);
            const std::string qo = str_cat(origin, ": quantization: tensor '", kv.first, "' (",
                                           quant_scheme_name(kv.second), ")");
            if (it == mats.end())
                throw ModelLoadError(str_cat(qo, " is not a weight matrix of this model"));
            const int64_t K = it->second.shape.back();
            if (it->second.shape.size() != 2)
                throw ModelLoadError(str_cat(qo, ": only 2-d matrices are quantized"));
            if (kv.second == QuantScheme::Int4 && K % c.int4_group != 0)
                throw ModelLoadError(str_cat(qo, ": its ", K, " input features are not a "
                                             "multiple of int4_group_size ", c.int4_group));
        }
    }
    // Parameter-count sanity bound: reject configs no machine could hold before allocating.
    // (Sizes are bounded by kMaxDim, so each tensor's element count fits in int64.)
    double approx = 2.0 * static_cast<double>(c.vocab_size_padded) * c.d_model;
    std::vector<std::pair<const LayerConfig*, double>> memo;
    for (const auto& l : c.layers) {
        double n = -1;
        for (const auto& m : memo)
            if (m.first == l.get()) n = m.second;
        if (n < 0) {
            n = 0;
            for (const TensorSpec& t : l->tensors(c)) {
                double e = 1;
                for (int64_t v : t.shape) e *= double(v);
                n += e;
            }
            memo.emplace_back(l.get(), n);
        }
        approx += n;
    }
    if (approx > 1e12)
        throw ModelLoadError(str_cat(origin, ": the config implies about ", approx,
                                     " parameters, which is not a plausible model"));
    return c;
}

ModelConfig ModelConfig::from_file(const std::string& path, const LayerTypes& types) {
    // A regular file of bounded size: a directory, FIFO or /dev/zero link must not hang or OOM.
    struct stat st;
    return from_json_text(read_regular_file(path, "config", kMaxConfigBytes, &st), path, types);
}

}  // namespace mambart

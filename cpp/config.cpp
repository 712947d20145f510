#include "config.h"

#include <sys/stat.h>

#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "error.h"
#include "regular_file.h"
#include "strict_json.h"

namespace mambart {

using nlohmann::json;

const char* arch_name(Arch a) { return a == Arch::Mamba1 ? "mamba1" : "mamba2"; }

int64_t ModelConfig::conv_dim() const {
    return arch == Arch::Mamba1 ? d_inner : d_inner + 2 * ngroups * d_state;
}

int64_t ModelConfig::d_in_proj() const {
    return arch == Arch::Mamba1 ? 2 * d_inner : 2 * d_inner + 2 * ngroups * d_state + nheads;
}

int64_t ModelConfig::x_proj_dim() const { return dt_rank + 2 * d_state; }

int64_t ModelConfig::num_params() const {
    const int64_t d = d_model, E = d_inner, N = d_state, W = d_conv;
    int64_t per_layer = d * (norm == NormKind::LayerNorm ? 2 : 1);
    per_layer += d_in_proj() * d + (bias ? d_in_proj() : 0);
    per_layer += conv_dim() * W + (conv_bias ? conv_dim() : 0);
    if (arch == Arch::Mamba1) {
        per_layer += x_proj_dim() * E + E * dt_rank + E + E * N + E;
    } else {
        per_layer += 3 * nheads + (gated_norm ? E : 0);
    }
    per_layer += d * E + (bias ? d : 0);
    int64_t total = n_layer * per_layer + vocab_size_padded * d;
    total += d * (norm == NormKind::LayerNorm ? 2 : 1);
    if (!tie_embeddings) total += vocab_size_padded * d;
    return total;
}

namespace {

// Bounds that keep every derived size and product far from int64 overflow and reject absurd
// configs before anything is allocated.
constexpr int64_t kMaxDim = int64_t(1) << 24;
constexpr int64_t kMaxConfigBytes = 16 << 20;  // a config.json is a few hundred bytes

class Reader {
 public:
    Reader(const json& j, const std::string& origin) : j_(j), origin_(origin) {}

    [[noreturn]] void fail(const std::string& key, const std::string& what) const {
        throw ModelLoadError(str_cat(origin_, ": config key '", key, "' ", what));
    }
    const json& need(const char* key) {
        seen_.insert(key);
        if (!j_.contains(key)) fail(key, "is missing");
        return j_.at(key);
    }
    bool has(const char* key) const { return j_.contains(key); }

    int64_t integer(const char* key, int64_t lo, int64_t hi) {
        const json& v = need(key);
        if (!v.is_number_integer()) fail(key, "must be an integer");
        const int64_t x = v.get<int64_t>();
        if (x < lo || x > hi) fail(key, str_cat("= ", x, " is out of range [", lo, ", ", hi, "]"));
        return x;
    }
    int64_t optional_id(const char* key) {
        seen_.insert(key);
        if (!j_.contains(key) || j_.at(key).is_null()) return -1;
        return integer(key, 0, kMaxDim);
    }
    bool boolean(const char* key) {
        const json& v = need(key);
        if (!v.is_boolean()) fail(key, "must be true or false");
        return v.get<bool>();
    }
    double number(const char* key) {
        const json& v = need(key);
        if (!v.is_number()) fail(key, "must be a number");
        return v.get<double>();
    }
    std::string string(const char* key) {
        const json& v = need(key);
        if (!v.is_string()) fail(key, "must be a string");
        return v.get<std::string>();
    }
    void skip(const char* key) { seen_.insert(key); }
    void reject_unknown() const {
        for (auto it = j_.begin(); it != j_.end(); ++it)
            if (!seen_.count(it.key()))
                throw ModelLoadError(str_cat(origin_, ": unknown config key '", it.key(), "'"));
    }

 private:
    const json& j_;
    std::string origin_;
    std::set<std::string> seen_;
};

}  // namespace

ModelConfig ModelConfig::from_json_text(const std::string& text, const std::string& origin) {
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
    Reader r(j, origin);
    ModelConfig c;
    const int64_t fmt = r.integer("mambart_format", 0, 1 << 20);
    if (fmt != 1)
        r.fail("mambart_format", str_cat("= ", fmt, " is not supported by this version (expected 1)"));
    const std::string arch = r.string("architecture");
    if (arch == "mamba1") c.arch = Arch::Mamba1;
    else if (arch == "mamba2") c.arch = Arch::Mamba2;
    else r.fail("architecture", str_cat("= '", arch, "' is not supported (mamba1, mamba2)"));

    c.d_model = r.integer("d_model", 1, kMaxDim);
    c.n_layer = r.integer("n_layer", 1, 4096);
    c.vocab_size = r.integer("vocab_size", 1, kMaxDim);
    c.vocab_size_padded = r.integer("vocab_size_padded", 1, kMaxDim);
    if (c.vocab_size_padded < c.vocab_size)
        r.fail("vocab_size_padded", "must be >= vocab_size");
    c.d_inner = r.integer("d_inner", 1, kMaxDim);
    c.d_state = r.integer("d_state", 1, 4096);
    c.d_conv = r.integer("d_conv", 1, 64);
    c.conv_bias = r.boolean("conv_bias");
    c.bias = r.boolean("bias");
    c.dt_rank = r.integer("dt_rank", 0, kMaxDim);
    c.headdim = r.integer("headdim", 0, kMaxDim);
    c.nheads = r.integer("nheads", 0, kMaxDim);
    c.ngroups = r.integer("ngroups", 1, kMaxDim);
    c.chunk_size = r.integer("chunk_size", 0, 1 << 16);
    {
        const json& lim = r.need("dt_limit");
        if (!lim.is_array() || lim.size() != 2 || !lim[0].is_number() ||
            !(lim[1].is_number() || lim[1].is_null()))
            r.fail("dt_limit", "must be [min, max or null]");
        // Checked as doubles: converting an out-of-range double to float is undefined.
        const double lo = lim[0].get<double>();
        const double hi = lim[1].is_null() ? std::numeric_limits<double>::infinity()
                                           : lim[1].get<double>();
        const double fmax = std::numeric_limits<float>::max();
        if (!(lo >= 0.0 && lo < fmax) || !(hi > lo) || (std::isfinite(hi) && hi > fmax))
            r.fail("dt_limit", "must satisfy 0 <= min < max (finite float32 values, max may be null)");
        c.dt_min = static_cast<float>(lo);
        c.dt_max = std::isfinite(hi) ? static_cast<float>(hi) : std::numeric_limits<float>::infinity();
        if (!(c.dt_max > c.dt_min)) r.fail("dt_limit", "must satisfy 0 <= min < max");
    }
    c.gated_norm = r.boolean("gated_norm");
    if (r.boolean("norm_before_gate"))
        throw Unsupported(str_cat(origin, ": norm_before_gate=true is not supported"));
    const std::string norm = r.string("norm");
    if (norm == "rmsnorm") c.norm = NormKind::RMSNorm;
    else if (norm == "layernorm") c.norm = NormKind::LayerNorm;
    else r.fail("norm", str_cat("= '", norm, "' is not supported (rmsnorm, layernorm)"));
    const double eps = r.number("norm_eps");
    if (!(eps > 0.0 && eps < 1.0)) r.fail("norm_eps", "must be in (0, 1)");
    c.norm_eps = static_cast<float>(eps);
    c.residual_in_fp32 = r.boolean("residual_in_fp32");
    c.tie_embeddings = r.boolean("tie_embeddings");
    c.bos_token_id = r.optional_id("bos_token_id");
    c.eos_token_id = r.optional_id("eos_token_id");
    c.pad_token_id = r.optional_id("pad_token_id");
    c.dtype = [&] {
        const std::string s = r.string("dtype");
        try {
            return dtype_from_name(s, "dtype");
        } catch (const InvalidArgument&) {
            r.fail("dtype", str_cat("= '", s, "' is not float32, float16 or bfloat16"));
        }
    }();
    r.skip("source");
    r.reject_unknown();

    // Architecture-specific consistency.
    if (c.arch == Arch::Mamba1) {
        if (c.dt_rank < 1) r.fail("dt_rank", "must be >= 1 for mamba1");
    } else {
        if (c.headdim < 1) r.fail("headdim", "must be >= 1 for mamba2");
        if (c.nheads * c.headdim != c.d_inner)
            r.fail("nheads", str_cat("x headdim (", c.nheads, " x ", c.headdim,
                                     ") must equal d_inner (", c.d_inner, ")"));
        if (c.nheads % c.ngroups != 0)
            r.fail("ngroups", str_cat("= ", c.ngroups, " must divide nheads = ", c.nheads));
        if (c.chunk_size < 1) r.fail("chunk_size", "must be >= 1 for mamba2");
    }
    if (c.eos_token_id >= c.vocab_size) r.fail("eos_token_id", "is outside the vocabulary");
    // Parameter-count sanity bound: reject configs no machine could hold before allocating.
    const double approx = static_cast<double>(c.n_layer) *
                              (static_cast<double>(c.d_in_proj()) * c.d_model +
                               static_cast<double>(c.d_inner) * (c.d_model + c.d_state + c.d_conv)) +
                          2.0 * static_cast<double>(c.vocab_size_padded) * c.d_model;
    if (approx > 1e12)
        throw ModelLoadError(str_cat(origin, ": the config implies about ", approx,
                                     " parameters, which is not a plausible model"));
    return c;
}

ModelConfig ModelConfig::from_file(const std::string& path) {
    // A regular file of bounded size: a directory, FIFO or /dev/zero link must not hang or OOM.
    struct stat st;
    return from_json_text(read_regular_file(path, "config", kMaxConfigBytes, &st), path);
}

}  // namespace mambart

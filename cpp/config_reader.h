// L1 data: typed, validated reads of one JSON object of a config (the model's config.json, or
// one entry of its `layers` list). Every error is a ModelLoadError "<origin>: config key '<key>'
// <what>", where origin names the file (and the layer: "config.json: layers[3]").
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <set>
#include <string>

#include "error.h"

namespace mambart {

// Bounds that keep every derived size and product far from int64 overflow and reject absurd
// configs before anything is allocated.
constexpr int64_t kMaxDim = int64_t(1) << 24;

class ConfigReader {
 public:
    ConfigReader(const nlohmann::json& j, std::string origin) : j_(j), origin_(std::move(origin)) {}

    const std::string& origin() const { return origin_; }
    [[noreturn]] void fail(const std::string& key, const std::string& what) const {
        throw ModelLoadError(str_cat(origin_, ": config key '", key, "' ", what));
    }
    const nlohmann::json& need(const char* key) {
        seen_.insert(key);
        if (!j_.contains(key)) fail(key, "is missing");
        return j_.at(key);
    }
    bool has(const char* key) const { return j_.contains(key); }

    int64_t integer(const char* key, int64_t lo, int64_t hi) {
        const nlohmann::json& v = need(key);
        if (!v.is_number_integer()) fail(key, "must be an integer");
        if (v.is_number_unsigned() && v.get<uint64_t>() > uint64_t(INT64_MAX))
            fail(key, str_cat("= ", v.get<uint64_t>(), " is out of range [", lo, ", ", hi, "]"));
        const int64_t x = v.get<int64_t>();
        if (x < lo || x > hi) fail(key, str_cat("= ", x, " is out of range [", lo, ", ", hi, "]"));
        return x;
    }
    // A token id or null (-1: none); the key itself is required.
    int64_t id_or_null(const char* key) {
        if (need(key).is_null()) return -1;
        return integer(key, 0, kMaxDim);
    }
    bool boolean(const char* key) {
        const nlohmann::json& v = need(key);
        if (!v.is_boolean()) fail(key, "must be true or false");
        return v.get<bool>();
    }
    double number(const char* key) {
        const nlohmann::json& v = need(key);
        if (!v.is_number()) fail(key, "must be a number");
        return v.get<double>();
    }
    std::string string(const char* key) {
        const nlohmann::json& v = need(key);
        if (!v.is_string()) fail(key, "must be a string");
        return v.get<std::string>();
    }
    // [min, max or null] with 0 <= min < max, as floats (max may be +inf).
    void float_range(const char* key, float* lo, float* hi);
    void skip(const char* key) { seen_.insert(key); }
    void reject_unknown() const {
        for (auto it = j_.begin(); it != j_.end(); ++it)
            if (!seen_.count(it.key()))
                throw ModelLoadError(str_cat(origin_, ": unknown config key '", it.key(), "'"));
    }

 private:
    const nlohmann::json& j_;
    std::string origin_;
    std::set<std::string> seen_;
};

}  // namespace mambart

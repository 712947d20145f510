// mambart-run's command line (issue 23): strict parsing with range checks, every error naming
// the flag and the value. Header-only and free of the model code, so the libFuzzer target
// (tests/fuzz/cpp/fuzz_run_args.cpp) drives exactly what mambart-run runs.
//
// Integers are decimal digits only (a leading '-' only where negatives are allowed, which is
// nowhere here): no '+', spaces, exponents, fractions or hex, and no wrap-around (std::stoll read
// "1e3" as 1, std::stoull read "-1" as 2^64-1, an id of 4294967297 became 1). Reals are plain
// decimals (digits, '.', an exponent) that must be finite as a float: "0.5abc", "nan", "inf",
// "1e39" and hex floats are refused. Each flag may be given once.
#pragma once

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "error.h"

namespace mambart {
namespace run_args {

struct RunArgs {
    bool help = false;
    std::string model_dir;
    std::string device = "cpu";
    std::vector<int32_t> tokens;
    std::optional<int64_t> max_new_tokens;
    std::optional<float> temperature, top_p, min_p, repetition_penalty;
    std::optional<int64_t> top_k;
    std::optional<uint64_t> seed;
    bool ignore_eos = false;
};

constexpr const char* kUsage =
    "usage: mambart-run MODEL_DIR --tokens 1,2,3 [--max-new-tokens N] [--temperature T] "
    "[--top-k K] [--top-p P] [--min-p P] [--repetition-penalty R] [--seed S] [--device cpu] "
    "[--ignore-eos]";

// Thrown for a bad command line (exit status 2); the message names the flag and the value.
struct UsageError : InvalidArgument {
    using InvalidArgument::InvalidArgument;
};

// The value as the message quotes it: printable ASCII, at most 40 characters.
inline std::string quoted(const std::string& v) {
    std::string out = "'";
    for (size_t i = 0; i < v.size() && i < 40; ++i) {
        const unsigned char c = static_cast<unsigned char>(v[i]);
        if (c >= 0x20 && c < 0x7f) {
            out += char(c);
        } else {
            static const char* hex = "0123456789abcdef";
            out += "\\x";
            out += hex[c >> 4];
            out += hex[c & 15];
        }
    }
    if (v.size() > 40) out += "...";
    return out + "'";
}

// An unsigned decimal integer in [lo, hi].
inline uint64_t parse_uint(const std::string& flag, const std::string& v, uint64_t lo,
                           uint64_t hi) {
    auto fail = [&](const std::string& what) {
        return UsageError(str_cat(flag, ": ", quoted(v), " ", what));
    };
    const std::string range = str_cat("(expected an integer in [", lo, ", ", hi, "])");
    if (v.empty()) throw fail("is empty " + range);
    if (v[0] == '-') throw fail("is negative " + range);
    uint64_t x = 0;
    for (char c : v) {
        if (c < '0' || c > '9') throw fail("is not a decimal integer " + range);
        const uint64_t d = uint64_t(c - '0');
        if (x > (std::numeric_limits<uint64_t>::max() - d) / 10)
            throw fail("is out of range " + range);
        x = x * 10 + d;
    }
    if (x < lo || x > hi) throw fail("is out of range " + range);
    return x;
}

// A finite decimal real that is finite as a float, in [lo, hi] (or (lo, hi] when lo_open).
inline float parse_real(const std::string& flag, const std::string& v, double lo, double hi,
                        bool lo_open) {
    const std::string range = str_cat(lo_open ? "(" : "[", lo, ", ", hi, "]");
    auto fail = [&](const std::string& what) {
        return UsageError(str_cat(flag, ": ", quoted(v), " ", what));
    };
    if (v.empty()) throw fail("is empty (expected a number)");
    bool digit = false;
    for (char c : v) {
        if (c >= '0' && c <= '9') digit = true;
        else if (c != '.' && c != 'e' && c != 'E' && c != '-' && c != '+')
            throw fail("is not a decimal number");
    }
    if (!digit) throw fail("is not a decimal number");
    errno = 0;
    char* end = nullptr;
    const double d = std::strtod(v.c_str(), &end);
    if (end != v.c_str() + v.size()) throw fail("is not a decimal number");
    if (!std::isfinite(d) || std::fabs(d) > double(std::numeric_limits<float>::max()))
        throw fail(str_cat("is out of range (expected a number in ", range, ")"));
    if (d < lo || (lo_open && d == lo) || d > hi)
        throw fail(str_cat("is out of range (expected a number in ", range, ")"));
    return float(d);
}

// --tokens: comma-separated token ids in [0, 2^31-1], at least one, no empty items.
inline std::vector<int32_t> parse_tokens(const std::string& v) {
    if (v.empty()) throw UsageError("--tokens: '' holds no token ids");
    std::vector<int32_t> ids;
    size_t pos = 0;
    for (;;) {
        const size_t end = std::min(v.find(',', pos), v.size());
        const std::string tok = v.substr(pos, end - pos);
        if (tok.empty())
            throw UsageError(str_cat("--tokens: ", quoted(v), " has an empty id at position ",
                                     ids.size() + 1));
        ids.push_back(int32_t(parse_uint(str_cat("--tokens (id ", ids.size() + 1, ")"), tok, 0,
                                         uint64_t(std::numeric_limits<int32_t>::max()))));
        if (end == v.size()) break;
        pos = end + 1;
    }
    return ids;
}

inline RunArgs parse(const std::vector<std::string>& args) {
    RunArgs r;
    for (const std::string& a : args)
        if (a == "--help" || a == "-h") {
            r.help = true;
            return r;
        }
    if (args.empty() || args[0].empty() || args[0][0] == '-')
        throw UsageError("MODEL_DIR is missing (it comes first)");
    r.model_dir = args[0];
    std::set<std::string> seen;
    const uint64_t kI64 = uint64_t(std::numeric_limits<int64_t>::max());
    const double kF = double(std::numeric_limits<float>::max());
    for (size_t i = 1; i < args.size(); ++i) {
        const std::string& a = args[i];
        static const char* kFlags[] = {"--tokens", "--max-new-tokens", "--temperature",
                                       "--top-k", "--top-p", "--min-p", "--repetition-penalty",
                                       "--seed", "--device", "--ignore-eos"};
        bool known = false;
        for (const char* f : kFlags) known = known || a == f;
        if (!known) throw UsageError(str_cat("unknown argument ", quoted(a)));
        if (!seen.insert(a).second) throw UsageError(str_cat(a, ": given more than once"));
        if (a == "--ignore-eos") {
            r.ignore_eos = true;
            continue;
        }
        if (i + 1 >= args.size()) throw UsageError(str_cat(a, ": needs a value"));
        const std::string& v = args[++i];
        if (a == "--tokens") r.tokens = parse_tokens(v);
        else if (a == "--max-new-tokens") r.max_new_tokens = int64_t(parse_uint(a, v, 0, kI64));
        else if (a == "--temperature") r.temperature = parse_real(a, v, 0.0, kF, false);
        else if (a == "--top-k") r.top_k = int64_t(parse_uint(a, v, 0, kI64));
        else if (a == "--top-p") r.top_p = parse_real(a, v, 0.0, 1.0, true);
        else if (a == "--min-p") r.min_p = parse_real(a, v, 0.0, 1.0, false);
        else if (a == "--repetition-penalty")
            r.repetition_penalty = parse_real(a, v, 0.0, kF, true);
        else if (a == "--seed")
            r.seed = parse_uint(a, v, 0, std::numeric_limits<uint64_t>::max());
        else if (a == "--device") {
            if (v.empty() || v[0] == '-')
                throw UsageError(str_cat(a, ": ", quoted(v), " is not a device"));
            r.device = v;
        }
    }
    if (r.tokens.empty()) throw UsageError("--tokens is required (the prompt's token ids)");
    return r;
}

}  // namespace run_args
}  // namespace mambart

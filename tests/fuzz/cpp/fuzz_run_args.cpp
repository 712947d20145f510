// libFuzzer target: mambart-run's command-line parser (tools/run_args.h), built with ASan +
// UBSan. The input is the argument vector, arguments separated by NUL bytes. The parser must
// either refuse with UsageError (naming a flag or MODEL_DIR) or return values inside every
// documented range, and a value it accepted must parse to itself again.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "error.h"
#include "run_args.h"

namespace ra = mambart::run_args;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    std::vector<std::string> args;
    std::string cur;
    for (size_t i = 0; i < size; ++i) {
        if (data[i] == 0) {
            args.push_back(cur);
            cur.clear();
        } else {
            cur += char(data[i]);
        }
    }
    args.push_back(cur);
    ra::RunArgs r;
    try {
        r = ra::parse(args);
    } catch (const ra::UsageError& e) {
        const std::string m = e.what();
        // every message names the flag, MODEL_DIR, or quotes the unknown argument
        if (m.rfind("--", 0) != 0 && m.rfind("MODEL_DIR", 0) != 0 &&
            m.rfind("unknown argument '", 0) != 0)
            __builtin_trap();
        return 0;
    }
    if (r.help) return 0;
    if (r.model_dir.empty() || r.model_dir[0] == '-' || r.tokens.empty()) __builtin_trap();
    for (int32_t t : r.tokens)
        if (t < 0) __builtin_trap();
    if (r.max_new_tokens && *r.max_new_tokens < 0) __builtin_trap();
    if (r.top_k && *r.top_k < 0) __builtin_trap();
    if (r.temperature && !(std::isfinite(*r.temperature) && *r.temperature >= 0.0f))
        __builtin_trap();
    if (r.top_p && !(*r.top_p > 0.0f && *r.top_p <= 1.0f)) __builtin_trap();
    if (r.min_p && !(*r.min_p >= 0.0f && *r.min_p <= 1.0f)) __builtin_trap();
    if (r.repetition_penalty &&
        !(std::isfinite(*r.repetition_penalty) && *r.repetition_penalty > 0.0f))
        __builtin_trap();
    if (r.device.empty()) __builtin_trap();
    // Round trip: the canonical spelling of what was accepted parses to the same values.
    std::vector<std::string> again{r.model_dir, "--tokens"};
    std::string ids;
    for (size_t i = 0; i < r.tokens.size(); ++i)
        ids += (i ? "," : "") + std::to_string(r.tokens[i]);
    again.push_back(ids);
    if (r.seed) {
        again.push_back("--seed");
        again.push_back(std::to_string(*r.seed));
    }
    if (r.max_new_tokens) {
        again.push_back("--max-new-tokens");
        again.push_back(std::to_string(*r.max_new_tokens));
    }
    const ra::RunArgs r2 = ra::parse(again);  // throws (and the fuzzer reports it) if not
    if (r2.tokens != r.tokens || r2.seed != r.seed || r2.max_new_tokens != r.max_new_tokens)
        __builtin_trap();
    return 0;
}

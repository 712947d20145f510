#include "footprint.h"

#include <algorithm>

#include "error.h"
#include "host_memory.h"
#include "model.h"
#include "options.h"

namespace mambart {

namespace {
// Host bookkeeping per row: options, result, sampler, history and snapshot handles in
// GenerationStream, and the bindings' per-row objects; an upper bound.
constexpr uint64_t kRowOverhead = 1024;
// Rows of logits the prefill stages on the host at once (GenerationStream::prefill).
constexpr int64_t kStagedRows = Model::kLogitsRows;
}  // namespace

MemoryEstimate estimate_generation(const Model& m, const GenerationRequest& req) {
    const ModelConfig& c = m.config();
    const Backend& be = m.backend();
    const bool on_device = be.kind() != DeviceKind::CPU;
    const uint64_t B = req.feed.size(), V = uint64_t(c.vocab_size);
    uint64_t n = 0, T = 0;  // rows with tokens to run, tokens in all
    bool in_place = true;   // the prefill runs in the stream's own state (see prefill())
    for (size_t r = 0; r < req.feed.size(); ++r) {
        const uint64_t f = uint64_t(std::max<int64_t>(req.feed[r], 0));
        n += f > 0;
        T += f;
        in_place = in_place && f > 0 && (r == 0 || req.feed[r] <= req.feed[r - 1]);
    }
    const uint64_t state_row = State::row_bytes(c);  // bytes of one row of State

    MemoryEstimate e;
    auto add = [&](std::string what, uint64_t bytes, bool device) {
        if (!bytes) return;
        device = device && on_device;
        (device ? e.device : e.host) += bytes;
        e.parts.push_back({std::move(what), bytes, device});
    };
    const std::string rows_x_v = str_cat(B, " x ", V);
    // On the backend (device memory on a GPU, host memory on the CPU):
    add(str_cat("the recurrent state (", B, " rows x ", state_row, " bytes)"), B * state_row, true);
    if (!in_place)
        add(str_cat("the prefill's sorted copy of the state (", n, " rows)"), n * state_row, true);
    if (req.keep_states)
        add(str_cat("the kept prompt and final states (2 x ", B, " rows)"), 2 * B * state_row,
            true);
    // The prefill's largest call: at most max(rows, the chunk) token rows, and no more than
    // its tokens; the decode steps after it: B rows.
    const int64_t ws_rows =
        std::max<int64_t>(int64_t(B), std::min<int64_t>(m.prefill_chunk(), int64_t(T)));
    const uint64_t ws_now = m.workspace_bytes(m.max_rows(), m.max_logits_rows());
    const uint64_t ws_new = m.workspace_bytes(std::max(ws_rows, m.max_rows()),
                                              std::max<int64_t>(int64_t(B), m.max_logits_rows()));
    if (ws_new > ws_now)
        add(str_cat("the workspace (activations of ", ws_rows, " token rows, logits of ", rows_x_v,
                    " float32)"),
            ws_new - ws_now, true);
    const bool device_sampling = req.penalty_rows > 0 && be.supports_graphs();
    if (device_sampling)
        add(str_cat("the device sampler's seen-id mask (", rows_x_v, " bytes)"), B * V, true);
    // On the host:
    add(str_cat("the rows' latest logits (", rows_x_v, " float32)"), B * V * sizeof(float), false);
    add("the prefill's staged logits",
        std::min<uint64_t>(n, kStagedRows) * V * sizeof(float), false);
    if (device_sampling)
        add("the seen-id mask's staging", std::min<uint64_t>(B, kStagedRows) * V, false);
    add("the sampler's scratch", V * 8, false);
    if (req.penalty_rows > 0)
        add(str_cat("the seen ids of ", req.penalty_rows, " rows with a repetition penalty"),
            uint64_t(req.penalty_rows) * ((V + 63) / 64 * 8) + 4 * T, false);
    if (req.keep_states)
        add(str_cat("the kept states' logits and tokens (", rows_x_v, " float32)"),
            B * V * sizeof(float) + 8 * T, false);
    add(str_cat("the prompts' tokens (", T, ", 3 copies)"), 12 * T, false);
    add(str_cat("per-row bookkeeping (", B, " rows)"), B * kRowOverhead, false);
    std::stable_sort(e.parts.begin(), e.parts.end(),
                     [](const MemoryEstimate::Part& a, const MemoryEstimate::Part& b) {
                         return a.bytes > b.bytes;
                     });
    return e;
}

namespace {
std::string largest_parts(const MemoryEstimate& e, bool device) {
    std::string out;
    int shown = 0;
    for (const MemoryEstimate::Part& p : e.parts) {
        if (p.device != device || shown == 3) continue;
        out += str_cat(shown++ ? "; " : "", p.what, ": ", bytes_text(p.bytes));
    }
    return out;
}
}  // namespace

void check_generation_fits(const Model& m, const GenerationRequest& req) {
    check_fits(m, estimate_generation(m, req), req.feed.size());
}

void check_fits(const Model& m, const MemoryEstimate& e, size_t B) {
    const uint64_t set = runtime_options().generation_memory_limit;
    const uint64_t host_limit = set ? set : host_memory_available();
    if (e.host > host_limit)
        throw OutOfMemory(str_cat(
            "generating ", B, B == 1 ? " row" : " rows", " needs about ", bytes_text(e.host),
            " of host memory (largest parts: ", largest_parts(e, false), ") but the limit is ",
            bytes_text(host_limit),
            set ? " (the generation_memory_limit option, MAMBART_GENERATION_MEMORY_LIMIT)"
                : " (the memory available now; the generation_memory_limit option, "
                  "MAMBART_GENERATION_MEMORY_LIMIT, sets another limit)",
            ": generate fewer rows per call"));
    const uint64_t device_free = m.backend().free_memory();
    if (e.device > device_free)
        throw OutOfMemory(str_cat("generating ", B, B == 1 ? " row" : " rows", " needs about ",
                                  bytes_text(e.device), " of device memory (largest parts: ",
                                  largest_parts(e, true), ") but ", m.backend().name(), " has ",
                                  bytes_text(device_free), " free: generate fewer rows per call"));
}

MemoryEstimate estimate_engine_requests(const Model& m, const EngineRequestShape& req) {
    const ModelConfig& c = m.config();
    const bool on_device = m.backend().kind() != DeviceKind::CPU;
    const uint64_t B = req.feed.size(), V = uint64_t(c.vocab_size);
    const uint64_t state_row = State::row_bytes(c);  // bytes of one row of State
    uint64_t T = 0, N = 0;  // prompt tokens, counted new tokens
    for (size_t r = 0; r < B; ++r) {
        T += uint64_t(std::max<int64_t>(req.feed[r], 0));
        N += uint64_t(std::min(std::max<int64_t>(req.max_new_tokens[r], 0), kCountedNewTokens));
    }
    MemoryEstimate e;
    auto add = [&](std::string what, uint64_t bytes, bool device) {
        if (!bytes) return;
        device = device && on_device;
        (device ? e.device : e.host) += bytes;
        e.parts.push_back({std::move(what), bytes, device});
    };
    const uint64_t grow = uint64_t(std::max<int64_t>(req.slots_after - req.slots_now, 0));
    if (grow) {
        add(str_cat("the engine's new decode slots' state (", grow, " rows x ", state_row,
                    " bytes)"),
            grow * state_row, true);
        add(str_cat("the engine's new decode slots' logits (", grow, " x ", V, " float32)"),
            grow * V * sizeof(float), false);
        const uint64_t ws_now = m.workspace_bytes(m.max_rows(), m.max_logits_rows());
        const uint64_t ws_new = m.workspace_bytes(std::max(req.slots_after, m.max_rows()),
                                                  std::max(req.slots_after, m.max_logits_rows()));
        if (ws_new > ws_now)
            add(str_cat("the workspace for ", req.slots_after, " decode rows"), ws_new - ws_now,
                true);
    }
    const uint64_t pgrow = uint64_t(std::max<int64_t>(req.prefill_rows_after - req.prefill_rows_now, 0));
    if (pgrow)
        add(str_cat("the engine's new prefill rows' state (", pgrow, " rows x ", state_row,
                    " bytes)"),
            pgrow * state_row, true);
    if (req.keep_rows > 0) {
        const uint64_t k = uint64_t(req.keep_rows);
        add(str_cat("the kept prompt and final states (2 x ", k, " rows)"), 2 * k * state_row,
            true);
        add(str_cat("the kept states' logits (", k, " x ", V, " float32)"), k * V * sizeof(float),
            false);
    }
    if (req.cache_unfilled > 0) {
        // Entries are states (on the backend) with their logits and tokens (host): the budget
        // counts both, so at most all of it is on either side, and on the host at most the
        // logits' share of an entry that has them.
        const uint64_t u = req.cache_unfilled, logits = V * sizeof(float);
        add("the prompt cache's unused budget", u, true);
        if (on_device)
            add("the prompt cache's unused budget (logits, host)",
                uint64_t(double(u) * double(logits) / double(logits + state_row)), false);
    }
    if (req.penalty_rows > 0)
        add(str_cat("the seen ids of ", req.penalty_rows, " requests with a repetition penalty"),
            uint64_t(req.penalty_rows) * ((V + 63) / 64 * 8), false);
    add(str_cat("the prompts' tokens (", T, ", 4 copies)"), 16 * T, false);
    add(str_cat("the generated tokens (up to ", N, ", 4 copies)"), 16 * N, false);
    add(str_cat("per-request bookkeeping (", B, " requests)"), B * kRowOverhead, false);
    std::stable_sort(e.parts.begin(), e.parts.end(),
                     [](const MemoryEstimate::Part& a, const MemoryEstimate::Part& b) {
                         return a.bytes > b.bytes;
                     });
    return e;
}

}  // namespace mambart

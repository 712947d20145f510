// L4 runtime: the memory a generation takes, estimated from the request before anything is
// allocated, and the admission check that refuses a request which cannot fit, with the estimate
// and the limit (issue 23, class 5: 100,000 one-token rows at vocabulary 50,280 used to end in
// std::bad_alloc after taking 10 GB). GenerationStream calls check_generation_fits before it
// allocates; a scheduler that admits rows into a running batch can call estimate_generation.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace mambart {

class Model;

// The shape of a request, as far as its memory depends on it.
struct GenerationRequest {
    std::vector<int64_t> feed;  // (B) tokens each row runs at prefill (a start state's pending
                                // tokens, then its prompt); 0 for a row that only restores a state
    int64_t penalty_rows = 0;   // rows with a repetition penalty (they keep the ids they saw)
    bool keep_states = false;   // every row's prompt and final states are kept (snapshots)
};

struct MemoryEstimate {
    uint64_t host = 0;    // bytes of host memory
    uint64_t device = 0;  // bytes of the backend's own memory (a GPU's); 0 on the CPU backend,
                          // whose state and workspace are host memory and counted in `host`
    // What the totals are made of: (what, bytes, on the device), largest first.
    struct Part {
        std::string what;
        uint64_t bytes;
        bool device;
    };
    std::vector<Part> parts;
};

// Upper bounds of what GenerationStream allocates for `req` on `model` (its buffers, the
// workspace growth, snapshots), not counting the tokens it generates (4 bytes per token in the
// result and the row's history) nor the caller's own copies of prompts and results.
MemoryEstimate estimate_generation(const Model& model, const GenerationRequest& req);

// The engine (issue 14): what submitting `feed.size()` requests adds. Per request: bookkeeping,
// its tokens (the prompt's copies, and up to kCountedNewTokens generated ones), a seen-id bitmap
// with a repetition penalty, kept prompt and final states; the engine's growth from
// `slots_now` to `slots_after` decode slots (state rows, their host logits and the workspace);
// and the part of the prompt cache's budget it does not use yet (the cache may fill it).
// Its memory does not grow with the vocabulary per request: a step's logits are per slot.
struct EngineRequestShape {
    std::vector<int64_t> feed;  // (B) prompt tokens per request (with a start's pending ones)
    std::vector<int64_t> max_new_tokens;  // (B)
    int64_t penalty_rows = 0;
    int64_t keep_rows = 0;      // requests that keep their states
    int64_t slots_now = 0, slots_after = 0;
    int64_t prefill_rows_now = 0, prefill_rows_after = 0;  // the prefill state's rows
    uint64_t cache_unfilled = 0;  // bytes the prompt cache may still take (budget - held)
};
constexpr int64_t kCountedNewTokens = 4096;
MemoryEstimate estimate_engine_requests(const Model& model, const EngineRequestShape& req);
// Throws OutOfMemory (as check_generation_fits) when `e` does not fit; `rows` names the size.
void check_fits(const Model& model, const MemoryEstimate& e, size_t rows);

// Throws OutOfMemory when the estimate exceeds the host limit (the generation_memory_limit
// option, else host_memory_available()) or the device backend's free memory; the message gives
// the estimate, its largest parts, the limit and how to change it.
void check_generation_fits(const Model& model, const GenerationRequest& req);

}  // namespace mambart

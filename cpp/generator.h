// L4 runtime: the generation loop. prefill -> { sample, stop on eos / stop ids / max_new_tokens,
// callback, step } for a batch of prompts of any lengths.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "model.h"
#include "sampling.h"

namespace mambart {

struct GenerationOptions {
    int64_t max_new_tokens = 64;          // tokens to generate per prompt at most (>= 0)
    SamplingOptions sampling;             // see sampling.h
    uint64_t seed = 0;                    // RNG seed; row r draws from stream r
    std::vector<int32_t> stop_token_ids;  // generation of a row stops after one of these
    bool ignore_eos = false;              // true: the config's eos_token_id does not stop
};

enum class FinishReason { None, Length, Eos, StopToken };
const char* finish_reason_name(FinishReason r);

struct GenerationResult {
    std::vector<int32_t> token_ids;  // the new tokens (a stop or eos token included)
    FinishReason finish_reason = FinishReason::None;
    int64_t prompt_tokens = 0;
    double prefill_ms = 0.0;         // this row's prefill
    double decode_ms = 0.0;          // the decode steps while this row was active
};

class Generator;

// A generation in progress; made by Generator::start. Each next() produces at most one token
// per active row. Not thread-safe itself; the Generator serialises compute between streams.
class GenerationStream {
 public:
    ~GenerationStream();
    // Advances one step. Appends (row, token) for every row that produced a token; returns false
    // once every row has finished (and then appends nothing).
    bool next(std::vector<std::pair<int64_t, int32_t>>* out);
    bool done() const { return active_ == 0; }
    // Stops row `row` now (e.g. a stop string matched on the text side).
    void finish_row(int64_t row, FinishReason reason);
    const std::vector<GenerationResult>& results() const { return results_; }
    // (B, V) the raw logits each row's latest token was sampled from (a row that finished
    // keeps the logits of its last step).
    const std::vector<float>& last_logits() const { return logits_host_; }
    int64_t batch() const { return B_; }

 private:
    friend class Generator;
    GenerationStream(Generator& g, std::vector<std::vector<int32_t>> prompts,
                     const GenerationOptions& opt);
    void prefill();
    void emit(int64_t row, int32_t token, std::vector<std::pair<int64_t, int32_t>>* out);

    Generator& gen_;
    GenerationOptions opt_;
    std::vector<std::vector<int32_t>> prompts_;
    int64_t B_;
    int64_t active_;
    int64_t step_ = 0;                  // decode steps taken
    bool prefilled_ = false;
    std::unique_ptr<State> state_;      // (B rows)
    std::vector<Sampler> samplers_;     // one per row
    std::vector<float> logits_host_;    // (B, V)
    std::vector<float> scratch_;        // (V) the sampler's working copy of one row
    std::vector<int32_t> last_;         // (B) the token each row feeds next
    std::vector<uint8_t> finished_;     // (B)
    std::vector<GenerationResult> results_;
};

class Generator {
 public:
    // device: "cpu" | "cuda" | "cuda:N" | "auto"; dtype: nullptr keeps the stored dtype.
    Generator(const std::string& model_dir, const std::string& device, const DType* dtype);

    const ModelConfig& config() const { return model_->config(); }
    const Model& model() const { return *model_; }
    std::string device_name() const { return model_->backend().name(); }

    // Next-token logits at every position of `ids` (one prefill from a fresh state):
    // out has ids.size() x vocab_size floats. `chunk` > 0 runs the prefill in forward calls of
    // that many tokens (1 = the decode-step path token by token), for tests of the invariant
    // prefill(N) == prefill(k) + steps; 0 picks the default.
    void logits(const std::vector<int32_t>& ids, float* out, int64_t chunk = 0);

    // Starts generating from each prompt (prompts may differ in length). Validates everything
    // first; throws InvalidArgument naming the parameter.
    std::unique_ptr<GenerationStream> start(const std::vector<std::vector<int32_t>>& prompts,
                                            const GenerationOptions& opt);

    // Runs a whole generation. `callback(row, token)` is called for every new token; returning
    // false stops generation for all rows.
    std::vector<GenerationResult> generate(
        const std::vector<std::vector<int32_t>>& prompts, const GenerationOptions& opt,
        const std::function<bool(int64_t, int32_t)>& callback = {});

    // Checks ids are in [0, vocab_size); `what` names the argument in the error.
    void check_ids(const std::vector<int32_t>& ids, const std::string& what) const;

 private:
    friend class GenerationStream;
    // Prefills `ids` into row `row` of `state` (reset first) in chunks; returns the last logits
    // copied to `last_logits` (V floats, host) unless nullptr, or all logits to `all_logits`.
    void prefill_row(State& state, int64_t row, const std::vector<int32_t>& ids,
                     float* last_logits, float* all_logits, int64_t chunk = 0);

    std::unique_ptr<Model> model_;
    std::mutex compute_mu_;  // one forward at a time: the workspace is shared
};

}  // namespace mambart

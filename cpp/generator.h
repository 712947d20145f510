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
#include "speculative.h"
#include "state_file.h"

namespace mambart {

struct GenerationOptions {
    int64_t max_new_tokens = 64;          // tokens to generate per prompt at most (>= 0)
    SamplingOptions sampling;             // see sampling.h
    uint64_t seed = 0;                    // RNG seed; row r draws from stream r
    std::vector<int32_t> stop_token_ids;  // generation of a row stops after one of these
    bool ignore_eos = false;              // true: the config's eos_token_id does not stop
    // RNG position (issue 7): the row's k-th new token draws uniform(seed, stream, rng_counter
    // + k); rng_stream -1 is the row index (one seed for a batch), a per-row seed uses 0 so that
    // the row equals a single run with that seed.
    int64_t rng_stream = -1;
    uint64_t rng_counter = 0;
};

// A snapshot of one sequence (issue 7): its recurrent state on the device plus what continuing
// it exactly needs. `state` holds tokens[0, fed); tokens[fed, end) are pending (given to the
// sequence, not yet run through the model: after a generation, the last sampled token). When
// nothing is pending, `logits` are the next-token logits after tokens[fed - 1] (host, V floats).
// Immutable once made: a generation copies it into its own rows (Backend::copy_device).
struct SequenceState {
    std::shared_ptr<Backend> backend;  // first member: destroyed last, after `state`
    std::unique_ptr<State> state;      // 1 row
    std::vector<int32_t> tokens;       // the whole sequence so far
    int64_t fed = 0;
    std::vector<float> logits;         // (V) when fed == tokens.size(), else empty
    // The RNG position of the generation that made it (has_rng false after a plain prefill):
    // its next token would draw uniform(seed, stream, counter).
    bool has_rng = false;
    uint64_t seed = 0, stream = 0, counter = 0;

    int64_t pending() const { return int64_t(tokens.size()) - fed; }
    size_t bytes() const {  // device state + host logits + tokens
        return (state ? state->bytes() : 0) + logits.size() * sizeof(float) +
               tokens.size() * sizeof(int32_t);
    }
};

// Why a sequence ended. The engine (issue 14) adds stop strings, cancel, timeout and failure.
// The device sampler's options from a row's sampling options (DeviceSampleParams' logits, ld,
// B, V, rng and out are filled by Model::decode_step).
inline DeviceSampleParams device_sample_params(const SamplingOptions& so, uint8_t* seen) {
    DeviceSampleParams sp{};
    sp.temperature = so.temperature;
    sp.top_k = so.top_k;
    sp.top_p = so.top_p;
    sp.min_p = so.min_p;
    sp.repetition_penalty = so.repetition_penalty;
    sp.seen = seen;
    return sp;
}

enum class FinishReason { None, Length, Eos, StopToken, StopString, Cancelled, Timeout, Error };
const char* finish_reason_name(FinishReason r);

struct GenerationResult {
    std::vector<int32_t> token_ids;  // the new tokens (a stop or eos token included)
    FinishReason finish_reason = FinishReason::None;
    int64_t prompt_tokens = 0;
    double prefill_ms = 0.0;         // the batch's prefill (rows prefill together, so every
                                     // row of a batch reports the same shared time)
    double decode_ms = 0.0;          // the decode steps while this row was active
    int64_t prefill_tokens = 0;      // tokens run through the model at prefill (issue 7: fewer
                                     // than prompt_tokens when starting from a state)
};

// The staged variable-length prefill of several rows (GenerationStream::prefill, the engine's
// prefill groups): `lens` are the rows' feed lengths, longest first, all > 0. Call k runs rows
// [0, rows) at positions [pos, pos + seg): the rows still feeding at pos, in segments that stop
// at the next row's end and hold at most max(rows, chunk) tokens.
struct PrefillCall {
    int64_t rows, pos, seg;
};
std::vector<PrefillCall> plan_prefill(const std::vector<int64_t>& lens, int64_t chunk);

class Generator;
class Engine;
struct EngineOptions;
class PrefixCache;
class TokenBytes;

// A state as a state file holds it (host copies), with `id`'s model identity.
StateFile state_file_of(const SequenceState& s, const StateIdentity& id);

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
    const std::vector<float>& last_logits() const;  // fetched from the device when stale
    int64_t batch() const { return B_; }

    // Issue 7 (streams started with keep_states): the state of row `row` now (at its finish if
    // it finished: later decode steps do not touch it), and the state right after its prompt
    // (with the prompt's next-token logits; nullptr before the prefill).
    std::shared_ptr<SequenceState> row_state(int64_t row);
    std::shared_ptr<SequenceState> prompt_state(int64_t row) const;
    // True when every row shares the sampling options (seeds, RNG streams and counters may
    // differ per row: the device sampler takes them per row).
    bool uniform_sampling() const { return uniform_sampling_; }
    // Model::forward calls the prefill made (0 before it): the rows prefill together, so this
    // is about the number of distinct feed lengths, not the number of rows (see prefill()).
    int64_t prefill_forward_calls() const { return prefill_forward_calls_; }

 private:
    friend class Generator;
    GenerationStream(Generator& g, std::vector<std::vector<int32_t>> prompts,
                     std::vector<GenerationOptions> row_opts,
                     std::vector<std::shared_ptr<const SequenceState>> starts, bool keep_states);
    std::shared_ptr<SequenceState> snapshot_row(int64_t row, bool with_logits);
    void prefill();
    void emit(int64_t row, int32_t token, std::vector<std::pair<int64_t, int32_t>>* out);
    // Decode fast path (CUDA): forward + device sampling as one graph replay per step
    // (Model::decode_step), taken when the backend supports graphs and every row samples with
    // the same options; MAMBART_DEVICE_SAMPLING=0 (env) turns it off.
    bool use_device_decode();
    void decode_on_device(std::vector<std::pair<int64_t, int32_t>>* out);

    Generator& gen_;
    GenerationOptions opt_;
    std::vector<std::vector<int32_t>> prompts_;
    int64_t B_;
    int64_t active_;
    int64_t step_ = 0;                  // decode steps taken
    bool prefilled_ = false;
    int64_t prefill_forward_calls_ = 0;
    std::unique_ptr<State> state_;      // (B rows)
    std::vector<Sampler> samplers_;     // one per row
    mutable std::vector<float> logits_host_;  // (B, V)
    std::vector<float> scratch_;        // (V) the sampler's working copy of one row
    std::vector<int32_t> last_;         // (B) the token each row feeds next
    std::vector<uint8_t> finished_;     // (B)
    std::vector<GenerationResult> results_;
    // Issue 7: per-row options (opt_ is row 0's), start states, histories, snapshots.
    std::vector<GenerationOptions> row_opt_;                    // (B)
    std::vector<uint64_t> stream_id_;                           // (B) RNG stream per row
    std::vector<std::shared_ptr<const SequenceState>> starts_;  // (B) or nullptr: fresh
    std::vector<std::vector<int32_t>> history_;                 // (B) start tokens + prompt + new
    bool keep_states_ = false;
    bool uniform_sampling_ = true;
    std::vector<std::shared_ptr<SequenceState>> final_states_;   // (B) taken at finish
    std::vector<std::shared_ptr<SequenceState>> prompt_states_;  // (B) taken after prefill
    // Decode fast path state (see use_device_decode):
    int device_decode_ = -1;             // -1: not decided yet; 0: host sampling; 1: device
    uint8_t* seen_dev_ = nullptr;        // (B, V) device: ids seen per row (repetition penalty)
    std::vector<uint64_t> rng_host_;     // (B, 3) (seed, stream, counter) per row
    std::vector<int32_t> tokens_host_;   // (B) the ids sampled on the device
    const float* logits_dev_ = nullptr;  // (B, V) device logits of the last fast step
    mutable bool logits_stale_ = false;  // logits_host_ lags logits_dev_
};

class Generator {
 public:
    // device: "cpu" | "cuda" | "cuda:N" | "auto"; dtype: nullptr keeps the stored dtype;
    // threads: the CPU backend's threads, 1..kMaxThreads (0: the cpu_threads option, else the
    // cores this process may run on).
    static constexpr int kMaxThreads = 4096;
    // state_dtype: the SSM states' storage (F32 / BF16), or nullptr: the option state_dtype.
    Generator(const std::string& model_dir, const std::string& device, const DType* dtype,
              int threads = 0, const DType* state_dtype = nullptr);
    ~Generator();

    const ModelConfig& config() const { return model_->config(); }
    const Model& model() const { return *model_; }
    std::string device_name() const { return model_->backend().name(); }
    // The CPU backend's threads (0 on a device backend).
    int threads() const { return model_->backend().threads(); }

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

    // ---- issue 25: speculative decoding (speculative.h) ----
    // One prompt (non-empty) generated with `spec`'s proposer; `draft` is the draft model's
    // generator (Method::Draft, same vocabulary; may be this generator) or nullptr (prompt
    // lookup). Greedy output equals generate()'s; sampled output follows the same distribution.
    // `callback(token)` returning false stops (finish reason Cancelled). Stats into `stats`.
    // InvalidArgument naming the parameter for bad options; Unsupported when a layer type
    // cannot keep per-token states.
    GenerationResult generate_speculative(const std::vector<int32_t>& prompt,
                                          const GenerationOptions& opt,
                                          const SpeculativeOptions& spec, Generator* draft,
                                          SpeculativeStats* stats,
                                          const std::function<bool(int32_t)>& callback = {});

    // For tests of the per-token states: prefills `prompt` (non-empty), then runs `tokens` in
    // one traced forward pass; returns the state after each of them (host, per token:
    // State::row_to_host's form) and their logits into `logits` (tokens.size() x V) if given.
    std::vector<std::vector<std::vector<float>>> traced_states(
        const std::vector<int32_t>& prompt, const std::vector<int32_t>& tokens, float* logits);

    // For benchmarks: the median time (ms) of `iters` verification passes of `tokens` (1 to
    // kMaxK + 1) after `prompt`, each from the same state, with the per-token states written
    // (trace) or not, the logits copied to the host; and of keeping position L - 2's state
    // (one State::copy_row_from) in `*rollback_ms` if given.
    double verification_ms(const std::vector<int32_t>& prompt, const std::vector<int32_t>& tokens,
                           int64_t iters, bool trace, double* rollback_ms);

    // ---- issue 14: the continuous-batching engine (engine.h) ----
    // The engine, started on first use with `opt` (later calls return the running one; options
    // then must be default or equal). Its vocabulary bytes (stop strings) come from
    // set_token_bytes, else from the model directory's tokenizer.json when there is one.
    Engine& engine(const EngineOptions* opt = nullptr);
    bool engine_started() const;
    // The vocabulary as bytes for stop strings (before the engine starts).
    void set_token_bytes(TokenBytes bytes);
    const std::string& model_dir() const { return model_dir_; }

    // Checks ids are in [0, vocab_size); `what` names the argument in the error.
    void check_ids(const std::vector<int32_t>& ids, const std::string& what) const;
    // Checks that a sequence of `tokens` tokens fits the model's context (ModelConfig::
    // max_context(): its attention layers' KV caches; unbounded for recurrent-only models);
    // `what` names what asked for them in the error.
    void check_context(int64_t tokens, const std::string& what) const;

    // ---- issue 7: states, per-row options, scoring ----
    // start() with one options struct per row and a start state per row (empty vector or
    // nullptr entries: a fresh sequence). A row with a start state continues it: its pending
    // tokens and then its prompt (which may be empty) are prefilled after it.
    // keep_states: the stream keeps each row's states (row_state / prompt_state).
    std::unique_ptr<GenerationStream> start(
        const std::vector<std::vector<int32_t>>& prompts,
        const std::vector<GenerationOptions>& row_opts,
        const std::vector<std::shared_ptr<const SequenceState>>& starts, bool keep_states);
    // Prefills `ids` after `from` (nullptr: a fresh sequence) into a new 1-row state, with the
    // next-token logits. ids may be empty when `from` is given.
    std::shared_ptr<SequenceState> prefill(const std::vector<int32_t>& ids,
                                           const SequenceState* from);
    // Log-probabilities (float64, from a full-vocabulary log-softmax in double) of ids[i] given
    // everything before it: for a fresh sequence ids[0] has none, so n - 1 values for ids[1..];
    // after `from`, n values (ids[0] given the state). greedy[i] = 1 when the token is the
    // argmax (lowest id on ties). Memory: one logits chunk (Model::kLogitsRows x V).
    void score(const std::vector<int32_t>& ids, const SequenceState* from, double* logprobs,
               uint8_t* greedy);
    // A state from host arrays, one per state tensor of the model (State::slots() order:
    // (layers in the slot, shape...) fp32), e.g. a loaded file; validates sizes, ids and fed.
    // And the reverse, for saving.
    std::shared_ptr<SequenceState> state_from_host(const std::vector<std::vector<float>>& tensors,
                                                   std::vector<int32_t> tokens, int64_t fed,
                                                   std::vector<float> logits);
    std::vector<std::vector<float>> state_to_host(const SequenceState& s) const;
    // Checks that `s` fits this model (state shape, ids, fed/logits invariant).
    void check_state(const SequenceState& s, const std::string& what) const;

    // ---- issue 14: state files and the prompt cache ----
    // model_fingerprint(model_dir()), computed on first use (state files carry it; the prompt
    // cache keys entries by it). ModelLoadError when the model's files cannot be read.
    const std::string& fingerprint() const;
    // What a state file of this model records: fingerprint, dtype, architecture, layer types.
    StateIdentity state_identity() const;
    // A file's state on this model's backend, after checking that it belongs to this model
    // (fingerprint, dtype, architecture unless the caller checked them already, then layer
    // types and state tensors): StateError naming `source` (the file) and what differs.
    std::shared_ptr<SequenceState> state_from_file(const StateFile& f, const std::string& source,
                                                   bool check_identity = true);
    // The prompt cache of this generator's engine (nullptr: off). It may be shared with other
    // generators: entries are keyed by prompt_cache_key(), so each serves only its own model.
    void set_prompt_cache(std::shared_ptr<PrefixCache> cache);
    std::shared_ptr<PrefixCache> prompt_cache() const;
    // fingerprint, dtype and device: the key of this generator's prompt-cache entries.
    std::string prompt_cache_key() const;

 private:
    friend class GenerationStream;
    friend class Engine;
    // Prefills `ids` into row `row` of `state` (reset first) in chunks; returns the last logits
    // copied to `last_logits` (V floats, host) unless nullptr, or all logits to `all_logits`.
    // `from` (issue 7): restore the row from this state instead of resetting it (ids are then
    // fed after it; they may be empty: last_logits then gets the state's logits).
    void prefill_row(State& state, int64_t row, const std::vector<int32_t>& ids,
                     float* last_logits, float* all_logits, int64_t chunk = 0,
                     const SequenceState* from = nullptr);
    void restore_row(State& state, int64_t row, const SequenceState& from);

    std::string model_dir_;
    std::unique_ptr<Model> model_;
    std::mutex compute_mu_;  // one forward at a time: the workspace is shared
    mutable std::mutex engine_mu_;
    std::unique_ptr<TokenBytes> token_bytes_;  // set_token_bytes, until the engine takes it
    std::shared_ptr<PrefixCache> prompt_cache_;  // (engine_mu_) given to the engine
    mutable std::once_flag fingerprint_once_;
    mutable std::string fingerprint_;
    // Speculative decoding (issue 25): its states, kept between calls so that the graphs
    // recorded for its forwards (keyed by their buffers) replay in later calls. Slot 0: the
    // sequence (1 row), 1: the trace (k + 1 rows), 2: the sequence as a draft, 3: the draft's
    // per-step copies (k rows). Under compute_mu_.
    State& speculative_state(size_t slot, int64_t rows);
    std::unique_ptr<State> spec_states_[4];
    std::unique_ptr<Engine> engine_;           // declared last: stopped before the model goes
};

}  // namespace mambart

// L4 runtime: speculative decoding (speculative.h): the proposers, the verification with
// per-token states and the acceptance rule.
#include "speculative.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <mutex>

#include "error.h"
#include "generator.h"

namespace mambart {

void validate(const SpeculativeOptions& o) {
    MAMBART_CHECK_ARG(o.k >= 1 && o.k <= SpeculativeOptions::kMaxK, "speculative k = ", o.k,
                      " is outside [1, ", SpeculativeOptions::kMaxK, "]");
    if (o.method == SpeculativeOptions::Method::PromptLookup) {
        MAMBART_CHECK_ARG(o.ngram_min >= 1, "speculative ngram_min = ", o.ngram_min,
                          " must be >= 1");
        MAMBART_CHECK_ARG(o.ngram_max >= o.ngram_min && o.ngram_max <= 64,
                          "speculative ngram_max = ", o.ngram_max, " is outside [ngram_min = ",
                          o.ngram_min, ", 64]");
    }
}

namespace {

using Clock = std::chrono::steady_clock;
double ms_since(Clock::time_point t0) {
    return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

// RNG stream tags: the three kinds of draw of one position never share a stream.
constexpr uint64_t kDraftDraw = 0xD4AF7D4AF7D4AF70ull;   // the draft's sample
constexpr uint64_t kAcceptDraw = 0xACCE97ACCE97ACC0ull;  // the acceptance test

// The first id whose cumulative probability exceeds u * total (ids in order); the last id with
// a positive probability when rounding leaves u * total unreached.
int32_t draw_from(const float* p, int64_t V, double u) {
    double total = 0.0;
    for (int64_t v = 0; v < V; ++v) total += p[v];
    const double target = u * total;
    double acc = 0.0;
    int32_t last = 0;
    for (int64_t v = 0; v < V; ++v) {
        if (p[v] <= 0.0f) continue;
        acc += p[v];
        last = int32_t(v);
        if (acc > target) return int32_t(v);
    }
    return last;
}

void check_finite(const float* row, int64_t V, size_t generated) {
    for (int64_t v = 0; v < V; ++v)
        if (!std::isfinite(row[v]))
            throw Error(str_cat("the model produced a non-finite logit (", row[v],
                                ") for token id ", v, " after ", generated, " generated tokens"));
}

// Prompt lookup: the continuation (at most k tokens) of the most recent earlier occurrence of
// the longest suffix n-gram of `h` (ngram_max down to ngram_min tokens).
void lookup_proposals(const std::vector<int32_t>& h, const SpeculativeOptions& o, int64_t k,
                      std::vector<int32_t>* out) {
    out->clear();
    const int64_t n_h = int64_t(h.size());
    for (int64_t n = std::min(o.ngram_max, n_h - 1); n >= o.ngram_min; --n) {
        const int32_t* suf = h.data() + n_h - n;
        for (int64_t j = n_h - n - 1; j >= 0; --j) {  // most recent first
            if (!std::equal(suf, suf + n, h.data() + j)) continue;
            for (int64_t i = j + n; i < n_h && int64_t(out->size()) < k; ++i)
                out->push_back(h[size_t(i)]);
            return;
        }
    }
}

inline uint64_t mix_key(uint64_t h, uint64_t v) {
    h ^= v + 0x9E3779B97F4A7C15ull + (h << 6) + (h >> 2);
    return h;
}

// Model::forward of L tokens (from ids_buffer) of row 0 of `st`; on graph backends one graph
// replay, recorded once per (L, mode, buffers) (MAMBART_CUDA_GRAPHS=0: eager). Returns the
// logits (device).
const float* forward_replayed(Model& m, State& st, int64_t L, LogitsMode mode, State* trace) {
    Backend& be = m.backend();
    if (!be.supports_graphs()) return m.forward(st, 0, 1, L, m.ids_buffer(), mode, trace);
    if (trace && trace->batch() < L)  // checked here: a replay skips forward's checks
        throw InvalidArgument(str_cat("speculative: the trace holds ", trace->batch(),
                                      " rows, ", L, " needed"));
    uint64_t key = 0x5BEC0DE5BEC0DE25ull;
    for (uint64_t v : {uint64_t(L), uint64_t(mode), uint64_t(st.batch()),
                       uint64_t(reinterpret_cast<uintptr_t>(st.base())),
                       uint64_t(trace ? trace->batch() : 0),
                       uint64_t(reinterpret_cast<uintptr_t>(trace ? trace->base() : nullptr)),
                       uint64_t(reinterpret_cast<uintptr_t>(m.ids_buffer())),
                       uint64_t(reinterpret_cast<uintptr_t>(m.logits_buffer()))})
        key = mix_key(key, v);
    be.run_graph(key, [&] { m.forward(st, 0, 1, L, m.ids_buffer(), mode, trace); });
    return m.logits_buffer();
}

}  // namespace

State& Generator::speculative_state(size_t slot, int64_t rows) {
    std::unique_ptr<State>& s = spec_states_[slot];
    if (!s || s->batch() != rows) {
        s.reset();  // free first: the old one's memory may serve the new one
        s = std::make_unique<State>(config(), model_->backend(), rows);
    }
    return *s;
}

GenerationResult Generator::generate_speculative(const std::vector<int32_t>& prompt,
                                                 const GenerationOptions& opt,
                                                 const SpeculativeOptions& spec, Generator* draft,
                                                 SpeculativeStats* stats,
                                                 const std::function<bool(int32_t)>& callback) {
    using Method = SpeculativeOptions::Method;
    validate(spec);
    validate(opt.sampling);
    MAMBART_CHECK_ARG(opt.max_new_tokens >= 0, "max_new_tokens = ", opt.max_new_tokens,
                      " must be >= 0");
    MAMBART_CHECK_ARG(!prompt.empty(), "prompt: speculative decoding needs at least one token");
    check_ids(prompt, "prompt");
    const int64_t V = config().vocab_size;
    if (spec.method == Method::Draft) {
        MAMBART_CHECK_ARG(draft != nullptr, "speculative draft: no draft model given");
        MAMBART_CHECK_ARG(draft->config().vocab_size == V, "speculative draft: its vocabulary has ",
                          draft->config().vocab_size, " tokens, the target's ", V,
                          " (the draft must share the target's tokenizer)");
    } else {
        MAMBART_CHECK_ARG(draft == nullptr, "speculative draft: a draft model was given for "
                                            "prompt lookup");
    }
    for (Generator* g : {this, draft})
        if (g && !g->model_->supports_state_trace())
            throw Unsupported(str_cat("speculative decoding: ", g->model_dir_,
                                      " has a layer type that cannot keep per-token states yet"));
    for (int32_t t : opt.stop_token_ids)
        MAMBART_CHECK_ARG(t >= 0 && t < V, "stop_token_ids: ", t,
                          " is outside the vocabulary [0, ", V, ")");

    // One forward at a time on each model (a self-draft shares one lock).
    std::unique_lock<std::mutex> lk_target(compute_mu_, std::defer_lock);
    std::unique_lock<std::mutex> lk_draft;
    if (draft && draft != this) {
        lk_draft = std::unique_lock<std::mutex>(draft->compute_mu_, std::defer_lock);
        std::lock(lk_target, lk_draft);
    } else {
        lk_target.lock();
    }

    SpeculativeStats st_local;
    SpeculativeStats& S = stats ? *stats : st_local;
    S = SpeculativeStats{};
    Model& m = *model_;
    Backend& be = m.backend();
    const int64_t K = spec.k;
    const uint64_t stream = opt.rng_stream < 0 ? 0 : uint64_t(opt.rng_stream);
    auto draw = [&](uint64_t tag, size_t pos) {
        return uniform_draw(opt.seed, stream ^ tag, opt.rng_counter + uint64_t(pos));
    };

    GenerationResult res;
    res.prompt_tokens = res.prefill_tokens = int64_t(prompt.size());
    const auto t_prefill = Clock::now();
    // Reserve first: growing the workspace drops recorded graphs.
    m.reserve(std::max<int64_t>(K + 1, std::min<int64_t>(m.prefill_chunk(), int64_t(prompt.size()))),
              std::max<int64_t>(K + 1, Model::kLogitsRows));
    State& state = speculative_state(0, 1);  // the target's sequence
    // row t: the state after token t of a verification (recompute: a backup of the state)
    State& trace = speculative_state(1, spec.recompute ? 1 : K + 1);
    std::vector<float> logits(size_t((K + 1) * V));  // (K + 1, V) host: the verification's
    prefill_row(state, 0, prompt, logits.data(), nullptr);

    Model* dm = draft ? draft->model_.get() : nullptr;
    State* dstate = nullptr;  // the draft's sequence
    State* dtrace = nullptr;  // row i: the draft's state after its step i
    std::vector<int32_t> dpending;          // tokens the draft has yet to feed (1 or 2)
    std::vector<float> q;                   // (K, V) host: the draft's distributions
    std::vector<float> dlogits(size_t(dm ? V : 0));
    SamplingOptions dsamp = opt.sampling;   // the draft samples without the penalty
    dsamp.repetition_penalty = 1.0f;
    Sampler dsampler(V, false);
    if (dm) {
        dm->reserve(std::max<int64_t>(4, std::min<int64_t>(dm->prefill_chunk(),
                                                           int64_t(prompt.size()))),
                    Model::kLogitsRows);  // pending tokens: 1 or 2 (3 at the very end)
        dstate = &draft->speculative_state(2, 1);
        dtrace = &draft->speculative_state(3, K);
        draft->prefill_row(*dstate, 0, prompt, nullptr, nullptr);
        q.resize(size_t(K * V));
    }
    res.prefill_ms = ms_since(t_prefill);

    Sampler sampler(V, opt.sampling.repetition_penalty != 1.0f);
    for (int32_t id : prompt) sampler.observe(id);
    std::vector<int32_t> history(prompt);  // prompt + generated (prompt lookup searches it)
    std::vector<float> p(static_cast<size_t>(V)), scratch(static_cast<size_t>(V));  // (V)
    const ModelConfig& c = config();
    bool finished = opt.max_new_tokens == 0;
    if (finished) res.finish_reason = FinishReason::Length;
    // Appends a token; true when generation ends with it.
    auto emit = [&](int32_t tok) {
        res.token_ids.push_back(tok);
        history.push_back(tok);
        sampler.observe(tok);
        if (!opt.ignore_eos && c.eos_token_id >= 0 && tok == c.eos_token_id)
            res.finish_reason = FinishReason::Eos;
        else if (std::find(opt.stop_token_ids.begin(), opt.stop_token_ids.end(), tok) !=
                 opt.stop_token_ids.end())
            res.finish_reason = FinishReason::StopToken;
        else if (int64_t(res.token_ids.size()) >= opt.max_new_tokens)
            res.finish_reason = FinishReason::Length;
        if (callback && !callback(tok) && res.finish_reason == FinishReason::None)
            res.finish_reason = FinishReason::Cancelled;
        return res.finish_reason != FinishReason::None;
    };
    // The target's distribution at logits row `r` (penalty over the tokens so far).
    auto target_probs = [&](int64_t r) {
        const float* row = logits.data() + r * V;
        check_finite(row, V, res.token_ids.size());
        scratch.assign(row, row + V);
        sampler.probs(scratch.data(), opt.sampling, p.data());
    };

    // The first token comes from the prompt's logits.
    const auto t_decode = Clock::now();
    if (!finished) {
        target_probs(0);
        finished = emit(draw_from(p.data(), V, draw(0, 0)));
        if (dm) dpending = {res.token_ids.back()};
    }
    std::vector<int32_t> prop;   // this round's guesses
    std::vector<int32_t> ids;    // [last | guesses]
    int64_t k_round = spec.adaptive ? (K + 1) / 2 : K;  // guesses a round may propose
    while (!finished) {
        const int64_t remaining = opt.max_new_tokens - int64_t(res.token_ids.size());
        const int64_t k = std::min<int64_t>(k_round, remaining - 1);  // the bonus token is free
        S.k_last = k_round;
        const size_t pos0 = res.token_ids.size();               // position of guess 0
        // ---- propose ----
        const auto t_prop = Clock::now();
        prop.clear();
        if (k > 0 && !dm) {
            lookup_proposals(history, spec, k, &prop);
        } else if (k > 0) {
            Backend& dbe = dm->backend();
            for (int64_t i = 0; i < k; ++i) {
                // Feed the pending tokens (round start) or the previous guess.
                const int64_t L = i == 0 ? int64_t(dpending.size()) : 1;
                const int32_t* src = i == 0 ? dpending.data() : &prop.back();
                dbe.copy_to_device(dm->ids_buffer(), src, size_t(L) * sizeof(int32_t));
                const float* lg = forward_replayed(*dm, *dstate, L, LogitsMode::Last, nullptr);
                dbe.copy_to_host(dlogits.data(), lg, size_t(V) * sizeof(float));
                ++S.draft_forwards;
                if (i + 1 < k) dtrace->copy_row_from(*dstate, 0, i);  // after step i
                check_finite(dlogits.data(), V, res.token_ids.size());
                float* qi = q.data() + i * V;
                dsampler.probs(dlogits.data(), dsamp, qi);
                prop.push_back(draw_from(qi, V, draw(kDraftDraw, pos0 + size_t(i))));
            }
        }
        S.propose_ms += ms_since(t_prop);
        const int64_t n = int64_t(prop.size());
        // ---- verify: [last | guesses] in one pass, the state after each token in `trace` ----
        const auto t_ver = Clock::now();
        ids.assign(1, res.token_ids.back());
        ids.insert(ids.end(), prop.begin(), prop.end());
        be.copy_to_device(m.ids_buffer(), ids.data(), ids.size() * sizeof(int32_t));
        if (spec.recompute && n > 0) trace.copy_row_from(state, 0, 0);  // the state before
        const float* lg = forward_replayed(m, state, n + 1, LogitsMode::All,
                                           n > 0 && !spec.recompute ? &trace : nullptr);
        be.copy_to_host(logits.data(), lg, size_t((n + 1) * V) * sizeof(float));
        S.verify_ms += ms_since(t_ver);
        ++S.verifications;
        S.proposed += n;
        // ---- accept left to right ----
        int64_t a = 0;  // guesses kept
        bool rejected = false;
        for (; a < n && !finished; ++a) {
            const int32_t d = prop[size_t(a)];
            const size_t pos = res.token_ids.size();
            target_probs(a);
            const float* qa = dm ? q.data() + a * V : nullptr;
            const double qd = qa ? qa[d] : 1.0;
            if (draw(kAcceptDraw, pos) * qd < double(p[size_t(d)])) {
                ++S.accepted;
                finished = emit(d);
                continue;
            }
            // Rejected: draw from the residual max(0, p - q) (q one-hot at d for lookup).
            double rest = 0.0;
            for (int64_t v = 0; v < V; ++v) {
                const float r = p[size_t(v)] - (qa ? qa[v] : float(v == d));
                scratch[size_t(v)] = r > 0.0f ? r : 0.0f;
                rest += scratch[size_t(v)];
            }
            const float* from = rest > 0.0 ? scratch.data() : p.data();
            finished = emit(draw_from(from, V, draw(0, pos)));
            rejected = true;
            break;
        }
        if (!finished && !rejected) {  // every guess kept: one more token from the last row
            target_probs(n);
            finished = emit(draw_from(p.data(), V, draw(0, res.token_ids.size())));
        }
        if (spec.adaptive && rejected)
            k_round = std::max<int64_t>(1, k_round - 1);
        else if (spec.adaptive && n > 0 && n == k_round)  // a full round, every guess kept
            k_round = std::min<int64_t>(K, k_round + 2);
        if (finished) break;
        // ---- keep the states after [last | the a kept guesses] ----
        const auto t_rb = Clock::now();
        if (a < n && !spec.recompute) {
            state.copy_row_from(trace, a, 0);  // a == n: the pass ended there
        } else if (a < n) {  // restore, then run [last | the kept guesses] again
            state.copy_row_from(trace, 0, 0);
            be.copy_to_device(m.ids_buffer(), ids.data(), size_t(a + 1) * sizeof(int32_t));
            forward_replayed(m, state, a + 1, LogitsMode::None, nullptr);
        }
        if (dm) {
            // The draft fed [pending | guesses 0..k-2]; its state after step a has fed
            // [pending | guesses 0..a-1] (step k-1 is the current state).
            if (n == 0) {  // nothing fed this round (only before the last token)
                dpending.push_back(res.token_ids.back());
            } else if (a < n) {
                if (a < n - 1) dstate->copy_row_from(*dtrace, a, 0);
                dpending = {res.token_ids.back()};
            } else {
                dpending = {prop.back(), res.token_ids.back()};
            }
        }
        S.rollback_ms += ms_since(t_rb);
    }
    res.decode_ms = ms_since(t_decode);
    return res;
}

std::vector<std::vector<std::vector<float>>> Generator::traced_states(
    const std::vector<int32_t>& prompt, const std::vector<int32_t>& tokens, float* logits) {
    MAMBART_CHECK_ARG(!prompt.empty(), "prompt must not be empty");
    const int64_t L = int64_t(tokens.size()), V = config().vocab_size;
    MAMBART_CHECK_ARG(L >= 1 && L <= SpeculativeOptions::kMaxK + 1, "tokens: ", L,
                      " tokens, expected 1 to ", SpeculativeOptions::kMaxK + 1);
    check_ids(prompt, "prompt");
    check_ids(tokens, "tokens");
    std::lock_guard<std::mutex> lock(compute_mu_);
    Model& m = *model_;
    Backend& be = m.backend();
    State state(config(), be, 1), trace(config(), be, L);
    prefill_row(state, 0, prompt, nullptr, nullptr);
    m.reserve(L, L);
    be.copy_to_device(m.ids_buffer(), tokens.data(), size_t(L) * sizeof(int32_t));
    const float* lg = m.forward(state, 0, 1, L, m.ids_buffer(), LogitsMode::All, &trace);
    if (logits) be.copy_to_host(logits, lg, size_t(L * V) * sizeof(float));
    std::vector<std::vector<std::vector<float>>> out;
    for (int64_t t = 0; t < L; ++t) out.push_back(trace.row_to_host(t));
    return out;
}

double Generator::verification_ms(const std::vector<int32_t>& prompt,
                                  const std::vector<int32_t>& tokens, int64_t iters, bool traced,
                                  double* rollback_ms) {
    MAMBART_CHECK_ARG(!prompt.empty(), "prompt must not be empty");
    const int64_t L = int64_t(tokens.size()), V = config().vocab_size;
    MAMBART_CHECK_ARG(L >= 1 && L <= SpeculativeOptions::kMaxK + 1, "tokens: ", L,
                      " tokens, expected 1 to ", SpeculativeOptions::kMaxK + 1);
    MAMBART_CHECK_ARG(iters >= 1 && iters <= 100000, "iters = ", iters, " outside [1, 100000]");
    check_ids(prompt, "prompt");
    check_ids(tokens, "tokens");
    std::lock_guard<std::mutex> lock(compute_mu_);
    Model& m = *model_;
    Backend& be = m.backend();
    State start(config(), be, 1), state(config(), be, 1), trace(config(), be, L);
    prefill_row(start, 0, prompt, nullptr, nullptr);
    m.reserve(L, L);
    std::vector<float> logits(size_t(L * V));
    std::vector<double> pass, keep;
    for (int64_t i = 0; i < iters; ++i) {
        state.copy_row_from(start, 0, 0);
        be.synchronize();
        auto t0 = Clock::now();
        be.copy_to_device(m.ids_buffer(), tokens.data(), size_t(L) * sizeof(int32_t));
        const float* lg = m.forward(state, 0, 1, L, m.ids_buffer(), LogitsMode::All,
                                    traced ? &trace : nullptr);
        be.copy_to_host(logits.data(), lg, size_t(L * V) * sizeof(float));
        pass.push_back(ms_since(t0));
        t0 = Clock::now();
        state.copy_row_from(trace, std::max<int64_t>(L - 2, 0), 0);
        be.synchronize();
        keep.push_back(ms_since(t0));
    }
    auto median = [](std::vector<double> v) {
        std::sort(v.begin(), v.end());
        return v[v.size() / 2];
    };
    if (rollback_ms) *rollback_ms = median(keep);
    return median(pass);
}

}  // namespace mambart

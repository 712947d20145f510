// L4 runtime: speculative decoding with exact state rollback (issue 25).
//
// A proposer guesses up to k next tokens; the target model checks them in one forward pass of
// k + 1 tokens ([the last token | the guesses]) that yields the logits at every position and
// writes the recurrent state after every token into a trace (Model::forward's `trace`), so the
// state after the longest accepted prefix is kept by one copy (State::copy_row_from) instead of
// being recomputed. Proposers:
//   - prompt lookup: the longest suffix n-gram (ngram_max down to ngram_min tokens) of the text
//     so far (prompt + generated) that occurred before; its most recent earlier occurrence's
//     continuation is the guess (no second model);
//   - draft: a smaller model with the same vocabulary samples k tokens one at a time from its
//     own distribution q (the target's sampling options without the repetition penalty); its
//     own state is rolled back the same way (a copy of its state after each step).
// Acceptance (Leviathan et al. 2023; Chen et al. 2023), left to right: guess d at a position
// with target distribution p (Sampler::probs: every filter of the options applied) and draft
// distribution q (one-hot for prompt lookup) is kept when u * q(d) < p(d), u ~ U[0, 1); at the
// first rejection the token is drawn from the residual max(0, p - q) normalised, and the round
// ends; when every guess is kept, one more token is drawn from p at the next position. Each
// emitted token is then distributed exactly as the target's sampler would draw it; greedy
// (temperature 0: p and q one-hot) keeps a guess iff it is the target's argmax, so the output
// equals plain greedy decoding token for token. The draws are uniform(seed, stream ^ tag,
// counter + position) with distinct tags for the draft's draw, the acceptance test and the
// target's draw: seeded runs are reproducible (they differ from plain sampling's tokens, not in
// distribution).
#pragma once

#include <cstdint>
#include <string>

namespace mambart {

struct SpeculativeOptions {
    enum class Method { PromptLookup, Draft };
    Method method = Method::PromptLookup;
    int64_t k = 4;          // tokens proposed per verification, in [1, kMaxK]
    int64_t ngram_max = 3;  // prompt lookup: the longest suffix n-gram looked up (>= ngram_min)
    int64_t ngram_min = 1;  // prompt lookup: the shortest (>= 1)
    // Keep the accepted prefix's state by recomputation instead of the trace: the verification
    // runs without per-token states, and a partial acceptance restores the state from before
    // it and runs the kept tokens again (the alternative the trace is measured against:
    // tools/bench_speculative.py --rollback recompute). Same tokens either way.
    bool recompute = false;
    // Adapt the guesses per pass to the acceptance: k is then the most; a round proposes
    // k_round (first ceil(k / 2)), +2 after a round whose k_round guesses were all kept, -1
    // after a rejection (at least 1). It depends on the accepted tokens only (never on timing),
    // so seeded runs stay reproducible; greedy output is plain decoding's whatever the k.
    bool adaptive = false;
    // The most tokens one verification may check (k + 1 rows of logits fit the model's logits
    // workspace, Model::kLogitsRows).
    static constexpr int64_t kMaxK = 32;
};

// Throws InvalidArgument naming the bad field ("speculative k = 0 ...").
void validate(const SpeculativeOptions& o);

struct SpeculativeStats {
    int64_t proposed = 0;       // guesses checked by the target
    int64_t accepted = 0;       // of them, kept
    int64_t verifications = 0;  // target forward passes (one per round)
    int64_t draft_forwards = 0; // draft model forward calls (0 for prompt lookup)
    double propose_ms = 0.0;    // time in the proposer (draft forwards, n-gram search)
    double verify_ms = 0.0;     // time in the target's forward passes (with the traces)
    double rollback_ms = 0.0;   // time keeping the accepted prefix's states (the copies)
    int64_t k_last = 0;         // the guesses the last round could propose (adaptive: k_round)
};

}  // namespace mambart

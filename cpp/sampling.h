// L4 runtime: sampling on fp32 logits.
//
// Order (each step optional): repetition penalty -> temperature -> top-k -> softmax -> top-p ->
// min-p -> renormalise -> draw. temperature == 0 is greedy (argmax, lowest id on ties) after the
// repetition penalty; the other filters do not apply then. The sampler is total: where the scaled
// distribution is degenerate (1/T overflows, or the largest penalised logit x 1/T is infinite, or
// all are -inf) it is greedy too (the T -> 0 limit); non-finite logits and an empty vocabulary are
// InvalidArgument, never a draw from NaN probabilities. These are the semantics any device
// sampler must reproduce given the same uniform draw.
//   repetition penalty: for each distinct id already seen, logit < 0 ? logit * p : logit / p
//   top-k (k > 0): keep the k largest logits (ties broken by lower id)
//   top-p (< 1): keep the smallest prefix, in order of decreasing probability, whose cumulative
//                probability reaches top_p (the most likely token always survives)
//   min-p (> 0): keep tokens whose probability >= min_p * the largest probability (standard
//                min-p; the reference's variant compares logits, see docs)
// The draw is a counter-based RNG: u = uniform(seed, stream, counter) in [0, 1), and the token
// is the first candidate whose cumulative probability exceeds u * total, walking the candidates
// in id order, or in decreasing-probability order (then id) when top-k or top-p has sorted them.
// The CUDA sampler walks them the same way, so both pick the same token. Same seed, same tokens.
#pragma once

#include <cstdint>
#include <vector>

namespace mambart {

struct SamplingOptions {
    float temperature = 0.0f;         // 0: greedy; > 0: sample from softmax(logits / T)
    int64_t top_k = 0;                // 0: off
    float top_p = 1.0f;               // 1: off; in (0, 1]
    float min_p = 0.0f;               // 0: off; in [0, 1]
    float repetition_penalty = 1.0f;  // 1: off; > 0
};

// Throws InvalidArgument naming the bad field.
void validate(const SamplingOptions& opt);

// A uniform double in [0, 1) from (seed, stream, counter): splitmix64 mixing, stateless.
double uniform_draw(uint64_t seed, uint64_t stream, uint64_t counter);

// One row's sampler. Its own memory is O(ids seen), not O(vocabulary): a batch keeps one per
// row (issue 23, class 5). The candidate list a draw needs (8 bytes x V) is scratch shared by
// every Sampler of the calling thread.
class Sampler {
 public:
    // track_seen false: observe() keeps nothing (a row without a repetition penalty needs no
    // seen ids); such a sampler must not be used with repetition_penalty != 1.
    explicit Sampler(int64_t vocab_size, bool track_seen = true);

    // Marks ids as seen (prompt and generated tokens) for the repetition penalty.
    void observe(int32_t id);
    void clear_seen();
    const std::vector<int32_t>& seen_ids() const { return seen_list_; }  // distinct, in order seen

    // Picks the next token from logits[vocab_size]; `logits` is used as scratch (modified).
    int32_t sample(float* logits, const SamplingOptions& opt, uint64_t seed, uint64_t stream,
                   uint64_t counter);

    // The final distribution over the vocabulary after every filter (one-hot for greedy);
    // for tests and for scoring the filters. `logits` is used as scratch.
    void probs(float* logits, const SamplingOptions& opt, float* out);

    struct Cand {
        float p;
        int32_t id;
    };

 private:
    // Applies penalty/temperature/filters; fills `cand` (the thread's scratch) with the
    // surviving (id, prob) in draw order and returns their total probability. Greedy: a single
    // candidate.
    double filter(float* logits, const SamplingOptions& opt, std::vector<Cand>& cand);

    int64_t vocab_;
    bool track_seen_;
    std::vector<uint64_t> seen_;      // (ceil(V / 64)) bit i: id i occurred; made at the first id
    std::vector<int32_t> seen_list_;  // distinct seen ids
};

}  // namespace mambart

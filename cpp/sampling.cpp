#include "sampling.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "error.h"

namespace mambart {

void validate(const SamplingOptions& o) {
    MAMBART_CHECK_ARG(std::isfinite(o.temperature) && o.temperature >= 0.0f,
                      "temperature must be >= 0 (0 = greedy), got ", o.temperature);
    MAMBART_CHECK_ARG(o.top_k >= 0, "top_k must be >= 0 (0 = off), got ", o.top_k);
    MAMBART_CHECK_ARG(o.top_p > 0.0f && o.top_p <= 1.0f, "top_p must be in (0, 1], got ", o.top_p);
    MAMBART_CHECK_ARG(o.min_p >= 0.0f && o.min_p <= 1.0f, "min_p must be in [0, 1], got ",
                      o.min_p);
    MAMBART_CHECK_ARG(std::isfinite(o.repetition_penalty) && o.repetition_penalty > 0.0f,
                      "repetition_penalty must be > 0 (1 = off), got ", o.repetition_penalty);
}

namespace {
inline uint64_t splitmix64(uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}
}  // namespace

double uniform_draw(uint64_t seed, uint64_t stream, uint64_t counter) {
    const uint64_t h = splitmix64(splitmix64(splitmix64(seed) ^ stream) ^ counter);
    return double(h >> 11) * (1.0 / 9007199254740992.0);  // 53 bits
}

namespace {
int64_t checked_vocab(int64_t v) {
    // An empty logits array would leave no candidate to return (cand.back() on an empty
    // vector; probs() writing past a zero-length output): refused here, for every caller.
    MAMBART_CHECK_ARG(v >= 1 && v <= int64_t(0x7fffffff),
                      "sampler: logits must hold 1 to 2^31-1 values (one per token id), got ", v);
    return v;
}

// Greedy and the finiteness check read all V logits once or twice per token (V ~ 50k-256k):
// 16 independent lanes of selects the compiler vectorises, not one chain of branches.
constexpr int kLanes = 16;

// Whether every value of v[0, n) is finite (no NaN, no +-inf).
bool all_finite(const float* v, int64_t n) {
    int bad[kLanes] = {};
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes)
        for (int j = 0; j < kLanes; ++j)
            bad[j] |= !(std::fabs(v[i + j]) <= std::numeric_limits<float>::max());
    int any = 0;
    for (int j = 0; j < kLanes; ++j) any |= bad[j];
    for (; i < n; ++i) any |= !std::isfinite(v[i]);
    return !any;
}

// The lowest index of the largest of v[0, n) (n >= 1, no NaN): as a scan that keeps the first
// strict maximum, in two passes (the maximum by lanes, then the first index holding it).
int32_t argmax_first(const float* v, int64_t n) {
    float m[kLanes];
    for (int j = 0; j < kLanes; ++j) m[j] = -std::numeric_limits<float>::infinity();
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes)
        for (int j = 0; j < kLanes; ++j) m[j] = v[i + j] > m[j] ? v[i + j] : m[j];
    float mx = m[0];
    for (int j = 1; j < kLanes; ++j) mx = m[j] > mx ? m[j] : mx;
    for (; i < n; ++i) mx = v[i] > mx ? v[i] : mx;
    for (int64_t k = 0; k < n; ++k)  // == also matches -0 to +0, as the scan's > treats them
        if (v[k] == mx) return int32_t(k);
    return 0;  // every value is -inf: the scan keeps index 0
}

// The candidate list of the calling thread: 8 bytes x V once per thread that samples, instead
// of once per row of a batch. filter() fills it and its caller reads it before returning.
std::vector<Sampler::Cand>& thread_candidates() {
    static thread_local std::vector<Sampler::Cand> cand;
    return cand;
}

}  // namespace

Sampler::Sampler(int64_t vocab_size, bool track_seen)
    : vocab_(checked_vocab(vocab_size)), track_seen_(track_seen) {}

void Sampler::observe(int32_t id) {
    if (!track_seen_ || id < 0 || id >= vocab_) return;
    if (seen_.empty()) seen_.assign(size_t((vocab_ + 63) / 64), 0);
    uint64_t& word = seen_[size_t(id) / 64];
    const uint64_t bit = uint64_t(1) << (id % 64);
    if (word & bit) return;
    word |= bit;
    seen_list_.push_back(id);
}

void Sampler::clear_seen() {
    for (int32_t id : seen_list_) seen_[size_t(id) / 64] = 0;
    seen_list_.clear();
}

double Sampler::filter(float* logits, const SamplingOptions& o, std::vector<Cand>& cand) {
    const int64_t V = vocab_;
    // A NaN or infinite logit has no probability: an error, never a draw from NaNs. (The
    // generator raises naming the row and step before this; the raw entry points reach here.)
    if (!all_finite(logits, V))
        for (int64_t i = 0; i < V; ++i)
            if (!std::isfinite(logits[i]))
                throw InvalidArgument(str_cat("sampler: logits must be finite, got ", logits[i],
                                              " for token id ", i));
    if (o.repetition_penalty != 1.0f && !track_seen_)
        throw Error("sampler: repetition_penalty != 1 needs a Sampler that tracks seen ids");
    if (o.repetition_penalty != 1.0f)
        for (int32_t id : seen_list_) {
            float& l = logits[id];
            l = l < 0.0f ? l * o.repetition_penalty : l / o.repetition_penalty;
        }
    auto greedy = [&]() {
        const int32_t best = argmax_first(logits, V);
        cand.clear();
        cand.push_back({1.0f, best});
        return 1.0;
    };
    cand.clear();
    // Greedy for T = 0, and where the scaled distribution is degenerate (its T -> 0 limit):
    // 1/T overflows (T below about 3e-39), or the scaled or penalised logits overflow so that
    // the largest is infinite (every exp(s - max) would be NaN) or all are -inf.
    if (o.temperature == 0.0f) return greedy();
    const float inv_t = 1.0f / o.temperature;
    if (!std::isfinite(inv_t)) return greedy();
    for (int64_t i = 0; i < V; ++i) cand.push_back({logits[i] * inv_t, int32_t(i)});
    // Order: larger value first, lower id on ties.
    auto before = [](const Cand& a, const Cand& b) { return a.p > b.p || (a.p == b.p && a.id < b.id); };
    bool sorted = false;
    if (o.top_k > 0 && o.top_k < V) {
        std::partial_sort(cand.begin(), cand.begin() + o.top_k, cand.end(), before);
        cand.resize(size_t(o.top_k));
        sorted = true;
    }
    // Softmax over the candidates (max subtracted; sums in double).
    float mx = -std::numeric_limits<float>::infinity();
    for (const Cand& c : cand) mx = std::max(mx, c.p);
    if (!std::isfinite(mx)) return greedy();
    double total = 0.0;
    for (Cand& c : cand) {
        c.p = std::exp(c.p - mx);
        total += c.p;
    }
    if (o.top_p < 1.0f) {
        if (!sorted) std::sort(cand.begin(), cand.end(), before);
        sorted = true;
        double cum = 0.0;
        size_t keep = 0;
        while (keep < cand.size()) {
            cum += cand[keep].p;
            ++keep;
            if (cum >= o.top_p * total) break;
        }
        cand.resize(keep);
        total = cum;
    }
    if (o.min_p > 0.0f) {
        float pmax = 0.0f;
        for (const Cand& c : cand) pmax = std::max(pmax, c.p);
        const float thr = o.min_p * pmax;
        size_t j = 0;
        total = 0.0;
        for (size_t i = 0; i < cand.size(); ++i)
            if (cand[i].p >= thr) {
                cand[j++] = cand[i];
                total += cand[i].p;
            }
        cand.resize(j);
    }
    return total;
}

int32_t Sampler::sample(float* logits, const SamplingOptions& o, uint64_t seed, uint64_t stream,
                        uint64_t counter) {
    std::vector<Cand>& cand = thread_candidates();
    const double total = filter(logits, o, cand);
    if (cand.size() == 1) return cand[0].id;
    const double target = uniform_draw(seed, stream, counter) * total;
    double cum = 0.0;
    for (const Cand& c : cand) {
        cum += c.p;
        if (cum > target) return c.id;
    }
    return cand.back().id;  // rounding: u * total at the very top
}

void Sampler::probs(float* logits, const SamplingOptions& o, float* out) {
    std::vector<Cand>& cand = thread_candidates();
    const double total = filter(logits, o, cand);
    std::fill(out, out + vocab_, 0.0f);
    for (const Cand& c : cand) out[c.id] = float(c.p / total);
}

}  // namespace mambart

// L4 runtime: the exact-prefix prompt cache (issue 14, item 4): a byte-bounded LRU of sequence
// states keyed by their whole token sequence, shared by every request of an engine (and by the
// engines of several generators when they share it). A request whose tokens extend a cached
// sequence starts from that state and prefills only the rest.
//
// Entries are immutable `shared_ptr<const SequenceState>`: a lookup hands out a reference, so
// evicting an entry never frees a state that a request still uses (the last user frees it).
// A lookup compares tokens exactly (a hash only finds candidates), and entries of other models
// are never served: every entry is keyed by the model (Generator::prompt_cache_key()).
// Every method is thread-safe; nothing here runs per generated token.
#pragma once

#include <cstddef>
#include <cstdint>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

namespace mambart {

struct SequenceState;

class PrefixCache {
 public:
    // `max_bytes`: the budget (SequenceState::bytes() summed over the entries).
    explicit PrefixCache(size_t max_bytes);

    // The state of the longest cached sequence of model `key` whose tokens are a prefix of
    // tokens[0, n) (all n of them included), or nullptr. Counts a hit or a miss; a hit becomes
    // the most recently used entry.
    std::shared_ptr<const SequenceState> lookup(const std::string& key, const int32_t* tokens,
                                                size_t n);
    // Whether an entry of `key` holds exactly `tokens` with at least `fed` of them run (then
    // inserting a state of those tokens would change nothing); a found entry is touched.
    bool has(const std::string& key, const std::vector<int32_t>& tokens, int64_t fed);
    // Keeps `s` under its tokens as the most recently used entry and evicts least recently used
    // entries beyond the budget. An entry of the same tokens is replaced when `s` has run more
    // of them (fed), else only touched. A state with no tokens or larger than the budget is not
    // kept, nor one with nothing pending and no logits. Returns whether `s` is now an entry.
    bool insert(const std::string& key, std::shared_ptr<const SequenceState> s);
    void clear();

    struct Stats {
        size_t max_bytes = 0, bytes = 0, entries = 0;
        int64_t hits = 0, misses = 0;
    };
    Stats stats() const;
    size_t max_bytes() const { return max_bytes_; }
    // Tests: every sequence hashes alike (one bucket), to show that lookups compare tokens.
    void collide_hashes_for_testing();

 private:
    struct Entry {
        std::string key;
        uint64_t hash;
        std::shared_ptr<const SequenceState> state;
        size_t bytes;
    };
    using Lru = std::list<Entry>;  // most recently used first
    // The hashes of (key, tokens[0, k)) for k = 0..n, in one pass.
    void prefix_hashes(const std::string& key, const int32_t* tokens, size_t n,
                       std::vector<uint64_t>* out) const;
    Lru::iterator find(const std::string& key, uint64_t hash, const int32_t* tokens, size_t n);
    void erase(Lru::iterator it);

    const size_t max_bytes_;
    mutable std::mutex mu_;
    Lru lru_;
    std::unordered_multimap<uint64_t, Lru::iterator> index_;  // hash -> entries
    std::unordered_map<std::string, std::map<size_t, int64_t>> lengths_;  // key -> {length: count}
    size_t bytes_ = 0;
    int64_t hits_ = 0, misses_ = 0;
    bool collide_ = false;
    std::vector<uint64_t> scratch_;  // prefix hashes of a lookup (under mu_)
};

}  // namespace mambart

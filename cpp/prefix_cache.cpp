#include "prefix_cache.h"

#include <algorithm>
#include <iterator>

#include "generator.h"

namespace mambart {

PrefixCache::PrefixCache(size_t max_bytes) : max_bytes_(max_bytes) {}

void PrefixCache::prefix_hashes(const std::string& key, const int32_t* tokens, size_t n,
                                std::vector<uint64_t>* out) const {
    out->resize(n + 1);
    if (collide_) {
        std::fill(out->begin(), out->end(), 0);
        return;
    }
    uint64_t h = 1469598103934665603ull;  // FNV-1a, 64 bit
    auto mix = [&](const void* p, size_t k) {
        for (size_t i = 0; i < k; ++i) {
            h ^= static_cast<const unsigned char*>(p)[i];
            h *= 1099511628211ull;
        }
    };
    mix(key.data(), key.size());
    mix("", 1);  // the key ends here
    (*out)[0] = h;
    for (size_t i = 0; i < n; ++i) {
        mix(&tokens[i], sizeof(int32_t));
        (*out)[i + 1] = h;
    }
}

PrefixCache::Lru::iterator PrefixCache::find(const std::string& key, uint64_t hash,
                                             const int32_t* tokens, size_t n) {
    const auto range = index_.equal_range(hash);
    for (auto it = range.first; it != range.second; ++it) {
        const Entry& e = *it->second;
        const std::vector<int32_t>& t = e.state->tokens;
        // Exact: a hash match alone never serves another sequence (or another model's).
        if (e.key == key && t.size() == n && std::equal(t.begin(), t.end(), tokens))
            return it->second;
    }
    return lru_.end();
}

void PrefixCache::erase(Lru::iterator it) {
    const auto range = index_.equal_range(it->hash);
    for (auto i = range.first; i != range.second; ++i)
        if (i->second == it) {
            index_.erase(i);
            break;
        }
    auto lit = lengths_.find(it->key);
    const size_t len = it->state->tokens.size();
    if (--lit->second[len] == 0) lit->second.erase(len);
    if (lit->second.empty()) lengths_.erase(lit);
    bytes_ -= it->bytes;
    lru_.erase(it);  // drops the cache's reference; a request using the state keeps its own
}

std::shared_ptr<const SequenceState> PrefixCache::lookup(const std::string& key,
                                                         const int32_t* tokens, size_t n) {
    std::lock_guard<std::mutex> lk(mu_);
    const auto lit = lengths_.find(key);
    if (lit != lengths_.end()) {
        const std::map<size_t, int64_t>& lens = lit->second;
        // Cached lengths that fit, longest first.
        auto it = lens.upper_bound(n);
        if (it != lens.begin()) prefix_hashes(key, tokens, std::prev(it)->first, &scratch_);
        while (it != lens.begin()) {
            const size_t len = (--it)->first;
            const auto e = find(key, scratch_[len], tokens, len);
            if (e != lru_.end()) {
                lru_.splice(lru_.begin(), lru_, e);
                ++hits_;
                return e->state;
            }
        }
    }
    ++misses_;
    return nullptr;
}

bool PrefixCache::has(const std::string& key, const std::vector<int32_t>& tokens, int64_t fed) {
    std::lock_guard<std::mutex> lk(mu_);
    if (lengths_.find(key) == lengths_.end()) return false;
    prefix_hashes(key, tokens.data(), tokens.size(), &scratch_);
    const auto e = find(key, scratch_.back(), tokens.data(), tokens.size());
    if (e == lru_.end() || e->state->fed < fed) return false;
    lru_.splice(lru_.begin(), lru_, e);
    return true;
}

bool PrefixCache::insert(const std::string& key, std::shared_ptr<const SequenceState> s) {
    // A state with nothing pending is served only with its next-token logits.
    if (!s || s->tokens.empty() || (s->pending() == 0 && s->logits.empty())) return false;
    const size_t bytes = s->bytes();
    if (bytes > max_bytes_) return false;
    std::lock_guard<std::mutex> lk(mu_);
    prefix_hashes(key, s->tokens.data(), s->tokens.size(), &scratch_);
    const uint64_t hash = scratch_.back();
    const auto old = find(key, hash, s->tokens.data(), s->tokens.size());
    if (old != lru_.end()) {
        if (s->fed <= old->state->fed) {  // the entry serves these tokens at least as well
            lru_.splice(lru_.begin(), lru_, old);
            return old->state == s;
        }
        erase(old);
    }
    const size_t len = s->tokens.size();
    lru_.push_front(Entry{key, hash, std::move(s), bytes});
    index_.emplace(hash, lru_.begin());
    ++lengths_[key][len];
    bytes_ += bytes;
    while (bytes_ > max_bytes_) erase(std::prev(lru_.end()));  // never the new entry: it fits
    return true;
}

void PrefixCache::clear() {
    std::lock_guard<std::mutex> lk(mu_);
    lru_.clear();
    index_.clear();
    lengths_.clear();
    bytes_ = 0;
}

PrefixCache::Stats PrefixCache::stats() const {
    std::lock_guard<std::mutex> lk(mu_);
    Stats s;
    s.max_bytes = max_bytes_;
    s.bytes = bytes_;
    s.entries = lru_.size();
    s.hits = hits_;
    s.misses = misses_;
    return s;
}

void PrefixCache::collide_hashes_for_testing() {
    std::lock_guard<std::mutex> lk(mu_);
    collide_ = true;
    // Existing entries move into the one bucket too.
    index_.clear();
    for (auto it = lru_.begin(); it != lru_.end(); ++it) {
        it->hash = 0;
        index_.emplace(0, it);
    }
}

}  // namespace mambart

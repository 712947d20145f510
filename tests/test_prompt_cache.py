"""The exact prefix cache of states (issue 7): a conversation's next turn prefills only the new
tokens and gives what an uncached run gives; adversarial cases never serve another sequence's
state (a prefix that diverges at its last token, colliding hash buckets, the same tokens under
another model or dtype, entries reused after generations); the byte budget evicts LRU."""

from __future__ import annotations

import numpy as np
import pytest

import mambart
from mambart import PromptCache
from state_models import PROMPT, make


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pc")
    return {"m1": make(root, "mamba1", seed=3), "m1b": make(root, "mamba1", seed=4),
            "m2": make(root, "mamba2", seed=3)}


@pytest.fixture(scope="module")
def plain(dirs):
    return mambart.Generator(dirs["m1"])


@pytest.fixture
def g(dirs):
    return mambart.Generator(dirs["m1"], prompt_cache_bytes=1 << 20)


def test_next_turn_prefills_only_the_new_tokens(g, plain):
    t1 = g.generate(PROMPT, max_new_tokens=6, ignore_eos=True)
    assert t1.prefill_tokens == len(PROMPT)
    turn2 = PROMPT + t1.token_ids + [11, 12, 13]
    t2 = g.generate(turn2, max_new_tokens=6, ignore_eos=True)
    # The last generated token was never run (it was pending), then the 3 new ones.
    assert t2.prefill_tokens == 4 and t2.prompt_tokens == len(turn2)
    assert t2.token_ids == plain.generate(turn2, max_new_tokens=6, ignore_eos=True).token_ids
    turn3 = turn2 + t2.token_ids + [14]
    t3 = g.generate(turn3, max_new_tokens=4, ignore_eos=True)
    assert t3.prefill_tokens == 2
    assert t3.token_ids == plain.generate(turn3, max_new_tokens=4, ignore_eos=True).token_ids
    # The same prompt again: nothing to prefill (the post-prompt state keeps its logits), and
    # sampled runs draw as uncached ones do.
    again = g.generate(turn3, max_new_tokens=4, ignore_eos=True, temperature=1.0, seed=8)
    assert again.prefill_tokens == 0
    assert again.token_ids == plain.generate(turn3, max_new_tokens=4, ignore_eos=True,
                                             temperature=1.0, seed=8).token_ids
    assert g.prompt_cache.hits >= 3


def test_prefill_uses_and_fills_the_cache(g):
    s = g.prefill(PROMPT)
    assert g.prompt_cache.lookup(g._cache_key(), PROMPT) is s
    r = g.generate(PROMPT + [3], max_new_tokens=2)
    assert r.prefill_tokens == 1


def test_prefix_diverging_at_the_last_token_is_not_served(g, plain):
    g.generate(PROMPT, max_new_tokens=3, ignore_eos=True)
    other = PROMPT[:-1] + [PROMPT[-1] + 1]
    r = g.generate(other, max_new_tokens=5, ignore_eos=True)
    assert r.prefill_tokens == len(other)  # no entry is a prefix of it
    assert r.token_ids == plain.generate(other, max_new_tokens=5, ignore_eos=True).token_ids
    shorter = PROMPT[:-1]  # a prefix of a cached sequence, but no state was taken there
    r = g.generate(shorter, max_new_tokens=5, ignore_eos=True)
    assert r.prefill_tokens == len(shorter)
    assert r.token_ids == plain.generate(shorter, max_new_tokens=5, ignore_eos=True).token_ids


def test_colliding_hash_buckets_never_serve_another_prefix(g, plain):
    g.prompt_cache._force_hash_collisions()  # every prefix one bucket
    prompts = [[1, 2, 3, 4], [1, 2, 3, 5], [9, 2, 3, 4], [4, 3, 2, 1]]  # same length
    for p in prompts:
        r = g.generate(p, max_new_tokens=4, ignore_eos=True)
        assert r.prefill_tokens == 4
        assert r.token_ids == plain.generate(p, max_new_tokens=4, ignore_eos=True).token_ids
    for p in prompts:  # now every one is cached in the one bucket: each gets its own
        r = g.generate(p, max_new_tokens=4, ignore_eos=True)
        assert r.prefill_tokens == 0
        assert r.token_ids == plain.generate(p, max_new_tokens=4, ignore_eos=True).token_ids


def test_same_tokens_under_another_model_or_dtype_are_not_served(dirs):
    cache = PromptCache(1 << 22)
    gens = [mambart.Generator(dirs["m1"]), mambart.Generator(dirs["m1"], dtype="bfloat16"),
            mambart.Generator(dirs["m1b"]), mambart.Generator(dirs["m2"])]
    for gen in gens:
        gen.prompt_cache = cache
    want = [mambart.Generator(gen.model_dir, dtype=gen.dtype).generate(
        PROMPT, max_new_tokens=5, ignore_eos=True).token_ids for gen in gens]
    for gen, w in zip(gens, want):
        r = gen.generate(PROMPT, max_new_tokens=5, ignore_eos=True)
        assert r.prefill_tokens == len(PROMPT), gen  # never another model's entry
        assert r.token_ids == w
    assert len(cache) == 2 * len(gens)
    for gen, w in zip(gens, want):  # and each its own on the second turn
        r = gen.generate(PROMPT, max_new_tokens=5, ignore_eos=True)
        assert r.prefill_tokens == 0 and r.token_ids == w


def test_entries_are_not_modified_by_the_generations_they_serve(g, plain):
    g.generate(PROMPT, max_new_tokens=1)
    entry = g.prompt_cache.lookup(g._cache_key(), PROMPT)
    before = [a.copy() for a in entry._native.to_host()], entry._native.logits.copy()
    for seed in range(3):
        r = g.generate(PROMPT, max_new_tokens=6, ignore_eos=True, temperature=1.0, seed=seed,
                       return_state=True)
        assert r.prefill_tokens == 0
        assert r.token_ids == plain.generate(PROMPT, max_new_tokens=6, ignore_eos=True,
                                             temperature=1.0, seed=seed).token_ids
        assert r.state is not entry
    after = entry._native.to_host(), entry._native.logits
    assert all(np.array_equal(x, y) for x, y in zip(before[0], after[0]))
    assert np.array_equal(before[1], after[1]) and entry.tokens == tuple(PROMPT)


def test_an_explicit_state_is_used_as_given(g, plain):
    s = plain.prefill([7, 7, 7])
    g.generate([7, 7, 7, 1], max_new_tokens=2)  # a cached entry that must not be used below
    r = g.generate([1], state=s, max_new_tokens=4, ignore_eos=True)
    assert r.prefill_tokens == 1
    assert r.token_ids == plain.generate([7, 7, 7, 1], max_new_tokens=4,
                                         ignore_eos=True).token_ids


def test_byte_budget_and_lru_eviction(dirs):
    g = mambart.Generator(dirs["m1"])
    one = g.prefill([1, 2, 3]).nbytes
    cache = g.enable_prompt_cache(3 * one + one // 2)  # room for three entries of this size
    key = g._cache_key()
    a, b, c = g.prefill([1, 2, 3]), g.prefill([4, 5, 6]), g.prefill([7, 8, 9])
    assert len(cache) == 3 and cache.nbytes == 3 * one
    assert cache.lookup(key, [1, 2, 3, 0]) is a  # touch a: b is now the oldest
    g.prefill([10, 11, 12])
    assert len(cache) == 3 and cache.nbytes <= cache.max_bytes
    assert cache.lookup(key, [4, 5, 6]) is None
    assert cache.lookup(key, [1, 2, 3]) is a and cache.lookup(key, [7, 8, 9]) is c
    big = PromptCache(one - 1)  # an entry larger than the budget is not kept
    big.insert(key, a)
    assert len(big) == 0 and big.nbytes == 0
    g.enable_prompt_cache(0)
    assert g.prompt_cache is None
    with pytest.raises(ValueError, match="max_bytes"):
        PromptCache(-1)


def test_stream_uses_and_fills_the_cache(g, plain):
    toks = list(g.stream(PROMPT, max_new_tokens=5, ignore_eos=True))
    assert toks == plain.generate(PROMPT, max_new_tokens=5, ignore_eos=True).token_ids
    nxt = PROMPT + toks + [21]
    r = g.generate(nxt, max_new_tokens=3, ignore_eos=True)
    assert r.prefill_tokens == 2
    assert list(g.stream(nxt, max_new_tokens=3, ignore_eos=True)) == r.token_ids


# ---- the cache in the engine (issue 14, item 4) -----------------------------------------------

def _chat(seed: int, turns: int):
    """Prompts of a conversation: each extends the previous one."""
    rng = np.random.default_rng(seed)
    out, p = [], list(PROMPT[: 2 + seed % 5])
    for _ in range(turns):
        p = p + rng.integers(1, 60, 3).tolist()
        out.append(list(p))
    return out


def test_engine_statistics_count_hits_misses_and_cached_tokens(g):
    s0 = g.engine_stats()
    assert s0["cache_max_bytes"] == 1 << 20 and s0["cache_entries"] == 0
    g.generate(PROMPT, max_new_tokens=3, ignore_eos=True)
    nxt = PROMPT + [11, 12]
    r = g.generate(nxt, max_new_tokens=3, ignore_eos=True)
    assert r.prefill_tokens == 2
    s = g.engine_stats()
    assert (s["cache_hits"], s["cache_misses"]) == (1, 1)
    assert s["cached_tokens"] == len(PROMPT)  # the prompt state served PROMPT
    assert s["prompt_tokens"] == len(PROMPT) + 2  # what was prefilled
    # entries: PROMPT's and nxt's prompt states and both final states
    assert s["cache_entries"] == len(g.prompt_cache) == 4
    assert s["cache_bytes"] == g.prompt_cache.nbytes > 0
    off = mambart.Generator(g.model_dir)
    off.generate(PROMPT, max_new_tokens=1)
    s = off.engine_stats()
    assert s["cache_hits"] == s["cache_misses"] == s["cache_max_bytes"] == 0


@pytest.mark.parametrize("opts", [dict(), dict(temperature=0.9, top_k=20, seed=4),
                                  dict(temperature=1.0, repetition_penalty=1.3, seed=6)],
                         ids=["greedy", "seeded", "penalty"])
def test_batches_with_the_cache_equal_batches_without(g, plain, opts):
    prompts = [c for s in range(4) for c in _chat(s, 3)]  # prefixes of each other
    for _ in range(2):  # the second round is served from the cache
        got = g.generate(prompts, max_new_tokens=5, ignore_eos=True, **opts)
        want = plain.generate(prompts, max_new_tokens=5, ignore_eos=True, **opts)
        assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert g.engine_stats()["cache_hits"] >= len(prompts)
    assert all(r.prefill_tokens == 0 for r in got)  # every prompt state was cached


def test_threads_submitting_overlapping_prefixes_get_uncached_tokens(dirs, plain):
    import threading

    g = mambart.Generator(dirs["m1"], prompt_cache_bytes=1 << 20)
    chats = [_chat(s, 4) for s in range(8)]
    opts = [dict(), dict(temperature=0.8, seed=5)]
    want = {(c, t, o): plain.generate(chats[c][t], max_new_tokens=6, ignore_eos=True,
                                      **opts[o]).token_ids
            for c in range(8) for t in range(4) for o in range(2)}
    got, errors = {}, []

    def worker(c):
        try:
            for t in range(4):  # each turn extends the previous; other threads share prefixes
                for o in range(2):
                    if (c + t) % 2:
                        toks = list(g.stream(chats[c][t], max_new_tokens=6, ignore_eos=True,
                                             **opts[o]))
                    else:
                        toks = g.generate(chats[c][t], max_new_tokens=6, ignore_eos=True,
                                          **opts[o]).token_ids
                    got[(c, t, o)] = toks
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    ts = [threading.Thread(target=worker, args=(c % 8,)) for c in range(16)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors
    assert got == want
    s = g.engine_stats()
    assert s["cache_hits"] > 0 and s["cached_tokens"] > 0 and s["max_rows"] > 1


def test_eviction_never_frees_a_state_in_use(dirs, plain):
    """A budget of one entry: every insert evicts the entry before, while a request that started
    from it still runs (it holds its own reference), threads evict each other's entries, and a
    caller holds another entry: every output is the uncached one, every state stays whole."""
    import threading

    g = mambart.Generator(dirs["m1"])
    one = g.prefill(PROMPT + [1, 2, 3, 4]).nbytes
    cache = g.enable_prompt_cache(one + one // 2)
    key = g._cache_key()
    held = g.prefill(PROMPT)  # an entry a caller holds
    assert cache.lookup(key, PROMPT) is held and len(cache) == 1
    before = [a.copy() for a in held._native.to_host()], held._native.logits.copy()

    def want(p, n=8):
        return plain.generate(p, max_new_tokens=n, ignore_eos=True).token_ids

    # A chat turn starts from the previous turn's final state (the one entry), which is evicted
    # while the turn runs.
    q = [3, 1, 4, 1, 5]
    r1 = g.generate(q, max_new_tokens=8, ignore_eos=True)
    turn2 = q + r1.token_ids + [9, 2]
    hits = g.engine_stats()["cache_hits"]
    it = g.stream(turn2, max_new_tokens=40, ignore_eos=True)
    first = next(it)  # running, from the cached final state of turn 1
    assert g.engine_stats()["cache_hits"] == hits + 1
    for i in range(3):  # each insert evicts the entry before
        g.prefill([7, 7, i])
    assert cache.lookup(key, q + r1.token_ids) is None and len(cache) == 1
    assert [first] + list(it) == want(turn2, 40)

    # Threads: chats whose turns hit their previous turn's entry unless another thread's
    # insert evicted it first, and Python-side prefills evicting meanwhile.
    chats = [_chat(s, 3) for s in range(8)]
    got, errors = {}, []

    def chat(c):
        try:
            p = chats[c][0]
            for t in range(3):
                toks = g.generate(p, max_new_tokens=8, ignore_eos=True).token_ids
                got[(c, t)] = (list(p), toks)
                p = p + toks + chats[c][t][-2:]
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    def evict(k):
        for i in range(10):
            g.prefill([k + 1, i + 1, 7])

    ts = [threading.Thread(target=chat, args=(c,)) for c in range(8)]
    ts += [threading.Thread(target=evict, args=(k,)) for k in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors
    for p, toks in got.values():
        assert toks == want(p), p
    assert len(cache) == 1 and cache.nbytes <= cache.max_bytes
    # The held entry was evicted long ago, and is still whole and usable.
    assert cache.lookup(key, PROMPT) is None
    after = held._native.to_host(), held._native.logits
    assert all(np.array_equal(x, y) for x, y in zip(before[0], after[0]))
    assert np.array_equal(before[1], after[1])
    r = g.generate(None, state=held, max_new_tokens=5, ignore_eos=True)
    assert r.token_ids == want(PROMPT, 5)


def test_the_cache_budget_counts_in_the_memory_check(dirs):
    g = mambart.Generator(dirs["m1"], prompt_cache_bytes=1 << 40)
    try:
        mambart.set_options(generation_memory_limit=1 << 30)
        with pytest.raises(MemoryError, match="the prompt cache's unused budget"):
            g.generate(PROMPT, max_new_tokens=2)
        g.enable_prompt_cache(1 << 20)  # a budget that fits
        assert len(g.generate(PROMPT, max_new_tokens=2, ignore_eos=True).token_ids) == 2
    finally:
        mambart.set_options(generation_memory_limit=None)


def test_a_cache_set_after_the_engine_started_is_used(dirs, plain):
    g = mambart.Generator(dirs["m1"])
    g.generate(PROMPT, max_new_tokens=2)  # the engine runs, without a cache
    assert g.engine_stats()["cache_max_bytes"] == 0
    g.enable_prompt_cache(1 << 20)
    g.generate(PROMPT, max_new_tokens=2, ignore_eos=True)
    r = g.generate(PROMPT + [3], max_new_tokens=4, ignore_eos=True)
    assert r.prefill_tokens == 1
    assert r.token_ids == plain.generate(PROMPT + [3], max_new_tokens=4,
                                         ignore_eos=True).token_ids
    g.prompt_cache = None  # off again: nothing is looked up
    assert g.generate(PROMPT + [3], max_new_tokens=4, ignore_eos=True).prefill_tokens == 8
    with pytest.raises(TypeError, match="PromptCache"):
        g.prompt_cache = 5


def test_a_state_inserted_under_another_models_key_is_not_used(dirs, plain):
    g = mambart.Generator(dirs["m1"], prompt_cache_bytes=1 << 20)
    other = mambart.Generator(dirs["m2"])
    g.prompt_cache.insert(g._cache_key(), other.prefill(PROMPT))  # a caller's mistake
    r = g.generate(PROMPT + [3], max_new_tokens=4, ignore_eos=True)
    assert r.prefill_tokens == len(PROMPT) + 1  # treated as a miss, never restored
    assert r.token_ids == plain.generate(PROMPT + [3], max_new_tokens=4,
                                         ignore_eos=True).token_ids

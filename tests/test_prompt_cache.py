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

"""Variable-length batches with per-row options (issue 7): prompts of different lengths decode
together and each row equals its single run; per-row seeds (row r with seed s equals a single
run with seed s, whatever its index), sampling options, max_new_tokens, stop ids and
ignore_eos; rows stop on their own while the others go on."""

from __future__ import annotations

import pytest

import mambart
from state_models import PROMPT, make

PROMPTS = [PROMPT, [3], [8, 1, 8, 1, 8, 1, 8, 1, 8, 1, 8, 1, 4], [40, 41]]


@pytest.fixture(scope="module", params=["mamba1", "mamba2"])
def g(request, tmp_path_factory):
    return mambart.Generator(make(tmp_path_factory.mktemp("b"), request.param))


def single(g, p, **kw):
    return g.generate(p, ignore_eos=kw.pop("ignore_eos", True), **kw).token_ids


def test_variable_length_greedy_rows_equal_single_runs(g):
    rows = g.generate(PROMPTS, max_new_tokens=8, ignore_eos=True)
    assert [r.prompt_tokens for r in rows] == [len(p) for p in PROMPTS]
    for p, r in zip(PROMPTS, rows):
        assert r.token_ids == single(g, p, max_new_tokens=8)


def test_per_row_seeds_are_independent_of_the_row_index(g):
    seeds = [7, 7, 123, 2**63 + 5]
    rows = g.generate(PROMPTS, seed=seeds, temperature=1.0, max_new_tokens=8, ignore_eos=True)
    for p, s, r in zip(PROMPTS, seeds, rows):
        assert r.token_ids == single(g, p, seed=s, temperature=1.0, max_new_tokens=8)
    # The same prompt with the same seed in two rows gives the same tokens at both indices.
    twin = g.generate([PROMPT, PROMPT], seed=[9, 9], temperature=1.0, max_new_tokens=8,
                      ignore_eos=True)
    assert twin[0].token_ids == twin[1].token_ids
    # One seed for the batch: rows draw from streams 0, 1, ... (they differ).
    shared = g.generate([PROMPT, PROMPT], seed=9, temperature=1.0, max_new_tokens=8,
                        ignore_eos=True)
    assert shared[0].token_ids == twin[0].token_ids
    assert shared[0].token_ids != shared[1].token_ids


def test_per_row_sampling_options(g):
    opts = dict(temperature=[0.0, 1.0, 0.7, 1.3], top_k=[0, 5, 0, 20], top_p=[1.0, 1.0, 0.9, 1.0],
                min_p=[0.0, 0.0, 0.0, 0.05], repetition_penalty=[1.0, 1.5, 1.0, 1.2],
                seed=[1, 2, 3, 4])
    rows = g.generate(PROMPTS, max_new_tokens=7, ignore_eos=True, **opts)
    for i, (p, r) in enumerate(zip(PROMPTS, rows)):
        kw = {k: v[i] for k, v in opts.items()}
        assert r.token_ids == single(g, p, max_new_tokens=7, **kw)


def test_rows_stop_on_their_own(g):
    ref = [single(g, p, max_new_tokens=10) for p in PROMPTS]
    stops = [[ref[0][2]], None, [ref[2][0]], []]
    rows = g.generate(PROMPTS, max_new_tokens=[10, 3, 10, 0], stop_token_ids=stops,
                      ignore_eos=True)
    assert rows[0].token_ids == ref[0][:ref[0].index(ref[0][2]) + 1]
    assert rows[0].finish_reason == "stop_token"
    assert rows[1].token_ids == ref[1][:3] and rows[1].finish_reason == "length"
    assert rows[2].token_ids == ref[2][:1] and rows[2].finish_reason == "stop_token"
    assert rows[3].token_ids == [] and rows[3].finish_reason == "length"
    # A long row next to rows that stopped at once is unaffected.
    long = g.generate([PROMPTS[0], PROMPTS[1]], max_new_tokens=[12, 1], ignore_eos=True)
    assert long[0].token_ids == single(g, PROMPTS[0], max_new_tokens=12)


def test_per_row_eos(tmp_path):
    g = mambart.Generator(make(tmp_path, "mamba1", seed=3))
    ref = single(g, PROMPT, max_new_tokens=10)
    eos = g.config["eos_token_id"]
    # The row that does not ignore eos stops where the reference first produces eos (if it
    # does); the other goes on.
    rows = g.generate([PROMPT, PROMPT], max_new_tokens=10, ignore_eos=[False, True])
    assert rows[1].token_ids == ref
    want = ref[:ref.index(eos) + 1] if eos in ref else ref
    assert rows[0].token_ids == want


@pytest.mark.parametrize("kw, msg", [
    (dict(seed=[1, 2]), "seed has 2 values for 4 prompts"),
    (dict(max_new_tokens=[1, 2, 3, -1]), "max_new_tokens must be >= 0"),
    (dict(temperature=[0.0, -1.0, 0.0, 0.0]), "temperature"),
    (dict(stop_token_ids=[[1], [2]]), "stop_token_ids has 2 values"),
    (dict(top_k=[0, 0, 0, "x"]), "invalid literal"),
])
def test_bad_per_row_options(g, kw, msg):
    with pytest.raises((ValueError, TypeError), match=msg):
        g.generate(PROMPTS, **kw)

"""Checks shared by the tests of models written natively (random weights in mambart's own
format, checked against a numpy reference: test_attention.py, test_moe.py): the model's runtime
contracts, whatever its layers."""

from __future__ import annotations

import numpy as np


def ids_for(V: int, n: int, seed: int = 0):
    return [int(t) for t in np.random.default_rng(seed).integers(0, V, size=n)]


def check_prefill_equals_decode(g, V: int):
    """Prefill in chunks of one (decode steps) and of five equals the whole prompt's logits."""
    ids = ids_for(V, 33, seed=2)
    full = g.logits(ids)
    scale = max(1.0, float(np.abs(full).max()))
    assert np.abs(g._g.logits(ids, 1) - full).max() < 1e-5 * scale
    assert np.abs(g._g.logits(ids, 5) - full).max() < 1e-5 * scale


def check_batch_rows_equal_single_runs(g, V: int):
    """Rows of unequal prompts in one batch: each generates what it does alone."""
    prompts = [ids_for(V, n, seed=n) for n in (9, 3, 14)]
    rows = g.generate(prompts, max_new_tokens=10, ignore_eos=True)
    for p, r in zip(prompts, rows):
        assert r.token_ids == g.generate(p, max_new_tokens=10, ignore_eos=True).token_ids


def check_state_save_load_continuation(g, V: int, tmp_path):
    """5 tokens, the state saved and loaded, 9 more: the 14 tokens of one run."""
    prompt = ids_for(V, 12, seed=5)
    full = g.generate(prompt, max_new_tokens=14, ignore_eos=True)
    a = g.generate(prompt, max_new_tokens=5, ignore_eos=True, return_state=True)
    path = tmp_path / "s.safetensors"
    a.state.save(path)
    b = g.generate(None, state=g.load_state(path), max_new_tokens=9, ignore_eos=True)
    assert a.token_ids + b.token_ids == full.token_ids

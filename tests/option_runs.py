"""Generations of one model directory with runtime options set at load, for tests that check an
option changes nothing but speed (issue 16's fused projections and persistent decode): batch-1
greedy (with its final state, saved) and sampled runs, and a sampled batch of three rows."""

from __future__ import annotations

import mambart

PROMPTS = [[5, 17, 33, 2, 60, 9, 41], [7, 7, 1, 90], [250, 3, 3, 3, 3, 3, 3, 3, 3, 18]]


def load(d, device, dtype, **options):
    """A Generator loaded with `options` set (options read at load keep their value after)."""
    mambart.set_options(**options)
    try:
        return mambart.Generator(str(d), device=device, dtype=dtype)
    finally:
        mambart.set_options(**{k: None for k in options})


def generations(g, state_path):
    """Tokens and logprobs of the runs, and the bytes of the greedy run's saved final state."""
    ps = [[t % g.vocab_size for t in p] for p in PROMPTS]
    one = g.generate(ps[0], max_new_tokens=40, ignore_eos=True, logprobs=3, return_state=True,
                     seed=5)
    one.state.save(state_path)
    two = g.generate(ps[2], max_new_tokens=20, ignore_eos=True, logprobs=2, temperature=0.9,
                     top_k=30, seed=7)
    many = g.generate(ps, max_new_tokens=12, ignore_eos=True, logprobs=2, temperature=0.8,
                      top_k=20, seed=[1, 2, 3])
    out = [(r.token_ids, [(lp.token_id, lp.logprob, lp.top) for lp in r.logprobs])
           for r in [one, two, *many]]
    return out, state_path.read_bytes()

"""Scoring (issue 7): log-probabilities of each token given its prefix, from a float64
log-softmax over the full vocabulary, against transformers' log-softmax; the batch form;
scoring after a state (prefill or generation); argument errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mambart
from hf_models import build, hf_logits, mamba1_config, mamba2_config

ATOL = 5e-4  # log-softmax of logits that agree to conftest.TOL["float32"] (2e-4)


@pytest.fixture(scope="module", params=["mamba1", "mamba2"])
def pair(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("score")
    cfg = mamba1_config() if request.param == "mamba1" else mamba2_config()
    model = build(cfg, root / "hf", seed=5)
    return mambart.Generator(mambart.convert(root / "hf", root / "m")), model


def ids_of(n, V, seed=0):
    return np.random.default_rng(seed).integers(0, V, n).tolist()


def test_logprobs_equal_transformers_log_softmax(pair):
    g, model = pair
    ids = ids_of(150, g.vocab_size)  # more than two 64-token logits chunks
    res = g.score(ids)
    ref = torch.log_softmax(hf_logits(model, ids).double(), dim=-1)
    want = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].numpy()
    assert res.token_ids == ids[1:] and res.logprobs.dtype == np.float64
    np.testing.assert_allclose(res.logprobs, want, atol=ATOL, rtol=0)
    assert res.sum == pytest.approx(float(want.sum()), abs=ATOL * len(ids))
    assert np.all(res.logprobs <= 0)
    # greedy: the token is the argmax of mambart's own logits at that position.
    lg = g.logits(ids)
    assert np.array_equal(res.greedy, lg[:-1].argmax(-1) == np.array(ids[1:]))


def test_greedy_flags_on_a_greedy_continuation(pair):
    g, _ = pair
    prompt = ids_of(6, g.vocab_size, 1)
    cont = g.generate(prompt, max_new_tokens=8, ignore_eos=True).token_ids
    res = g.score(prompt + cont)
    assert not res.greedy[:len(prompt) - 1].all() and not res.is_greedy  # a random prompt
    assert np.all(res.greedy[len(prompt) - 1:])  # every generated token was the argmax


def test_batch_form(pair):
    g, _ = pair
    seqs = [ids_of(5, g.vocab_size, 2), ids_of(30, g.vocab_size, 3), ids_of(2, g.vocab_size, 4)]
    out = g.score(seqs)
    assert [len(r.logprobs) for r in out] == [4, 29, 1]
    for s, r in zip(seqs, out):
        np.testing.assert_array_equal(r.logprobs, g.score(s).logprobs)


def test_scoring_after_a_state(pair):
    g, _ = pair
    ids = ids_of(90, g.vocab_size, 6)
    full = g.score(ids).logprobs
    s = g.prefill(ids[:70])
    after = g.score(ids[70:], state=s)
    assert after.token_ids == ids[70:] and len(after.logprobs) == 20
    np.testing.assert_allclose(after.logprobs, full[69:], atol=1e-4, rtol=0)
    # After a generation: the state's pending token is run first.
    r = g.generate(ids[:10], max_new_tokens=3, ignore_eos=True, return_state=True)
    seq = ids[:10] + r.token_ids + [4, 5]
    np.testing.assert_allclose(g.score([4, 5], state=r.state).logprobs,
                               g.score(seq).logprobs[-2:], atol=1e-4, rtol=0)
    one = g.score([7], state=s)  # a single token is scorable given a state
    assert len(one.logprobs) == 1


def test_score_arguments(pair):
    g, _ = pair
    with pytest.raises(ValueError, match="at least 2 tokens"):
        g.score([5])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        g.score([1, g.vocab_size])
    with pytest.raises(ValueError, match="no tokenizer"):
        g.score("text without a tokenizer")

"""The CPU runtime against transformers (the oracle) on tiny random checkpoints with odd sizes,
and the recurrent invariants: prefill(N) == prefill(k) + steps; batch rows == single runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mambart
from conftest import TOL
from hf_models import build, hf_greedy, hf_logits, mamba1_config, mamba2_config

# Each case: odd sizes on purpose (d_state and dt_rank not powers of two, several groups, a
# sequence the chunk size does not divide, biases on, untied head, residual_in_fp32 off, ...).
CASES = {
    "m1-default": lambda: mamba1_config(),
    "m1-bias-untied-nofp32res": lambda: mamba1_config(use_bias=True, tie_word_embeddings=False,
                                                      residual_in_fp32=False, state_size=7,
                                                      time_step_rank=5, hidden_size=20),
    "m1-noconvbias-k3": lambda: mamba1_config(use_conv_bias=False, conv_kernel=3, expand=3),
    "m2-groups2": lambda: mamba2_config(),
    "m2-tied-bias-g1": lambda: mamba2_config(n_groups=1, use_bias=True, tie_word_embeddings=True,
                                             state_size=6, chunk_size=5),
    "m2-groups4-dtlimit": lambda: mamba2_config(n_groups=4, num_heads=8, head_dim=4,
                                                time_step_limit=(0.01, 0.3), residual_in_fp32=False),
}

SEQ = 37  # prime: not a multiple of any chunk size used


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (transformers model, mambart Generator on the converted checkpoint)."""
    out = {}
    for i, (name, make) in enumerate(CASES.items()):
        root = tmp_path_factory.mktemp(name)
        hf = build(make(), root / "hf", seed=i)
        conv = mambart.convert(root / "hf", root / "mambart")
        out[name] = (hf, mambart.Generator(conv))
    return out


def ids_for(g, n, seed=0):
    rng = np.random.default_rng(seed)
    return [int(t) for t in rng.integers(0, g.vocab_size, size=n)]


@pytest.mark.parametrize("name", list(CASES))
def test_logits_equal_transformers_at_every_position(models, name):
    hf, g = models[name]
    ids = ids_for(g, SEQ)
    ref = hf_logits(hf, ids).numpy()[:, : g.vocab_size]
    got = g.logits(ids)
    assert got.dtype == np.float32 and got.shape == (SEQ, g.vocab_size)
    err = np.abs(got - ref).max()
    assert err < TOL["float32"] * max(1.0, np.abs(ref).max()), f"max abs err {err}"


@pytest.mark.parametrize("name", list(CASES))
def test_prefill_equals_prefill_plus_steps(models, name):
    _, g = models[name]
    ids = ids_for(g, SEQ, seed=1)
    full = g.logits(ids)                   # one prefill (chunks of 64 tokens)
    steps = g._g.logits(ids, 1)            # token by token: the decode-step path
    chunked = g._g.logits(ids, 5)          # prefill(5) + prefill(5) + ... (state carried over)
    scale = max(1.0, np.abs(full).max())
    assert np.abs(steps - full).max() < 1e-4 * scale
    assert np.abs(chunked - full).max() < 1e-4 * scale


@pytest.mark.parametrize("name", ["m1-default", "m2-groups2", "m2-tied-bias-g1"])
def test_greedy_tokens_equal_transformers_generate(models, name):
    hf, g = models[name]
    prompt = ids_for(g, 9, seed=2)
    ref = hf_greedy(hf, prompt, 40)
    res = g.generate(prompt, max_new_tokens=40, ignore_eos=True)
    assert res.token_ids == ref
    assert res.finish_reason == "length"


def test_batch_rows_equal_single_runs(models):
    _, g = models["m2-groups2"]
    prompts = [ids_for(g, n, seed=n) for n in (3, 17, 1, 40)]
    kw = dict(max_new_tokens=12, temperature=0.8, top_k=20, seed=11, ignore_eos=True)
    batch = g.generate(prompts, **kw)
    assert isinstance(batch, list) and len(batch) == 4
    # row r draws from stream r: a single run of prompt r reproduces it only as row r, so compare
    # greedy rows exactly, and sampled rows by seed-determinism of the whole batch.
    greedy = g.generate(prompts, max_new_tokens=12, ignore_eos=True)
    for p, r in zip(prompts, greedy):
        assert g.generate(p, max_new_tokens=12, ignore_eos=True).token_ids == r.token_ids
    again = g.generate(prompts, **kw)
    assert [r.token_ids for r in again] == [r.token_ids for r in batch]
    assert batch[0].token_ids == g.generate(prompts[0], **kw).token_ids  # row 0 == stream 0


def test_seed_reproduces_and_differs(models):
    _, g = models["m1-default"]
    prompt = ids_for(g, 5)
    kw = dict(max_new_tokens=24, temperature=1.0, top_p=0.9, ignore_eos=True)
    a = g.generate(prompt, seed=3, **kw).token_ids
    b = g.generate(prompt, seed=3, **kw).token_ids
    c = g.generate(prompt, seed=4, **kw).token_ids
    assert a == b and a != c


def test_low_precision_weights_stay_close(models, tmp_path):
    hf, g32 = models["m1-default"]
    ids = ids_for(g32, SEQ, seed=5)
    ref = g32.logits(ids)
    for dt in ("float16", "bfloat16"):
        g = mambart.Generator(g32.model_dir, dtype=dt)
        assert g.dtype == dt
        err = np.abs(g.logits(ids) - ref).max()
        assert err < TOL[dt] * max(1.0, np.abs(ref).max()), (dt, err)


@pytest.mark.parametrize("make", [
    lambda: mamba1_config(vocab_size=1000, hidden_size=384, num_hidden_layers=4, state_size=16,
                          time_step_rank=24),
    lambda: mamba2_config(vocab_size=1000, hidden_size=384, num_hidden_layers=4, state_size=64,
                          head_dim=32, num_heads=24, n_groups=2, chunk_size=32),
], ids=["mamba1", "mamba2"])
def test_fp32_error_against_float64_is_no_worse_than_transformers(make, tmp_path):
    """At wider shapes (K up to 768) the fp32 rounding of long dot products shows: mambart's error
    against a float64 run of the same weights must stay within 2x transformers' fp32 error."""
    hf = build(make(), tmp_path / "hf", seed=7, scale=0.05)
    g = mambart.Generator(mambart.convert(tmp_path / "hf", tmp_path / "m"))
    ids = ids_for(g, 100, seed=3)
    r32 = hf_logits(hf, ids).numpy()[:, : g.vocab_size]
    with torch.no_grad():
        r64 = hf.double()(torch.tensor([ids])).logits[0].numpy()[:, : g.vocab_size]
    ours = np.abs(g.logits(ids) - r64).max()
    theirs = np.abs(r32 - r64).max()
    assert ours <= 2 * theirs + 1e-6, (ours, theirs)

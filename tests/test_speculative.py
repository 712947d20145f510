"""Speculative decoding with exact state rollback (issue 25; cpp/speculative.h).

- The per-token states a traced verification pass writes equal the states of prefills of each
  prefix, and its logits equal a plain prefill's (Mamba-1, Mamba-2).
- Greedy output with prompt lookup, a draft model, a self-draft and the recompute rollback is
  identical to plain greedy decoding over 512 tokens (tiny models and the bundled demo models).
- Sampling: the joint distribution of the first three new tokens over many seeds matches the
  target sampler's exact distribution (chi-squared), for a draft and for prompt lookup, with
  and without filters; the same counts reject the draft's distribution (the test has power).
- Bad input gets ValueError / NotImplementedError naming the parameter.
Tests marked `cuda` run the same on the GPU backend.
"""

from __future__ import annotations


import numpy as np
import pytest

import mambart
from mambart import _C

from model_dirs import make_model_dir

ARCHS = ["mamba1", "mamba2"]
PROMPT = [5, 6, 7, 8, 5, 6, 7, 9, 12, 5, 6, 7, 8]


def _gen(path, arch, seed=0, device="cpu", **over):
    return mambart.Generator(str(make_model_dir(path, arch=arch, seed=seed, **over)),
                             device=device)


def _state_close(a, b, tol):
    return max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in zip(a, b)) <= tol


@pytest.mark.parametrize("arch", ARCHS)
def test_traced_states_equal_prefix_prefills(tmp_path, arch):
    g = _gen(tmp_path / "m", arch)
    toks = [8, 5, 6, 9, 10, 3, 3]
    states, logits = g._g.traced_states(PROMPT, toks)
    assert len(states) == len(toks)
    for t in range(len(toks)):
        ref = g._g.state_to_host(g._g.prefill(PROMPT + toks[: t + 1], None))
        assert _state_close(states[t], ref, 1e-5), t
    # the states differ from token to token (a trace that repeated one state would fail)
    assert not _state_close(states[0], states[-1], 1e-3)
    full = g.logits(PROMPT + toks)[len(PROMPT):]
    np.testing.assert_allclose(logits, full, rtol=1e-5, atol=1e-5)


def _plain(g, prompt, n, **kw):
    return g.generate(prompt, max_new_tokens=n, ignore_eos=True, **kw).token_ids


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_identical_512(tmp_path, arch):
    g = _gen(tmp_path / "t", arch, seed=1)
    other = _gen(tmp_path / "d", "mamba2" if arch == "mamba1" else "mamba1", seed=2,
                 d_model=8, n_layer=1)
    plain = _plain(g, PROMPT, 512)
    runs = {
        "lookup": dict(method="prompt_lookup", k=8),
        "lookup_k1": dict(method="prompt_lookup", k=1, ngram_max=1),
        "draft": dict(draft=other, k=4),
        "self_draft": dict(draft=g, k=6),
    }
    for name, spec in runs.items():
        r = g.generate(PROMPT, max_new_tokens=512, ignore_eos=True, speculative=spec)
        assert r.token_ids == plain, name
        assert r.finish_reason == "length"
        s = r.speculative
        assert 0 <= s["accepted"] <= s["proposed"], name
        assert s["proposed"] > 0 and s["verifications"] > 0, name
        if name == "self_draft":  # the draft is the target: (nearly) every guess is kept
            assert s["accepted"] >= 0.95 * s["proposed"], s
            assert s["draft_forwards"] >= s["proposed"]
        if name.startswith("lookup"):
            assert s["accepted"] > 0, s  # the accept path ran (random models repeat)
            assert s["draft_forwards"] == 0
    # the recompute rollback (the measured alternative) gives the same tokens
    o = g._options(512, 0.0, 0, 1.0, 0.0, 1.0, 0, None, True)
    raw, st = g._g.generate_speculative(PROMPT, o, "prompt_lookup", 8, 3, 1, None, True)
    assert list(raw.token_ids) == plain
    assert st["accepted"] > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_stops_like_plain_decoding(tmp_path, arch):
    g = _gen(tmp_path / "t", arch, seed=3)
    plain = _plain(g, PROMPT, 40)
    stop = plain[17]
    want = g.generate(PROMPT, max_new_tokens=40, stop_token_ids=[stop])
    got = g.generate(PROMPT, max_new_tokens=40, stop_token_ids=[stop],
                     speculative=dict(method="prompt_lookup", k=8))
    assert got.token_ids == want.token_ids and got.finish_reason == want.finish_reason
    for n in (0, 1, 2, 7):
        r = g.generate(PROMPT, max_new_tokens=n, ignore_eos=True,
                       speculative=dict(draft=g, k=4))
        assert r.token_ids == plain[:n]
    batch = g.generate([PROMPT, PROMPT[:5]], max_new_tokens=20, ignore_eos=True,
                       speculative=dict(method="prompt_lookup"))
    assert [b.token_ids for b in batch] == [plain[:20], _plain(g, PROMPT[:5], 20)]


@pytest.mark.parametrize("name,draft_name", [("mambart-demo", "mambart2-demo"),
                                             ("mambart2-demo", "mambart-demo")])
def test_greedy_identical_on_demo_models(name, draft_name):
    g = mambart.Generator(name, dtype="float32")
    d = mambart.Generator(draft_name, dtype="float32")
    prompt = ("import os\n\n\ndef read_lines(path):\n    with open(path) as f:\n"
              "        return f.read().splitlines()\n\n\ndef read_words(path):\n")
    plain = _plain(g, prompt, 512)
    for spec in (dict(method="prompt_lookup", k=8), dict(draft=d, k=4)):
        r = g.generate(prompt, max_new_tokens=512, ignore_eos=True, speculative=spec)
        assert r.token_ids == plain, spec
        assert r.speculative["accepted"] > 0


# ---- sampling: the output distribution is the target's ----

V_SMALL = 4


def _exact_joint(g, prompt, n_tok, sampling):
    """P(t_0 .. t_{n-1}) under the target's sampler (Sampler::probs per position)."""
    joint = {}

    def walk(prefix, p):
        if len(prefix) == n_tok:
            joint[tuple(prefix)] = p
            return
        logits = g.logits(prompt + prefix)[-1]
        q = _C.sampling_probs(logits, previous_tokens=prompt + prefix, **sampling)
        for t in range(V_SMALL):
            if q[t] > 0:
                walk(prefix + [t], p * float(q[t]))

    walk([], 1.0)
    return joint


def _chi2_pvalue(counts, probs, n):
    # chi2.sf(x, k) = Q(k / 2, x / 2), the regularized upper incomplete gamma function (torch's
    # gammaincc: torch is a test dependency, scipy is not).
    import torch

    exp = {c: p * n for c, p in probs.items()}
    for c in counts:  # a sequence of probability 0 must never appear
        assert c in exp, f"drew {c}, which has probability 0"
    big = [c for c in exp if exp[c] >= 5]
    small = [c for c in exp if exp[c] < 5]
    obs = [counts.get(c, 0) for c in big]
    ex = [exp[c] for c in big]
    if small:
        obs.append(sum(counts.get(c, 0) for c in small))
        ex.append(sum(exp[c] for c in small))
    stat = sum((o - e) ** 2 / e for o, e in zip(obs, ex))
    k = len(obs) - 1
    return float(torch.special.gammaincc(torch.tensor(k / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


@pytest.mark.parametrize("proposer,sampling", [
    ("draft", dict(temperature=1.0)),
    ("draft_adaptive", dict(temperature=1.0)),
    ("draft", dict(temperature=0.7, top_k=3, repetition_penalty=1.3)),
    ("prompt_lookup", dict(temperature=1.0)),
    ("prompt_lookup", dict(temperature=1.2, top_p=0.9)),
])
def test_sampling_follows_the_target_distribution(tmp_path, proposer, sampling):
    over = dict(vocab_size=V_SMALL, vocab_size_padded=V_SMALL)
    g = _gen(tmp_path / "t", "mamba1", seed=11, **over)
    d = _gen(tmp_path / "d", "mamba2", seed=12, **over)
    prompt = [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    n_tok, draws = 3, 3000
    spec = (dict(draft=d, k=2) if proposer == "draft" else
            dict(draft=d, k=3, adaptive=True) if proposer == "draft_adaptive" else
            dict(method="prompt_lookup", k=2))
    kw = dict(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0)
    kw.update(sampling)
    counts, prop, acc = {}, 0, 0
    for seed in range(draws):
        r = g.generate(prompt, max_new_tokens=n_tok, ignore_eos=True, seed=seed,
                       speculative=spec, **kw)
        counts[tuple(r.token_ids)] = counts.get(tuple(r.token_ids), 0) + 1
        prop += r.speculative["proposed"]
        acc += r.speculative["accepted"]
    assert 0 < acc < prop  # both the accept and the residual paths ran
    exact = _exact_joint(g, prompt, n_tok, kw)
    assert abs(sum(exact.values()) - 1.0) < 1e-5
    p = _chi2_pvalue(counts, exact, draws)
    assert p > 1e-3, (p, counts)
    if proposer == "draft":  # power: the draft's own distribution is rejected by the counts
        q = _exact_joint(d, prompt, n_tok, dict(kw, repetition_penalty=1.0))
        q = {c: v for c, v in q.items() if c in exact}
        tot = sum(q.values())
        kept = {c: n for c, n in counts.items() if c in q}
        assert _chi2_pvalue(kept, {c: v / tot for c, v in q.items()},
                            sum(kept.values())) < 1e-3


@pytest.mark.parametrize("adaptive", [False, True])
def test_seeded_sampling_is_reproducible(tmp_path, adaptive):
    g = _gen(tmp_path / "t", "mamba2", seed=4)
    d = _gen(tmp_path / "d", "mamba1", seed=5)
    spec = dict(draft=d, k=3, adaptive=adaptive)
    a = g.generate(PROMPT, max_new_tokens=60, temperature=0.9, seed=7, speculative=spec)
    b = g.generate(PROMPT, max_new_tokens=60, temperature=0.9, seed=7, speculative=spec)
    c = g.generate(PROMPT, max_new_tokens=60, temperature=0.9, seed=8, speculative=spec)
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids


# ---- adaptive k, streaming ----

@pytest.mark.parametrize("arch", ARCHS)
def test_adaptive_k_greedy_identical(tmp_path, arch):
    """k adapts (up after a full round kept, down after a rejection, within [1, k]) and the
    greedy tokens stay plain decoding's."""
    g = _gen(tmp_path / "t", arch, seed=1)
    other = _gen(tmp_path / "d", "mamba2" if arch == "mamba1" else "mamba1", seed=2,
                 d_model=8, n_layer=1)
    plain = _plain(g, PROMPT, 300)
    for spec in (dict(method="prompt_lookup", k=12), dict(draft=other, k=6),
                 dict(draft=g, k=9)):
        fixed = g.generate(PROMPT, max_new_tokens=300, ignore_eos=True, speculative=spec)
        r = g.generate(PROMPT, max_new_tokens=300, ignore_eos=True,
                       speculative=dict(spec, adaptive=True))
        assert r.token_ids == plain, spec
        s, f = r.speculative, fixed.speculative
        assert 1 <= s["k_last"] <= spec["k"] and f["k_last"] == spec["k"]
        if spec.get("draft") is g:  # every guess kept: k climbs to the most and stays
            assert s["k_last"] == spec["k"], s
        elif "draft" in spec:  # a weak draft: rejections pull k down
            assert s["k_last"] < spec["k"], (s, f)
            assert s["proposed"] < f["proposed"], (s, f)  # fewer wasted guesses
            assert s["draft_forwards"] < f["draft_forwards"], (s, f)


@pytest.mark.parametrize("spec", [dict(method="prompt_lookup", k=6),
                                  dict(method="prompt_lookup", k=6, adaptive=True),
                                  dict(draft="mambart2-demo", k=3)])
def test_stream_speculative_equals_generate(spec):
    g = mambart.Generator("mambart-demo", dtype="float32")
    prompt = ("import os\n\n\ndef read_lines(path):\n    with open(path) as f:\n"
              "        return f.read().splitlines()\n\n\ndef read_words(path):\n")
    plain = g.generate(prompt, max_new_tokens=80, ignore_eos=True)
    s = g.stream(prompt, max_new_tokens=80, ignore_eos=True, speculative=spec)
    assert s.result is None
    pieces = list(s)
    assert "".join(pieces) == plain.text and len(pieces) > 10  # text, piece by piece
    assert s.result.token_ids == plain.token_ids and s.result.text == plain.text
    assert s.finish_reason == "length" and s.result.speculative["accepted"] > 0
    ids = g.tokenizer.encode(prompt).ids  # a token-id prompt streams ids
    assert list(g.stream(ids, max_new_tokens=40, ignore_eos=True, speculative=spec)) == \
        g.generate(ids, max_new_tokens=40, ignore_eos=True).token_ids


def test_stream_speculative_close_and_errors(tmp_path):
    g = _gen(tmp_path / "t", "mamba1", seed=1)
    plain = _plain(g, PROMPT, 200)
    s = g.stream(PROMPT, max_new_tokens=200, ignore_eos=True,
                 speculative=dict(method="prompt_lookup"))
    got = [next(s) for _ in range(5)]
    s.close()  # stops the loop at its next token; the generator is free again
    assert got == plain[:5] and s.result is None
    assert _plain(g, PROMPT, 200) == plain
    for kw, frag in ((dict(stop="x"), "stop"), (dict(logprobs=1), "logprobs"),
                     (dict(state=g.prefill(PROMPT)), "state")):
        with pytest.raises(ValueError, match=frag):
            g.stream(PROMPT, speculative=dict(method="prompt_lookup"), **kw)
    with pytest.raises(ValueError, match="adaptive"):
        g.stream(PROMPT, speculative=dict(method="prompt_lookup", adaptive=1))
    with pytest.raises(ValueError, match="one prompt"):
        g.stream([PROMPT, PROMPT], speculative=dict(method="prompt_lookup"))


# ---- bad input ----

def test_bad_input(tmp_path):
    g = _gen(tmp_path / "t", "mamba1")
    small = _gen(tmp_path / "s", "mamba1", vocab_size=50, vocab_size_padded=56)
    max_k = _C.SPECULATIVE_MAX_K

    def bad(spec, *frag, exc=ValueError, **kw):
        with pytest.raises(exc) as e:
            g.generate(PROMPT, max_new_tokens=4, speculative=spec, **kw)
        for f in frag:
            assert f in str(e.value), (f, str(e.value))

    bad(dict(method="prompt_lookup", k=0), "speculative['k']")
    bad(dict(method="prompt_lookup", k=max_k + 1), "speculative['k']", str(max_k))
    bad(dict(method="prompt_lookup", k="4"), "speculative['k']")
    bad(dict(method="prompt_lookup", k=2.5), "speculative['k']")
    bad(dict(method="guess"), "speculative['method']")
    bad(dict(method="prompt_lookup", kk=3), "unknown key", "'kk'")
    bad(dict(method="prompt_lookup", adaptive="yes"), "speculative['adaptive']")
    bad(dict(method="prompt_lookup", ngram_max=2, ngram_min=3), "ngram_min")
    bad("prompt_lookup", "speculative must be a dict")
    bad(dict(method="draft"), "speculative['draft'] is required")
    bad(dict(draft=small), "speculative['draft']", "50", "100")
    bad(dict(draft=3), "speculative['draft'] must be")
    bad(dict(draft=g, ngram_max=2), "ngram_max")
    bad(dict(method="prompt_lookup", draft=g), "speculative['draft']")
    bad(dict(method="prompt_lookup"), "logprobs", logprobs=2)
    bad(dict(method="prompt_lookup"), "return_state", return_state=True)
    bad(dict(method="prompt_lookup"), "state", state=g.prefill(PROMPT))
    bad(dict(method="prompt_lookup"), "temperature", temperature=-1.0)
    with pytest.raises(ValueError, match="empty"):
        g.generate([], speculative=dict(method="prompt_lookup"))
    # the native layer checks too (the Python layer is not the only guard)
    o = g._options(4, 0.0, 0, 1.0, 0.0, 1.0, 0, None, False)
    for args, frag in [(("prompt_lookup", 0), "k = 0"), (("draft", 4), "no draft model"),
                       (("sideways", 4), "method"), (("prompt_lookup", 99), "k = 99")]:
        with pytest.raises(ValueError, match=frag):
            g._g.generate_speculative(PROMPT, o, *args)
    with pytest.raises(ValueError, match="vocabulary"):
        g._g.generate_speculative(PROMPT, o, "draft", 4, 3, 1, small._g)


def test_draft_tokenizer_must_match(tmp_path):
    tok = pytest.importorskip("tokenizers")
    g = mambart.Generator("mambart-demo", dtype="float32")
    d = mambart.Generator("mambart2-demo", dtype="float32")
    # same vocabulary size, another token map
    vocab = {f"t{i}": i for i in range(g.vocab_size)}
    other = tok.Tokenizer(tok.models.WordLevel(vocab, unk_token="t0"))
    d.tokenizer = other
    with pytest.raises(ValueError, match="tokenizer differs"):
        g.generate("def f():", max_new_tokens=4, speculative=dict(draft=d, k=2))


def test_layer_without_traces_is_refused(tmp_path):
    from test_mamba3 import VARIANTS, make_dir

    d, _ = make_dir(tmp_path / "m3", [VARIANTS["siso"]] * 2)
    g = mambart.Generator(str(d))
    with pytest.raises(NotImplementedError, match="per-token states"):
        g.generate([3, 4, 5], max_new_tokens=4, speculative=dict(method="prompt_lookup"))


# ---- CUDA: the same invariants on the GPU backend ----

@pytest.mark.cuda
@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_traced_states_and_greedy(tmp_path, arch):
    path = make_model_dir(tmp_path / "t", arch=arch, seed=1)
    g = mambart.Generator(str(path), device="cuda")
    c = mambart.Generator(str(path), device="cpu")
    toks = [8, 5, 6, 9, 10, 3, 3]
    states, logits = g._g.traced_states(PROMPT, toks)
    ref_states, ref_logits = c._g.traced_states(PROMPT, toks)
    for t in range(len(toks)):
        assert _state_close(states[t], ref_states[t], 1e-4), t
        ref = g._g.state_to_host(g._g.prefill(PROMPT + toks[: t + 1], None))
        assert _state_close(states[t], ref, 1e-4), t
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-4, atol=1e-4)
    other = mambart.Generator(str(make_model_dir(tmp_path / "d", arch="mamba2", seed=2,
                                                 d_model=8, n_layer=1)), device="cuda")
    plain = _plain(g, PROMPT, 512)
    for spec in (dict(method="prompt_lookup", k=8), dict(draft=other, k=4), dict(draft=g, k=6),
                 dict(method="prompt_lookup", k=8, adaptive=True),
                 dict(draft=other, k=6, adaptive=True)):
        r = g.generate(PROMPT, max_new_tokens=512, ignore_eos=True, speculative=spec)
        assert r.token_ids == plain, spec
    # a speculative stream on the GPU: the same tokens, handed over as accepted
    assert list(g.stream(PROMPT, max_new_tokens=200, ignore_eos=True,
                         speculative=dict(method="prompt_lookup", adaptive=True))) == plain[:200]


@pytest.mark.cuda
def test_cuda_sampling_distribution(tmp_path):
    over = dict(vocab_size=V_SMALL, vocab_size_padded=V_SMALL)
    g = _gen(tmp_path / "t", "mamba1", seed=11, device="cuda", **over)
    d = _gen(tmp_path / "d", "mamba2", seed=12, device="cuda", **over)
    prompt = [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    counts = {}
    for seed in range(2000):
        r = g.generate(prompt, max_new_tokens=3, ignore_eos=True, seed=seed, temperature=1.0,
                       speculative=dict(draft=d, k=2))
        counts[tuple(r.token_ids)] = counts.get(tuple(r.token_ids), 0) + 1
    kw = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0)
    assert _chi2_pvalue(counts, _exact_joint(g, prompt, 3, kw), 2000) > 1e-3


def test_cli_flags(tmp_path, capsys):
    from mambart.cli import main

    path = str(make_model_dir(tmp_path / "t", arch="mamba1", seed=1))
    ids = ",".join(map(str, PROMPT))
    assert main(["generate", path, ids, "--token-ids", "--max-new-tokens", "30",
                 "--ignore-eos"]) == 0
    plain = capsys.readouterr().out.split()
    assert main(["generate", path, ids, "--token-ids", "--max-new-tokens", "30",
                 "--ignore-eos", "--prompt-lookup", "--spec-k", "5"]) == 0
    got = capsys.readouterr()
    assert got.out.split() == plain and "guesses kept" in got.err
    assert main(["generate", path, ids, "--token-ids", "--max-new-tokens", "30",
                 "--ignore-eos", "--draft", path]) == 0
    assert capsys.readouterr().out.split() == plain
    assert main(["generate", path, ids, "--token-ids", "--max-new-tokens", "30",
                 "--ignore-eos", "--prompt-lookup", "--spec-adaptive"]) == 0
    assert capsys.readouterr().out.split() == plain
    for bad, frag in ([["--spec-k", "3"], "--spec-k needs"],
                      [["--prompt-lookup", "--spec-k", "0"], "speculative['k']"],
                      [["--prompt-lookup", "--draft", path], "exclude"],
                      [["--spec-adaptive"], "--spec-adaptive needs"]):
        assert main(["generate", path, ids, "--token-ids"] + bad) != 0
        assert frag in capsys.readouterr().err

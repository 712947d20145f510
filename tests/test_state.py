"""Sequence states (issue 7): continuing a generation from its state gives the same tokens as
one uninterrupted run (greedy and seeded sampling with a repetition penalty), prefill + generate
equals generate, forks, rows that finish early keep their own state, files round-trip and are
checked (model identity, dtype, malformed files), long prompts in bounded memory."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import mambart
from conftest import TOL
from hf_models import build, hf_logits, mamba1_config
from mambart import StateError
from state_models import PROMPT, make

SAMPLE = dict(temperature=0.9, top_k=20, repetition_penalty=1.3)


@pytest.fixture(scope="module", params=["mamba1", "mamba2"])
def g(request, tmp_path_factory):
    return mambart.Generator(make(tmp_path_factory.mktemp("st"), request.param))


@pytest.mark.parametrize("opts", [dict(), dict(SAMPLE, seed=11)], ids=["greedy", "sampled"])
def test_continuation_equals_one_uninterrupted_run(g, opts):
    full = g.generate(PROMPT, max_new_tokens=12, ignore_eos=True, **opts)
    a = g.generate(PROMPT, max_new_tokens=5, ignore_eos=True, return_state=True, **opts)
    assert a.state.num_tokens == len(PROMPT) + 5 and a.state.pending == 1
    # No seed with the state: its generation's RNG position continues.
    kw = {k: v for k, v in opts.items() if k != "seed"}
    b = g.generate(None, state=a.state, max_new_tokens=4, ignore_eos=True, return_state=True,
                   **kw)
    c = g.generate(None, state=b.state, max_new_tokens=3, ignore_eos=True, **kw)
    assert a.token_ids + b.token_ids + c.token_ids == full.token_ids
    assert b.prefill_tokens == 1 and b.prompt_tokens == len(PROMPT) + 5  # only the pending token
    if opts:  # the sampled case really samples (not a degenerate greedy path)
        assert full.token_ids != g.generate(PROMPT, max_new_tokens=12, ignore_eos=True).token_ids


@pytest.mark.parametrize("opts", [dict(), dict(SAMPLE, seed=5)], ids=["greedy", "sampled"])
def test_prefill_then_generate_equals_generate(g, opts):
    s = g.prefill(PROMPT)
    assert s.pending == 0 and s.num_tokens == len(PROMPT) and s.rng is None
    r = g.generate(None, state=s, max_new_tokens=8, ignore_eos=True, **opts)
    assert r.prefill_tokens == 0
    assert r.token_ids == g.generate(PROMPT, max_new_tokens=8, ignore_eos=True, **opts).token_ids


def test_prefill_in_pieces_equals_prefill_at_once(g):
    s = g.prefill(PROMPT[4:], state=g.prefill(PROMPT[:4]))
    one = g.prefill(PROMPT)
    assert s.tokens == one.tokens
    np.testing.assert_allclose(s._native.logits, one._native.logits, atol=TOL["float32"])
    np.testing.assert_allclose(s._native.logits, g.logits(PROMPT)[-1], atol=TOL["float32"])


def test_batch_row_state_continues_that_row(g):
    prompts = [PROMPT, [7, 8], [3, 1, 4, 1, 5, 9, 2, 6, 5]]
    full = g.generate(prompts, max_new_tokens=9, ignore_eos=True, seed=4, **SAMPLE)
    part = g.generate(prompts, max_new_tokens=4, ignore_eos=True, seed=4, return_state=True,
                      **SAMPLE)
    for r in range(3):  # row r drew from stream r: its state remembers it
        assert part[r].state.rng == (4, r, 4)
        rest = g.generate(None, state=part[r].state, max_new_tokens=5, ignore_eos=True, **SAMPLE)
        assert part[r].token_ids + rest.token_ids == full[r].token_ids


def test_row_that_finished_early_keeps_its_own_state(g):
    """Rows decode together; a finished row's slot keeps being stepped. Its state must be the
    one at its finish."""
    prompts = [PROMPT, [7, 8, 9]]
    r = g.generate(prompts, max_new_tokens=[2, 10], ignore_eos=True, return_state=True)
    assert [len(x.token_ids) for x in r] == [2, 10]
    more = g.generate(None, state=r[0].state, max_new_tokens=6, ignore_eos=True)
    assert r[0].token_ids + more.token_ids == g.generate(PROMPT, max_new_tokens=8,
                                                         ignore_eos=True).token_ids


def test_max_new_tokens_zero_returns_the_prompt_state(g):
    r = g.generate(PROMPT, max_new_tokens=0, return_state=True)
    assert r.token_ids == [] and r.state.pending == 0
    cont = g.generate(None, state=r.state, max_new_tokens=5, ignore_eos=True)
    assert cont.token_ids == g.generate(PROMPT, max_new_tokens=5, ignore_eos=True).token_ids


def test_fork_many_continuations_without_rereading_the_prefix(g):
    s = g.prefill(PROMPT)
    before = s._native.to_host()
    rows = g.generate(state=[s] * 3, seed=[1, 2, 3], max_new_tokens=6, ignore_eos=True,
                      temperature=1.0)
    for seed, row in zip([1, 2, 3], rows):
        assert row.prefill_tokens == 0
        assert row.token_ids == g.generate(PROMPT, seed=seed, max_new_tokens=6, ignore_eos=True,
                                           temperature=1.0).token_ids
    assert len({tuple(r.token_ids) for r in rows}) > 1
    # Suffixes after one shared state (the state is never modified by the generations).
    rows = g.generate([[7], [8, 9]], state=s, max_new_tokens=5, ignore_eos=True)
    assert [r.prefill_tokens for r in rows] == [1, 2]
    want = g.generate([PROMPT + [7], PROMPT + [8, 9]], max_new_tokens=5, ignore_eos=True)
    assert [r.token_ids for r in rows] == [w.token_ids for w in want]
    after = s._native.to_host()
    assert all(np.array_equal(x, y) for x, y in zip(before, after))
    assert s.tokens == tuple(PROMPT)


def test_stream_from_a_state(g):
    a = g.generate(PROMPT, max_new_tokens=3, ignore_eos=True, return_state=True)
    toks = list(g.stream(None, state=a.state, max_new_tokens=4, ignore_eos=True))
    assert a.token_ids + toks == g.generate(PROMPT, max_new_tokens=7,
                                            ignore_eos=True).token_ids


def test_save_and_load_round_trip(g, tmp_path):
    opts = dict(SAMPLE, seed=9)
    full = g.generate(PROMPT, max_new_tokens=10, ignore_eos=True, **opts)
    a = g.generate(PROMPT, max_new_tokens=4, ignore_eos=True, return_state=True, **opts)
    path = tmp_path / "s.safetensors"
    a.state.save(path)
    loaded = mambart.load_state(path)
    assert loaded.tokens == a.state.tokens and loaded.rng == a.state.rng
    assert loaded.dtype == g.dtype and loaded.fingerprint == g.fingerprint
    kw = {k: v for k, v in opts.items() if k != "seed"}
    for st in (loaded, g.load_state(path)):
        b = g.generate(None, state=st, max_new_tokens=6, ignore_eos=True, **kw)
        assert a.token_ids + b.token_ids == full.token_ids
    # The state tensors are the device state, bit for bit; a prefill state keeps its logits.
    conv, ssm = a.state._native.to_host()
    assert np.array_equal(loaded._host["conv"].reshape(-1), conv)
    assert np.array_equal(loaded._host["ssm"].reshape(-1), ssm)
    s = g.prefill(PROMPT)
    s.save(tmp_path / "p.safetensors")
    p = mambart.load_state(tmp_path / "p.safetensors")
    assert np.array_equal(p._host["logits"], s._native.logits)
    assert g.score([3, 4], state=p).sum == pytest.approx(g.score([3, 4], state=s).sum, abs=0)


def test_states_of_another_model_or_dtype_are_refused(tmp_path):
    d1 = make(tmp_path, "mamba1", seed=1)
    d2 = make(tmp_path, "mamba1", seed=2, hidden_size=32)  # another shape
    d3 = make(tmp_path, "mamba2", seed=1)
    g1 = mambart.Generator(d1)
    s = g1.prefill(PROMPT)
    path = tmp_path / "s.safetensors"
    s.save(path)
    for other in (mambart.Generator(d2), mambart.Generator(d3)):
        with pytest.raises(StateError, match="another model"):
            other.generate(None, state=s, max_new_tokens=2)
        with pytest.raises(StateError, match=str(path)):
            other.load_state(path)
        with pytest.raises(StateError, match=str(path)):
            other.generate(None, state=mambart.load_state(path), max_new_tokens=2)
    g_bf16 = mambart.Generator(d1, dtype="bfloat16")
    with pytest.raises(StateError, match="dtype float32"):
        g_bf16.load_state(path)
    with pytest.raises(StateError, match="dtype"):
        g_bf16.score([1, 2], state=s)
    # A second generator of the same model and dtype uses it.
    g1b = mambart.Generator(d1)
    assert g1b.generate(None, state=s, max_new_tokens=3).token_ids == \
        g1.generate(PROMPT, max_new_tokens=3).token_ids


def _put(p, data):
    p.write_bytes(data)
    return p


def _rewrite(path, out, edit_header=None, data_edit=None):
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    body = raw[8 + n:]
    if edit_header:
        edit_header(header)
    if data_edit:
        body = data_edit(body)
    hb = json.dumps(header).encode()
    out.write_bytes(struct.pack("<Q", len(hb)) + hb + body)
    return out


def test_malformed_state_files_raise_naming_the_file(g, tmp_path):
    good = tmp_path / "good.safetensors"
    g.generate(PROMPT, max_new_tokens=2, return_state=True).state.save(good)

    def meta(k, v):
        return lambda h: h["__metadata__"].__setitem__(k, v)

    cases = {
        "truncated": lambda p: _put(p, good.read_bytes()[:-3]),
        "short": lambda p: _put(p, b"\x01\x02"),
        "huge_header": lambda p: _put(p, struct.pack("<Q", 1 << 40) + b"{}"),
        "not_json": lambda p: _put(p, struct.pack("<Q", 4) + b"{{{{"),
        "trailing": lambda p: _put(p, good.read_bytes() + b"\0" * 8),
        "format": lambda p: _rewrite(good, p, meta("format", "other")),
        "version": lambda p: _rewrite(good, p, meta("format_version", "99")),
        "fed": lambda p: _rewrite(good, p, meta("fed", "1000")),
        "fed_nan": lambda p: _rewrite(good, p, meta("fed", "x")),
        "dtype": lambda p: _rewrite(good, p, lambda h: h["conv"].__setitem__("dtype", "F16")),
        "extra": lambda p: _rewrite(good, p, lambda h: h.__setitem__(
            "zz", {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]})),
        "no_meta": lambda p: _rewrite(good, p, lambda h: h.pop("__metadata__")),
        "nan": lambda p: _rewrite(good, p, data_edit=lambda b: b[:4] + b"\x00\x00\xc0\x7f" + b[8:]),
        "shape": lambda p: _rewrite(good, p, lambda h: h["ssm"].__setitem__(
            "shape", [h["ssm"]["shape"][0] + 1] + h["ssm"]["shape"][1:])),
    }
    for name, make_file in cases.items():
        p = make_file(tmp_path / f"{name}.safetensors")
        with pytest.raises(StateError, match=str(p)):
            g.load_state(p)
    with pytest.raises(StateError, match="NaN"):
        mambart.load_state(tmp_path / "nan.safetensors")
    dup = tmp_path / "dup.safetensors"
    raw = good.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    hdr = raw[8:8 + n].decode().rstrip()
    hdr = hdr[:-1] + ',"__metadata__":{"format":"x"}}'
    dup.write_bytes(struct.pack("<Q", len(hdr)) + hdr.encode() + raw[8 + n:])
    with pytest.raises(StateError, match="duplicate"):
        mambart.load_state(dup)
    with pytest.raises(StateError, match="missing.safetensors"):
        mambart.load_state(tmp_path / "missing.safetensors")
    # A wrong-size state that passes the file checks is still refused by the model check.
    conv_bad = tmp_path / "convshape.safetensors"
    _rewrite(good, conv_bad, lambda h: h["conv"].__setitem__("shape", [1] + [
        int(np.prod(h["conv"]["shape"]))]))
    with pytest.raises(StateError, match="do not fit"):
        g.load_state(conv_bad)


def test_state_arguments_are_checked(g):
    s = g.prefill(PROMPT)
    with pytest.raises(TypeError):
        g.generate(None, state="not a state")
    with pytest.raises(ValueError, match="list of 2 states"):
        g.generate([[1], [2], [3]], state=[s, s])
    with pytest.raises(ValueError, match="empty"):
        g.generate([[]], max_new_tokens=1)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        g.generate([10**6], state=s)


# ---------------------------------------------------------------- long prompts


def test_long_prompt_last_logits_equal_the_unchunked_math(tmp_path):
    """5,000 tokens run in 512-token chunks (state passed between chunks) give the last logits
    of transformers' single full-sequence forward, and of a prefill split anywhere."""
    cfg = mamba1_config()
    model = build(cfg, tmp_path / "hf", seed=4)
    g = mambart.Generator(mambart.convert(tmp_path / "hf", tmp_path / "m"))
    ids = np.random.default_rng(0).integers(1, cfg.vocab_size, 5000).tolist()
    s = g.prefill(ids)
    want = hf_logits(model, ids)[-1].numpy()
    np.testing.assert_allclose(s._native.logits, want, atol=TOL["float32"])
    split = g.prefill(ids[1234:], state=g.prefill(ids[:1234]))
    np.testing.assert_allclose(split._native.logits, s._native.logits, atol=TOL["float32"])


def test_long_prompt_memory_does_not_grow_with_the_prompt(tmp_path):
    d = make(tmp_path, "mamba2", seed=1)
    script = textwrap.dedent(f"""
        import resource, sys, numpy as np, mambart
        g = mambart.Generator({str(d)!r})
        n = int(sys.argv[1])
        ids = np.random.default_rng(0).integers(1, 100, n).astype(np.int32)
        g.prefill(ids[:600])  # warm-up: workspace, allocator
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        g.prefill(ids)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)
    """)

    def growth_kib(n):
        out = subprocess.run([sys.executable, "-c", script, str(n)], capture_output=True,
                             text=True, check=True)
        return int(out.stdout.split()[-1])

    small, big = growth_kib(2_000), growth_kib(40_000)
    # 40k tokens: the ids are ~0.5 MB on the Python side; activations of an unchunked prefill
    # would be 40k x ~300 floats (in_proj, conv, scan, norms) x 4 B ~ 48 MB. (A sanity check of
    # the measurement: g.logits(ids), which returns 40k x V floats, grows it by ~18 MB.)
    assert big - small < 8 * 1024, (small, big)


# ---------------------------------------------------------------- the same on the GPU


@pytest.mark.cuda
@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_cuda_states_cache_batches_and_scores(tmp_path, arch):
    """Issue 7 on the CUDA backend: the state, cache, per-row and scoring paths only use
    Backend copies, so the CPU invariants hold on the device too."""
    d = make(tmp_path, arch, seed=3)
    g = mambart.Generator(d, device="cuda")
    cpu = mambart.Generator(d)
    for opts in (dict(), dict(SAMPLE, seed=11)):
        full = g.generate(PROMPT, max_new_tokens=12, ignore_eos=True, **opts)
        a = g.generate(PROMPT, max_new_tokens=5, ignore_eos=True, return_state=True, **opts)
        kw = {k: v for k, v in opts.items() if k != "seed"}
        b = g.generate(None, state=a.state, max_new_tokens=7, ignore_eos=True, **kw)
        assert a.token_ids + b.token_ids == full.token_ids
        a.state.save(tmp_path / "s.safetensors")
        c = g.generate(None, state=g.load_state(tmp_path / "s.safetensors"), max_new_tokens=7,
                       ignore_eos=True, **kw)
        assert c.token_ids == b.token_ids
    s = g.prefill(PROMPT)
    assert "cuda" in s._native.device
    rows = g.generate(state=[s] * 3, seed=[1, 2, 3], max_new_tokens=6, ignore_eos=True,
                      temperature=1.0)
    for seed, row in zip([1, 2, 3], rows):
        assert row.token_ids == g.generate(PROMPT, seed=seed, max_new_tokens=6, ignore_eos=True,
                                           temperature=1.0).token_ids
    r = g.generate([PROMPT, [7, 8]], max_new_tokens=[2, 9], ignore_eos=True, return_state=True)
    more = g.generate(None, state=r[0].state, max_new_tokens=6, ignore_eos=True)
    assert r[0].token_ids + more.token_ids == g.generate(PROMPT, max_new_tokens=8,
                                                         ignore_eos=True).token_ids
    # Prompt cache: the next turn prefills only the new tokens, same tokens as uncached.
    gc = mambart.Generator(d, device="cuda", prompt_cache_bytes=1 << 24)
    t1 = gc.generate(PROMPT, max_new_tokens=6, ignore_eos=True)
    turn2 = PROMPT + t1.token_ids + [11, 12, 13]
    t2 = gc.generate(turn2, max_new_tokens=6, ignore_eos=True)
    assert t2.prefill_tokens == 4
    assert t2.token_ids == g.generate(turn2, max_new_tokens=6, ignore_eos=True).token_ids
    # Scores agree with the CPU backend's; a CPU state continues on the GPU (through the host).
    ids = np.random.default_rng(0).integers(1, g.vocab_size, 100).tolist()
    np.testing.assert_allclose(g.score(ids).logprobs, cpu.score(ids).logprobs, atol=2e-3)
    sc = cpu.prefill(ids[:50])
    np.testing.assert_allclose(g.score(ids[50:], state=sc).logprobs,
                               cpu.score(ids).logprobs[49:], atol=2e-3)


def test_same_config_and_layout_with_other_weights_is_another_model(tmp_path):
    """Two checkpoints whose config.json and safetensors header are byte-identical but whose
    weights differ (two random inits: like two fine-tunes of one base) have different
    fingerprints, so one's state is refused by the other."""
    d1 = make(tmp_path, "mamba1", seed=1)
    d2 = make(tmp_path, "mamba1", seed=2)
    (d2 / "config.json").write_bytes((d1 / "config.json").read_bytes())
    h1, h2 = ((d / "model.safetensors").read_bytes() for d in (d1, d2))
    n = struct.unpack("<Q", h1[:8])[0]
    assert h1[:8 + n] == h2[:8 + n] and h1 != h2
    g1, g2 = mambart.Generator(d1), mambart.Generator(d2)
    assert g1.fingerprint != g2.fingerprint
    with pytest.raises(StateError, match="another model"):
        g2.generate(None, state=g1.prefill(PROMPT), max_new_tokens=2)
    assert mambart.Generator(d1).fingerprint == g1.fingerprint  # stable across loads


def test_save_and_load_with_offsets_of_different_digit_counts(tmp_path):
    """Tensor offsets in a state file are ordered numerically (8192 < 18432), whatever their
    written lengths."""
    g = mambart.Generator(make(tmp_path, "mamba1", seed=2, hidden_size=128))
    s = g.prefill(PROMPT)
    s.save(tmp_path / "s.safetensors")
    raw = (tmp_path / "s.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    offs = sorted(v["data_offsets"][0] for k, v in json.loads(raw[8:8 + n]).items()
                  if k != "__metadata__")
    assert sorted(offs, key=str) != offs  # the case a string sort gets wrong
    loaded = g.load_state(tmp_path / "s.safetensors")
    assert g.generate(None, state=loaded, max_new_tokens=5).token_ids == \
        g.generate(PROMPT, max_new_tokens=5).token_ids

"""The SSM state's precision (issue 18 item 4, issue 20's opt-in bf16 state): the option
`state_dtype` ("float32" default, "bfloat16") and Generator(state_dtype=...). With bfloat16 the
Mamba-1 / Mamba-2 SSM states are stored as bf16 (conv windows stay fp32); the scans read bf16,
compute in fp32 and round to nearest even after every token (op_params.h BF16_STATE_RULE).

Tolerances, derived: bf16 keeps 8 significant bits, so rounding a state value moves it by at
most u = 2^-9 of itself (round to nearest). The state is a decaying sum (|exp(Δ A)| < 1), so
the rounding errors of past tokens fade rather than pile up, and a logit, a linear read-out of
the states through the following layers, moves by a few u of its own scale. The bounds below are
4u = 2^-7 of the centred logits' RMS (measured: 0.13% Mamba-1 demo, 0.24% Mamba-2 demo, i.e.
about u), and for the kernels against a float64 reference that rounds the same way, two bf16
steps (2^-7) of the state's scale: where the fp32 and float64 sums land on the two sides of a
rounding boundary the stored values differ by one bf16 step, and that step then decays.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

import mambart
from mambart import StateError, _C
from state_models import PROMPT, make

U = 2.0 ** -9  # bf16's unit roundoff (round to nearest even)


def bf16_round(a: np.ndarray) -> np.ndarray:
    """float64 -> the nearest bf16 value (ties to even), as float64: through float32 (the
    double rounding cannot matter at the 1e-3 level these tests resolve)."""
    u = np.asarray(a, np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.astype(np.uint32).view(np.float32).astype(np.float64)


def softplus(x):
    return np.where(x > 20, x, np.log1p(np.exp(np.minimum(x, 20))))


def silu(x):
    return x / (1 + np.exp(-x))


@pytest.fixture(scope="module")
def cpu():
    return _C._ops.Backend("cpu", 2)


# ---------------------------------------------------------------- kernels


def _scan_args(rng, B, L, E, N):
    x = rng.standard_normal((B, L, E)).astype(np.float32)
    dt = (rng.standard_normal((B, L, E)) * 0.5 - 1).astype(np.float32)
    bc = rng.standard_normal((B, L, 3 + 2 * N)).astype(np.float32)
    z = rng.standard_normal((B, L, 2 * E)).astype(np.float32)
    A = -np.exp(rng.standard_normal((E, N)) * 0.5).astype(np.float32)
    D = rng.standard_normal(E).astype(np.float32)
    dtb = (rng.standard_normal(E) * 0.1).astype(np.float32)
    state = rng.standard_normal((B, E, N)).astype(np.float32)
    return x, dt, bc, 3, 3 + N, z, E, A, D, dtb, state


def _scan_ref_bf16(x, dt, bc, b_off, c_off, z, z_off, A, D, dtb, state):
    """Mamba-1 selective scan in float64, the state rounded to bf16 after every token."""
    x, dt, bc, z, A, D, dtb = (np.asarray(v, np.float64) for v in (x, dt, bc, z, A, D, dtb))
    B, L, E = x.shape
    N = A.shape[1]
    h = bf16_round(state)
    y = np.zeros((B, L, E))
    for t in range(L):
        delta = softplus(dt[:, t] + dtb)  # (B, E)
        Bt, Ct = bc[:, t, b_off:b_off + N], bc[:, t, c_off:c_off + N]
        h = np.exp(delta[..., None] * A) * h + (delta * x[:, t])[..., None] * Bt[:, None, :]
        y[:, t] = ((h * Ct[:, None, :]).sum(-1) + D * x[:, t]) * silu(z[:, t, z_off:z_off + E])
        h = bf16_round(h)
    return y, h


@pytest.mark.parametrize("B,L,E,N", [(2, 7, 40, 16), (1, 5, 19, 8), (1, 4, 6, 300)])
def test_selective_scan_bf16_state_matches_reference(cpu, B, L, E, N):
    """Vector path (N <= 256, E a multiple of the block and not) and the scalar path (N = 300)
    against float64 with the same per-token rounding; a prompt at once equals its tokens one
    call each, bit for bit (the rounding is per token, not per call)."""
    args = _scan_args(np.random.default_rng(B * 100 + E + N), B, L, E, N)
    y, s = cpu.selective_scan(*args, state_bf16=True)
    y_ref, s_ref = _scan_ref_bf16(*args)
    scale = np.abs(s_ref).max()
    assert np.abs(s - s_ref).max() <= 4 * U * scale, np.abs(s - s_ref).max()
    assert np.abs(y - y_ref).max() <= 4 * U * np.abs(y_ref).max()
    assert np.array_equal(s.astype(np.float32), bf16_round(s).astype(np.float32))  # bf16 values
    # the fp32 state does not round: a different state (the option does something)
    _, s32 = cpu.selective_scan(*args)
    assert not np.array_equal(s32, s)
    x, dt, bc, b_off, c_off, z, z_off, A, D, dtb, state = args
    st = state
    for t in range(L):
        one = (x[:, t:t + 1], dt[:, t:t + 1], bc[:, t:t + 1], b_off, c_off, z[:, t:t + 1], z_off,
               A, D, dtb, st)
        yt, st = cpu.selective_scan(*one, state_bf16=True)
        assert np.array_equal(yt[:, 0], y[:, t]), t
    assert np.array_equal(st, s)


def _ssd_args(rng, B, L, H, P, G, N, Q):
    ld = H * P + 2 * G * N
    xbc = rng.standard_normal((B, L, ld)).astype(np.float32)
    dt = (rng.standard_normal((B, L, H + 2)) * 0.5 - 1).astype(np.float32)
    z = rng.standard_normal((B, L, H * P)).astype(np.float32)
    A = -np.exp(rng.standard_normal(H) * 0.5).astype(np.float32)
    D = rng.standard_normal(H).astype(np.float32)
    dtb = (rng.standard_normal(H) * 0.1).astype(np.float32)
    state = rng.standard_normal((B, H, P, N)).astype(np.float32)
    return (xbc, H * P, H * P + G * N, dt, 1, z, A, D, dtb, 0.0, float("inf"), state, G, Q)


def _ssd_ref_bf16(xbc, b_off, c_off, dt, dt_off, z, A, D, dtb, dt_min, dt_max, state, G, Q):
    """Mamba-2 recurrent SSD in float64, the state rounded to bf16 after every token."""
    xbc, dt, z, A, D, dtb = (np.asarray(v, np.float64) for v in (xbc, dt, z, A, D, dtb))
    B, L, _ = xbc.shape
    _, H, P, N = state.shape
    s = bf16_round(state)
    y = np.zeros((B, L, H * P))
    for t in range(L):
        for h in range(H):
            g = h // (H // G)
            delta = np.clip(softplus(dt[:, t, dt_off + h] + dtb[h]), dt_min, dt_max)  # (B,)
            x = xbc[:, t, h * P:(h + 1) * P]  # (B, P)
            Bv = xbc[:, t, b_off + g * N:b_off + (g + 1) * N]
            Cv = xbc[:, t, c_off + g * N:c_off + (g + 1) * N]
            s[:, h] = (s[:, h] * np.exp(delta * A[h])[:, None, None] +
                       (delta[:, None] * x)[..., None] * Bv[:, None, :])
            yh = (s[:, h] * Cv[:, None, :]).sum(-1) + D[h] * x
            y[:, t, h * P:(h + 1) * P] = yh * silu(z[:, t, h * P:(h + 1) * P])
        s = bf16_round(s)
    return y, s


@pytest.mark.parametrize("B,L,H,P,G,N,Q", [(2, 6, 4, 8, 2, 16, 4), (1, 9, 3, 5, 1, 12, 64)])
def test_ssd_scan_bf16_state_matches_reference(cpu, B, L, H, P, G, N, Q):
    """Both chunk sizes (Q < N would pick the chunked form for an fp32 state: a bf16 state
    always runs the recurrent one) against float64 with the same rounding; prompt at once ==
    its tokens one call each, bit for bit."""
    args = _ssd_args(np.random.default_rng(L * 10 + N), B, L, H, P, G, N, Q)
    y, s = cpu.ssd_scan(*args, state_bf16=True)
    y_ref, s_ref = _ssd_ref_bf16(*args)
    assert np.abs(s - s_ref).max() <= 4 * U * np.abs(s_ref).max()
    assert np.abs(y - y_ref).max() <= 4 * U * np.abs(y_ref).max()
    _, s32 = cpu.ssd_scan(*args)
    assert not np.array_equal(s32, s)
    xbc, b_off, c_off, dt, dt_off, z, *rest = args
    st = args[11]
    for t in range(L):
        one = list(args)
        one[0], one[3], one[5], one[11] = xbc[:, t:t + 1], dt[:, t:t + 1], z[:, t:t + 1], st
        yt, st = cpu.ssd_scan(*one, state_bf16=True)
        assert np.array_equal(yt[:, 0], y[:, t]), t
    assert np.array_equal(st, s)


# ---------------------------------------------------------------- option and errors


def test_bad_values_name_the_option(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="state_dtype"):
        mambart.set_options(state_dtype="float16")
    with pytest.raises(ValueError, match="state_dtype"):
        mambart.Generator("mambart-demo", state_dtype="fp8")
    with pytest.raises(ValueError, match="state_dtype"):
        mambart.Generator("mambart-demo", state_dtype=16)
    monkeypatch.setenv("MAMBART_STATE_DTYPE", "int8")
    with pytest.raises(ValueError, match="MAMBART_STATE_DTYPE"):
        mambart.Generator("mambart-demo")
    monkeypatch.setenv("MAMBART_STATE_DTYPE", "bfloat16")
    assert mambart.Generator("mambart-demo").state_dtype == "bfloat16"
    assert mambart.Generator("mambart-demo", state_dtype="float32").state_dtype == "float32"


def test_option_default_and_setting():
    assert mambart.Generator("mambart-demo").state_dtype == "float32"
    mambart.set_options(state_dtype="bfloat16")
    try:
        g = mambart.Generator("mambart-demo")
    finally:
        mambart.set_options(state_dtype=None)
    assert g.state_dtype == "bfloat16"  # read at load: later changes do not move it
    assert mambart.Generator("mambart-demo").state_dtype == "float32"


def test_mamba3_refuses_a_bf16_state(tmp_path):
    from test_mamba3 import m3, make_dir

    d, _ = make_dir(tmp_path / "m3", [m3()])
    with pytest.raises(NotImplementedError, match="state_dtype=bfloat16.*mamba3"):
        mambart.Generator(d, state_dtype="bfloat16")
    assert mambart.Generator(d).state_dtype == "float32"


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_state_bytes_halve_for_the_ssm_state(tmp_path, arch):
    d = make(tmp_path, arch)
    g32, g16 = mambart.Generator(d), mambart.Generator(d, state_dtype="bfloat16")
    spec32 = {e["name"]: e for e in g32._g.state_spec}
    spec16 = {e["name"]: e for e in g16._g.state_spec}
    assert spec32["ssm"]["dtype"] == "F32" and spec16["ssm"]["dtype"] == "BF16"
    assert spec16["conv"]["dtype"] == "F32"
    ssm = math.prod(spec16["ssm"]["shape"])
    assert g32.prefill(PROMPT).nbytes - g16.prefill(PROMPT).nbytes == 2 * ssm


# ---------------------------------------------------------------- models


def _heldout(n: int, chars: int):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import train_demo

    _, files = train_demo.stdlib_files()
    held = [p for rel, p in files if train_demo.held_out(rel) and p.stat().st_size > chars]
    assert len(held) >= n
    return [p.read_text(encoding="utf-8", errors="replace")[:chars] for p in held[:n]]


@pytest.fixture(scope="module", params=["mambart-demo", "mambart2-demo"])
def pair(request):
    return (mambart.Generator(request.param), mambart.Generator(request.param,
                                                                state_dtype="bfloat16"))


def test_bf16_state_logits_near_the_fp32_state(pair):
    """Teacher-forced logits over 300 held-out tokens: RMS error <= 4u of the centred logits'
    RMS, top-1 agreement >= 97% (trained models: the error is u-sized, not chaotic)."""
    g32, g16 = pair
    ids = g32.tokenizer.encode(_heldout(1, 4000)[0]).ids[:300]
    l32, l16 = g32.logits(ids).astype(np.float64), g16.logits(ids).astype(np.float64)
    scale = np.sqrt(((l32 - l32.mean(1, keepdims=True)) ** 2).mean())
    err = np.sqrt(((l16 - l32) ** 2).mean())
    assert 0 < err <= 4 * U * scale, (err, scale)
    assert (l32.argmax(1) == l16.argmax(1)).mean() >= 0.97


def test_prefill_then_decode_equals_decode_steps(pair):
    """With a bf16 state (rounded after every token in prefill and decode alike) a prefilled
    prompt leaves the state its token-by-token decode leaves, up to one bf16 step where the
    prefill GEMM's and the decode GEMV's fp32 sums round to neighbouring bf16 values
    (measured 4e-4 on the next-token logits): bound 2^-7 of the centred logits' RMS."""
    _, g = pair
    ids = g.tokenizer.encode(_heldout(1, 4000)[0]).ids[:80]
    st = None
    for t in ids:
        st = g.generate([t], state=st, max_new_tokens=0, return_state=True).state
    pre = g.prefill(ids)
    a, b = np.asarray(pre._native.logits), np.asarray(st._native.logits)
    scale = np.sqrt(((a - a.mean()) ** 2).mean())
    assert np.abs(a - b).max() <= 4 * U * scale
    # and both continue alike: greedy tokens from each state
    r1 = g.generate(None, state=pre, max_new_tokens=16, ignore_eos=True)
    r2 = g.generate(None, state=st, max_new_tokens=16, ignore_eos=True)
    assert r1.token_ids == r2.token_ids


def test_trained_model_perplexity_within_half_a_percent(pair):
    """Issue 18's target: state bf16 within 0.5% of the fp32-state held-out perplexity."""
    g32, g16 = pair
    texts = _heldout(8, 4000)

    def ppl(g):
        tot = n = 0
        for t in texts:
            sc = g.score(t)
            tot -= sc.sum
            n += len(sc.token_ids)
        return math.exp(tot / n)

    p32, p16 = ppl(g32), ppl(g16)
    assert p32 < 100, p32  # a trained model (chance is 4096)
    assert p16 != p32  # the bf16 state is what ran
    assert abs(p16 / p32 - 1) < 0.005, (p32, p16)


# ---------------------------------------------------------------- everything that handles states


@pytest.fixture(scope="module", params=["mamba1", "mamba2"])
def g16(request, tmp_path_factory):
    return mambart.Generator(make(tmp_path_factory.mktemp("sd"), request.param),
                             state_dtype="bfloat16")


def test_continuation_fork_and_batch_equal_one_run(g16):
    full = g16.generate(PROMPT, max_new_tokens=12, ignore_eos=True)
    a = g16.generate(PROMPT, max_new_tokens=5, ignore_eos=True, return_state=True)
    b = g16.generate(None, state=a.state, max_new_tokens=7, ignore_eos=True)
    assert a.token_ids + b.token_ids == full.token_ids
    # a fork: the same state twice
    assert g16.generate(None, state=a.state, max_new_tokens=7, ignore_eos=True).token_ids == \
        b.token_ids
    # the engine's batch (pooled states) equals each run alone
    other = PROMPT[3:] + [5, 9]
    rs = g16.generate([PROMPT, other], max_new_tokens=12, ignore_eos=True)
    assert rs[0].token_ids == full.token_ids
    assert rs[1].token_ids == g16.generate(other, max_new_tokens=12, ignore_eos=True).token_ids


def _file_dtypes(path: Path) -> dict:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    h = json.loads(raw[8:8 + n])
    return {k: v["dtype"] for k, v in h.items() if k != "__metadata__"}


def test_state_file_round_trip_and_conversion(g16, tmp_path):
    full = g16.generate(PROMPT, max_new_tokens=10, ignore_eos=True)
    a = g16.generate(PROMPT, max_new_tokens=4, ignore_eos=True, return_state=True)
    path = tmp_path / "s16.safetensors"
    a.state.save(path)
    assert _file_dtypes(path) == {"conv": "F32", "ssm": "BF16", "tokens": "I32"}
    loaded = mambart.load_state(path)
    assert [e["dtype"] for e in loaded._file.spec] == ["F32", "BF16"]
    conv, ssm = a.state._native.to_host()
    assert np.array_equal(loaded._host["ssm"].reshape(-1), ssm)
    assert np.array_equal(loaded._host["conv"].reshape(-1), conv)
    for st in (loaded, g16.load_state(path)):
        b = g16.generate(None, state=st, max_new_tokens=6, ignore_eos=True)
        assert a.token_ids + b.token_ids == full.token_ids
    # into a float32-state generator of the same model: widened exactly
    g32 = mambart.Generator(g16.model_dir)
    s32 = g32.load_state(path)
    assert np.array_equal(s32._native.to_host()[1], ssm)
    assert g32.generate(None, state=a.state, max_new_tokens=2).token_ids == \
        g32.generate(None, state=s32, max_new_tokens=2).token_ids
    # a float32 state into the bf16 generator: rounded to nearest even
    p32 = g32.generate(PROMPT, max_new_tokens=4, ignore_eos=True, return_state=True).state
    p32.save(tmp_path / "s32.safetensors")
    assert _file_dtypes(tmp_path / "s32.safetensors")["ssm"] == "F32"
    into16 = g16.load_state(tmp_path / "s32.safetensors")
    want = bf16_round(p32._native.to_host()[1]).astype(np.float32)
    assert np.array_equal(into16._native.to_host()[1], want)
    assert np.array_equal(into16._native.to_host()[0], p32._native.to_host()[0])


def test_state_file_bf16_tensor_checked(g16, tmp_path):
    """A BF16 state tensor whose bytes do not match its shape is refused like an F32 one."""
    path = tmp_path / "s.safetensors"
    g16.prefill(PROMPT).save(path)
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    h = json.loads(raw[8:8 + n])
    h["ssm"]["dtype"] = "F16"
    hb = json.dumps(h).encode()
    hb += b" " * ((8 - len(hb) % 8) % 8)
    (tmp_path / "bad.safetensors").write_bytes(struct.pack("<Q", len(hb)) + hb + raw[8 + n:])
    with pytest.raises(StateError, match="'ssm' must be F32 or BF16"):
        mambart.load_state(tmp_path / "bad.safetensors")


def test_prompt_cache_serves_bf16_states(g16):
    g16.enable_prompt_cache(1 << 24)
    try:
        first = g16.generate(PROMPT, max_new_tokens=6, ignore_eos=True)
        again = g16.generate(PROMPT, max_new_tokens=6, ignore_eos=True)
        assert g16.prompt_cache.hits >= 1
        assert again.token_ids == first.token_ids
        assert "state_bfloat16" in g16._cache_key()
    finally:
        g16.enable_prompt_cache(0)


def test_speculative_greedy_equals_plain(g16):
    """The verification pass's per-token states are the decode steps' (the state rounded
    after every token): prompt-lookup speculation keeps greedy output identical."""
    prompt = PROMPT + PROMPT[:6] + PROMPT
    plain = g16.generate(prompt, max_new_tokens=24, ignore_eos=True)
    fast = g16.generate(prompt, max_new_tokens=24, ignore_eos=True,
                        speculative=dict(method="prompt_lookup", k=4))
    assert fast.token_ids == plain.token_ids
    assert fast.speculative["verifications"] >= 1


# ---------------------------------------------------------------- CUDA (the `cuda` marker)
# The CUDA scans with a bf16 state (cuda/selective_scan.cu sequential forms, cuda/ssd_scan.cu)
# follow the same rule as the CPU's: against the CPU bf16-state path, the fp32 arithmetic
# differs in the last bits (exp2f vs the CPU's exp), which can move a value across a bf16
# rounding boundary: one bf16 step, 2^-8 of the value, that then decays. Bound: 4u of the scale.


@pytest.fixture(scope="module")
def gpu():
    return _C._ops.Backend("cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("B,L,E,N", [(2, 7, 40, 16), (3, 1, 1536, 16), (1, 5, 19, 8),
                                     (2, 4, 64, 64), (1, 3, 6, 200)])
def test_cuda_selective_scan_bf16_state_matches_cpu(gpu, cpu, B, L, E, N):
    """Both channel mappings (N <= 16: a channel per thread; N > 16: lane groups)."""
    args = _scan_args(np.random.default_rng(B * 100 + E + N + L), B, L, E, N)
    y_g, s_g = gpu.selective_scan(*args, state_bf16=True)
    y_c, s_c = cpu.selective_scan(*args, state_bf16=True)
    assert np.abs(s_g - s_c).max() <= 4 * U * np.abs(s_c).max()
    assert np.abs(y_g - y_c).max() <= 4 * U * np.abs(y_c).max()
    assert np.array_equal(s_g.astype(np.float32), bf16_round(s_g).astype(np.float32))
    _, s32 = gpu.selective_scan(*args)
    assert not np.array_equal(s32, s_g)  # the fp32 state is untouched by the option


@pytest.mark.cuda
@pytest.mark.parametrize("B,L,H,P,G,N,Q", [(2, 6, 4, 8, 2, 16, 4), (1, 9, 3, 5, 1, 12, 64),
                                           (4, 1, 24, 64, 1, 128, 256)])
def test_cuda_ssd_scan_bf16_state_matches_cpu(gpu, cpu, B, L, H, P, G, N, Q):
    args = _ssd_args(np.random.default_rng(L * 10 + N + H), B, L, H, P, G, N, Q)
    y_g, s_g = gpu.ssd_scan(*args, state_bf16=True)
    y_c, s_c = cpu.ssd_scan(*args, state_bf16=True)
    assert np.abs(s_g - s_c).max() <= 4 * U * np.abs(s_c).max()
    assert np.abs(y_g - y_c).max() <= 4 * U * np.abs(y_c).max()
    _, s32 = gpu.ssd_scan(*args)
    assert not np.array_equal(s32, s_g)


@pytest.mark.cuda
@pytest.mark.parametrize("demo", ["mambart-demo", "mambart2-demo"])
def test_cuda_bf16_state_generation_matches_cpu(demo):
    """Prefill (the sequential / recurrent forms), batched decode (8 and 12 rows: the fused
    steps' row limit on either side) and a saved state, on the device against the CPU."""
    gc = mambart.Generator(demo, state_dtype="bfloat16", dtype="float32")
    gg = mambart.Generator(demo, device="cuda", state_dtype="bfloat16", dtype="float32")
    assert gg.state_dtype == "bfloat16"
    ids = gc.tokenizer.encode(_heldout(1, 4000)[0]).ids[:200]
    lc, lg = gc.logits(ids).astype(np.float64), gg.logits(ids).astype(np.float64)
    scale = np.sqrt(((lc - lc.mean(1, keepdims=True)) ** 2).mean())
    assert np.sqrt(((lg - lc) ** 2).mean()) <= 4 * U * scale
    prompts = [ids[i:i + 20] for i in range(0, 12 * 15, 15)]
    for rows in (8, 12):
        rc = gc.generate(prompts[:rows], max_new_tokens=24, ignore_eos=True)
        rg = gg.generate(prompts[:rows], max_new_tokens=24, ignore_eos=True)
        same = np.mean([a.token_ids == b.token_ids for a, b in zip(rc, rg)])
        assert same >= 0.75, same  # greedy: near-ties may part a row or two
    s = gg.prefill(ids[:50])
    spec = {e["name"]: e["dtype"] for e in gg._g.state_spec}
    assert spec["ssm"] == "BF16"
    a = gg.generate(None, state=s, max_new_tokens=8, ignore_eos=True)
    b = gc.generate(None, state=s, max_new_tokens=8, ignore_eos=True)  # device -> host state
    assert a.token_ids == b.token_ids

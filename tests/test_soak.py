"""Long runs: 1,000,000 generated tokens on a tiny model on the CPU, in float16 and bfloat16
weights (fp32 state), with

- every step's logits finite (the generator raises on NaN/Inf; checked again at the end),
- no drift: the decode loop's final logits equal a fresh chunked prefill over the sequence's
  last 30k tokens (the model's memory is far shorter than that, see below),
- RSS flat: growth from 1k to 1M tokens bounded by what the stream keeps per token by design
  (its token list and sequence history, 4 bytes each, at most doubled by vector growth) + 4 MiB.

MAMBART_SOAK_TOKENS overrides the length (the sanitizer run in CI uses a shorter one).
Figures are printed (pytest -s) and recorded in RELIABILITY.md.
"""

import os
import time

import numpy as np
import pytest

from mambart import _C

from model_dirs import make_model_dir

N_TOKENS = int(os.environ.get("MAMBART_SOAK_TOKENS", "1000000"))
PROMPT = [5, 17, 42, 8, 99, 3]
TAIL = min(N_TOKENS, 30_000)


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.slow
@pytest.mark.parametrize("arch,dtype", [("mamba1", "float16"), ("mamba2", "bfloat16")])
def test_million_tokens(tmp_path, arch, dtype):
    d = make_model_dir(tmp_path / "m", arch, dtype, seed=3)
    g = _C.Generator(str(d))
    assert g.dtype == dtype
    o = _C.GenerationOptions()
    o.max_new_tokens = N_TOKENS
    o.ignore_eos = True
    o.temperature = 1.0  # sampled tokens keep the input varied (greedy falls into a short cycle)
    o.seed = 1234
    s = g.start([PROMPT], o)
    marks = sorted({min(1000, N_TOKENS), N_TOKENS // 4, N_TOKENS // 2, 3 * N_TOKENS // 4,
                    N_TOKENS} - {0})
    rss = {}
    n = 0
    t0 = time.perf_counter()
    t_first = None
    while True:
        ev = s.next()
        if ev is None:
            break
        n += len(ev)
        if n == 1:
            t_first = time.perf_counter()
        if n in marks:
            rss[n] = _rss_bytes()
    t_end = time.perf_counter()
    elapsed = t_end - t0
    res = s.results[0]
    assert n == N_TOKENS and res.finish_reason == "length"
    last = s.last_logits[0]
    assert np.isfinite(last).all()
    toks = list(res.token_ids)
    assert len(toks) == N_TOKENS and 0 <= min(toks) and max(toks) < 100
    assert len(set(toks[-10000:])) > 20  # still sampling a spread of tokens at the end

    # No drift: the last decode step's logits (1M recurrent steps over PROMPT + toks[:-1]) equal
    # a fresh chunked prefill over the last TAIL tokens of that sequence. The model forgets: every
    # channel's state decays by exp(dt * A) <= exp(-dt) per step with dt >~ 1e-3 here, so what
    # came before the tail weighs < exp(-30) ~ 1e-13 and the two must agree to float32 rounding.
    # (A full 1M-token prefill gives the same answer but takes ~40 s on 2 cores.)
    o1 = _C.GenerationOptions()
    o1.max_new_tokens = 1
    seq = PROMPT + toks[:-1]
    s2 = g.start([seq[-TAIL:]], o1)
    s2.next()
    ref = s2.last_logits[0]
    np.testing.assert_allclose(last, ref, rtol=1e-4, atol=1e-4)

    # What a stream keeps per generated token by design: the result's token list and the row's
    # sequence history (prompt + new tokens, for state snapshots), 4 bytes each, and a vector
    # may hold up to twice its size while it grows. Anything beyond that is a leak.
    growth = rss[marks[-1]] - rss[marks[0]]
    bound = 2 * 4 * 2 * N_TOKENS + (4 << 20)
    print(f"\nsoak {arch} {dtype}: {N_TOKENS} tokens in {elapsed:.1f} s "
          f"({1e6 * (t_end - t_first) / max(N_TOKENS - 1, 1):.1f} us/token after the first); "
          "RSS MiB at " + ", ".join(f"{k}: {v / 2**20:.1f}" for k, v in rss.items())
          + f"; growth {growth / 2**20:.2f} MiB (bound {bound / 2**20:.1f} MiB); "
          f"max |decode - prefill(last {TAIL})| logit diff {np.abs(last - ref).max():.2e}")
    if "asan" in os.environ.get("LD_PRELOAD", ""):
        return  # ASan's quarantine keeps freed memory resident: RSS says nothing there
    assert growth <= bound, rss

"""Time to first token of a conversation's second turn, with and without the prompt cache.

    python tools/bench_prompt_cache.py [--device cpu|cuda] [--turn1 1000,4000] [--model DIR]

Without --model, builds a random Mamba-1 with mamba-130m's shapes (d_model 768, 24 layers,
vocab 50280) via transformers (needs torch) in a temporary directory. Turn 1: a random prompt
of N tokens + 32 generated; turn 2: turn 1 + its answer + 50 new tokens, 1 token generated.
Prints the median of 3 runs of turn 2 (ms) and the tokens actually prefilled."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import mambart


def random_130m(root: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from hf_models import build, mamba1_config

    cfg = mamba1_config(vocab_size=50280, hidden_size=768, num_hidden_layers=24, state_size=16,
                        time_step_rank=48)
    build(cfg, root / "hf", seed=0, scale=0.02)
    return Path(mambart.convert(root / "hf", root / "m"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--turn1", default="1000,4000")
    ap.add_argument("--model")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(a.model) if a.model else random_130m(Path(tmp))
        g0 = mambart.Generator(d, device=a.device)
        g1 = mambart.Generator(d, device=a.device, prompt_cache_bytes=1 << 30)
        rng = np.random.default_rng(0)
        print(f"device {g0.device}, model {g0!r}")
        g0.generate([1, 2, 3], max_new_tokens=4)  # warm-up
        g1.generate([1, 2, 3], max_new_tokens=4)
        for n1 in [int(x) for x in a.turn1.split(",")]:
            turn1 = rng.integers(1, 50000, n1).tolist()
            user2 = rng.integers(1, 50000, 50).tolist()
            for name, g in (("no cache", g0), ("prompt cache", g1)):
                ts = []
                for _ in range(3):
                    if g.prompt_cache is not None:
                        g.prompt_cache.clear()
                    r1 = g.generate(turn1, max_new_tokens=32, ignore_eos=True)
                    t0 = time.perf_counter()
                    r2 = g.generate(turn1 + r1.token_ids + user2, max_new_tokens=1,
                                    ignore_eos=True)
                    ts.append((time.perf_counter() - t0) * 1e3)
                print(f"turn1 {n1:6d} tokens, {name:12s}: 2nd-turn TTFT median "
                      f"{np.median(ts):9.1f} ms (runs {', '.join(f'{t:.1f}' for t in ts)}), "
                      f"prefilled {r2.prefill_tokens} of {r2.prompt_tokens}", flush=True)


if __name__ == "__main__":
    main()

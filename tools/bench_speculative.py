"""Speculative decoding (issue 25) against plain decoding, batch 1, in one run.

For each task it runs plain greedy decoding (the native loop, no engine) and the speculative
variants on the same prompt, checks that the tokens are identical, and prints one JSON line per
run: decode tokens/s (new tokens after the first over the decode time, median of --repeat runs),
the speed-up over plain, the acceptance rate (accepted / proposed guesses), the tokens per
verification pass, and the rollback time as a fraction of the verification time.

Tasks:
  edit    a source file followed by the instruction to repeat it with a small edit and its
          first line: prompt lookup's case (the model copies the file);
  code    the start of a function (no repetition in the prompt);
  random  random token ids (nothing to look up, nothing a draft can guess).
Variants: plain; lookup (prompt lookup, k = --k-lookup); lookup_recompute (the same, the
accepted prefix's state recomputed instead of kept from the trace); draft (--draft model,
k = --k-draft).

  python tools/bench_speculative.py [--model mambart-demo] [--draft mambart2-demo]
      [--device cpu] [--dtype float32] [--tokens 256] [--repeat 3] [--tasks edit,code,random]
"""

from __future__ import annotations

import argparse
import inspect
import json
import platform
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

import mambart


def _git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        return "unknown"


def _prompts(g, seed: int):
    import string  # a stdlib file the demo models may have seen; any text file would do

    src = inspect.getsource(string)
    src = src[src.index("def capwords"):][:1400]
    first = src.splitlines()[0]
    edit = (src + "\n\n# The same code again, with `sep` renamed to `separator`:\n\n" + first
            .replace("sep", "separator") + "\n")
    code = textwrap.dedent("""\
        import os


        def walk_files(root):
        """)
    rng = np.random.default_rng(seed)
    rand = [int(x) for x in rng.integers(0, g.vocab_size, size=64)]
    return {"edit": edit, "code": code, "random": rand}


def _plain(g, ids, n):
    o = g._options(n, 0.0, 0, 1.0, 0.0, 1.0, 0, None, True)
    r = g._g.generate([ids], o)[0]
    return list(r.token_ids), r.decode_ms, None


def _spec(g, ids, n, method, k, draft=None, recompute=False):
    o = g._options(n, 0.0, 0, 1.0, 0.0, 1.0, 0, None, True)
    r, st = g._g.generate_speculative(ids, o, method, k, 3, 1,
                                      None if draft is None else draft._g, recompute)
    return list(r.token_ids), r.decode_ms, st


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mambart-demo")
    ap.add_argument("--draft", default="mambart2-demo")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--k-lookup", type=int, default=8)
    ap.add_argument("--k-draft", type=int, default=4)
    ap.add_argument("--tasks", default="edit,code,random")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)

    g = mambart.Generator(a.model, device=a.device, dtype=a.dtype)
    d = mambart.Generator(a.draft, device=a.device, dtype=a.dtype) if a.draft else None
    prompts = _prompts(g, a.seed)
    variants = [("plain", lambda ids: _plain(g, ids, a.tokens)),
                ("lookup", lambda ids: _spec(g, ids, a.tokens, "prompt_lookup", a.k_lookup)),
                ("lookup_recompute", lambda ids: _spec(g, ids, a.tokens, "prompt_lookup",
                                                       a.k_lookup, recompute=True))]
    if d is not None:
        variants.append(("draft", lambda ids: _spec(g, ids, a.tokens, "draft", a.k_draft, d)))
    meta = dict(git_sha=_git_sha(), device=g.device, cpu=platform.processor() or platform.machine(),
                model=a.model, draft=a.draft, dtype=g.dtype, batch=1, gen_len=a.tokens)
    rows = []
    for task in a.tasks.split(","):
        p = prompts[task]
        ids = g.tokenizer.encode(p).ids if isinstance(p, str) else p
        base_tps, base_tokens = None, None
        for name, fn in variants:
            fn(ids)  # warm-up
            tps, stats = [], None
            for _ in range(a.repeat):
                toks, ms, stats = fn(ids)
                tps.append((len(toks) - 1) / (ms / 1e3))
            tps_med = statistics.median(tps)
            if name == "plain":
                base_tps, base_tokens = tps_med, toks
            row = dict(meta, task=task, variant=name, prompt_len=len(ids),
                       decode_tok_s=round(tps_med, 1),
                       speedup=round(tps_med / base_tps, 2),
                       identical=toks == base_tokens)
            if stats:
                row.update(acceptance=round(stats["accepted"] / max(1, stats["proposed"]), 3),
                           proposed=stats["proposed"], accepted=stats["accepted"],
                           tokens_per_pass=round(len(toks) / max(1, stats["verifications"]), 2),
                           rollback_over_verify=round(stats["rollback_ms"] /
                                                      max(1e-9, stats["verify_ms"]), 4),
                           propose_ms=round(stats["propose_ms"], 1),
                           verify_ms=round(stats["verify_ms"], 1))
            print(json.dumps(row), flush=True)
            rows.append(row)
            if not row["identical"]:
                print(f"error: {task}/{name}: tokens differ from plain greedy", file=sys.stderr)
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

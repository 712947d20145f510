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
Variants (--variants): plain; lookup (prompt lookup, k = --k-lookup); lookup_recompute (the
same, the accepted prefix's state recomputed instead of kept from the trace); lookup_adaptive
(adaptive k, at most --k-lookup); draft (--draft model, k = --k-draft); draft_adaptive.

  python tools/bench_speculative.py [--model mambart-demo] [--draft mambart2-demo]
      [--device cpu] [--dtype float32] [--tokens 256] [--repeat 3] [--tasks edit,code,random]
  python tools/bench_speculative.py --shape mamba-130m --dtype bfloat16 --draft '' \
      --tasks random,code
  python tools/bench_speculative.py --pass-cost --device cuda --shape mamba-2.8b \
      --dtype bfloat16 --draft '' --draft-shape mamba-130m
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

sys.path.insert(0, str(Path(__file__).parent))  # tools/bench.py: shapes, random weights


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


def _spec(g, ids, n, method, k, draft=None, recompute=False, adaptive=False):
    o = g._options(n, 0.0, 0, 1.0, 0.0, 1.0, 0, None, True)
    extra = dict(adaptive=True) if adaptive else {}  # (builds before adaptive k: no keyword)
    r, st = g._g.generate_speculative(ids, o, method, k, 3, 1,
                                      None if draft is None else draft._g, recompute, **extra)
    return list(r.token_ids), r.decode_ms, st


def _pass_cost(g, prompts, a) -> int:
    p = prompts["code"]
    ids = g.tokenizer.encode(p).ids if isinstance(p, str) else p
    toks = [int(t) for t in np.random.default_rng(a.seed).integers(0, g.vocab_size, 33)]
    meta = dict(git_sha=_git_sha(), device=g.device, model=a.model, dtype=g.dtype, batch=1)
    g._g.verification_ms(ids, toks[: a.k_lookup + 1], 2, True)  # warm-up (workspace, caches)
    # Interleaved: each of --iters rounds times one plain step, then every pass length with
    # and without the traces, so that load from elsewhere on the machine (a shared CPU) hits
    # them alike; medians over the rounds.
    Ls = list(range(1, a.k_lookup + 2))
    t_step, t_pass, t_plain, t_keep = [], {L: [] for L in Ls}, {L: [] for L in Ls}, {L: [] for L in Ls}
    for _ in range(a.iters):
        t_step.append(g._g.verification_ms(ids, toks[:1], 1, False)[0])
        for L in Ls:
            ms, keep = g._g.verification_ms(ids, toks[:L], 1, True)
            t_pass[L].append(ms)
            t_keep[L].append(keep)
            t_plain[L].append(g._g.verification_ms(ids, toks[:L], 1, False)[0])
    med = statistics.median
    step = med(t_step)
    print(json.dumps(dict(meta, metric="step", ms=round(step, 3), ms_min=round(min(t_step), 3),
                          rounds=a.iters)), flush=True)
    costs = {}
    for L in Ls:
        ms, ms_plain, keep = med(t_pass[L]), med(t_plain[L]), med(t_keep[L])
        costs[L] = ms
        ratios = sorted(p / q for p, q in zip(t_pass[L], t_step))
        print(json.dumps(dict(meta, metric="pass", L=L, ms=round(ms, 3),
                              ms_no_trace=round(ms_plain, 3),
                              trace_overhead=round(ms / ms_plain - 1, 3),
                              over_one_step=round(ms / step, 2),
                              over_step_same_round=round(med(ratios), 2),
                              keep_state_ms=round(keep, 4),
                              keep_over_pass=round(keep / ms, 4))), flush=True)
    # Expected tokens per pass with k guesses kept independently with probability r:
    # (1 - r^(k+1)) / (1 - r); the pass costs costs[k + 1] (k = --k-lookup), a plain step `step`.
    k = a.k_lookup
    for r in (0.5, 0.6, 0.7, 0.8, 0.9):
        tpp = (1 - r ** (k + 1)) / (1 - r)
        print(json.dumps(dict(meta, metric="implied_speedup", k=k, acceptance=r,
                              tokens_per_pass=round(tpp, 2),
                              speedup=round(tpp * step / costs[k + 1], 2))), flush=True)
    if a.draft_shape:
        import tempfile

        import bench

        with tempfile.TemporaryDirectory() as t:
            dpath = Path(t) / a.draft_shape
            bench.write_random_model(dpath, bench.model_config(a.draft_shape, a.dtype))
            dg = mambart.Generator(str(dpath), device=a.device)
            kd = a.k_draft
            if kd + 1 not in costs:
                costs[kd + 1], _ = g._g.verification_ms(ids, toks[: kd + 1], a.iters, True)
            dg._g.verification_ms(ids, toks[:1], 2, False)  # warm-up
            dstep, _ = dg._g.verification_ms(ids, toks[:1], a.iters, False)
            print(json.dumps(dict(meta, metric="draft_step", draft_shape=a.draft_shape,
                                  ms=round(dstep, 3), over_target_step=round(dstep / step, 3))),
                  flush=True)
            for r in (0.5, 0.6, 0.7, 0.8, 0.9):
                tpp = (1 - r ** (kd + 1)) / (1 - r)
                cost = costs[kd + 1] + kd * dstep
                print(json.dumps(dict(meta, metric="implied_speedup_draft", k=kd, acceptance=r,
                                      draft_shape=a.draft_shape, tokens_per_pass=round(tpp, 2),
                                      speedup=round(tpp * step / cost, 2))), flush=True)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mambart-demo")
    ap.add_argument("--draft", default="mambart2-demo")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--k-lookup", type=int, default=7)
    ap.add_argument("--k-draft", type=int, default=4)
    ap.add_argument("--tasks", default="edit,code,random")
    ap.add_argument("--variants", default="plain,lookup,lookup_recompute,lookup_adaptive,draft,"
                                          "draft_adaptive",
                    help="comma-separated (plain is always run: the reference)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shape", default=None, metavar="NAME",
                    help="the target is random weights at this tools/bench.py shape (e.g. "
                         "mamba-130m), stored in --dtype; text prompts use the demo tokenizer. "
                         "Random weights may fall into loops that prompt lookup guesses, or not "
                         "(mamba-130m's shape: no guess kept in 128 tokens, so such a run "
                         "measures the overhead of speculating): the acceptance rate is "
                         "reported with the speed; --pass-cost gives a real shape's speed-up "
                         "at a trained pair's acceptance")
    ap.add_argument("--pass-cost", action="store_true",
                    help="instead: the time of one verification pass of L = 1 .. k + 1 tokens "
                         "(median of --iters interleaved rounds, with the per-token states "
                         "written and without), "
                         "the cost of keeping a state, and the speed-up they imply at "
                         "acceptance rates 0.5 .. 0.9 (k = --k-lookup)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--draft-shape", default=None, metavar="NAME",
                    help="with --pass-cost: also a random draft at this shape (e.g. mamba-130m): "
                         "its step time and the speed-up a draft of that cost implies "
                         "(k = --k-draft)")
    a = ap.parse_args(argv)

    tmp = None
    if a.shape:
        import tempfile

        import bench

        tmp = tempfile.TemporaryDirectory()
        bench.write_random_model(Path(tmp.name) / a.shape, bench.model_config(a.shape, a.dtype))
        demo = mambart.Generator("mambart-demo")
        g = mambart.Generator(str(Path(tmp.name) / a.shape), device=a.device,
                              tokenizer=demo.tokenizer)
        a.model = f"random {a.shape}"
    else:
        g = mambart.Generator(a.model, device=a.device, dtype=a.dtype)
    d = mambart.Generator(a.draft, device=a.device, dtype=a.dtype) if a.draft else None
    prompts = _prompts(g, a.seed)
    if a.pass_cost:
        return _pass_cost(g, prompts, a)
    every = {
        "lookup": lambda ids: _spec(g, ids, a.tokens, "prompt_lookup", a.k_lookup),
        "lookup_recompute": lambda ids: _spec(g, ids, a.tokens, "prompt_lookup", a.k_lookup,
                                              recompute=True),
        "lookup_adaptive": lambda ids: _spec(g, ids, a.tokens, "prompt_lookup", a.k_lookup,
                                             adaptive=True),
    }
    if d is not None:
        every["draft"] = lambda ids: _spec(g, ids, a.tokens, "draft", a.k_draft, d)
        every["draft_adaptive"] = lambda ids: _spec(g, ids, a.tokens, "draft", a.k_draft, d,
                                                    adaptive=True)
    variants = [("plain", lambda ids: _plain(g, ids, a.tokens))]
    variants += [(v, every[v]) for v in a.variants.split(",") if v in every]
    meta = dict(git_sha=_git_sha(), device=g.device, cpu=platform.processor() or platform.machine(),
                model=a.model, draft=a.draft, dtype=g.dtype, batch=1, gen_len=a.tokens)
    for task in a.tasks.split(","):
        p = prompts[task]
        ids = g.tokenizer.encode(p).ids if isinstance(p, str) else p
        for _, fn in variants:
            fn(ids)  # warm-up
        # Variants interleaved within each repetition, so that load from elsewhere on the
        # machine hits all of them alike; the median of the repetitions is reported.
        tps = {name: [] for name, _ in variants}
        last = {}
        for _ in range(a.repeat):
            for name, fn in variants:
                toks, ms, stats = fn(ids)
                tps[name].append((len(toks) - 1) / (ms / 1e3))
                last[name] = (toks, stats)
        base_tps = statistics.median(tps["plain"])
        base_tokens = last["plain"][0]
        for name, _ in variants:
            toks, stats = last[name]
            tps_med = statistics.median(tps[name])
            row = dict(meta, task=task, variant=name, prompt_len=len(ids),
                       decode_tok_s=round(tps_med, 1),
                       speedup=round(tps_med / base_tps, 2),
                       identical=toks == base_tokens)
            if stats:
                row.update(acceptance=round(stats["accepted"] / max(1, stats["proposed"]), 3),
                           proposed=stats["proposed"], accepted=stats["accepted"],
                           tokens_per_pass=round(len(toks) / max(1, stats["verifications"]), 2),
                           guesses_per_pass=round(stats["proposed"] /
                                                  max(1, stats["verifications"]), 2),
                           rollback_over_verify=round(stats["rollback_ms"] /
                                                      max(1e-9, stats["verify_ms"]), 4),
                           propose_ms=round(stats["propose_ms"], 1),
                           verify_ms=round(stats["verify_ms"], 1))
            print(json.dumps(row), flush=True)
            if not row["identical"]:
                print(f"error: {task}/{name}: tokens differ from plain greedy", file=sys.stderr)
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

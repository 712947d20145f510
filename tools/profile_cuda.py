#!/usr/bin/env python3
"""Where mambart's GPU time goes: per-kernel totals of a decode run and of a prefill, at a real
model shape with random weights, captured with torch.profiler (CUPTI records every kernel of the
process, the ones mambart launches from C++ and from CUDA graph replays included).

    python tools/profile_cuda.py --model mamba-1.4b --dtype bfloat16 --prefill 8192 --decode 64
    python tools/profile_cuda.py --model mamba2-1.3b --prefill --decode 32 --batch 128 --per-step

Prints, for each phase, the kernels sorted by total time (calls, total ms, mean us, share) and
the phase's wall time, and writes them as JSON lines to --out. torch is needed on the GPU machine
for the profiler only; mambart itself does not use it.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import SHAPES, model_config, write_random_model  # noqa: E402


def short(name: str) -> str:
    """A kernel's demangled name without namespaces, argument lists and long template lists."""
    n = name.replace("(anonymous namespace)::", "").replace("mambart::cuda::", "")
    n = re.sub(r"^void ", "", n)
    n = re.sub(r"\((?:[^()]|\([^()]*\))*\)$", "", n)  # the trailing parameter list
    return n[:110] or name[:110]


def kernel_times(fn) -> tuple[dict, float]:
    """Runs fn under the profiler: ({kernel: [calls, total us]}, wall seconds)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
    rows = {}
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        k = short(ev.name)
        r = rows.setdefault(k, [0, 0.0])
        r[0] += 1
        r[1] += ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
    return rows, wall


def report(label: str, rows: dict, wall: float, out) -> None:
    total = sum(v[1] for v in rows.values())
    print(f"\n== {label}: wall {wall * 1e3:.2f} ms, kernels {total / 1e3:.2f} ms "
          f"({sum(v[0] for v in rows.values()):.6g} launches)")
    print(f"{'calls':>7} {'total ms':>9} {'mean us':>8} {'share':>6}  kernel")
    for k, (n, us) in sorted(rows.items(), key=lambda kv: -kv[1][1]):
        mean = f"{us / n:8.2f}" if n > 0 else f"{'-':>8}"  # per step: n may be 0 or fractional
        print(f"{n:7.4g} {us / 1e3:9.3f} {mean} {100 * us / max(total, 1e-9):5.1f}%  {k}")
        if out:
            out.write(json.dumps(dict(phase=label, kernel=k, calls=n, total_us=round(us, 2))) + "\n")
    if out:
        out.write(json.dumps(dict(phase=label, wall_ms=round(wall * 1e3, 3),
                                  kernel_ms=round(total / 1e3, 3))) + "\n")


def phase(label: str, fn, out) -> None:
    rows, wall = kernel_times(fn)
    report(label, rows, wall, out)


def per_step(label: str, short_fn, long_fn, steps: int, out) -> None:
    """One decode step's kernels: (a run of `steps` more tokens - the shorter run) / steps, so
    the prompt's prefill and the run's set-up cancel. Calls are averaged (may be fractional
    where the runs differ in set-up, e.g. one more graph launch)."""
    a, wa = kernel_times(short_fn)
    b, wb = kernel_times(long_fn)
    rows = {}
    for k in set(a) | set(b):
        n = (b.get(k, [0, 0.0])[0] - a.get(k, [0, 0.0])[0]) / steps
        us = (b.get(k, [0, 0.0])[1] - a.get(k, [0, 0.0])[1]) / steps
        if n > 0 or us > 0.5:
            rows[k] = [n, us]
    report(label, rows, (wb - wa) / steps, out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mamba-1.4b", choices=sorted(SHAPES))
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--prefill", type=int, nargs="*", default=[8192])
    ap.add_argument("--decode", type=int, default=64, help="tokens of the decode run (batch rows each)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-rows", type=int, nargs="*", default=[],
                    help="also profile a generate of 1 token for this many 16-token prompts "
                         "(the engine's short-prompt prefill group)")
    ap.add_argument("--per-step", action="store_true",
                    help="the decode phase as one step's kernels: a run of --decode more tokens "
                         "minus a run of 1 token, divided by --decode")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import mambart

    out = open(args.out, "a") if args.out else None
    path = Path(tempfile.mkdtemp(prefix="mambart-prof-")) / args.model
    write_random_model(path, model_config(args.model, "bfloat16"))
    g = mambart.Generator(str(path), device="cuda", dtype=args.dtype)
    print(f"# {args.model} {args.dtype} on {g.device}")
    rng = np.random.default_rng(0)
    prompts = [[int(t) for t in rng.integers(0, 50000, size=16)] for _ in range(args.batch)]
    p = prompts if args.batch > 1 else prompts[0]
    g.generate(p, max_new_tokens=8, ignore_eos=True)  # records the decode graph
    if args.per_step:
        per_step(f"decode b{args.batch}, one step (mean of {args.decode})",
                 lambda: g.generate(p, max_new_tokens=1, ignore_eos=True),
                 lambda: g.generate(p, max_new_tokens=1 + args.decode, ignore_eos=True),
                 args.decode, out)
    else:
        phase(f"decode b{args.batch} x {args.decode} tokens (+16-token prompt)",
              lambda: g.generate(p, max_new_tokens=args.decode, ignore_eos=True), out)
    for n in args.prompt_rows:
        rows = [[int(t) for t in rng.integers(0, 50000, size=16)] for _ in range(n)]
        g.generate(rows, max_new_tokens=1, ignore_eos=True)  # warm-up (workspaces)
        phase(f"prefill {n} rows x 16 tokens (generate 1 token)",
              lambda: g.generate(rows, max_new_tokens=1, ignore_eos=True), out)
    for L in args.prefill:
        ids = [int(t) for t in rng.integers(0, 50000, size=L)]
        g.prefill(ids)  # warm-up (workspaces)
        phase(f"prefill {L}", lambda: g.prefill(ids), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Long-run checks on a real model shape (random weights): issue 6's 1,000,000 generated tokens
and issue 7's 1,000,000-token prompt, with device and host memory measured, not assumed.

    python tools/soak.py --device cuda --model mamba-130m --dtypes bfloat16 float16 \
        --gen-tokens 1000000 --rows 8 --prompt-tokens 1000000 --check-tokens 20000

Generation: --rows sequences decode together until they have made --gen-tokens tokens in all
(sampled at temperature 1, a seed per row), in --segments calls that each continue the previous
call's states. The generator raises on a non-finite logit at any step, so a finished run had
none; the final states are checked finite too. Memory (device: cudaMemGetInfo through torch when
on CUDA; host: RSS) is read after the first token and after every segment.

Prompt: one prompt of --prompt-tokens random ids is prefilled (chunks of 512 tokens, the state
carried between them); its next-token logits must equal those of the same prompt prefilled in
two calls (the second continuing the first's state), and a --check-tokens prompt's logits on the
device are compared with the CPU backend's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import SHAPES, model_config, write_random_model  # noqa: E402


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def device_used_mib(device: str) -> float:
    if not device.startswith("cuda"):
        return float("nan")
    try:
        import torch

        free, total = torch.cuda.mem_get_info()
        return (total - free) / 2**20
    except Exception:
        return float("nan")


def next_logits(state) -> np.ndarray:
    return np.asarray(state._host_dict()["logits"], dtype=np.float32)


def emit(rec: dict) -> None:
    print(json.dumps(rec), flush=True)


def soak_generate(g, args, meta) -> None:
    """--rows rows sample until --gen-tokens tokens in all, in --segments calls that each continue
    the previous call's states (the RNG continues exactly); memory is read after every call, so
    the record shows whether it stays flat, and a progress line is printed per segment."""
    rng = np.random.default_rng(1)
    prompts = [[int(t) for t in rng.integers(0, 50000, size=16)] for _ in range(args.rows)]
    per_row = -(-args.gen_tokens // args.rows)  # rounded up: at least --gen-tokens in all
    seg = max(1, -(-per_row // args.segments))
    kw = dict(temperature=1.0, ignore_eos=True, return_state=True)
    res = g.generate(prompts, max_new_tokens=1, seed=list(range(args.rows)), **kw)
    made = sum(len(r.token_ids) for r in res)
    mem = [(made, round(device_used_mib(args.device), 1), round(rss_mib(), 1))]
    t = time.perf_counter()
    per_row_done = 1
    while per_row_done < per_row:
        n = min(seg, per_row - per_row_done)
        res = g.generate(None, state=[r.state for r in res], max_new_tokens=n, **kw)
        per_row_done += n
        made += sum(len(r.token_ids) for r in res)
        mem.append((made, round(device_used_mib(args.device), 1), round(rss_mib(), 1)))
        print(f"# {meta['dtype']}: {made} tokens, {time.perf_counter() - t:.1f} s, device "
              f"{mem[-1][1]} MiB, rss {mem[-1][2]} MiB", flush=True)
        if args.time_limit and time.perf_counter() - t > args.time_limit:
            break
    secs = time.perf_counter() - t
    finite = all(np.isfinite(r.state._host_dict()[k]).all() for r in res for k in ("conv", "ssm"))
    dev = [m[1] for m in mem]
    emit(dict(meta, check="generate", rows=args.rows, tokens=made, complete=made >= args.gen_tokens,
              seconds=round(secs, 1), tokens_per_s=round((made - mem[0][0]) / secs),
              states_finite=bool(finite), device_mib_after_first_token=dev[0],
              device_mib_after_each_segment=dev[1:], device_mib_max_minus_min=round(max(dev) - min(dev), 1),
              rss_mib_after_first_token=mem[0][2], rss_mib_after_all=mem[-1][2],
              rss_token_lists_mib=round(made * 28 / 2**20, 1)))


def soak_prompt(g, cpu, args, meta) -> None:
    rng = np.random.default_rng(2)
    ids = [int(t) for t in rng.integers(0, 50000, size=args.prompt_tokens)]
    g.prefill(ids[:2048])
    mem0 = device_used_mib(args.device)
    t = time.perf_counter()
    whole = g.prefill(ids)
    secs = time.perf_counter() - t
    mem1 = device_used_mib(args.device)
    half = len(ids) // 2
    split = g.prefill(ids[half:], state=g.prefill(ids[:half]))
    a, b = next_logits(whole), next_logits(split)
    rec = dict(meta, check="prompt", tokens=len(ids), seconds=round(secs, 2),
               tokens_per_s=round(len(ids) / secs), logits_finite=bool(np.isfinite(a).all()),
               split_vs_whole_max_abs=float(np.abs(a - b).max()),
               device_mib_after_2k=round(mem0, 1), device_mib_after_prompt=round(mem1, 1))
    if cpu is not None:
        short = ids[: args.check_tokens]
        d, c = next_logits(g.prefill(short)), next_logits(cpu.prefill(short))
        rec.update(check_tokens=len(short), device_vs_cpu_max_abs=float(np.abs(d - c).max()),
                   logit_scale=float(np.abs(c).max()))
    emit(rec)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--model", default="mamba-130m", choices=sorted(SHAPES))
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16"])
    ap.add_argument("--gen-tokens", type=int, default=1_000_000)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--segments", type=int, default=10,
                    help="generate in this many calls, each continuing the last one's states")
    ap.add_argument("--time-limit", type=float, default=0,
                    help="seconds: stop generating after the segment that passes it (0: none)")
    ap.add_argument("--prompt-tokens", type=int, default=1_000_000)
    ap.add_argument("--check-tokens", type=int, default=20_000,
                    help="prompt length compared against the CPU backend (0: skip)")
    args = ap.parse_args()

    import mambart

    work = Path(tempfile.mkdtemp(prefix="mambart-soak-"))
    for dt in args.dtypes:
        path = work / f"{args.model}-{dt}"
        write_random_model(path, model_config(args.model, dt))
        g = mambart.Generator(str(path), device=args.device)
        meta = dict(date=time.strftime("%Y-%m-%d"), model=args.model, dtype=dt, device=g.device)
        if args.gen_tokens > 0:
            soak_generate(g, args, meta)
        if args.prompt_tokens > 0:
            cpu = mambart.Generator(str(path), device="cpu") if args.check_tokens else None
            soak_prompt(g, cpu, args, meta)
        del g
    return 0


if __name__ == "__main__":
    sys.exit(main())

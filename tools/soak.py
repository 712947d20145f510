#!/usr/bin/env python3
"""Long-run checks on a real model shape (random weights): issue 6's 1,000,000 generated tokens
and issue 7's 1,000,000-token prompt, with device and host memory measured, not assumed.

    python tools/soak.py --device cuda --model mamba-130m --dtypes bfloat16 float16 \
        --gen-tokens 1000000 --rows 8 --prompt-tokens 1000000 --check-tokens 20000

Generation: --rows sequences decode together until they have made --gen-tokens tokens in all
(sampled at temperature 1, a seed per row). The generator raises on a non-finite logit
at any step, so a finished run had none; the final states are checked finite too. Memory
(device: cudaMemGetInfo through torch when on CUDA; host: RSS) is read after a 1,000-token run
and after the long one.

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
    rng = np.random.default_rng(1)
    prompts = [[int(t) for t in rng.integers(0, 50000, size=16)] for _ in range(args.rows)]
    per_row = args.gen_tokens // args.rows
    kw = dict(temperature=1.0, ignore_eos=True, seed=list(range(args.rows)))
    g.generate(prompts, max_new_tokens=min(1000, per_row), **kw)
    mem0, rss0 = device_used_mib(args.device), rss_mib()
    t = time.perf_counter()
    res = g.generate(prompts, max_new_tokens=per_row, return_state=True, **kw)
    secs = time.perf_counter() - t
    mem1, rss1 = device_used_mib(args.device), rss_mib()
    made = sum(len(r.token_ids) for r in res)
    finite = all(np.isfinite(r.state._host_dict()[k]).all() for r in res for k in ("conv", "ssm"))
    emit(dict(meta, check="generate", rows=args.rows, tokens=made, seconds=round(secs, 1),
              ms_per_step=round(secs / per_row * 1e3, 4), states_finite=bool(finite),
              device_mib_after_1k=round(mem0, 1), device_mib_after_all=round(mem1, 1),
              rss_mib_after_1k=round(rss0, 1), rss_mib_after_all=round(rss1, 1),
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

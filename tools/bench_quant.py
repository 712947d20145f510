#!/usr/bin/env python3
"""Quantized weights against bf16 in one process on one device (issue 18): batch-1 decode
ms/token and prefill time, random weights at a published shape, the models timed in turn rep by
rep (so that a shared machine's load falls on all alike).

    python tools/bench_quant.py --device cuda --model mamba-1.4b --prefill 8192 --out q.jsonl
    python tools/bench_quant.py --device cpu --model mamba-130m --threads 2 --prefill 256

Random weights (tests/model_dirs.py's scales) are written once in bfloat16 to --workdir (reused
when present), then converted with `mambart.convert(..., quantize=int8|int4)` (group 128, head
and embedding quantized). Decode: greedy, --gen new tokens after a 16-token prompt, ms per token
without the prefill; prefill: one prompt of --prefill tokens (prefill_ms of generate with one
new token). Each figure: the minimum and the median over --reps. Prints JSON lines and a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

SHAPES = {  # name: (arch, d_model, n_layer, extra fields); vocab 50280 (padded 50288), tied
    "mamba-130m": ("mamba1", 768, 24, {}), "mamba-370m": ("mamba1", 1024, 48, {}),
    "mamba-790m": ("mamba1", 1536, 48, {}), "mamba-1.4b": ("mamba1", 2048, 48, {}),
    "mamba-2.8b": ("mamba1", 2560, 64, {}),
    "mamba2-130m": ("mamba2", 768, 24, {}), "mamba2-1.3b": ("mamba2", 2048, 48, {}),
    "mamba2-2.7b": ("mamba2", 2560, 64, {}),
}


def build(model: str, out: Path) -> Path:
    from model_dirs import make_model_dir

    arch, d, n, extra = SHAPES[model]
    E = 2 * d
    kw = dict(d_model=d, n_layer=n, d_inner=E, vocab_size=50280, vocab_size_padded=50288)
    if arch == "mamba1":
        kw.update(d_state=16, dt_rank=-(-d // 16))
    else:
        kw.update(d_state=128, headdim=64, nheads=E // 64, ngroups=1, chunk_size=256)
    kw.update(extra)
    return make_model_dir(out, arch, dtype="bfloat16", **kw)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mamba-1.4b", choices=sorted(SHAPES))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--threads", type=int, default=None, help="CPU backend threads")
    ap.add_argument("--schemes", nargs="+", default=["bf16", "int8", "int4"])
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--prefill", type=int, nargs="*", default=[8192])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/mambart-bench-quant"))
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()

    import numpy as np

    import mambart
    from mambart.convert import convert

    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                         text=True).stdout.strip()
    base = a.workdir / f"{a.model}-bf16"
    if not (base / "config.json").exists():
        build(a.model, base)
    dirs = {}
    for s in a.schemes:
        d = base if s == "bf16" else a.workdir / f"{a.model}-{s}"
        if s != "bf16" and not (d / "config.json").exists():
            convert(base, d, quantize=s)
        dirs[s] = d
    gens = {s: mambart.Generator(str(d), device=a.device, threads=a.threads)
            for s, d in dirs.items()}
    rng = np.random.default_rng(0)
    prompt = [int(t) for t in rng.integers(1, 50000, size=16)]
    longs = {L: [int(t) for t in rng.integers(1, 50000, size=L)] for L in a.prefill}
    for g in gens.values():  # warm-up: graphs, cuBLAS, the dequant workspace
        g.generate(prompt, max_new_tokens=8, ignore_eos=True)
        for ids in longs.values():
            g.generate(ids, max_new_tokens=1, ignore_eos=True)
    dec = {s: [] for s in gens}
    pre = {(s, L): [] for s in gens for L in longs}
    for _ in range(a.reps):
        for s, g in gens.items():
            r = g.generate(prompt, max_new_tokens=a.gen, ignore_eos=True)
            dec[s].append(r.decode_ms / max(len(r.token_ids) - 1, 1))
            for L, ids in longs.items():
                pre[(s, L)].append(g.generate(ids, max_new_tokens=1, ignore_eos=True).prefill_ms)
    rows = []
    for s, g in gens.items():
        wb = (dirs[s] / "model.safetensors").stat().st_size
        row = {"git_sha": sha, "date": time.strftime("%Y-%m-%d"), "device": g.device,
               "model": a.model, "scheme": s, "weight_bytes": wb, "gen": a.gen, "reps": a.reps,
               "decode_ms_min": min(dec[s]), "decode_ms_median": statistics.median(dec[s])}
        for L in longs:
            row[f"prefill_{L}_ms_min"] = min(pre[(s, L)])
            row[f"prefill_{L}_ms_median"] = statistics.median(pre[(s, L)])
        rows.append(row)
        print(json.dumps(row), flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    b = rows[0]
    print(f"\n{a.model}, {rows[0]['device']}, commit {sha}, min (median) of {a.reps}\n")
    print("| scheme | weights GB | decode ms/token | vs " + b["scheme"] + " | " +
          " | ".join(f"prefill {L} ms" for L in longs) + " |")
    print("|---|---|---|---|" + "---|" * len(longs))
    for r in rows:
        pf = " | ".join(f"{r[f'prefill_{L}_ms_min']:.1f} ({r[f'prefill_{L}_ms_median']:.1f})"
                        for L in longs)
        print(f"| {r['scheme']} | {r['weight_bytes'] / 1e9:.3f} | {r['decode_ms_min']:.3f} "
              f"({r['decode_ms_median']:.3f}) | {b['decode_ms_min'] / r['decode_ms_min']:.2f}x | "
              f"{pf} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

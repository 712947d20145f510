#!/usr/bin/env python3
"""CPU benchmark: mambart vs transformers, side by side in one run, on random weights at a
published shape (default: mamba-130m).

Measures prefill tokens/s (one prompt of --prompt-len tokens) and decode ms/token (greedy,
--gen-len tokens after the prompt; the prefill is excluded), for transformers (fp32, torch
path) and for mambart in each --dtypes. Prints JSON lines and a markdown table.

    python tools/bench_cpu.py --model mamba-130m --prompt-len 256 --gen-len 32
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {
    # name: (arch, d_model, n_layer)  (vocab 50280/50288 padded, tied, published defaults)
    "mamba-130m": ("mamba", 768, 24),
    "mamba-370m": ("mamba", 1024, 48),
    "mamba2-130m": ("mamba2", 768, 24),
}


def git_sha() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"],
                                       cwd=Path(__file__).parent, text=True).strip()
    except Exception:
        return "unknown"


def build_hf(name: str, out: Path):
    import torch
    from transformers import Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

    arch, d, n = SHAPES[name]
    torch.manual_seed(0)
    if arch == "mamba":
        cfg = MambaConfig(vocab_size=50280, hidden_size=d, num_hidden_layers=n, state_size=16,
                          use_bias=False, tie_word_embeddings=True)
        model = MambaForCausalLM(cfg)
    else:
        cfg = Mamba2Config(vocab_size=50288, hidden_size=d, num_hidden_layers=n, state_size=128,
                           head_dim=64, num_heads=2 * d // 64, n_groups=1, chunk_size=256,
                           tie_word_embeddings=True)
        model = Mamba2ForCausalLM(cfg)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    return model


def time_hf(model, prompt, gen_len, reps):
    import torch

    ids = torch.tensor([prompt])
    with torch.no_grad():
        model(ids[:, :8])  # warm-up
        pre = []
        for _ in range(reps):
            t0 = time.perf_counter()
            model(ids)
            pre.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=gen_len, min_new_tokens=gen_len,
                             do_sample=False, pad_token_id=0)
        total = time.perf_counter() - t0
    n_new = out.shape[1] - ids.shape[1]
    prefill = statistics.median(pre)
    decode_ms = (total - prefill) / max(n_new - 1, 1) * 1e3
    return len(prompt) / prefill, decode_ms


def time_mambart(g, prompt, gen_len, reps):
    g.logits(prompt[:8])  # warm-up
    g.generate(prompt[:8], max_new_tokens=4, ignore_eos=True)
    pre, dec = [], []
    for _ in range(reps):
        r = g.generate(prompt, max_new_tokens=gen_len, ignore_eos=True)
        pre.append(r.prefill_ms)
        dec.append(r.decode_ms / max(len(r.token_ids) - 1, 1))
    return len(prompt) / (statistics.median(pre) / 1e3), statistics.median(dec)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mamba-130m", choices=sorted(SHAPES))
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--json", type=Path, help="append JSON lines here too")
    args = ap.parse_args()

    import numpy as np

    import mambart

    rng = np.random.default_rng(0)
    prompt = [int(t) for t in rng.integers(1, 50000, size=args.prompt_len)]
    env = {"git_sha": git_sha(), "cpu": platform.processor() or platform.machine(),
           "threads": os.cpu_count(), "model": args.model, "prompt_len": args.prompt_len,
           "gen_len": args.gen_len}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = Path(tmp) / "hf"
        model = build_hf(args.model, hf_dir)
        if not args.skip_transformers:
            import torch
            import transformers

            pf, dm = time_hf(model, prompt, args.gen_len, args.reps)
            rows.append(dict(env, engine=f"transformers {transformers.__version__} (torch "
                             f"{torch.__version__}, {torch.get_num_threads()} threads)",
                             dtype="float32", prefill_tok_s=pf, decode_ms=dm))
        del model
        for dt in args.dtypes.split(","):
            out = mambart.convert(hf_dir, Path(tmp) / f"mambart-{dt}", dtype=dt)
            g = mambart.Generator(out)
            pf, dm = time_mambart(g, prompt, args.gen_len, args.reps)
            rows.append(dict(env, engine=f"mambart {mambart.__version__} ({g.device})",
                             dtype=dt, prefill_tok_s=pf, decode_ms=dm))
            del g
    for r in rows:
        line = json.dumps(r)
        print(line)
        if args.json:
            with open(args.json, "a") as f:
                f.write(line + "\n")
    base = next((r for r in rows if r["engine"].startswith("transformers")), None)
    print(f"\n{args.model}, prompt {args.prompt_len} tokens, {args.gen_len} new tokens, "
          f"commit {env['git_sha']}\n")
    print("| engine | dtype | prefill tok/s | decode ms/token | prefill x | decode x |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        px = f"{r['prefill_tok_s'] / base['prefill_tok_s']:.1f}" if base else "-"
        dx = f"{base['decode_ms'] / r['decode_ms']:.1f}" if base else "-"
        print(f"| {r['engine']} | {r['dtype']} | {r['prefill_tok_s']:.1f} | "
              f"{r['decode_ms']:.2f} | {px} | {dx} |")


if __name__ == "__main__":
    sys.exit(main())

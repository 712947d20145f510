#!/usr/bin/env python3
"""Accuracy of quantized weights and of the state's precision (issue 18): bf16 against int8 and
int4 (`mambart convert --quantize`), each with the SSM state in float32 and in bfloat16 (the
option state_dtype: the `state` column), on the CPU backend; and the bytes of state per sequence
(stream) at the published shapes, float32 against bfloat16 state, from the runtime's state spec.

1. Trained models: the bundled demos (tools/train_demo.py: a Mamba-1, d_model 192, 6 layers, and
   a Mamba-2, d_model 256, 4 layers, trained on the standard library's source), held-out
   perplexity on files train_demo held out: through prefill (`score`, the GEMM kernels) over
   --texts files of --chars characters, and teacher-forced through the decode path (one-token
   steps on the state: the GEMV kernels) over --decode-texts files of 1500 characters.
2. Random weights at a real shape (--shape, default mamba-130m: d_model 768, 24 layers, vocab
   50280): the logits' error relative to bf16 (RMS error over the RMS of centred bf16 logits),
   the teacher-forced top-1 agreement over 256 positions, and the first position where free
   greedy decoding (256 tokens) leaves bf16's. Random weights give near-uniform, chaotic
   next-token distributions: these show the error's size, not a model's quality. The bf16 state
   (with bf16 weights) is measured the same way against the float32 state.
3. State bytes per sequence (--state-shapes): mamba-130m, mamba-1.4b, mamba2-1.3b.

    python tools/quant_accuracy.py --json out.jsonl

Prints JSON lines and a markdown table. Torch-free.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "tests"))

SHAPES = {"mamba-130m": dict(arch="mamba1", d_model=768, n_layer=24, d_inner=1536, d_state=16,
                             dt_rank=48),
          "mamba2-130m": dict(arch="mamba2", d_model=768, n_layer=24, d_inner=1536, d_state=128,
                              headdim=64, nheads=24)}
# The published shapes whose state per sequence is reported (vocab 50280, padded 50288).
STATE_SHAPES = {
    "mamba-130m": dict(SHAPES["mamba-130m"]),
    "mamba-1.4b": dict(arch="mamba1", d_model=2048, n_layer=48, d_inner=4096, d_state=16,
                       dt_rank=128),
    "mamba2-1.3b": dict(arch="mamba2", d_model=2048, n_layer=48, d_inner=4096, d_state=128,
                        headdim=64, nheads=64, ngroups=1, chunk_size=256),
}


def state_bytes(shape: dict, state_dtype: str) -> int:
    """Bytes of state one sequence takes at `shape` (the runtime's layout: State::row_bytes)."""
    from mambart import _C
    from model_dirs import config_dict

    sh = dict(shape)
    cfg = config_dict(sh.pop("arch"), vocab_size=50280, vocab_size_padded=50288, **sh)
    return int(_C.config_spec(json.dumps(cfg), "shape", state_dtype)["state_row_bytes"])


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def heldout(n: int, chars: int):
    import train_demo

    _, files = train_demo.stdlib_files()
    held = [p for rel, p in files if train_demo.held_out(rel) and p.stat().st_size > chars]
    return [p.read_text(encoding="utf-8", errors="replace")[:chars] for p in held[:n]]


def prefill_ppl(g, texts) -> float:
    tot, n = 0.0, 0
    for t in texts:
        sc = g.score(t)
        tot -= sc.sum
        n += len(sc.token_ids)
    return math.exp(tot / n)


def decode_ppl(g, texts) -> float:
    tot, n = 0.0, 0
    for t in texts:
        ids = g.tokenizer.encode(t).ids
        st = None
        for i in range(len(ids) - 1):
            r = g.generate([ids[i]], state=st, max_new_tokens=1, ignore_eos=True,
                           logprobs=g.vocab_size)
            tot -= dict(r.logprobs[0].top)[ids[i + 1]]
            n += 1
            st = g.generate([ids[i]], state=st, max_new_tokens=0, return_state=True).state
    return math.exp(tot / n)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--texts", type=int, default=32)
    ap.add_argument("--chars", type=int, default=4000)
    ap.add_argument("--decode-texts", type=int, default=4)
    ap.add_argument("--shape", default="mamba-130m", choices=sorted(SHAPES) + ["none"])
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--state-dtypes", default="float32,bfloat16",
                    help="SSM state dtypes to run each scheme with (option state_dtype)")
    ap.add_argument("--schemes", default="bf16,int8,int4")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()

    import mambart
    from mambart import _C, hub
    from mambart.convert import convert

    env = {"git_sha": git_sha(), "date": time.strftime("%Y-%m-%d"),
           "quant_kernels": _C._ops.linear_quant_kernels(), "group_size": a.group_size}
    states = a.state_dtypes.split(",")
    rows = []
    for name, shape in STATE_SHAPES.items():
        r = dict(env, model=name, state_bytes={sd: state_bytes(shape, sd)
                                              for sd in ("float32", "bfloat16")})
        rows.append(r)
        print(json.dumps(r), flush=True)
    texts = heldout(a.texts, a.chars)
    dtexts = heldout(a.decode_texts, 1500)
    with tempfile.TemporaryDirectory() as tmp:
        for demo in ("mambart-demo", "mambart2-demo"):
            src = hub.bundled_model_dir(demo)
            base = None  # bf16 weights, float32 state
            for scheme in a.schemes.split(","):
                d = src if scheme == "bf16" else convert(
                    src, Path(tmp) / f"{demo}-{scheme}", quantize=scheme,
                    int4_group_size=a.group_size)
                for sd in states:
                    g = mambart.Generator(d, threads=a.threads, state_dtype=sd)
                    r = dict(env, model=demo, scheme=scheme, state=sd,
                             prefill_ppl=prefill_ppl(g, texts), decode_ppl=decode_ppl(g, dtexts),
                             texts=len(texts), chars=a.chars, decode_texts=len(dtexts),
                             weight_bytes=(Path(d) / "model.safetensors").stat().st_size)
                    base = base or r
                    r["prefill_vs_bf16"] = r["prefill_ppl"] / base["prefill_ppl"] - 1
                    r["decode_vs_bf16"] = r["decode_ppl"] / base["decode_ppl"] - 1
                    rows.append(r)
                    print(json.dumps(r), flush=True)
        if a.shape != "none":
            from model_dirs import make_model_dir

            sh = dict(SHAPES[a.shape])
            arch = sh.pop("arch")
            src = make_model_dir(Path(tmp) / a.shape, arch, dtype="bfloat16", vocab_size=50280,
                                 vocab_size_padded=50288, **sh)
            rng = np.random.default_rng(0)
            prompt = [int(t) for t in rng.integers(1, 50000, size=16)]
            gb = mambart.Generator(src, threads=a.threads)
            free_b = list(gb.generate(prompt, max_new_tokens=256, ignore_eos=True).token_ids)
            seq = prompt + free_b
            lb = gb.logits(seq)[len(prompt) - 1:-1].astype(np.float64)
            cen = np.sqrt(((lb - lb.mean(1, keepdims=True)) ** 2).mean())
            for scheme in [x for x in a.schemes.split(",") if x != "bf16"] + ["bf16 state"]:
                if scheme == "bf16 state":  # bf16 weights, the SSM state in bf16
                    g = mambart.Generator(src, threads=a.threads, state_dtype="bfloat16")
                else:
                    d = convert(src, Path(tmp) / f"{a.shape}-{scheme}", quantize=scheme,
                                int4_group_size=a.group_size)
                    g = mambart.Generator(d, threads=a.threads)
                lq = g.logits(seq)[len(prompt) - 1:-1].astype(np.float64)
                free = list(g.generate(prompt, max_new_tokens=256, ignore_eos=True).token_ids)
                first = next((i for i, (x, y) in enumerate(zip(free_b, free)) if x != y), 256)
                r = dict(env, model=f"{a.shape} (random weights)", scheme=scheme,
                         logit_rel_rms_err=float(np.sqrt(((lq - lb) ** 2).mean()) / cen),
                         logit_max_abs_err=float(np.abs(lq - lb).max()),
                         top1_agreement=float(np.mean(lq.argmax(1) == lb.argmax(1))),
                         greedy_first_divergence=first, positions=len(free_b))
                rows.append(r)
                print(json.dumps(r), flush=True)
    if a.json:
        with open(a.json, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    print(f"\ncommit {env['git_sha']}, {env['date']}, CPU quantized GEMV kernels "
          f"{env['quant_kernels']}, int4 group {a.group_size}\n")
    print("| shape | state per sequence, float32 state | bfloat16 state | ratio |")
    print("|---|---|---|---|")
    for r in rows:
        if "state_bytes" in r:
            f32, b16 = r["state_bytes"]["float32"], r["state_bytes"]["bfloat16"]
            print(f"| {r['model']} | {f32:,} B ({f32 / 1e6:.2f} MB) | {b16:,} B "
                  f"({b16 / 1e6:.2f} MB) | {b16 / f32:.3f} |")
    print("\n| model | scheme | state | weights MB | held-out ppl (prefill) | vs bf16 / fp32 state "
          "| held-out ppl (decode path) | vs bf16 / fp32 state |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "prefill_ppl" in r:
            print(f"| {r['model']} | {r['scheme']} | {r['state']} | "
                  f"{r['weight_bytes'] / 1e6:.2f} | "
                  f"{r['prefill_ppl']:.3f} | {100 * r['prefill_vs_bf16']:+.3f}% | "
                  f"{r['decode_ppl']:.3f} | {100 * r['decode_vs_bf16']:+.3f}% |")
    if any("top1_agreement" in r for r in rows):
        print("\n| model | scheme | logit RMS error / RMS logit | max abs logit error | "
              "top-1 agreement (teacher-forced, 256) | greedy: first divergence (of 256) |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            if "top1_agreement" in r:
                print(f"| {r['model']} | {r['scheme']} | {r['logit_rel_rms_err']:.4f} | "
                      f"{r['logit_max_abs_err']:.3f} | {100 * r['top1_agreement']:.1f}% | "
                      f"{r['greedy_first_divergence']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

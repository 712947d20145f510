"""Hybrids on the GPU (issue 19): mambart's Nemotron-H at a real shape with random weights --
batch-1 decode at a long context against the bandwidth bound of the bytes a step reads (weights
+ KV caches + recurrent states), prefill of a long prompt, batched decode -- and, when torch with
CUDA and transformers are importable, the prefill of transformers' NemotronHForCausalLM at the
same shape (its own random initialisation: a speed comparison only).
JSON lines out (printed and appended to --out).

Run (on the GPU machine):

    python tools/bench_hybrid.py --models nemotron-h-8b --out hybrid.jsonl
    python tools/bench_hybrid.py --models nemotron-h-8b --engines mambart transformers \
        --context 4096 --prefill 8192 --out hybrid.jsonl

CPU smoke run (what tests/test_bench_tool.py runs):

    python tools/bench_hybrid.py --device cpu --models tiny-h --context 64 --prefill 32 \
        --batches 1 2 --gen 4 --repeats 1 --engines mambart

Shapes (SHAPES below). nemotron-h-8b follows the spec (../shared/spec/hybrids.md §4, third-party
quotes of the hub config): d 4096, the 52-block pattern with attention at 7, 18, 29, 40, Mamba-2
with 128 heads of 64, d_state 128, 8 groups, attention 32 q / 8 kv heads of 128 (NoPE), vocab
131072, untied; the MLP width 21504 is ASSUMED (not in the spec). Each record carries its shape.

Weights: random N(0, 1/fan_in) matrices (a repeated random block, the values do not matter for
speed), norms near 1, dt_bias and A_log in their usual ranges; written in mambart's format in
--dtype (default bfloat16) under --work (kept between runs: delete it to rebuild).

Metrics (median of --repeats after a warm-up):
- decode_ms_per_token (batch 1, after a --context token prompt, --gen tokens): with gb_s = bytes
  a step reads / step time, where bytes = weights + the attention layers' KV caches up to the
  context (fp32: 2 x context x Hkv x hd x 4 per layer) + the Mamba states (read and written), and
  pct_peak against --peak-gbs (default 3350, an H100 SXM's HBM3);
- decode_tokens_per_s at each --batches size > 1;
- prefill_ms and prefill_tokens_per_s at each --prefill length.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from model_dirs import encode, write_safetensors  # noqa: E402

SHAPES = {
    "nemotron-h-8b": dict(d=4096, pattern="M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-",
                          H=128, P=64, N=128, G=8, W=4, chunk=128, Hq=32, Hkv=8, hd=128,
                          I=21504, V=131072),
    "tiny-h": dict(d=64, pattern="M-*M-*M", H=8, P=16, N=32, G=2, W=4, chunk=16, Hq=4, Hkv=2,
                   hd=16, I=96, V=300),
}


def config(s: dict, dtype: str, max_context: int) -> dict:
    E = s["H"] * s["P"]
    m2 = {"type": "mamba2", "d_inner": E, "d_state": s["N"], "d_conv": s["W"], "conv_bias": True,
          "bias": False, "headdim": s["P"], "nheads": s["H"], "ngroups": s["G"],
          "chunk_size": s["chunk"], "dt_limit": [0.0, None], "gated_norm": True,
          "norm_before_gate": False}
    att = {"type": "attention", "num_heads": s["Hq"], "num_kv_heads": s["Hkv"],
           "head_dim": s["hd"], "rotary_dim": 0, "rope_theta": 10000.0, "window": 0,
           "qkv_bias": False, "out_bias": False, "scale": s["hd"] ** -0.5,
           "max_context": max_context, "fused_qkv": False, "d_conv": 0}
    mlp = {"type": "mlp", "intermediate_size": s["I"], "activation": "relu2", "bias": False}
    layers = [{"M": m2, "*": att, "-": mlp}[ch] for ch in s["pattern"]]
    return {"mambart_format": 1, "architecture": "nemotron_h", "d_model": s["d"],
            "n_layer": len(layers), "vocab_size": s["V"], "vocab_size_padded": s["V"],
            "norm": "rmsnorm", "norm_eps": 1e-5, "residual_in_fp32": True,
            "tie_embeddings": False, "bos_token_id": None, "eos_token_id": None,
            "pad_token_id": None, "dtype": dtype, "layers": layers}


def write_model(path: Path, c: dict, seed: int = 0) -> None:
    from mambart import _C

    spec = _C.config_spec(json.dumps(c), "bench")
    rng = np.random.default_rng(seed)
    block = rng.standard_normal(1 << 20).astype(np.float32)
    entries = {}
    for t in spec["tensors"]:
        name, shape = t["name"], tuple(t["shape"])
        n = int(np.prod(shape))
        if name.endswith("A_log"):
            v = np.log(rng.uniform(1, 16, size=shape))
        elif name.endswith("dt_bias"):
            dt = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), size=shape))
            v = dt + np.log(-np.expm1(-dt))
        elif name.endswith(".D"):
            v = np.ones(shape)
        elif "norm" in name:
            v = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name.endswith(".bias"):
            v = 0.02 * rng.standard_normal(shape)
        else:
            v = np.resize(block, n).reshape(shape) / np.sqrt(max(shape[-1], 1))
        dt_out = "float32" if t["store_fp32"] else c["dtype"]
        entries[name] = encode(np.asarray(v, np.float32), dt_out)
    path.mkdir(parents=True, exist_ok=True)
    write_safetensors(path / "model.safetensors", entries)
    (path / "config.json").write_text(json.dumps(c, indent=1))


def step_bytes(c: dict, weight_bytes: int, context: int) -> int:
    """Bytes a batch-1 decode step at `context` reads: weights, KV caches, Mamba states (x2)."""
    kv = state = 0
    for e in c["layers"]:
        if e["type"] == "attention":
            kv += 2 * context * e["num_kv_heads"] * e["head_dim"] * 4
        elif e["type"] == "mamba2":
            conv = (e["d_inner"] + 2 * e["ngroups"] * e["d_state"]) * e["d_conv"]
            state += 2 * 4 * (conv + e["nheads"] * e["headdim"] * e["d_state"])
    return weight_bytes + kv + state


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, text=True,
                              capture_output=True).stdout.strip()
    except OSError:
        return ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["nemotron-h-8b"], choices=list(SHAPES))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--engines", nargs="+", default=["mambart"],
                    choices=["mambart", "transformers"])
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--prefill", type=int, nargs="+", default=[8192])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--peak-gbs", type=float, default=3350.0)
    ap.add_argument("--work", default="build/bench_hybrid")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    import mambart

    base = dict(git_sha=git_sha(), device=a.device, dtype=a.dtype, host=platform.node(),
                date=time.strftime("%Y-%m-%d %H:%M:%S"))
    out = open(a.out, "a") if a.out else None

    def emit(**rec):
        rec = {**base, **rec}
        line = json.dumps(rec)
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()

    rng = np.random.default_rng(1)
    for name in a.models:
        s = SHAPES[name]
        ctx = max(a.context + a.gen, max(a.prefill) + 1)
        c = config(s, a.dtype, ctx)
        d = Path(a.work) / f"{name}-{a.dtype}-{ctx}"
        if not (d / "model.safetensors").exists():
            write_model(d, c)
        shape = dict(model=name, pattern=s["pattern"], d_model=s["d"], mlp_width=s["I"])
        if "mambart" in a.engines:
            g = mambart.Generator(str(d), device=a.device)
            wbytes = os.path.getsize(d / "model.safetensors")
            ids = lambda n: [int(t) for t in rng.integers(0, s["V"], size=n)]
            g.generate(ids(16), max_new_tokens=4, ignore_eos=True)  # warm-up
            per_tok = []
            for _ in range(a.repeats):
                r = g.generate(ids(a.context), max_new_tokens=a.gen, ignore_eos=True)
                per_tok.append(r.decode_ms / max(a.gen - 1, 1))
            ms = statistics.median(per_tok)
            nb = step_bytes(c, wbytes, a.context)
            gbs = nb / (ms / 1e3) / 1e9
            emit(engine="mambart", metric="decode_ms_per_token", batch=1, context=a.context,
                 gen=a.gen, value=ms, step_bytes=nb, gb_s=gbs, pct_peak=100 * gbs / a.peak_gbs,
                 **shape)
            for B in [b for b in a.batches if b > 1]:
                tps = []
                for _ in range(a.repeats):
                    rows = g.generate([ids(a.context) for _ in range(B)], max_new_tokens=a.gen,
                                      ignore_eos=True)
                    dec = max(r.decode_ms for r in rows) / 1e3
                    tps.append(B * (a.gen - 1) / dec if dec > 0 else 0.0)
                emit(engine="mambart", metric="decode_tokens_per_s", batch=B, context=a.context,
                     gen=a.gen, value=statistics.median(tps), **shape)
            for L in a.prefill:
                pm = statistics.median(
                    g.generate(ids(L), max_new_tokens=1, ignore_eos=True).prefill_ms
                    for _ in range(a.repeats))
                emit(engine="mambart", metric="prefill_ms", prompt_len=L, value=pm,
                     prefill_tokens_per_s=L / (pm / 1e3), **shape)
            del g
        if "transformers" in a.engines:
            try:
                import torch
                from transformers import NemotronHConfig, NemotronHForCausalLM
                if a.device.startswith("cuda") and not torch.cuda.is_available():
                    raise ImportError("torch without CUDA")
            except ImportError as e:
                emit(engine="transformers", metric="missing", value=f"needs torch/transformers: "
                     f"{e}", **shape)
                continue
            tdt = {"bfloat16": torch.bfloat16, "float16": torch.float16,
                   "float32": torch.float32}[a.dtype]
            hc = NemotronHConfig(vocab_size=s["V"], hidden_size=s["d"],
                                 hybrid_override_pattern=s["pattern"],
                                 num_attention_heads=s["Hq"], num_key_value_heads=s["Hkv"],
                                 head_dim=s["hd"], mamba_num_heads=s["H"],
                                 mamba_head_dim=s["P"], ssm_state_size=s["N"], n_groups=s["G"],
                                 conv_kernel=s["W"], chunk_size=s["chunk"],
                                 intermediate_size=s["I"], tie_word_embeddings=False)
            with torch.device(a.device):
                m = NemotronHForCausalLM(hc).to(tdt).eval()
            dev = torch.device(a.device)
            sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
            for L in a.prefill:
                x = torch.tensor([[int(t) for t in rng.integers(0, s["V"], size=L)]], device=dev)
                times = []
                with torch.no_grad():
                    m(x, logits_to_keep=1)
                    for _ in range(a.repeats):
                        sync()
                        t0 = time.perf_counter()
                        m(x, logits_to_keep=1)
                        sync()
                        times.append((time.perf_counter() - t0) * 1e3)
                pm = statistics.median(times)
                emit(engine="transformers", metric="prefill_ms", prompt_len=L, value=pm,
                     prefill_tokens_per_s=L / (pm / 1e3), **shape)
            del m
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""First GPU benchmark: mambart's decode and prefill at real model shapes with random weights,
transformers (torch path) side by side when importable. JSON lines on stdout (and --out), plus
a markdown table.

    python tools/bench.py --models mamba-1.4b mamba2-1.3b --dtype bfloat16 --out bench.jsonl

Decode: ms per token at batch 1 (median of --repeats runs of --gen tokens after a warm-up run
that also records the CUDA graph), tokens/s at larger batches. Prefill: one prompt of each
length, median of --repeats after a warm-up. GB/s = weight bytes streamed per decode step /
step time. Peak memory: device memory in use (cudaMemGetInfo through torch) after the runs,
minus before loading.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from model_dirs import ST_DTYPE, _SMALL, config_dict, tensor_shapes, write_config, write_safetensors  # noqa: E402

SHAPES = {
    "mamba-130m": dict(arch="mamba1", d_model=768, n_layer=24, d_state=16, dt_rank=48),
    "mamba-1.4b": dict(arch="mamba1", d_model=2048, n_layer=48, d_state=16, dt_rank=128),
    "mamba-2.8b": dict(arch="mamba1", d_model=2560, n_layer=64, d_state=16, dt_rank=160),
    "mamba2-130m": dict(arch="mamba2", d_model=768, n_layer=24, d_state=128),
    "mamba2-1.3b": dict(arch="mamba2", d_model=2048, n_layer=48, d_state=128),
    "mamba2-2.7b": dict(arch="mamba2", d_model=2560, n_layer=64, d_state=128),
}


def model_config(name: str, dtype: str) -> dict:
    s = dict(SHAPES[name])
    arch = s.pop("arch")
    d = s["d_model"]
    c = dict(d_model=d, n_layer=s["n_layer"], vocab_size=50280, vocab_size_padded=50288,
             d_inner=2 * d, d_state=s["d_state"], d_conv=4, tie_embeddings=True, dtype=dtype)
    if arch == "mamba1":
        c.update(dt_rank=s["dt_rank"])
    else:
        c.update(headdim=64, nheads=2 * d // 64, ngroups=1, chunk_size=256, gated_norm=True,
                 dt_rank=0)
    return config_dict(arch, **c)


def write_random_model(path: Path, c: dict, seed: int = 0) -> int:
    """Random weights of sensible scale, streamed into model.safetensors. Returns #params."""
    path.mkdir(parents=True, exist_ok=True)
    write_config(path, c)
    rng = np.random.default_rng(seed)
    entries, nparams = {}, 0
    dt = c["dtype"]
    for name, shape in tensor_shapes(c).items():
        n = int(np.prod(shape))
        nparams += n
        if name.endswith("A_log"):
            a = np.log(rng.uniform(1, 16, size=shape)).astype(np.float32)
        elif name.endswith(("D",)) or "norm" in name:
            a = np.ones(shape, np.float32)
        elif name.endswith(("dt_bias", "dt_proj.bias")):
            a = np.log(np.expm1(rng.uniform(0.001, 0.1, size=shape))).astype(np.float32)
        else:
            fan_in = shape[-1] if len(shape) > 1 else 1
            a = (rng.standard_normal(size=shape, dtype=np.float32) * (fan_in ** -0.5)).astype(np.float32)
        small = any(name.endswith(s) for s in _SMALL)
        if small or dt == "float32":
            entries[name] = ("F32", tuple(shape), a.tobytes())
        elif dt == "float16":
            entries[name] = ("F16", tuple(shape), a.astype(np.float16).tobytes())
        else:
            u = a.view(np.uint32)
            entries[name] = ("BF16", tuple(shape), ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16).tobytes())
    write_safetensors(path / "model.safetensors", entries)
    return nparams


def mem_used() -> int:
    import torch

    free, total = torch.cuda.mem_get_info()
    return total - free


def emit(rec: dict, out) -> None:
    line = json.dumps(rec)
    print(line, flush=True)
    if out:
        out.write(line + "\n")
        out.flush()


def bench_mambart(name, path, c, nparams, args, out, meta):
    import mambart

    base = mem_used()
    t0 = time.perf_counter()
    g = mambart.Generator(str(path), device="cuda", dtype=args.dtype)
    load_s = time.perf_counter() - t0
    rec = dict(meta, engine="mambart", model=name, dtype=args.dtype)
    emit(dict(rec, metric="load_s", value=round(load_s, 3)), out)
    weight_bytes = nparams * (4 if args.dtype == "float32" else 2)
    rng = np.random.default_rng(0)
    for B in args.batches:
        prompts = [[int(t) for t in rng.integers(0, 50000, size=16)] for _ in range(B)]
        g.generate(prompts if B > 1 else prompts[0], max_new_tokens=8, ignore_eos=True)  # warm-up + graph
        per_tok = []
        for _ in range(args.repeats):
            res = g.generate(prompts if B > 1 else prompts[0], max_new_tokens=args.gen, ignore_eos=True)
            r0 = res[0] if B > 1 else res
            per_tok.append(r0.decode_ms / (len(r0.token_ids) - 1))
        ms = statistics.median(per_tok)
        if B == 1:
            emit(dict(rec, batch=1, metric="decode_ms_per_token", value=round(ms, 4),
                      gb_s=round(weight_bytes / (ms * 1e-3) / 1e9, 1)), out)
        else:
            emit(dict(rec, batch=B, metric="decode_tokens_per_s", value=round(B / (ms * 1e-3), 1),
                      ms_per_step=round(ms, 4)), out)
    for L in args.prefill:
        ids = [int(t) for t in rng.integers(0, 50000, size=L)]
        g.generate(ids, max_new_tokens=1, ignore_eos=True)
        times = []
        for _ in range(args.repeats):
            res = g.generate(ids, max_new_tokens=1, ignore_eos=True)
            times.append(res.prefill_ms)
        ms = statistics.median(times)
        emit(dict(rec, prompt_len=L, metric="prefill_ms", value=round(ms, 3),
                  tokens_per_s=round(L / (ms * 1e-3)), tflops=round(2 * nparams * L / (ms * 1e-3) / 1e12, 1)), out)
    emit(dict(rec, metric="device_mem_gib", value=round((mem_used() - base) / 2**30, 3)), out)
    del g


def bench_transformers(name, c, args, out, meta):
    try:
        import torch
        import transformers
        from transformers import Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM
    except ImportError as e:
        emit(dict(meta, engine="transformers", model=name, metric="missing", value=str(e)), out)
        return
    tdt = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[args.dtype]
    if c["architecture"] == "mamba1":
        cfg = MambaConfig(vocab_size=c["vocab_size_padded"], hidden_size=c["d_model"],
                          state_size=c["d_state"], num_hidden_layers=c["n_layer"], expand=2,
                          conv_kernel=4, time_step_rank=c["dt_rank"], tie_word_embeddings=True)
        cls = MambaForCausalLM
    else:
        cfg = Mamba2Config(vocab_size=c["vocab_size_padded"], hidden_size=c["d_model"],
                           state_size=c["d_state"], num_hidden_layers=c["n_layer"], expand=2,
                           head_dim=64, num_heads=c["nheads"], n_groups=1, chunk_size=256,
                           conv_kernel=4, tie_word_embeddings=True)
        cls = Mamba2ForCausalLM
    with torch.device("cuda"):
        model = cls(cfg).to(tdt).eval()
    rec = dict(meta, engine=f"transformers {transformers.__version__} (torch path)", model=name,
               dtype=args.dtype)
    ids = torch.randint(0, 50000, (1, 16), device="cuda")

    def gen(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=0, eos_token_id=None)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    gen(2)
    n = args.hf_gen
    dt = gen(n + 1) - gen(1)
    emit(dict(rec, batch=1, metric="decode_ms_per_token", value=round(dt / n * 1e3, 3)), out)
    for L in [x for x in args.prefill if x <= args.hf_max_prefill]:
        x = torch.randint(0, 50000, (1, L), device="cuda")
        with torch.no_grad():
            model(x)
            torch.cuda.synchronize()
            t = time.perf_counter()
            model(x)
            torch.cuda.synchronize()
        emit(dict(rec, prompt_len=L, metric="prefill_ms", value=round((time.perf_counter() - t) * 1e3, 3)), out)
    del model
    torch.cuda.empty_cache()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["mamba-1.4b", "mamba2-1.3b"], choices=list(SHAPES))
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--prefill", nargs="+", type=int, default=[512, 2048, 8192])
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hf-gen", type=int, default=16)
    ap.add_argument("--hf-max-prefill", type=int, default=2048)
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = open(args.out, "a") if args.out else None
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        sha = ""
    import torch

    meta = dict(date=time.strftime("%Y-%m-%d"), gpu=torch.cuda.get_device_name(0), git=sha or None)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="mambart-bench-"))
    for name in args.models:
        c = model_config(name, args.dtype)
        path = work / name
        t = time.perf_counter()
        nparams = write_random_model(path, c)
        emit(dict(meta, model=name, metric="params", value=nparams,
                  write_s=round(time.perf_counter() - t, 1)), out)
        bench_mambart(name, path, c, nparams, args, out, meta)
        if not args.no_transformers:
            bench_transformers(name, c, args, out, meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""CPU benchmark: mambart vs transformers and llama.cpp, side by side in one run, on random
weights at a published shape (default: mamba-130m).

Measures prefill tokens/s (one prompt of --prompt-len tokens) and decode ms/token (greedy,
--gen-len tokens after the prompt; the prefill is excluded), for transformers (fp32, torch
path), for mambart in each --dtypes and at each --threads, and with --llama-cpp for llama.cpp's
own `llama-bench` on GGUF files made by llama.cpp's own convert_hf_to_gguf.py from the same
random checkpoint (same dtypes, same threads). Each figure is the median of --reps runs.

  --bandwidth   the read-bandwidth probe (mambart._C._ops.read_bandwidth: a buffer larger than
                the caches summed on the CPU backend's pool) at each thread count, and each
                decode figure as a fraction of it (weight bytes read per token / probe)
  --load        a competing busy process (a Python busy loop) pinned to one core for the whole
                run: a shared machine's worst case for thread synchronisation
  --llama-cpp   llama.cpp as an engine: llama-bench from PATH or $LLAMA_CPP_DIR/build/bin, and
                $LLAMA_CPP_DIR/convert_hf_to_gguf.py (LLAMA_CPP_DIR: a llama.cpp source tree)

  --dtypes      float32, float16, bfloat16, and int8 / int4: bf16 models quantized by
                `mambart convert --quantize` (issue 18; llama.cpp is not run for these)
  --stat        median (default) or min: best-of---reps, for a machine shared with other work
  --interleave  mambart only: every --dtypes model loaded at once and timed in turn, rep by rep
                (a shared machine's load then falls on all of them alike)

    python tools/bench_cpu.py --model mamba-130m --prompt-len 256 --gen-len 32
    python tools/bench_cpu.py --skip-transformers --threads 2 --dtypes bfloat16,int8,int4 \
        --reps 7 --stat min
    LLAMA_CPP_DIR=~/llama.cpp python tools/bench_cpu.py --model mamba2-130m --threads 1,2 \
        --llama-cpp --bandwidth --skip-transformers
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
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
    "mamba-1.4b": ("mamba", 2048, 48),
    "mamba2-1.3b": ("mamba2", 2048, 48),
}
GGUF_TYPES = {"bfloat16": "bf16", "float32": "f32", "float16": "f16"}


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


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@contextlib.contextmanager
def busy_core(on: bool):
    """A Python busy loop pinned to the last core this process may run on, for the block."""
    if not on:
        yield None
        return
    core = max(os.sched_getaffinity(0))
    p = subprocess.Popen([sys.executable, "-c",
                          f"import os; os.sched_setaffinity(0, {{{core}}})\nwhile True: pass"])
    time.sleep(0.5)
    try:
        yield core
    finally:
        p.kill()
        p.wait()


def read_bandwidth(threads: int, reps: int) -> float:
    """Median bytes/s of the read probe (512 MiB buffer) on a pool of `threads`."""
    from mambart import _C

    return statistics.median(_C._ops.read_bandwidth(512 << 20, threads, max(5, reps)))


def weight_bytes(model_dir: Path) -> int:
    """Bytes of weights a decode step reads: every weight once (the embedding table is the
    tied head), so the size of the weight files."""
    return sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))


def find_llama_bench() -> Path:
    exe = shutil.which("llama-bench")
    d = os.environ.get("LLAMA_CPP_DIR")
    if not exe and d:
        for c in ("build/bin/llama-bench", "bin/llama-bench"):
            if (Path(d) / c).is_file():
                exe = str(Path(d) / c)
                break
    if not exe:
        raise SystemExit("--llama-cpp: no llama-bench on PATH or under $LLAMA_CPP_DIR/build/bin")
    return Path(exe)


def make_gguf(hf_dir: Path, dtype: str, out: Path) -> Path:
    d = os.environ.get("LLAMA_CPP_DIR")
    conv = Path(d) / "convert_hf_to_gguf.py" if d else None
    if not conv or not conv.is_file():
        raise SystemExit("--llama-cpp: set LLAMA_CPP_DIR to a llama.cpp source tree (its "
                         "convert_hf_to_gguf.py makes the GGUF files)")
    if not out.exists():
        subprocess.run([sys.executable, str(conv), str(hf_dir), "--outtype", GGUF_TYPES[dtype],
                        "--outfile", str(out)], check=True, capture_output=True)
    return out


def time_llama(exe: Path, gguf: Path, prompt_len, gen_len, threads, reps):
    """llama-bench's pp (prompt) and tg (generation) tests: (prefill tok/s, decode ms/token,
    build commit)."""
    r = subprocess.run([str(exe), "-m", str(gguf), "-p", str(prompt_len), "-n", str(gen_len),
                        "-t", str(threads), "-r", str(reps), "-o", "json"],
                       capture_output=True, text=True, check=True)
    res = json.loads(r.stdout)
    pp = next(x for x in res if x["n_prompt"] > 0 and x["n_gen"] == 0)
    tg = next(x for x in res if x["n_gen"] > 0 and x["n_prompt"] == 0)
    # llama-bench reports the mean over repetitions; its samples give the median
    pre = statistics.median(pp.get("samples_ts") or [pp["avg_ts"]])
    dec = statistics.median(tg.get("samples_ts") or [tg["avg_ts"]])
    return pre, 1e3 / dec, f"{pp.get('build_commit', '?')} (build {pp.get('build_number', '?')})"


STAT = statistics.median


def time_mambart(g, prompt, gen_len, reps):
    g.logits(prompt[:8])  # warm-up
    g.generate(prompt[:8], max_new_tokens=4, ignore_eos=True)
    pre, dec = [], []
    for _ in range(reps):
        r = g.generate(prompt, max_new_tokens=gen_len, ignore_eos=True)
        pre.append(r.prefill_ms)
        dec.append(r.decode_ms / max(len(r.token_ids) - 1, 1))
    return len(prompt) / (STAT(pre) / 1e3), STAT(dec)


def interleaved(args, work, hf_dir, prompt, threads, bw, env):
    """Every --dtypes model on the CPU, timed one generate each in turn per rep."""
    import mambart

    rows = []
    for t in threads:
        gens = {}
        for dt in args.dtypes.split(","):
            out = work / f"{args.model}-mambart-{dt}"
            quant = dt if dt in ("int8", "int4") else None
            if not (out / "config.json").exists():
                mambart.convert(hf_dir, out, dtype="bfloat16" if quant else dt, quantize=quant)
            g = mambart.Generator(out, threads=t)
            g.generate(prompt[:8], max_new_tokens=4, ignore_eos=True)  # warm-up
            gens[dt] = (g, weight_bytes(out), [], [])
        for _ in range(args.reps):
            for dt, (g, _, pre, dec) in gens.items():
                r = g.generate(prompt, max_new_tokens=args.gen_len, ignore_eos=True)
                pre.append(r.prefill_ms)
                dec.append(r.decode_ms / max(len(r.token_ids) - 1, 1))
        for dt, (g, wb, pre, dec) in gens.items():
            dm = STAT(dec)
            row = dict(env, engine=f"mambart {mambart.__version__} ({g.device})", threads=t,
                       dtype=dt, prefill_tok_s=len(prompt) / (STAT(pre) / 1e3), decode_ms=dm,
                       weight_bytes=wb, interleaved=True)
            if t in bw:
                row["read_gb_s"] = bw[t] / 1e9
                row["decode_of_bandwidth"] = wb / (dm / 1e3) / bw[t]
            rows.append(row)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mamba-130m", choices=sorted(SHAPES))
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--threads", default="", help="comma-separated thread counts (default: "
                    "the cores this process may run on)")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--llama-cpp", action="store_true", help="llama.cpp's llama-bench too")
    ap.add_argument("--bandwidth", action="store_true", help="the read-bandwidth probe")
    ap.add_argument("--load", action="store_true",
                    help="a busy process pinned to one core during the run")
    ap.add_argument("--work-dir", type=Path, default=None,
                    help="keep the checkpoints and converted files here (reused when present)")
    ap.add_argument("--json", type=Path, help="append JSON lines here too")
    ap.add_argument("--interleave", action="store_true",
                    help="time the mambart dtypes in turn, rep by rep (see above)")
    ap.add_argument("--stat", choices=["median", "min"], default="median",
                    help="each figure: the median of --reps runs, or the best (min time)")
    args = ap.parse_args()
    global STAT
    STAT = min if args.stat == "min" else statistics.median

    import numpy as np

    import mambart

    threads = [int(t) for t in args.threads.split(",") if t] or [len(os.sched_getaffinity(0))]
    rng = np.random.default_rng(0)
    prompt = [int(t) for t in rng.integers(1, 50000, size=args.prompt_len)]
    env = {"git_sha": git_sha(), "cpu": cpu_name(), "cores": len(os.sched_getaffinity(0)),
           "model": args.model, "prompt_len": args.prompt_len, "gen_len": args.gen_len,
           "reps": args.reps, "stat": args.stat, "load": args.load, "date": time.strftime("%Y-%m-%d"),
           "loadavg_1m": os.getloadavg()[0]}
    rows = []
    llama = find_llama_bench() if args.llama_cpp else None
    with contextlib.ExitStack() as stack:
        work = args.work_dir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        work.mkdir(parents=True, exist_ok=True)
        hf_dir = work / f"{args.model}-hf"
        model = None
        if not (hf_dir / "config.json").exists():
            model = build_hf(args.model, hf_dir)
        core = stack.enter_context(busy_core(args.load))
        env["busy_core"] = core
        if not args.skip_transformers:
            import torch
            import transformers

            if model is None:
                from transformers import AutoModelForCausalLM

                model = AutoModelForCausalLM.from_pretrained(hf_dir)
            pf, dm = time_hf(model, prompt, args.gen_len, args.reps)
            rows.append(dict(env, engine=f"transformers {transformers.__version__} (torch "
                             f"{torch.__version__})", threads=torch.get_num_threads(),
                             dtype="float32", prefill_tok_s=pf, decode_ms=dm))
        del model
        bw = {t: read_bandwidth(t, args.reps) for t in threads} if args.bandwidth else {}
        if args.interleave:
            rows += interleaved(args, work, hf_dir, prompt, threads, bw, env)
        for dt in ([] if args.interleave else args.dtypes.split(",")):
            out = work / f"{args.model}-mambart-{dt}"
            quant = dt if dt in ("int8", "int4") else None
            if not (out / "config.json").exists():
                mambart.convert(hf_dir, out, dtype="bfloat16" if quant else dt, quantize=quant)
            wb = weight_bytes(out)
            gguf = make_gguf(hf_dir, dt, work / f"{args.model}-{GGUF_TYPES[dt]}.gguf") \
                if llama and not quant else None
            for t in threads:
                g = mambart.Generator(out, threads=t)
                pf, dm = time_mambart(g, prompt, args.gen_len, args.reps)
                row = dict(env, engine=f"mambart {mambart.__version__} ({g.device})", threads=t,
                           dtype=dt, prefill_tok_s=pf, decode_ms=dm, weight_bytes=wb)
                if t in bw:
                    row["read_gb_s"] = bw[t] / 1e9
                    row["decode_of_bandwidth"] = wb / (dm / 1e3) / bw[t]
                rows.append(row)
                del g
                if gguf:
                    pf, dm, build = time_llama(llama, gguf, args.prompt_len, args.gen_len, t,
                                               args.reps)
                    row = dict(env, engine=f"llama.cpp {build}", threads=t, dtype=dt,
                               prefill_tok_s=pf, decode_ms=dm, weight_bytes=wb)
                    if t in bw:
                        row["read_gb_s"] = bw[t] / 1e9
                        row["decode_of_bandwidth"] = wb / (dm / 1e3) / bw[t]
                    rows.append(row)
    for r in rows:
        line = json.dumps(r)
        print(line)
        if args.json:
            with open(args.json, "a") as f:
                f.write(line + "\n")
    print(f"\n{args.model}, prompt {args.prompt_len} tokens, {args.gen_len} new tokens, "
          f"commit {env['git_sha']}, {env['cpu']}, {env['cores']} cores, {args.stat} of {args.reps}"
          f"{', one core busy (--load)' if args.load else ''}, load average "
          f"{env['loadavg_1m']:.1f} at the start\n")
    print("| engine | dtype | threads | prefill tok/s | decode ms/token | vs llama.cpp "
          "(prefill, decode) | read GB/s | decode of bandwidth |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ref = next((x for x in rows if x["engine"].startswith("llama.cpp")
                    and x["dtype"] == r["dtype"] and x["threads"] == r["threads"]), None)
        vs = (f"{r['prefill_tok_s'] / ref['prefill_tok_s']:.2f}x, "
              f"{ref['decode_ms'] / r['decode_ms']:.2f}x" if ref and ref is not r else "-")
        bwc = f"{r['read_gb_s']:.1f}" if "read_gb_s" in r else "-"
        frac = f"{100 * r['decode_of_bandwidth']:.0f}%" if "decode_of_bandwidth" in r else "-"
        print(f"| {r['engine']} | {r['dtype']} | {r['threads']} | {r['prefill_tok_s']:.1f} | "
              f"{r['decode_ms']:.2f} | {vs} | {bwc} | {frac} |")


if __name__ == "__main__":
    sys.exit(main())

"""Side-by-side GPU benchmark (issue 5): mambart, mamba_ssm, transformers and llama.cpp at every
published Mamba / Mamba-2 shape with random weights, in one run on one device. JSON lines out,
then a markdown report and a PNG plot made from them.

Run (on the GPU machine; each record is printed and appended to --out as it is measured):

    python tools/bench.py --dtypes bfloat16 --batch-gen 64 --hf-max-prefill 512 \
        --time-budget 420 --out bench.jsonl
    python tools/bench.py --dtypes float16 --batch-gen 64 --hf-max-prefill 512 \
        --time-budget 420 --out bench.jsonl
    python tools/bench.py --report bench.jsonl --md bench.md --png bench.png

CPU smoke run (no GPU metrics; what tests/test_bench_tool.py runs):

    python tools/bench.py --device cpu --models tiny tiny2 --engines mambart --batches 1 2 \
        --prefill 16 --gen 4 --repeats 1 --out smoke.jsonl

Models: SHAPES below; by default every published shape, mamba-1.4b and mamba2-1.3b first, then
by size (a time budget cuts the largest). Mamba-1: d_state 16, dt_rank ceil(d_model/16),
expand 2, d_conv 4; Mamba-2: d_state 128, headdim 64, ngroups 1, chunk 256, expand 2, d_conv 4.
vocab_size 50280; embedding rows 50280 for Mamba-1 (the released checkpoints: 50277 padded to a
multiple of 8) and 50288 for Mamba-2; tied head. 'tiny' / 'tiny2' (d_model 64, 2 layers, vocab
256) are for the smoke run. Each model's random weights are written ONCE, in --storage-dtype
(bfloat16), to /dev/shm when it has room, else a temporary directory (removed after the model
unless --keep / --workdir): small tensors drawn directly, each large matrix streamed from a pool
of 2^22 N(0, 1/fan_in) values read cyclically from a random offset (fast to write; the work an
engine does is the same). Every --dtypes entry loads that one file with
mambart.Generator(path, device=..., dtype=dtype) (float16 is converted at load). The peers build
their own random weights of the same shapes (parameter counts equal) in the same dtype.
transformers runs its torch path: mamba_ssm / causal_conv1d are hidden while its Mamba modules
are imported (transformers 5 would otherwise call their kernels).

Measured per (engine, model, dtype); each record carries date, device, gpu, driver, git commit
and the engine version:
- copy_bandwidth_gb_s (once per run, torch on CUDA only): device-to-device copy of a 1 GiB
  buffer, bytes read + written / time (CUDA events), median of 10 after a warm-up.
- decode_ms_per_token (batch 1): median over --repeats runs of --gen new tokens after a warm-up
  run (which also records mambart's / mamba_ssm's CUDA graph). mambart: the result's decode_ms /
  (new tokens - 1), i.e. the prefill and first token excluded. mamba_ssm: generate(cg=True)
  wall time of --gen+1 new tokens minus that of 1 new token, over --gen. transformers: the same
  difference with generate(), --hf-gen tokens. Fields: gb_s = weight bytes read per step (all
  parameters x dtype size: the tied lm_head reads the whole embedding) / step time; pct_copy_bw
  = gb_s / copy bandwidth; bw_limit_ms = weight bytes / copy bandwidth.
- decode_tokens_per_s at every other --batches size: batch / step time, steps timed as above
  with --batch-gen new tokens (0: --gen); transformers: batch 1 only.
- prefill_ms at each --prefill length (one prompt): mambart: the result's prefill_ms of
  generate(prompt, max_new_tokens=1); mamba_ssm: wall time of model(x, num_last_tokens=1) (its
  fused path, no state kept); transformers: model(x). Median of --repeats after a warm-up.
  Fields tokens_per_s and tflops = 2 x non-embedding params x tokens / time.
- concurrent streams (--streams N ...; mambart only, issue 14): N client threads arrive every
  --arrival-ms and each streams --stream-gen tokens from one Generator: stream_tokens_per_s
  (all tokens / time from the first arrival to the last token), stream_ttft_ms_p50/p90/p99 and
  stream_itl_ms_p50/p90/p99 (inter-token latency) of the best of --repeats runs, with the
  engine's mean rows per decode step; fixed_batch_tokens_per_s: the same N prompts as one fixed
  batch (GenerationStream, the pre-engine batched decode), the best of --repeats.
- ttft_ms: wall time of generate(512-token prompt, 1 new token), median of --repeats after a
  warm-up (transformers only when 512 <= --hf-max-prefill).
- load_s (mambart: Generator(...) from the file, conversion included); peers: init_s, the time to
  build the model with random weights on the device (not a file load, not comparable).
- peak_mem_gib: mambart: device memory in use (torch.cuda.mem_get_info) minus before loading,
  the max over the samples taken after every run; peers: torch.cuda.max_memory_allocated after
  reset_peak_memory_stats before building the model.
A peer that cannot be imported or fails gives a record with metric "missing" or "error" and the
reason, and the run goes on. --time-budget: once that many seconds have passed, remaining work
is skipped and each skipped item gets a "skipped" record (what was running still finishes, so
leave a margin). llama.cpp: `llama-bench` from PATH or $LLAMA_CPP_DIR, run on
--gguf-dir/<model>-<dtype>.gguf; GGUF conversion is not automated (a "missing" record says so).

Report: --report reads JSON lines (several runs may be concatenated; the last record of each key
wins) and writes markdown tables (--md, else stdout) and, with --png, a log-log plot of batch-1
decode ms/token against parameters, one line per engine and dtype, with the bandwidth limit.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from model_dirs import _SMALL, config_dict, tensor_shapes, write_config  # noqa: E402

# Published shapes (state-spaces/mamba-* and mamba2-*), smallest first; tiny ones for the smoke run.
SHAPES = {
    "tiny": dict(arch="mamba1", d_model=64, n_layer=2, vocab=256),
    "tiny2": dict(arch="mamba2", d_model=64, n_layer=2, vocab=256),
    "mamba-130m": dict(arch="mamba1", d_model=768, n_layer=24),
    "mamba-370m": dict(arch="mamba1", d_model=1024, n_layer=48),
    "mamba-790m": dict(arch="mamba1", d_model=1536, n_layer=48),
    "mamba-1.4b": dict(arch="mamba1", d_model=2048, n_layer=48),
    "mamba-2.8b": dict(arch="mamba1", d_model=2560, n_layer=64),
    "mamba2-130m": dict(arch="mamba2", d_model=768, n_layer=24),
    "mamba2-370m": dict(arch="mamba2", d_model=1024, n_layer=48),
    "mamba2-780m": dict(arch="mamba2", d_model=1536, n_layer=48),
    "mamba2-1.3b": dict(arch="mamba2", d_model=2048, n_layer=48),
    "mamba2-2.7b": dict(arch="mamba2", d_model=2560, n_layer=64),
}
# Default order: the two headline models first, then by size, so a time budget cuts the largest.
PUBLISHED = ["mamba-1.4b", "mamba2-1.3b", "mamba-130m", "mamba2-130m", "mamba-370m", "mamba2-370m",
             "mamba-790m", "mamba2-780m", "mamba-2.8b", "mamba2-2.7b"]
assert sorted(PUBLISHED) == sorted(n for n in SHAPES if not n.startswith("tiny"))
ENGINES = ["mambart", "mamba_ssm", "transformers", "llama.cpp"]
ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4}


def model_config(name: str, dtype: str) -> dict:
    """The mambart config.json dict of a SHAPES entry, weights stored as `dtype`."""
    s = SHAPES[name]
    d = s["d_model"]
    m2 = s["arch"] == "mamba2"
    if "vocab" in s:
        vocab, padded = s["vocab"], s["vocab"]
    else:
        vocab, padded = 50280, (50288 if m2 else 50280)
    c = dict(d_model=d, n_layer=s["n_layer"], vocab_size=vocab, vocab_size_padded=padded,
             d_inner=2 * d, d_state=128 if m2 else 16, d_conv=4, tie_embeddings=True, dtype=dtype,
             ngroups=1)
    if m2:
        hd = 64 if d >= 256 else 16
        c.update(headdim=hd, nheads=2 * d // hd, chunk_size=256, gated_norm=True, dt_rank=0)
    else:
        c.update(dt_rank=math.ceil(d / 16), headdim=0, nheads=0, chunk_size=0, gated_norm=False)
    return config_dict(s["arch"], **c)


def param_counts(c: dict) -> tuple:
    """(all parameters, non-embedding parameters) of config `c` (tied head)."""
    total = sum(int(np.prod(s)) for s in tensor_shapes(c).values())
    return total, total - c["vocab_size_padded"] * c["d_model"]


def _bf16_bits(a: np.ndarray) -> np.ndarray:
    u = a.astype(np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def write_random_model(path: Path, c: dict, seed: int = 0) -> int:
    """Random weights of sensible scale in model.safetensors + config.json. Returns #params.

    Small tensors (A_log, D, dt biases, norms) are drawn directly; each large matrix is a pool of
    (at most) 2^22 N(0, 1/fan_in) values (one pool per fan_in, already in the storage dtype) read
    cyclically from a random offset, so writing a 2.8b model takes seconds, not minutes."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_config(path, c)
    rng = np.random.default_rng(seed)
    dt = c["dtype"]
    st = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}[dt]

    def encode(a):  # float32 -> raw array in the storage dtype
        if dt == "float32":
            return a.astype("<f4")
        if dt == "float16":
            return a.astype("<f2")
        return _bf16_bits(a)

    shapes = tensor_shapes(c)
    pool_n = min(1 << 22, max(int(np.prod(s)) for s in shapes.values()))
    pools = {}
    entries, nparams = {}, 0
    for name, shape in shapes.items():
        n = int(np.prod(shape))
        nparams += n
        small = any(name.endswith(s) for s in _SMALL)
        if name.endswith("A_log"):
            a = np.log(rng.uniform(1, 16, size=shape)).astype(np.float32)
        elif name.endswith(".D") or "norm" in name:
            a = np.ones(shape, np.float32)
        elif name.endswith(("dt_bias", "dt_proj.bias")):
            a = np.log(np.expm1(rng.uniform(0.001, 0.1, size=shape))).astype(np.float32)
        else:
            fan_in = shape[-1] if len(shape) > 1 else 1
            if fan_in not in pools:
                pools[fan_in] = encode(rng.standard_normal(pool_n, dtype=np.float32)
                                       * np.float32(fan_in ** -0.5))
            pool = pools[fan_in]
            off = int(rng.integers(0, pool.size))
            entries[name] = (st, tuple(shape), n * pool.itemsize, (pool, off))
            continue
        raw = a.astype("<f4") if small else encode(a)
        entries[name] = ("F32" if small else st, tuple(shape), raw.nbytes, (raw, 0))
    # safetensors by hand, streamed: a pooled tensor is its pool written over and over (no
    # n-element array is ever built: on a slow-memory machine that doubled the time).
    header, pos = {}, 0
    for name, (sdt, shape, nbytes, _) in entries.items():
        header[name] = {"dtype": sdt, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for _, _, nbytes, (raw, off) in entries.values():
            mv = memoryview(np.ascontiguousarray(raw)).cast("B")
            cur, left = off * raw.itemsize, nbytes
            while left:
                seg = mv[cur:cur + left]
                f.write(seg)
                left -= len(seg)
                cur = 0
    return nparams


# ----------------------------------------------------------------------------- run helpers


class Run:
    """Output, metadata and the time budget of one benchmark run."""

    def __init__(self, args):
        self.args = args
        self.out = open(args.out, "a") if args.out else None
        self.t0 = time.perf_counter()
        self.budget = args.time_budget
        self.meta = {}

    def emit(self, **rec) -> dict:
        rec = dict(self.meta, **rec)
        line = json.dumps(rec)
        print(line, flush=True)
        if self.out:
            self.out.write(line + "\n")
            self.out.flush()
        return rec

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def over(self, base: dict, what: str) -> bool:
        """True (and a 'skipped' record) once the time budget is spent."""
        if self.budget and self.elapsed() > self.budget:
            self.emit(**base, metric="skipped", what=what,
                      reason=f"time budget of {self.budget:.0f} s spent ({self.elapsed():.0f} s)")
            return True
        return False


@contextlib.contextmanager
def guard(run: Run, base: dict, what: str):
    """One measurement: an exception becomes an 'error' record and the run goes on."""
    try:
        yield
    except Exception as e:
        run.emit(**base, metric="error", what=what, value=f"{type(e).__name__}: {e}"[:2000])
        free_torch()


def _cmd(args, cwd=None) -> str:
    try:
        r = subprocess.run(args, capture_output=True, text=True, cwd=cwd, timeout=20)
        return r.stdout.strip() if r.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def _torch_cuda(device: str):
    """torch if the device is CUDA and torch sees it, else None."""
    if not device.startswith("cuda"):
        return None
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def run_meta(args) -> dict:
    here = Path(__file__).resolve().parent
    sha = _cmd(["git", "rev-parse", "--short", "HEAD"], cwd=here)
    dirty = _cmd(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here)
    torch = _torch_cuda(args.device)
    gpu = torch.cuda.get_device_name(0) if torch else None
    driver = _cmd(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return dict(date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), device=args.device,
                gpu=gpu, driver=driver.splitlines()[0] if driver else None,
                git=(sha + ("-dirty" if dirty else "")) if sha else None,
                python=platform.python_version(),
                torch=(torch.__version__ if torch else None))


def copy_bandwidth(torch, nbytes: int = 1 << 30, reps: int = 10) -> float:
    """Device-to-device copy, (read + written bytes) / time in GB/s, median of `reps`."""
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    torch.cuda.synchronize()
    rates = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        b.copy_(a)
        e1.record()
        e1.synchronize()
        rates.append(2 * nbytes / (e0.elapsed_time(e1) * 1e-3) / 1e9)
    del a, b
    torch.cuda.empty_cache()
    return statistics.median(rates)


def free_torch():
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
    except ImportError:
        pass


class Info:
    """What every engine needs about one model."""

    def __init__(self, name, c, path, bw):
        self.name, self.c, self.path, self.bw = name, c, path, bw
        self.nparams, self.nonemb = param_counts(c)
        self.vocab = c["vocab_size"]

    def weight_bytes(self, dtype):
        return self.nparams * ITEMSIZE[dtype]

    def decode_fields(self, dtype, ms):
        """gb_s / pct_copy_bw / bw_limit_ms of a batch-1 decode step of `ms`."""
        wb = self.weight_bytes(dtype)
        f = dict(gb_s=round(wb / (ms * 1e-3) / 1e9, 2))
        if self.bw:
            f.update(pct_copy_bw=round(100 * f["gb_s"] / self.bw, 1),
                     bw_limit_ms=round(wb / (self.bw * 1e9) * 1e3, 4))
        return f

    def prefill_fields(self, L, ms):
        return dict(tokens_per_s=round(L / (ms * 1e-3), 1),
                    tflops=round(2 * self.nonemb * L / (ms * 1e-3) / 1e12, 2))


def _ids(rng, vocab, n):
    return [int(t) for t in rng.integers(0, min(vocab, 50000), size=n)]


# ----------------------------------------------------------------------------- engines


def _pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


def concurrent_streams(g, info: Info, N: int, args, rng):
    """Issue 14: N clients arriving every --arrival-ms stream --stream-gen tokens each from one
    Generator (the engine batches them); against the fixed-batch path (all N prompts started
    together as one GenerationStream, the pre-engine batched decode) in the same run.
    -> records: stream_tokens_per_s (with the engine's mean step and decode ms), ttft_ms / itl_ms
    percentiles, fixed_batch_tokens_per_s, one_call_tokens_per_s (all N prompts in one generate)."""
    import threading

    gen = args.stream_gen
    prompts = [_ids(rng, info.vocab, 16) for _ in range(N)]
    g.generate(prompts[0], max_new_tokens=4, ignore_eos=True)  # warm-up
    # The fixed batch (GenerationStream): every row decodes in every step until all are done.
    kw = dict(max_new_tokens=gen, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0,
              repetition_penalty=1.0, seed=0, stop_token_ids=None, ignore_eos=True)
    fixed = []
    for _ in range(args.repeats):
        stream, _ = g._start_rows(prompts, None, kw, False)
        t0 = time.perf_counter()
        n = 0
        while True:
            ev = stream.next()
            if ev is None:
                break
            n += len(ev)
        fixed.append(n / (time.perf_counter() - t0))
    # The engine: clients arriving over time.
    runs = []
    for _ in range(args.repeats):
        s0 = g.engine_stats()
        ttft, itl, ends = [], [], []
        lock = threading.Lock()
        t0 = time.perf_counter()

        def client(i):
            time.sleep(max(0.0, t0 + i * args.arrival_ms / 1e3 - time.perf_counter()))
            ts = time.perf_counter()
            last, first, times = ts, None, []
            for _ in g.stream(prompts[i], max_new_tokens=gen, ignore_eos=True):
                now = time.perf_counter()
                if first is None:
                    first = now - ts
                else:
                    times.append(now - last)
                last = now
            with lock:
                ttft.append(first * 1e3)
                itl.extend(t * 1e3 for t in times)
                ends.append(last)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(N)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        s1 = g.engine_stats()
        steps = s1["steps"] - s0["steps"]
        d = {k: s1[k] - s0[k] for k in ("step_ms", "decode_ms", "prefill_ms", "prefill_calls")}
        runs.append(dict(tps=N * gen / (max(ends) - t0), ttft=ttft, itl=itl,
                         rows=(s1["rows_decoded"] - s0["rows_decoded"]) / max(steps, 1),
                         step_ms=d["step_ms"] / max(steps, 1), decode_ms=d["decode_ms"] / max(steps, 1),
                         prefill_ms=d["prefill_ms"], prefill_calls=d["prefill_calls"]))
    # The engine given all N prompts in one call (one caller, no consumer threads): what the
    # engine itself does with the same work.
    one = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        res = g.generate(prompts, max_new_tokens=gen, ignore_eos=True)
        one.append(sum(len(r.token_ids) for r in res) / (time.perf_counter() - t0))
    best = max(runs, key=lambda r: r["tps"])  # the median of few runs is noisy; report the best
    fields = dict(batch=N, streams=N, arrival_ms=args.arrival_ms, gen=gen)
    out = [dict(**fields, metric="stream_tokens_per_s", value=round(best["tps"], 1),
                mean_rows_per_step=round(best["rows"], 2),
                engine_step_ms=round(best["step_ms"], 4), engine_decode_ms=round(best["decode_ms"], 4),
                engine_prefill_ms=round(best["prefill_ms"], 2), prefill_calls=best["prefill_calls"]),
           dict(**fields, metric="fixed_batch_tokens_per_s", value=round(max(fixed), 1)),
           dict(**fields, metric="one_call_tokens_per_s", value=round(max(one), 1))]
    for name, xs in (("ttft_ms", best["ttft"]), ("itl_ms", best["itl"])):
        for q in (50, 90, 99):
            out.append(dict(**fields, metric=f"stream_{name}_p{q}", value=round(_pct(xs, q), 3)))
    return out


def bench_mambart(run: Run, info: Info, dtype: str):
    import mambart

    args = run.args
    base = dict(engine="mambart", engine_version=mambart.__version__, model=info.name, dtype=dtype,
                params=info.nparams)
    torch = _torch_cuda(args.device)

    def used():
        free, total = torch.cuda.mem_get_info()
        return total - free

    mem0 = used() if torch else None
    peak = [0]

    def sample():
        if torch:
            peak[0] = max(peak[0], used() - mem0)

    t = time.perf_counter()
    g = mambart.Generator(str(info.path), device=args.device, dtype=dtype)
    load_s = time.perf_counter() - t
    if g.dtype != dtype:
        raise RuntimeError(f"mambart loaded {info.path} as {g.dtype}, asked for {dtype}")
    sample()
    run.emit(**base, metric="load_s", value=round(load_s, 3), stored_dtype=info.c["dtype"],
             device_name=g.device)
    rng = np.random.default_rng(0)
    try:
        for B in args.batches:
            if run.over(base, f"decode batch {B}"):
                continue
            with guard(run, base, f"decode batch {B}"):
                prompts = [_ids(rng, info.vocab, 16) for _ in range(B)]
                p = prompts if B > 1 else prompts[0]
                n = args.gen if B == 1 else (args.batch_gen or args.gen)
                g.generate(p, max_new_tokens=min(n, 8), ignore_eos=True)  # warm-up + CUDA graph
                per_step = []
                for _ in range(args.repeats):
                    res = g.generate(p, max_new_tokens=n, ignore_eos=True)
                    r0 = res[0] if B > 1 else res
                    per_step.append(r0.decode_ms / (len(r0.token_ids) - 1))
                    sample()
                ms = statistics.median(per_step)
                if B == 1:
                    run.emit(**base, batch=1, metric="decode_ms_per_token", value=round(ms, 4),
                             gen=n, **info.decode_fields(dtype, ms))
                else:
                    run.emit(**base, batch=B, metric="decode_tokens_per_s",
                             value=round(B / (ms * 1e-3), 1), ms_per_step=round(ms, 4), gen=n)
        for N in args.streams:
            if run.over(base, f"concurrent streams {N}"):
                continue
            with guard(run, base, f"concurrent streams {N}"):
                for rec in concurrent_streams(g, info, N, args, rng):
                    run.emit(**base, **rec)
        for L in args.prefill:
            if run.over(base, f"prefill {L}"):
                continue
            with guard(run, base, f"prefill {L}"):
                ids = _ids(rng, info.vocab, L)
                g.generate(ids, max_new_tokens=1, ignore_eos=True)
                times = []
                for _ in range(args.repeats):
                    times.append(g.generate(ids, max_new_tokens=1, ignore_eos=True).prefill_ms)
                    sample()
                ms = statistics.median(times)
                run.emit(**base, prompt_len=L, metric="prefill_ms", value=round(ms, 3),
                         **info.prefill_fields(L, ms))
        if not run.over(base, "ttft"):
            with guard(run, base, "ttft"):
                ids = _ids(rng, info.vocab, args.ttft_len)
                g.generate(ids, max_new_tokens=1, ignore_eos=True)
                times = []
                for _ in range(args.repeats):
                    t = time.perf_counter()
                    g.generate(ids, max_new_tokens=1, ignore_eos=True)
                    times.append((time.perf_counter() - t) * 1e3)
                run.emit(**base, prompt_len=args.ttft_len, metric="ttft_ms",
                         value=round(statistics.median(times), 3))
        if torch:
            run.emit(**base, metric="peak_mem_gib", value=round(peak[0] / 2**30, 3),
                     how="mem_get_info used minus before load, max over runs")
        else:
            run.emit(**base, metric="skipped", what="peak_mem_gib",
                     reason=f"device memory is measured through torch.cuda (device {args.device})")
    finally:
        del g
        gc.collect()


def _torch_dtype(torch, dtype):
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]


def _timed(torch, fn):
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t


def bench_mamba_ssm(run: Run, info: Info, dtype: str):
    """state-spaces/mamba (mamba_ssm) with its CUDA / Triton kernels and generate(cg=True)."""
    args = run.args
    base = dict(engine="mamba_ssm", model=info.name, dtype=dtype, params=info.nparams)
    torch = _torch_cuda(args.device)
    if torch is None:
        run.emit(**base, metric="missing", value=f"needs torch with CUDA (device {args.device})")
        return
    try:
        import mamba_ssm
        from mamba_ssm.models.config_mamba import MambaConfig as SSMConfig
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    except Exception as e:  # ImportError, or a build that does not load
        run.emit(**base, metric="missing", value=f"import mamba_ssm: {e!r}")
        return
    kernels = {}
    try:
        from mamba_ssm.ops import selective_scan_interface as ssi

        kernels["selective_scan_cuda"] = ssi.selective_scan_cuda is not None
        kernels["causal_conv1d"] = ssi.causal_conv1d_fn is not None
    except Exception as e:
        kernels["selective_scan_interface"] = repr(e)
    try:
        from mamba_ssm.modules import mamba_simple

        kernels["causal_conv1d_update"] = mamba_simple.causal_conv1d_update is not None
        kernels["selective_state_update (triton)"] = mamba_simple.selective_state_update is not None
    except Exception as e:
        kernels["mamba_simple"] = repr(e)
    try:
        import causal_conv1d

        kernels["causal_conv1d_version"] = getattr(causal_conv1d, "__version__", "?")
    except Exception as e:
        kernels["causal_conv1d_version"] = f"not importable: {e!r}"
    base.update(engine_version=mamba_ssm.__version__, kernels=kernels)
    c = info.c
    m2 = c["architecture"] == "mamba2"
    ssm_cfg = ({"layer": "Mamba2", "d_state": 128, "headdim": c["headdim"], "ngroups": 1,
                "chunk_size": 256, "expand": 2, "d_conv": 4} if m2 else
               {"layer": "Mamba1", "d_state": 16, "expand": 2, "d_conv": 4, "dt_rank": c["dt_rank"]})
    cfg = SSMConfig(d_model=c["d_model"], n_layer=c["n_layer"], vocab_size=c["vocab_size_padded"],
                    ssm_cfg=ssm_cfg, rms_norm=True, residual_in_fp32=True, fused_add_norm=True,
                    pad_vocab_size_multiple=8, tie_embeddings=True)
    torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    t = time.perf_counter()
    model = MambaLMHeadModel(cfg, device=args.device, dtype=_torch_dtype(torch, dtype)).eval()
    torch.cuda.synchronize()
    run.emit(**base, metric="init_s", value=round(time.perf_counter() - t, 3),
             note="random init on the device, not a file load")
    n_model = sum(p.numel() for p in model.parameters())
    if n_model != info.nparams:
        run.emit(**base, metric="note", value=f"mamba_ssm model has {n_model} parameters, "
                 f"mambart's config {info.nparams}")

    def gen(ids, n):
        with torch.inference_mode():
            return _timed(torch, lambda: model.generate(ids, max_length=ids.shape[1] + n, cg=True,
                                                        top_k=1))

    try:
        for B in args.batches:
            if run.over(base, f"decode batch {B}"):
                continue
            with guard(run, base, f"decode batch {B}"):
                ids = torch.randint(0, min(info.vocab, 50000), (B, 16), device=args.device)
                n = args.gen if B == 1 else (args.batch_gen or args.gen)
                # Warm-up at the longest max_length used below: the graph cache is re-captured
                # whenever max_length grows, so this keeps captures out of the timed runs.
                gen(ids, n + 1)
                gen(ids, 1)
                per = [(gen(ids, n + 1) - gen(ids, 1)) / n for _ in range(args.repeats)]
                ms = statistics.median(per) * 1e3
                if B == 1:
                    run.emit(**base, batch=1, metric="decode_ms_per_token", value=round(ms, 4), gen=n,
                             **info.decode_fields(dtype, ms))
                else:
                    run.emit(**base, batch=B, metric="decode_tokens_per_s",
                             value=round(B / (ms * 1e-3), 1), ms_per_step=round(ms, 4), gen=n)
        for L in args.prefill:
            if run.over(base, f"prefill {L}"):
                continue
            with guard(run, base, f"prefill {L}"):
                x = torch.randint(0, min(info.vocab, 50000), (1, L), device=args.device)
                with torch.inference_mode():
                    fwd = lambda: model(x, num_last_tokens=1)  # noqa: E731
                    _timed(torch, fwd)
                    times = [_timed(torch, fwd) for _ in range(args.repeats)]
                ms = statistics.median(times) * 1e3
                run.emit(**base, prompt_len=L, metric="prefill_ms", value=round(ms, 3),
                         **info.prefill_fields(L, ms), how="model(x, num_last_tokens=1)")
        if not run.over(base, "ttft"):
            with guard(run, base, "ttft"):
                x = torch.randint(0, min(info.vocab, 50000), (1, args.ttft_len), device=args.device)
                gen(x, 1)
                times = [gen(x, 1) * 1e3 for _ in range(args.repeats)]
                run.emit(**base, prompt_len=args.ttft_len, metric="ttft_ms",
                         value=round(statistics.median(times), 3), how="generate(cg=True), 1 token")
        run.emit(**base, metric="peak_mem_gib",
                 value=round(torch.cuda.max_memory_allocated() / 2**30, 3),
                 how="torch.cuda.max_memory_allocated")
    finally:
        if hasattr(model, "_decoding_cache"):
            model._decoding_cache = None
        del model


_HF_MODULES = None


def _hf_torch_path_modules():
    """transformers' Mamba / Mamba-2 model modules, imported with mamba_ssm and causal_conv1d
    hidden so that their kernel hooks fall back to the torch path (transformers 5 picks those
    packages up when they are importable at its import time). -> (mamba, mamba2, note)."""
    global _HF_MODULES
    if _HF_MODULES is None:
        names = ("transformers.models.mamba.modeling_mamba",
                 "transformers.models.mamba2.modeling_mamba2")
        already = [n for n in names if n in sys.modules]
        hidden = ("mamba_ssm", "causal_conv1d")
        saved = {k: sys.modules.get(k, None) for k in hidden}
        present = {k: k in sys.modules for k in hidden}
        for k in hidden:
            sys.modules[k] = None  # makes `import k` raise ImportError
        try:
            import importlib

            mods = [importlib.import_module(n) for n in names]
        finally:
            for k in hidden:
                if present[k]:
                    sys.modules[k] = saved[k]
                else:
                    del sys.modules[k]
        note = "torch path (mamba_ssm/causal_conv1d hidden at import)"
        if already:
            note = f"imported before the bench could hide the kernels: {already}; path unknown"
        _HF_MODULES = (mods[0], mods[1], note)
    return _HF_MODULES


def bench_transformers(run: Run, info: Info, dtype: str):
    args = run.args
    base = dict(engine="transformers", model=info.name, dtype=dtype, params=info.nparams)
    torch = _torch_cuda(args.device)
    if torch is None:
        run.emit(**base, metric="missing", value=f"benchmarked on CUDA only (device {args.device})")
        return
    if info.name not in args.hf_models:
        run.emit(**base, metric="skipped", what="all",
                 reason=f"not in --hf-models ({' '.join(args.hf_models)})")
        return
    try:
        import transformers

        mm1, mm2, path_note = _hf_torch_path_modules()
    except Exception as e:
        run.emit(**base, metric="missing", value=f"import transformers: {e!r}")
        return
    base.update(engine_version=transformers.__version__, kernels=path_note)
    c = info.c
    if c["architecture"] == "mamba1":
        cfg = transformers.MambaConfig(
            vocab_size=c["vocab_size_padded"], hidden_size=c["d_model"], state_size=c["d_state"],
            num_hidden_layers=c["n_layer"], expand=2, conv_kernel=4, time_step_rank=c["dt_rank"],
            tie_word_embeddings=True)
        cls = mm1.MambaForCausalLM
    else:
        cfg = transformers.Mamba2Config(
            vocab_size=c["vocab_size_padded"], hidden_size=c["d_model"], state_size=c["d_state"],
            num_hidden_layers=c["n_layer"], expand=2, head_dim=c["headdim"], num_heads=c["nheads"],
            n_groups=1, chunk_size=256, conv_kernel=4, tie_word_embeddings=True)
        cls = mm2.Mamba2ForCausalLM
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    with torch.device(args.device):
        model = cls(cfg).to(_torch_dtype(torch, dtype)).eval()
    torch.cuda.synchronize()
    run.emit(**base, metric="init_s", value=round(time.perf_counter() - t, 3),
             note="random init on the device, not a file load")
    V = min(info.vocab, 50000)

    def gen(ids, n):
        with torch.no_grad():
            return _timed(torch, lambda: model.generate(
                ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                eos_token_id=None))

    try:
        if not run.over(base, "decode batch 1"):
            with guard(run, base, "decode batch 1"):
                ids = torch.randint(0, V, (1, 16), device=args.device)
                n = args.hf_gen
                gen(ids, 2)
                per = [(gen(ids, n + 1) - gen(ids, 1)) / n for _ in range(max(1, min(args.repeats, 2)))]
                ms = statistics.median(per) * 1e3
                run.emit(**base, batch=1, metric="decode_ms_per_token", value=round(ms, 3), gen=n,
                         **info.decode_fields(dtype, ms))
        for L in args.prefill:
            if L > args.hf_max_prefill:
                run.emit(**base, metric="skipped", what=f"prefill {L}",
                         reason=f"> --hf-max-prefill {args.hf_max_prefill}")
                continue
            if run.over(base, f"prefill {L}"):
                continue
            with guard(run, base, f"prefill {L}"):
                x = torch.randint(0, V, (1, L), device=args.device)
                with torch.no_grad():
                    _timed(torch, lambda: model(x))
                    ms = _timed(torch, lambda: model(x)) * 1e3
                run.emit(**base, prompt_len=L, metric="prefill_ms", value=round(ms, 3),
                         **info.prefill_fields(L, ms), how="model(x), one timed run after a warm-up")
        if args.ttft_len <= args.hf_max_prefill and not run.over(base, "ttft"):
            with guard(run, base, "ttft"):
                x = torch.randint(0, V, (1, args.ttft_len), device=args.device)
                gen(x, 1)
                run.emit(**base, prompt_len=args.ttft_len, metric="ttft_ms",
                         value=round(gen(x, 1) * 1e3, 3), how="generate(max_new_tokens=1), one run")
        run.emit(**base, metric="peak_mem_gib",
                 value=round(torch.cuda.max_memory_allocated() / 2**30, 3),
                 how="torch.cuda.max_memory_allocated")
    finally:
        del model


def _llama_bench() -> tuple:
    exe = shutil.which("llama-bench")
    if exe:
        return exe, ""
    d = os.environ.get("LLAMA_CPP_DIR")
    if not d:
        return None, "llama-bench not on PATH and LLAMA_CPP_DIR not set"
    for cand in ("build/bin/llama-bench", "bin/llama-bench", "llama-bench"):
        p = Path(d) / cand
        if p.is_file() and os.access(p, os.X_OK):
            return str(p), ""
    return None, f"no llama-bench under LLAMA_CPP_DIR={d}"


def bench_llama_cpp(run: Run, info: Info, dtype: str):
    """llama.cpp's own llama-bench on a GGUF file prepared beforehand (not automated here)."""
    args = run.args
    base = dict(engine="llama.cpp", model=info.name, dtype=dtype, params=info.nparams)
    exe, why = _llama_bench()
    if not exe:
        run.emit(**base, metric="missing", value=why)
        return
    gguf = Path(args.gguf_dir or ".") / f"{info.name}-{dtype}.gguf"
    if not gguf.is_file():
        run.emit(**base, metric="missing", value=f"{exe} found, but no GGUF at {gguf} "
                 "(this tool does not convert models to GGUF)")
        return
    if run.over(base, "llama-bench"):
        return
    cmd = [exe, "-m", str(gguf), "-ngl", "99", "-r", str(args.repeats), "-o", "json",
           "-p", ",".join(str(L) for L in args.prefill), "-n", str(args.gen)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        run.emit(**base, metric="error", value=f"{' '.join(cmd)}: rc {r.returncode}: {r.stderr[-500:]}")
        return
    for row in json.loads(r.stdout):
        b = dict(base, engine_version=row.get("build_commit"))
        ts = float(row["avg_ts"])
        if row.get("n_gen", 0) > 0 and row.get("n_prompt", 0) == 0:
            ms = 1e3 / ts
            run.emit(**b, batch=1, metric="decode_ms_per_token", value=round(ms, 4),
                     gen=row["n_gen"], **info.decode_fields(dtype, ms), how="llama-bench tg")
        elif row.get("n_prompt", 0) > 0:
            L = int(row["n_prompt"])
            ms = L / ts * 1e3
            run.emit(**b, prompt_len=L, metric="prefill_ms", value=round(ms, 3),
                     **info.prefill_fields(L, ms), how="llama-bench pp")


BENCH = {"mambart": bench_mambart, "mamba_ssm": bench_mamba_ssm,
         "transformers": bench_transformers, "llama.cpp": bench_llama_cpp}


def measure(args) -> int:
    run = Run(args)
    run.meta = run_meta(args)
    torch = _torch_cuda(args.device)
    if args.device.startswith("cuda") and torch is None:
        run.emit(metric="note", value="torch with CUDA is not importable: no copy bandwidth, "
                 "no device memory, no torch peers")
    bw = None
    if torch:
        bw = copy_bandwidth(torch)
        run.emit(metric="copy_bandwidth_gb_s", value=round(bw, 1),
                 how="1 GiB device-to-device copy, (read+write bytes)/time, median of 10")
    else:
        run.emit(metric="skipped", what="copy_bandwidth_gb_s",
                 reason=f"measured with torch on CUDA only (device {args.device})")
    if args.workdir:
        work = Path(args.workdir)
    else:  # tmpfs when it has room: writing ~5 GB to a disk would take a good part of the budget
        shm = Path("/dev/shm")
        room = shutil.disk_usage(shm).free if shm.is_dir() else 0
        need = 3 * max(param_counts(model_config(n, args.storage_dtype))[0] for n in args.models) \
            * ITEMSIZE[args.storage_dtype]
        work = Path(tempfile.mkdtemp(prefix="mambart-bench-", dir=shm if room > need else None))
    run.emit(metric="note", value=f"model files in {work}")
    for name in args.models:
        if run.over(dict(model=name), "model"):
            continue
        c = model_config(name, args.storage_dtype)
        path = work / f"{name}-{args.storage_dtype}"
        nparams, nonemb = param_counts(c)
        t = time.perf_counter()
        if not (path / "model.safetensors").is_file():
            write_random_model(path, c)
        run.emit(model=name, metric="params", value=nparams, non_embedding=nonemb,
                 arch=c["architecture"], d_model=c["d_model"], n_layer=c["n_layer"],
                 write_s=round(time.perf_counter() - t, 2),
                 **({"bw_limit_ms_2byte": round(nparams * 2 / (bw * 1e9) * 1e3, 4)} if bw else {}))
        info = Info(name, c, path, bw)
        for dtype in args.dtypes:
            for eng in args.engines:
                if run.over(dict(engine=eng, model=name, dtype=dtype), "all"):
                    continue
                try:
                    BENCH[eng](run, info, dtype)
                except Exception as e:  # one engine failing must not end the run
                    run.emit(engine=eng, model=name, dtype=dtype, metric="error",
                             value=f"{type(e).__name__}: {e}"[:2000])
                finally:
                    free_torch()
        if not args.workdir and not args.keep:
            shutil.rmtree(path, ignore_errors=True)
    run.emit(metric="done", value=round(run.elapsed(), 1),
             budget=args.time_budget or None)
    if run.out:
        run.out.close()
    return 0


# ----------------------------------------------------------------------------- report


def load_records(path) -> list:
    recs = []
    for i, line in enumerate(Path(path).read_text().splitlines()):
        line = line.strip()
        if not line:
            continue
        try:
            recs.append(json.loads(line))
        except ValueError as e:
            raise SystemExit(f"{path}:{i + 1}: not a JSON line: {e}")
    return recs


def _fmt(v, nd=2):
    if v is None:
        return "-"
    if isinstance(v, float):
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 100:
            return f"{v:.1f}"
        return f"{v:.{nd}f}"
    return str(v)


def _params(n):
    if not isinstance(n, (int, float)):
        return "-"
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.0f} M" if n >= 1e6 else str(int(n))


def _ratio(ref, v, higher_better=False):
    if ref is None or v is None or not ref or not v:
        return "-"
    return f"{(v / ref if higher_better else ref / v):.2f}x"


def report(recs: list) -> tuple:
    """-> (markdown text, plot data)."""
    # last record wins per key
    keyed = {}
    params, missing, skipped, errors, heads, notes = {}, [], [], [], [], []
    for r in recs:
        m = r.get("metric")
        if m == "params":
            params[r["model"]] = r
        elif m in ("missing", "error"):
            missing.append(r)
        elif m == "skipped":
            skipped.append(r)
        elif m == "copy_bandwidth_gb_s":
            heads.append(r)
        elif m == "note":
            notes.append(r)
        elif "engine" in r and "model" in r:
            L = r.get("prompt_len") if m == "prefill_ms" else None
            keyed[(r["engine"], r["model"], r.get("dtype"), m, r.get("batch"), L)] = r
    bws = [h["value"] for h in heads if h.get("value")]
    bw = bws[-1] if bws else None
    meta = (heads or recs or [{}])[-1]
    models = sorted({k[1] for k in keyed} | set(params),
                    key=lambda n: (list(SHAPES).index(n) if n in SHAPES else 99, n))
    combos = sorted({(k[0], k[2]) for k in keyed},
                    key=lambda e: (ENGINES.index(e[0]) if e[0] in ENGINES else 9, str(e[1])))
    engines_v = {}
    for (eng, *_), r in keyed.items():
        if r.get("engine_version"):
            engines_v[eng] = (r["engine_version"], r.get("kernels"))

    def get(eng, model, dtype, metric, batch=None, L=None):
        return keyed.get((eng, model, dtype, metric, batch, L))

    def val(*a, **k):
        r = get(*a, **k)
        return r.get("value") if r else None

    L_all = sorted({k[5] for k in keyed if k[3] == "prefill_ms"})
    B_all = sorted({k[4] for k in keyed if k[3] == "decode_tokens_per_s"})
    out = ["# mambart side-by-side benchmark", ""]
    out.append(f"- date {meta.get('date', '-')}, device {meta.get('device', '-')}, "
               f"GPU {meta.get('gpu') or '-'}, driver {meta.get('driver') or '-'}, "
               f"commit {meta.get('git') or '-'}, torch {meta.get('torch') or '-'}")
    out.append(f"- copy bandwidth (device-to-device, read + write): "
               f"{_fmt(bw, 1) + ' GB/s' if bw else 'not measured'}")
    for eng, (v, k) in engines_v.items():
        out.append(f"- {eng} {v}" + (f": {json.dumps(k) if isinstance(k, dict) else k}" if k else ""))
    out.append("- ratios are against mamba_ssm in the same dtype (its time / this time, or this "
               "throughput / its throughput; > 1 means faster)")
    out.append("")

    out += ["## Decode, batch 1", "",
            "| model | params | engine | dtype | ms/token | GB/s | % copy BW | BW limit ms | vs mamba_ssm |",
            "|---|---:|---|---|---:|---:|---:|---:|---:|"]
    plot = []
    for mdl in models:
        for eng, dt in combos:
            r = get(eng, mdl, dt, "decode_ms_per_token", batch=1)
            if not r:
                continue
            ref = val("mamba_ssm", mdl, dt, "decode_ms_per_token", batch=1)
            out.append(f"| {mdl} | {_params(r.get('params'))} | {eng} | {dt} | {_fmt(r['value'], 3)} | "
                       f"{_fmt(r.get('gb_s'), 1)} | {_fmt(r.get('pct_copy_bw'), 1)} | "
                       f"{_fmt(r.get('bw_limit_ms'), 3)} | {_ratio(ref, r['value'])} |")
            arch = "Mamba-2" if mdl.startswith(("mamba2", "tiny2")) else "Mamba-1"
            plot.append((eng, dt, r.get("params"), r["value"], r.get("bw_limit_ms"), arch))
    out.append("")

    if B_all:
        out += ["## Decode throughput (tokens/s)", "",
                "| model | engine | dtype | " + " | ".join(f"batch {b}" for b in B_all) + " |",
                "|---|---|---|" + "---:|" * len(B_all)]
        for mdl in models:
            for eng, dt in combos:
                cells = []
                for b in B_all:
                    v = val(eng, mdl, dt, "decode_tokens_per_s", batch=b)
                    ref = val("mamba_ssm", mdl, dt, "decode_tokens_per_s", batch=b)
                    cells.append("-" if v is None else
                                 f"{_fmt(v, 1)}" + (f" ({_ratio(ref, v, True)})" if ref and eng != "mamba_ssm" else ""))
                if any(c != "-" for c in cells):
                    out.append(f"| {mdl} | {eng} | {dt} | " + " | ".join(cells) + " |")
        out.append("")

    if L_all:
        out += ["## Prefill, one prompt (ms; ratio vs mamba_ssm; TFLOP/s at the longest)", "",
                "| model | engine | dtype | " + " | ".join(f"{L} tok" for L in L_all) + " | TFLOP/s |",
                "|---|---|---|" + "---:|" * (len(L_all) + 1)]
        for mdl in models:
            for eng, dt in combos:
                cells, tf = [], None
                for L in L_all:
                    r = get(eng, mdl, dt, "prefill_ms", L=L)
                    if not r:
                        cells.append("-")
                        continue
                    ref = val("mamba_ssm", mdl, dt, "prefill_ms", L=L)
                    cells.append(_fmt(r["value"], 2) + (f" ({_ratio(ref, r['value'])})"
                                                        if ref and eng != "mamba_ssm" else ""))
                    tf = r.get("tflops", tf)
                if any(c != "-" for c in cells):
                    out.append(f"| {mdl} | {eng} | {dt} | " + " | ".join(cells) + f" | {_fmt(tf, 1)} |")
        out.append("")

    out += ["## Time to first token, load, memory", "",
            "| model | engine | dtype | TTFT ms (prompt) | vs mamba_ssm | load s | init s (peers) | peak device GiB |",
            "|---|---|---|---:|---:|---:|---:|---:|"]
    for mdl in models:
        for eng, dt in combos:
            t = get(eng, mdl, dt, "ttft_ms")
            ld, ini, mem = (val(eng, mdl, dt, m) for m in ("load_s", "init_s", "peak_mem_gib"))
            if t is None and ld is None and ini is None and mem is None:
                continue
            ref = val("mamba_ssm", mdl, dt, "ttft_ms")
            tt = f"{_fmt(t['value'], 2)} ({t.get('prompt_len')})" if t else "-"
            out.append(f"| {mdl} | {eng} | {dt} | {tt} | {_ratio(ref, t['value']) if t else '-'} | "
                       f"{_fmt(ld, 3)} | {_fmt(ini, 3)} | {_fmt(mem, 3)} |")
    out.append("")

    if missing or skipped or notes:
        out += ["## Missing, failed and skipped", ""]
        seen = set()
        for r in missing + notes:
            who = " ".join(str(r[k]) for k in ("engine", "model", "dtype") if r.get(k)) or "run"
            s = f"- {who}: {r['metric']}: {r.get('value')}"
            if s not in seen:
                seen.add(s)
                out.append(s)
        for r in skipped:
            who = " ".join(str(r[k]) for k in ("engine", "model", "dtype", "what") if r.get(k))
            s = f"- skipped {who}: {r.get('reason', '')}"
            if s not in seen:
                seen.add(s)
                out.append(s)
        out.append("")
    return "\n".join(out), plot


def write_png(plot: list, png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    lines = {}
    limit = {}
    for eng, dt, p, ms, lim, arch in plot:
        if p and ms:
            lines.setdefault((eng, dt, arch), []).append((p, ms))
            if lim and ITEMSIZE.get(dt) == 2:
                limit[p] = lim
    colors = {}
    for (eng, dt, arch), pts in sorted(lines.items()):
        pts.sort()
        col = colors.setdefault((eng, dt), f"C{len(colors) % 10}")
        ax.plot([p for p, _ in pts], [m for _, m in pts], color=col,
                marker="o" if arch == "Mamba-1" else "s", ls="-" if arch == "Mamba-1" else ":",
                label=f"{eng} {dt} {arch}")
    if limit:
        ps = sorted(limit)
        ax.plot(ps, [limit[p] for p in ps], "k--", label="bandwidth limit (2-byte weights / copy BW)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("decode ms/token, batch 1")
    ax.set_title("Batch-1 decode against model size")
    ax.grid(True, which="both", alpha=0.3)
    if lines or limit:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=PUBLISHED, choices=list(SHAPES))
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16"], choices=list(ITEMSIZE))
    ap.add_argument("--storage-dtype", default="bfloat16", choices=list(ITEMSIZE),
                    help="dtype of the written weights (every --dtypes entry loads them)")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32, 128])
    ap.add_argument("--prefill", nargs="+", type=int, default=[512, 2048, 8192, 32768])
    ap.add_argument("--ttft-len", type=int, default=512)
    ap.add_argument("--gen", type=int, default=128, help="new tokens per batch-1 decode run")
    ap.add_argument("--batch-gen", type=int, default=0, help="new tokens per batched run (0: --gen)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--streams", nargs="*", type=int, default=[],
                    help="concurrent-streams mode (mambart): N clients streaming at once, e.g. 32")
    ap.add_argument("--arrival-ms", type=float, default=2.0,
                    help="concurrent streams: client i arrives at i x this many ms")
    ap.add_argument("--stream-gen", type=int, default=64,
                    help="concurrent streams: new tokens per client")
    ap.add_argument("--engines", nargs="+", default=ENGINES, choices=ENGINES)
    ap.add_argument("--hf-models", nargs="+", default=["mamba-1.4b", "mamba2-1.3b"])
    ap.add_argument("--hf-gen", type=int, default=16)
    ap.add_argument("--hf-max-prefill", type=int, default=2048)
    ap.add_argument("--gguf-dir", default=None, help="llama.cpp: <dir>/<model>-<dtype>.gguf")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--time-budget", type=float, default=0,
                    help="seconds; after that, remaining work is skipped (0: no limit)")
    ap.add_argument("--workdir", default=None, help="keep model dirs here (reused if present)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary model dirs")
    ap.add_argument("--out", default=None, help="append JSON lines here")
    ap.add_argument("--report", default=None, help="JSON lines in: write the report instead")
    ap.add_argument("--md", default=None)
    ap.add_argument("--png", default=None)
    args = ap.parse_args(argv)
    if args.report:
        md, plot = report(load_records(args.report))
        if args.md:
            Path(args.md).write_text(md + "\n")
        else:
            print(md)
        if args.png:
            write_png(plot, args.png)
        return 0
    if min(args.batches) < 1 or min(args.prefill) < 1 or args.gen < 2 or args.repeats < 1:
        ap.error("--batches and --prefill must be >= 1, --gen >= 2, --repeats >= 1")
    return measure(args)


if __name__ == "__main__":
    sys.exit(main())

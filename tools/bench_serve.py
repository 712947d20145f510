"""Load test of an OpenAI-compatible server (issue 17): N concurrent clients (the `openai`
async client) stream completions, closed loop or at a request rate; prints time to first token,
inter-token latency and time per output token (p50 / p90 / p99), request and token throughput,
and the server's mean decode rows per step when it exports mambart's /metrics.

The server is --url (any OpenAI-compatible one), or --model: `mambart serve` started as a
separate process (or, with --in-process, on a thread of this one: BackgroundServer) on a model
directory, a bundled name (mambart-demo), or a published shape (mamba-1.4b, mamba2-1.3b, ...
with random weights as in tools/bench.py and a tokenizer of one literal token per id, so every
token is a chunk of text).

Prompts are random token ids of --prompt-len (exact lengths); every request asks for exactly
--output-len tokens (ignore_eos). Examples:

    python tools/bench_serve.py --model mambart-demo --clients 32 --requests 64
    python tools/bench_serve.py --model mamba-1.4b --device cuda --clients 128 --requests 512
    python tools/bench_serve.py --url http://host:8000/v1 --served-model-name M --rate 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def literal_tokenizer(vocab: int):
    """A tokenizers.Tokenizer with one literal token per id ("<17>"): any id decodes to text."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"<{i}>": i for i in range(vocab)}, unk_token="<0>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def make_model(name: str, dtype: str, workdir: Path):
    """-> (model argument for mambart.Generator, tokenizer or None)."""
    sys.path.insert(0, str(ROOT / "tools"))
    sys.path.insert(0, str(ROOT / "tests"))
    import bench

    if name not in bench.SHAPES:
        return name, None
    c = bench.model_config(name, dtype)
    path = workdir / name
    bench.write_random_model(path, c)
    tok = literal_tokenizer(c["vocab_size"])
    tok.save(str(path / "tokenizer.json"))
    return str(path), tok


def pct(xs, q):
    return float(np.percentile(xs, q)) * 1e3 if len(xs) else float("nan")


async def run_load(url, model, api_key, prompts, output_len, clients, rate, seed):
    """-> (per-request records, wall seconds)."""
    import openai

    rng = np.random.default_rng(seed)
    sem = asyncio.Semaphore(clients)
    records = []

    async def one(c, prompt):
        async with sem:
            t0 = time.perf_counter()
            ttft, times, n_tokens = None, [], 0
            s = await c.completions.create(model=model, prompt=prompt, max_tokens=output_len,
                                           temperature=0, stream=True,
                                           stream_options={"include_usage": True},
                                           extra_body={"ignore_eos": True})
            async for ch in s:
                now = time.perf_counter()
                if ch.usage is not None:
                    n_tokens = ch.usage.completion_tokens
                if ch.choices and ch.choices[0].text:
                    if ttft is None:
                        ttft = now - t0
                    times.append(now)
            t1 = time.perf_counter()
            records.append(dict(ttft=ttft if ttft is not None else t1 - t0, e2e=t1 - t0,
                                tokens=n_tokens, gaps=list(np.diff(times))))

    async with openai.AsyncOpenAI(base_url=url, api_key=api_key or "-", max_retries=0,
                                  timeout=3600) as c:
        t_start = time.perf_counter()
        tasks = []
        for p in prompts:
            tasks.append(asyncio.create_task(one(c, p)))
            if rate > 0:  # Poisson arrivals
                await asyncio.sleep(float(rng.exponential(1.0 / rate)))
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - t_start
    return records, wall


def scrape(url):
    import httpx

    try:
        text = httpx.get(url.rstrip("/").removesuffix("/v1") + "/metrics", timeout=10).text
    except Exception:
        return {}
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            k, _, v = line.rpartition(" ")
            try:
                out[k] = float(v)
            except ValueError:
                pass
    return out


def summarize(records, wall, before, after, args) -> dict:
    ttft = [r["ttft"] for r in records]
    gaps = [g for r in records for g in r["gaps"]]
    tpot = [(r["e2e"] - r["ttft"]) / (r["tokens"] - 1) for r in records if r["tokens"] > 1]
    out_tokens = sum(r["tokens"] for r in records)
    res = dict(requests=len(records), clients=args.clients, rate=args.rate,
               prompt_len=args.prompt_len, output_len=args.output_len, wall_s=round(wall, 6),
               req_per_s=len(records) / wall, output_tok_per_s=out_tokens / wall,
               total_tok_per_s=(out_tokens + len(records) * args.prompt_len) / wall)
    for name, xs in (("ttft", ttft), ("itl", gaps), ("tpot", tpot)):
        for q in (50, 90, 99):
            res[f"{name}_p{q}_ms"] = pct(xs, q)
    k_steps, k_rows = "mambart_engine_steps_total", "mambart_engine_rows_decoded_total"
    if k_steps in after and k_steps in before and after[k_steps] > before[k_steps]:
        res["mean_rows_per_step"] = ((after[k_rows] - before[k_rows])
                                     / (after[k_steps] - before[k_steps]))
    return res


def print_table(res: dict) -> None:
    print(f"requests {res['requests']} ({res['clients']} clients, "
          f"{'closed loop' if not res['rate'] else str(res['rate']) + ' req/s'}), prompt "
          f"{res['prompt_len']} tokens, output {res['output_len']} tokens, {res['wall_s']} s")
    print(f"throughput: {res['req_per_s']:.2f} req/s, {res['output_tok_per_s']:.1f} output tok/s,"
          f" {res['total_tok_per_s']:.1f} total tok/s"
          + (f"; mean rows per decode step {res['mean_rows_per_step']:.1f}"
             if "mean_rows_per_step" in res else ""))
    print("| metric | p50 ms | p90 ms | p99 ms |\n|---|---|---|---|")
    for name, label in (("ttft", "time to first token"), ("itl", "inter-token latency"),
                        ("tpot", "time per output token")):
        print(f"| {label} | {res[name + '_p50_ms']:.1f} | {res[name + '_p90_ms']:.1f} | "
              f"{res[name + '_p99_ms']:.1f} |")


def spawn_server(model: str, name: str, device: str, limits: dict):
    """`mambart serve` in a process of its own on a free port: -> (process, base URL)."""
    import re

    import httpx

    args = [sys.executable, "-m", "mambart", "serve", model, "--port", "0", "--device", device,
            "--served-model-name", name, "--log-level", "warning"]
    for k, v in limits.items():
        args += ["--" + k.replace("_", "-"), str(v)]
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()
    m = re.search(r"(http://\S+/v1)", line)
    if not m:
        proc.kill()
        raise RuntimeError(f"the server did not start: {line}{proc.stderr.read()[-2000:]}")
    url = m.group(1)
    import threading  # keep reading its stderr, so that a full pipe never blocks it

    threading.Thread(target=proc.stderr.read, daemon=True).start()
    for _ in range(600):
        try:
            if httpx.get(url[:-3] + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the server did not answer /health")


def git_sha() -> str:
    if not (ROOT / ".git").exists():  # a copy of the tree: not the commit of a repo above it
        return ""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=ROOT, timeout=10).stdout.strip()
    except OSError:
        return ""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--url", help="a running server's base URL (http://host:port/v1)")
    src.add_argument("--model", help="start a mambart server in this process on this model "
                                     "(a directory, a bundled name or a published shape)")
    p.add_argument("--served-model-name", default=None,
                   help="the model name to request (default: --model, or the server's first)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--device", default="cpu", help="--model's device (default cpu)")
    p.add_argument("--dtype", default="bfloat16", help="a published shape's dtype (bfloat16)")
    p.add_argument("--in-process", action="store_true",
                   help="--model's server on a thread of this process, not a process of its own "
                        "(the clients then share its GIL)")
    p.add_argument("--clients", type=int, default=32, help="concurrent requests at most (32)")
    p.add_argument("--requests", type=int, default=None, help="requests in all (2 x clients)")
    p.add_argument("--rate", type=float, default=0.0,
                   help="requests per second, Poisson arrivals (default 0: closed loop)")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (128)")
    p.add_argument("--output-len", type=int, default=128, help="tokens per request (128)")
    p.add_argument("--warmup", type=int, default=None,
                   help="requests run first and not measured (default: --clients)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON line")
    a = p.parse_args(argv)
    if a.clients < 1 or a.prompt_len < 1 or a.output_len < 1:
        p.error("--clients, --prompt-len and --output-len must be >= 1")
    n = a.requests if a.requests is not None else 2 * a.clients
    warm = a.clients if a.warmup is None else a.warmup

    server = proc = None
    with tempfile.TemporaryDirectory() as tmp:
        if a.model is not None:
            model, tok = make_model(a.model, a.dtype, Path(tmp))
            name = a.served_model_name or a.model
            limits = dict(max_running=a.clients, max_queue=max(n, warm, 1),
                          max_tokens=a.output_len, max_prompt_tokens=a.prompt_len)
            if a.in_process:
                import mambart
                from mambart.serve import BackgroundServer, ServeConfig

                gen = mambart.Generator(model, device=a.device, tokenizer=tok)
                server = BackgroundServer(gen, ServeConfig(model_name=name, **limits)).start()
                url, vocab = server.url, gen.vocab_size
            else:
                proc, url = spawn_server(model, name, a.device, limits)
                vocab = tok.get_vocab_size() if tok is not None else 256
        else:
            import openai

            url = a.url
            with openai.OpenAI(base_url=url, api_key=a.api_key or "-") as c:
                name = a.served_model_name or c.models.list().data[0].id
            vocab = 256  # ids every tokenizer has
        rng = np.random.default_rng(a.seed)
        prompts = [rng.integers(1, vocab, a.prompt_len).tolist() for _ in range(n + warm)]
        try:
            if warm:
                asyncio.run(run_load(url, name, a.api_key, prompts[:warm], a.output_len,
                                     a.clients, 0.0, a.seed))
            before = scrape(url)
            records, wall = asyncio.run(run_load(url, name, a.api_key, prompts[warm:],
                                                 a.output_len, a.clients, a.rate, a.seed))
            after = scrape(url)
        finally:
            if server is not None:
                server.stop()
            if proc is not None:
                proc.terminate()
                proc.wait(60)
    res = summarize(records, wall, before, after, a)
    res.update(model=a.model or name, device=a.device if a.model else None, git_sha=git_sha(),
               date=time.strftime("%Y-%m-%d"))
    if a.json:
        print(json.dumps(res))
    else:
        print_table(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())

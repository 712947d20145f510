"""`mambart serve`: an OpenAI-compatible HTTP server over the engine (issue 17).

FastAPI + uvicorn. Every HTTP request becomes engine requests (one per prompt and choice), so
concurrent requests share decode steps. The event loop never waits on the engine: requests are
submitted with a notifier pipe (the engine thread writes the request's key after each delivery)
and one reader on the loop polls the sequences named (EngineBridge): a stream costs no thread.

Routes: POST /v1/completions and /v1/chat/completions (JSON, or Server-Sent Events in OpenAI's
chunk format ending with `data: [DONE]` when "stream" is true), GET /v1/models, GET /health,
GET /metrics (Prometheus text). Errors are OpenAI error objects: 400 (malformed JSON, unknown
model, bad parameter values, a prompt over --max-prompt-tokens), 401 (API key), 429 with
Retry-After (the engine's queue is full), 503 (draining). A client that disconnects has its
requests cancelled; SIGTERM drains (stop accepting, finish or cancel in-flight requests within
--drain-timeout, exit 0). docs/serving.md documents parameters, errors and metrics.

Needs the `serve` extra (pip install "mambart[serve]"): fastapi, uvicorn, jinja2,
prometheus-client.
"""

import asyncio
import contextlib
import json
import os
import signal
import struct
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from . import _C
from ._openai import APIError, Params, _bad, _bool, _is_int, parse_messages, parse_params

MAX_ECHO_LOGPROB_TOKENS = 1024  # echo + logprobs scores the prompt from its full logits
MAX_BODY_BYTES = 32 << 20


# ---------------------------------------------------------------- configuration

@dataclass
class ServeConfig:
    """What `mambart serve` was started with (docs/serving.md)."""

    model_name: str                       # the name clients pass as "model"
    max_prompt_tokens: int = 32768        # longer prompts: 400
    max_tokens: int = 4096                # the most a request may generate; chat's default
    max_running: int = 256                # engine decode slots at most
    max_queue: int = 256                  # requests waiting for a slot before 429
    api_key: Optional[str] = None         # when set, /v1 routes need "Authorization: Bearer KEY"
    chat_template: Optional[str] = None   # template text (None: the model's, if any)
    drain_timeout: float = 30.0           # SIGTERM: seconds to finish in-flight requests
    retry_after: int = 1                  # the Retry-After of a 429, seconds


# ---------------------------------------------------------------- the engine, from the loop

class EngineBridge:
    """Reads engine sequences from the event loop without a thread per request.

    Requests are submitted with a _C.Notifier and a key each: the engine thread writes the key
    to the notifier's pipe after each delivery. The loop's reader reads the keys and polls
    those sequences (read with timeout 0), putting (choice, tokens, logprobs) into the owner's
    asyncio.Queue, and (choice, None, None) once the sequence finished and was read out. After
    a dropped key (a full pipe) it polls every sequence it holds."""

    def __init__(self):
        self.notifier = _C.Notifier()
        self._fd = self.notifier.fileno()
        self._active: Dict[int, tuple] = {}  # key -> (seq, with logprobs, queue, choice)
        self._next_key = 1
        self._partial = b""
        self._loop: Optional[asyncio.AbstractEventLoop] = None

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Reads the pipe on `loop`, the loop the requests run on (one loop per server)."""
        if self._loop is None:
            self._loop = loop
            loop.add_reader(self._fd, self._on_readable)
        elif self._loop is not loop:
            raise RuntimeError("EngineBridge: requests from a second event loop")

    def keys(self, n: int) -> List[int]:
        k = self._next_key
        self._next_key += n
        return list(range(k, k + n))

    def add(self, key: int, seq, logprobs: bool, queue: asyncio.Queue, choice) -> None:
        self._active[key] = (seq, logprobs, queue, choice)
        self._poll(key)  # what arrived before it was registered

    def _on_readable(self) -> None:
        try:  # one read: keys written meanwhile wake the loop again
            data = self._partial + os.read(self._fd, 1 << 16)
        except BlockingIOError:
            data = self._partial
        cut = len(data) - len(data) % 8
        self._partial = data[cut:]
        keys = set(struct.unpack(f"<{cut // 8}Q", data[:cut]))
        if self.notifier.take_overflow():
            keys = set(self._active)
        for k in keys:
            self._poll(k)

    def _poll(self, k: int) -> None:
        entry = self._active.get(k)
        if entry is None:
            return
        seq, lp, queue, choice = entry
        got = seq.read_logprobs(0.0) if lp else seq.read(0.0)
        if got is None:
            del self._active[k]
            queue.put_nowait((choice, None, None))
            return
        toks, lps = got if lp else (got, None)
        if toks:
            queue.put_nowait((choice, toks, lps))
            if seq.finished:  # read the end now rather than at the next key
                self._poll(k)

    def cancel_all(self) -> None:
        for seq, *_ in list(self._active.values()):
            seq.cancel()

    def __len__(self) -> int:
        return len(self._active)

    def close(self) -> None:
        """Stops reading and cancels what is left (the pipe closes once the engine has let go
        of every request's callback)."""
        if self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._fd)
        self.cancel_all()
        self._active.clear()


# ---------------------------------------------------------------- metrics

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4,
                   0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)

# engine_stats() keys exported as counters (the rest, numbers, as gauges)
ENGINE_COUNTERS = ("steps", "rows_decoded", "prefill_calls", "tokens_generated", "prompt_tokens",
                   "submitted", "finished", "cancelled", "timed_out", "failed", "rejected")


class Metrics:
    """Prometheus metrics in their own registry (several servers may share a process)."""

    def __init__(self, state: "ServerState"):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        r = self.registry = CollectorRegistry()
        self.requests = Counter("mambart_requests", "HTTP requests by route and status code",
                                ["route", "status"], registry=r)
        self.prompt_tokens = Counter("mambart_prompt_tokens",
                                     "Prompt tokens of the requests admitted", registry=r)
        self.generation_tokens = Counter("mambart_generation_tokens",
                                         "Tokens generated (sent to clients)", registry=r)
        self.ttft = Histogram("mambart_time_to_first_token_seconds",
                              "From a request's arrival to its first generated token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("mambart_inter_token_latency_seconds",
                             "Time between a request's successive tokens",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("mambart_request_latency_seconds",
                             "From a request's arrival to its last token",
                             buckets=LATENCY_BUCKETS, registry=r)
        r.register(_EngineCollector(state))

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class _EngineCollector:
    """Gauges and counters read from Generator.engine_stats() at each scrape."""

    def __init__(self, state: "ServerState"):
        self.state = state

    def describe(self):
        return []

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        st = self.state.gen.engine_stats()
        yield GaugeMetricFamily("mambart_requests_running",
                                "Requests in the engine: decoding or prefilling",
                                value=st.get("running", 0) + st.get("prefilling", 0))
        yield GaugeMetricFamily("mambart_requests_waiting", "Requests queued for a decode slot",
                                value=st.get("queued", 0))
        # Multi-turn reuse: the prompt tokens the engine's prompt cache served, and the prompt
        # tokens it ran through the model.
        yield CounterMetricFamily("mambart_prompt_tokens_cached",
                                  "Prompt tokens served from a cached state (not prefilled)",
                                  value=st.get("cached_tokens", 0))
        yield CounterMetricFamily("mambart_prompt_tokens_prefilled",
                                  "Prompt tokens run through the model",
                                  value=st.get("prompt_tokens", 0))
        for k, v in sorted(st.items()):
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            if k in ENGINE_COUNTERS:
                yield CounterMetricFamily(f"mambart_engine_{k}", f"engine_stats()['{k}']",
                                          value=v)
            else:
                yield GaugeMetricFamily(f"mambart_engine_{k}", f"engine_stats()['{k}']", value=v)


# ---------------------------------------------------------------- server state

class ServerState:
    """Everything the routes share: the generator, the config, the bridge, the metrics."""

    def __init__(self, gen, cfg: ServeConfig):
        if gen.tokenizer is None:
            raise ValueError("mambart serve needs a tokenizer (the model's tokenizer.json or "
                             "--tokenizer)")
        self.gen, self.cfg = gen, cfg
        self.created = int(time.time())
        if not gen._g.engine_started:
            to_str = getattr(gen.tokenizer, "to_str", None)
            if callable(to_str):  # the engine matches stop strings on this tokenizer's bytes
                with contextlib.suppress(ValueError):
                    gen._g.set_tokenizer_json(to_str())
            gen._g.start_engine(max_slots=cfg.max_running, max_queue=cfg.max_queue)
        self.bridge = EngineBridge()
        self.metrics = Metrics(self)
        self.draining = False
        self.inflight = 0
        from .chat_template import ChatTemplate, find_chat_template, special_tokens

        src = cfg.chat_template or find_chat_template(gen.model_dir, gen.config)
        self.template = (ChatTemplate(src, special_tokens(gen.model_dir, gen.config))
                         if src else None)
        self._token_bytes: Optional[list] = None

    def token_bytes(self, tok: int) -> bytes:
        if self._token_bytes is None:
            to_str = getattr(self.gen.tokenizer, "to_str", None)
            try:
                self._token_bytes = _C.token_bytes(to_str()) if callable(to_str) else []
            except ValueError:
                self._token_bytes = []
        if 0 <= tok < len(self._token_bytes) and self._token_bytes[tok]:
            return self._token_bytes[tok]
        return self.gen.tokenizer.decode([tok], skip_special_tokens=False).encode("utf-8")

    def token_str(self, tok: int) -> str:
        b = self.token_bytes(tok)
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError:  # a piece of a character: OpenAI's "bytes:\\x.." form
            return "bytes:" + "".join(f"\\x{c:02x}" for c in b)


# ---------------------------------------------------------------- one request's choices

_REASONS = {"length": "length", "eos": "stop", "stop_token": "stop", "stop_string": "stop",
            "cancelled": "abort", "timeout": "abort"}


class _Choice:
    """One engine request: its detokenizer (with stop strings) and what was kept."""

    def __init__(self, index: int, prompt_index: int, tokenizer, stops: List[str]):
        from .text import TextStream

        self.index, self.prompt_index = index, prompt_index
        self.ts = TextStream(tokenizer, stops)
        self.seq, self.key = None, 0
        self.token_ids: List[int] = []
        self.logprobs: List[tuple] = []   # (token, logprob, [(id, logprob)]) per kept token
        self.finish_reason: Optional[str] = None
        self.error: Optional[str] = None
        self.cached = 0

    def feed(self, tokens, lps) -> Tuple[str, list]:
        """-> (new text, the kept tokens' logprobs)."""
        text, kept = [], []
        for i, tok in enumerate(tokens):
            if self.ts.stopped:
                break
            piece = self.ts.push(tok)
            self.token_ids.append(tok)
            if lps is not None:
                lp, top = lps[i]
                kept.append((tok, lp, top))
            if piece:
                text.append(piece)
            if self.ts.stopped:
                self.seq.stop("stop_string")
        self.logprobs += kept
        return "".join(text), kept

    def finish(self) -> str:
        tail = self.ts.finish()
        err = self.seq.error
        if err:
            self.error = err
        res = self.seq.result
        # the prompt tokens that a cached state served (the engine's prompt cache)
        self.cached = max(0, res.prompt_tokens - res.prefill_tokens)
        reason = res.finish_reason
        self.finish_reason = "stop" if self.ts.stopped else _REASONS.get(reason, "stop")
        return tail


class _Job:
    """The engine requests of one HTTP request: submitted together, read from one queue."""

    def __init__(self, state: ServerState, prompts: List[List[int]], params: Params,
                 t_arrival: float):
        self.state, self.prompts, self.params = state, prompts, params
        self.t0 = t_arrival
        self.queue: asyncio.Queue = asyncio.Queue()
        self.choices: List[_Choice] = []
        self.t_last: Dict[int, float] = {}
        self.done = 0
        self.ended = False

    def submit(self) -> None:
        st, p = self.state, self.params
        gen = st.gen
        st.bridge.attach(asyncio.get_running_loop())
        seqs_all = []
        try:
            for pi, ids in enumerate(self.prompts):
                keys = st.bridge.keys(p.n)
                try:
                    seqs, _ = gen._submit_rows([ids] * p.n, None, p.engine_kwargs(), False,
                                                  p.stop, logprobs=p.logprobs, block=False,
                                                  notifier=st.bridge.notifier, keys=keys)
                except _C.EngineBusy as e:
                    raise APIError(429, f"the server is busy ({e})", "rate_limit_error",
                                   code="rate_limit_exceeded",
                                   headers={"Retry-After": str(st.cfg.retry_after)}) from None
                except MemoryError as e:
                    raise APIError(503, str(e), "server_error", code="insufficient_memory") \
                        from None
                except ValueError as e:
                    raise APIError(400, str(e)) from None
                except RuntimeError as e:  # the engine is shutting down
                    raise APIError(503, str(e), "server_error") from None
                seqs_all += seqs
                for j, seq in enumerate(seqs):
                    ch = _Choice(pi * p.n + j, pi, gen.tokenizer, p.stop)
                    ch.seq, ch.key = seq, keys[j]
                    self.choices.append(ch)
        except BaseException:
            for s in seqs_all:
                s.cancel()
            raise
        for ch in self.choices:
            st.bridge.add(ch.key, ch.seq, p.logprobs is not None, self.queue, ch.index)
        st.metrics.prompt_tokens.inc(sum(len(ids) for ids in self.prompts))
        st.inflight += 1

    def cancel(self) -> None:
        for ch in self.choices:
            if not ch.seq.finished:
                ch.seq.cancel()

    def end(self) -> None:
        """The HTTP request is over (answered, failed or gone): cancels what still runs."""
        self.cancel()
        if self.choices and not self.ended:
            self.ended = True
            self.state.inflight -= 1

    async def events(self):
        """Yields (choice, text, logprobs, finished) until every choice has finished."""
        m = self.state.metrics
        while self.done < len(self.choices):
            key, toks, lps = await self.queue.get()
            ch = self.choices[key]
            now = time.perf_counter()
            if toks is None:
                tail = ch.finish()
                self.done += 1
                self._account(ch, now)
                yield ch, tail, [], True
                continue
            prev = self.t_last.get(key)
            if prev is None:
                m.ttft.observe(now - self.t0)
                for _ in toks[1:]:  # tokens that came with the first: no wait after it
                    m.itl.observe(0.0)
            else:  # k tokens in one delivery: k gaps of a k-th of the time each
                for _ in toks:
                    m.itl.observe((now - prev) / len(toks))
            self.t_last[key] = now
            text, kept = ch.feed(toks, lps)
            if text or kept:
                yield ch, text, kept, False

    def _account(self, ch: _Choice, now: float) -> None:
        m = self.state.metrics
        m.generation_tokens.inc(len(ch.token_ids))
        m.e2e.observe(now - self.t0)

    def usage(self) -> dict:
        prompt = sum(len(ids) for ids in self.prompts)
        completion = sum(len(c.token_ids) for c in self.choices)
        cached = sum(c.cached for c in self.choices if c.index % self.params.n == 0)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}


# ---------------------------------------------------------------- logprobs objects

def _completion_logprobs(state: ServerState, entries: list, offset: int) -> Tuple[dict, int]:
    """OpenAI's completions logprobs object for (token, logprob, top) entries; text_offset
    counts characters from `offset`."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for tok, lp, top in entries:
        s = state.token_str(tok)
        out["tokens"].append(s)
        out["token_logprobs"].append(lp)
        out["top_logprobs"].append(None if top is None else
                                   {state.token_str(t): v for t, v in top})
        out["text_offset"].append(offset)
        offset += len(s)
    return out, offset


def _chat_logprobs(state: ServerState, entries: list) -> dict:
    def one(tok, lp):
        return {"token": state.token_str(tok), "logprob": lp,
                "bytes": list(state.token_bytes(tok))}

    return {"content": [dict(one(tok, lp), top_logprobs=[one(t, v) for t, v in top])
                        for tok, lp, top in entries]}


def _prompt_logprobs(gen, ids: List[int], top_n: int) -> list:
    """(token, logprob, top) per prompt token (echo): the first has no context (None)."""
    import numpy as np

    out = [(ids[0], None, None)]
    if len(ids) < 2:
        return out
    lg = gen.logits(ids[:-1]).astype(np.float64)
    m = lg.max(axis=1, keepdims=True)
    lp = lg - m - np.log(np.exp(lg - m).sum(axis=1, keepdims=True))
    for i in range(1, len(ids)):
        row = lp[i - 1]
        top = []
        if top_n:
            order = np.argsort(-row, kind="stable")[:top_n]
            top = [(int(t), float(row[t])) for t in order]
        out.append((ids[i], float(row[ids[i]]), top))
    return out


# ---------------------------------------------------------------- the app

def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n\n"


def create_app(state: ServerState):
    """The FastAPI application over `state` (used by `mambart serve` and the Ray deployment)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException

    cfg = state.cfg
    SSEResponse = _sse_response_class()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        state.bridge.close()

    app = FastAPI(title="mambart", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.mambart = state

    def error(e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        code = "not_found" if e.status_code == 404 else None
        return error(APIError(e.status_code, str(e.detail), code=code))

    @app.exception_handler(Exception)
    async def _internal(request, e):
        return error(APIError(500, f"internal error: {type(e).__name__}: {e}", "server_error"))

    def authorize(request: Request) -> None:
        if cfg.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, key = auth.partition(" ")
        if scheme.lower() != "bearer" or not _same(key.strip(), cfg.api_key):
            raise APIError(401, "invalid or missing API key (Authorization: Bearer KEY)",
                           "authentication_error", code="invalid_api_key")

    async def read_body(request: Request) -> dict:
        if state.draining:
            raise APIError(503, "the server is shutting down", "server_error")
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise APIError(400, f"the request body is over {MAX_BODY_BYTES} bytes")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != cfg.model_name:
            raise APIError(400, f"the model {json.dumps(model)} does not exist: this server "
                                f"serves {json.dumps(cfg.model_name)}", param="model",
                           code="model_not_found")
        return body

    def encode_prompt(p, i: int) -> List[int]:
        gen = state.gen
        if isinstance(p, str):
            ids = gen.tokenizer.encode(p).ids
        else:
            try:
                ids = gen._encode(p)
            except ValueError as e:
                raise _bad("prompt", f"prompt[{i}]: {e}") from None
        return check_len(ids, "prompt")

    def check_len(ids: List[int], param: str) -> List[int]:
        if not ids:
            raise _bad(param, f"the {param} is empty: give at least one token")
        if len(ids) > cfg.max_prompt_tokens:
            raise APIError(400, f"the {param} has {len(ids)} tokens, over this server's limit "
                                f"of {cfg.max_prompt_tokens} (--max-prompt-tokens)",
                           param=param, code="context_length_exceeded")
        return ids

    def prompts_of(body) -> List[List[int]]:
        p = body.get("prompt")
        if isinstance(p, str):
            return [encode_prompt(p, 0)]
        if isinstance(p, list) and p:
            if all(isinstance(x, str) for x in p):
                return [encode_prompt(x, i) for i, x in enumerate(p)]
            if all(_is_int(x) for x in p):
                return [encode_prompt([int(x) for x in p], 0)]
            if all(isinstance(x, list) for x in p):
                return [encode_prompt(x, i) for i, x in enumerate(p)]
        raise _bad("prompt", "prompt must be a string, a list of strings, a list of token ids "
                             "or a list of lists of token ids (non-empty)")

    async def run(request: Request, job: _Job, respond):
        """Runs `respond(job)` (a coroutine) while watching for the client to go away."""
        task = asyncio.ensure_future(respond(job))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not task.done():
                job.cancel()
                task.cancel()
                raise APIError(499, "the client disconnected", "server_error")
            return task.result()
        finally:
            gone.cancel()
            job.end()

    async def answer(request: Request, job: _Job, kind: str, prelude, on_event, final):
        """The response to a submitted job, for either route. Streamed: the `prelude()` choice
        deltas, then `on_event(choice, text, logprobs, finished)`'s per event, the usage chunk
        when asked, `[DONE]`. Whole: `final(choice, its text)` per choice, and the usage."""
        rid = ("cmpl-" if kind == "text_completion" else "chatcmpl-") + uuid.uuid4().hex
        created = int(time.time())

        def obj(name, choices, **more):
            return dict({"id": rid, "object": name, "created": created,
                         "model": cfg.model_name, "choices": choices}, **more)

        if job.params.stream:
            name = kind if kind == "text_completion" else kind + ".chunk"

            async def stream():
                try:
                    first = b"".join(_sse(obj(name, [c])) for c in prelude())
                    if first:
                        yield first
                    buf = []  # events already queued go out in one write
                    async for ch, text, kept, fin in job.events():
                        if ch.error:
                            buf.append(_sse(APIError(500, ch.error, "server_error").body()))
                        else:
                            buf += [_sse(obj(name, [c])) for c in on_event(ch, text, kept, fin)]
                        if buf and job.queue.empty():
                            yield b"".join(buf)
                            buf = []
                    if job.params.include_usage:
                        buf.append(_sse(obj(name, [], usage=job.usage())))
                    yield b"".join(buf) + b"data: [DONE]\n\n"
                finally:
                    job.end()

            return SSEResponse(stream(), job.end)

        async def respond(job):
            texts = {c.index: [] for c in job.choices}
            async for ch, text, _, _ in job.events():
                texts[ch.index].append(text)
            for ch in job.choices:
                if ch.error:
                    raise APIError(500, ch.error, "server_error")
            return obj(kind, [final(ch, "".join(texts[ch.index])) for ch in job.choices],
                       usage=job.usage())

        try:
            return await run(request, job, respond)
        finally:
            job.end()

    # ---- /v1/completions
    @app.post("/v1/completions")
    async def completions(request: Request):
        t0 = time.perf_counter()
        authorize(request)
        body = await read_body(request)
        params = parse_params(body, cfg.max_tokens, chat=False)
        prompts = prompts_of(body)
        echo_lps = None
        if params.echo and params.logprobs is not None:
            if any(len(ids) > MAX_ECHO_LOGPROB_TOKENS for ids in prompts):
                raise _bad("echo", f"echo with logprobs takes prompts of at most "
                                   f"{MAX_ECHO_LOGPROB_TOKENS} tokens")
            echo_lps = [await asyncio.to_thread(_prompt_logprobs, state.gen, ids,
                                                params.logprobs) for ids in prompts]
        job = _Job(state, prompts, params, t0)
        job.submit()
        offsets = {}  # text_offset of each choice's next token (streamed logprobs)

        def echo_text(pi: int) -> str:
            return state.gen.tokenizer.decode(prompts[pi]) if params.echo else ""

        def choice(ch, text, lp_obj, reason):
            return {"index": ch.index, "text": text, "logprobs": lp_obj, "finish_reason": reason}

        def prelude():
            for ch in job.choices if params.echo else ():
                lp_obj = None
                if echo_lps is not None:
                    lp_obj, offsets[ch.index] = _completion_logprobs(
                        state, echo_lps[ch.prompt_index], 0)
                yield choice(ch, echo_text(ch.prompt_index), lp_obj, None)

        def on_event(ch, text, kept, fin):
            lp_obj = None
            if params.logprobs is not None and kept:
                lp_obj, offsets[ch.index] = _completion_logprobs(state, kept,
                                                                 offsets.get(ch.index, 0))
            if text or lp_obj or fin:
                yield choice(ch, text, lp_obj, ch.finish_reason if fin else None)

        def final(ch, text):
            lp_obj = None
            if params.logprobs is not None:
                entries = (echo_lps[ch.prompt_index] if echo_lps else []) + ch.logprobs
                lp_obj, _ = _completion_logprobs(state, entries, 0)
            return choice(ch, echo_text(ch.prompt_index) + text, lp_obj, ch.finish_reason)

        return await answer(request, job, "text_completion", prelude, on_event, final)

    # ---- /v1/chat/completions
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        t0 = time.perf_counter()
        authorize(request)
        body = await read_body(request)
        params = parse_params(body, cfg.max_tokens, chat=True)
        messages = parse_messages(body)
        if state.template is None:
            raise APIError(400, "this model has no chat template: start the server with "
                                "--chat-template FILE, or use /v1/completions")
        from .chat_template import ChatTemplateError

        add_gen = _bool(body, "add_generation_prompt", True)
        try:
            text = state.template.render(messages, add_gen)
        except ChatTemplateError as e:
            raise _bad("messages", str(e)) from None
        ids = check_len(state.gen.tokenizer.encode(text, add_special_tokens=False).ids,
                        "messages")
        job = _Job(state, [ids], params, t0)
        job.submit()
        want_lp = params.logprobs is not None

        def delta(ch, d, lp_obj, reason):
            return {"index": ch.index, "delta": d, "logprobs": lp_obj, "finish_reason": reason}

        def prelude():
            return [delta(ch, {"role": "assistant", "content": ""}, None, None)
                    for ch in job.choices]

        def on_event(ch, text, kept, fin):
            lp_obj = _chat_logprobs(state, kept) if want_lp and kept else None
            if text or lp_obj:
                yield delta(ch, {"content": text}, lp_obj, None)
            if fin:
                yield delta(ch, {}, None, ch.finish_reason)

        def final(ch, text):
            return {"index": ch.index, "message": {"role": "assistant", "content": text},
                    "logprobs": _chat_logprobs(state, ch.logprobs) if want_lp else None,
                    "finish_reason": ch.finish_reason}

        return await answer(request, job, "chat.completion", prelude, on_event, final)

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list",
                "data": [{"id": cfg.model_name, "object": "model", "created": state.created,
                          "owned_by": "mambart", "root": str(state.gen.model_dir)}]}

    @app.get("/health")
    async def health():
        if state.draining:
            return JSONResponse({"status": "draining", "pid": os.getpid()}, status_code=503)
        return {"status": "ok", "pid": os.getpid()}  # the pid tells replicas apart

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    routes = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"}
    return _CountRequests(app, state.metrics, routes)


def _sse_response_class():
    from starlette.responses import StreamingResponse

    class SSEResponse(StreamingResponse):
        """A text/event-stream response that watches for the client going away while it
        streams (whatever ASGI version the server speaks): a disconnect cancels the stream;
        `on_close` runs however it ends (the job's end: its engine requests are cancelled)."""

        media_type = "text/event-stream"

        def __init__(self, body, on_close):
            super().__init__(body, 200, {"cache-control": "no-cache"})
            self.on_close = on_close

        async def __call__(self, scope, receive, send):
            import anyio

            async def stream(cancel):
                try:
                    await send({"type": "http.response.start", "status": self.status_code,
                                "headers": self.raw_headers})
                    async for chunk in self.body_iterator:
                        await send({"type": "http.response.body", "body": chunk,
                                    "more_body": True})
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                except OSError:  # the client went away mid-write
                    pass
                finally:
                    cancel()

            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(stream, tg.cancel_scope.cancel)
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    tg.cancel_scope.cancel()
            finally:
                with contextlib.suppress(Exception):
                    await self.body_iterator.aclose()
                self.on_close()

    return SSEResponse


def _same(a: str, b: str) -> bool:
    import hmac

    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))


async def _disconnected(request) -> None:
    """Returns when the client has gone away (the body was read: receive() waits for that)."""
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


class _CountRequests:
    """ASGI middleware: mambart_requests_total{route, status} for every HTTP response."""

    def __init__(self, app, metrics: Metrics, routes):
        self.app, self.metrics, self.routes = app, metrics, routes
        self.state = app.state  # the FastAPI app's state (tests, Ray) stays reachable

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def send_status(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = scope.get("path", "")
            self.metrics.requests.labels(path if path in self.routes else "other",
                                         str(status[0])).inc()


# ---------------------------------------------------------------- running it

class _Server:
    """uvicorn's Server with mambart's SIGTERM / SIGINT handling: the first signal drains
    (stop accepting, 503 for new requests on open connections, wait for in-flight requests up
    to the drain timeout, then cancel what is left), the second forces; the process then exits
    0 (uvicorn itself would re-raise the signal)."""

    def __init__(self, config, state: ServerState):
        import uvicorn

        class Server(uvicorn.Server):
            def handle_exit(inner, sig, frame):  # noqa: N805
                loop = inner._mambart_loop
                if loop is None:
                    inner.should_exit = True
                    return
                loop.call_soon_threadsafe(self._on_signal)

            @contextlib.contextmanager
            def capture_signals(inner):  # noqa: N805
                if threading.current_thread() is not threading.main_thread():
                    yield
                    return
                old = {s: signal.signal(s, inner.handle_exit)
                       for s in (signal.SIGINT, signal.SIGTERM)}
                try:
                    yield
                finally:
                    for s, h in old.items():
                        signal.signal(s, h)

            async def startup(inner, sockets=None):  # noqa: N805
                inner._mambart_loop = asyncio.get_running_loop()
                await super().startup(sockets)

        self.server = Server(config)
        self.server._mambart_loop = None
        self.state = state
        self._drain_task = None

    def _on_signal(self) -> None:
        if self._drain_task is None:
            self._drain_task = asyncio.ensure_future(self.drain())
        else:  # a second signal: now
            self.state.bridge.cancel_all()
            self.server.should_exit = True
            self.server.force_exit = True

    async def drain(self) -> None:
        st = self.state
        st.draining = True
        sys.stderr.write(f"mambart serve: draining ({st.inflight} requests in flight, up to "
                         f"{st.cfg.drain_timeout:g} s)\n")
        for s in getattr(self.server, "servers", []):
            s.close()  # no new connections
        deadline = time.monotonic() + st.cfg.drain_timeout
        while st.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if st.inflight:
            sys.stderr.write(f"mambart serve: cancelling {st.inflight} requests still in "
                             f"flight\n")
            st.bridge.cancel_all()
            deadline = time.monotonic() + 5.0
            while st.inflight and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        self.server.should_exit = True

    def run(self, sockets) -> None:
        self.server.run(sockets=sockets)


def bind(host: str, port: int):
    """A listening socket (port 0: a free port)."""
    import socket

    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(fam, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(gen, cfg: ServeConfig, host: str = "127.0.0.1", port: int = 8000,
          log_level: str = "info", ready=None) -> int:
    """Runs the server until SIGTERM / SIGINT (drained) or an error; -> exit status."""
    import uvicorn

    state = ServerState(gen, cfg)
    app = create_app(state)
    sock = bind(host, port)
    bound = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level=log_level, access_log=log_level == "debug",
                            timeout_graceful_shutdown=5, lifespan="on")
    server = _Server(config, state)
    sys.stderr.write(f"mambart serve: {cfg.model_name} on http://{host}:{bound}/v1 "
                     f"(max running {cfg.max_running}, max queue {cfg.max_queue})\n")
    sys.stderr.flush()
    if ready is not None:
        ready(bound)
    server.run([sock])
    return 0


class BackgroundServer:
    """The server on a thread of this process, for tests, benchmarks and notebooks:

        with BackgroundServer(gen, ServeConfig(model_name="m")) as srv:
            openai.OpenAI(base_url=srv.url, api_key="-")...

    `srv.state` is the ServerState (its generator, metrics); `port=0` picks a free port."""

    def __init__(self, gen, cfg: ServeConfig, host: str = "127.0.0.1", port: int = 0,
                 log_level: str = "warning"):
        import uvicorn

        self.state = ServerState(gen, cfg)
        self.app = create_app(self.state)
        self._sock = bind(host, port)
        self.port = self._sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}/v1"
        self._server = uvicorn.Server(uvicorn.Config(self.app, log_level=log_level,
                                                     lifespan="on", timeout_graceful_shutdown=5))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name="mambart-serve", daemon=True)

    def start(self, timeout: float = 60.0) -> "BackgroundServer":
        self._thread.start()
        t_end = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > t_end:
                raise RuntimeError("the background server did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

"""`mambart serve` (issue 17): the OpenAI-compatible server, driven by the real `openai` client
against a server on 127.0.0.1 (a free port) over a tiny model.

- completions and chat, plain and streamed, equal Generator.generate on the same prompt (chat
  prompts rendered as transformers' apply_chat_template renders them); stop strings, seeds,
  n, echo, logprobs (the model's log-softmax);
- 32 concurrent streaming clients each get exactly their lone greedy output, and the metrics
  show that their decode steps were shared;
- every bad input gets its status (400, 401, 429 with Retry-After) and the server keeps
  serving; a client that disconnects has its request cancelled and its slot freed;
- multi-turn reuse: the second turn of a chat prefills only its new tokens (prompt cache);
- SIGTERM drains (a subprocess): in-flight streams finish, or are cancelled after the drain
  timeout; new connections are refused; exit status 0.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
pytest.importorskip("jinja2")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import mambart  # noqa: E402
from ckpt_utils import CHAT_TEMPLATE, serve_model_dir  # noqa: E402
from mambart.serve import BackgroundServer, ServeConfig  # noqa: E402

NAME = "tiny"
PROMPTS = ["The future of AI is", "Once upon a time", "def main():", "Numbers: 0 1 2",
           "Emoji and", "Café, naïve", "the quick brown fox", "Mamba models keep"]
BIG = 10 ** 7  # a generation that runs until it is cancelled


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return serve_model_dir(tmp_path_factory.mktemp("serve") / "tiny")


@pytest.fixture(scope="module")
def ref(model_dir):
    """A generator of its own: lone runs, the oracle."""
    return mambart.Generator(model_dir)


@pytest.fixture(scope="module")
def server(model_dir):
    gen = mambart.Generator(model_dir, prompt_cache_bytes=64 << 20)
    cfg = ServeConfig(model_name=NAME, max_prompt_tokens=200, max_tokens=BIG)
    with BackgroundServer(gen, cfg) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url, api_key="-", max_retries=0, timeout=60) as c:
        yield c


def metrics(url) -> dict:
    """/metrics as {name{labels}: value}."""
    text = httpx.get(url.replace("/v1", "/metrics"), timeout=10).text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            k, _, v = line.rpartition(" ")
            out[k] = float(v)
    return out


def wait_for(cond, timeout=5.0):
    t_end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < t_end, "timed out"
        time.sleep(0.01)


def log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


# ---------------------------------------------------------------- the API

def test_completions_and_chat_equal_generate(client, ref, model_dir):
    for p, k in zip(PROMPTS[:3], (12, 5, 30)):
        want = ref.generate(p, max_new_tokens=k)
        r = client.completions.create(model=NAME, prompt=p, max_tokens=k, temperature=0)
        c = r.choices[0]
        assert c.text == want.text and c.index == 0
        assert c.finish_reason == ("length" if want.finish_reason == "length" else "stop")
        assert r.usage.prompt_tokens == want.prompt_tokens
        assert r.usage.completion_tokens == len(want.token_ids)
        assert r.usage.total_tokens == want.prompt_tokens + len(want.token_ids)
        chunks = list(client.completions.create(model=NAME, prompt=p, max_tokens=k,
                                                temperature=0, stream=True,
                                                stream_options={"include_usage": True}))
        assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == want.text
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == c.finish_reason
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(
            want.token_ids)
    # A prompt of token ids, a list of prompts, n choices, echo.
    ids = ref.tokenizer.encode(PROMPTS[3]).ids
    r = client.completions.create(model=NAME, prompt=ids, max_tokens=6, temperature=0)
    assert r.choices[0].text == ref.generate(ids, max_new_tokens=6).text
    r = client.completions.create(model=NAME, prompt=PROMPTS[:2], max_tokens=6, temperature=0,
                                  n=2, echo=True)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    for c in r.choices:
        p = PROMPTS[c.index // 2]
        assert c.text == p + ref.generate(p, max_new_tokens=6).text
    # Chat: the prompt is the template rendered as transformers renders it.
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"),
                                  bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    tok.chat_template = CHAT_TEMPLATE
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ids[0] == 0  # bos_token rendered, then read as the special token
    want = ref.generate(ids, max_new_tokens=9)
    r = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=9, temperature=0)
    assert r.choices[0].message.content == want.text
    assert r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(ids)
    chunks = list(client.chat.completions.create(model=NAME, messages=msgs, max_tokens=9,
                                                 temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == "length"
    # Content as a list of text parts; max_completion_tokens.
    r2 = client.chat.completions.create(
        model=NAME, messages=[msgs[0], {"role": "user", "content": [{"type": "text",
                                                                      "text": "hi"}]}],
        max_completion_tokens=9, temperature=0)
    assert r2.choices[0].message.content == want.text
    models = client.models.list()
    assert [m.id for m in models.data] == [NAME]


def test_stop_strings_seeds_and_extra_sampling_fields(client, ref):
    p = PROMPTS[1]
    full = ref.generate(p, max_new_tokens=30).text
    k = next(i for i in range(2, len(full) - 2) if "\ufffd" not in full[i:i + 2]
             and full.find(full[i:i + 2]) == i)
    stop = full[k:k + 2]
    for stops in (stop, ["zzz-never", stop]):
        r = client.completions.create(model=NAME, prompt=p, max_tokens=30, temperature=0,
                                      stop=stops)
        assert r.choices[0].text == full[:k] and r.choices[0].finish_reason == "stop"
        chunks = client.completions.create(model=NAME, prompt=p, max_tokens=30, temperature=0,
                                           stop=stops, stream=True)
        chunks = [c.choices[0] for c in chunks if c.choices]
        assert "".join(c.text for c in chunks) == full[:k] and chunks[-1].finish_reason == "stop"
    # Seeds: reproducible, equal to generate with the same seed and options; the vLLM fields
    # (top_k, min_p, repetition_penalty, ignore_eos) reach the sampler.
    kw = dict(temperature=0.9, top_p=0.95, seed=1234)
    extra = dict(top_k=40, min_p=0.01, repetition_penalty=1.1, ignore_eos=True)
    want = ref.generate(p, max_new_tokens=25, **kw, **extra)
    texts = [client.completions.create(model=NAME, prompt=p, max_tokens=25, **kw,
                                       extra_body=extra).choices[0].text for _ in range(2)]
    assert texts == [want.text, want.text]
    other = client.completions.create(model=NAME, prompt=p, max_tokens=25, temperature=0.9,
                                      top_p=0.95, seed=99, extra_body=extra).choices[0].text
    assert other != want.text
    # n choices with one seed: distinct, reproducible, choice 0 equals the lone run.
    r = client.completions.create(model=NAME, prompt=p, max_tokens=25, n=3, **kw,
                                  extra_body=extra)
    r2 = client.completions.create(model=NAME, prompt=p, max_tokens=25, n=3, **kw,
                                   extra_body=extra)
    assert [c.text for c in r.choices] == [c.text for c in r2.choices]
    assert r.choices[0].text == want.text and len({c.text for c in r.choices}) == 3
    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user",
                                                                 "content": p}],
                                          max_tokens=20, **kw, extra_body=extra)
    chat2 = client.chat.completions.create(model=NAME, messages=[{"role": "user",
                                                                  "content": p}],
                                           max_tokens=20, **kw, extra_body=extra)
    assert chat.choices[0].message.content == chat2.choices[0].message.content


def test_logprobs_are_the_models(client, ref):
    p = PROMPTS[2]
    ids = ref.tokenizer.encode(p).ids
    r = client.completions.create(model=NAME, prompt=p, max_tokens=8, temperature=0,
                                  logprobs=3, extra_body=dict(ignore_eos=True))
    want = ref.generate(p, max_new_tokens=8, ignore_eos=True)
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == 8 and len(lp.top_logprobs) == 8
    ref_lp = log_softmax(ref.logits(ids + want.token_ids)[len(ids) - 1:-1])
    assert lp.token_logprobs == pytest.approx(
        [ref_lp[i, t] for i, t in enumerate(want.token_ids)], abs=1e-4)
    for i, top in enumerate(lp.top_logprobs):
        assert len(top) <= 3  # distinct token strings
        assert max(top.values()) == pytest.approx(ref_lp[i].max(), abs=1e-4)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    # streamed: the same numbers, chunk by chunk
    chunks = client.completions.create(model=NAME, prompt=p, max_tokens=8, temperature=0,
                                       logprobs=3, stream=True, extra_body=dict(ignore_eos=True))
    streamed = [x for c in chunks if c.choices and c.choices[0].logprobs
                for x in c.choices[0].logprobs.token_logprobs]
    assert streamed == pytest.approx(lp.token_logprobs, abs=1e-6)
    # echo + logprobs: the prompt's tokens first, the first without context
    r = client.completions.create(model=NAME, prompt=p, max_tokens=2, temperature=0,
                                  logprobs=1, echo=True)
    e = r.choices[0].logprobs
    assert e.token_logprobs[0] is None and len(e.token_logprobs) == len(ids) + 2
    pl = log_softmax(ref.logits(ids)[:-1])
    assert e.token_logprobs[1:len(ids)] == pytest.approx(
        [pl[i - 1, ids[i]] for i in range(1, len(ids))], abs=1e-4)
    # chat: content entries with bytes and top_logprobs
    r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": p}],
                                       max_tokens=5, temperature=0, logprobs=True,
                                       top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for t in content:
        assert len(t.top_logprobs) == 2 and t.logprob == pytest.approx(
            t.top_logprobs[0].logprob, abs=1e-5)  # greedy: the top token
        assert isinstance(t.bytes, list)


def test_32_concurrent_streams_each_get_their_lone_output(server, ref):
    rng = np.random.default_rng(0)
    words = "the quick brown fox jumps over a lazy dog and Mamba keeps state".split()
    prompts = [" ".join(rng.choice(words, int(rng.integers(1, 12)))) for _ in range(32)]
    lengths = [5 + 3 * i for i in range(32)]
    want = [ref.generate(p, max_new_tokens=n, ignore_eos=True).text
            for p, n in zip(prompts, lengths)]
    before = metrics(server.url)

    async def one(c, p, n):
        s = await c.completions.create(model=NAME, prompt=p, max_tokens=n, temperature=0,
                                       stream=True, extra_body=dict(ignore_eos=True))
        return "".join([ch.choices[0].text async for ch in s if ch.choices])

    async def main():
        async with openai.AsyncOpenAI(base_url=server.url, api_key="-", max_retries=0,
                                      timeout=60) as c:
            return await asyncio.gather(*[one(c, p, n) for p, n in zip(prompts, lengths)])

    got = asyncio.run(main())
    assert got == want
    m = metrics(server.url)
    # Steps were shared: more rows than steps since the last scrape, and a step with several.
    steps = m["mambart_engine_steps_total"] - before["mambart_engine_steps_total"]
    rows = m["mambart_engine_rows_decoded_total"] - before["mambart_engine_rows_decoded_total"]
    assert rows > steps > 0 and m["mambart_engine_max_rows"] > 1, (rows, steps)
    assert rows == sum(n - 1 for n in lengths)  # the first token of each comes from prefill
    assert m['mambart_requests_total{route="/v1/completions",status="200"}'] >= 32
    assert m["mambart_time_to_first_token_seconds_count"] >= 32
    # One inter-token sample per token after each request's first, however they were delivered.
    itl = (m["mambart_inter_token_latency_seconds_count"]
           - before.get("mambart_inter_token_latency_seconds_count", 0))
    assert itl == sum(n - 1 for n in lengths), itl
    assert m["mambart_requests_running"] == 0 and m["mambart_requests_waiting"] == 0


def test_multi_turn_chat_prefills_only_the_new_tokens(client, server):
    msgs = [{"role": "user", "content": "Once upon a time there was a tiny model."}]
    r1 = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=6, temperature=0)
    before = metrics(server.url)
    msgs += [{"role": "assistant", "content": r1.choices[0].message.content},
             {"role": "user", "content": "and then?"}]
    r2 = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=6, temperature=0)
    after = metrics(server.url)
    cached = r2.usage.prompt_tokens_details.cached_tokens
    assert cached >= r1.usage.prompt_tokens  # at least turn 1's prompt came from the cache
    c = "mambart_prompt_tokens_cached_total"
    f = "mambart_prompt_tokens_prefilled_total"
    assert after[c] - before[c] == cached
    assert after[f] - before[f] <= r2.usage.prompt_tokens - cached + 1
    assert after["mambart_prompt_tokens_total"] - before["mambart_prompt_tokens_total"] == \
        r2.usage.prompt_tokens


# ---------------------------------------------------------------- bad input, disconnects

def post(url, route, body, **kw):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(url + route, content=data, headers={"content-type": "application/json",
                                                          **kw.pop("headers", {})},
                      timeout=30, **kw)


def assert_error(r, status, pattern, param=None):
    assert r.status_code == status, (r.status_code, r.text)
    e = r.json()["error"]
    assert re.search(pattern, e["message"]), e
    assert set(e) == {"message", "type", "param", "code"}
    if param is not None:
        assert e["param"] == param, e


def test_bad_requests_get_400_and_the_server_keeps_serving(server, client):
    u = server.url
    good = {"model": NAME, "prompt": "hi", "max_tokens": 3, "temperature": 0}
    assert_error(post(u, "/completions", b"{not json"), 400, "not valid JSON")
    assert_error(post(u, "/completions", b"[1, 2]"), 400, "JSON object")
    assert_error(post(u, "/completions", dict(good, model="gpt-4")), 400, "does not exist",
                 "model")
    for field, value in [("temperature", "hot"), ("temperature", -1), ("top_p", 1.5),
                         ("top_p", 0), ("max_tokens", -1), ("max_tokens", 2.5), ("n", 0),
                         ("n", True), ("logprobs", 50), ("stop", [""]), ("stop", 3),
                         ("seed", -1), ("min_p", 2), ("repetition_penalty", 0),
                         ("top_k", "x"), ("ignore_eos", "yes"), ("presence_penalty", 0.5),
                         ("logit_bias", {"1": 5}), ("stream_options", {"include_usage": True}),
                         ("prompt", []), ("prompt", [10 ** 6]), ("prompt", [[1, 2], "x"]),
                         ("prompt", 7)]:
        assert_error(post(u, "/completions", dict(good, **{field: value})), 400, field
                     if field != "prompt" else "prompt|vocabulary", field)
    assert_error(post(u, "/completions", dict(good, prompt="word " * 300)), 400,
                 "over this server's limit", "prompt")
    chat = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    for bad in [[], [{"role": "wizard", "content": "x"}], [{"role": "user"}],
                [{"role": "user", "content": [{"type": "image_url"}]}], "hi"]:
        assert_error(post(u, "/chat/completions", dict(chat, messages=bad)), 400, "messages",
                     "messages")
    assert_error(post(u, "/chat/completions", dict(chat, top_logprobs=2)), 400, "logprobs")
    assert_error(post(u, "/chat/completions", dict(chat, tools=[{"type": "function"}])), 400,
                 "tools")
    assert_error(httpx.get(u + "/nowhere"), 404, "Not Found")
    # openai's client raises its typed error for a 400
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=NAME, prompt="hi", temperature=-3)
    r = post(u, "/completions", good)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("length", "stop")
    m = metrics(u)
    assert m['mambart_requests_total{route="/v1/completions",status="400"}'] >= 25


def test_api_key_and_full_queue(model_dir):
    gen = mambart.Generator(model_dir)
    cfg = ServeConfig(model_name=NAME, api_key="sekrit", max_running=1, max_queue=1,
                      max_tokens=BIG)
    body = {"model": NAME, "prompt": "hi", "max_tokens": BIG, "temperature": 0,
            "ignore_eos": True, "stream": True}
    with BackgroundServer(gen, cfg) as srv:
        u = srv.url
        auth = {"authorization": "Bearer sekrit"}
        assert_error(post(u, "/completions", dict(body, stream=False, max_tokens=2)), 401,
                     "API key")
        assert_error(post(u, "/completions", dict(body, stream=False, max_tokens=2),
                          headers={"authorization": "Bearer nope"}), 401, "API key")
        assert httpx.get(u + "/models").status_code == 401
        assert httpx.get(u.replace("/v1", "/health")).status_code == 200  # open
        with openai.OpenAI(base_url=u, api_key="wrong", max_retries=0) as c:
            with pytest.raises(openai.AuthenticationError):
                c.models.list()
        with openai.OpenAI(base_url=u, api_key="sekrit", max_retries=0) as c:
            assert c.models.list().data[0].id == NAME
        # One request runs (the only slot), one waits (the queue's only place), the third: 429.
        with httpx.Client(timeout=30) as h1, httpx.Client(timeout=30) as h2:
            with h1.stream("POST", u + "/completions", json=body, headers=auth) as running:
                lines = running.iter_lines()  # kept: a dropped iterator closes the response
                next(lines)
                with h2.stream("POST", u + "/completions", json=body, headers=auth) as waiting:
                    assert waiting.status_code == 200
                    wait_for(lambda: gen.engine_stats()["queued"] == 1)
                    r = post(u, "/completions", dict(body, stream=False), headers=auth)
                    assert_error(r, 429, "busy")
                    assert r.headers["retry-after"] == "1"
                    assert gen.engine_stats()["rejected"] == 1
        # Both streams were closed: their requests are cancelled, and the server serves on.
        wait_for(lambda: gen.engine_stats()["running"] == 0 and gen.engine_stats()["queued"] == 0)
        r = post(u, "/completions", dict(body, stream=False, max_tokens=3), headers=auth)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_a_disconnected_client_frees_its_slot(server):
    gen = server.state.gen
    u = server.url
    st0 = gen.engine_stats()
    body = {"model": NAME, "prompt": "hi", "max_tokens": BIG, "temperature": 0,
            "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=30) as h:
        with h.stream("POST", u + "/completions", json=body) as r:
            lines = r.iter_lines()
            for _ in range(3):
                next(lines)
            assert gen.engine_stats()["running"] == 1
    # Closed mid-stream: cancelled, and the slot is free.
    wait_for(lambda: gen.engine_stats()["cancelled"] == st0["cancelled"] + 1)
    wait_for(lambda: gen.engine_stats()["running"] == 0)
    # A non-streaming request whose client gives up is cancelled too.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(u + "/chat/completions", json={
            "model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": BIG,
            "ignore_eos": True}, timeout=0.5)
    wait_for(lambda: gen.engine_stats()["cancelled"] == st0["cancelled"] + 2)
    wait_for(lambda: gen.engine_stats()["running"] == 0)
    assert server.state.inflight == 0
    assert post(u, "/completions", {"model": NAME, "prompt": "hi", "max_tokens": 2}
                ).status_code == 200


# ---------------------------------------------------------------- the process

def start_server(model_dir, *args):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    p = subprocess.Popen([sys.executable, "-m", "mambart", "serve", str(model_dir), "--port",
                          "0", "--served-model-name", NAME, "--log-level", "warning", *args],
                         stderr=subprocess.PIPE, text=True, env=env)
    line = p.stderr.readline()
    m = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
    assert m, line + p.stderr.read()
    url = f"http://127.0.0.1:{m.group(1)}/v1"
    wait_for(lambda: _healthy(url), 30)
    return p, url


def _healthy(url) -> bool:
    try:
        return httpx.get(url.replace("/v1", "/health"), timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def read_stream(lines):
    """-> (text, finish_reason, saw [DONE]) from SSE lines."""
    text, reason, done = [], None, False
    for line in lines:
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            done = True
            break
        c = json.loads(line[6:])["choices"][0]
        text.append(c["text"])
        reason = c["finish_reason"] or reason
    return "".join(text), reason, done


@pytest.mark.parametrize("drain", ["finishes", "cancels"])
def test_sigterm_drains_and_exits_zero(model_dir, drain):
    # "finishes": the stream (20,000 tokens: more than the socket buffers hold, so it is still
    # being sent when the signal comes) completes; "cancels": an endless one is cancelled after
    # the drain timeout and ends with finish_reason "abort".
    n = 20000 if drain == "finishes" else BIG
    p, url = start_server(model_dir, "--max-tokens", str(BIG), "--drain-timeout",
                          "60" if drain == "finishes" else "0.5")
    try:
        body = {"model": NAME, "prompt": "hi", "max_tokens": n, "temperature": 0,
                "ignore_eos": True, "stream": True}
        with httpx.Client(timeout=60) as h, h.stream("POST", url + "/completions",
                                                     json=body) as r:
            lines = r.iter_lines()
            next(lines)
            p.send_signal(signal.SIGTERM)
            wait_for(lambda: not _healthy(url), 10)  # draining: 503, then not listening
            with pytest.raises(httpx.ConnectError):
                httpx.get(url.replace("/v1", "/health"), timeout=2)
            text, reason, done = read_stream(lines)
        assert done and reason == ("length" if drain == "finishes" else "abort")
        assert p.wait(30) == 0
        err = p.stderr.read()
        assert "draining (1 requests in flight" in err, err
        assert ("cancelling 1 requests" in err) == (drain == "cancels"), err
        assert "Traceback" not in err, err
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_cli_serve_options(model_dir):
    r = subprocess.run([sys.executable, "-m", "mambart", "serve", "--help"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0
    for opt in ("--host", "--port", "--device", "--dtype", "--max-running", "--max-queue",
                "--chat-template", "--api-key", "--max-prompt-tokens", "--drain-timeout"):
        assert opt in r.stdout
    for bad in (["--max-running", "0"], ["--port", "70000"], ["--max-queue", "-1"]):
        r = subprocess.run([sys.executable, "-m", "mambart", "serve", str(model_dir), *bad],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_bench_serve_tool(model_dir):
    from pathlib import Path

    tool = Path(__file__).resolve().parents[1] / "tools" / "bench_serve.py"
    r = subprocess.run([sys.executable, str(tool), "--model", str(model_dir), "--clients", "4",
                        "--requests", "8", "--prompt-len", "8", "--output-len", "12", "--json",
                        "--in-process"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["requests"] == 8 and res["output_tok_per_s"] > 0
    assert res["output_tok_per_s"] * res["wall_s"] == pytest.approx(8 * 12, rel=0.02)
    for k in ("ttft_p50_ms", "ttft_p99_ms", "tpot_p90_ms", "req_per_s", "mean_rows_per_step"):
        assert k in res

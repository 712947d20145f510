"""The OpenAI API's request fields for `mambart serve` (serve.py): checked one by one into
Params (a bad value is a 400 naming the field), chat messages, and the error object."""

import json
import math
from dataclasses import dataclass
from typing import Dict, List, Optional

MAX_LOGPROBS = 20           # top logprobs a request may ask for (OpenAI's limit)
MAX_N = 128                 # choices per request
MAX_STOPS = 16              # stop strings per request


class APIError(Exception):
    """An error answered as an OpenAI error object."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[Dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (status, message, type_,
                                                                       param, code)
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def _bad(param: str, message: str) -> APIError:
    return APIError(400, message, param=param)


def _is_int(v) -> bool:
    return (isinstance(v, int) and not isinstance(v, bool)) or \
        (isinstance(v, float) and math.isfinite(v) and v.is_integer())


def _int(body: dict, name: str, default, lo: int, hi: int):
    v = body.get(name)
    if v is None:
        return default
    if not _is_int(v) or not lo <= int(v) <= hi:
        raise _bad(name, f"{name} must be an integer in [{lo}, {hi}], got {json.dumps(v)}")
    return int(v)


def _num(body: dict, name: str, default: float, lo: float, hi: float, lo_open: bool = False):
    v = body.get(name)
    if v is None:
        return default
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if ok:
        ok = (lo < v if lo_open else lo <= v) and v <= hi
    if not ok:
        rng = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise _bad(name, f"{name} must be a number in {rng}, got {json.dumps(v)}")
    return float(v)


def _bool(body: dict, name: str, default: bool) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _bad(name, f"{name} must be true or false, got {json.dumps(v)}")
    return v


@dataclass
class Params:
    """The generation parameters of one request, validated."""

    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    repetition_penalty: float
    seed: Optional[int]
    stop: List[str]
    n: int
    ignore_eos: bool
    stream: bool
    include_usage: bool
    logprobs: Optional[int]   # top tokens per generated token; None: no logprobs
    echo: bool = False

    def engine_kwargs(self) -> dict:
        return dict(max_new_tokens=self.max_tokens, temperature=self.temperature,
                    top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                    repetition_penalty=self.repetition_penalty, seed=self.seed,
                    stop_token_ids=None, ignore_eos=self.ignore_eos)


def _unsupported(body: dict) -> None:
    """Fields whose non-neutral values this server cannot honour: refused, not ignored."""
    for name in ("presence_penalty", "frequency_penalty"):
        v = body.get(name)
        if v not in (None, 0, 0.0):
            raise _bad(name, f"{name} is not supported (use repetition_penalty); got "
                             f"{json.dumps(v)}")
    if body.get("logit_bias") not in (None, {}):
        raise _bad("logit_bias", "logit_bias is not supported")
    if body.get("suffix") not in (None, ""):
        raise _bad("suffix", "suffix is not supported")
    if body.get("tools") not in (None, []):
        raise _bad("tools", "tools are not supported by this server")
    rf = body.get("response_format")
    if rf is not None and not (isinstance(rf, dict) and rf.get("type") == "text"):
        raise _bad("response_format", "response_format other than {\"type\": \"text\"} is not "
                                      "supported")
    if body.get("user") is not None and not isinstance(body.get("user"), str):
        raise _bad("user", "user must be a string")


def parse_params(body: dict, max_tokens_limit: int, chat: bool) -> Params:
    """The request's generation fields; `max_tokens_limit` is the server's --max-tokens."""
    _unsupported(body)
    n = _int(body, "n", 1, 1, MAX_N)
    best_of = body.get("best_of")
    if best_of is not None and best_of != n:
        raise _bad("best_of", "best_of is not supported (give n only)")
    if chat:
        max_tokens = _int(body, "max_completion_tokens", None, 0, max_tokens_limit)
        if max_tokens is None:
            max_tokens = _int(body, "max_tokens", max_tokens_limit, 0, max_tokens_limit)
    else:
        max_tokens = _int(body, "max_tokens", min(16, max_tokens_limit), 0, max_tokens_limit)
    top_k = _int(body, "top_k", 0, -1, 1 << 31)
    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or not 0 <= int(seed) < 1 << 64):
        raise _bad("seed", f"seed must be an integer in [0, 2^64), got {json.dumps(seed)}")
    stop = body.get("stop")
    if stop is None:
        stops = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = list(stop)
    else:
        raise _bad("stop", "stop must be a string or a list of strings")
    if len(stops) > MAX_STOPS or any(not s for s in stops):
        raise _bad("stop", f"stop must hold at most {MAX_STOPS} non-empty strings")
    stream = _bool(body, "stream", False)
    so = body.get("stream_options")
    if so is not None and (not stream or not isinstance(so, dict)):
        raise _bad("stream_options", "stream_options is an object, allowed with stream: true")
    include_usage = bool(so and _bool(so, "include_usage", False))
    if chat:
        want = _bool(body, "logprobs", False)
        top = _int(body, "top_logprobs", None, 0, MAX_LOGPROBS)
        if top is not None and not want:
            raise _bad("top_logprobs", "top_logprobs needs logprobs: true")
        logprobs = (top or 0) if want else None
        echo = False
    else:
        logprobs = _int(body, "logprobs", None, 0, MAX_LOGPROBS)
        echo = _bool(body, "echo", False)
    return Params(max_tokens=max_tokens,
                  temperature=_num(body, "temperature", 1.0, 0.0, 1e4),
                  top_p=_num(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
                  top_k=max(top_k, 0),
                  min_p=_num(body, "min_p", 0.0, 0.0, 1.0),
                  repetition_penalty=_num(body, "repetition_penalty", 1.0, 0.0, 1e4,
                                          lo_open=True),
                  seed=None if seed is None else int(seed), stop=stops, n=n,
                  ignore_eos=_bool(body, "ignore_eos", False), stream=stream,
                  include_usage=include_usage, logprobs=logprobs, echo=echo)


def _message_text(i: int, m: dict) -> Optional[str]:
    c = m.get("content")
    if c is None or isinstance(c, str):
        return c
    if isinstance(c, list):
        parts = []
        for p in c:
            if not (isinstance(p, dict) and p.get("type") == "text" and
                    isinstance(p.get("text"), str)):
                raise _bad("messages", f"messages[{i}].content: only text parts "
                                       f"({{\"type\": \"text\", \"text\": ...}}) are supported")
            parts.append(p["text"])
        return "".join(parts)
    raise _bad("messages", f"messages[{i}].content must be a string or a list of text parts")


ROLES = ("system", "developer", "user", "assistant", "tool")


def parse_messages(body: dict) -> List[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("messages", "messages must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise _bad("messages", f"messages[{i}] must be an object with a role in "
                                   f"{', '.join(ROLES)}")
        text = _message_text(i, m)
        if text is None and m["role"] != "assistant":
            raise _bad("messages", f"messages[{i}].content is missing")
        mm = dict(m)
        mm["content"] = text if text is not None else ""
        out.append(mm)
    return out

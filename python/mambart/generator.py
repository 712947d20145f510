"""The public Generator: model resolution, tokens or text in, results or streams out."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from . import _C
from . import _args  # issue 23: every public argument checked in one place
from .sequences import ScoreResult, SequenceAPI  # issue 7: states, prompt cache, scoring
from .state import SequenceState

Prompt = Union[str, Sequence[int]]


@dataclass
class TokenLogprob:
    """One generated token's log-probability under the model (generate / stream with
    logprobs=N): the log-softmax of the model's logits at that step, before the repetition
    penalty, temperature and filters; `top` holds the N most likely tokens as (id, logprob),
    highest first (lower id first on ties)."""

    token_id: int
    logprob: float
    top: List[Tuple[int, float]] = field(default_factory=list)


@dataclass
class GenerationResult:
    """One prompt's generation.

    token_ids: the new tokens (an eos or stop token that ended generation included);
    text: the new text (None without a tokenizer), cut before a matched stop string;
    finish_reason: "length", "eos", "stop_token" or "stop_string".
    prefill_tokens: tokens actually run at prefill (fewer than prompt_tokens when the row
        started from a state or a prompt-cache hit); state: the sequence's state after this
        generation (generate(..., return_state=True)), to continue it with generate(state=...).
    logprobs: one TokenLogprob per token of token_ids (generate(..., logprobs=N)), else None.
    speculative: generate(..., speculative=...) only: the proposer's counts, {"proposed",
        "accepted", "acceptance_rate" (accepted / proposed, 0 when none), "verifications"
        (target passes), "draft_forwards", "propose_ms", "verify_ms", "rollback_ms"}.
    """

    token_ids: List[int]
    finish_reason: str
    prompt_tokens: int
    prefill_ms: float
    decode_ms: float
    text: Optional[str] = None
    prefill_tokens: int = 0
    state: Optional[SequenceState] = None
    logprobs: Optional[List[TokenLogprob]] = None
    speculative: Optional[dict] = None

    @property
    def tokens_per_s(self) -> float:
        """Decode speed: tokens after the first over the decode time."""
        n = len(self.token_ids) - 1
        return n / (self.decode_ms / 1e3) if n > 0 and self.decode_ms > 0 else 0.0


def _tokenizer_key(tok):
    """What must agree between a target's and a draft's tokenizer: the token -> id map."""
    get = getattr(tok, "get_vocab", None)
    return get() if callable(get) else None


def _device_arg(device_name: str) -> str:
    """The device argument that gives a generator on `device_name`'s device ("cpu", "cuda:0")."""
    return device_name.split(" ", 1)[0]


class StreamIterator:
    """What Generator.stream() returns: iterate it for the pieces; once it is exhausted,
    `.result` is the GenerationResult (finish_reason, token_ids, text, prompt_tokens,
    prefill_ms, decode_ms, tokens_per_s) and `.finish_reason` its reason (None before).
    With stream(..., logprobs=N), `.logprobs` gets one TokenLogprob per generated token as the
    tokens arrive (before the piece they complete is yielded)."""

    def __init__(self):
        self.result: Optional[GenerationResult] = None
        self.logprobs: Optional[List[TokenLogprob]] = None
        self._it = iter(())

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._it)

    def close(self) -> None:  # closing early cancels the request, as the generator did
        self._it.close()

    @property
    def finish_reason(self) -> Optional[str]:
        return None if self.result is None else self.result.finish_reason


def _is_mambart_dir(path: Path) -> bool:
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    import json

    try:
        from ._files import MAX_JSON_BYTES, read_bounded_text
        from .errors import ModelLoadError

        text = read_bounded_text(cfg, MAX_JSON_BYTES, "config", ModelLoadError)
        return "mambart_format" in json.loads(text)
    except ModelLoadError:
        raise
    except ValueError:
        return False


def _resolve(model, revision, dtype):
    """-> (mambart model dir, tokenizer.json path or None, provenance string)."""
    from .errors import ModelLoadError

    if not isinstance(model, (str, os.PathLike)):
        raise ValueError(f"model must be a path or a hub name (str), got {_args.show(model)}")
    try:  # a name too long for the file system, or '~user' of no user, is not a model
        path = Path(os.fspath(model)).expanduser()
        is_dir, exists = path.is_dir(), path.exists()
    except (OSError, RuntimeError, ValueError) as e:
        raise ModelLoadError(f"{_args.show(os.fspath(model))}: not a usable model path "
                             f"({type(e).__name__}: {_args.show(str(e))})") from None
    if is_dir:
        if _is_mambart_dir(path):
            tok = path / "tokenizer.json"
            return path, (tok if tok.is_file() else None)
        from ._cache import ensure_converted

        out = Path(ensure_converted(path, dtype=dtype))
        tok = out / "tokenizer.json"
        return out, (tok if tok.is_file() else None)
    if exists:
        raise ModelLoadError(f"{path}: not a directory (expected a model directory)")
    from . import hub

    out, tok = hub.load_model_dir(str(model), revision=revision, dtype=dtype)
    return Path(out), (Path(tok) if tok else None)


class Generator(SequenceAPI):
    """Loads a Mamba model and generates from it.

    model: a mambart model directory; a Hugging Face transformers or state-spaces checkpoint
        directory (converted on the fly into the cache, see docs/format.md); or a hub name such
        as "mamba-130m" or "state-spaces/mamba2-1.3b".
    device: "cpu" (default), "cuda", "cuda:N" or "auto".
    dtype: None keeps the stored dtype; "float32", "float16" or "bfloat16" converts at load.
    tokenizer: a `tokenizers.Tokenizer`, a path to a tokenizer.json, or None to use the model's.
    revision: hub revision (branch, tag or commit) for hub names.
    prompt_cache_bytes: > 0 turns on the exact prefix cache of states with this byte budget
        (see enable_prompt_cache).
    threads: CPU threads (1..4096, the calling thread included) for this generator's CPU
        backend; None takes the cpu_threads option (MAMBART_CPU_THREADS), else OMP_NUM_THREADS,
        else the cores this process may run on (its CPU affinity). See README "Threads".
    state_dtype: storage of the Mamba-1 / Mamba-2 SSM states, "float32" or "bfloat16" (half the
        state bytes per sequence, rounded after every token; README "State precision"); None
        takes the option state_dtype (MAMBART_STATE_DTYPE, default "float32").
    """

    def __init__(self, model, device: str = "cpu", dtype: Optional[str] = None,
                 tokenizer=None, revision: Optional[str] = None, prompt_cache_bytes: int = 0,
                 threads: Optional[int] = None, state_dtype: Optional[str] = None):
        if dtype is not None and dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"dtype must be None, 'float32', 'float16' or 'bfloat16', got {dtype!r}")
        if state_dtype is not None and state_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"state_dtype must be None (the option state_dtype), 'float32' or "
                             f"'bfloat16', got {_args.show(state_dtype)}")
        if not isinstance(device, str):
            raise ValueError(f"device must be a string ('cpu', 'cuda', 'cuda:N' or 'auto'), got "
                             f"{_args.show(device)}")
        if revision is not None and not isinstance(revision, str):
            raise ValueError(f"revision must be a string or None, got {_args.show(revision)}")
        if not (tokenizer is None or isinstance(tokenizer, (str, os.PathLike))
                or (callable(getattr(tokenizer, "encode", None))
                    and callable(getattr(tokenizer, "decode", None)))):
            raise ValueError(f"tokenizer must be a tokenizers.Tokenizer, a path to a "
                             f"tokenizer.json or None, got {_args.show(tokenizer)}")
        n_threads = 0 if threads is None else _args.integer("threads", threads, 1, 4096)
        model_dir, tok_path = _resolve(model, revision, dtype)
        self.model_dir = Path(model_dir)
        self._g = _C.Generator(str(self.model_dir), device, dtype, n_threads, state_dtype)
        self.state_dtype: str = self._g.state_dtype  # the SSM states' storage (issue 18)
        self.config = self._g.config
        self.vocab_size: int = self.config["vocab_size"]
        self.tokenizer = self._load_tokenizer(tokenizer, tok_path)
        self.fingerprint: str = self._g.fingerprint  # states carry it (issue 7)
        self.prompt_cache = None  # the engine's (cpp/prefix_cache.h); see enable_prompt_cache
        self.enable_prompt_cache(prompt_cache_bytes)
        self._engine_lock = threading.Lock()
        self._engine_stops: Optional[bool] = None  # decided at the first stop string

    @staticmethod
    def _load_tokenizer(tokenizer, tok_path):
        if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
            return tokenizer
        path = tokenizer if tokenizer is not None else tok_path
        if path is None:
            return None
        from .text import load_tokenizer

        return load_tokenizer(path)

    @property
    def device(self) -> str:
        return self._g.device

    @property
    def dtype(self) -> str:
        return self._g.dtype

    @property
    def threads(self) -> Optional[int]:
        """The CPU threads this generator's ops run on (None on a CUDA device)."""
        n = self._g.threads
        return n if n > 0 else None

    def __repr__(self) -> str:
        c = self.config
        return (f"Generator({c['architecture']}, d_model={c['d_model']}, n_layer={c['n_layer']}, "
                f"dtype={self.dtype}, device={self.device!r}, dir={str(self.model_dir)!r})")

    # ---- prompts ----
    def _encode(self, prompt) -> List[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt is text but this model has no tokenizer: pass token ids "
                                 "or Generator(..., tokenizer=...)")
            return self.tokenizer.encode(_args.text("prompt", prompt)).ids
        if isinstance(prompt, np.ndarray):
            if prompt.ndim != 1 or not np.issubdtype(prompt.dtype, np.integer):
                raise ValueError("prompt array must be 1-D integer token ids")
        # a str, or a list / tuple / range / array of integer ids in the vocabulary: no bytes,
        # dicts, sets, floats or bools, and no id that pybind11 would have to refuse
        return _args.token_ids("prompt", prompt, self.vocab_size)

    @staticmethod
    def _is_batch(prompt) -> bool:
        if isinstance(prompt, (str, np.ndarray)):
            return isinstance(prompt, np.ndarray) and prompt.ndim == 2
        if isinstance(prompt, (list, tuple)) and prompt:
            return not isinstance(prompt[0], (int, np.integer))
        return False

    def logits(self, token_ids) -> np.ndarray:
        """Next-token logits at every position: float32 array [len(token_ids), vocab_size]."""
        return self._g.logits(self._encode(token_ids))

    # ---- generation ----
    def _options(self, max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty,
                 seed, stop_token_ids, ignore_eos):
        o = _C.GenerationOptions()
        a = _args
        o.max_new_tokens = a.integer("max_new_tokens", max_new_tokens, 0)
        o.temperature = a.real("temperature", temperature, 0.0)
        o.top_k = a.integer("top_k", top_k, 0)
        o.top_p = a.real("top_p", top_p, 0.0, 1.0, lo_open=True)
        o.min_p = a.real("min_p", min_p, 0.0, 1.0)
        o.repetition_penalty = a.real("repetition_penalty", repetition_penalty, 0.0, lo_open=True)
        seed = a.seed(seed)  # never reduced mod 2^64 (issue 23)
        o.seed = seed if seed is not None else int.from_bytes(os.urandom(8), "little")
        o.stop_token_ids = ([] if stop_token_ids is None else
                            a.token_ids("stop_token_ids", stop_token_ids, self.vocab_size))
        o.ignore_eos = a.flag("ignore_eos", ignore_eos)
        return o

    def _start(self, prompts, stop, kwargs, states=None, keep_states=False, logprobs=None):
        if stop is not None and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if any(not isinstance(s, str) or not s for s in stops):
            raise ValueError("stop must be a non-empty string or a list of non-empty strings")
        seqs, rows = self._submit_rows(prompts, states, kwargs, keep_states, stops,
                                       logprobs=logprobs)
        return seqs, stops, rows

    def _row_texts(self, n, stops):
        if self.tokenizer is None:
            return None
        from .text import TextStream

        return [TextStream(self.tokenizer, stops) for _ in range(n)]

    def generate(self, prompt=None, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                 repetition_penalty: float = 1.0, seed: Optional[int] = None,
                 stop_token_ids: Optional[Sequence[int]] = None,
                 stop: Union[str, Sequence[str], None] = None, ignore_eos: bool = False,
                 state=None, return_state: bool = False, logprobs: Optional[int] = None,
                 speculative: Optional[dict] = None):
        """Generates from one prompt (token ids or text) or a list of prompts.

        temperature=0 is greedy; top_k=0, top_p=1, min_p=0 and repetition_penalty=1 are off.
        For a list of prompts, max_new_tokens, the sampling options, seed, stop_token_ids (a list
        of lists) and ignore_eos may be lists with one value per prompt; a per-row seed makes
        the row equal a single run with that seed.
        state: a SequenceState (or one per row) to continue; the prompt (may be None) is then
        the tokens added after it. Without a seed, a state from a generation continues its RNG
        exactly. return_state=True puts each row's final state in result.state.
        logprobs=N (>= 0): result.logprobs holds each new token's TokenLogprob with the N most
        likely tokens (these rows sample on the host, see docs/engine.md).
        Every row is a request of the generator's engine: rows and concurrent calls from other
        threads share decode steps.
        speculative: speculative decoding (docs/speculative.md), one prompt after the other
        outside the engine: dict(method="prompt_lookup", k=7[, ngram_max=3, ngram_min=1]) or
        dict(draft=<Generator or model name/path with the same tokenizer>, k=4). Greedy
        output equals plain decoding's; sampled output follows the same distribution (other
        tokens for a seed). result.speculative holds the acceptance counts. Not combined with
        state, return_state, logprobs or stop strings (ValueError).
        Returns a GenerationResult, or a list of them for a list of prompts.
        """
        if speculative is not None:
            return self._generate_speculative(
                prompt, speculative, state, return_state, logprobs, stop,
                dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                     top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty, seed=seed,
                     stop_token_ids=stop_token_ids, ignore_eos=ignore_eos))
        batch, prompts, states = self._rows(prompt, state)
        if batch and not prompts:
            return []
        kwargs = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                      top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty, seed=seed,
                      stop_token_ids=stop_token_ids, ignore_eos=ignore_eos)
        seqs, stops, rows = self._start(prompts, stop, kwargs, states, return_state, logprobs)
        texts = self._row_texts(len(prompts), stops)
        kept = [None] * len(seqs)  # tokens kept per row when Python matched a stop string
        lps = [[] if rows["logprobs"] >= 0 else None for _ in seqs]
        try:
            for row, seq in enumerate(seqs):
                if not stops and lps[row] is None:  # wait (in slices, for Ctrl-C)
                    while not seq.wait(0.25):
                        pass
                    if seq.error:
                        raise RuntimeError(seq.error)
                    if texts is not None:
                        for tok in seq.result.token_ids:
                            texts[row].push(tok)
                    continue
                n = 0
                for _ in self._row_tokens(seq, rows, texts, row, lps[row]):
                    n += 1
                if texts is not None and texts[row].stopped:
                    kept[row] = n
        except BaseException:
            for q in seqs:
                q.cancel()
            raise
        row_states = self._finish_rows(seqs, rows, return_state)
        results = []
        for row, seq in enumerate(seqs):
            raw = seq.result
            ids = list(raw.token_ids)
            reason = raw.finish_reason
            if kept[row] is not None:
                ids, reason = ids[:kept[row]], "stop_string"
            text = None
            if texts is not None:
                texts[row].finish()
                text = texts[row].text
            results.append(GenerationResult(ids, reason, raw.prompt_tokens, raw.prefill_ms,
                                            raw.decode_ms, text, raw.prefill_tokens,
                                            row_states[row],
                                            None if lps[row] is None else lps[row][:len(ids)]))
        return results if batch else results[0]

    # ---- issue 25: speculative decoding ----
    _SPEC_KEYS = ("method", "draft", "k", "ngram_max", "ngram_min", "adaptive")

    def _speculative_args(self, spec):
        """-> (method, k, ngram_max, ngram_min, draft _C.Generator or None, adaptive),
        validated."""
        if not isinstance(spec, dict):
            raise ValueError(f"speculative must be a dict such as dict(method='prompt_lookup', "
                             f"k=8) or dict(draft='model', k=4), got {_args.show(spec)}")
        for key in spec:
            if key not in self._SPEC_KEYS:
                raise ValueError(f"speculative: unknown key {_args.show(key)} (known: "
                                 f"{', '.join(self._SPEC_KEYS)})")
        method = spec.get("method", "draft" if spec.get("draft") is not None else None)
        if method not in ("prompt_lookup", "draft"):
            raise ValueError(f"speculative['method'] must be 'prompt_lookup' or 'draft', got "
                             f"{_args.show(method)}")
        max_k = int(_C.SPECULATIVE_MAX_K)
        k = _args.integer("speculative['k']", spec.get("k", 7 if method == "prompt_lookup" else 4),
                          1, max_k)
        ngram_max = _args.integer("speculative['ngram_max']", spec.get("ngram_max", 3), 1, 64)
        ngram_min = _args.integer("speculative['ngram_min']", spec.get("ngram_min", 1), 1,
                                  ngram_max)
        adaptive = spec.get("adaptive", False)
        if not isinstance(adaptive, bool):
            raise ValueError(f"speculative['adaptive'] must be True or False, got "
                             f"{_args.show(adaptive)}")
        draft = None
        if method == "draft":
            d = spec.get("draft")
            if d is None:
                raise ValueError("speculative['draft'] is required for method 'draft' (a "
                                 "Generator or a model name or path)")
            draft = self._draft_generator(d)
            if draft.vocab_size != self.vocab_size:
                raise ValueError(f"speculative['draft']: its vocabulary has {draft.vocab_size} "
                                 f"tokens, the target's {self.vocab_size} (the draft must use "
                                 f"the target's tokenizer)")
            if (self.tokenizer is not None and draft.tokenizer is not None
                    and draft.tokenizer is not self.tokenizer
                    and _tokenizer_key(draft.tokenizer) != _tokenizer_key(self.tokenizer)):
                raise ValueError("speculative['draft']: its tokenizer differs from the "
                                 "target's (the draft must use the target's tokenizer)")
            if spec.get("ngram_max") is not None or spec.get("ngram_min") is not None:
                raise ValueError("speculative: ngram_max / ngram_min apply to method "
                                 "'prompt_lookup' only")
        elif spec.get("draft") is not None:
            raise ValueError("speculative['draft'] was given with method 'prompt_lookup'")
        return method, k, ngram_max, ngram_min, draft, adaptive

    def _draft_generator(self, d):
        if isinstance(d, Generator):
            return d
        if not isinstance(d, (str, os.PathLike)):
            raise ValueError(f"speculative['draft'] must be a Generator or a model name or "
                             f"path, got {_args.show(d)}")
        cache = self.__dict__.setdefault("_drafts", {})
        key = os.fspath(d)
        if key not in cache:  # loaded once, on this generator's device and dtype
            cache[key] = Generator(d, device=_device_arg(self.device), dtype=self.dtype)
        return cache[key]

    def _speculative_rows(self, prompt, spec, state, return_state, logprobs, stop, kwargs):
        """Validated speculative arguments -> (batch, [(ids, options)], run) where
        run(ids, options, callback=None) -> (RawResult, stats dict)."""
        for name, bad in (("state", state is not None), ("return_state", bool(return_state)),
                          ("logprobs", logprobs is not None), ("stop", stop is not None)):
            if bad:
                raise ValueError(f"speculative decoding does not support {name} (yet)")
        method, k, ngram_max, ngram_min, draft, adaptive = self._speculative_args(spec)
        batch = self._is_batch(prompt)
        prompts = list(prompt) if batch else [prompt]
        ids = []
        for p in prompts:
            if p is None:
                raise ValueError("speculative decoding needs a prompt")
            e = self._encode(p)
            if not e:
                raise ValueError("prompt is empty: give at least one token")
            ids.append(e)
        opts = self._row_options(len(prompts), kwargs, None)
        for r, o in enumerate(opts):
            if o.rng_stream < 0:
                o.rng_stream = r  # row r of a batch draws from stream r, as in generate()

        def run(e, o, callback=None):
            raw, st = self._g.generate_speculative(
                e, o, method, k, ngram_max, ngram_min, None if draft is None else draft._g,
                adaptive=adaptive, callback=callback)
            st["acceptance_rate"] = st["accepted"] / st["proposed"] if st["proposed"] else 0.0
            return raw, st

        return batch, list(zip(ids, opts)), run

    def _generate_speculative(self, prompt, spec, state, return_state, logprobs, stop, kwargs):
        batch, rows, run = self._speculative_rows(prompt, spec, state, return_state, logprobs,
                                                  stop, kwargs)
        results = []
        for e, o in rows:
            raw, st = run(e, o)
            out = list(raw.token_ids)
            text = None
            if self.tokenizer is not None:
                from .text import TextStream

                ts = TextStream(self.tokenizer, [])
                for t in out:
                    ts.push(t)
                ts.finish()
                text = ts.text
            results.append(GenerationResult(out, raw.finish_reason, raw.prompt_tokens,
                                            raw.prefill_ms, raw.decode_ms, text,
                                            raw.prefill_tokens, None, None, st))
        return results if batch else results[0]

    def _stream_speculative(self, prompt, spec, state, logprobs, stop, kwargs):
        """stream(..., speculative=...): the speculative loop on a thread of its own, outside
        the engine (as generate's), each token handed over as it is accepted; closing the
        iterator early stops the loop at its next token."""
        import queue
        import threading

        _, rows, run = self._speculative_rows(prompt, spec, state, False, logprobs, stop, kwargs)
        (e, o), = rows
        text_mode = isinstance(prompt, str)
        q: "queue.SimpleQueue" = queue.SimpleQueue()
        closed = threading.Event()

        def push(tok):
            q.put(("token", int(tok)))
            return not closed.is_set()

        def work():
            try:
                q.put(("done", run(e, o, push)))
            except BaseException as exc:  # handed to the reader
                q.put(("error", exc))

        out = StreamIterator()
        thread = threading.Thread(target=work, name="mambart-speculative", daemon=True)

        def pieces():
            from .text import TextStream

            ts = TextStream(self.tokenizer, []) if (text_mode and self.tokenizer) else None
            thread.start()
            try:
                while True:
                    try:
                        kind, val = q.get(timeout=0.25)  # slices: Ctrl-C gets through
                    except queue.Empty:
                        continue
                    if kind == "error":
                        raise val
                    if kind == "done":
                        raw, st = val
                        break
                    if ts is None:
                        yield val
                        continue
                    ts.push(val)
                    if ts.last_piece:
                        yield ts.last_piece
                if ts is not None:
                    tail = ts.finish()
                    if tail:
                        yield tail
            finally:
                closed.set()
                thread.join()
            out.result = GenerationResult(list(raw.token_ids), raw.finish_reason,
                                          raw.prompt_tokens, raw.prefill_ms, raw.decode_ms,
                                          ts.text if ts is not None else None,
                                          raw.prefill_tokens, None, None, st)

        out._it = pieces()
        return out

    @staticmethod
    def _row_tokens(seq, rows, texts, row, lps=None):
        """Yields the row's tokens as the engine makes them, pushed into the row's TextStream
        (waits in short slices, so Ctrl-C gets through); with `lps` (a list, for a request with
        logprobs), each token's TokenLogprob is appended to it before the token is yielded. A
        stop string matched on the text (the engine matches them on bytes when it has the
        vocabulary's bytes; the text also matches where decoding differs from the bytes) stops
        the request, and later tokens are dropped."""
        stopped = False
        while True:
            if lps is None:
                got = seq.read(0.25)
            else:
                got = seq.read_logprobs(0.25)
                if got is not None:
                    got, lp = got
                    lps.extend(TokenLogprob(t, x, [(int(i), v) for i, v in top])
                               for t, (x, top) in zip(got, lp))
            if got is None:
                break
            for tok in got:
                if stopped:
                    continue
                if texts is not None:
                    texts[row].push(tok)
                    # The engine matches stop strings on bytes; the text can also match where
                    # the decoded text differs from the bytes (U+FFFD for invalid UTF-8).
                    if texts[row].stopped:
                        stopped = True
                        seq.stop("stop_string")
                yield tok
        if seq.error:
            raise RuntimeError(seq.error)

    def stream(self, prompt: Prompt = None, max_new_tokens: int = 64, temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
               repetition_penalty: float = 1.0, seed: Optional[int] = None,
               stop_token_ids: Optional[Sequence[int]] = None,
               stop: Union[str, Sequence[str], None] = None,
               ignore_eos: bool = False, state=None,
               logprobs: Optional[int] = None,
               speculative: Optional[dict] = None) -> StreamIterator:
        """Yields new token ids as they are made (token-id prompt), or text pieces that are
        always valid UTF-8 (text prompt). state: a SequenceState to continue (see generate).
        The request runs on the generator's engine; closing the iterator early cancels it.
        The iterator's `.result` (a GenerationResult: finish reason, timings) is set once it
        is exhausted. logprobs=N (>= 0): the iterator's `.logprobs` list gets each new
        token's TokenLogprob as it arrives.
        speculative: as generate's (docs/speculative.md): the tokens come as each verification
        accepts them, from a loop of its own outside the engine; `.result.speculative` holds
        the counts. Not combined with state, logprobs or stop strings (ValueError)."""
        if self._is_batch(prompt) or isinstance(state, (list, tuple)):
            raise ValueError("stream takes one prompt; use generate for a list of prompts")
        kwargs = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                      top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty, seed=seed,
                      stop_token_ids=stop_token_ids, ignore_eos=ignore_eos)
        if speculative is not None:
            return self._stream_speculative(prompt, speculative, state, logprobs, stop, kwargs)
        text_mode = isinstance(prompt, str)
        seqs, stops, rows = self._start([prompt], stop, kwargs,
                                        None if state is None else [state], logprobs=logprobs)
        out = StreamIterator()
        if rows["logprobs"] >= 0:
            out.logprobs = []
        out._it = self._iterate(seqs, text_mode, stops, rows, out)
        return out

    def _iterate(self, seqs, text_mode, stops, rows, out=None):
        texts = self._row_texts(1, stops) if (text_mode or stops) else None
        seq = seqs[0]
        n = 0  # tokens made (kept when a stop string matched)
        try:
            lps = out.logprobs if out is not None else None
            for tok in self._row_tokens(seq, rows, texts, 0, lps):
                n += 1
                if texts is None or not text_mode:
                    yield tok
                    continue
                piece = texts[0].last_piece
                if piece:
                    yield piece
            if texts is not None:
                tail = texts[0].finish()
                if text_mode and tail:
                    yield tail
        finally:
            if not seq.finished:
                seq.cancel()
        if out is not None:
            raw = seq.result
            ids, reason = list(raw.token_ids), raw.finish_reason
            if texts is not None and texts[0].stopped:
                ids, reason = ids[:n], "stop_string"
            out.result = GenerationResult(ids, reason, raw.prompt_tokens, raw.prefill_ms,
                                          raw.decode_ms, texts[0].text if texts else None,
                                          raw.prefill_tokens, None,
                                          None if out.logprobs is None else out.logprobs[:n])

"""Issue 7 on the Generator: sequence states, the prompt cache, per-row options and scoring.

`Generator` (generator.py) inherits these methods from `SequenceAPI`; they only use the native
core's backend-generic entry points (prefill, start_rows, score, state copies), so they work the
same on the CPU and CUDA backends.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import numpy as np

from .state import PromptCache, SequenceState, StateError, load_state, wrap_native

# Generation parameters that may be given per row (a list with one value per prompt).
ROW_PARAMS = ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
              "seed", "stop_token_ids", "ignore_eos")


@dataclass
class ScoreResult:
    """Log-probabilities of a token sequence under the model.

    token_ids: the tokens scored (without a state: tokens 1..n-1 of the input, since the first
        token has no context; with a state: every input token, each given the state's history);
    logprobs: float64 log p(token | everything before it), from a full-vocabulary log-softmax
        computed in float64 on the fp32 logits;
    greedy: whether each token is the argmax of its distribution (lowest id on ties).
    """

    token_ids: List[int]
    logprobs: np.ndarray
    greedy: np.ndarray

    @property
    def sum(self) -> float:
        return float(np.sum(self.logprobs))

    @property
    def is_greedy(self) -> bool:
        return bool(np.all(self.greedy))


class SequenceAPI:
    """Mixin for Generator (which provides _g, _encode, _options, config, dtype, device,
    fingerprint)."""

    # ---- states ----
    def _state_meta(self) -> dict:
        """What a SequenceState of this model carries besides its native state."""
        if getattr(self, "_state_meta_dict", None) is None:
            self._state_meta_dict = dict(
                fingerprint=self.fingerprint, dtype=self.dtype,
                architecture=self.config["architecture"], spec=self._g.state_spec,
                layer_types=self._g.layer_type_list)
        return self._state_meta_dict

    def _wrap_state(self, native) -> Optional[SequenceState]:
        if native is None:
            return None
        return wrap_native(native, **self._state_meta())

    def _cache_key(self) -> str:
        """The prompt cache's key of this generator's states: fingerprint, dtype, device."""
        return self._g.prompt_cache_key

    @property
    def prompt_cache(self) -> Optional[PromptCache]:
        """The exact prefix cache the engine uses (None: off). Assign a PromptCache (e.g.
        another generator's: `g2.prompt_cache = g1.prompt_cache` shares it; entries are keyed
        by model, so each generator is served only its own) or None."""
        return self._prompt_cache

    @prompt_cache.setter
    def prompt_cache(self, cache: Optional[PromptCache]) -> None:
        if cache is not None and not isinstance(cache, PromptCache):
            raise TypeError(f"prompt_cache must be a PromptCache or None, got "
                            f"{type(cache).__name__}")
        if cache is not None:
            cache._attach(self._cache_key(), self._state_meta())
        self._g.prompt_cache = cache._c if cache is not None else None
        self._prompt_cache = cache

    def enable_prompt_cache(self, max_bytes: int) -> PromptCache:
        """Turns on the exact prefix cache with a budget of `max_bytes` (LRU eviction); 0 turns
        it off. Returns the cache (its hits/misses/nbytes are for inspection). The engine looks
        every request without a state up in it and keeps prompt and final states in it. One
        cache may be shared by several generators: `g2.prompt_cache = g1.prompt_cache`."""
        self.prompt_cache = PromptCache(max_bytes) if max_bytes else None
        return self.prompt_cache

    def _encode_or_empty(self, prompt) -> List[int]:
        return [] if prompt is None else self._encode(prompt)

    def prefill(self, prompt=None, state: Optional[SequenceState] = None) -> SequenceState:
        """Runs `prompt` (text or token ids) through the model, after `state` when given, and
        returns the sequence's state (with its next-token logits). With the prompt cache on,
        only the tokens after the longest cached prefix are run."""
        ids = self._encode_or_empty(prompt)
        start, ids, _ = self._start_state(ids, state)
        native = self._g.prefill(ids, start)
        out = self._wrap_state(native)
        if self.prompt_cache is not None:
            self.prompt_cache.insert(self._cache_key(), out)
        return out

    def load_state(self, path) -> SequenceState:
        """Loads a state file for this generator: checks the model identity and dtype (a
        StateError naming the file otherwise) and places the state on this device."""
        st = load_state(path)
        return self._wrap_state(st._native_for(self))

    def _start_state(self, ids: List[int], state, use_cache: bool = True):
        """-> (native start state or None, tokens to feed, tokens served by the cache). The
        engine looks its requests up in the cache itself (use_cache False)."""
        if state is not None:
            if not isinstance(state, SequenceState):
                raise TypeError(f"state must be a SequenceState, got {type(state).__name__}")
            return state._native_for(self), ids, 0
        if use_cache and self.prompt_cache is not None and ids:
            hit = self.prompt_cache.lookup(self._cache_key(), ids)
            if hit is not None:
                return hit._native_for(self), ids[hit.num_tokens:], hit._native.fed
        return None, ids, 0

    # ---- rows ----
    def _rows(self, prompt, state):
        """-> (batch?, prompts, states per row or None)."""
        for st in (state if isinstance(state, (list, tuple)) else [state]):
            if st is not None and not isinstance(st, SequenceState):
                raise TypeError(f"state must be a SequenceState (or a list of them), got "
                                f"{type(st).__name__}")
        if state is None:
            batch = self._is_batch(prompt)
            return batch, (list(prompt) if batch else [prompt]), None
        if isinstance(state, (list, tuple)):
            n = len(state)
            if prompt is None:
                prompts = [None] * n
            elif self._is_batch(prompt) and len(prompt) == n:
                prompts = list(prompt)
            else:
                raise ValueError(f"state is a list of {n} states: give prompt=None or a list of "
                                 f"{n} prompts (the tokens each row adds after its state)")
            return True, prompts, list(state)
        if prompt is not None and self._is_batch(prompt):
            return True, list(prompt), [state] * len(prompt)
        return False, [prompt], [state]

    def _row_options(self, n: int, kwargs: dict, states):
        """One _C.GenerationOptions per row; list-valued parameters are per row."""
        per_row = {}
        for k in ROW_PARAMS:
            v = kwargs[k]
            if k == "stop_token_ids":
                is_rows = isinstance(v, (list, tuple)) and len(v) > 0 and all(
                    x is None or isinstance(x, (list, tuple, np.ndarray)) for x in v)
            else:
                is_rows = isinstance(v, (list, tuple, np.ndarray))
            if is_rows:
                if len(v) != n:
                    raise ValueError(f"{k} has {len(v)} values for {n} prompts (give one value, "
                                     f"or one per prompt)")
                per_row[k] = list(v)
        opts = []
        for r in range(n):
            kw = {k: (per_row[k][r] if k in per_row else kwargs[k]) for k in ROW_PARAMS}
            st = states[r] if states is not None else None
            rng = st.rng if st is not None else None
            try:
                o = self._options(**kw)
            except ValueError as e:
                raise ValueError(f"{e} (row {r})" if per_row else str(e)) from None
            if kw["seed"] is None and rng is not None:
                # Continue the state's generation exactly: same seed, stream and counter.
                o.seed, o.rng_stream, o.rng_counter = int(rng[0]), int(rng[1]), int(rng[2])
            elif "seed" in per_row:
                o.rng_stream = 0  # a per-row seed: the row equals a single run with that seed
            opts.append(o)
        return opts

    def _prepare_rows(self, prompts, states, kwargs):
        """-> (per-row options, start states (given ones only: the engine consults the prompt
        cache), feeds)."""
        n = len(prompts)
        ids = [self._encode_or_empty(p) for p in prompts]
        opts = self._row_options(n, kwargs, states)
        starts, feeds = [], []
        for r in range(n):
            st, feed, _ = self._start_state(ids[r], states[r] if states is not None else None,
                                            use_cache=False)
            if st is None and not feed:
                raise ValueError(f"prompt {r} is empty: give at least one token")
            starts.append(st)
            feeds.append(feed)
        return opts, starts, feeds

    def _start_rows(self, prompts, states, kwargs, keep_states: bool):
        """The fixed-batch native stream of these rows (GenerationStream: every row decodes in
        each step until the batch is done; no prompt cache). The public calls use the engine
        (_submit_rows)."""
        opts, starts, feeds = self._prepare_rows(prompts, states, kwargs)
        stream = self._g.start_rows(feeds, opts, starts, keep_states)
        return stream, dict(keep=keep_states, n=len(prompts))

    def _submit_rows(self, prompts, states, kwargs, keep_states: bool, stops=(),
                     logprobs=None, block: bool = True, notifier=None, keys=None):
        """Submits one engine request per row (issue 14): -> (EngineSequence per row, info).
        Row r of a batch draws from RNG stream r unless it has its own seed or continues a
        state's generation, as a fixed batch did. Stop strings are matched by the engine when
        it has the vocabulary's bytes; info["py_stops"] says when Python must match them.
        logprobs: None, or the number of top tokens to report with each token's logprob (the
        sequences are then read with read_logprobs). block=False raises _C.EngineBusy on a
        full queue; notifier (a _C.Notifier) and keys (one per row): each row writes its key to
        the notifier's pipe after each delivery (the server's event loop waits on it)."""
        from . import _args

        lp = -1 if logprobs is None else _args.integer("logprobs", logprobs, 0, self.vocab_size)
        opts, starts, feeds = self._prepare_rows(prompts, states, kwargs)
        engine_stops = self._engine_matches_stops() if stops else False
        for r, o in enumerate(opts):
            if o.rng_stream < 0:
                o.rng_stream = r
        seqs = self._g.submit_many(feeds, opts, starts, list(stops) if engine_stops else [],
                                   keep_states, block, lp, notifier, list(keys or []))
        return seqs, dict(keep=keep_states, n=len(prompts), logprobs=lp,
                          py_stops=bool(stops) and not engine_stops)

    def _engine_matches_stops(self) -> bool:
        """Whether the engine can match stop strings (it has this tokenizer's bytes)."""
        with self._engine_lock:
            if self._engine_stops is None:
                tok = self.tokenizer
                to_str = getattr(tok, "to_str", None)
                if callable(to_str) and not self._g.engine_started:
                    try:
                        self._g.set_tokenizer_json(to_str())
                    except ValueError:
                        pass  # the engine reads the model's tokenizer.json, or Python matches
                self._engine_stops = bool(self._g.engine_has_vocab_bytes()) and callable(to_str)
            return self._engine_stops

    def engine_stats(self) -> dict:
        """The engine's counters: running, prefilling and queued requests, decode slots, steps
        and rows decoded (mean_rows_per_step > 1 means requests shared decode steps), tokens
        generated and prompt tokens prefilled, requests submitted / finished / cancelled /
        timed out / failed / rejected; the prompt cache's hits and misses (this engine's
        lookups), cached_tokens (prompt tokens its hits served, not prefilled), and its
        entries, bytes and budget (cache_max_bytes; zeros when the cache is off)."""
        return dict(self._g.engine_stats())

    def _finish_rows(self, seqs, rows, return_state: bool):
        """After the rows finished: their final states (when asked). The engine has put their
        prompt and final states into the prompt cache already."""
        if not (return_state and rows["keep"]):
            return [None] * rows["n"]
        return [self._wrap_state(seqs[r].final_state) for r in range(rows["n"])]

    # ---- scoring ----
    def score(self, tokens, state: Optional[SequenceState] = None):
        """Log-probabilities of `tokens` (text or token ids; or a list of them: a list of
        results). Without a state the first token has no context and is not scored (the result
        covers tokens 1..n-1); with `state`, every token is scored given the state's history.
        Memory is bounded (logits are made 64 positions at a time)."""
        if self._is_batch(tokens):
            return [self.score(t, state) for t in tokens]
        ids = self._encode(tokens)
        native = state._native_for(self) if state is not None else None
        if native is None and len(ids) < 2:
            raise ValueError("score needs at least 2 tokens without a state (the first token "
                             "has no context); pass state= to score a single token")
        lp, greedy = self._g.score(ids, native)
        scored = ids if native is not None else ids[1:]
        return ScoreResult(list(scored), lp, greedy)

"""An lm-evaluation-harness model for mambart (issue 7).

    pip install lm-eval
    python -m mambart.lm_eval_adapter --model mambart \\
        --model_args pretrained=/path/to/model --device cpu --tasks lambada_openai

`python -m mambart.lm_eval_adapter` is lm-eval's own command line (`lm_eval ...`) with the
"mambart" model registered first (the plain `lm_eval` command does not import mambart). From
Python: `lm_eval.simple_evaluate(model=MambartLM(pretrained=...), tasks=[...])`.

model_args: pretrained (a mambart model dir, checkpoint dir or hub name), dtype, tokenizer (a
tokenizer.json path), prompt_cache_bytes, max_gen_toks (default 256). The device comes from
lm-eval's --device (its default is cuda:0: pass --device cpu on a CPU-only machine).

Requests (lm-eval's Instance objects; only `.args` is read):
  loglikelihood: args = (context, continuation) -> (sum of log p(continuation tokens | context),
      is_greedy). The continuation's tokens are those of tokenize(context + continuation) after
      tokenize(context) (trailing spaces of the context move to the continuation, as lm-eval's
      own models do); an empty context is replaced by the end-of-text token. Each distinct
      context is prefilled once and its continuations scored from its state (one state alive
      at a time).
  loglikelihood_rolling: args = (text,) -> log p(text): every token given all before it, the
      first given the end-of-text token. No windows: a Mamba state has no length limit and
      scoring memory is bounded.
  generate_until: args = (context, gen_kwargs) with gen_kwargs "until" (str or list),
      "max_gen_toks", "do_sample", "temperature" -> the generated text, cut before the first
      stop string.
This module imports without lm-eval installed (the class then has no lm-eval base class).
"""

from __future__ import annotations

import sys
from typing import Any, Dict, List, Optional, Tuple

try:  # lm-eval is optional: the adapter's logic works on anything with `.args`
    from lm_eval.api.model import LM as _Base
    from lm_eval.api.registry import register_model as _register
except ImportError:  # pragma: no cover - depends on the environment
    _Base = object

    def _register(*names):
        return lambda cls: cls


def _parse_bool(v) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in ("1", "true", "yes", "on")
    return bool(v)


@_register("mambart")
class MambartLM(_Base):
    """lm-eval model over a mambart Generator (see the module docstring)."""

    def __init__(self, pretrained=None, device: str = "cpu", dtype: Optional[str] = None,
                 tokenizer: Optional[str] = None, prompt_cache_bytes: int = 0,
                 max_gen_toks: int = 256, generator=None, batch_size=None, max_batch_size=None,
                 **unused: Any):
        if _Base is not object:
            super().__init__()
        if generator is None:
            if pretrained is None:
                raise ValueError("MambartLM needs pretrained=<model dir or name> (or generator=)")
            from .generator import Generator

            generator = Generator(pretrained, device=device or "cpu", dtype=dtype,
                                  tokenizer=tokenizer,
                                  prompt_cache_bytes=int(prompt_cache_bytes or 0))
        if generator.tokenizer is None:
            raise ValueError("MambartLM needs a tokenizer: the model has none; pass "
                             "tokenizer=<path to tokenizer.json>")
        self.g = generator
        self.max_gen_toks = int(max_gen_toks)
        eot = generator.config.get("eos_token_id")
        if eot is None:
            eot = generator.config.get("bos_token_id")
        if eot is None:
            raise ValueError("the model config has no eos_token_id or bos_token_id: needed as the "
                             "context of an empty prompt")
        self.eot_token_id = int(eot)

    # ---- helpers ----
    def tok_encode(self, text: str) -> List[int]:
        return self.g.tokenizer.encode(text).ids

    def _encode_pair(self, context: str, continuation: str) -> Tuple[List[int], List[int]]:
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces > 0:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.tok_encode(context + continuation)
        ctx = self.tok_encode(context)
        return ctx, whole[len(ctx):]

    # ---- lm-eval interface ----
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> List[Tuple[float, bool]]:
        out: List[Optional[Tuple[float, bool]]] = [None] * len(requests)
        # Requests grouped by context (lm-eval sends a question's choices together, but any
        # order works): one prefill per distinct context, one state alive at a time.
        groups: Dict[tuple, List[Tuple[int, List[int]]]] = {}
        for i, req in enumerate(requests):
            context, continuation = req.args[0], req.args[1]
            if context == "":
                ctx, cont = [self.eot_token_id], self.tok_encode(continuation)
            else:
                ctx, cont = self._encode_pair(context, continuation)
            if not ctx:
                ctx = [self.eot_token_id]
            if not cont:
                out[i] = (0.0, True)
                continue
            groups.setdefault(tuple(ctx), []).append((i, cont))
        for ctx, items in groups.items():
            state = self.g.prefill(list(ctx))
            for i, cont in items:
                res = self.g.score(cont, state=state)
                out[i] = (res.sum, res.is_greedy)
            del state
        return out  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        out: List[float] = []
        for req in requests:
            ids = self.tok_encode(req.args[0])
            if not ids:
                out.append(0.0)
                continue
            out.append(self.g.score([self.eot_token_id] + ids).sum)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        out: List[str] = []
        for req in requests:
            context, kw = req.args[0], dict(req.args[1] if len(req.args) > 1 else {})
            until = kw.pop("until", None)
            if isinstance(until, str):
                until = [until]
            until = [u for u in (until or []) if u]
            max_toks = int(kw.pop("max_gen_toks", self.max_gen_toks))
            do_sample = _parse_bool(kw.pop("do_sample", False))
            temperature = float(kw.pop("temperature", 0.0)) if do_sample else 0.0
            seed = kw.pop("seed", 1234)
            prompt = self.tok_encode(context) if context else [self.eot_token_id]
            r = self.g.generate(prompt, max_new_tokens=max_toks, temperature=temperature,
                                seed=seed if temperature > 0 else 0, stop=until or None)
            out.append(r.text)
        return out

    # lm-eval asks for these with chat templates / logging; mambart has no chat templates.
    @property
    def tokenizer_name(self) -> str:
        return str(self.g.model_dir)

    def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
        raise NotImplementedError("mambart models have no chat template")


def main(argv: Optional[List[str]] = None) -> None:
    """`python -m mambart.lm_eval_adapter ...`: lm-eval's CLI with "mambart" registered."""
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        raise ImportError("lm-evaluation-harness is not installed: pip install lm-eval") from None
    if argv is not None:
        sys.argv = [sys.argv[0]] + list(argv)
    cli_evaluate()


if __name__ == "__main__":
    main()

"""The bundled demo models (issue 24; tools/train_demo.py): they resolve by name with no network,
are small, carry a model card whose numbers hold, and behave like trained models: greedy text
that tokenizes as Python, held-out perplexity far below chance, and decode equal to prefill.
Also: stream()'s iterator reports the finish reason and timings."""

from __future__ import annotations

import io
import json
import keyword
import math
import re
import tokenize

import numpy as np
import pytest

import mambart
from mambart import hub

DEMOS = ["mambart-demo", "mambart2-demo"]


@pytest.fixture(scope="module", params=DEMOS)
def demo(request):
    return request.param, mambart.Generator(request.param)


def test_bundled_names_need_no_hub(monkeypatch, demo):
    name, _ = demo

    def no_network(*a, **k):
        raise AssertionError("a bundled model must not touch the hub")

    monkeypatch.setattr(hub, "snapshot", no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    g = mambart.Generator(name)
    assert g.model_dir == hub.BUNDLED_DIR / name and g.tokenizer is not None
    assert g.config["architecture"] == ("mamba1" if name == "mambart-demo" else "mamba2")
    assert g.dtype == "bfloat16"
    files = {p.name: p.stat().st_size for p in g.model_dir.iterdir()}
    assert set(files) == {"config.json", "model.safetensors", "tokenizer.json", "README.md",
                          "training.json"}
    assert sum(files.values()) < 8 << 20  # a few MB


def test_model_card_matches_the_model(demo):
    name, g = demo
    card = (g.model_dir / "README.md").read_text()
    meta = json.loads((g.model_dir / "training.json").read_text())
    assert f"**{meta['heldout_perplexity']:.2f}**" in card
    assert f"{meta['steps']} steps of {meta['batch']} x {meta['seqlen']} tokens" in card
    n = sum(int(np.prod(s)) for s in _shapes(g.model_dir))
    assert f"{n:,}" in card and "standard library" in card


def _shapes(model_dir):
    from mambart._tensorio import read_safetensors_header

    return [t.shape for t in read_safetensors_header(str(model_dir / "model.safetensors")).values()]


def _python_tokens(text):
    """Python tokens of `text` (up to the first tokenizer error)."""
    out = []
    try:
        for t in tokenize.generate_tokens(io.StringIO(text).readline):
            out.append(t)
    except (tokenize.TokenError, IndentationError, SyntaxError):
        pass
    return out


def test_greedy_text_looks_like_python(demo):
    name, g = demo
    r = g.generate("def parse(", max_new_tokens=48)
    text = "def parse(" + r.text
    # what a random model does not do: Python keywords (and self) among the words, brackets,
    # and lines indented by multiples of four spaces
    words = re.findall(r"[A-Za-z_]+", r.text)
    kw = [w for w in words if keyword.iskeyword(w) or w == "self"]
    assert len(kw) >= 3, text
    assert "(" in r.text or ")" in r.text, text
    indents = [len(ln) - len(ln.lstrip(" ")) for ln in text.splitlines()[1:] if ln.strip()]
    assert indents and all(i % 4 == 0 for i in indents), text
    assert len(_python_tokens(text)) >= 10, text


def _heldout_text() -> str:
    """A standard-library file that train_demo held out (sha1 of its path = 0 mod 20)."""
    import sys
    import sysconfig
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import train_demo

    root, files = train_demo.stdlib_files()
    held = [p for rel, p in files if train_demo.held_out(rel) and p.stat().st_size > 4000]
    assert held, sysconfig.get_paths()["stdlib"]
    return held[0].read_text(encoding="utf-8", errors="replace")[:6000]


def test_heldout_perplexity_is_far_below_chance(demo):
    name, g = demo
    text = _heldout_text()
    sc = g.score(text)
    ppl = math.exp(-sc.sum / len(sc.token_ids))
    meta = json.loads((g.model_dir / "training.json").read_text())
    # chance is the vocabulary (4096); the card's number is over many held-out files, so one
    # file may differ, but not by much
    assert ppl < 300, ppl
    assert ppl < 4 * meta["heldout_perplexity"], (ppl, meta["heldout_perplexity"])
    # and text it was not trained on at all (English prose) is much less likely than Python
    prose = ("The weather was mild this spring, and the farmers in the valley planted early. "
             "By summer the orchards were heavy with fruit and the markets were full.")
    sp = g.score(prose)
    assert math.exp(-sp.sum / len(sp.token_ids)) > ppl


def test_decode_equals_prefill_on_a_trained_model(demo):
    """Greedy tokens equal the argmax of one prefill over prompt + tokens (teacher forcing)."""
    name, g = demo
    ids = g.tokenizer.encode("import os\nimport sys\n\ndef main(").ids
    r = g.generate(ids, max_new_tokens=24, ignore_eos=True)
    logits = g.logits(ids + r.token_ids[:-1])
    want = logits[len(ids) - 1:].argmax(axis=-1).tolist()
    assert r.token_ids == want


# ---------------------------------------------------------------- stream() results

def test_stream_reports_finish_reason_and_timings():
    g = mambart.Generator("mambart-demo")
    it = g.stream("def parse(", max_new_tokens=10, ignore_eos=True)
    assert it.result is None and it.finish_reason is None
    pieces = list(it)
    want = g.generate("def parse(", max_new_tokens=10, ignore_eos=True)
    r = it.result
    assert it.finish_reason == "length" == r.finish_reason
    assert "".join(pieces) == r.text == want.text and r.token_ids == want.token_ids
    assert r.prompt_tokens == want.prompt_tokens and r.prefill_ms > 0 and r.decode_ms > 0
    assert r.tokens_per_s > 0
    # a stop string: the reason says so, and the text stops before it
    stop = want.text[3:6]
    it = g.stream("def parse(", max_new_tokens=10, ignore_eos=True, stop=stop)
    text = "".join(it)
    assert it.finish_reason == "stop_string" and text == want.text[:want.text.index(stop)]
    # token ids in, token ids out; a stop token
    ids = g.tokenizer.encode("def parse(").ids
    k = want.token_ids.index(want.token_ids[2])
    it = g.stream(ids, max_new_tokens=10, stop_token_ids=[want.token_ids[2]], ignore_eos=True)
    assert list(it) == want.token_ids[:k + 1] and it.finish_reason == "stop_token"
    # a stream left before its end has no result
    it = g.stream("def parse(", max_new_tokens=10)
    next(it)
    assert it.result is None

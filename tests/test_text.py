"""Text in and out: the incremental UTF-8-safe detokenizer, stop strings, and Generator text
generation equal to transformers' decoded greedy output."""

from __future__ import annotations

import shutil

import pytest
import torch
from tokenizers import Tokenizer

import mambart
from ckpt_utils import hf_model, pad_to, train_tokenizer, write_state_spaces
from mambart.errors import ModelLoadError
from mambart.text import TextStream, load_tokenizer


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    return train_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json")


@pytest.fixture(scope="module")
def tok(tok_path):
    return load_tokenizer(tok_path)


def byte_token_ids(tok: Tokenizer, text: str):
    """One token per UTF-8 byte (the byte-level alphabet: GPT-2's bytes-to-unicode map)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = {b: chr(c) for b, c in zip(bs, cs)}
    ids = [tok.token_to_id(table[b]) for b in text.encode("utf-8")]
    assert None not in ids
    return ids


def run(stream: TextStream, ids):
    pieces = [stream.push(i) for i in ids]
    pieces.append(stream.finish())
    return pieces


@pytest.mark.parametrize("text", ["€", "naïve café", "😀🚀 ok", "日本語", "a€b😀c"])
def test_multibyte_characters_split_across_tokens_come_out_whole(tok, text):
    ids = byte_token_ids(tok, text)
    assert tok.decode(ids[:1]) != text[:1] or len(text[0].encode()) == 1
    s = TextStream(tok)
    pieces = run(s, ids)
    assert "".join(pieces) == text == s.text
    for p in pieces:
        assert "\ufffd" not in p
    # nothing comes out until the character is complete
    first_len = len(text[0].encode("utf-8"))
    assert pieces[:first_len - 1] == [""] * (first_len - 1)
    assert pieces[first_len - 1] == text[0] if first_len > 1 else pieces[0].startswith(text[0])


def test_normal_tokenization_streams_the_decoded_text(tok):
    text = "Café, naïve 😀 and 日本語: the quick brown fox. €100!"
    ids = tok.encode(text).ids
    s = TextStream(tok)
    pieces = run(s, ids)
    assert "".join(pieces) == tok.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)
    assert sum(1 for p in pieces if p) > 5  # it streams, not one piece at the end


def test_special_tokens_are_not_text(tok):
    ids = tok.encode("hello").ids + [0] + tok.encode(" world").ids
    s = TextStream(tok)
    assert "".join(run(s, ids)) == "hello world"


def test_stop_string_cuts_and_stops(tok):
    text = "Hello world. STOP here and more"
    s = TextStream(tok, ["STOP"])
    pieces = []
    for i in byte_token_ids(tok, text):
        pieces.append(s.push(i))
        if s.stopped:
            break
    assert s.stopped
    assert "".join(pieces) == "Hello world. " == s.text
    assert s.push(5) == "" and s.finish() == "" and s.text == "Hello world. "
    # the partial match "S", "ST", "STO" was held back, never emitted
    assert all("S" not in p for p in pieces)


def test_possible_stop_prefix_is_flushed_at_finish(tok):
    s = TextStream(tok, ["STOP"])
    pieces = run(s, byte_token_ids(tok, "Hello ST"))
    assert not s.stopped
    assert "".join(pieces[:-1]) == "Hello " and pieces[-1] == "ST"
    assert s.text == "Hello ST"


def test_earliest_of_several_stops_and_stop_inside_one_token(tok):
    s = TextStream(tok, ["fox", "quick"])
    out = "".join(run(s, tok.encode("the quick brown fox").ids))
    assert s.stopped and out == "the " == s.text
    s = TextStream(tok, ["\n"])
    assert "".join(run(s, tok.encode("line one\nline two").ids)) == "line one"


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="nope.json: tokenizer file not found"):
        load_tokenizer(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{\"not\": \"a tokenizer\"}")
    with pytest.raises(ModelLoadError, match="bad.json: not a valid tokenizer.json"):
        load_tokenizer(bad)


# ---------------------------------------------------------------- Generator with text

V = 300


@pytest.fixture(scope="module")
def text_model(tmp_path_factory, tok_path):
    """A state-spaces Mamba-1 checkpoint (+ tokenizer) converted on the fly by Generator, and
    the transformers model holding the same weights."""
    tmp = tmp_path_factory.mktemp("text")
    model = hf_model("mamba1", pad_to(V, 8), None, tie_word_embeddings=True, seed=3)
    src = write_state_spaces(model, tmp / "ss", V, 8)
    shutil.copy(tok_path, src / "tokenizer.json")
    import os

    old = os.environ.get("MAMBART_CACHE")
    os.environ["MAMBART_CACHE"] = str(tmp / "cache")
    try:
        g = mambart.Generator(str(src))
    finally:
        if old is None:
            os.environ.pop("MAMBART_CACHE")
        else:
            os.environ["MAMBART_CACHE"] = old
    assert str(g.model_dir).startswith(str(tmp / "cache"))
    return g, model


def hf_greedy_text(model, tok, prompt, n):
    ids = tok.encode(prompt).ids
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, eos_token_id=None, pad_token_id=1,
                             suppress_tokens=list(range(V, model.config.vocab_size)))
    new = out[0, len(ids):].tolist()
    return new, tok.decode(new)


@pytest.mark.parametrize("prompt", ["The future of AI is", "Café 😀"])
def test_greedy_text_equals_transformers_decoded_greedy(text_model, tok, prompt):
    g, model = text_model
    ref_ids, ref_text = hf_greedy_text(model, tok, prompt, 32)
    r = g.generate(prompt, max_new_tokens=32, ignore_eos=True)
    assert r.token_ids == ref_ids
    assert r.text == ref_text == tok.decode(r.token_ids)
    assert "".join(g.stream(prompt, max_new_tokens=32, ignore_eos=True)) == r.text


def test_list_of_prompts_gives_list_of_results(text_model, tok):
    g, model = text_model
    prompts = ["The future of AI is", "Once upon a time", "x"]
    rs = g.generate(prompts, max_new_tokens=12, ignore_eos=True)
    assert isinstance(rs, list) and len(rs) == 3
    for p, r in zip(prompts, rs):
        assert r.text == g.generate(p, max_new_tokens=12, ignore_eos=True).text
        assert r.text == tok.decode(r.token_ids)


def test_stop_string_in_generation(text_model):
    g, _ = text_model
    full = g.generate("The future of AI is", max_new_tokens=32, ignore_eos=True).text
    stop = full[5:8]
    assert stop and stop in full
    cut = full[:full.index(stop)]
    r = g.generate("The future of AI is", max_new_tokens=32, ignore_eos=True, stop=stop)
    assert r.finish_reason == "stop_string" and r.text == cut
    assert "".join(g.stream("The future of AI is", max_new_tokens=32, ignore_eos=True,
                            stop=[stop])) == cut


def test_streamed_pieces_equal_the_full_decode_for_random_tokens(tok):
    """Random token sequences (invalid UTF-8 byte runs included): the pieces always add up to
    decode(all ids), and a piece never ends inside a character."""
    import random

    rng = random.Random(0)
    n = tok.get_vocab_size()
    for _ in range(500):
        ids = [rng.randrange(n) for _ in range(rng.randint(1, 24))]
        s = TextStream(tok)
        pieces = [s.push(i) for i in ids]
        assert all(not p.endswith("\ufffd") for p in pieces)
        pieces.append(s.finish())
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)

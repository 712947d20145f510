"""tiktoken-style tokenizer files (Llama-3's tokenizer.model, as Mamba-3 checkpoints may ship)
converted into a `tokenizers` tokenizer: the same ids as the original BPE on every text tried,
text round trips, special tokens from tokenizer_config.json, bad files named."""

import base64
import json

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from mambart._tiktoken import (LLAMA3_PATTERN, byte_alphabet, convert_tiktoken_dir,
                               tokenizer_from_tiktoken)
from mambart.errors import ModelLoadError

TEXTS = ["def parse(text):\n    return text.split(',')\n", "Hello, world! It's 2026.",
         "  spaces   and\ttabs\r\nnew lines\n\n", "unicodé ünïcödé 日本語のテキスト 🙂",
         "numbers 1234567 3.14159 and CAPS'LL", ""]
CORPUS = [t * 3 for t in TEXTS] + ["The quick brown fox jumps over the lazy dog. " * 20,
                                    "import os\nfor i in range(10):\n    print(i)\n" * 10]


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """A byte-level BPE trained with the Llama-3 split, and its tiktoken rank file."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    inv = {c: b for b, c in byte_alphabet().items()}
    d = tmp_path_factory.mktemp("tt")
    lines = []
    for s, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
        lines.append(f"{base64.b64encode(bytes(inv[c] for c in s)).decode()} {i}")
    (d / "tokenizer.model").write_text("\n".join(lines) + "\n")
    n = tok.get_vocab_size()
    (d / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {
        str(n): {"content": "<|begin_of_text|>", "special": True},
        str(n + 1): {"content": "<|end_of_text|>", "special": True}}}))
    return tok, d


def test_same_ids_and_round_trip(original, tmp_path):
    tok, d = original
    out = convert_tiktoken_dir(d, tmp_path / "tokenizer.json")
    conv = Tokenizer.from_file(str(out))
    for t in TEXTS + [t[::-1] for t in TEXTS]:
        assert conv.encode(t).ids == tok.encode(t).ids, t
        assert conv.decode(conv.encode(t).ids) == t
    n = tok.get_vocab_size()
    ids = conv.encode("hi<|end_of_text|>").ids
    assert ids[-1] == n + 1 and conv.decode(ids, skip_special_tokens=True) == "hi"


def test_bad_files_are_named(tmp_path):
    p = tmp_path / "tokenizer.model"
    for text, frag in (("abc\n", "line 1"), ("YQ== 0\nYQ== 1\n", "appears twice"),
                       ("YQ== 0\nYg== 5\n", "ranks are not"), ("YQ== -1\n", "line 1"), ("", "no tokens")):
        p.write_text(text)
        with pytest.raises(ModelLoadError, match=frag) as ei:
            tokenizer_from_tiktoken(p)
        assert str(p) in str(ei.value)
    p.write_text("YQ== 0\nYg== 1\n")
    cfg = tmp_path / "tokenizer_config.json"
    cfg.write_text(json.dumps({"added_tokens_decoder": {"7": {"content": "<s>"}}}))
    with pytest.raises(ModelLoadError, match="has id 7, expected 2"):
        tokenizer_from_tiktoken(p, cfg)

"""tiktoken-style tokenizer files (the `tokenizer.model` of Llama-3 checkpoints: one
"<base64 token bytes> <rank>" line per token) as a `tokenizers` byte-level BPE tokenizer, so
that a checkpoint shipping only those files still gets text in and out (issue 15).

The BPE of a rank table is rebuilt the standard way: the vocabulary is every token (bytes shown
through GPT-2's byte-to-unicode alphabet) with its rank as id, and every split of a token into
two tokens of the table is a merge whose priority is the token's rank, so that merging by
priority reproduces tiktoken's "merge the adjacent pair whose concatenation ranks lowest".
Words found whole in the vocabulary are taken as they are (tiktoken does the same). Pieces are
split first by the Llama-3 pattern. Special tokens come from `tokenizer_config.json`'s
`added_tokens_decoder` when it is there.
"""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ._files import read_bounded_text
from .errors import ModelLoadError

# The pre-tokenizer pattern of Llama-3's tiktoken encoding.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
MAX_RANKS_BYTES = 64 << 20
MAX_CONFIG_BYTES = 16 << 20


def byte_alphabet() -> Dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the ByteLevel alphabet)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def read_ranks(path) -> Dict[bytes, int]:
    """The rank table of a tiktoken file; ModelLoadError naming the file and line."""
    text = read_bounded_text(path, MAX_RANKS_BYTES, "tiktoken file", ModelLoadError)
    ranks: Dict[bytes, int] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError("expected '<base64> <rank>'")
            tok = base64.b64decode(parts[0], validate=True)
            rank = int(parts[1])
            if not tok or rank < 0 or not parts[1].isdigit():
                raise ValueError("empty token or bad rank")
        except (ValueError, binascii.Error) as e:
            raise ModelLoadError(f"{path}: line {n} is not a tiktoken entry ({e})") from None
        if tok in ranks:
            raise ModelLoadError(f"{path}: line {n}: token {tok!r} appears twice")
        ranks[tok] = rank
    if not ranks:
        raise ModelLoadError(f"{path}: no tokens")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ModelLoadError(f"{path}: ranks are not 0..{len(ranks) - 1}, each once")
    return ranks


def vocab_and_merges(ranks: Dict[bytes, int]) -> Tuple[Dict[str, int], List[Tuple[str, str]]]:
    alpha = byte_alphabet()
    show = lambda b: "".join(alpha[c] for c in b)  # noqa: E731
    vocab = {show(t): r for t, r in ranks.items()}
    merges = []
    for tok, rank in ranks.items():
        for i in range(1, len(tok)):
            left, right = tok[:i], tok[i:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], show(left), show(right)))
    merges.sort()
    return vocab, [(m[3], m[4]) for m in merges]


def special_tokens(config_path) -> List[Tuple[int, str]]:
    if config_path is None or not Path(config_path).is_file():
        return []
    try:
        cfg = json.loads(read_bounded_text(config_path, MAX_CONFIG_BYTES, "tokenizer config",
                                           ModelLoadError))
    except ValueError as e:
        raise ModelLoadError(f"{config_path}: not valid JSON ({e})") from None
    dec = cfg.get("added_tokens_decoder") if isinstance(cfg, dict) else None
    out = []
    for k, v in (dec or {}).items():
        if isinstance(v, dict) and isinstance(v.get("content"), str) and str(k).isdigit():
            out.append((int(k), v["content"]))
    return sorted(out)


def tokenizer_from_tiktoken(model_file, config_file=None, pattern: str = LLAMA3_PATTERN):
    """A `tokenizers.Tokenizer` equal to the tiktoken encoding of `model_file` (ranks) with
    `pattern`, plus the special tokens of `config_file` (tokenizer_config.json)."""
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    ranks = read_ranks(model_file)
    vocab, merges = vocab_and_merges(ranks)
    try:
        model = BPE(vocab, merges, ignore_merges=True)
    except TypeError:  # tokenizers < 0.19: whole words then go through the merges
        model = BPE(vocab, merges)
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    specials = special_tokens(config_file)
    if specials:
        from tokenizers import AddedToken

        n = len(ranks)
        for i, (tid, content) in enumerate(specials):
            if tid != n + i:
                raise ModelLoadError(f"{config_file}: special token {content!r} has id {tid}, "
                                     f"expected {n + i} (after the {n} ranked tokens, in order)")
        tok.add_special_tokens([AddedToken(c, special=True, normalized=False)
                                for _, c in specials])
    return tok


def convert_tiktoken_dir(src: Path, out_file: Path) -> Optional[Path]:
    """Writes `out_file` (tokenizer.json) from `src`/tokenizer.model (+ tokenizer_config.json)
    when `src` has a tiktoken file; returns the path, or None when it has none."""
    model = Path(src) / "tokenizer.model"
    if not model.is_file():
        return None
    with open(model, "rb") as f:
        head = f.read(64)
    if head.startswith(b"\n") or b"\x00" in head or head[:2] in (b"\x0a\x0b",):
        return None  # a SentencePiece protobuf, not a tiktoken table
    tok = tokenizer_from_tiktoken(model, Path(src) / "tokenizer_config.json")
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_file))
    return out_file

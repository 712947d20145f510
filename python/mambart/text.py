"""Text in and out: loading a `tokenizers` tokenizer and turning a stream of token ids into text
pieces that are always valid UTF-8, with stop strings.

Incremental decoding: byte-level BPE tokens can end in the middle of a multi-byte character,
which `decode` renders as U+FFFD. TextStream decodes a short window of recent tokens and emits
only the part that extends the previous decode and does not end in U+FFFD; the held-back bytes
come out whole once the character is complete (or at finish()).

Stop strings: text that matches a stop string ends the stream, cut before the match; text at the
end that could be the start of a stop string is held back until it is decided.
"""

from __future__ import annotations

import os
from typing import List, Sequence

from .errors import ModelLoadError


def load_tokenizer(path):
    """Loads a tokenizer.json with the `tokenizers` library; ModelLoadError naming the file."""
    from tokenizers import Tokenizer

    from ._files import MAX_TOKENIZER_BYTES, read_bounded_text

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelLoadError(f"{path}: tokenizer file not found")
    # Read here (a regular file, bounded), not by the library: a FIFO must not hang (issue 23).
    text = read_bounded_text(path, MAX_TOKENIZER_BYTES, "tokenizer file", ModelLoadError)
    try:
        return Tokenizer.from_str(text)
    except Exception as e:  # tokenizers raises plain Exception subclasses
        raise ModelLoadError(f"{path}: not a valid tokenizer.json ({e})") from None


class TextStream:
    """Detokenizes one generated sequence incrementally.

    push(token_id) -> the new text piece ("" when nothing is decided yet);
    stopped: a stop string matched (further pushes are ignored);
    finish() -> the remaining text; text: all the text emitted so far.
    """

    def __init__(self, tokenizer, stops: Sequence[str] = ()):
        self._tok = tokenizer
        self._stops: List[str] = [s for s in stops if s]
        self._ids: List[int] = []
        self._prefix = 0   # start of the decode window
        self._read = 0     # tokens before this index have been turned into text
        self._pending = ""  # decoded text held back (possible start of a stop string)
        self._out: List[str] = []
        self.stopped = False
        self._finished = False
        self.last_piece = ""  # what the latest push() returned

    @property
    def text(self) -> str:
        return "".join(self._out)

    @property
    def token_ids(self) -> List[int]:
        return list(self._ids)

    def _decode(self, ids) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        self.last_piece = self._push(token_id)
        return self.last_piece

    def _push(self, token_id: int) -> str:
        if self.stopped or self._finished:
            return ""
        self._ids.append(int(token_id))
        prev = self._decode(self._ids[self._prefix:self._read])
        full = self._decode(self._ids[self._prefix:])
        if len(full) <= len(prev) or full.endswith("\ufffd"):
            return ""  # nothing new yet, or an incomplete character: wait for more tokens
        piece = full[len(prev):]
        # The tokens just emitted become the context of the next window.
        self._prefix, self._read = self._read, len(self._ids)
        return self._emit(piece, final=False)

    def _emit(self, piece: str, final: bool) -> str:
        buf = self._pending + piece
        cut = -1
        for s in self._stops:
            i = buf.find(s)
            if i >= 0 and (cut < 0 or i < cut):
                cut = i
        if cut >= 0:
            out = buf[:cut]
            self._pending = ""
            self.stopped = True
        elif final:
            out, self._pending = buf, ""
        else:
            hold = 0
            for s in self._stops:
                for k in range(min(len(s) - 1, len(buf)), hold, -1):
                    if buf.endswith(s[:k]):
                        hold = k
                        break
            out = buf[:len(buf) - hold]
            self._pending = buf[len(buf) - hold:]
        if out:
            self._out.append(out)
        return out

    def finish(self) -> str:
        """Flushes the held-back text (an incomplete character decodes as U+FFFD)."""
        if self._finished or self.stopped:
            self._finished = True
            return ""
        self._finished = True
        prev = self._decode(self._ids[self._prefix:self._read])
        full = self._decode(self._ids[self._prefix:])
        piece = full[len(prev):] if len(full) > len(prev) else ""
        self._read = len(self._ids)
        return self._emit(piece, final=True)

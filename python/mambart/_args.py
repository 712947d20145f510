"""Validation of the public arguments, in one place and one message style (issue 23):

    "<parameter> must be <what is allowed>, got <value>"   (+ " (row r)" for per-row values)

as ValueError (the README's promise: a bad argument raises ValueError naming the parameter).
Types are checked before values and nothing is coerced: bools are not integers, floats are not
token ids or counts, strings / bytes / dicts / sets are not sequences of ids, and every integer
is range-checked here so that none reaches pybind11 (whose overflow errors dump signatures).
"""

from __future__ import annotations

import math
import re
from typing import List, Optional

import numpy as np

FLOAT32_MAX = float(np.finfo(np.float32).max)
INT64_MAX = 2**63 - 1
UINT64_LIMIT = 2**64


def show(v) -> str:
    """A value as messages quote it: repr, at most 60 characters."""
    try:
        r = repr(v)
    except Exception:  # a hostile __repr__
        r = f"<{type(v).__name__}>"
    return r if len(r) <= 60 else r[:57] + "..."


def _got(v, convert) -> str:
    """'got <value>', and for a string what the plain conversion would have said (the message
    callers saw before these checks, kept so that it still matches)."""
    if isinstance(v, str):
        try:
            convert(v)
            why = "a string"
        except (ValueError, OverflowError) as e:
            why = f"a string: {e}"
        return f"got {show(v)} ({why})"
    return f"got {show(v)}"


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def integer(name: str, v, lo: int, hi: int = INT64_MAX) -> int:
    if not _is_int(v):
        raise ValueError(f"{name} must be an integer in [{lo}, {hi}], {_got(v, int)}")
    v = int(v)
    if v < lo:
        raise ValueError(f"{name} must be >= {lo}, got {v}")
    if v > hi:
        raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {show(v)}")
    return v


def real(name: str, v, lo: float, hi: float = FLOAT32_MAX, lo_open: bool = False) -> float:
    """A finite number (int or float, not bool or str) in [lo, hi] ((lo, hi] when lo_open) that
    is also finite as the float32 the runtime computes with."""
    what = f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}]"
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be {what}, {_got(v, float)}")
    try:
        f = float(v)
    except OverflowError:
        raise ValueError(f"{name} must be {what}, got {show(v)}") from None
    if not math.isfinite(f) or f < lo or (lo_open and f == lo) or f > hi:
        raise ValueError(f"{name} must be {what}, got {show(v)}")
    return f


def flag(name: str, v) -> bool:
    if not isinstance(v, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {show(v)}")
    return bool(v)


def seed(v) -> Optional[int]:
    if v is None:
        return None
    if not _is_int(v) or not 0 <= int(v) < UINT64_LIMIT:
        raise ValueError(f"seed must be an integer in [0, 2^64) or None, got {show(v)}")
    return int(v)


def _id_list(name: str, v) -> list:
    if isinstance(v, np.ndarray):
        if v.ndim != 1 or not (np.issubdtype(v.dtype, np.integer) or v.size == 0):
            raise ValueError(f"{name} must be a 1-D array of integer token ids, got an array of "
                             f"shape {v.shape} and dtype {v.dtype}")
        return v.tolist()
    if isinstance(v, (str, bytes, bytearray, dict, set, frozenset)) or \
            not isinstance(v, (list, tuple, range)):
        raise ValueError(f"{name} must be a list of integer token ids, got {show(v)}")
    return list(v)


def token_ids(name: str, v, vocab_size: int, row: Optional[int] = None) -> List[int]:
    """A sequence of token ids in [0, vocab_size) (a list, tuple, range or 1-D integer array)."""
    ids = _id_list(name, v)
    for i, t in enumerate(ids):
        if not _is_int(t):
            raise ValueError(f"{name} must hold integer token ids, got {show(t)} at position {i}")
        if not 0 <= int(t) < vocab_size:
            raise ValueError(f"{name} must hold token ids in [0, {vocab_size}), got {int(t)} "
                             f"at position {i} (outside the vocabulary)")
    return [int(t) for t in ids]


def text(name: str, s: str) -> str:
    """A str that is valid Unicode (no lone surrogates, which no tokenizer can encode)."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{name} is not valid text: a lone surrogate {s[e.start]!r} at index "
                         f"{e.start}") from None
    return s


_DECIMAL = re.compile(r"-?[0-9]+\Z")


def decimal(text_value, lo: int, hi: int) -> int:
    """A decimal integer written as text (state metadata): digits only (int() would also take
    '0_6', ' 6', '+6' or other scripts' digits), in [lo, hi]."""
    if not isinstance(text_value, str) or not _DECIMAL.match(text_value) or len(text_value) > 40:
        raise ValueError(f"{show(text_value)} is not a decimal integer")
    v = int(text_value)
    if not lo <= v <= hi:
        raise ValueError(f"{v} is outside [{lo}, {hi}]")
    return v


def path(name: str, v) -> str:
    """A file-system path argument (str, bytes or os.PathLike), as a str."""
    import os

    if isinstance(v, (str, bytes, os.PathLike)):
        return os.fsdecode(v)
    raise ValueError(f"{name} must be a path (str or os.PathLike), got {show(v)}")

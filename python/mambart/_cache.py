"""The conversion cache: unconverted checkpoints are converted once into
$MAMBART_CACHE (default: $XDG_CACHE_HOME/mambart or ~/.cache/mambart) and reused.

The cache key is a hash of: the converter version, the requested dtype, the tokenizer file, and
for each file of the source directory its resolved path, size and modification time. A new hub
revision lives in a new snapshot directory whose files link to new blobs, and an edited local
file changes size or mtime, so either converts again; a different dtype converts again.
Directories appear in the cache only complete (convert() renames a finished temporary
directory into place), so a crash or Ctrl-C never leaves an entry that looks valid.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Optional

from ._files import MAX_JSON_BYTES, read_bounded_text
from .convert import CONVERTER_VERSION, convert
from .errors import ConversionError

_SKIP = {"README.md", ".gitattributes"}


def cache_root() -> Path:
    from . import _C

    env = _C.options()["cache_dir"]  # the cache_dir option (MAMBART_CACHE)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "mambart"


def _fingerprint(path: Path, dtype: Optional[str], tokenizer: Optional[Path]) -> str:
    h = hashlib.sha256()
    h.update(f"{CONVERTER_VERSION}\0{dtype}\0".encode())
    files = []
    for p in sorted(path.iterdir()):
        if p.name in _SKIP or p.name.startswith(".") or not p.is_file():
            continue
        files.append(p)
    if tokenizer is not None:
        files.append(Path(tokenizer))
    for p in files:
        real = os.path.realpath(p)
        st = os.stat(real)
        h.update(f"{p.name}\0{real}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()[:20]


def _slug(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")
    return (s or "model")[:64]


def _valid(d: Path) -> bool:
    cfg = d / "config.json"
    if not (cfg.is_file() and (d / "model.safetensors").is_file()):
        return False
    try:
        text = read_bounded_text(cfg, MAX_JSON_BYTES, "config")
        return "mambart_format" in json.loads(text)
    except (OSError, ValueError):
        return False


def ensure_converted(path, dtype: Optional[str] = None, *, tokenizer=None, name: Optional[str] = None,
                     source_info: Optional[dict] = None, progress: Optional[bool] = None) -> str:
    """Returns a mambart model directory converted from checkpoint directory `path`, converting
    it into the cache first unless an up-to-date conversion is there.

    tokenizer: a tokenizer.json to copy in (default: path/tokenizer.json if present).
    name: a readable prefix for the cache entry (default: the directory's name).
    progress: show a progress bar (default: when stderr is a terminal).
    """
    path = Path(os.fspath(path)).expanduser()
    if not path.is_dir():
        raise ConversionError(f"{path}: not a directory")
    if dtype is not None and dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"dtype must be None, 'float32', 'float16' or 'bfloat16', got {dtype!r}")
    tok = Path(os.fspath(tokenizer)) if tokenizer is not None else None
    if tok is None and (path / "tokenizer.json").is_file():
        tok = path / "tokenizer.json"
    key = _fingerprint(path, dtype, tok)
    root = cache_root() / "converted"
    dst = root / f"{_slug(name or path.name)}-{dtype or 'native'}-{key}"
    if _valid(dst):
        return str(dst)
    if progress is None:
        progress = sys.stderr.isatty()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConversionError(f"{root}: cannot create the conversion cache ({e.strerror or e}); "
                              f"set MAMBART_CACHE to a writable directory") from None
    if dst.exists():  # an invalid leftover (not made by us, or damaged): replace it
        overwrite = True
    else:
        overwrite = False
    try:
        convert(path, dst, dtype=dtype, overwrite=overwrite, progress=progress, tokenizer=tok,
                source_info=source_info)
    except OSError:
        # Another process may have finished the same conversion first (the rename lost).
        if _valid(dst):
            return str(dst)
        raise
    except ConversionError:
        if _valid(dst):  # lost a race on "already exists"
            return str(dst)
        raise
    return str(dst)

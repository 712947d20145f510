"""The conversion cache: unconverted checkpoints are converted once into
$MAMBART_CACHE (default: $XDG_CACHE_HOME/mambart or ~/.cache/mambart) and reused.

The cache key is a hash of: the converter version, the requested dtype, the tokenizer file, and
for each file of the source directory its resolved path, size and modification time. A new hub
revision lives in a new snapshot directory whose files link to new blobs, and an edited local
file changes size or mtime, so either converts again; a different dtype converts again.
Directories appear in the cache only complete (convert() renames a finished temporary
directory into place), so a crash or Ctrl-C never leaves an entry that looks valid.

`entries()` lists the converted copies (`mambart cache list`); `remove_entry()` deletes one
(`mambart cache rm`), only a direct child of the cache's `converted` directory and never one
that a running process has open or mapped.
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
    if progress is None:  # a terminal, or a notebook (tqdm.auto draws a widget there)
        progress = sys.stderr.isatty() or "ipykernel" in sys.modules
    # One line whether or not there is a terminal (a conversion takes a while and uses disk),
    # once the source has been checked.
    announce = f"mambart: converting {path} ({dtype or 'its own dtype'}) into the cache at {dst}"
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
                source_info=source_info, announce=announce)
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


# ---------------------------------------------------------------- listing and removal

def converted_root() -> Path:
    return cache_root() / "converted"


def _dir_bytes(d: Path) -> int:
    n = 0
    for p in d.rglob("*"):
        try:
            if p.is_file() and not p.is_symlink():
                n += p.stat().st_size
        except OSError:
            pass
    return n


def entries() -> list:
    """The cache's converted models: dicts with name, path, bytes, dtype, source (the hub
    repository or the checkpoint directory it was converted from), valid, in_use."""
    root = converted_root()
    if not root.is_dir():
        return []
    out = []
    for d in sorted(root.iterdir()):
        if d.name.startswith(".") or d.is_symlink() or not d.is_dir():
            continue  # a conversion under way, or not ours
        e = {"name": d.name, "path": str(d), "bytes": _dir_bytes(d), "dtype": None,
             "source": None, "valid": _valid(d)}
        if e["valid"]:
            try:
                cfg = json.loads(read_bounded_text(d / "config.json", MAX_JSON_BYTES, "config"))
                e["dtype"] = cfg.get("dtype")
                src = cfg.get("source") if isinstance(cfg.get("source"), dict) else {}
                e["source"] = src.get("repo") or src.get("path")
            except (OSError, ValueError):
                pass
        e["in_use"] = users(d)
        out.append(e)
    return out


def users(d: Path) -> list:
    """Process ids that have a file under `d` open or mapped (from Linux's /proc; elsewhere
    an empty list). Processes of other users are not visible and not counted."""
    proc = Path("/proc")
    if not (proc / "self" / "maps").exists():
        return []
    prefix = os.path.realpath(d) + os.sep
    pids = []
    for p in proc.iterdir():
        if not p.name.isdigit():
            continue
        try:
            with open(p / "maps", encoding="utf-8", errors="replace") as f:
                if any(prefix in line for line in f):
                    pids.append(int(p.name))
                    continue
            for fd in (p / "fd").iterdir():
                if os.readlink(fd).startswith(prefix):
                    pids.append(int(p.name))
                    break
        except OSError:  # gone, or another user's process
            continue
    return pids


def remove_entry(name: str) -> Path:
    """Deletes the converted copy `name` (an entry of `entries()`, by name or by its path).
    Refuses anything that is not a direct child directory of the cache's `converted`
    directory, and an entry that a process has open. Returns the removed path."""
    import shutil
    import tempfile

    root = converted_root()
    if "/" in name or os.sep in name:  # given as a path: it must be an entry's
        p = Path(name).expanduser()
        if os.path.realpath(p.parent) != os.path.realpath(root):
            raise ValueError(f"{name}: not an entry of the mambart cache ({root}); "
                             f"`mambart cache list` shows them")
        name = p.name
    d = root / name
    if name in ("", ".", "..") or name.startswith(".") or d.is_symlink() or not d.is_dir():
        raise ValueError(f"{name or repr(name)}: no such entry in the mambart cache ({root}); "
                         f"`mambart cache list` shows them")
    pids = users(d)
    if pids:
        raise ValueError(f"{name}: in use by process {', '.join(map(str, pids))}; not removed")
    # Renamed aside first, so a half-deleted entry never looks like a model.
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".removing", dir=root))
    os.rename(d, tmp / "entry")
    shutil.rmtree(tmp)
    return d

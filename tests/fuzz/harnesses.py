"""Fuzz targets for everything in mambart that reads untrusted bytes.

Each target takes the fuzzer's bytes and either returns (the input was handled: accepted, or
refused with the documented exception) or raises `Finding` / lets an unexpected exception out
(a bug: a crash of the process shows up as a crash of the fuzzer). The same functions run
under atheris (tests/fuzz/run_atheris.py, coverage-guided, in CI for a bounded time) and in
pytest over the committed seed corpus and every crash found (tests/test_fuzz_regressions.py).

Targets:
  safetensors_cpp  C++ safetensors reader (_C.inspect_safetensors)
  safetensors_py   the converter's Python safetensors header reader (_tensorio)
  config           config.json parsing + validation (C++), structure-aware mutations of a
                   valid config over valid weights; a config that loads must also generate
  model_dir        a whole model directory (C++ load + forward): fuzzed model.safetensors under
                   a valid config, or fuzzed config.json bytes over valid weights
  convert          mambart.convert on a tiny transformers checkpoint with a fuzzed config.json
                   or model.safetensors; what converts must load and run
  torchzip         the restricted unpickler / zip reader of pytorch_model.bin (_torchzip)
  tokenizer        tokenizer.json loading (text.load_tokenizer) + encode/decode/TextStream
  state_file       a state file (mambart.load_state, issue 23): refused with StateError naming
                   the file, or loaded; a loaded state is used with the base model it claims
                   (its seeds are states of the base models) and must generate or be refused
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/: model_dirs

import numpy as np  # noqa: E402

import mambart  # noqa: E402
from mambart import _C  # noqa: E402
from mambart.errors import ModelLoadError  # noqa: E402

import model_dirs  # noqa: E402


# The model directories the model-level targets start from: as small as the format allows
# while keeping every feature (groups, several heads, conv bias), so each run is fast.
BASE = {
    "mamba1": dict(d_model=8, n_layer=1, vocab_size=30, vocab_size_padded=32, d_inner=16,
                   d_state=4, dt_rank=2),
    "mamba2": dict(d_model=8, n_layer=1, vocab_size=30, vocab_size_padded=32, d_inner=16,
                   d_state=4, headdim=4, nheads=4, ngroups=2, chunk_size=4),
}


class Finding(AssertionError):
    """The target misbehaved without crashing the process (wrong exception type, bad output)."""


_WORK = None


def workdir() -> Path:
    """A per-process scratch directory holding the base model directories."""
    global _WORK
    if _WORK is None:
        _WORK = Path(tempfile.mkdtemp(prefix="mambart-fuzz-"))
        for arch in ("mamba1", "mamba2"):
            model_dirs.make_model_dir(_WORK / f"base-{arch}", arch, "float32", seed=1,
                                      **BASE[arch])
    return _WORK


def _write(name: str, data: bytes) -> Path:
    p = workdir() / name
    p.write_bytes(data)
    return p


def _check_runtime_error(e: RuntimeError) -> None:
    # The only RuntimeError a bad *model* may produce at run time: non-finite logits.
    if "non-finite" not in str(e):
        raise Finding(f"unexpected RuntimeError: {e}") from e


def _exercise(g) -> None:
    """Runs a loaded model briefly: logits and a few sampled tokens, all finite or refused."""
    V = g.config["vocab_size"]
    ids = [i % V for i in (1, 2, 3, 5, 8)]
    try:
        lg = g.logits(ids)
        if lg.shape != (len(ids), V):
            raise Finding(f"logits shape {lg.shape}")
        o = _C.GenerationOptions()
        o.max_new_tokens = 4
        o.temperature = 0.8
        o.top_p = 0.9
        o.ignore_eos = True
        r = g.generate([ids, ids[:2]], o)
        for row in r:
            if not all(0 <= t < V for t in row.token_ids):
                raise Finding(f"token outside the vocabulary: {row.token_ids}")
    except RuntimeError as e:
        _check_runtime_error(e)


# ---- safetensors ---------------------------------------------------------------------------------

def safetensors_cpp(data: bytes) -> None:
    p = _write("t.safetensors", data)
    try:
        info = _C.inspect_safetensors(str(p))
    except ModelLoadError as e:
        if str(p) not in str(e):
            raise Finding(f"message does not name the file: {e}") from e
        return
    # Accepted: the header must really describe the file.
    total = 0
    for name, (dt, shape) in info.items():
        total += int(np.prod(shape, dtype=object)) * {"float32": 4, "float16": 2, "bfloat16": 2}[dt]
    hlen = struct.unpack("<Q", data[:8])[0]
    if total != len(data) - 8 - hlen:
        raise Finding(f"accepted a file whose tensors cover {total} of {len(data) - 8 - hlen} bytes")


def safetensors_py(data: bytes) -> None:
    from mambart import _tensorio

    p = _write("p.safetensors", data)
    try:
        ts = _tensorio.read_safetensors_header(str(p))
    except ModelLoadError:
        return
    for t in ts.values():
        if t.nbytes <= 1 << 16:
            t.read()


# ---- config.json ---------------------------------------------------------------------------------

_KEYS = sorted(model_dirs.TINY_M1) + ["source", "extra_key", "d_mlp", "expand"]
_INTS = [0, 1, 2, 3, 4, 7, 8, 16, 32, 64, 100, 104, 2**24, 2**24 + 1, 2**31, 2**63 - 1, 2**63,
         2**64, -1, -(2**63), 10**12]
_FLOATS = [0.0, -0.0, 1e-5, 0.5, 1.0, 1e300, -1e300, 1e-320, 3.4e38, 3.5e38]
_STRINGS = ["mamba1", "mamba2", "rmsnorm", "layernorm", "float32", "float16", "bfloat16",
            "int8", "", "\u00e9", "\x00"]


def _value(fdp):
    kind = fdp.ConsumeIntInRange(0, 7)
    if kind == 0:
        return _INTS[fdp.ConsumeIntInRange(0, len(_INTS) - 1)]
    if kind == 1:
        return fdp.ConsumeInt(8)
    if kind == 2:
        return _FLOATS[fdp.ConsumeIntInRange(0, len(_FLOATS) - 1)]
    if kind == 3:
        return fdp.ConsumeBool()
    if kind == 4:
        return None
    if kind == 5:
        return _STRINGS[fdp.ConsumeIntInRange(0, len(_STRINGS) - 1)]
    if kind == 6:
        return [_value(fdp) for _ in range(fdp.ConsumeIntInRange(0, 3))]
    return {"k": _value(fdp)}


def config(data: bytes) -> None:
    """Structure-aware: a valid config with a few keys changed, removed or added."""
    from fuzz_data import FuzzedDataProvider

    fdp = FuzzedDataProvider(data)
    arch = "mamba2" if fdp.ConsumeBool() else "mamba1"
    cfg = model_dirs.config_dict(arch, **BASE[arch])
    for _ in range(fdp.ConsumeIntInRange(1, 4)):
        key = _KEYS[fdp.ConsumeIntInRange(0, len(_KEYS) - 1)]
        if fdp.ConsumeIntInRange(0, 4) == 0:
            cfg.pop(key, None)
        else:
            cfg[key] = _value(fdp)
    _load_dir(arch, json.dumps(cfg).encode(), None)


def _load_dir(arch: str, config_bytes, weight_bytes) -> None:
    base = workdir() / f"base-{arch}"
    d = workdir() / "m"
    if d.exists():
        shutil.rmtree(d)
    d.mkdir()
    (d / "config.json").write_bytes(config_bytes if config_bytes is not None
                                    else (base / "config.json").read_bytes())
    if weight_bytes is None:
        os.symlink(base / "model.safetensors", d / "model.safetensors")
    else:
        (d / "model.safetensors").write_bytes(weight_bytes)
    try:
        g = _C.Generator(str(d))
    except ModelLoadError as e:
        if str(d) not in str(e):
            raise Finding(f"message does not name the directory: {e}") from e
        return
    except NotImplementedError as e:
        if "norm_before_gate" not in str(e):
            raise
        return
    _exercise(g)


def model_dir(data: bytes) -> None:
    """First byte: bit 0 = arch, bit 1 = which file the rest of the bytes replace."""
    if not data:
        return
    arch = "mamba2" if data[0] & 1 else "mamba1"
    if data[0] & 2:
        _load_dir(arch, data[1:], None)
    else:
        _load_dir(arch, None, data[1:])


# ---- conversion of transformers checkpoints ------------------------------------------------------

def convert(data: bytes) -> None:
    """First byte: bit 0 = arch, bit 1 = which file of a tiny transformers checkpoint
    (tests/fuzz/data/hf-*) the rest replaces: config.json or model.safetensors. Converted
    directories must load and run."""
    if not data:
        return
    arch = "mamba2" if data[0] & 1 else "mamba1"
    base = HERE / "data" / f"hf-{arch}"
    src = workdir() / "hf"
    dst = workdir() / "converted"
    for d in (src, dst):
        if d.exists():
            shutil.rmtree(d)
    src.mkdir()
    replaced = "config.json" if data[0] & 2 else "model.safetensors"
    for name in ("config.json", "model.safetensors"):
        (src / name).write_bytes(data[1:] if name == replaced else (base / name).read_bytes())
    try:
        mambart.convert(src, dst)
    except ModelLoadError as e:  # ConversionError is a ModelLoadError
        if str(src) not in str(e):
            raise Finding(f"message does not name the checkpoint: {e}") from e
        return
    try:
        g = _C.Generator(str(dst))
    except ModelLoadError as e:
        # The converter copies values as they are; parameters that are (or, as -exp(A_log),
        # become) NaN/Inf are refused by the runtime at load, naming the tensor. Anything else
        # the converter wrote must load.
        if "NaN or Inf" in str(e):
            return
        raise Finding(f"convert() wrote a directory that does not load: {e}") from e
    _exercise(g)


# ---- pytorch_model.bin ---------------------------------------------------------------------------

def torchzip(data: bytes) -> None:
    from mambart import _torchzip

    p = _write("pytorch_model.bin", data)
    try:
        ts = _torchzip.load_torch_checkpoint(str(p))
    except ModelLoadError:
        return
    if not isinstance(ts, dict):
        raise Finding(f"returned {type(ts)}")
    for name, t in ts.items():
        if not isinstance(name, str):
            raise Finding(f"tensor name {name!r}")
        if t.nbytes <= 1 << 16:
            try:
                a = t.read()
            except ModelLoadError:
                continue
            if a.size != int(np.prod(t.shape, dtype=object)):
                raise Finding(f"{name}: read {a.size} elements for shape {t.shape}")


# ---- tokenizer.json ------------------------------------------------------------------------------

def tokenizer(data: bytes) -> None:
    from mambart import text

    p = _write("tokenizer.json", data)
    try:
        tok = text.load_tokenizer(str(p))
    except ModelLoadError:
        return
    # A tokenizer that loads can still refuse to encode or decode (e.g. a WordLevel model whose
    # unk_token is not in its vocabulary): the `tokenizers` library raises an Exception then,
    # which reaches the caller as is. A Rust panic (pyo3's PanicException is a BaseException,
    # not an Exception) is not caught here and is a finding.
    try:
        ids = tok.encode("Hello w\u00f6rld, 1 2 3 \u2603").ids
        n = tok.get_vocab_size()
        if n:
            ids = ids + [i % n for i in (0, 1, 7, 255)]
        tok.decode(ids)
    except Exception:  # noqa: BLE001
        return
    ts = text.TextStream(tok, ["ld,"])
    for i in ids:
        piece = ts.push(i)
        if not isinstance(piece, str):
            raise Finding(f"TextStream.push returned {piece!r}")
    if not isinstance(ts.finish(), str):
        raise Finding("TextStream.finish")


# ---- state files (issue 23) -----------------------------------------------------------------------

_GENS = {}


def _base_generator(arch: str):
    if arch not in _GENS:
        _GENS[arch] = mambart.Generator(str(workdir() / f"base-{arch}"))
    return _GENS[arch]


def state_file(data: bytes) -> None:
    p = _write("s.state", data)
    try:
        st = mambart.load_state(str(p))
    except mambart.StateError as e:
        if str(p) not in str(e):
            raise Finding(f"message does not name the file: {e}") from e
        return
    if st.architecture not in ("mamba1", "mamba2"):
        raise Finding(f"accepted architecture {st.architecture!r}")
    g = _base_generator(st.architecture)
    try:
        g.load_state(str(p))
        r = g.generate(None, state=st, max_new_tokens=2, temperature=0.7, ignore_eos=True)
    except mambart.StateError:
        return  # another model's, wrong shapes, ...
    except RuntimeError as e:
        _check_runtime_error(e)
        return
    if not all(0 <= t < g.vocab_size for t in r.token_ids):
        raise Finding(f"token outside the vocabulary: {r.token_ids}")


TARGETS = {
    "safetensors_cpp": safetensors_cpp,
    "safetensors_py": safetensors_py,
    "config": config,
    "model_dir": model_dir,
    "convert": convert,
    "torchzip": torchzip,
    "tokenizer": tokenizer,
    "state_file": state_file,
}

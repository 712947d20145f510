"""Sequence states as first-class objects (issue 7): snapshots, files, and the prompt cache.

A Mamba sequence's whole memory is a fixed-size recurrent state (per layer the state tensors its
layer type declares: for Mamba-1/2 a conv state and an SSM state, fp32). `SequenceState` wraps one such state plus what continuing it exactly needs:
the token history (for the prompt cache key and the repetition penalty), how many of those
tokens the state has already run ("fed"; the rest are pending, e.g. the last sampled token of a
generation), the next-token logits when nothing is pending, and the RNG position of the
generation that made it. States are immutable: a generation copies a state into its own rows.

State files are safetensors: the model's state tensors (for Mamba-1/2 `conv` and `ssm`, each
stacked over the layers that have it), `tokens`, optional `logits`; metadata with the format, the
model fingerprint and dtype, the layer types and the state spec (tensor names, shapes, the layers
each holds), so that a state is checked against a model tensor by tensor. `load_state(path)` reads one into host memory; the
model identity and dtype are checked when it is used with a Generator (`Generator.load_state`
checks at once).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ._args import decimal
from ._args import path as _path_arg
from ._files import MAX_JSON_BYTES, open_regular, read_bounded, read_header_first, write_atomic
from .errors import ModelLoadError

FORMAT = "mambart-state"
FORMAT_VERSION = "2"
# Version 1 files (before the state spec was recorded) hold exactly `conv` and `ssm`.
READ_VERSIONS = ("1", "2")
_V1_SPEC = ({"name": "conv"}, {"name": "ssm"})
# Names a state file uses for its own tensors: no layer state tensor may take them.
_RESERVED = ("tokens", "logits", "fed", "rng")


class StateError(ValueError):
    """A state file is malformed, or a state does not belong to this model / dtype."""


def model_fingerprint(model_dir) -> str:
    """The identity of a mambart model directory, computed at load: sha256 over config.json's
    bytes, model.safetensors' header (tensor names, dtypes, shapes, offsets), its size, and 64
    blocks of 4 KiB of weight bytes spread evenly over the data (the first and last included).
    Reading every weight byte would cost seconds for a multi-GB file; the sampled blocks tell
    apart checkpoints with the same config and layout but different weights (e.g. two
    fine-tunes) unless they differ only between the blocks. A guard against using a state with
    the wrong model, not a cryptographic checksum of the weights."""
    d = Path(model_dir)
    h = hashlib.sha256()
    h.update(b"mambart-fingerprint-v2\0")
    h.update(read_bounded(d / "config.json", MAX_JSON_BYTES, "config", ModelLoadError))
    wpath = d / "model.safetensors"
    size = wpath.stat().st_size
    h.update(str(size).encode())
    with open_regular(wpath, "weights file", ModelLoadError) as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        h.update(head)
        h.update(f.read(min(n, size)))
        start = 8 + n
        data = max(size - start, 0)
        block, count = 4096, 64
        for i in range(count):
            off = start + (data - block) * i // (count - 1) if data > block else start
            f.seek(off)
            h.update(f.read(block))
    return h.hexdigest()


class SequenceState:
    """One sequence's state. Made by `Generator.prefill`, `GenerationResult.state`
    (generate(..., return_state=True)) or `load_state`; used with `generate(..., state=s)`,
    `prefill(..., state=s)` and `score(..., state=s)`.

    tokens: every token of the sequence so far (tuple); num_tokens; pending: tokens given but
    not yet run through the model (the state continues with them); nbytes: memory held
    (device state + logits + tokens); fingerprint / dtype: the model it belongs to.
    """

    def __init__(self, native=None, *, fingerprint: str, dtype: str, architecture: str,
                 spec: Sequence[dict], layer_types: Optional[Sequence[str]] = None,
                 host: Optional[dict] = None, source: Optional[str] = None):
        self._native = native            # _C.SequenceState (device) or None for a loaded file
        self._host = host                # loaded file: one array per state tensor (by name),
                                         # tokens, fed, logits, rng
        self.fingerprint = fingerprint
        self.dtype = dtype
        self.architecture = architecture
        self.source = source             # the file it was loaded from, for error messages
        # The state tensors: [{name, shape (layers in it, per-layer shape...), layers}], in the
        # model's order (Generator._g.state_spec); for version-1 files only the names.
        self._spec = [dict(e) for e in spec]
        self.layer_types = tuple(layer_types) if layer_types is not None else None

    # ---- read-only views ----
    @property
    def tokens(self) -> Tuple[int, ...]:
        if self._native is not None:
            return tuple(self._native.tokens)
        return tuple(int(t) for t in self._host["tokens"])

    @property
    def num_tokens(self) -> int:
        return self._native.num_tokens if self._native is not None else len(self._host["tokens"])

    @property
    def pending(self) -> int:
        if self._native is not None:
            return self._native.pending
        return len(self._host["tokens"]) - self._host["fed"]

    @property
    def nbytes(self) -> int:
        if self._native is not None:
            return int(self._native.nbytes)
        h = self._host
        return int(sum(h[e["name"]].nbytes for e in self._spec) + h["tokens"].nbytes +
                   (h["logits"].nbytes if h["logits"] is not None else 0))

    @property
    def rng(self) -> Optional[Tuple[int, int, int]]:
        """(seed, stream, counter) of the generation that made it, or None (a plain prefill):
        continuing without a seed draws from here, exactly as the uninterrupted run would."""
        if self._native is not None:
            s = self._native
            return (s.seed, s.stream, s.counter) if s.has_rng else None
        return self._host["rng"]

    def __repr__(self) -> str:
        where = self._native.device if self._native is not None else f"host ({self.source})"
        return (f"SequenceState({self.num_tokens} tokens, {self.pending} pending, "
                f"{self.nbytes} bytes, {self.architecture}/{self.dtype}, {where})")

    # ---- use with a generator ----
    def _check_model(self, g) -> None:
        where = f" (loaded from {self.source})" if self.source else ""
        if self.fingerprint != g.fingerprint:
            raise StateError(f"state{where} belongs to another model (fingerprint "
                             f"{self.fingerprint[:12]}..., this model {g.fingerprint[:12]}... "
                             f"in {g.model_dir})")
        if self.dtype != g.dtype:
            raise StateError(f"state{where} was made with dtype {self.dtype}, this generator "
                             f"runs {g.dtype}")
        if self.architecture != g.config["architecture"]:
            raise StateError(f"state{where} names architecture {self.architecture!r}, this "
                             f"model is {g.config['architecture']!r}")

    def _native_for(self, g):
        """The device handle for generator `g` (identity and dtype checked)."""
        self._check_model(g)
        if self._native is not None:
            return self._native
        h = self._host
        where = self.source
        model_types = list(g._g.layer_type_list)
        if self.layer_types is not None and list(self.layer_types) != model_types:
            if len(self.layer_types) != len(model_types):
                raise StateError(f"{where}: the state has {len(self.layer_types)} layers, this "
                                 f"model {len(model_types)}: the state and the model do not fit")
            i = next(i for i, (a, b) in enumerate(zip(self.layer_types, model_types)) if a != b)
            raise StateError(f"{where}: layer {i} is {self.layer_types[i]} in the state but "
                             f"{model_types[i]} in this model: the state and the model do not fit")
        want = list(g._g.state_spec)
        names = [e["name"] for e in self._spec]
        for i, w in enumerate(want):
            name = names[i] if i < len(names) else None
            if name != w["name"]:
                raise StateError(f"{where}: state tensor {i} is {name!r}, this model's is "
                                 f"{w['name']!r}: the state and the model do not fit")
            got = tuple(h[name].shape)
            if got != tuple(w["shape"]):
                raise StateError(f"{where}: state tensor {name!r} has shape {got}, this model's "
                                 f"has shape {tuple(w['shape'])}: the state and the model do "
                                 f"not fit")
        if len(names) > len(want):
            raise StateError(f"{where}: unexpected state tensor {names[len(want)]!r}: the state "
                             f"and the model do not fit")
        try:
            rng = h["rng"] or (0, 0, 0)
            return g._g.state_from_host([h[n].reshape(-1) for n in names],
                                        [int(t) for t in h["tokens"]], int(h["fed"]),
                                        h["logits"], h["rng"] is not None, *rng)
        except ValueError as e:
            raise StateError(f"{self.source}: {e}") from None

    # ---- files ----
    def save(self, path) -> None:
        """Writes the state to `path` (safetensors; the parent directory must exist)."""
        _write_state_file(_path_arg("path", path), self._host_dict(), self.fingerprint,
                          self.dtype, self.architecture, self._spec, self.layer_types)

    def _host_dict(self) -> dict:
        if self._native is None:
            return self._host
        n = self._native
        arrays = n.to_host()  # Backend copy-out (device -> host), one per state tensor
        h = {e["name"]: a.reshape(e["shape"]) for e, a in zip(self._spec, arrays)}
        h.update(tokens=np.asarray(n.tokens, dtype=np.int32), fed=int(n.fed), logits=n.logits,
                 rng=(n.seed, n.stream, n.counter) if n.has_rng else None)
        return h

    def __getstate__(self):
        raise TypeError("SequenceState is not picklable; use state.save(path) / load_state")


def _write_state_file(path, h: dict, fingerprint: str, dtype: str, arch: str,
                      spec: Sequence[dict], layer_types: Optional[Sequence[str]]) -> None:
    tensors = [(e["name"], "F32", np.ascontiguousarray(h[e["name"]], dtype="<f4")) for e in spec]
    tensors.append(("tokens", "I32", np.ascontiguousarray(h["tokens"], dtype="<i4")))
    if h["logits"] is not None:
        tensors.append(("logits", "F32", np.ascontiguousarray(h["logits"], dtype="<f4")))
    rng = h["rng"]
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "model_fingerprint": fingerprint,
            "dtype": dtype, "architecture": arch, "fed": str(int(h["fed"])),
            "has_rng": "1" if rng is not None else "0",
            "state_spec": json.dumps([{"name": e["name"], "shape": list(h[e["name"]].shape),
                                       "layers": list(e.get("layers", []))} for e in spec])}
    if layer_types is not None:
        meta["layer_types"] = json.dumps(list(layer_types))
    if rng is not None:
        meta.update(seed=str(int(rng[0])), stream=str(int(rng[1])), counter=str(int(rng[2])))
    header: Dict[str, object] = {"__metadata__": meta}
    off = 0
    for name, st_dtype, a in tensors:
        header[name] = {"dtype": st_dtype, "shape": list(a.shape),
                        "data_offsets": [off, off + a.nbytes]}
        off += a.nbytes
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)

    def write(f):
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for _, _, a in tensors:
            f.write(a.tobytes())

    # A unique temporary file next to path, fsynced, renamed: never a half-written or
    # interleaved state file under the final name, whatever other writers do (issue 23).
    write_atomic(path, write, "state file", StateError)


def _no_duplicates(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise ValueError(f"duplicate key {k!r}")
        d[k] = v
    return d


def load_state(path) -> SequenceState:
    """Reads a state file written by `SequenceState.save` into host memory. The model identity
    and dtype are checked when the state is used (generate/prefill/score with state=...), or at
    once with `Generator.load_state`. Raises StateError naming the file when it is malformed."""
    path = _path_arg("path", path)

    def bad(msg):
        return StateError(f"{path}: not a valid mambart state file: {msg}")

    # Regular files only, header first, then at most the bytes the header accounts for.
    data, size = read_header_first(path, "state file", StateError)
    if size < 8:
        raise bad("shorter than the 8-byte header length")
    n = struct.unpack("<Q", data[:8])[0]
    if n > size - 8 or n > 1 << 24:
        raise bad(f"header length {n} exceeds the file ({size} bytes)")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as e:
        raise bad(f"header is not valid JSON ({e})") from None
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__"), dict):
        raise bad("no __metadata__")
    meta = header.pop("__metadata__")
    if meta.get("format") != FORMAT:
        raise bad(f"format is {meta.get('format')!r}, expected {FORMAT!r}")
    version = meta.get("format_version")
    if version not in READ_VERSIONS:
        raise bad(f"format_version {version!r} is not supported "
                  f"(this mambart reads {', '.join(READ_VERSIONS)})")
    for k in ("model_fingerprint", "dtype", "architecture", "fed", "has_rng"):
        if not isinstance(meta.get(k), str):
            raise bad(f"metadata {k!r} missing")
    spec, layer_types = _read_spec(meta, version, bad)
    want = {e["name"]: "F32" for e in spec}
    want.update(tokens="I32", logits="F32")
    np_dtype = {"F32": "<f4", "I32": "<i4"}
    arrays = {}
    body = 8 + n
    expect_off = 0
    def first_offset(kv):
        offs = kv[1].get("data_offsets") if isinstance(kv[1], dict) else None
        ok = isinstance(offs, list) and offs and isinstance(offs[0], int)
        return offs[0] if ok else -1  # malformed entries first: refused below

    for name, info in sorted(header.items(), key=first_offset):
        if name not in want:
            raise bad(f"unexpected tensor {name!r}")
        if not isinstance(info, dict) or info.get("dtype") != want[name]:
            raise bad(f"tensor {name!r} must be {want[name]}")
        shape, offs = info.get("shape"), info.get("data_offsets")
        if (not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape)
                or not isinstance(offs, list) or len(offs) != 2
                or not all(isinstance(o, int) for o in offs)):
            raise bad(f"tensor {name!r} has a malformed shape or data_offsets")
        nbytes = int(np.prod(shape, dtype=np.int64)) * 4
        if offs[0] != expect_off or offs[1] - offs[0] != nbytes or body + offs[1] > size:
            raise bad(f"tensor {name!r} offsets {offs} do not match its shape {shape} and the "
                      f"file size")
        expect_off = offs[1]
        arrays[name] = np.frombuffer(data, dtype=np_dtype[want[name]], count=nbytes // 4,
                                     offset=body + offs[0]).reshape(shape).copy()
    if body + expect_off != size:
        raise bad(f"{size - body - expect_off} trailing bytes after the tensors")
    for name in [e["name"] for e in spec] + ["tokens"]:
        if name not in arrays:
            raise bad(f"tensor {name!r} missing")
    for name in [e["name"] for e in spec] + ["logits"]:
        if name in arrays and not np.isfinite(arrays[name]).all():
            raise bad(f"tensor {name!r} holds NaN or infinite values")
    try:  # strict decimals in the runtime's ranges (int() took "0_6" and any size; issue 23)
        fed = decimal(meta["fed"], 0, 2**63 - 1)
        rng = None
        if meta["has_rng"] not in ("0", "1"):
            raise ValueError(f"has_rng is {meta['has_rng']!r}, not '0' or '1'")
        if meta["has_rng"] == "1":
            rng = (decimal(meta["seed"], 0, 2**64 - 1), decimal(meta["stream"], 0, 2**64 - 1),
                   decimal(meta["counter"], 0, 2**64 - 1))
    except (KeyError, ValueError) as e:
        raise bad(f"metadata fed/seed/stream/counter/has_rng must be decimal integers in range "
                  f"({e})") from None
    arch = meta["architecture"]
    if version == "1" and arch not in ("mamba1", "mamba2"):  # version 1 knew only these
        raise bad(f"architecture {arch!r} is not mamba1 or mamba2")
    if not (0 < len(arch) <= 64 and arch.isprintable()):
        raise bad(f"architecture {arch[:80]!r} is not a model family name")
    if layer_types is not None:
        from . import _C

        known = _C.layer_types().split(", ")
        unknown = sorted(set(layer_types) - set(known))
        if unknown:
            raise bad(f"layer type(s) {unknown} are not known to this mambart "
                      f"({', '.join(known)})")
    tokens = arrays["tokens"]
    if tokens.ndim != 1 or not 0 <= fed <= len(tokens):
        raise bad(f"fed = {fed} does not fit {len(tokens)} tokens")
    logits = arrays.get("logits")
    if fed == len(tokens) and (logits is None or logits.ndim != 1):
        raise bad("a state with no pending tokens needs its next-token logits")
    host = {e["name"]: arrays[e["name"]] for e in spec}
    host.update(tokens=tokens, fed=fed, logits=logits if fed == len(tokens) else None, rng=rng)
    return SequenceState(None, fingerprint=meta["model_fingerprint"], dtype=meta["dtype"],
                         architecture=meta["architecture"], spec=spec, layer_types=layer_types,
                         host=host, source=path)


def _read_spec(meta: dict, version: str, bad):
    """The state tensors a file declares (metadata `state_spec`, version 2) and its layer types;
    version 1 files hold `conv` and `ssm` and name no layer types."""
    if version == "1":
        return [dict(e) for e in _V1_SPEC], None
    try:
        spec = json.loads(meta.get("state_spec", ""))
        types = json.loads(meta.get("layer_types", ""))
    except (TypeError, ValueError):
        raise bad("metadata state_spec / layer_types are not valid JSON") from None
    if not isinstance(types, list) or not all(isinstance(t, str) and t for t in types):
        raise bad("metadata layer_types must be a list of layer type names")
    if not isinstance(spec, list) or not spec:
        raise bad("metadata state_spec must be a non-empty list")
    out, seen = [], set()
    for e in spec:
        ok = (isinstance(e, dict) and set(e) == {"name", "shape", "layers"}
              and isinstance(e["name"], str) and e["name"] and e["name"] not in _RESERVED
              and e["name"] not in seen and isinstance(e["shape"], list)
              and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                      for v in e["shape"])
              and isinstance(e["layers"], list)
              and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < len(types)
                      for v in e["layers"]))
        if not ok:
            raise bad(f"metadata state_spec has a malformed entry {str(e)[:80]}")
        seen.add(e["name"])
        out.append(dict(e))
    return out, types


# ---- prompt cache -----------------------------------------------------------------------------


class PromptCache:
    """An exact prefix cache of sequence states, bounded by a byte budget with LRU eviction.

    Keyed by the whole token prefix (any length, no block alignment) and by the model identity
    (fingerprint, dtype, device), so one cache may be shared by several generators. A lookup
    returns the longest cached prefix of the prompt; candidates are found by a hash of the
    prefix and then compared token by token, so a hash collision can cost time but never serve
    another sequence. Entries are immutable states: generation copies them into its own rows.
    """

    def __init__(self, max_bytes: int):
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, (int, np.integer)) \
                or max_bytes < 0:
            raise ValueError(f"prompt cache max_bytes must be a non-negative integer, got "
                             f"{max_bytes!r}")
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        # (model key, length, hash) -> list of (tokens array, SequenceState); LRU order
        self._entries: "OrderedDict[tuple, List[Tuple[np.ndarray, SequenceState]]]" = OrderedDict()
        self._lengths: Dict[tuple, Dict[int, int]] = {}  # model key -> {length: entry count}
        self._lock = threading.Lock()  # generators may be used from several threads

    @staticmethod
    def _hash(tokens: np.ndarray) -> bytes:
        """The bucket hash of a prefix (tests replace it to force collisions)."""
        return hashlib.blake2b(tokens.tobytes(), digest_size=16).digest()

    def __len__(self) -> int:
        with self._lock:  # generation in other threads inserts and evicts meanwhile
            return sum(len(v) for v in self._entries.values())

    def clear(self) -> None:
        with self._lock:
            self._clear()

    def _clear(self) -> None:
        self._entries.clear()
        self._lengths.clear()
        self.nbytes = 0

    def lookup(self, model_key: tuple, tokens: Sequence[int]) -> Optional[SequenceState]:
        """The state of the longest cached prefix of `tokens` for this model, or None."""
        with self._lock:
            return self._lookup(model_key, tokens)

    def _lookup(self, model_key: tuple, tokens: Sequence[int]) -> Optional[SequenceState]:
        arr = np.asarray(tokens, dtype=np.int32)
        lengths = self._lengths.get(model_key, {})
        for n in sorted(lengths, reverse=True):
            if n > len(arr):
                continue
            prefix = arr[:n]
            k = (model_key, n, self._hash(prefix))
            bucket = self._entries.get(k)
            if not bucket:
                continue
            for toks, st in bucket:
                if np.array_equal(toks, prefix):  # exact: a hash match alone never serves
                    self._entries.move_to_end(k)
                    self.hits += 1
                    return st
        self.misses += 1
        return None

    def insert(self, model_key: tuple, state: SequenceState) -> None:
        """Adds `state` under its tokens (kept as is: states are immutable), evicting the least
        recently used entries beyond the byte budget; a state larger than the budget is not
        kept."""
        with self._lock:
            self._insert(model_key, state)

    def _insert(self, model_key: tuple, state: SequenceState) -> None:
        toks = np.asarray(state.tokens, dtype=np.int32)
        size = state.nbytes
        if size > self.max_bytes or len(toks) == 0:
            return
        k = (model_key, len(toks), self._hash(toks))
        bucket = self._entries.setdefault(k, [])
        for t, _ in bucket:
            if np.array_equal(t, toks):
                self._entries.move_to_end(k)
                return
        bucket.append((toks, state))
        self._entries.move_to_end(k)
        self.nbytes += size
        lens = self._lengths.setdefault(model_key, {})
        lens[len(toks)] = lens.get(len(toks), 0) + 1
        while self.nbytes > self.max_bytes:
            self._evict_oldest()

    def _evict_oldest(self) -> None:
        k, bucket = next(iter(self._entries.items()))
        toks, st = bucket.pop(0)
        self.nbytes -= st.nbytes
        if not bucket:
            del self._entries[k]
        lens = self._lengths[k[0]]
        lens[k[1]] -= 1
        if lens[k[1]] == 0:
            del lens[k[1]]

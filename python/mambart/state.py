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
each holds), so that a state is checked against a model tensor by tensor. The format is
implemented once, in C++ (cpp/state_file.h), for this module and the C API alike.
`load_state(path)` reads one into host memory; the model identity and dtype are checked when it
is used with a Generator (`Generator.load_state` checks at once).

The prompt cache (`PromptCache`) is the engine's (cpp/prefix_cache.h): the engine looks every
request up in it and fills it; this class is a view on it for Python.
"""

from __future__ import annotations

import os
import weakref
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from ._args import path as _path_arg


class StateError(ValueError):
    """A state file is malformed, or a state does not belong to this model / dtype."""


def model_fingerprint(model_dir) -> str:
    """The identity of a mambart model directory: sha256 over config.json's bytes,
    model.safetensors' header (tensor names, dtypes, shapes, offsets), its size, and 64 blocks of
    4 KiB of weight bytes spread evenly over the data (the first and last included). Reading
    every weight byte would cost seconds for a multi-GB file; the sampled blocks tell apart
    checkpoints with the same config and layout but different weights (e.g. two fine-tunes)
    unless they differ only between the blocks. A guard against using a state with the wrong
    model, not a cryptographic checksum of the weights. Computed in C++ (cpp/state_file.h), as
    the C API computes it."""
    from . import _C

    return _C.model_fingerprint(os.fsencode(model_dir))


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
                 host: Optional[dict] = None, source: Optional[str] = None, file=None):
        self._native = native            # _C.SequenceState (device) or None for a loaded file
        self._file = file                # loaded file: the _C.StateFile read
        self._host = host                # loaded file: one array per state tensor (by name),
                                         # tokens, fed, logits, rng (views on _file)
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
        # A loaded file: checked against the model's layers and state tensors (StateError
        # naming the file) and placed on its device, in C++ (as the C API loads one).
        return g._g.state_from_file(self._file, os.fsencode(self.source or ""),
                                    check_identity=False)

    # ---- files ----
    def save(self, path) -> None:
        """Writes the state to `path` (safetensors; the parent directory must exist), through a
        unique temporary file renamed into place. StateError naming `path` on failure."""
        from . import _C

        p = os.fsencode(_path_arg("path", path))
        if self._native is None:
            _C.write_state_file(p, self._file)
        else:
            _C.save_state(p, self._native, self.fingerprint, self.dtype, self.architecture,
                          list(self.layer_types or ()))

    def _host_dict(self) -> dict:
        """Host arrays: one per state tensor (by name, in its stored shape), tokens, fed,
        logits, rng (a device state is copied out)."""
        if self._native is None:
            return self._host
        n = self._native
        arrays = n.to_host()  # Backend copy-out (device -> host), one per state tensor
        h = {e["name"]: a.reshape(e["shape"]) for e, a in zip(self._spec, arrays)}
        h.update(tokens=np.asarray(n.tokens, dtype=np.int32), fed=int(n.fed), logits=n.logits,
                 rng=(n.seed, n.stream, n.counter) if n.has_rng else None)
        return h

    def _meta(self) -> dict:
        return dict(fingerprint=self.fingerprint, dtype=self.dtype,
                    architecture=self.architecture, spec=self._spec,
                    layer_types=self.layer_types)

    def __getstate__(self):
        raise TypeError("SequenceState is not picklable; use state.save(path) / load_state")


def load_state(path) -> SequenceState:
    """Reads a state file written by `SequenceState.save` (or the C API's mambart_state_save)
    into host memory. The model identity and dtype are checked when the state is used
    (generate/prefill/score with state=...), or at once with `Generator.load_state`. Raises
    StateError naming the file when it is missing, not a regular file or malformed."""
    from . import _C

    path = _path_arg("path", path)
    f = _C.read_state_file(os.fsencode(path))
    host = dict(f.tensors)
    host.update(tokens=f.tokens, fed=f.fed, logits=f.logits, rng=f.rng)
    return SequenceState(None, fingerprint=f.fingerprint, dtype=f.dtype,
                         architecture=f.architecture, spec=f.spec, layer_types=f.layer_types,
                         host=host, source=path, file=f)


def wrap_native(native, **meta) -> SequenceState:
    """The SequenceState of a native state: the same object each time while one is alive (a
    weak reference on the native object), so that a prompt-cache entry comes back as itself.
    `meta`: fingerprint, dtype, architecture, spec, layer_types of the model that made it."""
    ref = getattr(native, "_py", None)
    st = ref() if ref is not None else None
    if st is None:
        st = SequenceState(native, **meta)
        native._py = weakref.ref(st)
    return st


# ---- prompt cache -----------------------------------------------------------------------------


class PromptCache:
    """An exact prefix cache of sequence states, bounded by a byte budget with LRU eviction.

    A view on the C++ cache the generator's engine uses (cpp/prefix_cache.h): at admission the
    engine starts each request without a state from the longest cached prefix of its prompt and
    prefills only the rest; when a prompt completes it keeps the prompt's state (with its
    logits) and when a request ends its final state. Keyed by the whole token prefix (any
    length, no block alignment) and by the model (fingerprint, dtype, device), so one cache may
    be shared by several generators (`g2.prompt_cache = g1.prompt_cache`). A lookup compares
    tokens exactly (a hash only finds candidates). Entries are immutable: generations copy them
    into their own rows, and evicting one never frees a state a request still uses.
    """

    def __init__(self, max_bytes: int):
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, (int, np.integer)) \
                or max_bytes < 0 or max_bytes >= 2**64:
            raise ValueError(f"prompt cache max_bytes must be a non-negative integer, got "
                             f"{max_bytes!r}")
        from . import _C

        self._c = _C.PrefixCache(int(max_bytes))
        self._meta: Dict[str, dict] = {}  # model key -> what wrapping its states needs

    @property
    def max_bytes(self) -> int:
        return self._c.max_bytes

    @property
    def nbytes(self) -> int:
        return self._c.stats()["bytes"]

    @property
    def hits(self) -> int:
        return self._c.stats()["hits"]

    @property
    def misses(self) -> int:
        return self._c.stats()["misses"]

    def __len__(self) -> int:
        return self._c.stats()["entries"]

    def clear(self) -> None:
        self._c.clear()

    def _attach(self, model_key: str, meta: dict) -> None:
        """A generator of this model uses the cache (its engine inserts states of `model_key`)."""
        self._meta[model_key] = meta

    def _force_hash_collisions(self) -> None:
        """Tests: every prefix hashes alike, to show that lookups compare tokens."""
        self._c._collide_hashes_for_testing()

    def lookup(self, model_key: str, tokens: Sequence[int]) -> Optional[SequenceState]:
        """The state of the longest cached prefix of `tokens` for this model, or None."""
        native = self._c.lookup(model_key, [int(t) for t in tokens])
        if native is None:
            return None
        return wrap_native(native, **self._meta[model_key])

    def insert(self, model_key: str, state: SequenceState) -> None:
        """Adds `state` under its tokens (kept as is: states are immutable), evicting the least
        recently used entries beyond the byte budget; a state larger than the budget is not
        kept. Only device states are kept (`Generator.load_state` places a loaded file)."""
        if not isinstance(state, SequenceState):
            raise TypeError(f"state must be a SequenceState, got {type(state).__name__}")
        if state._native is None:
            raise ValueError("the prompt cache keeps device states: place a loaded state with "
                             "Generator.load_state first")
        self._meta.setdefault(model_key, state._meta())
        self._c.insert(model_key, state._native)

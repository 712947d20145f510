"""State files and the model fingerprint are implemented once, in C++ (cpp/state_file.h), for
Python and the C API (issue 14, item 6). The files are byte for byte what the Python writer
wrote before the move (a reference copy of it is kept here), files in that format load and
continue exactly, version-1 files still load (and save as version 1), and the fingerprint is
the sha256 Python computed. The C side of the round trip is in tests/test_c_api.py."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest

import mambart
from mambart import StateError, _C
from state_models import PROMPT, make


@pytest.fixture(scope="module", params=["mamba1", "mamba2"])
def g(request, tmp_path_factory):
    return mambart.Generator(make(tmp_path_factory.mktemp("sf"), request.param))


# ---- the format as python/mambart/state.py wrote and hashed it before the move ---------------

def reference_bytes(h: dict, fingerprint, dtype, arch, spec, layer_types, version="2") -> bytes:
    tensors = [(e["name"], "F32", np.ascontiguousarray(h[e["name"]], dtype="<f4")) for e in spec]
    tensors.append(("tokens", "I32", np.ascontiguousarray(h["tokens"], dtype="<i4")))
    if h["logits"] is not None:
        tensors.append(("logits", "F32", np.ascontiguousarray(h["logits"], dtype="<f4")))
    rng = h["rng"]
    meta = {"format": "mambart-state", "format_version": version,
            "model_fingerprint": fingerprint, "dtype": dtype, "architecture": arch,
            "fed": str(int(h["fed"])), "has_rng": "1" if rng is not None else "0"}
    if version == "2":
        meta["state_spec"] = json.dumps([{"name": e["name"], "shape": list(h[e["name"]].shape),
                                          "layers": list(e.get("layers", []))} for e in spec])
        meta["layer_types"] = json.dumps(list(layer_types))
    if rng is not None:
        meta.update(seed=str(int(rng[0])), stream=str(int(rng[1])), counter=str(int(rng[2])))
    header = {"__metadata__": meta}
    off = 0
    for name, st_dtype, a in tensors:
        header[name] = {"dtype": st_dtype, "shape": list(a.shape),
                        "data_offsets": [off, off + a.nbytes]}
        off += a.nbytes
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    return struct.pack("<Q", len(hb)) + hb + b"".join(a.tobytes() for _, _, a in tensors)


def reference_fingerprint(model_dir) -> str:
    d = Path(model_dir)
    h = hashlib.sha256()
    h.update(b"mambart-fingerprint-v2\0")
    h.update((d / "config.json").read_bytes())
    w = d / "model.safetensors"
    size = w.stat().st_size
    h.update(str(size).encode())
    with open(w, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        h.update(head)
        h.update(f.read(min(n, size)))
        start = 8 + n
        data = max(size - start, 0)
        for i in range(64):
            f.seek(start + (data - 4096) * i // 63 if data > 4096 else start)
            h.update(f.read(4096))
    return h.hexdigest()


def reference_of(st, version="2") -> bytes:
    spec = [dict(e) for e in st._spec]
    return reference_bytes(st._host_dict(), st.fingerprint, st.dtype, st.architecture, spec,
                           st.layer_types, version)


# ---- tests ----------------------------------------------------------------------------------

def test_saved_files_are_the_python_format_byte_for_byte(g, tmp_path):
    states = {
        "prefill": g.prefill(PROMPT),  # nothing pending: logits, no RNG
        "greedy": g.generate(PROMPT, max_new_tokens=4, ignore_eos=True, seed=3,
                             return_state=True).state,  # one pending token, RNG position
        "sampled": g.generate(PROMPT, max_new_tokens=5, ignore_eos=True, temperature=0.9,
                              seed=2**64 - 1, return_state=True).state,
    }
    for name, st in states.items():
        p = tmp_path / f"{name}.state"
        st.save(p)
        assert p.read_bytes() == reference_of(st), name
        loaded = mambart.load_state(p)
        p2 = tmp_path / f"{name}.again.state"
        loaded.save(p2)  # a loaded state saves the same bytes
        assert p2.read_bytes() == p.read_bytes(), name
        assert _C.state_file_bytes(loaded._file) == p.read_bytes()


def test_reference_files_load_and_continue_exactly(g, tmp_path):
    a = g.generate(PROMPT, max_new_tokens=4, ignore_eos=True, temperature=0.8, seed=9,
                   return_state=True)
    full = g.generate(PROMPT, max_new_tokens=9, ignore_eos=True, temperature=0.8, seed=9)
    p = tmp_path / "ref.state"
    p.write_bytes(reference_of(a.state))
    for st in (mambart.load_state(p), g.load_state(p)):
        assert st.tokens == a.state.tokens and st.rng == a.state.rng
        b = g.generate(None, state=st, max_new_tokens=5, ignore_eos=True, temperature=0.8)
        assert a.token_ids + b.token_ids == full.token_ids


def test_version_1_files_load_and_save_as_version_1(tmp_path):
    g = mambart.Generator(make(tmp_path, "mamba1"))  # version 1 knew conv and ssm only
    a = g.generate(PROMPT, max_new_tokens=3, ignore_eos=True, return_state=True)
    v1 = tmp_path / "v1.state"
    v1.write_bytes(reference_of(a.state, version="1"))
    st = mambart.load_state(v1)
    assert st.layer_types is None
    want = g.generate(None, state=a.state, max_new_tokens=4, ignore_eos=True).token_ids
    assert g.generate(None, state=st, max_new_tokens=4, ignore_eos=True).token_ids == want
    again = tmp_path / "again.state"
    st.save(again)  # no layer types to record: written as version 1, and readable
    assert again.read_bytes() == v1.read_bytes()
    assert g.generate(None, state=g.load_state(again), max_new_tokens=4,
                      ignore_eos=True).token_ids == want


def test_fingerprint_is_the_sha256_python_computed(g, tmp_path):
    assert g.fingerprint == reference_fingerprint(g.model_dir)
    assert mambart.state.model_fingerprint(g.model_dir) == g.fingerprint
    # Odd weight files (the fingerprint is taken of what is there, before any validation):
    # less data than one block, no data, a header length beyond the file, a 3-byte file.
    cases = {"small": struct.pack("<Q", 2) + b"{}" + b"\x01" * 100,
             "empty_data": struct.pack("<Q", 2) + b"{}",
             "long_header": struct.pack("<Q", 1 << 40) + b"{}" * 3000,
             "short": b"abc"}
    for name, data in cases.items():
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text('{"x": 1}')
        (d / "model.safetensors").write_bytes(data)
        assert _C.model_fingerprint(str(d)) == reference_fingerprint(d), name
    with pytest.raises(mambart.ModelLoadError, match="config"):
        _C.model_fingerprint(str(tmp_path / "nowhere"))


def test_file_names_in_errors_come_back_as_given(g, tmp_path):
    # A name that is not UTF-8 (surrogate-escaped in Python) is named exactly in the message.
    missing = os.fsdecode(os.fsencode(str(tmp_path)) + b"/\xff-missing.state")
    with pytest.raises(StateError) as ei:
        mambart.load_state(missing)
    assert missing in str(ei.value)
    p = os.fsdecode(os.fsencode(str(tmp_path)) + b"/\xfe.state")
    g.prefill(PROMPT).save(p)
    assert mambart.load_state(p).tokens == tuple(PROMPT)
    bad = tmp_path / "bad.state"
    bad.write_bytes(b"\x08" + b"\0" * 7 + b"not json")
    with pytest.raises(StateError, match="bad.state: not a valid mambart state file: header"):
        mambart.load_state(bad)

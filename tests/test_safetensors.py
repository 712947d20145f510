"""The C++ safetensors reader (cpp/safetensors.cpp) on valid and lying files.

Every malformed file must raise mambart.ModelLoadError whose message names the file (and the
tensor, where one is at fault) - never crash, never load silently.
"""

import json
import os
import struct

import numpy as np
import pytest

import mambart
from mambart import _C

from model_dirs import encode, write_safetensors

F32 = lambda *shape: encode(np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape),  # noqa: E731
                            "float32")


def _entries():
    return {"a": F32(2, 3), "b": F32(4), "c": encode(np.ones((3, 2), np.float32), "float16")}


def _load(path):
    return _C.inspect_safetensors(str(path))


def _header(path):
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _rewrite(path, header, data, pad=True):
    hb = json.dumps(header).encode()
    if pad:
        hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)) + hb + data)


def _expect(path, *fragments):
    with pytest.raises(mambart.ModelLoadError) as ei:
        _load(path)
    msg = str(ei.value)
    assert str(path) in msg, msg
    rest = msg.replace(str(path), "")  # the fragments must be in the text, not the path
    for frag in fragments:
        assert frag in rest, msg
    return msg


# ---- valid files ---------------------------------------------------------------------------------

def test_valid_file_roundtrip(tmp_path):
    p = tmp_path / "ok.safetensors"
    write_safetensors(p, _entries(), metadata={"format": "pt"})
    info = _load(p)
    assert info == {"a": ("float32", (2, 3)), "b": ("float32", (4,)), "c": ("float16", (3, 2))}


def test_valid_file_from_safetensors_package(tmp_path):
    from safetensors.numpy import save_file

    p = tmp_path / "pkg.safetensors"
    save_file({"x": np.zeros((5, 7), np.float16), "y": np.zeros((0,), np.float32),
               "s": np.zeros((), np.float32)}, str(p))
    assert _load(p) == {"x": ("float16", (5, 7)), "y": ("float32", (0,)), "s": ("float32", ())}


def test_bf16_and_empty_file_of_tensors(tmp_path):
    p = tmp_path / "bf.safetensors"
    write_safetensors(p, {"w": encode(np.ones((2, 2), np.float32), "bfloat16")})
    assert _load(p) == {"w": ("bfloat16", (2, 2))}
    p2 = tmp_path / "none.safetensors"
    write_safetensors(p2, {})
    assert _load(p2) == {}


# ---- missing / short / not a file ----------------------------------------------------------------

def test_missing_file(tmp_path):
    _expect(tmp_path / "nope.safetensors", "cannot open")


def test_directory_instead_of_file(tmp_path):
    d = tmp_path / "dir.safetensors"
    d.mkdir()
    _expect(d, "not a regular file")


@pytest.mark.parametrize("n", [0, 1, 7])
def test_shorter_than_length_field(tmp_path, n):
    p = tmp_path / "short.safetensors"
    p.write_bytes(b"\x10" * n)
    _expect(p, "shorter than the 8-byte header length")


# ---- the header length -----------------------------------------------------------------------

def test_header_length_past_eof(tmp_path):
    p = tmp_path / "f.safetensors"
    write_safetensors(p, _entries())
    raw = p.read_bytes()
    p.write_bytes(struct.pack("<Q", len(raw)) + raw[8:])
    _expect(p, "runs past the end of the file")


@pytest.mark.parametrize("n", [100_000_001, 2**32, 2**63, 2**64 - 1])
def test_huge_header_length(tmp_path, n):
    p = tmp_path / "f.safetensors"
    write_safetensors(p, _entries(), header_len_override=n)
    _expect(p, "exceeds the limit")


def test_truncated_inside_header(tmp_path):
    p = tmp_path / "f.safetensors"
    write_safetensors(p, _entries())
    raw = p.read_bytes()
    p.write_bytes(raw[:20])
    _expect(p, "runs past the end of the file")


def test_header_length_too_short_cuts_json(tmp_path):
    p = tmp_path / "f.safetensors"
    write_safetensors(p, _entries(), header_len_override=10)
    _expect(p, "not valid JSON")


# ---- the header JSON -------------------------------------------------------------------------

@pytest.mark.parametrize("text", [b"not json", b"\xff\xfe\x00\x01", b"{\"a\": }", b"{" * 5000,
                                  b"[" * 100000, b"\x00" * 16])
def test_header_not_json(tmp_path, text):
    p = tmp_path / "f.safetensors"
    p.write_bytes(struct.pack("<Q", len(text)) + text)
    _expect(p, "not valid JSON")


@pytest.mark.parametrize("header", [[], [1, 2], "str", 3, None, True])
def test_header_not_object(tmp_path, header):
    p = tmp_path / "f.safetensors"
    _rewrite(p, header, b"")
    _expect(p, "not a JSON object")


def test_deeply_nested_valid_json(tmp_path):
    # Valid JSON nested 100k deep inside __metadata__: refused, without exhausting the stack.
    p = tmp_path / "f.safetensors"
    text = b'{"__metadata__":' + b"[" * 100000 + b"]" * 100000 + b"}"
    p.write_bytes(struct.pack("<Q", len(text)) + text)
    _expect(p, "__metadata__")


@pytest.mark.parametrize("meta,frag", [([1], "__metadata__ is not an object"),
                                       ({"k": 1}, "__metadata__ values must be strings")])
def test_bad_metadata(tmp_path, meta, frag):
    p = tmp_path / "f.safetensors"
    write_safetensors(p, _entries(), metadata=meta)
    _expect(p, frag)


def test_duplicate_tensor_names(tmp_path):
    # Two entries with one name: JSON parsers disagree on which wins, so the file is ambiguous.
    p = tmp_path / "f.safetensors"
    hb = (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
          b'"a":{"dtype":"F16","shape":[4],"data_offsets":[0,8]}}')
    p.write_bytes(struct.pack("<Q", len(hb)) + hb + b"\x00" * 8)
    _expect(p, "duplicate", "'a'")


def test_duplicate_field_inside_entry(tmp_path):
    p = tmp_path / "f.safetensors"
    hb = b'{"a":{"dtype":"F32","dtype":"F16","shape":[2],"data_offsets":[0,8]}}'
    p.write_bytes(struct.pack("<Q", len(hb)) + hb + b"\x00" * 8)
    _expect(p, "duplicate", "dtype")


# ---- per-tensor entries ----------------------------------------------------------------------

def _lie(tmp_path, mutate):
    p = tmp_path / "f.safetensors"
    write_safetensors(p, _entries())
    h, data = _header(p)
    mutate(h)
    _rewrite(p, h, data)
    return p


@pytest.mark.parametrize("mutate,frags", [
    (lambda h: h.__setitem__("a", [1, 2]), ["'a'", "not an object"]),
    (lambda h: h["a"].pop("dtype"), ["'a'", "missing dtype"]),
    (lambda h: h["a"].pop("shape"), ["'a'", "missing shape"]),
    (lambda h: h["a"].pop("data_offsets"), ["'a'", "data_offsets"]),
    (lambda h: h["a"].__setitem__("extra", 1), ["'a'", "unknown field 'extra'"]),
    (lambda h: h["a"].__setitem__("dtype", "F33"), ["'a'", "unknown dtype 'F33'"]),
    (lambda h: h["a"].__setitem__("dtype", 5), ["'a'", "missing dtype"]),
    (lambda h: h["a"].__setitem__("dtype", "I32"), ["'a'", "I32", "not supported"]),
    (lambda h: h["a"].__setitem__("dtype", "U8"), ["'a'", "U8", "not supported"]),
    (lambda h: h["a"].__setitem__("dtype", "F64"), ["'a'", "F64", "not supported"]),
    (lambda h: h["a"].__setitem__("shape", [2, -3]), ["'a'", "non-negative integers"]),
    (lambda h: h["a"].__setitem__("shape", [2, 3.0]), ["'a'", "non-negative integers"]),
    (lambda h: h["a"].__setitem__("shape", [2, "3"]), ["'a'", "non-negative integers"]),
    (lambda h: h["a"].__setitem__("shape", 6), ["'a'", "missing shape"]),
    (lambda h: h["a"].__setitem__("shape", [2**40, 2**40]), ["'a'", "overflows"]),
    (lambda h: h["a"].__setitem__("shape", [2**64 - 1, 2]), ["'a'", "overflows"]),
    (lambda h: h["a"].__setitem__("shape", [2**70]), ["'a'", "non-negative integers"]),
    (lambda h: h["a"].__setitem__("shape", [3, 3]), ["'a'", "shape x dtype is 36 bytes",
                                                     "span 24 bytes"]),
    (lambda h: h["a"].__setitem__("shape", [6, 0]), ["'a'", "shape x dtype is 0 bytes"]),
    (lambda h: h["a"].__setitem__("dtype", "F16"), ["'a'", "shape x dtype is 12 bytes"]),
    (lambda h: h["a"].__setitem__("data_offsets", [0]), ["'a'", "data_offsets must be [begin, end]"]),
    (lambda h: h["a"].__setitem__("data_offsets", [0, 24, 5]), ["'a'", "data_offsets must be"]),
    (lambda h: h["a"].__setitem__("data_offsets", [-8, 16]), ["'a'", "non-negative integers"]),
    (lambda h: h["a"].__setitem__("data_offsets", [0.0, 24]), ["'a'", "non-negative integers"]),
    (lambda h: h["a"].__setitem__("data_offsets", [24, 0]), ["'a'", "reversed"]),
    (lambda h: h["c"].__setitem__("data_offsets", [40, 2**64 - 1]), ["'c'", "past the data section"]),
    (lambda h: h["c"].__setitem__("data_offsets", [52, 64]), ["'c'", "past the data section"]),
])
def test_lying_entry(tmp_path, mutate, frags):
    _expect(_lie(tmp_path, mutate), *frags)


def test_overlapping_offsets(tmp_path):
    p = tmp_path / "f.safetensors"
    # b claims bytes [16, 32) which overlap a's [0, 24); c is moved so the sizes still add up.
    write_safetensors(p, {}, header_override={
        "a": {"dtype": "F32", "shape": [6], "data_offsets": [0, 24]},
        "b": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]},
        "c": {"dtype": "F32", "shape": [4], "data_offsets": [32, 48]},
    })
    with open(p, "ab") as f:
        f.write(b"\x00" * 48)
    _expect(p, "overlaps")


def test_aliasing_same_offsets(tmp_path):
    p = tmp_path / "f.safetensors"
    write_safetensors(p, {}, header_override={
        "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "b": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
    })
    with open(p, "ab") as f:
        f.write(b"\x00" * 16)
    _expect(p, "overlaps")


def test_gap_between_tensors(tmp_path):
    p = tmp_path / "f.safetensors"
    write_safetensors(p, {}, header_override={
        "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "b": {"dtype": "F32", "shape": [4], "data_offsets": [20, 36]},
    })
    with open(p, "ab") as f:
        f.write(b"\x00" * 36)
    _expect(p, "gap of 4 bytes", "'b'")


def test_trailing_bytes(tmp_path):
    p = tmp_path / "f.safetensors"
    write_safetensors(p, _entries())
    with open(p, "ab") as f:
        f.write(b"\x00" * 4)
    _expect(p, "4 trailing bytes")


@pytest.mark.parametrize("cut", [1, 4, 11, 100])
def test_truncated_data(tmp_path, cut):
    p = tmp_path / "f.safetensors"
    write_safetensors(p, _entries())
    raw = p.read_bytes()
    p.write_bytes(raw[:len(raw) - cut])
    _expect(p, "truncated")


def test_every_single_byte_truncation_is_refused(tmp_path):
    """Cutting a valid file at any length gives a clean error (never a crash or a load)."""
    p = tmp_path / "f.safetensors"
    write_safetensors(p, {"a": F32(2), "b": encode(np.ones(3, np.float32), "bfloat16")})
    raw = p.read_bytes()
    for n in range(len(raw)):
        p.write_bytes(raw[:n])
        with pytest.raises(mambart.ModelLoadError):
            _load(p)


def test_random_byte_flips_never_crash(tmp_path):
    """Random corruption of header bytes: either a clean error or a file that still validates."""
    p = tmp_path / "f.safetensors"
    write_safetensors(p, _entries(), metadata={"k": "v"})
    raw = bytearray(p.read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    rng = np.random.default_rng(1)
    for _ in range(300):
        b = bytearray(raw)
        for i in rng.integers(0, 8 + n, size=rng.integers(1, 4)):
            b[i] = int(rng.integers(0, 256))
        p.write_bytes(bytes(b))
        try:
            info = _load(p)
        except mambart.ModelLoadError:
            continue
        assert isinstance(info, dict)


def test_unreadable_file(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root can read a chmod-000 file")
    p = tmp_path / "f.safetensors"
    write_safetensors(p, _entries())
    p.chmod(0)
    _expect(p, "cannot open")

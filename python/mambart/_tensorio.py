"""Torch-free tensor I/O for the converter: lazy tensors, a safetensors reader and a streaming
safetensors writer, and dtype conversion (bfloat16 handled as raw uint16 bits, no ml_dtypes).

Why not the `safetensors` package for writing: its numpy front end wants the whole state dict in
memory at once (`save_file(dict)`) and has no bfloat16 without ml_dtypes. The format is a JSON
header and raw little-endian bytes, so writing it tensor by tensor ourselves keeps the conversion
streaming (peak memory = one chunk, not the model).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ._files import open_regular
from .errors import ConversionError

# dtype name -> (numpy storage dtype, element size). bfloat16 is stored as uint16 bit patterns.
DTYPES: Dict[str, Tuple[np.dtype, int]] = {
    "float64": (np.dtype("<f8"), 8),
    "float32": (np.dtype("<f4"), 4),
    "float16": (np.dtype("<f2"), 2),
    "bfloat16": (np.dtype("<u2"), 2),
    "int64": (np.dtype("<i8"), 8),
    "int32": (np.dtype("<i4"), 4),
    "int16": (np.dtype("<i2"), 2),
    "int8": (np.dtype("i1"), 1),
    "uint8": (np.dtype("u1"), 1),
    "bool": (np.dtype("?"), 1),
}
FLOAT_DTYPES = ("float64", "float32", "float16", "bfloat16")
OUT_DTYPES = ("float32", "float16", "bfloat16")

ST_TO_NAME = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
              "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
              "BOOL": "bool"}
NAME_TO_ST = {v: k for k, v in ST_TO_NAME.items()}

# Elements per streamed chunk (1 Mi elements = 4 MB of fp32): bounds the converter's memory
# (a chunk and a few same-sized temporaries of the dtype conversion).
CHUNK_ELEMS = 1 << 20


def numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _contiguous_strides(shape: Sequence[int]) -> Tuple[int, ...]:
    st, acc = [], 1
    for s in reversed(shape):
        st.append(acc)
        acc *= int(s)
    return tuple(reversed(st))


class LazyTensor:
    """A tensor whose bytes live in a file; nothing is read until chunks() or read().

    dtype: a key of DTYPES; shape: tuple; origin: the file, for error messages;
    key: identifies the underlying bytes (two tensors with equal keys hold the same data).
    """

    def __init__(self, path: str, offset: int, dtype: str, shape: Sequence[int],
                 strides: Optional[Sequence[int]] = None, span_elems: Optional[int] = None,
                 origin: Optional[str] = None, byteswap: bool = False,
                 reader=None):
        self.path = path
        self.offset = int(offset)  # byte offset of element 0 (the storage offset applied)
        self.dtype = dtype
        self.shape = tuple(int(s) for s in shape)
        self.strides = tuple(int(s) for s in strides) if strides is not None \
            else _contiguous_strides(self.shape)
        self.origin = origin or path
        self.byteswap = byteswap
        self._reader = reader  # optional callable(offset, nbytes) -> bytes (non-seekable members)
        self.key = (os.path.realpath(path), self.offset, self.dtype, self.shape, self.strides)

    @property
    def numel(self) -> int:
        return numel(self.shape)

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype][1]

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    def is_contiguous(self) -> bool:
        if self.numel <= 1:
            return True
        return all(st == c for sz, st, c in zip(self.shape, self.strides,
                                               _contiguous_strides(self.shape)) if sz != 1)

    def _read_bytes(self, f, offset: int, nbytes: int) -> np.ndarray:
        if self._reader is not None:
            try:
                raw = self._reader(offset, nbytes)
            except ConversionError:
                raise
            except Exception as e:  # a corrupt compressed member: zlib, CRC, method errors
                raise ConversionError(f"{self.origin}: cannot read tensor data "
                                      f"({type(e).__name__}: {str(e)[:160]})") from None
            if len(raw) != nbytes:
                raise ConversionError(f"{self.origin}: truncated data ({len(raw)} of {nbytes} "
                                      f"bytes at offset {offset})")
            return np.frombuffer(raw, dtype=np.uint8).copy()
        buf = np.empty(nbytes, dtype=np.uint8)
        f.seek(offset)
        got = f.readinto(memoryview(buf))
        if got != nbytes:
            raise ConversionError(f"{self.origin}: file is truncated ({got} of {nbytes} bytes "
                                  f"readable at offset {offset})")
        return buf

    def chunks(self, max_elems: int = CHUNK_ELEMS) -> Iterator[np.ndarray]:
        """Yields the elements in C order as flat arrays of the storage numpy dtype."""
        npdt, es = DTYPES[self.dtype]
        n = self.numel
        if n == 0:
            return
        with (open_regular(self.path, "weights file", ConversionError)
              if self._reader is None else _NullCtx()) as f:
            if self.is_contiguous():
                pos = 0
                while pos < n:
                    m = min(max_elems, n - pos)
                    buf = self._read_bytes(f, self.offset + pos * es, m * es).view(npdt)
                    yield buf.byteswap() if self.byteswap else buf
                    pos += m
                return
            # Strided view of a storage (rare in checkpoints): read the span it touches.
            if any(s < 0 for s in self.strides):
                raise ConversionError(f"{self.origin}: negative strides are not supported")
            span = 1 + sum((sz - 1) * st for sz, st in zip(self.shape, self.strides))
            base = self._read_bytes(f, self.offset, span * es).view(npdt)
            if self.byteswap:
                base = base.byteswap()
            arr = np.lib.stride_tricks.as_strided(
                base, shape=self.shape, strides=tuple(s * es for s in self.strides))
            flat = np.ascontiguousarray(arr).reshape(-1)
            for pos in range(0, n, max_elems):
                yield flat[pos:pos + max_elems]

    def read(self) -> np.ndarray:
        """The whole tensor, shaped, in the storage numpy dtype (bf16 as uint16 bits)."""
        npdt, _ = DTYPES[self.dtype]
        out = np.empty(self.numel, dtype=npdt)
        pos = 0
        for c in self.chunks():
            out[pos:pos + c.size] = c
            pos += c.size
        return out.reshape(self.shape)

    def __repr__(self) -> str:
        return f"LazyTensor({self.dtype}, {self.shape}, {self.origin})"


class StackedTensor(LazyTensor):
    """Tensors of one dtype read one after another as one C-ordered tensor of `shape`: row blocks
    of its (prod(shape[:-1]), shape[-1]) view, in order (per-expert matrices stacked into the
    (X, rows, cols) tensor a layer unit reads). Reads nothing until chunks() or read()."""

    def __init__(self, parts: Sequence[LazyTensor], shape: Sequence[int]):
        self.parts = list(parts)
        self.dtype = self.parts[0].dtype
        self.shape = tuple(int(s) for s in shape)
        self.origin = self.parts[0].origin
        self.key = tuple(t.key for t in self.parts)

    def chunks(self, max_elems: int = CHUNK_ELEMS) -> Iterator[np.ndarray]:
        for t in self.parts:
            yield from t.chunks(max_elems)

    def __repr__(self) -> str:
        return f"StackedTensor({self.dtype}, {self.shape}, {len(self.parts)} parts, {self.origin})"


class LoraTensor(LazyTensor):
    """W (N, K) + B (N, r) · A (r, K), computed in float32 chunk by chunk (a LoRA adapter merged
    into its weight); dtype float32. Reads A and B whole (r is small), W in chunks."""

    def __init__(self, w: LazyTensor, a: LazyTensor, b: LazyTensor):
        self.w, self.a, self.b = w, a, b
        self.dtype = "float32"
        self.shape = tuple(w.shape)
        self.origin = w.origin
        self.key = ("lora", w.key, a.key, b.key)

    def chunks(self, max_elems: int = CHUNK_ELEMS) -> Iterator[np.ndarray]:
        K = self.shape[1]
        A = to_float32(self.a.read(), self.a.dtype).astype(np.float32)  # (r, K)
        B = to_float32(self.b.read(), self.b.dtype).astype(np.float32)  # (N, r)
        pos = 0
        for c in self.w.chunks(max(max_elems, K)):
            w = to_float32(c, self.w.dtype).astype(np.float32)
            r0, r1 = pos // K, (pos + w.size - 1) // K + 1
            ba = (B[r0:r1] @ A).reshape(-1)[pos - r0 * K:pos - r0 * K + w.size]
            yield w + ba
            pos += w.size

    def __repr__(self) -> str:
        return f"LoraTensor({self.shape}, rank {self.a.shape[0]}, {self.origin})"


class _NullCtx:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


# ---------------------------------------------------------------- dtype conversion

def bf16_bits_to_f32(u: np.ndarray) -> np.ndarray:
    return (u.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16_bits(f: np.ndarray) -> np.ndarray:
    """Round to nearest even; NaN stays NaN (quiet), infinities stay infinite."""
    f = np.ascontiguousarray(f, dtype=np.float32)
    u = f.view(np.uint32)
    nan = np.isnan(f)
    r = ((u >> 16) & np.uint32(1)) + np.uint32(0x7FFF)
    out = ((u + np.where(nan, np.uint32(0), r)) >> 16).astype(np.uint16)
    if nan.any():
        out[nan] = ((u[nan] >> 16) & np.uint32(0x8000)).astype(np.uint16) | np.uint16(0x7FC0)
    return out


def to_float32(a: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "float32":
        return a
    if dtype == "bfloat16":
        return bf16_bits_to_f32(a)
    if dtype in ("float16", "float64"):
        return a.astype(np.float32)
    raise ValueError(dtype)


def convert_chunk(a: np.ndarray, src: str, dst: str, what: str) -> np.ndarray:
    """Converts a flat chunk from dtype `src` to `dst` (both names). Narrowing that turns a finite
    value into an infinity is an error naming `what` (a silent inf would poison the model)."""
    if src == dst:
        return a
    if src not in FLOAT_DTYPES:
        raise ConversionError(f"{what}: dtype {src} is not a floating-point type")
    f = to_float32(a, src)
    if dst == "float32":
        out = f
    elif dst == "float16":
        with np.errstate(over="ignore"):
            out = f.astype(np.float16)
    elif dst == "bfloat16":
        out = f32_to_bf16_bits(f)
    else:
        raise ValueError(dst)
    if src == "float64" or dst in ("float16", "bfloat16") and src != "float16":
        src_f = a.astype(np.float64) if src == "float64" else f
        back = to_float32(out, dst) if dst != "float32" else out
        if np.count_nonzero(np.isinf(back)) != np.count_nonzero(np.isinf(src_f)):
            raise ConversionError(f"{what}: values overflow {dst} (finite values would become "
                                  f"infinite); convert to a wider dtype")
    return out


# ---------------------------------------------------------------- safetensors reading

MAX_HEADER = 100 * 1024 * 1024


def read_safetensors_header(path: str) -> Dict[str, LazyTensor]:
    """Parses and validates a safetensors file's header; returns lazy tensors (no data read)."""
    try:
        with open_regular(path, "weights file", ConversionError) as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise ConversionError(f"{path}: not a safetensors file ({size} bytes, shorter "
                                      f"than the 8-byte header length)")
            (hlen,) = struct.unpack("<Q", head)
            if hlen > MAX_HEADER or 8 + hlen > size:
                raise ConversionError(f"{path}: not a safetensors file or truncated (header "
                                      f"length {hlen}, file size {size})")
            raw = f.read(hlen)
    except OSError as e:
        raise ConversionError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ConversionError(f"{path}: safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise ConversionError(f"{path}: safetensors header is not a JSON object")
    data_start = 8 + hlen
    data_size = size - data_start
    out: Dict[str, LazyTensor] = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor '{name}'"
        if not isinstance(t, dict) or set(t) - {"dtype", "shape", "data_offsets"}:
            raise ConversionError(f"{where}: malformed header entry")
        dtype = t.get("dtype")
        dt = ST_TO_NAME.get(dtype) if isinstance(dtype, str) else None
        if dt is None:
            raise ConversionError(f"{where}: unsupported dtype {t.get('dtype')!r}")
        shape = t.get("shape")
        offs = t.get("data_offsets")
        def count(v):  # a JSON integer >= 0 (not a bool, which Python counts as an int)
            return isinstance(v, int) and not isinstance(v, bool) and v >= 0

        if (not isinstance(shape, list) or not all(count(s) for s in shape)
                or not isinstance(offs, list) or len(offs) != 2
                or not all(count(o) for o in offs)):
            raise ConversionError(f"{where}: malformed shape or data_offsets")
        b, e = offs
        if b > e or e > data_size:
            raise ConversionError(f"{where}: data_offsets {offs} lie outside the data section "
                                  f"({data_size} bytes; truncated file?)")
        if numel(shape) * DTYPES[dt][1] != e - b:
            raise ConversionError(f"{where}: shape {tuple(shape)} x {dt} does not match its "
                                  f"{e - b} bytes")
        out[name] = LazyTensor(path, data_start + b, dt, shape, origin=path)
    return out


# ---------------------------------------------------------------- safetensors writing

class SafetensorsWriter:
    """Writes a safetensors file tensor by tensor, in the order given.

    entries: (name, dtype name, shape). The header (padded with spaces to a multiple of 8, so
    the data section starts 8-aligned) is written first; callers then call write(name, chunk)
    with each tensor's elements in order. Put the 4-byte tensors first to keep every tensor
    aligned to its element size.
    """

    def __init__(self, path: str, entries: List[Tuple[str, str, Tuple[int, ...]]],
                 metadata: Optional[Dict[str, str]] = None):
        header: Dict[str, object] = {}
        if metadata:
            header["__metadata__"] = dict(metadata)
        self._sizes: List[Tuple[str, int]] = []
        pos = 0
        for name, dt, shape in entries:
            nb = numel(shape) * DTYPES[dt][1]
            header[name] = {"dtype": NAME_TO_ST[dt], "shape": list(shape),
                            "data_offsets": [pos, pos + nb]}
            self._sizes.append((name, nb))
            pos += nb
        hb = json.dumps(header, separators=(",", ":")).encode("utf-8")
        hb += b" " * ((8 - len(hb) % 8) % 8)
        self.total = 8 + len(hb) + pos
        self._f = open(path, "wb")
        self._f.write(struct.pack("<Q", len(hb)))
        self._f.write(hb)
        self._i = 0
        self._left = self._sizes[0][1] if self._sizes else 0

    def write(self, name: str, chunk: np.ndarray) -> None:
        while self._i < len(self._sizes) and self._left == 0 and self._sizes[self._i][1] == 0 \
                and self._sizes[self._i][0] != name:
            self._advance()
        if self._i >= len(self._sizes) or self._sizes[self._i][0] != name:
            raise RuntimeError(f"safetensors writer: tensor {name!r} written out of order")
        b = np.ascontiguousarray(chunk).view(np.uint8).reshape(-1)
        if b.size > self._left:
            raise RuntimeError(f"safetensors writer: too many bytes for {name!r}")
        self._f.write(memoryview(b))
        self._left -= b.size
        if self._left == 0:
            self._advance()

    def _advance(self):
        self._i += 1
        self._left = self._sizes[self._i][1] if self._i < len(self._sizes) else 0

    def close(self) -> None:
        while self._i < len(self._sizes) and self._left == 0 and self._sizes[self._i][1] == 0:
            self._advance()
        if self._i != len(self._sizes):
            self._f.close()
            raise RuntimeError("safetensors writer: closed before every tensor was written")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()

    def abort(self) -> None:
        try:
            self._f.close()
        except OSError:
            pass


@dataclass
class WeightSet:
    """Every tensor of a checkpoint by its name, and the files they came from."""

    tensors: Dict[str, LazyTensor]
    files: List[str]
    kind: str  # "safetensors" or "pytorch"

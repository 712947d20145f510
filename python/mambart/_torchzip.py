"""Reads torch-pickled checkpoints (`pytorch_model.bin`) without torch and without running code.

`torch.save` writes a zip archive: `<archive>/data.pkl` (a pickle of the state dict) and one
member `<archive>/data/<key>` per storage, stored uncompressed. The pickle names a few globals
(`torch._utils._rebuild_tensor_v2`, `torch.FloatStorage`, `collections.OrderedDict`, ...) and
refers to storages through persistent ids. We unpickle with a restricted Unpickler whose
find_class returns our own harmless stand-ins for exactly those globals and refuses every other
one, so a malicious pickle (one naming os.system, builtins.eval, ...) fails before anything runs.
Tensors come back as LazyTensor views into the zip members: no data is read until conversion.

The legacy (pre-1.6, non-zip) torch.save format is read too: magic number, protocol and
sys-info pickles, the data pickle, the storage key list, then each storage's raw bytes.

Entry point: load_torch_checkpoint(path) -> {name: LazyTensor}.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import struct
import zipfile
import zlib
from collections import OrderedDict
from typing import Any, Dict, Optional

from ._files import check_size, open_regular
from ._tensorio import DTYPES, LazyTensor, numel
from .errors import ConversionError

STORAGE_DTYPES = {
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "DoubleStorage": "float64",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
}
TORCH_DTYPES = {"float32": "float32", "float": "float32", "float16": "float16",
                "half": "float16", "bfloat16": "bfloat16", "float64": "float64",
                "double": "float64", "int64": "int64", "long": "int64", "int32": "int32",
                "int": "int32", "int16": "int16", "short": "int16", "int8": "int8",
                "uint8": "uint8", "bool": "bool"}

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
MAX_PICKLE = 256 * 1024 * 1024


class _StorageType:
    """Stand-in for torch.<X>Storage: only carries the dtype."""

    def __init__(self, dtype: str):
        self.dtype = dtype


class _DType:
    def __init__(self, name: str):
        self.name = name


class _Storage:
    """A storage in the checkpoint: where its bytes live (lazily)."""

    def __init__(self, path: str, offset: int, nbytes: int, dtype: str, origin: str,
                 byteswap: bool, reader=None):
        self.path, self.offset, self.nbytes, self.dtype = path, offset, nbytes, dtype
        self.origin, self.byteswap, self.reader = origin, byteswap, reader


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("tensor rebuilt from something that is not a storage")
    if not (isinstance(storage_offset, int) and isinstance(size, tuple)
            and isinstance(stride, tuple) and len(size) == len(stride)
            and all(isinstance(v, int) and v >= 0 for v in size + stride)
            and storage_offset >= 0):
        raise pickle.UnpicklingError("malformed tensor metadata")
    es = DTYPES[storage.dtype][1]
    n = numel(size)
    if n:
        span = storage_offset + 1 + sum((s - 1) * st for s, st in zip(size, stride))
        if span * es > storage.nbytes:
            raise pickle.UnpicklingError(
                f"tensor of shape {size} at offset {storage_offset} runs past its storage "
                f"({storage.nbytes} bytes)")
    t = LazyTensor(storage.path, storage.offset + storage_offset * es, storage.dtype, size,
                   strides=stride, origin=storage.origin, byteswap=storage.byteswap,
                   reader=_offset_reader(storage.reader, storage.offset) if storage.reader
                   else None)
    t._legacy_storage = storage
    return t


def _offset_reader(reader, base):
    # LazyTensor passes absolute offsets (storage.offset + ...); member readers take relative ones.
    return lambda off, n: reader(off - base, n)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    if not isinstance(data, LazyTensor):
        raise pickle.UnpicklingError("parameter rebuilt from something that is not a tensor")
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    if func not in (_rebuild_tensor_v2, _rebuild_parameter):
        raise pickle.UnpicklingError("unexpected rebuild function")
    return func(*args)


class _Marker:
    def __init__(self, name):
        self.name = name


# (module, name) -> object. Nothing here can run code beyond building these descriptions.
def _allowed(module: str, name: str):
    if module == "collections" and name == "OrderedDict":
        return OrderedDict
    if module == "torch._utils":
        if name in ("_rebuild_tensor_v2",):
            return _rebuild_tensor_v2
        if name == "_rebuild_tensor":
            return _rebuild_tensor
        if name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
            return _rebuild_parameter
    if module == "torch._tensor" and name == "_rebuild_from_type_v2":
        return _rebuild_from_type_v2
    if module == "torch" and name in STORAGE_DTYPES:
        return _StorageType(STORAGE_DTYPES[name])
    if module == "torch" and name in TORCH_DTYPES:
        return _DType(TORCH_DTYPES[name])
    if (module, name) in (("torch", "Tensor"), ("torch.nn.parameter", "Parameter")):
        return _Marker(name)
    return None


_CALLABLES = (OrderedDict, _rebuild_tensor_v2, _rebuild_tensor, _rebuild_parameter,
              _rebuild_from_type_v2)


def _short(obj, n: int = 80) -> str:
    try:
        r = repr(obj)
    except RecursionError:
        r = f"<deeply nested {type(obj).__name__}>"
    return r if len(r) <= n else r[:n] + "..."


class RestrictedUnpickler(pickle._Unpickler):  # the pure-Python unpickler, see below
    """Accepts only the globals that rebuild tensors and storages; every other global (os.system,
    builtins.eval, ...) raises before it can be called.

    Built on pickle's pure-Python unpickler, with these opcodes narrowed:
    - REDUCE / NEWOBJ / NEWOBJ_EX / OBJ / INST call or instantiate only the allowed stand-ins;
    - BUILD sets attributes only on an OrderedDict (torch's state dicts carry `_metadata`), so
      a pickle cannot rewrite the file, offset or shape of a tensor object;
    - BYTEARRAY8 (protocol 5, never written by torch) is refused: it allocates its length
      before reading.
    The C unpickler is not used: it keeps the memo as an array sized by the largest index, so a
    20-byte pickle with LONG_BINPUT 1258647924 allocates gigabytes (found by fuzzing), and the
    memo here is a dict."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, storage_loader):
        super().__init__(file)
        self._storage_loader = storage_loader

    def find_class(self, module, name):
        obj = _allowed(module, name)
        if obj is None:
            raise pickle.UnpicklingError(
                f"refusing to load global '{_short(module, 60)}.{_short(name, 60)}': only "
                f"tensor and storage globals are allowed in a checkpoint")
        return obj

    def persistent_load(self, pid):
        return self._storage_loader(pid)

    @staticmethod
    def _check_callable(func, what):
        if not any(func is c for c in _CALLABLES):
            raise pickle.UnpicklingError(f"refusing to {what} {_short(func)}")

    def load_reduce(self):
        stack = self.stack
        args = stack.pop()
        func = stack[-1]
        self._check_callable(func, "call")
        if not isinstance(args, tuple):
            raise pickle.UnpicklingError("REDUCE arguments are not a tuple")
        stack[-1] = func(*args)

    dispatch[pickle.REDUCE[0]] = load_reduce

    def load_newobj(self):
        args = self.stack.pop()
        cls = self.stack.pop()
        if cls is not OrderedDict or not isinstance(args, tuple):
            raise pickle.UnpicklingError(f"refusing to instantiate {_short(cls)}")
        self.append(OrderedDict.__new__(OrderedDict, *args))

    dispatch[pickle.NEWOBJ[0]] = load_newobj

    def load_newobj_ex(self):
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        if cls is not OrderedDict or not isinstance(args, tuple) or not isinstance(kwargs, dict):
            raise pickle.UnpicklingError(f"refusing to instantiate {_short(cls)}")
        self.append(OrderedDict.__new__(OrderedDict, *args, **kwargs))

    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex

    def _instantiate(self, klass, args):
        if klass is not OrderedDict:
            raise pickle.UnpicklingError(f"refusing to instantiate {_short(klass)}")
        self.append(OrderedDict(*args))

    def load_build(self):
        stack = self.stack
        state = stack.pop()
        inst = stack[-1]
        if type(inst) is not OrderedDict:
            raise pickle.UnpicklingError(f"refusing to set the state of a {type(inst).__name__}")
        if isinstance(state, tuple) and len(state) == 2 and state[1] is None:
            state = state[0]
        if state is None:
            return
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise pickle.UnpicklingError("malformed OrderedDict state")
        inst.__dict__.update(state)

    dispatch[pickle.BUILD[0]] = load_build

    def load_bytearray8(self):
        raise pickle.UnpicklingError("BYTEARRAY8 (pickle protocol 5) is not used by checkpoints")

    dispatch[pickle.BYTEARRAY8[0]] = load_bytearray8


def _storage_dtype(st) -> str:
    if isinstance(st, _StorageType):
        return st.dtype
    if isinstance(st, _DType):
        return st.name
    raise pickle.UnpicklingError(f"persistent id names an unknown storage type {_short(st)}")


def _check_state_dict(obj, path: str) -> Dict[str, LazyTensor]:
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict) \
            and not isinstance(obj.get("state_dict"), LazyTensor):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ConversionError(f"{path}: the pickle holds a {type(obj).__name__}, not a state dict")
    out: Dict[str, LazyTensor] = {}
    for k, v in obj.items():
        if not isinstance(k, str):
            raise ConversionError(f"{path}: state dict key {_short(k)} is not a string")
        if not isinstance(v, LazyTensor):
            raise ConversionError(f"{path}: state dict entry '{k}' is a {type(v).__name__}, "
                                  f"not a tensor")
        out[k] = v
    return out


def _load_zip(path: str) -> Dict[str, LazyTensor]:
    fh = open_regular(path, "torch checkpoint", ConversionError)
    try:
        zf = zipfile.ZipFile(fh)
    except BaseException as e:
        fh.close()
        if not isinstance(e, zipfile.BadZipFile):
            raise
        raise ConversionError(f"{path}: not a valid torch checkpoint (bad zip archive: {e}; "
                              f"truncated download?)") from None
    with fh, zf:
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkl) != 1:
            raise ConversionError(f"{path}: zip archive has no single data.pkl; not a torch "
                                  f"checkpoint")
        prefix = pkl[0][: -len("data.pkl")]
        infos = {i.filename: i for i in zf.infolist()}
        byteswap = False
        if prefix + "byteorder" in infos:
            order = _read_member(zf, infos[prefix + "byteorder"], MAX_SMALL_MEMBER, path)
            order = order.decode("ascii", "replace").strip()
            if order not in ("little", "big"):
                raise ConversionError(f"{path}: unknown byteorder {_short(order)}")
            byteswap = order == "big"
        if infos[pkl[0]].file_size > MAX_PICKLE:
            raise ConversionError(f"{path}: data.pkl is implausibly large")
        try:
            data = _read_member(zf, infos[pkl[0]], MAX_PICKLE, path)
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise ConversionError(f"{path}: cannot read data.pkl ({e})") from None

        storages: Dict[str, _Storage] = {}
        fsize = _file_size(path)

        def load_storage(pid):
            if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage":
                raise pickle.UnpicklingError(f"unexpected persistent id {_short(pid)}")
            dtype = _storage_dtype(pid[1])
            key, nelem = pid[2], pid[4]
            if not isinstance(key, str) or not isinstance(nelem, int) or nelem < 0:
                raise pickle.UnpicklingError(f"malformed storage reference {_short(pid)}")
            member = f"{prefix}data/{key}"
            info = infos.get(member)
            if info is None:
                raise ConversionError(f"{path}: storage '{member}' is missing from the archive "
                                      f"(truncated file?)")
            nbytes = nelem * DTYPES[dtype][1]
            if info.file_size < nbytes:
                raise ConversionError(f"{path}: storage '{member}' holds {info.file_size} bytes, "
                                      f"fewer than the {nbytes} its tensors need")
            cached = storages.get(key)
            if cached is not None and cached.dtype == dtype:
                return cached
            origin = path
            if info.compress_type == zipfile.ZIP_STORED:
                off = _member_data_offset(path, info)
                if off + info.file_size > fsize:
                    raise ConversionError(f"{path}: storage '{member}' runs past the end of "
                                          f"the file (truncated?)")
                st = _Storage(path, off, info.file_size, dtype, origin, byteswap)
            else:  # compressed member (not written by torch): read through zipfile
                if info.compress_type not in (zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2,
                                              zipfile.ZIP_LZMA):
                    raise ConversionError(f"{path}: storage '{member}' uses an unsupported zip "
                                          f"compression method ({info.compress_type})")
                reader = _member_reader(path, member)
                st = _Storage(path, 0, info.file_size, dtype, origin, byteswap, reader=reader)
            storages[key] = st
            return st

        try:
            buf = io.BytesIO(data)
            _prescan(buf)
            obj = RestrictedUnpickler(buf, load_storage).load()
        except ConversionError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
                IndexError, KeyError, struct.error, RecursionError, MemoryError) as e:
            raise ConversionError(f"{path}: refused or malformed pickle: {e}") from None
    return _check_state_dict(obj, path)


MAX_SMALL_MEMBER = 1 << 16  # a zip member other than data.pkl and the storages (byteorder...)


def _read_member(zf, info, limit: int, path: str) -> bytes:
    """A zip member's bytes, decompressed with a bound: its declared size is checked against
    `limit` first, and at most limit + 1 bytes are ever decompressed (issue 23: a 14 MB
    checkpoint whose `byteorder` member inflates to 4.4 GB)."""
    check_size(info.file_size, limit, path, f"zip member '{info.filename}'", ConversionError)
    with zf.open(info) as m:
        data = m.read(limit + 1)
    check_size(len(data), limit, path, f"zip member '{info.filename}'", ConversionError)
    return data


def _file_size(path: str) -> int:
    import os

    return os.path.getsize(path)


def _member_data_offset(path: str, info: zipfile.ZipInfo) -> int:
    """Byte offset of a stored member's data: after its local header (whose extra field may
    differ from the central directory's, so read it)."""
    with open_regular(path, "torch checkpoint", ConversionError) as f:
        f.seek(info.header_offset)
        h = f.read(30)
        if len(h) != 30 or h[:4] != b"PK\x03\x04":
            raise ConversionError(f"{path}: bad zip local header for '{info.filename}' "
                                  f"(truncated or corrupt archive)")
        nlen, xlen = struct.unpack("<HH", h[26:30])
        return info.header_offset + 30 + nlen + xlen


def _member_reader(path: str, member: str):
    def read(off: int, n: int) -> bytes:
        with open_regular(path, "torch checkpoint", ConversionError) as fh, \
                zipfile.ZipFile(fh) as zf, zf.open(member) as m:
            m.seek(off)
            return m.read(n)

    return read


def _prescan(stream) -> None:
    """Walks the pickle's opcodes (pickletools) without building anything, then rewinds. The
    unpickler allocates the size a counted opcode (BINBYTES8, BINUNICODE8, ...) claims before
    reading it, so a 20-byte pickle can make it allocate 18 GB; here such a claim fails against
    the bytes actually left, as does a huge memo index (found by tests/fuzz, torchzip target)."""
    start = stream.tell()
    for n, (op, arg, _pos) in enumerate(pickletools.genops(stream)):
        # The unpickler sizes its memo table by the largest index stored: one LONG_BINPUT of
        # 2**32 - 1 asks for 32 GB. A pickler numbers memo entries 0, 1, 2, ... (at most one
        # per opcode), so an index beyond the opcode count is not from a real checkpoint.
        if op.name in ("PUT", "BINPUT", "LONG_BINPUT") and int(arg) > n:
            raise pickle.UnpicklingError(f"memo index {arg} at opcode {n} is implausible")
    stream.seek(start)


class _BoundedFile:
    """What the unpickler reads a legacy checkpoint through: a read of more bytes than the file
    has left fails at once. (Reading a plain file object, a 20-byte pickle whose opcode claims
    an 18 GB string makes file.read allocate the 18 GB first; found by tests/fuzz, torchzip.)"""

    def __init__(self, f, size: int):
        self._f = f
        self._size = size

    def _check(self, n: int) -> None:
        left = self._size - self._f.tell()
        if n > left:
            raise pickle.UnpicklingError(f"pickle data was truncated (an opcode needs {n} "
                                         f"bytes, {left} are left in the file)")

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = max(self._size - self._f.tell(), 0)
        self._check(n)
        return self._f.read(n)

    def readinto(self, b) -> int:
        self._check(len(b))
        return self._f.readinto(b)

    def readline(self, limit: int = -1) -> bytes:
        return self._f.readline(MAX_PICKLE if limit is None or limit < 0 else limit)

    def tell(self) -> int:
        return self._f.tell()

    def seek(self, pos: int) -> int:
        return self._f.seek(pos)


def _load_legacy(path: str) -> Dict[str, LazyTensor]:
    """The pre-1.6 torch.save format (a sequence of pickles, then raw storages)."""
    f = open_regular(path, "torch checkpoint", ConversionError)
    with f:
        bf = _BoundedFile(f, _file_size(path))

        def small_pickle():
            _prescan(bf)
            return RestrictedUnpickler(bf, lambda pid: (_ for _ in ()).throw(
                pickle.UnpicklingError("unexpected persistent id"))).load()

        try:
            magic = small_pickle()
            if magic != LEGACY_MAGIC:
                raise ConversionError(f"{path}: not a torch checkpoint (neither a zip archive "
                                      f"nor the legacy torch.save format)")
            small_pickle()  # protocol version
            sys_info = small_pickle()
            if isinstance(sys_info, dict) and sys_info.get("little_endian") is False:
                raise ConversionError(f"{path}: big-endian legacy checkpoints are not supported")
            pending: Dict[str, tuple] = {}

            def load_storage(pid):
                if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage":
                    raise pickle.UnpicklingError(f"unexpected persistent id {_short(pid)}")
                dtype = _storage_dtype(pid[1])
                key, nelem = pid[2], pid[4]
                if len(pid) > 5 and pid[5] is not None:
                    raise pickle.UnpicklingError("legacy storage views are not supported")
                st = pending.get(key)
                if st is None:
                    st = _Storage(path, -1, nelem * DTYPES[dtype][1], dtype, path, False)
                    pending[key] = st
                return st

            _prescan(bf)
            obj = RestrictedUnpickler(bf, load_storage).load()
            keys = small_pickle()
        except ConversionError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
                IndexError, KeyError, struct.error, RecursionError, MemoryError) as e:
            raise ConversionError(f"{path}: refused or malformed pickle: {e}") from None
        if not isinstance(keys, list):
            raise ConversionError(f"{path}: malformed legacy checkpoint (storage key list)")
        size = _file_size(path)
        pos = f.tell()
        for key in keys:
            st = pending.get(key)
            if st is None:
                raise ConversionError(f"{path}: storage key {_short(key)} is not used by any tensor")
            f.seek(pos)
            h = f.read(8)
            if len(h) != 8:
                raise ConversionError(f"{path}: truncated (storage {_short(key)} missing)")
            (n,) = struct.unpack("<q", h)
            nbytes = n * DTYPES[st.dtype][1]
            if n < 0 or pos + 8 + nbytes > size:
                raise ConversionError(f"{path}: truncated (storage {_short(key)} runs past the end)")
            if nbytes < st.nbytes:
                raise ConversionError(f"{path}: storage {_short(key)} is shorter than declared")
            st.offset = pos + 8
            pos += 8 + nbytes
    # Tensors were built with offset -1 + storage_offset; rebase them now that offsets are known.
    return _rebase_legacy(_check_state_dict(obj, path), path)


def _rebase_legacy(tensors, path):
    # LazyTensor.offset was computed as storage.offset(-1) + storage_offset*es; the storage is
    # found through the _storage attribute set by _rebuild_tensor on legacy storages.
    out = {}
    done = set()
    for k, t in tensors.items():
        out[k] = t
        if id(t) in done:  # the same tensor object under two names (tied weights)
            continue
        done.add(id(t))
        st = t._legacy_storage
        if st.offset < 0:
            raise ConversionError(f"{path}: storage of tensor '{k}' has no data")
        t.offset = t.offset + 1 + st.offset
        t.key = (t.key[0], t.offset) + t.key[2:]
    return out


def load_torch_checkpoint(path: str) -> Dict[str, LazyTensor]:
    """Reads a torch.save'd state dict without torch. Returns {name: LazyTensor}.

    Raises ConversionError (naming the file) for a truncated or corrupt archive, a pickle that
    names any global outside the tensor/storage allowlist, or anything that is not a flat
    dict of tensors."""
    path = str(path)
    try:
        with open_regular(path, "torch checkpoint", ConversionError) as f:
            head = f.read(4)
    except OSError as e:
        raise ConversionError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        if head[:2] == b"PK":
            return _load_zip(path)
        if head[:1] == b"\x80":
            return _load_legacy(path)
    except ConversionError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError,
            NotImplementedError, struct.error, zlib.error, TypeError, KeyError, IndexError,
            AttributeError, RecursionError, MemoryError, RuntimeError, pickle.UnpicklingError) as e:
        # A corrupt archive can make zipfile fail in many ways (negative seeks, bad headers,
        # unsupported compression); found by tests/fuzz (torchzip target).
        raise ConversionError(f"{path}: corrupt torch checkpoint ({type(e).__name__}: "
                              f"{_short(str(e), 160)})") from None
    raise ConversionError(f"{path}: not a torch checkpoint (neither a zip archive nor a pickle)")

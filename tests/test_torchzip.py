"""pytorch_model.bin read without torch: the restricted unpickler and the zip/legacy readers.
torch is used only to write the files (the oracle)."""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from collections import OrderedDict

import numpy as np
import pytest
import torch

from mambart._tensorio import bf16_bits_to_f32
from mambart._torchzip import load_torch_checkpoint
from mambart.errors import ConversionError


def as_f32_or_native(t):
    a = t.read()
    return bf16_bits_to_f32(a).reshape(t.shape) if t.dtype == "bfloat16" else a


def expect(tensor: torch.Tensor) -> np.ndarray:
    if tensor.dtype == torch.bfloat16:
        return tensor.float().numpy()
    return tensor.numpy()


@pytest.mark.parametrize("legacy", [False, True])
def test_round_trip_dtypes_views_and_shared_storage(tmp_path, legacy):
    torch.manual_seed(0)
    base = torch.randn(6, 5)
    sd = OrderedDict()
    sd["f32"] = base
    sd["f16"] = torch.randn(7).half()
    sd["bf16"] = torch.randn(3, 4).to(torch.bfloat16)
    sd["f64"] = torch.randn(2, 2, dtype=torch.float64)
    sd["i64"] = torch.arange(5)
    sd["tied"] = base                  # same storage, same view
    sd["row"] = base[2]                # storage offset
    sd["transposed"] = base.t()        # non-contiguous strides
    sd["scalar"] = torch.tensor(3.5)
    sd["empty"] = torch.zeros(0, 4)
    path = tmp_path / "m.bin"
    torch.save(sd, path, _use_new_zipfile_serialization=not legacy)
    got = load_torch_checkpoint(str(path))
    assert list(got) == list(sd)
    for k, v in sd.items():
        t = got[k]
        assert t.shape == tuple(v.shape), k
        np.testing.assert_array_equal(as_f32_or_native(t), expect(v), err_msg=k)
    assert got["f16"].dtype == "float16" and got["bf16"].dtype == "bfloat16"
    assert got["tied"].key == got["f32"].key  # the converter sees tied weights as identical
    assert got["transposed"].key != got["f32"].key


def test_parameters_and_module_state_dict(tmp_path):
    lin = torch.nn.Linear(4, 3)
    path = tmp_path / "p.bin"
    torch.save({"w": lin.weight, "b": lin.bias}, path)  # Parameters pickle through _rebuild_parameter
    got = load_torch_checkpoint(str(path))
    np.testing.assert_array_equal(got["w"].read(), lin.weight.detach().numpy())
    torch.save(lin.state_dict(), path)
    got = load_torch_checkpoint(str(path))
    np.testing.assert_array_equal(got["bias"].read(), lin.bias.detach().numpy())


def test_nothing_is_read_until_asked(tmp_path):
    path = tmp_path / "big.bin"
    torch.save({"a": torch.ones(1000, 1000)}, path)
    got = load_torch_checkpoint(str(path))
    t = got["a"]
    assert t.nbytes == 4_000_000 and t.is_contiguous()
    chunks = list(t.chunks(max_elems=300_000))
    assert len(chunks) == 4 and sum(c.size for c in chunks) == 1_000_000


class _Evil:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


class _EvilEval:
    def __reduce__(self):
        return (eval, ("__import__('os').system('true')",))


def _swap_pickle(real: str, out: str, payload: bytes) -> None:
    """A real torch zip checkpoint whose data.pkl is replaced by `payload`."""
    with zipfile.ZipFile(real) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = payload if info.filename.endswith("data.pkl") else zin.read(info.filename)
            zout.writestr(info, data)


@pytest.mark.parametrize("payload", ["os.system", "eval"])
def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, payload):
    marker = tmp_path / "pwned"
    real = tmp_path / "real.bin"
    torch.save({"w": torch.zeros(2)}, real)
    evil = _Evil(f"touch {marker}") if payload == "os.system" else _EvilEval()
    bad = tmp_path / "pytorch_model.bin"
    _swap_pickle(str(real), str(bad), pickle.dumps({"w": evil}, protocol=2))
    # Sanity: the plain pickle module *would* run it.
    if payload == "os.system":
        with zipfile.ZipFile(bad) as z:
            blob = z.read([n for n in z.namelist() if n.endswith("data.pkl")][0])
        assert b"system" in blob
    with pytest.raises(ConversionError) as e:
        load_torch_checkpoint(str(bad))
    msg = str(e.value)
    assert str(bad) in msg and "refus" in msg
    assert ("system" in msg) if payload == "os.system" else ("eval" in msg)
    assert not marker.exists()


def test_malicious_legacy_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "legacy.bin"
    bad.write_bytes(pickle.dumps(_Evil(f"touch {marker}"), protocol=2))
    with pytest.raises(ConversionError, match="refus"):
        load_torch_checkpoint(str(bad))
    assert not marker.exists()


def test_rebuild_with_a_non_storage_is_refused(tmp_path):
    real = tmp_path / "real.bin"
    torch.save({"w": torch.zeros(2)}, real)

    class Fake:
        def __reduce__(self):
            import torch._utils as tu

            return (tu._rebuild_tensor_v2, ("not a storage", 0, (2,), (1,), False, OrderedDict()))

    bad = tmp_path / "bad.bin"
    _swap_pickle(str(real), str(bad), pickle.dumps({"w": Fake()}, protocol=2))
    with pytest.raises(ConversionError, match="not a storage"):
        load_torch_checkpoint(str(bad))


def test_truncated_and_corrupt_files(tmp_path):
    path = tmp_path / "m.bin"
    torch.save({"w": torch.randn(100, 100)}, path)
    data = path.read_bytes()
    trunc = tmp_path / "trunc.bin"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match="trunc.bin.*(zip|truncated)"):
        load_torch_checkpoint(str(trunc))
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"hello world, not a checkpoint")
    with pytest.raises(ConversionError, match="junk.bin.*not a torch checkpoint"):
        load_torch_checkpoint(str(junk))
    with pytest.raises(ConversionError, match="cannot read"):
        load_torch_checkpoint(str(tmp_path / "missing.bin"))


def test_missing_or_short_storage_member(tmp_path):
    path = tmp_path / "m.bin"
    torch.save({"w": torch.randn(64)}, path)
    short = tmp_path / "short.bin"
    with zipfile.ZipFile(path) as zin, zipfile.ZipFile(short, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if "/data/" in info.filename and not info.filename.endswith(".pkl"):
                data = data[:10]
            zout.writestr(info, data)
    with pytest.raises(ConversionError, match="short.bin.*storage"):
        load_torch_checkpoint(str(short))
    gone = tmp_path / "gone.bin"
    with zipfile.ZipFile(path) as zin, zipfile.ZipFile(gone, "w") as zout:
        for info in zin.infolist():
            if "/data/" in info.filename and not info.filename.endswith(".pkl"):
                continue
            zout.writestr(info, zin.read(info.filename))
    with pytest.raises(ConversionError, match="gone.bin.*missing"):
        load_torch_checkpoint(str(gone))


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "x.bin"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(ConversionError, match="not a state dict"):
        load_torch_checkpoint(str(path))
    torch.save({"w": torch.zeros(2), "step": 3}, path)
    with pytest.raises(ConversionError, match="'step'.*not a tensor"):
        load_torch_checkpoint(str(path))


def test_compressed_members_are_read(tmp_path):
    path = tmp_path / "m.bin"
    w = torch.randn(33, 7)
    torch.save({"w": w}, path)
    comp = tmp_path / "deflated.bin"
    with zipfile.ZipFile(path) as zin, zipfile.ZipFile(comp, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))
    got = load_torch_checkpoint(str(comp))
    np.testing.assert_array_equal(got["w"].read(), w.numpy())


def test_memo_index_bomb_allocates_nothing(tmp_path):
    """LONG_BINPUT 1258647924 makes the C unpickler size its memo array to 1.2 G entries
    (~10 GB); the restricted unpickler keeps the memo in a dict."""
    import struct
    import tracemalloc

    real = tmp_path / "real.bin"
    torch.save({"w": torch.zeros(2)}, real)
    bomb = b"\x80\x02N" + b"r" + struct.pack("<I", 1258647924) + b"."
    bad = tmp_path / "bomb.bin"
    _swap_pickle(str(real), str(bad), bomb)
    tracemalloc.start()
    try:
        with pytest.raises(ConversionError, match="bomb.bin.*(memo index|not a state dict)"):
            load_torch_checkpoint(str(bad))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50e6, peak


def test_pickle_cannot_rewrite_a_tensor_to_read_another_file(tmp_path):
    """BUILD (set state) on a rebuilt tensor would let a pickle point it at /etc/passwd; only
    an OrderedDict's state may be set."""
    import torch._utils as tu

    marker = object()

    class Retarget:
        def __reduce__(self):
            return (tu._rebuild_tensor_v2, (marker, 0, (2,), (1,), False, OrderedDict()),
                    {"path": "/etc/passwd", "offset": 0})

    class P(pickle.Pickler):
        def persistent_id(self, obj):
            if obj is marker:
                return ("storage", torch.FloatStorage, "0", "cpu", 2)
            return None

    buf = io.BytesIO()
    P(buf, protocol=2).dump({"w": Retarget()})
    real = tmp_path / "real.bin"
    torch.save({"w": torch.zeros(2)}, real)
    bad = tmp_path / "retarget.bin"
    _swap_pickle(str(real), str(bad), buf.getvalue())
    with pytest.raises(ConversionError, match="refusing to set the state of a LazyTensor"):
        load_torch_checkpoint(str(bad))
    # the same pickle without the state loads (the persistent id and rebuild are genuine)
    buf = io.BytesIO()

    class Plain:
        def __reduce__(self):
            return (tu._rebuild_tensor_v2, (marker, 0, (2,), (1,), False, OrderedDict()))

    P(buf, protocol=2).dump({"w": Plain()})
    _swap_pickle(str(real), str(bad), buf.getvalue())
    assert load_torch_checkpoint(str(bad))["w"].shape == (2,)


def test_big_endian_archive(tmp_path):
    w = torch.randn(5, 3)
    h = torch.randn(4).half()
    path = tmp_path / "le.bin"
    torch.save({"w": w, "h": h}, path)
    be = tmp_path / "be.bin"
    with zipfile.ZipFile(path) as zin, zipfile.ZipFile(be, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("/byteorder"):
                data = b"big"
            elif info.filename.endswith("/data/0"):
                data = np.frombuffer(data, "<f4").astype(">f4").tobytes()
            elif info.filename.endswith("/data/1"):
                data = np.frombuffer(data, "<f2").astype(">f2").tobytes()
            zout.writestr(info, data)
    got = load_torch_checkpoint(str(be))
    np.testing.assert_array_equal(got["w"].read(), w.numpy())
    np.testing.assert_array_equal(got["h"].read(), h.numpy())

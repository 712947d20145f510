"""Bad input to a model load or a generation call (issue 2 item 10): each is a Python exception
(mambart.ModelLoadError or ValueError) whose message names the file, tensor or parameter;
never a crash, an abort, or a silent wrong answer."""

import json
import math
import os
import shutil

import numpy as np
import pytest

import mambart
from mambart import _C

from model_dirs import (config_dict, encode, make_model_dir, model_tensors, save_tensors,
                        tensor_shapes, write_config, write_safetensors)


@pytest.fixture(scope="module")
def m1_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("m1") / "m", "mamba1")


@pytest.fixture(scope="module")
def gen(m1_dir):
    return mambart.Generator(m1_dir)


def _load_error(d, *fragments, exc=mambart.ModelLoadError):
    with pytest.raises(exc) as ei:
        mambart.Generator(d)
    msg = str(ei.value)
    for f in fragments:
        assert f in msg, msg
    return msg


def _dir_with(tmp_path, cfg, tensors, dtype="float32", writer=None):
    d = tmp_path / "m"
    d.mkdir(exist_ok=True)
    write_config(d, cfg)
    if writer is None:
        save_tensors(d / "model.safetensors", tensors, dtype)
    else:
        writer(d / "model.safetensors")
    return d


# ---- model directories -------------------------------------------------------------------------

def test_model_path_missing(tmp_path):
    with pytest.raises((mambart.ModelLoadError, ValueError, OSError)) as ei:
        mambart.Generator(tmp_path / "no-such-model")
    assert "no-such-model" in str(ei.value)


def test_model_path_is_a_file(tmp_path):
    f = tmp_path / "model.bin"
    f.write_bytes(b"x")
    _load_error(f, str(f), "not a directory")


def test_safetensors_missing(tmp_path, m1_dir):
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(m1_dir / "config.json", d / "config.json")
    _load_error(d, str(d / "model.safetensors"), "cannot open")


def test_safetensors_truncated(tmp_path, m1_dir):
    d = tmp_path / "m"
    shutil.copytree(m1_dir, d)
    raw = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(raw[: len(raw) - 100])
    _load_error(d, str(d / "model.safetensors"), "truncated")


def test_safetensors_lying_header(tmp_path, m1_dir):
    d = tmp_path / "m"
    shutil.copytree(m1_dir, d)
    raw = bytearray((d / "model.safetensors").read_bytes())
    raw[0:8] = (2**40).to_bytes(8, "little")
    (d / "model.safetensors").write_bytes(bytes(raw))
    _load_error(d, str(d / "model.safetensors"), "header length")


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_missing_tensor(tmp_path, arch):
    c = config_dict(arch)
    t = model_tensors(c)
    del t["layers.1.mixer.out_proj.weight"]
    d = _dir_with(tmp_path, c, t)
    _load_error(d, str(d / "model.safetensors"), "missing tensor 'layers.1.mixer.out_proj.weight'")


def test_extra_tensor(tmp_path):
    c = config_dict()
    t = model_tensors(c)
    t["layers.0.mixer.spare"] = np.zeros(3, np.float32)
    d = _dir_with(tmp_path, c, t)
    _load_error(d, str(d / "model.safetensors"), "unexpected tensor 'layers.0.mixer.spare'")


def test_extra_layer(tmp_path):
    c = config_dict()
    t = model_tensors(config_dict(n_layer=3))
    d = _dir_with(tmp_path, c, t)
    _load_error(d, "unexpected tensor 'layers.2.")


@pytest.mark.parametrize("name,shape", [
    ("embedding.weight", (104, 17)),
    ("layers.0.mixer.A_log", (32, 5)),
    ("layers.1.mixer.conv1d.weight", (32, 4)),
    ("layers.0.mixer.D", (32, 1)),
    ("norm_f.weight", ()),
])
def test_wrong_shape(tmp_path, name, shape):
    c = config_dict()
    t = model_tensors(c)
    t[name] = np.zeros(shape, np.float32)
    d = _dir_with(tmp_path, c, t)
    _load_error(d, str(d / "model.safetensors"), f"tensor '{name}' has shape")


@pytest.mark.parametrize("st_dtype,np_dtype", [("I32", "<i4"), ("F64", "<f8"), ("U8", "u1"),
                                               ("BOOL", "u1"), ("I64", "<i8")])
def test_wrong_dtype(tmp_path, st_dtype, np_dtype):
    c = config_dict()
    t = model_tensors(c)

    def writer(p):
        entries = {k: encode(v, "float32") for k, v in t.items()}
        v = t["layers.0.mixer.D"]
        entries["layers.0.mixer.D"] = (st_dtype, v.shape, v.astype(np_dtype).tobytes())
        write_safetensors(p, entries)

    d = _dir_with(tmp_path, c, t, writer=writer)
    _load_error(d, str(d / "model.safetensors"), "'layers.0.mixer.D'", st_dtype, "not supported")


@pytest.mark.parametrize("name", ["layers.0.mixer.D", "layers.1.mixer.A_log", "norm_f.weight",
                                  "layers.0.mixer.dt_proj.bias"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_small_params(tmp_path, name, bad):
    c = config_dict()
    t = model_tensors(c)
    t[name].flat[3] = bad
    d = _dir_with(tmp_path, c, t)
    _load_error(d, f"tensor '{name}'", "NaN or Inf")


def test_a_log_overflowing_exp(tmp_path):
    c = config_dict()
    t = model_tensors(c)
    t["layers.0.mixer.A_log"].flat[0] = 200.0  # -exp(200) is -inf in float32
    d = _dir_with(tmp_path, c, t)
    _load_error(d, "'layers.0.mixer.A_log'", "NaN or Inf")


@pytest.mark.parametrize("override,missing_or_extra", [
    (dict(tie_embeddings=False), "missing tensor 'lm_head.weight'"),
    (dict(bias=True), "missing tensor 'layers.0.mixer.in_proj.bias'"),
    (dict(conv_bias=False), "unexpected tensor 'layers.0.mixer.conv1d.bias'"),
    (dict(norm="layernorm"), "missing tensor 'norm_f.bias'"),
    (dict(d_state=4), "'layers.0.mixer.x_proj.weight' has shape"),
    (dict(d_inner=48), "'layers.0.mixer.in_proj.weight' has shape"),
    (dict(vocab_size_padded=128), "'embedding.weight' has shape"),
    (dict(n_layer=3), "missing tensor 'layers.2.norm.weight'"),
    (dict(d_conv=3), "'layers.0.mixer.conv1d.weight' has shape"),
])
def test_config_contradicts_weights(tmp_path, m1_dir, override, missing_or_extra):
    d = tmp_path / "m"
    d.mkdir()
    os.symlink(m1_dir / "model.safetensors", d / "model.safetensors")
    write_config(d, config_dict(**override))
    _load_error(d, str(d / "model.safetensors"), missing_or_extra)


def test_mamba2_config_over_mamba1_weights(tmp_path, m1_dir):
    d = tmp_path / "m"
    d.mkdir()
    os.symlink(m1_dir / "model.safetensors", d / "model.safetensors")
    write_config(d, config_dict("mamba2"))
    _load_error(d, str(d / "model.safetensors"), "tensor")


def test_tied_config_with_lm_head(tmp_path):
    c = config_dict(tie_embeddings=False)
    t = model_tensors(c)
    d = _dir_with(tmp_path, config_dict(), t)
    _load_error(d, "unexpected tensor 'lm_head.weight'")


def test_unaligned_data_section_loads_and_matches(tmp_path, m1_dir):
    """A valid file whose header length is odd (all tensors misaligned) loads, in every dtype,
    and gives the same logits as the aligned file (no misaligned reads: UBSan checks this)."""
    c = config_dict()
    t = model_tensors(c)
    ids = [3, 4, 5, 6, 7]
    for dtype in ("float32", "float16", "bfloat16"):
        ref_dir = tmp_path / f"ref-{dtype}"
        make_model_dir(ref_dir, dtype=dtype, tensors=t)
        d = tmp_path / f"odd-{dtype}"
        d.mkdir()
        write_config(d, config_dict(dtype=dtype))
        small = ("A_log", "D", "dt_proj.bias")
        entries = {k: encode(v, "float32" if k.endswith(small) else dtype) for k, v in t.items()}
        meta = {"pad": "x"}
        for extra in range(8):  # find a metadata length that makes the header length odd
            meta["pad"] = "x" * (1 + extra)
            write_safetensors(d / "model.safetensors", entries, metadata=meta, pad_header=False)
            if int.from_bytes((d / "model.safetensors").read_bytes()[:8], "little") % 2 == 1:
                break
        else:
            pytest.fail("could not make an odd header length")
        got = mambart.Generator(d).logits(ids)
        want = mambart.Generator(ref_dir).logits(ids)
        np.testing.assert_array_equal(got, want)
        for conv in ("float32", "float16", "bfloat16"):
            a = mambart.Generator(d, dtype=conv).logits(ids)
            b = mambart.Generator(ref_dir, dtype=conv).logits(ids)
            np.testing.assert_array_equal(a, b)


def test_bad_dtype_and_device_arguments(m1_dir):
    with pytest.raises(ValueError, match="dtype"):
        mambart.Generator(m1_dir, dtype="int8")
    with pytest.raises(ValueError, match="dtype"):
        _C.Generator(str(m1_dir), "cpu", "float64")
    with pytest.raises((ValueError, RuntimeError), match="device"):
        mambart.Generator(m1_dir, device="tpu")


@pytest.mark.skipif("asan" in os.environ.get("LD_PRELOAD", ""),
                    reason="ASan's quarantine holds freed memory, so RSS is not a leak measure")
def test_load_error_leaves_no_half_loaded_state(tmp_path, m1_dir):
    """Failing loads in a loop do not leak: RSS stays flat (weights freed on the error path)."""
    c = config_dict(dtype="float32")
    t = model_tensors(c)
    del t["layers.1.mixer.out_proj.weight"]
    d = _dir_with(tmp_path, c, t)

    def rss_kib():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024

    for _ in range(20):
        with pytest.raises(mambart.ModelLoadError):
            _C.Generator(str(d), "cpu", "bfloat16")
    r0 = rss_kib()
    for _ in range(300):
        with pytest.raises(mambart.ModelLoadError):
            _C.Generator(str(d), "cpu", "bfloat16")
    assert rss_kib() - r0 < 4096


# ---- generation arguments ----------------------------------------------------------------------

@pytest.mark.parametrize("ids,frag", [
    ([1, 2, 100], "outside the vocabulary"),
    ([1, -1], "outside the vocabulary"),
    ([103], "outside the vocabulary"),  # a padded row: not a token
    ([2**31 - 1], "outside the vocabulary"),
])
def test_token_outside_vocabulary(gen, ids, frag):
    with pytest.raises(ValueError, match=frag):
        gen.logits(ids)
    with pytest.raises(ValueError, match=frag):
        gen.generate(ids, max_new_tokens=2)
    with pytest.raises(ValueError, match=frag):
        list(gen.stream(ids, max_new_tokens=2))
    with pytest.raises(ValueError, match=frag):
        gen.generate([[1, 2], ids], max_new_tokens=2)


def test_token_id_beyond_int32(gen):
    for ids in ([2**31], [2**40], [-2**63]):
        with pytest.raises((ValueError, TypeError, OverflowError)):
            gen.logits(ids)
        with pytest.raises((ValueError, TypeError, OverflowError)):
            gen.generate(ids, max_new_tokens=1)


@pytest.mark.parametrize("prompt", [[], [[1, 2], []], "text-without-tokenizer", [1.5, 2],
                                    [None], np.array([[1.0, 2.0]])])
def test_bad_prompts(gen, prompt):
    with pytest.raises((ValueError, TypeError)):
        gen.generate(prompt, max_new_tokens=2)


def test_empty_logits_input(gen):
    with pytest.raises(ValueError, match="token_ids"):
        gen.logits([])


@pytest.mark.parametrize("kwargs,name", [
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(max_new_tokens=-(2**40)), "max_new_tokens"),
    (dict(max_new_tokens=1.5), "max_new_tokens"),
    (dict(max_new_tokens="3"), "max_new_tokens"),
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(temperature=1.0, top_p=0.0), "top_p"),
    (dict(temperature=1.0, top_p=1.01), "top_p"),
    (dict(temperature=1.0, top_p=-0.5), "top_p"),
    (dict(temperature=1.0, top_p=float("nan")), "top_p"),
    (dict(temperature=1.0, top_k=-1), "top_k"),
    (dict(temperature=1.0, min_p=-0.1), "min_p"),
    (dict(temperature=1.0, min_p=1.5), "min_p"),
    (dict(temperature=1.0, min_p=float("nan")), "min_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(repetition_penalty=-1.0), "repetition_penalty"),
    (dict(repetition_penalty=float("nan")), "repetition_penalty"),
    (dict(seed=-1), "seed"),
    (dict(stop_token_ids=[100]), "stop_token_ids"),
    (dict(stop_token_ids=[-5]), "stop_token_ids"),
])
def test_bad_generation_parameter(gen, kwargs, name):
    for call in (lambda: gen.generate([1, 2, 3], **{"max_new_tokens": 4, **kwargs}),
                 lambda: list(gen.stream([1, 2, 3], **{"max_new_tokens": 4, **kwargs}))):
        with pytest.raises(ValueError) as ei:
            call()
        assert name in str(ei.value), str(ei.value)


def test_c_level_options_validated(m1_dir):
    """The raw _C entry points validate too (the C++ library is usable without the wrapper)."""
    g = _C.Generator(str(m1_dir))
    for field, value in (("max_new_tokens", -1), ("temperature", -1.0), ("top_p", 0.0),
                         ("top_p", 2.0), ("min_p", 2.0), ("repetition_penalty", 0.0),
                         ("top_k", -3)):
        o = _C.GenerationOptions()
        o.max_new_tokens = 2
        if field != "temperature":
            o.temperature = 1.0
        setattr(o, field, value)
        with pytest.raises(ValueError, match=field):
            g.generate([[1, 2]], o)
        with pytest.raises(ValueError, match=field):
            g.start([[1, 2]], o)
    o = _C.GenerationOptions()
    with pytest.raises(ValueError, match="prompts"):
        g.generate([], o)
    with pytest.raises(ValueError):
        g.generate([[]], o)
    o.stop_token_ids = [1000]
    with pytest.raises(ValueError, match="stop_token_ids"):
        g.generate([[1]], o)


def test_edge_values_that_are_valid(gen):
    """The boundaries of each range are accepted and behave as documented."""
    r = gen.generate([1, 2, 3], max_new_tokens=0)
    assert r.token_ids == [] and r.finish_reason == "length"
    r = gen.generate([1, 2, 3], max_new_tokens=3, temperature=1.0, top_p=1.0, min_p=1.0, seed=1)
    assert len(r.token_ids) >= 1
    r = gen.generate([1, 2, 3], max_new_tokens=3, temperature=1e-30, seed=1, ignore_eos=True)
    assert r.token_ids == gen.generate([1, 2, 3], max_new_tokens=3, ignore_eos=True).token_ids
    r = gen.generate([99], max_new_tokens=2, temperature=1e30, seed=2, ignore_eos=True)
    assert all(0 <= t < 100 for t in r.token_ids)
    r = gen.generate([1, 2], max_new_tokens=2, repetition_penalty=1e30, ignore_eos=True)
    assert all(0 <= t < 100 for t in r.token_ids)
    r = gen.generate([1, 2], max_new_tokens=2, seed=2**64 - 1, temperature=1.0)
    assert len(r.token_ids) >= 1
    assert np.isfinite(gen.logits([0, 99])).all()


# ---- resource limits (issue 6): a load that cannot fit is refused up front, with the numbers -------

def _host_bytes(c, load_dtype, file_dtype):
    """Host bytes the CPU load allocates: large matrices copied when their dtype changes (tiny
    test files are aligned), small parameters always as float32."""
    big = ("embedding.weight", "lm_head.weight", "in_proj.weight", "x_proj.weight",
           "dt_proj.weight", "out_proj.weight")
    size = {"float32": 4, "float16": 2, "bfloat16": 2}
    need = 0
    for name, shape in tensor_shapes(c).items():
        n = int(np.prod(shape))
        if name.endswith(big):
            need += n * size[load_dtype] if load_dtype != file_dtype else 0
        else:
            need += n * 4
    return need


def test_load_larger_than_available_memory_is_refused(m1_dir, monkeypatch):
    c = config_dict()
    need = _host_bytes(c, "bfloat16", "float32")
    monkeypatch.setenv("MAMBART_HOST_MEMORY_LIMIT", str(need - 1))
    with pytest.raises(mambart.ModelLoadError) as ei:
        mambart.Generator(m1_dir, dtype="bfloat16")
    msg = str(ei.value)
    assert str(m1_dir / "model.safetensors") in msg
    assert f"needs {need} bytes" in msg and f"but {need - 1} bytes are available" in msg, msg
    monkeypatch.setenv("MAMBART_HOST_MEMORY_LIMIT", str(need))
    assert mambart.Generator(m1_dir, dtype="bfloat16").logits([1, 2]).shape == (2, 100)


def test_zero_copy_weights_cost_no_host_memory(m1_dir, monkeypatch):
    """Weights kept in the file's dtype are views of the mapping: only the small fp32
    parameters count against the limit."""
    need = _host_bytes(config_dict(), "float32", "float32")
    monkeypatch.setenv("MAMBART_HOST_MEMORY_LIMIT", str(need))
    assert mambart.Generator(m1_dir).logits([1, 2]).shape == (2, 100)
    monkeypatch.setenv("MAMBART_HOST_MEMORY_LIMIT", str(need - 1))
    with pytest.raises(mambart.ModelLoadError, match="bytes of host memory"):
        mambart.Generator(m1_dir)

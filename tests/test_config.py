"""config.json validation (cpp/config.cpp): every bad config is a ModelLoadError naming the file
and the key, raised before any weight is read or memory allocated."""

import json
import os
import resource
import time

import pytest

import mambart
from mambart import _C

from model_dirs import TINY_M1, TINY_M2, config_dict, make_model_dir, write_config


@pytest.fixture(scope="module")
def m1_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("m1") / "m", "mamba1")


@pytest.fixture(scope="module")
def m2_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("m2") / "m", "mamba2")


def _with_config(tmp_path, src_dir, cfg=None, text=None):
    """A model dir sharing `src_dir`'s weights with a different config.json."""
    d = tmp_path / "m"
    d.mkdir()
    os.symlink(src_dir / "model.safetensors", d / "model.safetensors")
    if text is not None:
        (d / "config.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    else:
        write_config(d, cfg)
    return d


def _expect(d, *fragments, exc=mambart.ModelLoadError):
    with pytest.raises(exc) as ei:
        _C.Generator(str(d))
    msg = str(ei.value)
    assert str(d) in msg, msg
    rest = msg.replace(str(d), "")
    for f in fragments:
        assert f in rest, msg
    return msg


def test_valid_configs_load(m1_dir, m2_dir):
    for d, base in ((m1_dir, TINY_M1), (m2_dir, TINY_M2)):
        c = _C.Generator(str(d)).config
        for k in ("d_model", "n_layer", "vocab_size", "d_inner", "d_state", "d_conv"):
            assert c[k] == base[k]


def test_missing_config(tmp_path, m1_dir):
    d = tmp_path / "m"
    d.mkdir()
    os.symlink(m1_dir / "model.safetensors", d / "model.safetensors")
    _expect(d, "config.json", "cannot open config")


def test_missing_model_dir(tmp_path):
    _expect(tmp_path / "nothing", "config.json")


def test_config_is_a_directory(tmp_path, m1_dir):
    d = tmp_path / "m"
    (d / "config.json").mkdir(parents=True)
    _expect(d, "config.json", "not a regular file")


def test_config_is_dev_zero(tmp_path, m1_dir):
    d = tmp_path / "m"
    d.mkdir()
    os.symlink("/dev/zero", d / "config.json")
    t0 = time.time()
    _expect(d, "config.json", "not a regular file")
    assert time.time() - t0 < 5


def test_config_too_large(tmp_path, m1_dir):
    d = _with_config(tmp_path, m1_dir, text=b" " * (17 << 20) + b"{}")
    _expect(d, "config.json", "more than the limit")


@pytest.mark.parametrize("text,frag", [
    ("", "not valid JSON"), ("{", "not valid JSON"), ("nope", "not valid JSON"),
    (b"\xff\xfe{}", "not valid JSON"), ("[1, 2]", "not a JSON object"), ("3", "not a JSON object"),
    ("{}", "mambart_format"),
])
def test_not_a_config(tmp_path, m1_dir, text, frag):
    msg = _expect(_with_config(tmp_path, m1_dir, text=text), "config.json", frag)
    msg.encode("utf-8")  # a valid str whatever bytes the file held


def test_duplicate_key(tmp_path, m1_dir):
    text = json.dumps(TINY_M1)[:-1] + ', "d_model": 1000000000000}'
    _expect(_with_config(tmp_path, m1_dir, text=text), "duplicate key 'd_model'")


@pytest.mark.parametrize("key", sorted(TINY_M1))
def test_missing_key(tmp_path, m1_dir, key):
    cfg = dict(TINY_M1)
    del cfg[key]
    d = _with_config(tmp_path, m1_dir, cfg)
    # every key is required, the special ids included (docs/format.md: null, not absent, says
    # "none"); the message names the file and the key
    _expect(d, f"config key '{key}' is missing" if key != "mambart_format" else "mambart_format")


def test_unknown_key(tmp_path, m1_dir):
    _expect(_with_config(tmp_path, m1_dir, config_dict(d_modle=16)), "unknown config key 'd_modle'")


def test_source_is_free_form(tmp_path, m1_dir):
    _C.Generator(str(_with_config(tmp_path, m1_dir, config_dict(source={"any": [1, {"x": None}]}))))


@pytest.mark.parametrize("key,value,frag", [
    ("mambart_format", 2, "not supported"),
    ("mambart_format", "1", "must be an integer"),
    ("architecture", "mamba3", "not supported"),
    ("architecture", 1, "must be a string"),
    ("d_model", 10**12, "out of range"),
    ("d_model", 0, "out of range"),
    ("d_model", -16, "out of range"),
    ("d_model", 16.0, "must be an integer"),
    ("d_model", "16", "must be an integer"),
    ("d_model", True, "must be an integer"),
    ("d_model", 2**64 + 1, "must be an integer"),
    ("d_model", 2**64 - 1, "out of range"),
    ("n_layer", 0, "out of range"),
    ("n_layer", 10**6, "out of range"),
    ("vocab_size", 0, "out of range"),
    ("vocab_size", 10**12, "out of range"),
    ("vocab_size_padded", 99, "must be >= vocab_size"),
    ("d_inner", 10**12, "out of range"),
    ("d_state", 10**6, "out of range"),
    ("d_conv", 0, "out of range"),
    ("d_conv", 1000, "out of range"),
    ("conv_bias", 1, "must be true or false"),
    ("dt_rank", 0, "must be >= 1"),
    ("dt_limit", [1.0, 0.5], "0 <= min < max"),
    ("dt_limit", [-1.0, None], "0 <= min < max"),
    ("dt_limit", [1e300, None], "0 <= min < max"),
    ("dt_limit", [0.0, 1e300], "0 <= min < max"),
    ("dt_limit", [None, None], "must be [min, max or null]"),
    ("dt_limit", [0.0], "must be [min, max or null]"),
    ("dt_limit", "none", "must be [min, max or null]"),
    ("norm", "batchnorm", "not supported"),
    ("norm_eps", 0, "must be in (0, 1)"),
    ("norm_eps", 1.5, "must be in (0, 1)"),
    ("norm_eps", "1e-5", "must be a number"),
    ("eos_token_id", 100, "outside the vocabulary"),
    ("eos_token_id", -1, "out of range"),
    ("bos_token_id", 10**13, "out of range"),
    ("dtype", "int8", "not float32, float16 or bfloat16"),
    ("dtype", None, "must be a string"),
    ("residual_in_fp32", "yes", "must be true or false"),
])
def test_bad_value_mamba1(tmp_path, m1_dir, key, value, frag):
    _expect(_with_config(tmp_path, m1_dir, config_dict(**{key: value})), f"'{key}'", frag)


@pytest.mark.parametrize("key,value,frag", [
    ("headdim", 0, "must be >= 1"),
    ("headdim", 7, "x headdim (4 x 7) must equal d_inner"),
    ("nheads", 3, "must equal d_inner"),
    ("ngroups", 3, "must divide nheads"),
    ("ngroups", 0, "out of range"),
    ("chunk_size", 0, "must be >= 1"),
    ("chunk_size", 10**9, "out of range"),
])
def test_bad_value_mamba2(tmp_path, m2_dir, key, value, frag):
    _expect(_with_config(tmp_path, m2_dir, config_dict("mamba2", **{key: value})), key, frag)


def test_norm_before_gate_unsupported(tmp_path, m2_dir):
    _expect(_with_config(tmp_path, m2_dir, config_dict("mamba2", norm_before_gate=True)),
            "norm_before_gate", exc=NotImplementedError)


def test_absurd_sizes_fail_before_allocation(tmp_path, m1_dir):
    """Each size within its own bound but a product no machine could hold: refused by the
    plausibility bound, quickly and without growing the process."""
    cfg = config_dict(d_model=2**20, d_inner=2**21, vocab_size=2**24 - 8, vocab_size_padded=2**24,
                      n_layer=4096, d_state=4096)
    d = _with_config(tmp_path, m1_dir, cfg)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.time()
    _expect(d, "not a plausible model")
    assert time.time() - t0 < 2
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0 < 64 * 1024  # KiB


def test_large_plausible_config_fails_at_first_tensor(tmp_path, m1_dir):
    """A config the bound allows (about 1e10 parameters) over a tiny file: the first tensor's
    shape check fails before anything is allocated for the model."""
    cfg = config_dict(d_model=2**14, d_inner=2**15, n_layer=8, vocab_size=2**16,
                      vocab_size_padded=2**16)
    d = _with_config(tmp_path, m1_dir, cfg)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _expect(d, "model.safetensors", "embedding.weight", "has shape (104, 16)",
            "config implies (65536, 16384)")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0 < 64 * 1024


def test_public_generator_names_config(tmp_path, m1_dir):
    d = _with_config(tmp_path, m1_dir, config_dict(d_state=7))
    with pytest.raises(mambart.ModelLoadError) as ei:
        mambart.Generator(d)
    assert "x_proj.weight" in str(ei.value) and str(d) in str(ei.value)

"""Quantized weights (issue 18): int8 per output channel and int4 group-wise (docs/format.md
"Quantized weights").

- the CPU kernels (GEMV for decode, GEMM for prefill; this CPU's SIMD path and the generic path)
  and the quantized embedding against a float64 numpy dequantize-and-matmul reference;
- the quantizer's layout, written independently here;
- `mambart convert --quantize` (from a mambart directory too): the config records the scheme per
  tensor, the model loads and runs, and its logits stay near the unquantized model's;
- bad input: scales missing, mis-shaped, NaN; an unsupported scheme; integer data the config does
  not mark; each a ModelLoadError / ConversionError naming the tensor and the scheme;
- accuracy on the bundled trained demo models (tools/train_demo.py: a Mamba-1 and a Mamba-2
  trained on the standard library's source): held-out perplexity of int8 within 1% of bf16 and
  int4 within 5%.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mambart
from mambart import ModelLoadError, _C
from mambart._quant import dequantize, quantize
from mambart._tensorio import SafetensorsWriter, read_safetensors_header
from mambart.convert import convert
from mambart.errors import ConversionError

from model_dirs import make_model_dir

# (M, K, N, group): GEMV rows 1..8 (tiles of 4 / 2 / 1 weight rows), GEMM from 9, K tails (int8)
SHAPES8 = [(1, 64, 37, 0), (1, 3, 5, 0), (2, 24, 9, 0), (3, 17, 11, 0), (4, 40, 7, 0),
           (5, 8, 3, 0), (7, 33, 16, 0), (8, 72, 21, 0), (9, 16, 17, 0), (13, 100, 33, 0),
           (37, 130, 40, 0), (12, 770, 20, 0),
           # the VNNI GEMV's blocks of 32 in pairs: an odd last block, a long row
           (1, 160, 13, 0), (2, 96, 9, 0), (6, 224, 10, 0), (1, 1536, 33, 0)]
SHAPES4 = [(1, 64, 37, 32), (1, 256, 5, 128), (2, 128, 9, 64), (3, 96, 11, 32), (4, 384, 7, 128),
           (5, 32, 3, 32), (8, 512, 21, 128), (9, 128, 17, 128), (13, 256, 33, 64),
           (37, 768, 40, 128)]


def _case(scheme, M, K, N, group, seed=0):
    rng = np.random.default_rng(seed + M * 1000 + K * 10 + N)
    x = rng.standard_normal((M, K)).astype(np.float32)
    W = rng.standard_normal((N, K)).astype(np.float32)
    W[0] *= 0.0  # an all-zero row: scale 0
    bias = rng.standard_normal(N).astype(np.float32)
    q, s = quantize(W, scheme, group or 128, "float16")
    sf = s.astype(np.float32)
    Wd = dequantize(q, sf, scheme, group or 128)  # float64
    return x, q, sf, bias, Wd


def act_block(scheme, M, K, group, kernels):
    """The activation block the CPU's quantized GEMV rounds x to int8 in (cpu/linear.cpp vnni:
    decode rows, K % 32 == 0, on AVX512-VNNI), or 0 where x stays fp32."""
    if kernels != "avx512vnni" or M > 8 or K % 32:
        return 0
    return 32


def _check(y, x, Wd, bias, K, blk=0):
    ref = x.astype(np.float64) @ Wd.T + bias
    bound = 4e-7 * (np.abs(x) @ np.abs(Wd).T + np.abs(bias)) * max(4, np.sqrt(K))
    if blk:  # x rounded to int8 per block: at most half a step, max|x_block| / 254, each
        nb = -(-K // blk)
        xp = np.zeros((x.shape[0], nb * blk))
        xp[:, :K] = np.abs(x)
        half = np.repeat(xp.reshape(x.shape[0], nb, blk).max(axis=2) / 254.0, blk, axis=1)[:, :K]
        bound = bound * 2 + (half * (1 + 1e-6)) @ np.abs(Wd).T
    assert np.all(np.abs(y - ref) <= bound + 1e-30), float(np.abs(y - ref).max())


@pytest.mark.parametrize("scheme,M,K,N,group", [("int8",) + s for s in SHAPES8] +
                         [("int4",) + s for s in SHAPES4])
def test_linear_quant_matches_float64(scheme, M, K, N, group):
    x, q, sf, bias, Wd = _case(scheme, M, K, N, group)
    be = _C._ops.Backend("cpu")
    blk = act_block(scheme, M, K, group, _C._ops.linear_quant_kernels())
    _check(be.linear_quant(x, q, sf, scheme, group, bias), x, Wd, bias, K, blk)
    y0 = be.linear_quant(x, q, sf, scheme, group)
    _check(y0, x, Wd, np.zeros_like(bias), K, blk)
    # N < rows: the first N rows only (other tiles: the compiler may fuse the last multiply-add
    # differently, so equal up to rounding)
    yn = be.linear_quant(x, q, sf, scheme, group, bias, N=max(1, N // 2))
    np.testing.assert_allclose(yn, be.linear_quant(x, q, sf, scheme, group, bias)[:, :max(1, N // 2)],
                               rtol=1e-5, atol=1e-5)


_GENERIC_CHILD = r"""
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from test_quant import SHAPES4, SHAPES8, _case, _check
from mambart import _C
be = _C._ops.Backend("cpu")
assert "generic" in be.name and _C._ops.linear_quant_kernels() == "generic", be.name
for scheme, shapes in (("int8", SHAPES8), ("int4", SHAPES4)):
    for M, K, N, g in shapes:
        x, q, sf, bias, Wd = _case(scheme, M, K, N, g)
        _check(be.linear_quant(x, q, sf, scheme, g, bias), x, Wd, bias, K)
print("ok")
"""


def test_linear_quant_generic_path():
    """The portable path (MAMBART_CPU_PORTABLE=1, read once per process: a child) against the
    same float64 reference."""
    env = dict(os.environ, MAMBART_CPU_PORTABLE="1")
    r = subprocess.run([sys.executable, "-c", _GENERIC_CHILD, str(Path(__file__).parent)],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr


def test_linear_quant_kernels_named():
    """The quantized GEMV's kernels follow the CPU: VNNI where /proc/cpuinfo has AVX-512
    VNNI (with F, BW, VL) on x86-64 with the AVX2 or AVX-512 kernels (never the generic ones
    there: an AVX-512 machine once fell to them, 9x slower than bf16)."""
    from test_cpu_kernels import expected_kernels

    got = _C._ops.linear_quant_kernels()
    base = expected_kernels()
    if base in ("avx2", "avx512", "avx512+amx"):
        flags = next((l for l in open("/proc/cpuinfo") if l.startswith("flags")), "").split()
        vnni = all(f in flags for f in ("avx512f", "avx512bw", "avx512vl", "avx512_vnni"))
        assert got == ("avx512vnni" if vnni else "avx2")
    else:
        assert got == ("neon" if base.startswith("neon") else "generic")


def test_linear_quant_vnni_rounds_activations_per_block():
    """On the VNNI path a decode GEMV's result moves by activation rounding only: an outlier in
    one block of x does not coarsen another block (per-block scales)."""
    if _C._ops.linear_quant_kernels() != "avx512vnni":
        pytest.skip("the VNNI GEMV runs on x86-64 CPUs with AVX-512 VNNI only")
    rng = np.random.default_rng(7)
    K = 256
    x = rng.standard_normal((1, K)).astype(np.float32)
    x[0, 3] = 1000.0  # an outlier in block 0
    W = rng.standard_normal((8, K)).astype(np.float32)
    q, s = quantize(W, "int8", 0, "float16")
    sf = s.astype(np.float32)
    Wd = dequantize(q, sf, "int8")
    be = _C._ops.Backend("cpu")
    x2 = x.copy()
    x2[0, :32] = 0  # not block 0
    y2 = be.linear_quant(x2, q, sf, "int8")
    ref2 = x2.astype(np.float64) @ Wd.T
    # block 1 alone: its own scale (max ~3 / 127), far finer than the outlier's 1000 / 127
    assert np.abs(y2 - ref2).max() < 0.5, np.abs(y2 - ref2).max()
    _check(be.linear_quant(x, q, sf, "int8"), x, Wd, np.zeros(8), K, 32)


@pytest.mark.parametrize("scheme,group", [("int8", 0), ("int4", 32), ("int4", 128)])
def test_embedding_quant(scheme, group):
    rng = np.random.default_rng(3)
    table = rng.standard_normal((50, 256)).astype(np.float32)
    q, s = quantize(table, scheme, group or 128, "bfloat16")
    from mambart._tensorio import to_float32
    sf = to_float32(s, "bfloat16").astype(np.float32)
    ids = np.array([0, 49, 7, 7, 13], np.int32)
    out = _C._ops.Backend("cpu").embedding_quant(ids, q, sf, scheme, group)
    ref = dequantize(q, sf, scheme, group or 128)[ids]
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=0)


def test_quantizer_layout():
    """The int4 layout of op_params.h, built by hand: byte j of a 32-weight block holds weight
    j (low nibble) and j + 16 (high nibble), as u = q + 8; int8 is q itself; scales absmax / qmax."""
    w = np.zeros((1, 32), np.float32)
    w[0, :16] = np.arange(16) - 7.0   # -7 .. 8, the 8 set to 7 below
    w[0, 16:] = -(np.arange(16) - 7.0)
    w[0, 15], w[0, 31] = 7.0, -7.0
    q, s = quantize(w, "int4", 32, "float16")
    assert s.astype(np.float32)[0, 0] == 1.0  # absmax 7 / 7
    u = w[0].astype(np.int64) + 8
    want = (u[:16] | (u[16:] << 4)).astype(np.uint8)
    np.testing.assert_array_equal(q[0], want)
    q8, s8 = quantize(np.array([[127.0, -63.5, 0.2]], np.float32), "int8", 0, "float16")
    assert s8.astype(np.float32)[0] == 1.0
    np.testing.assert_array_equal(q8[0], [127, -64, 0])  # round half to even
    np.testing.assert_array_equal(dequantize(q, s.astype(np.float32), "int4", 32)[0], w[0])


# ---------------------------------------------------------------- converter and loading

def _tiny(tmp_path, arch="mamba1", dtype="bfloat16"):
    kw = dict(d_model=64, d_inner=128, vocab_size=100, vocab_size_padded=104)
    kw.update(dict(headdim=16, nheads=8) if arch == "mamba2" else dict(dt_rank=4))
    return make_model_dir(tmp_path / f"src-{arch}", arch, dtype=dtype, **kw)


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_convert_quantize_records_and_runs(tmp_path, arch, scheme):
    src = _tiny(tmp_path, arch)
    out = Path(convert(src, tmp_path / "q", quantize=scheme, int4_group_size=32))
    cfg = json.loads((out / "config.json").read_text())
    q = cfg["quantization"]
    assert q["int4_group_size"] == 32
    t = q["tensors"]
    assert t["embedding.weight"] == scheme and t["layers.1.mixer.in_proj.weight"] == scheme
    assert t["layers.0.mixer.out_proj.weight"] == scheme
    assert ("layers.0.mixer.x_proj.weight" in t) == (arch == "mamba1")
    assert not any("conv1d" in n or "dt_proj" in n or "norm" in n for n in t)
    hdr = read_safetensors_header(str(out / "model.safetensors"))
    d = hdr["layers.0.mixer.in_proj.weight"]
    assert d.dtype == ("int8" if scheme == "int8" else "uint8")
    assert hdr["layers.0.mixer.in_proj.weight_scale"].dtype == "bfloat16"
    assert hdr["layers.0.mixer.conv1d.weight"].dtype == "bfloat16"
    ids = [1, 5, 9, 2, 7, 3, 30, 31]
    ref = mambart.Generator(str(src)).logits(ids)
    got = mambart.Generator(str(out)).logits(ids)
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert err < (0.05 if scheme == "int8" else 0.5), err
    # decode steps agree with a prefill over the same tokens on the quantized model (the GEMV
    # and the GEMM; the VNNI GEMV rounds activations to int8 per block of 32, which moves this
    # random model's near-uniform log-probabilities by a few hundredths: a tolerance; the
    # trained models' decode-path perplexity is held to the issue's bounds below)
    g = mambart.Generator(str(out))
    r = g.generate(ids, max_new_tokens=8, ignore_eos=True, logprobs=1)
    full = g.logits(ids + list(r.token_ids)).astype(np.float64)[len(ids) - 1:-1]
    lse = np.log(np.exp(full - full.max(1, keepdims=True)).sum(1)) + full.max(1)
    want = full[np.arange(len(r.token_ids)), r.token_ids] - lse
    got = np.array([lp.logprob for lp in r.logprobs])
    np.testing.assert_allclose(got, want, rtol=0, atol=0.1)


def test_fused_projections_option_runs_quantized_models_unfused(tmp_path):
    """The fused decode projections (issue 16) read float weights: a quantized model loads with
    the option on, runs its projections unfused, and gives the same tokens."""
    out = Path(convert(_tiny(tmp_path), tmp_path / "q", quantize="int4", int4_group_size=32))
    want = mambart.Generator(str(out)).generate([1, 2, 3], max_new_tokens=8, ignore_eos=True)
    mambart.set_options(fused_projections=True)
    try:
        g = mambart.Generator(str(out))
    finally:
        mambart.set_options(fused_projections=None)
    assert g._g.fused_projections is False
    got = g.generate([1, 2, 3], max_new_tokens=8, ignore_eos=True)
    assert got.token_ids == want.token_ids


def hybrid_dir(path: Path) -> Path:
    """A listed model with Mamba-2, attention (GQA, RoPE; and mamba_ssm's fused qkv with a conv)
    and MLP (relu2, swiglu) layers, random weights, bf16."""
    from model_dirs import random_tensor, save_tensors, write_config

    m2 = {"type": "mamba2", "d_inner": 128, "d_state": 16, "d_conv": 4, "conv_bias": True,
          "bias": False, "headdim": 16, "nheads": 8, "ngroups": 1, "chunk_size": 16,
          "dt_limit": [0.0, None], "gated_norm": True, "norm_before_gate": False}
    att = {"type": "attention", "num_heads": 4, "num_kv_heads": 2, "head_dim": 16,
           "rotary_dim": 8, "rope_theta": 10000.0, "window": 0, "qkv_bias": False,
           "out_bias": False, "scale": 0.25, "max_context": 128, "fused_qkv": False, "d_conv": 0}
    att2 = dict(att, fused_qkv=True, d_conv=4, num_kv_heads=4)
    mlp = {"type": "mlp", "intermediate_size": 96, "activation": "relu2", "bias": False}
    layers = [m2, att, mlp, m2, att2, dict(mlp, activation="swiglu")]
    c = {"mambart_format": 1, "architecture": "hybrid", "d_model": 64, "n_layer": len(layers),
         "vocab_size": 100, "vocab_size_padded": 104, "norm": "rmsnorm", "norm_eps": 1e-5,
         "residual_in_fp32": True, "tie_embeddings": False, "bos_token_id": None,
         "eos_token_id": 0, "pad_token_id": None, "dtype": "bfloat16", "layers": layers}
    spec = _C.config_spec(json.dumps(c), "hybrid")
    rng = np.random.default_rng(11)
    t = {e["name"]: random_tensor(e["name"], tuple(e["shape"]), rng) for e in spec["tensors"]}
    path.mkdir(parents=True)
    write_config(path, c)
    save_tensors(path / "model.safetensors", t, "bfloat16")
    return path


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_convert_quantize_hybrid(tmp_path, scheme):
    """Attention and MLP projections quantize too (they run through Backend::linear)."""
    src = hybrid_dir(tmp_path / "src")
    out = Path(convert(src, tmp_path / "q", quantize=scheme, int4_group_size=32))
    t = json.loads((out / "config.json").read_text())["quantization"]["tensors"]
    for n in ("layers.1.mixer.q_proj.weight", "layers.1.mixer.o_proj.weight",
              "layers.4.mixer.in_proj.weight", "layers.2.mixer.up_proj.weight",
              "layers.5.mixer.gate_proj.weight", "layers.5.mixer.down_proj.weight",
              "lm_head.weight", "layers.0.mixer.in_proj.weight"):
        assert t[n] == scheme, n
    assert "layers.4.mixer.conv1d.weight" not in t
    ids = [1, 5, 9, 2, 7, 3, 30, 31, 44, 45, 12, 13]
    ref = mambart.Generator(str(src)).logits(ids)
    g = mambart.Generator(str(out))
    got = g.logits(ids)
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert 0 < err < (0.05 if scheme == "int8" else 0.5), err
    r = g.generate(ids, max_new_tokens=6, ignore_eos=True, logprobs=1)
    full = g.logits(ids + list(r.token_ids)).astype(np.float64)[len(ids) - 1:-1]
    lse = np.log(np.exp(full - full.max(1, keepdims=True)).sum(1)) + full.max(1)
    want = full[np.arange(len(r.token_ids)), r.token_ids] - lse
    np.testing.assert_allclose([lp.logprob for lp in r.logprobs], want, rtol=0, atol=0.1)


def test_convert_quantize_options(tmp_path):
    src = _tiny(tmp_path)
    # int4 with the default group 128: K = 64 does not fit, so those tensors fall back to int8
    out = Path(convert(src, tmp_path / "a", quantize="int4"))
    t = json.loads((out / "config.json").read_text())["quantization"]["tensors"]
    assert t["layers.0.mixer.in_proj.weight"] == "int8"      # K = d = 64
    assert t["layers.0.mixer.out_proj.weight"] == "int4"     # K = E = 128
    out = Path(convert(src, tmp_path / "b", quantize="int8", quantize_head=False))
    t = json.loads((out / "config.json").read_text())["quantization"]["tensors"]
    assert "embedding.weight" not in t
    with pytest.raises(ConversionError, match="quantize must be"):
        convert(src, tmp_path / "c", quantize="fp8")
    with pytest.raises(ConversionError, match="int4_group_size"):
        convert(src, tmp_path / "c", quantize="int4", int4_group_size=48)
    # a quantized directory is not quantized (or converted) again
    with pytest.raises(ConversionError, match="already quantized"):
        convert(tmp_path / "a", tmp_path / "c", quantize="int8")
    # the CLI
    r = subprocess.run([sys.executable, "-m", "mambart", "convert", str(src), str(tmp_path / "d"),
                        "--quantize", "int4", "--group-size", "32", "--no-progress"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    cfg = json.loads((tmp_path / "d" / "config.json").read_text())
    assert cfg["quantization"]["tensors"]["layers.0.mixer.in_proj.weight"] == "int4"


def _rewrite(model: Path, edit) -> None:
    """Rewrites model.safetensors with edit(dict name -> (dtype, array)) applied."""
    path = model / "model.safetensors"
    hdr = read_safetensors_header(str(path))
    t = {n: (lt.dtype, lt.read()) for n, lt in hdr.items()}
    edit(t)
    entries = sorted(t.items(), key=lambda kv: -kv[1][1].itemsize)
    w = SafetensorsWriter(str(path), [(n, dt, a.shape) for n, (dt, a) in entries])
    for n, (dt, a) in entries:
        w.write(n, a)
    w.close()


def _edit_config(model: Path, edit) -> None:
    p = model / "config.json"
    c = json.loads(p.read_text())
    edit(c)
    p.write_text(json.dumps(c))


@pytest.fixture
def qmodel(tmp_path):
    src = _tiny(tmp_path)
    return Path(convert(src, tmp_path / "q", quantize="int4", int4_group_size=32))


W0 = "layers.0.mixer.out_proj.weight"


def test_bad_scales_missing(qmodel):
    _rewrite(qmodel, lambda t: t.pop(W0 + "_scale"))
    with pytest.raises(ModelLoadError, match=rf"'{W0}' \(quantized int4\).*scales.*missing"):
        mambart.Generator(str(qmodel))


def test_bad_scales_misshapen(qmodel):
    def edit(t):
        dt, a = t[W0 + "_scale"]
        t[W0 + "_scale"] = (dt, a[:, :-1].copy())
    _rewrite(qmodel, edit)
    with pytest.raises(ModelLoadError, match=rf"'{W0}' \(quantized int4\).*scales.*shape"):
        mambart.Generator(str(qmodel))


def test_bad_scales_nan(qmodel):
    def edit(t):
        dt, a = t[W0 + "_scale"]
        a = a.copy()
        a[1, 2] = 0x7FC0  # bfloat16 NaN
        t[W0 + "_scale"] = (dt, a)
    _rewrite(qmodel, edit)
    with pytest.raises(ModelLoadError, match=rf"'{W0}' \(quantized int4\).*NaN"):
        mambart.Generator(str(qmodel))


def test_bad_quantized_data(qmodel):
    def edit(t):
        dt, a = t[W0]
        t[W0] = ("int8", a.view(np.int8))  # int4 data stored as int8
    _rewrite(qmodel, edit)
    with pytest.raises(ModelLoadError, match=rf"'{W0}' \(quantized int4\) holds int8"):
        mambart.Generator(str(qmodel))


def test_bad_unsupported_scheme(qmodel):
    _edit_config(qmodel, lambda c: c["quantization"]["tensors"].__setitem__(W0, "fp8"))
    with pytest.raises(ModelLoadError, match=rf"'{W0}' has scheme \"fp8\".*does not support"):
        mambart.Generator(str(qmodel))


def test_bad_unmarked_integer_tensor(qmodel):
    _edit_config(qmodel, lambda c: c["quantization"]["tensors"].pop(W0))
    with pytest.raises(ModelLoadError, match=rf"'{W0}' holds uint8 data but config.json does "
                                             r"not mark it quantized"):
        mambart.Generator(str(qmodel))


def test_bad_quantization_entries(qmodel):
    _edit_config(qmodel, lambda c: c["quantization"]["tensors"].__setitem__(
        "layers.0.mixer.conv1d.weight", "int8"))
    with pytest.raises(ModelLoadError, match="conv1d.weight' \\(int8\\) is not a weight matrix"):
        mambart.Generator(str(qmodel))
    _edit_config(qmodel, lambda c: c["quantization"]["tensors"].pop("layers.0.mixer.conv1d.weight"))
    _edit_config(qmodel, lambda c: c["quantization"].__setitem__("int4_group_size", 48))
    with pytest.raises(ModelLoadError, match="int4_group_size.*multiple of 32"):
        mambart.Generator(str(qmodel))
    _edit_config(qmodel, lambda c: c["quantization"].__setitem__("int4_group_size", 128))
    with pytest.raises(ModelLoadError, match="not a multiple of int4_group_size 128"):
        mambart.Generator(str(qmodel))


# ---------------------------------------------------------------- accuracy on trained models

def _heldout_texts(n: int = 8, chars: int = 4000):
    """Standard-library files train_demo held out (sha1 of the path = 0 mod 20)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import train_demo

    _, files = train_demo.stdlib_files()
    held = [p for rel, p in files if train_demo.held_out(rel) and p.stat().st_size > chars]
    assert len(held) >= n
    return [p.read_text(encoding="utf-8", errors="replace")[:chars] for p in held[:n]]


def _quant_accuracy():
    """tools/quant_accuracy.py: the perplexity measures of the issue's report, shared here."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import quant_accuracy

    return quant_accuracy


def decode_perplexity(model_dir, texts) -> float:
    """Teacher-forced perplexity through the decode path: each token a one-token step on the
    state of the tokens before it (the GEMV kernels, where prefill runs the GEMM)."""
    return _quant_accuracy().decode_ppl(mambart.Generator(str(model_dir)), texts)


def perplexity(model_dir, texts) -> float:
    return _quant_accuracy().prefill_ppl(mambart.Generator(str(model_dir)), texts)


@pytest.mark.parametrize("demo", ["mambart-demo", "mambart2-demo"])
def test_trained_model_perplexity_bounds(tmp_path, demo):
    """The issue's targets on a trained model: held-out perplexity of int8 within 1% of bf16,
    int4 within 5% (group 128; the Mamba-1 demo's d_model = 192 tensors fall back to int8)."""
    from mambart import hub

    src = hub.bundled_model_dir(demo)
    texts = _heldout_texts()
    base = perplexity(src, texts)
    p8 = perplexity(convert(src, tmp_path / "i8", quantize="int8"), texts)
    p4 = perplexity(convert(src, tmp_path / "i4", quantize="int4"), texts)
    assert base < 100, base  # a trained model (chance is 4096)
    assert abs(p8 / base - 1) < 0.01, (base, p8)
    assert abs(p4 / base - 1) < 0.05, (base, p4)
    assert p4 != base and p8 != base  # the quantized weights are what ran
    # the decode path (GEMV kernels; VNNI: activations rounded to int8) on a shorter text
    short = [texts[0][:1200]]
    d0 = decode_perplexity(src, short)
    d8 = decode_perplexity(tmp_path / "i8", short)
    d4 = decode_perplexity(tmp_path / "i4", short)
    assert abs(d8 / d0 - 1) < 0.01, (d0, d8)
    assert abs(d4 / d0 - 1) < 0.05, (d0, d4)

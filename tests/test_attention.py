"""The attention and MLP layer units (issue 19, items 2-3) on the CPU backend, against the float64
numpy references of tests/attention_ref.py (written from the spec): the attention op (RoPE full
and partial, NoPE, MHA / GQA, sliding window, a cache already holding tokens), whole models of
attention and MLP layers (logits, prefill == decode, batch rows == single runs, state files and
continuation), the context bound, and bad configs named by layer and key."""

from __future__ import annotations

import json

import numpy as np
import pytest

import mambart
from attention_ref import attention_op, model_logits
from mambart import _C
from model_dirs import random_tensor, save_tensors, write_config
from native_checks import (check_batch_rows_equal_single_runs, check_prefill_equals_decode,
                           check_state_save_load_continuation, ids_for)

OPS = _C._ops.Backend("cpu")

# (B, L, Hq, Hkv, hd, rotary_dim, window, n0 per row, max_ctx)
OP_CASES = {
    "mha-nope": (1, 9, 2, 2, 16, 0, 0, [0], 16),
    "gqa-rope": (2, 7, 4, 2, 8, 8, 0, [0, 0], 12),
    "gqa-partial-rope-cached": (2, 5, 6, 2, 24, 12, 0, [3, 11], 20),
    "window-long": (1, 70, 4, 1, 16, 16, 9, [0], 80),
    "window-decode": (3, 1, 4, 4, 20, 10, 5, [0, 7, 40], 48),
    "decode-many-keys": (2, 1, 8, 2, 64, 32, 0, [130, 77], 160),
}


def rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("name", list(OP_CASES))
def test_attention_op_equals_reference(name):
    B, L, Hq, Hkv, hd, rd, win, n0, T = OP_CASES[name]
    qkv = rand(B, L, (Hq + 2 * Hkv) * hd, seed=1)
    kc, vc = rand(B, T, Hkv, hd, seed=2), rand(B, T, Hkv, hd, seed=3)
    pos = np.array(n0, np.float32)
    scale = 0.7 / np.sqrt(hd)
    o, q2, k2, v2, p2 = OPS.attention(qkv, kc, vc, pos, Hq, rd, 500.0, win, scale)
    ro, rk, rv, rp = attention_op(qkv, kc, vc, pos, Hq, rd, 500.0, win, scale)
    assert np.abs(o - ro).max() < 1e-5 * max(1.0, np.abs(ro).max()), name
    np.testing.assert_allclose(k2, rk, atol=2e-5)  # the appended keys, rotated
    np.testing.assert_array_equal(v2, rv)
    np.testing.assert_array_equal(p2, rp)
    # untouched cache rows stay as they were
    for b in range(B):
        np.testing.assert_array_equal(k2[b, n0[b] + L:], kc[b, n0[b] + L:])


def test_attention_op_in_steps_equals_one_call():
    """A prompt in one call == the same tokens in chunks continuing the cache (and pos)."""
    Hq, Hkv, hd, T = 4, 2, 16, 32
    qkv = rand(1, 20, (Hq + 2 * Hkv) * hd, seed=4)
    z = np.zeros((1, T, Hkv, hd), np.float32)
    full = OPS.attention(qkv, z, z, np.zeros(1, np.float32), Hq, 8, 10000.0, 6, 0.25)[0]
    kc, vc, pos, outs = z, z, np.zeros(1, np.float32), []
    for a, b in ((0, 7), (7, 8), (8, 20)):
        o, _, kc, vc, pos = OPS.attention(qkv[:, a:b], kc, vc, pos, Hq, 8, 10000.0, 6, 0.25)
        outs.append(o)
    assert pos[0] == 20
    np.testing.assert_allclose(np.concatenate(outs, 1), full, atol=1e-6)


def test_attention_op_refuses_a_full_cache():
    qkv = rand(1, 3, 4 * 8)
    z = np.zeros((1, 10, 1, 8), np.float32)
    with pytest.raises(ValueError, match=r"max_context = 10 tokens; row 0 has 8 and would need 11"):
        OPS.attention(qkv, z, z, np.array([8], np.float32), 2)


def test_relu_sq_op():
    y = rand(5, 7)
    np.testing.assert_array_equal(OPS.relu_sq(y), np.maximum(y, 0) ** 2)


# ---------------------------------------------------------------- whole models

def attn(Hq=4, Hkv=2, hd=8, rd=0, theta=10000.0, window=0, qkv_bias=False, out_bias=False,
         scale=None, max_context=96, fused=False, d_conv=0):
    return {"type": "attention", "num_heads": Hq, "num_kv_heads": Hkv, "head_dim": hd,
            "rotary_dim": rd, "rope_theta": theta, "window": window, "qkv_bias": qkv_bias,
            "out_bias": out_bias, "scale": hd ** -0.5 if scale is None else scale,
            "max_context": max_context, "fused_qkv": fused, "d_conv": d_conv}


def mlp(I=40, act="relu2", bias=False):
    return {"type": "mlp", "intermediate_size": I, "activation": act, "bias": bias}


def model_config(layers, d=24, V=61, tie=False):
    return {"mambart_format": 1, "architecture": "test_attention", "d_model": d,
            "n_layer": len(layers), "vocab_size": V, "vocab_size_padded": V, "norm": "rmsnorm",
            "norm_eps": 1e-5, "residual_in_fp32": True, "tie_embeddings": tie,
            "bos_token_id": None, "eos_token_id": 0, "pad_token_id": None, "dtype": "float32",
            "layers": layers}


MODELS = {
    # NoPE GQA + relu² (Nemotron-H's kinds)
    "nope-gqa-relu2": [attn(), mlp(), attn(), mlp()],
    # full RoPE, MHA, biases, SwiGLU, tied head
    "rope-mha-bias-swiglu": [attn(Hq=3, Hkv=3, hd=8, rd=8, qkv_bias=True, out_bias=True),
                             mlp(act="swiglu", bias=True)],
    # partial RoPE (half of hd, as Bamba / mamba2attn), sliding window shorter than the prompt,
    # a custom scale (Granite's attention_multiplier)
    # mamba_ssm's MHA (mamba2attn): fused in_proj, a causal conv on qkv (no activation), partial
    # RoPE, biases
    "fused-conv-rope": [attn(Hq=4, Hkv=2, hd=8, rd=4, fused=True, d_conv=4, qkv_bias=True,
                             out_bias=True), mlp(I=20),
                        attn(Hq=2, Hkv=2, hd=12, fused=True, d_conv=3)],
    "partial-rope-window": [attn(Hq=4, Hkv=1, hd=12, rd=6, theta=500.0, window=7, scale=0.2),
                            mlp(I=16), attn(Hq=2, Hkv=2, hd=16, rd=16, window=11)],
}


def make_model(root, name, layers, seed=0):
    c = model_config(layers, tie=name.startswith("rope-mha"))
    spec = _C.config_spec(json.dumps(c), "test")
    rng = np.random.default_rng(seed)
    tensors = {t["name"]: random_tensor(t["name"], tuple(t["shape"]), rng) for t in spec["tensors"]}
    d = root / name
    d.mkdir()
    write_config(d, c)
    save_tensors(d / "model.safetensors", tensors)
    return c, tensors, mambart.Generator(str(d), device="cpu")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("attn_models")
    return {n: make_model(root, n, layers, seed=i) for i, (n, layers) in enumerate(MODELS.items())}


@pytest.mark.parametrize("name", list(MODELS))
def test_model_logits_equal_reference(models, name):
    c, t, g = models[name]
    ids = ids_for(c["vocab_size"], 40, seed=1)
    ref = model_logits(c, t, ids)
    got = g.logits(ids)
    assert np.abs(got - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())


@pytest.mark.parametrize("name", list(MODELS))
def test_model_prefill_equals_decode(models, name):
    c, _, g = models[name]
    check_prefill_equals_decode(g, c["vocab_size"])


@pytest.mark.parametrize("name", list(MODELS))
def test_model_batch_rows_equal_single_runs(models, name):
    c, _, g = models[name]
    check_batch_rows_equal_single_runs(g, c["vocab_size"])


def test_model_state_save_load_continuation(models, tmp_path):
    c, _, g = models["partial-rope-window"]
    check_state_save_load_continuation(g, c["vocab_size"], tmp_path)


def test_context_bound_is_a_clear_error(models):
    c, _, g = models["nope-gqa-relu2"]
    assert g.config["layers"][0]["max_context"] == 96
    with pytest.raises(ValueError, match=r"prompt \+ max_new_tokens needs 100 tokens of context, "
                                         r"but this model's attention layers hold at most "
                                         r"max_context = 96"):
        g.generate(ids_for(c["vocab_size"], 90), max_new_tokens=10)
    with pytest.raises(ValueError, match="token_ids needs 97 tokens"):
        g.logits(ids_for(c["vocab_size"], 97))
    assert len(g.generate(ids_for(c["vocab_size"], 90), max_new_tokens=6,
                          ignore_eos=True).token_ids) == 6  # exactly full: fine


# ---------------------------------------------------------------- bad configs

@pytest.mark.parametrize("entry,key,msg", [
    (attn(Hq=6, Hkv=4), "num_kv_heads", "must divide num_heads = 6"),
    (attn(rd=5), "rotary_dim", "must be even"),
    (attn(hd=8, rd=10), "rotary_dim", "<= head_dim = 8"),
    (attn(scale=0.0), "scale", "must be in (0, 1e6)"),
    (attn(max_context=0), "max_context", "out of range"),
    (mlp(act="gelu"), "activation", "is not supported (relu2, swiglu, geglu)"),
    (attn(d_conv=4), "d_conv", "needs fused_qkv"),
    (attn(fused=True, d_conv=9), "d_conv", "out of range"),
])
def test_bad_layer_config_names_layer_and_key(entry, key, msg):
    c = model_config([mlp(), entry])
    with pytest.raises(ValueError) as ei:
        _C.config_spec(json.dumps(c), "config.json")
    s = str(ei.value)
    assert "layers[1]" in s and f"'{key}'" in s and msg in s, s


def test_missing_and_unknown_attention_keys_are_named():
    e = attn()
    del e["window"]
    with pytest.raises(ValueError, match=r"layers\[0\]: config key 'window' is missing"):
        _C.config_spec(json.dumps(model_config([e])), "config.json")
    with pytest.raises(ValueError, match=r"layers\[0\]: unknown config key 'rope_scaling'"):
        _C.config_spec(json.dumps(model_config([dict(attn(), rope_scaling={})])), "config.json")


def test_state_layout_of_an_attention_model():
    c = model_config([attn(Hkv=2, hd=8, max_context=50), mlp()])
    spec = _C.config_spec(json.dumps(c), "x")
    states = {s["name"]: list(s["shape"]) for s in spec["state"]}
    assert states == {"key_cache": [1, 50, 2, 8], "value_cache": [1, 50, 2, 8], "pos": [1, 1]}, states


def test_speculative_decoding_is_refused_with_attention_layers(models):
    """Speculative verification needs per-token states; the attention unit has none yet."""
    c, _, g = models["nope-gqa-relu2"]
    with pytest.raises(NotImplementedError, match="cannot keep per-token states"):
        g.generate(ids_for(c["vocab_size"], 8), max_new_tokens=4,
                   speculative=dict(method="prompt_lookup", k=3))

"""The MoE layer unit (issue 19, item 4) on the CPU backend, against a float64 numpy reference
written from the formula (cpp/op_params.h MoeParams, cpp/layers/moe/moe.cpp): the op (top-k
routing with both weight normalisations, ties, k = X, a routed scale, bf16 experts), whole models
with MoE layers (logits, prefill == decode, batch rows == single runs, state continuation), the
model multipliers, and bad configs named by layer and key."""

from __future__ import annotations

import json

import numpy as np
import pytest

import mambart
from attention_ref import model_logits
from mambart import _C
from model_dirs import random_tensor, save_tensors, write_config
from native_checks import (check_batch_rows_equal_single_runs, check_prefill_equals_decode,
                           check_state_save_load_continuation, ids_for)

OPS = _C._ops.Backend("cpu")


def rand(*shape, seed=0, scale=1.0):
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def route_ref(logits, k, normalize):
    """(ids (R, k), weights (R, k)) in float64: the k largest logits, descending, ties to the
    lower id (a stable sort of the negated logits)."""
    lg = np.asarray(logits, np.float64)
    ids = np.argsort(-lg, axis=1, kind="stable")[:, :k]
    sel = np.take_along_axis(lg, ids, 1)
    m = lg.max(1, keepdims=True)
    z = np.exp(sel - m).sum(1, keepdims=True) if normalize else np.exp(lg - m).sum(1, keepdims=True)
    return ids, np.exp(sel - m) / z


def experts_ref(x, ids, w, w_in, w_out, I, scale=1.0):
    """Σ_j w_j · W_out[e_j] (silu(W_gate[e_j] x) * (W_up[e_j] x)) per row, float64."""
    x = np.asarray(x, np.float64)
    out = np.zeros_like(x)
    for r in range(x.shape[0]):
        for j, e in enumerate(ids[r]):
            gu = np.asarray(w_in[e], np.float64) @ x[r]
            g, u = gu[:I], gu[I:]
            out[r] += scale * w[r, j] * (np.asarray(w_out[e], np.float64) @ (g / (1 + np.exp(-g)) * u))
    return out


# (R, d, X, k, I, normalize, scale)
OP_CASES = {
    "decode-renorm": (1, 16, 6, 2, 12, True, 1.0),
    "prefill-renorm": (23, 16, 6, 3, 12, True, 1.0),
    "prefill-full-softmax-scaled": (17, 24, 8, 2, 10, False, 2.5),
    "k1": (9, 8, 4, 1, 6, True, 1.0),
    "k-equals-X": (5, 8, 3, 3, 5, False, 1.0),
}


@pytest.mark.parametrize("name", list(OP_CASES))
def test_moe_op_equals_reference(name):
    R, d, X, k, I, normalize, scale = OP_CASES[name]
    x = rand(R, d, seed=1)
    logits = rand(R, X, seed=2)
    w_in, w_out = rand(X, 2 * I, d, seed=3, scale=0.3), rand(X, d, I, seed=4, scale=0.3)
    out0 = rand(R, d, seed=5)
    out, route = OPS.moe(x, logits, w_in.reshape(X, -1), w_out.reshape(X, -1), "float32", k, I,
                         normalize, scale, out0)
    ids, w = route_ref(logits, k, normalize)
    np.testing.assert_array_equal(route[:, :k].view(np.int32), ids)
    np.testing.assert_allclose(route[:, k:], w, rtol=1e-6, atol=1e-7)
    ref = out0 + experts_ref(x, ids, w, w_in, w_out, I, scale)
    assert np.abs(out - ref).max() < 1e-5 * max(1.0, np.abs(ref).max())


def test_moe_op_ties_go_to_the_lower_expert():
    R, d, X, k, I = 3, 8, 6, 2, 4
    logits = np.array([[1, 3, 3, 0, 3, 2], [0, 0, 0, 0, 0, 0], [5, -1, 5, 5, 4, 5]], np.float32)
    x = rand(R, d)
    w_in, w_out = rand(X, 2 * I, d, seed=1), rand(X, d, I, seed=2)
    _, route = OPS.moe(x, logits, w_in.reshape(X, -1), w_out.reshape(X, -1), "float32", k, I,
                       True, 1.0, np.zeros((R, d), np.float32))
    assert route[:, :k].view(np.int32).tolist() == [[1, 2], [0, 1], [0, 2]]
    np.testing.assert_array_equal(route[:, k:], np.full((R, k), 0.5, np.float32))


def test_moe_op_bf16_experts_equal_rounded_fp32():
    R, d, X, k, I = 7, 32, 4, 2, 16
    x, logits = rand(R, d, seed=1), rand(R, X, seed=2)
    w_in, w_out = rand(X, 2 * I * d, seed=3, scale=0.2), rand(X, d * I, seed=4, scale=0.2)

    def bf16(a):  # round to nearest even, as the placement does
        u = a.view(np.uint32).astype(np.uint64)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        return u.astype(np.uint32).view(np.float32)

    z = np.zeros((R, d), np.float32)
    got, _ = OPS.moe(x, logits, w_in, w_out, "bfloat16", k, I, True, 1.0, z)
    ref, _ = OPS.moe(x, logits, bf16(w_in), bf16(w_out), "float32", k, I, True, 1.0, z)
    assert np.abs(got - ref).max() < 1e-5 * max(1.0, np.abs(ref).max())


def test_scale_op():
    y = rand(37)
    np.testing.assert_array_equal(OPS.scale(y, 0.375), y * np.float32(0.375))


# ---------------------------------------------------------------- whole models

def moe(X=6, k=2, I=12, S=16, normalize=True, routed_scale=1.0):
    return {"type": "moe", "num_experts": X, "top_k": k, "intermediate_size": I,
            "shared_intermediate_size": S, "activation": "swiglu", "normalize": normalize,
            "routed_scale": routed_scale}


def attn(Hq=4, Hkv=2, hd=8):
    return {"type": "attention", "num_heads": Hq, "num_kv_heads": Hkv, "head_dim": hd,
            "rotary_dim": 0, "rope_theta": 10000.0, "window": 0, "qkv_bias": False,
            "out_bias": False, "scale": hd ** -0.5, "max_context": 96, "fused_qkv": False,
            "d_conv": 0}


def model_config(layers, d=24, V=61, **model):
    c = {"mambart_format": 1, "architecture": "test_moe", "d_model": d, "n_layer": len(layers),
         "vocab_size": V, "vocab_size_padded": V, "norm": "rmsnorm", "norm_eps": 1e-5,
         "residual_in_fp32": True, "tie_embeddings": False, "bos_token_id": None,
         "eos_token_id": 0, "pad_token_id": None, "dtype": "float32", "layers": layers}
    c.update(model)
    return c


MODELS = {
    # Granite's routing (softmax over the selected) with a shared expert, after attention
    "renorm-shared": ([attn(), moe(), moe(X=5, k=3, I=8, S=20)], {}),
    # the full softmax's top-k (Jamba), a routed scale, no shared expert; Granite's multipliers
    "softmax-scaled-multipliers": ([moe(X=4, k=2, I=10, S=0, normalize=False, routed_scale=2.5),
                                    attn(Hq=2, Hkv=1, hd=12), moe(X=3, k=1, I=16, S=0)],
                                   {"embedding_multiplier": 3.0, "residual_multiplier": 0.5,
                                    "logits_scaling": 2.5}),
}


def moe_layer_ref(lc, T, p, u):
    X, k, I = lc["num_experts"], lc["top_k"], lc["intermediate_size"]
    logits = u @ T[p + "router.weight"].T
    ids, w = route_ref(logits, k, lc["normalize"])
    y = experts_ref(u, ids, w, T[p + "experts.input_linear.weight"],
                    T[p + "experts.output_linear.weight"], I, lc["routed_scale"])
    S = lc["shared_intermediate_size"]
    if S:
        gu = u @ T[p + "shared.input_linear.weight"].T
        g, up = gu[:, :S], gu[:, S:]
        y = y + (g / (1 + np.exp(-g)) * up) @ T[p + "shared.output_linear.weight"].T
    return y


def reference_logits(c, t, ids):
    T = {k: np.asarray(v, np.float64) for k, v in t.items()}
    em, rm, ls = (c.get("embedding_multiplier", 1.0), c.get("residual_multiplier", 1.0),
                  c.get("logits_scaling", 1.0))
    # The multipliers as scalings of the references' inputs: the embedding rows scaled (the head
    # is untied), each layer's output scaled, the head divided.
    T2 = dict(T)
    T2["embedding.weight"] = T["embedding.weight"] * em
    T2["lm_head.weight"] = T["lm_head.weight"] / ls

    def other(i, u):
        return moe_layer_ref(c["layers"][i], T, f"layers.{i}.mixer.", u)

    if rm == 1.0:
        return model_logits(c, T2, ids, other)
    # residual multiplier: scale every layer's output projection (attention o_proj, MoE outputs)
    for i, lc in enumerate(c["layers"]):
        p = f"layers.{i}.mixer."
        for name in ("o_proj.weight", "experts.output_linear.weight",
                     "shared.output_linear.weight"):
            if p + name in T2:
                T2[p + name] = T2[p + name] * rm
    return model_logits(c, T2, ids, lambda i, u: moe_layer_ref(c["layers"][i], T2,
                                                               f"layers.{i}.mixer.", u))


def make_model(root, name, layers, model, seed=0):
    c = model_config(layers, **model)
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
    root = tmp_path_factory.mktemp("moe_models")
    return {n: make_model(root, n, layers, model, seed=i)
            for i, (n, (layers, model)) in enumerate(MODELS.items())}


@pytest.mark.parametrize("name", list(MODELS))
def test_model_logits_equal_reference(models, name):
    c, t, g = models[name]
    ids = ids_for(c["vocab_size"], 40, seed=1)
    ref = reference_logits(c, t, ids)
    got = g.logits(ids)
    assert np.abs(got - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())


def test_multipliers_change_the_logits(models, tmp_path):
    """The model multipliers are read (not a reference that ignores them as the runtime does)."""
    c, t, g = models["softmax-scaled-multipliers"]
    plain = {k: v for k, v in c.items() if not k.endswith(("multiplier", "scaling"))}
    d = tmp_path / "plain"
    d.mkdir()
    write_config(d, plain)
    save_tensors(d / "model.safetensors", t)
    ids = ids_for(c["vocab_size"], 20, seed=3)
    a, b = g.logits(ids), mambart.Generator(str(d), device="cpu").logits(ids)
    assert np.abs(a - b).max() > 1e-2 * np.abs(b).max()
    assert g.config["logits_scaling"] == 2.5 and "logits_scaling" not in \
        mambart.Generator(str(d), device="cpu").config


@pytest.mark.parametrize("name", list(MODELS))
def test_model_prefill_equals_decode(models, name):
    c, _, g = models[name]
    check_prefill_equals_decode(g, c["vocab_size"])


@pytest.mark.parametrize("name", list(MODELS))
def test_model_batch_rows_equal_single_runs(models, name):
    c, _, g = models[name]
    check_batch_rows_equal_single_runs(g, c["vocab_size"])


def test_model_state_save_load_continuation(models, tmp_path):
    c, _, g = models["renorm-shared"]
    check_state_save_load_continuation(g, c["vocab_size"], tmp_path)


# ---------------------------------------------------------------- bad configs

@pytest.mark.parametrize("entry,key,msg", [
    (moe(X=4, k=5), "top_k", "exceeds num_experts = 4"),
    (moe(k=33, X=40), "top_k", "out of range"),
    (moe(X=0), "num_experts", "out of range"),
    (dict(moe(), activation="relu2"), "activation", "is not supported (swiglu)"),
    (moe(routed_scale=0.0), "routed_scale", "must be in (0, 1e6)"),
    (moe(S=-1), "shared_intermediate_size", "out of range"),
])
def test_bad_layer_config_names_layer_and_key(entry, key, msg):
    c = model_config([attn(), entry])
    with pytest.raises(ValueError) as ei:
        _C.config_spec(json.dumps(c), "config.json")
    s = str(ei.value)
    assert "layers[1]" in s and f"'{key}'" in s and msg in s, s


@pytest.mark.parametrize("key", ["embedding_multiplier", "residual_multiplier",
                                 "logits_scaling"])
def test_bad_multiplier_is_named(key):
    for bad in (0.0, -1.0, "2"):
        with pytest.raises(ValueError, match=f"'{key}'"):
            _C.config_spec(json.dumps(model_config([moe()], **{key: bad})), "config.json")


def test_expert_tensor_of_the_wrong_shape_is_named(models, tmp_path):
    c, t, _ = models["renorm-shared"]
    d = tmp_path / "bad"
    d.mkdir()
    write_config(d, c)
    bad = dict(t)
    bad["layers.1.mixer.experts.input_linear.weight"] = np.zeros((6, 12, 24), np.float32)
    save_tensors(d / "model.safetensors", bad)
    with pytest.raises(mambart.ModelLoadError, match=r"layers\.1\.mixer\.experts\.input_linear"):
        mambart.Generator(str(d), device="cpu")

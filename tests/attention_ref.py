"""Float64 numpy references of the attention and MLP layer units (written from the spec,
../shared/spec/hybrids.md §1.3, and cpp/op_params.h's AttentionParams formula), independent of
the runtime: the attention op with its KV cache, and a whole model of `layers` entries of types
attention / mlp (pre-norm residual blocks, RMSNorm, final norm, head)."""

from __future__ import annotations

import numpy as np


def rope(x, n, rd, theta):
    """Rotate-half RoPE of head vectors x (..., hd) at position n on the first rd dims."""
    if rd == 0:
        return x
    half = rd // 2
    inv = 1.0 / theta ** (np.arange(half, dtype=np.float64) * 2 / rd)
    c, s = np.cos(n * inv), np.sin(n * inv)
    out = x.copy()
    a, b = x[..., :half], x[..., half:rd]
    out[..., :half] = a * c - b * s
    out[..., half:rd] = b * c + a * s
    return out


def attention_op(qkv, k_cache, v_cache, pos, Hq, rd=0, theta=10000.0, window=0, scale=None):
    """AttentionParams' formula: returns (o (B, L, Hq hd), k_cache, v_cache, pos) in float64."""
    qkv = np.asarray(qkv, np.float64)
    kc, vc = np.array(k_cache, np.float64), np.array(v_cache, np.float64)
    B, L, _ = qkv.shape
    Hkv, hd = kc.shape[2], kc.shape[3]
    scale = hd ** -0.5 if scale is None else scale
    g = Hq // Hkv
    o = np.zeros((B, L, Hq, hd))
    pos_out = np.array(pos, np.float64)
    for b in range(B):
        n0 = int(pos[b])
        q = qkv[b, :, :Hq * hd].reshape(L, Hq, hd)
        k = qkv[b, :, Hq * hd:(Hq + Hkv) * hd].reshape(L, Hkv, hd)
        v = qkv[b, :, (Hq + Hkv) * hd:].reshape(L, Hkv, hd)
        for t in range(L):
            q[t] = rope(q[t], n0 + t, rd, theta)
            kc[b, n0 + t] = rope(k[t], n0 + t, rd, theta)
            vc[b, n0 + t] = v[t]
        for t in range(L):
            n = n0 + t
            lo = max(0, n - window + 1) if window > 0 else 0
            for h in range(Hq):
                j = h // g
                s = kc[b, lo:n + 1, j] @ q[t, h] * scale
                w = np.exp(s - s.max())
                o[b, t, h] = (w / w.sum()) @ vc[b, lo:n + 1, j]
        pos_out[b] = n0 + L
    return o.reshape(B, L, Hq * hd), kc, vc, pos_out


def causal_conv(x, w, b):
    """Depthwise causal conv over time, no activation: x (L, C), w (C, W), b (C)."""
    L, W = x.shape[0], w.shape[1]
    xp = np.concatenate([np.zeros((W - 1, x.shape[1])), x], 0)
    return np.stack([(xp[t:t + W] * w.T).sum(0) for t in range(L)]) + b


def rmsnorm(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def model_logits(cfg: dict, t: dict, ids, other=None):
    """Logits (L, V) of a model whose layers are attention / mlp entries, for one sequence.
    other(i, u) -> y: the output of layer i of any other type for its normed input u (L, d)."""
    T = {k: np.asarray(v, np.float64) for k, v in t.items()}
    eps = cfg["norm_eps"]
    h = T["embedding.weight"][ids]
    L = len(ids)
    for i, lc in enumerate(cfg["layers"]):
        p = f"layers.{i}.mixer."
        u = rmsnorm(h, T[f"layers.{i}.norm.weight"], eps)
        if lc["type"] == "attention":
            Hq, Hkv, hd = lc["num_heads"], lc["num_kv_heads"], lc["head_dim"]
            def proj(name):
                y = u @ T[p + name + ".weight"].T
                return y + T[p + name + ".bias"] if lc["qkv_bias"] else y
            if lc["fused_qkv"]:
                qkv = proj("in_proj")
                if lc["d_conv"]:
                    qkv = causal_conv(qkv, T[p + "conv1d.weight"][:, 0, :], T[p + "conv1d.bias"])
                qkv = qkv[None]
            else:
                qkv = np.concatenate([proj("q_proj"), proj("k_proj"), proj("v_proj")], -1)[None]
            kc = np.zeros((1, L, Hkv, hd))
            o, _, _, _ = attention_op(qkv, kc, kc.copy(), [0], Hq, lc["rotary_dim"],
                                      lc["rope_theta"], lc["window"], lc["scale"])
            out = "out_proj" if lc["fused_qkv"] else "o_proj"
            y = o[0] @ T[p + out + ".weight"].T
            if lc["out_bias"]:
                y = y + T[p + out + ".bias"]
        elif lc["type"] == "mlp":
            def lin(name, x):
                y = x @ T[p + name + ".weight"].T
                return y + T[p + name + ".bias"] if lc["bias"] else y
            up = lin("up_proj", u)
            if lc["activation"] == "swiglu":
                gt = lin("gate_proj", u)
                a = gt / (1 + np.exp(-gt)) * up
            else:
                a = np.maximum(up, 0) ** 2
            y = lin("down_proj", a)
        elif other is not None:
            y = np.asarray(other(i, u), np.float64)
        else:
            raise ValueError(lc["type"])
        h = h + y
    h = rmsnorm(h, T["norm_f.weight"], eps)
    head = T["embedding.weight"] if cfg["tie_embeddings"] else T["lm_head.weight"]
    return h @ head[: cfg["vocab_size"]].T

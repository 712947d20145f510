"""Tiny valid mambart model directories, built directly (no converter, no torch).

`make_model_dir(path, arch="mamba1" | "mamba2", dtype=..., **config_overrides)` writes
config.json (docs/format.md, schema v1) and model.safetensors with random weights of sensible
scale. `config_dict` and `model_tensors` give the pieces so a test can break one of them, and
`write_safetensors` writes any {name: (st_dtype, shape, raw bytes)} with full control over the
header, so tests can build lying files. float32/float16 files go through the `safetensors`
package's numpy API; bfloat16 (which numpy lacks) through the raw writer, with the bits rounded
from float32 here.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np

TINY_M1 = dict(
    mambart_format=1, architecture="mamba1", d_model=16, n_layer=2, vocab_size=100,
    vocab_size_padded=104, d_inner=32, d_state=6, d_conv=4, conv_bias=True, bias=False,
    dt_rank=3, headdim=0, nheads=0, ngroups=1, chunk_size=0, dt_limit=[0.0, None],
    gated_norm=False, norm_before_gate=False, norm="rmsnorm", norm_eps=1e-5,
    residual_in_fp32=True, tie_embeddings=True, bos_token_id=0, eos_token_id=1,
    pad_token_id=None, dtype="float32",
)

TINY_M2 = dict(
    mambart_format=1, architecture="mamba2", d_model=16, n_layer=2, vocab_size=100,
    vocab_size_padded=104, d_inner=32, d_state=8, d_conv=4, conv_bias=True, bias=False,
    dt_rank=0, headdim=8, nheads=4, ngroups=2, chunk_size=8, dt_limit=[0.0, None],
    gated_norm=True, norm_before_gate=False, norm="rmsnorm", norm_eps=1e-5,
    residual_in_fp32=True, tie_embeddings=True, bos_token_id=0, eos_token_id=1,
    pad_token_id=None, dtype="float32",
)

ST_DTYPE = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
_SMALL = ("A_log", "D", "dt_bias", "dt_proj.bias")  # kept in float32 whatever dtype says


def config_dict(arch: str = "mamba1", **overrides) -> dict:
    base = dict(TINY_M1 if arch == "mamba1" else TINY_M2)
    base.update(overrides)
    return base


def listed_mamba1(c: dict, architecture: str, **entry) -> dict:
    """Flat mamba1 config `c` in the listed form: `architecture`, every layer a mamba1 entry
    with `c`'s layer fields and `entry` (e.g. Falcon's dt_bc_rms_eps)."""
    c = dict(c)
    layer = {k: c.pop(k) for k in ("d_inner", "d_state", "d_conv", "conv_bias", "bias",
                                    "dt_rank")}
    for k in ("headdim", "nheads", "ngroups", "chunk_size", "dt_limit", "gated_norm",
              "norm_before_gate"):
        c.pop(k)
    c["architecture"] = architecture
    c["layers"] = [dict(layer, type="mamba1", **entry) for _ in range(c["n_layer"])]
    return c


def tensor_shapes(c: dict) -> Dict[str, Tuple[int, ...]]:
    """The canonical tensor names and shapes a config implies (docs/format.md)."""
    d, E, N, W = c["d_model"], c["d_inner"], c["d_state"], c["d_conv"]
    Vp = c["vocab_size_padded"]
    m2 = c["architecture"] == "mamba2"
    G, H = c["ngroups"], c["nheads"]
    conv_dim = E + 2 * G * N if m2 else E
    d_in_proj = 2 * E + 2 * G * N + H if m2 else 2 * E
    ln = c["norm"] == "layernorm"
    s = {"embedding.weight": (Vp, d), "norm_f.weight": (d,)}
    if ln:
        s["norm_f.bias"] = (d,)
    if not c["tie_embeddings"]:
        s["lm_head.weight"] = (Vp, d)
    for i in range(c["n_layer"]):
        p, m = f"layers.{i}.", f"layers.{i}.mixer."
        s[p + "norm.weight"] = (d,)
        if ln:
            s[p + "norm.bias"] = (d,)
        s[m + "in_proj.weight"] = (d_in_proj, d)
        if c["bias"]:
            s[m + "in_proj.bias"] = (d_in_proj,)
        s[m + "conv1d.weight"] = (conv_dim, 1, W)
        if c["conv_bias"]:
            s[m + "conv1d.bias"] = (conv_dim,)
        if m2:
            s[m + "dt_bias"] = (H,)
            s[m + "A_log"] = (H,)
            s[m + "D"] = (H,)
            if c["gated_norm"]:
                s[m + "norm.weight"] = (E,)
        else:
            s[m + "x_proj.weight"] = (c["dt_rank"] + 2 * N, E)
            s[m + "dt_proj.weight"] = (E, c["dt_rank"])
            s[m + "dt_proj.bias"] = (E,)
            s[m + "A_log"] = (E, N)
            s[m + "D"] = (E,)
        s[m + "out_proj.weight"] = (d, E)
        if c["bias"]:
            s[m + "out_proj.bias"] = (d,)
    return s


def random_tensor(name: str, shape: Tuple[int, ...], rng) -> np.ndarray:
    """A random float32 tensor of a sensible scale for a tensor of that name."""
    if name.endswith("A_log"):
        if len(shape) == 2:  # mamba1: A = -(1..N) per channel
            a = np.tile(np.arange(1, shape[1] + 1, dtype=np.float32), (shape[0], 1))
        else:
            a = rng.uniform(1, 16, size=shape).astype(np.float32)
        v = np.log(a)
    elif name.endswith(".D"):
        v = np.ones(shape, np.float32)
    elif name.endswith("dt_bias") or name.endswith("dt_proj.bias"):
        dt = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), size=shape))
        v = dt + np.log(-np.expm1(-dt))  # inverse softplus
    elif name.endswith("norm.weight") or name.endswith("norm_f.weight"):
        v = np.ones(shape, np.float32) + 0.1 * rng.standard_normal(shape)
    elif name.endswith(".bias"):
        v = 0.02 * rng.standard_normal(shape)
    else:
        fan_in = shape[-1] if len(shape) > 1 else 1
        v = rng.standard_normal(shape) / np.sqrt(max(fan_in, 1))
    return np.ascontiguousarray(v, dtype=np.float32)


def model_tensors(c: dict, seed: int = 0) -> Dict[str, np.ndarray]:
    """Random float32 weights of a sensible scale for config `c`."""
    rng = np.random.default_rng(seed)
    return {name: random_tensor(name, shape, rng) for name, shape in tensor_shapes(c).items()}


def bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even."""
    u = np.ascontiguousarray(a, np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return u.astype(np.uint16)


def encode(a: np.ndarray, dtype: str) -> Tuple[str, Tuple[int, ...], bytes]:
    """(safetensors dtype string, shape, little-endian bytes) of float32 array `a` in `dtype`."""
    if dtype == "float32":
        return "F32", a.shape, a.astype("<f4").tobytes()
    if dtype == "float16":
        return "F16", a.shape, a.astype("<f2").tobytes()
    if dtype == "bfloat16":
        return "BF16", a.shape, bf16_bits(a).astype("<u2").tobytes()
    raise ValueError(dtype)


def write_safetensors(path, entries: Dict[str, Tuple[str, Tuple[int, ...], bytes]],
                      metadata: Optional[dict] = None, header_override: Optional[dict] = None,
                      header_len_override: Optional[int] = None, pad_header: bool = True) -> None:
    """Writes a safetensors file by hand: tensors laid out in the given order, back to back.

    header_override replaces the computed header dict (for lying files); header_len_override
    replaces the 8-byte length field.
    """
    header, pos, blobs = {}, 0, []
    for name, (dt, shape, raw) in entries.items():
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [pos, pos + len(raw)]}
        pos += len(raw)
        blobs.append(raw)
    if metadata is not None:
        header["__metadata__"] = metadata
    if header_override is not None:
        header = header_override
    hb = json.dumps(header, separators=(",", ":")).encode()
    if pad_header:
        hb += b" " * (-len(hb) % 8)
    n = len(hb) if header_len_override is None else header_len_override
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", n))
        f.write(hb)
        for b in blobs:
            f.write(b)


def save_tensors(path, tensors: Dict[str, np.ndarray], dtype: str = "float32") -> None:
    """Writes float32 arrays as a model.safetensors in `dtype` (small params stay float32)."""
    if dtype in ("float32", "float16"):
        from safetensors.numpy import save_file

        np_dt = np.float32 if dtype == "float32" else np.float16
        save_file({k: (v if k.endswith(_SMALL) else v.astype(np_dt)) for k, v in tensors.items()},
                  str(path))
        return
    entries = {k: encode(v, "float32" if k.endswith(_SMALL) else dtype)
               for k, v in tensors.items()}
    write_safetensors(path, entries)


def write_config(d, c: dict) -> None:
    Path(d, "config.json").write_text(json.dumps(c, indent=1))


def make_model_dir(path, arch: str = "mamba1", dtype: str = "float32", seed: int = 0,
                   tensors: Optional[Dict[str, np.ndarray]] = None, **overrides) -> Path:
    """A complete tiny model directory at `path` (created). Returns the path."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    c = config_dict(arch, dtype=dtype, **overrides)
    write_config(path, c)
    save_tensors(path / "model.safetensors",
                 model_tensors(c, seed) if tensors is None else tensors, dtype)
    return path

"""Checkpoint conversion into the mambart model directory (docs/format.md), without torch.

Sources:
- Hugging Face transformers (`MambaForCausalLM`, `Mamba2ForCausalLM`, `FalconMambaForCausalLM`,
  as written by `save_pretrained`): `config.json` with `model_type` "mamba" / "mamba2" /
  "falcon_mamba" and `model.safetensors`, sharded safetensors with
  `model.safetensors.index.json`, or `pytorch_model.bin` (sharded with
  `pytorch_model.bin.index.json`).
- state-spaces (`mamba_ssm`, `MambaLMHeadModel`): `config.json` with d_model / n_layer / ssm_cfg
  keys and a torch-pickled `pytorch_model.bin`, read by a restricted unpickler (_torchzip).
- Mistral's native Mamba-2 layout (Mamba-Codestral): `params.json` with mistral-inference's
  MambaArgs keys and `consolidated.safetensors`.
- a mambart directory (to change its dtype).

The conversion streams: tensor by tensor, in chunks, so peak memory is a few chunks, not the
model. Every shape is checked against the config before anything is written; the output is
written into a temporary directory next to `dst` and renamed into place at the end.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ._tensorio import (CHUNK_ELEMS, FLOAT_DTYPES, OUT_DTYPES, LazyTensor, LoraTensor,
                        SafetensorsWriter, StackedTensor,
                        WeightSet, convert_chunk, read_safetensors_header, to_float32)
from ._files import (_UMASK, MAX_JSON_BYTES, MAX_TOKENIZER_BYTES, check_not_nested,
                     read_bounded, read_bounded_text, write_atomic)
from ._quant import quantize as quantize_matrix
from .errors import ConversionError

CONVERTER_VERSION = "mambart-convert 1"
FORMAT_VERSION = 1

__all__ = ["convert", "ConversionError", "read_source", "open_weights", "load_json"]


# ---------------------------------------------------------------- helpers

def _special_floats(obj: dict):
    # transformers >= 5 writes non-finite floats as {"__float__": "Infinity"}.
    if len(obj) == 1 and isinstance(obj.get("__float__"), str):
        try:
            return float(obj["__float__"])
        except ValueError:
            return obj
    return obj


def load_json(path: Path) -> dict:
    """Reads a JSON object. Accepts the bare Infinity/NaN tokens Python's writer emits (older
    HF Mamba-2 configs hold `time_step_limit: [0.0, Infinity]`) and transformers 5's
    `{"__float__": "Infinity"}` encoding."""
    text = read_bounded_text(path, MAX_JSON_BYTES, "JSON file", ConversionError)
    try:
        obj = json.loads(text, object_hook=_special_floats)
    except ValueError as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ConversionError(f"{path}: not a JSON object")
    return obj


def _plain_name(fname, index_path) -> str:
    if not isinstance(fname, str) or not fname or "/" in fname or "\\" in fname \
            or fname in (".", ".."):
        raise ConversionError(f"{index_path}: weight_map names an invalid file {fname!r}")
    return fname


def open_weights(src: Path) -> WeightSet:
    """Finds the weights of a checkpoint directory; returns lazy tensors by name."""
    st_index = src / "model.safetensors.index.json"
    st_single = src / "model.safetensors"
    pt_index = src / "pytorch_model.bin.index.json"
    pt_single = src / "pytorch_model.bin"
    if st_index.is_file() or st_single.is_file():
        kind = "safetensors"
        index, single = st_index, st_single
    elif pt_index.is_file() or pt_single.is_file():
        kind = "pytorch"
        index, single = pt_index, pt_single
    else:
        found = sorted(p.name for p in src.iterdir()) if src.is_dir() else []
        raise ConversionError(
            f"{src}: no weights found (expected model.safetensors, "
            f"model.safetensors.index.json, pytorch_model.bin or pytorch_model.bin.index.json; "
            f"the directory holds {found or 'nothing'})")

    def load_file(path: Path) -> Dict[str, LazyTensor]:
        if not path.is_file():
            raise ConversionError(f"{path}: weight file is missing")
        if kind == "safetensors":
            return read_safetensors_header(str(path))
        from ._torchzip import load_torch_checkpoint

        return load_torch_checkpoint(str(path))

    if index.is_file():
        idx = load_json(index)
        wm = idx.get("weight_map")
        if not isinstance(wm, dict) or not wm:
            raise ConversionError(f"{index}: no 'weight_map' object")
        shards: Dict[str, List[str]] = {}
        for name, fname in wm.items():
            shards.setdefault(_plain_name(fname, index), []).append(name)
        tensors: Dict[str, LazyTensor] = {}
        files = []
        for fname, names in sorted(shards.items()):
            path = src / fname
            files.append(str(path))
            got = load_file(path)
            for name in names:
                if name not in got:
                    raise ConversionError(f"{path}: tensor '{name}' is missing (the index "
                                          f"{index.name} places it in this shard)")
            for name, t in got.items():
                if wm.get(name) != fname:
                    raise ConversionError(f"{path}: tensor '{name}' is not listed for this shard "
                                          f"in {index.name}")
                tensors[name] = t
        return WeightSet(tensors, files, kind)
    return WeightSet(load_file(single), [str(single)], kind)


def _pad(v: int, m: int) -> int:
    return v + ((m - v % m) % m) if m > 1 else v


MAX_DIM = 1 << 24  # the runtime's bound on every size (and n_layer <= 4096)


def _int(cfg: dict, key: str, where: str, default=None, lo: int = 1, hi: int = MAX_DIM) -> int:
    v = cfg.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ConversionError(f"{where}: config key '{key}' must be an integer in [{lo}, {hi}], "
                              f"got {str(v)[:40]}")
    return v


def _bool(cfg: dict, key: str, where: str, default=None) -> bool:
    v = cfg.get(key, default)
    if not isinstance(v, bool):
        raise ConversionError(f"{where}: config key '{key}' must be true or false, got {v!r}")
    return v


def _opt_id(v, where: str, key: str):
    if isinstance(v, list):  # transformers allows lists of eos ids; we keep the first
        v = v[0] if v else None
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ConversionError(f"{where}: config key '{key}' must be a token id or null, got {v!r}")
    return v


def _mamba2_entry(E: int, H: int, G: int, d_state: int, d_conv: int, conv_bias: bool,
                  bias: bool, chunk_size: int, dt_limit, **extra) -> dict:
    """A mamba2 layer of a mambart config for the HF hybrids' Mamba-2 mixers (d_inner E in H
    heads and G groups; a gated RMSNorm after the gate), from values their configs give under
    their own keys; `extra`: the family's other fields."""
    return {"type": "mamba2", "d_inner": E, "d_state": d_state, "d_conv": d_conv,
            "conv_bias": conv_bias, "bias": bias, "headdim": E // H, "nheads": H, "ngroups": G,
            "chunk_size": chunk_size, "dt_limit": dt_limit, "gated_norm": True,
            "norm_before_gate": False, **extra}


def _dt_limit(v, where: str, key: str):
    if not isinstance(v, (list, tuple)) or len(v) != 2 or \
            not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        raise ConversionError(f"{where}: config key '{key}' must be [min, max], got {v!r}")
    lo, hi = float(v[0]), float(v[1])
    if not (lo >= 0.0 and hi > lo) or math.isnan(hi):
        raise ConversionError(f"{where}: config key '{key}' = {v!r} must satisfy 0 <= min < max")
    return [lo, None if math.isinf(hi) else hi]


# ---------------------------------------------------------------- source formats

@dataclass
class Source:
    """A parsed checkpoint: our config (without dtype/source) and the name mapping."""

    fmt: str                         # "transformers", "state-spaces", "mistral" or "mambart"
    config: dict                     # mambart config keys
    prefix: str = ""                 # source name = prefix + canonical name, except:
    emb: str = "embedding.weight"    # the source name of the embedding
    head: str = "lm_head.weight"     # the source name of an untied head
    optional_tied: Optional[str] = None  # source name of an lm_head to drop when tied
    notes: List[str] = field(default_factory=list)
    ignored: Tuple[str, ...] = ()    # source-name prefixes not loaded (e.g. Nemotron-H's "mtp.")
    rename: Optional[Callable[[str], str]] = None  # canonical -> source name, where not a prefix
    # canonical name -> the source tensors stacked into it (row blocks, in order; Jamba's
    # per-expert matrices); source_name then gives a description of them.
    stacked: Dict[str, List[str]] = field(default_factory=dict)
    # canonical name -> (W, A, B) source names: the tensor written is W + B·A (a LoRA adapter
    # merged into its weight: Zamba2's per-occurrence adapters of a shared block).
    lora: Dict[str, Tuple[str, str, str]] = field(default_factory=dict)
    # source name -> the source tensor it is a tied copy of (accepted when equal, not loaded),
    # or None; e.g. the later occurrences of Zamba2's shared blocks where a file repeats them.
    tied_copy: Optional[Callable[[str], Optional[str]]] = None

    def source_name(self, canon: str) -> str:
        if canon in self.lora:
            return self.lora[canon][0]
        if canon in self.stacked:
            parts = self.stacked[canon]
            return f"{parts[0]}' ... '{parts[-1]}" if len(parts) > 1 else parts[0]
        if self.rename is not None:
            return self.rename(canon)
        if canon == "embedding.weight":
            return self.emb
        if canon == "lm_head.weight":
            return self.head
        return self.prefix + canon


def _base_config(arch: str) -> dict:
    return {"mambart_format": FORMAT_VERSION, "architecture": arch}


def config_spec(cfg: dict, where: str) -> dict:
    """The runtime's reading of a mambart config (flat or with a `layers` list): the C++ config
    reader and layer units (_C.config_spec) validate it and give every tensor it implies
    ({name, shape, matrix, store_fp32}, in load order), its state tensors and its layers. The one
    source of tensor names: the converter only maps source names onto these."""
    from . import _C

    c = dict(cfg)
    c.setdefault("dtype", "float32")
    try:
        text = json.dumps(c, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{where}: the config cannot be written as JSON ({e})") from None
    try:
        return _C.config_spec(text, where)
    except (ValueError, NotImplementedError) as e:
        raise ConversionError(str(e)) from None


# The layer fields of the flat form (docs/format.md), moved into a `layers` entry by _listed.
FLAT_LAYER_KEYS = ("d_inner", "d_state", "d_conv", "conv_bias", "bias", "dt_rank", "headdim",
                   "nheads", "ngroups", "chunk_size", "dt_limit", "gated_norm",
                   "norm_before_gate")
MAMBA1_KEYS = ("d_inner", "d_state", "d_conv", "conv_bias", "bias", "dt_rank")


def _listed(c: dict, family: str, keys: Sequence[str], extra: dict) -> dict:
    """A flat-form config `c` rewritten in the listed form: `architecture` = family, one
    `layers` entry per layer holding `keys` of the flat fields plus `extra`."""
    entry = {"type": c["architecture"], **{k: c[k] for k in keys}, **extra}
    out = {k: v for k, v in c.items() if k not in FLAT_LAYER_KEYS}
    out["architecture"] = family
    out["layers"] = [dict(entry) for _ in range(c["n_layer"])]
    return out


def _mixer_rms_eps(cfg: dict, where: str) -> float:
    eps = cfg.get("mixer_rms_eps", 1e-6)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 < eps < 1:
        raise ConversionError(f"{where}: config key 'mixer_rms_eps' must be a number in (0, 1), "
                              f"got {str(eps)[:40]}")
    return float(eps)


# Nemotron-H (NemotronHForCausalLM): one mixer per pre-norm block, by the letters of
# hybrid_override_pattern (or the layers_block_type list transformers 5 writes).
NEMOTRON_LETTERS = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}
NEMOTRON_TYPES = {"linear_attention": "M", "mamba": "M", "full_attention": "*", "attention": "*",
                  "mlp": "-", "moe": "E"}
# The tensor (under backbone.layers.{i}.mixer.) that shows each block kind in a checkpoint.
NEMOTRON_MARKERS = {"M": "in_proj.weight", "*": "q_proj.weight", "-": "up_proj.weight",
                    "E": "gate.weight"}
NEMOTRON_KIND = {"M": "Mamba-2", "*": "attention", "-": "MLP", "E": "MoE"}


def _nemotron_pattern(cfg: dict, where: str) -> str:
    """The block letters, one per layer, from layers_block_type or hybrid_override_pattern."""
    if cfg.get("layers_block_type") is not None:
        types = cfg["layers_block_type"]
        if not isinstance(types, list) or not types:
            raise ConversionError(f"{where}: config key 'layers_block_type' must be a non-empty "
                                  f"list")
        out = []
        for i, t in enumerate(types):
            if t not in NEMOTRON_TYPES:
                raise ConversionError(
                    f"{where}: layer {i}: config key 'layers_block_type' has unknown block type "
                    f"{str(t)[:40]!r} (known: {', '.join(sorted(NEMOTRON_TYPES))})")
            out.append(NEMOTRON_TYPES[t])
        return "".join(out)
    pat = cfg.get("hybrid_override_pattern")
    if not isinstance(pat, str) or not pat:
        raise ConversionError(f"{where}: Nemotron-H config needs 'hybrid_override_pattern' (a "
                              f"string of M, *, -, E) or 'layers_block_type'")
    for i, ch in enumerate(pat):
        if ch not in NEMOTRON_LETTERS:
            raise ConversionError(
                f"{where}: layer {i}: config key 'hybrid_override_pattern' has unknown block "
                f"letter {ch!r} (M: Mamba-2, *: attention, -: MLP, E: MoE)")
    return pat


def _num(cfg: dict, key: str, where: str, default, lo: float, hi: float) -> float:
    v = cfg.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo < v < hi:
        raise ConversionError(f"{where}: config key '{key}' must be a number in ({lo}, {hi}), "
                              f"got {str(v)[:40]}")
    return float(v)


def _nemotron_source(cfg: dict, where: str, weights: WeightSet) -> Source:
    pat = _nemotron_pattern(cfg, where)
    n = len(pat)
    if n > 4096:
        raise ConversionError(f"{where}: {n} layers (at most 4096)")
    tensors = weights.tensors
    files = ", ".join(sorted(set(weights.files))) or "the checkpoint"
    # The pattern against the checkpoint, layer by layer: a block's mixer tensors show its kind.
    for i, ch in enumerate(pat):
        pre = f"backbone.layers.{i}.mixer."
        found = [k for k, m in NEMOTRON_MARKERS.items() if pre + m in tensors]
        if ch not in found:
            has = (f"its tensors are those of a {NEMOTRON_KIND[found[0]]} block "
                   f"('{pre + NEMOTRON_MARKERS[found[0]]}')") if found else \
                  f"'{pre + NEMOTRON_MARKERS[ch]}' is missing"
            raise ConversionError(
                f"{where}: layer {i}: the pattern says {ch!r} ({NEMOTRON_KIND[ch]}) but in "
                f"{files} {has}")
    extra_layers = [k for k in tensors
                    if re.match(r"backbone\.layers\.(\d+)\.", k)
                    and int(k.split(".")[2]) >= n]
    if extra_layers:
        raise ConversionError(f"{where}: the pattern has {n} layers but {files} holds "
                              f"'{extra_layers[0]}'")
    if "E" in pat:
        raise ConversionError(f"{where}: layer {pat.index('E')}: MoE blocks ('E') are not "
                          f"supported yet (Nemotron-H with M, *, - blocks is)")
    d = _int(cfg, "hidden_size", where)
    V = _int(cfg, "vocab_size", where)
    eps = _num(cfg, "layer_norm_epsilon", where, 1e-5, 0.0, 1.0)
    c = _base_config("nemotron_h")
    c.update(d_model=d, n_layer=n, vocab_size=V, vocab_size_padded=V, norm="rmsnorm",
             norm_eps=eps, residual_in_fp32=True,
             # transformers' NemotronH ties nothing (tie_word_embeddings is not read): the head
             # is lm_head.weight; a checkpoint without one shares the embedding.
             tie_embeddings="lm_head.weight" not in tensors)
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        c[k] = _opt_id(cfg.get(k), where, k)
    layers = []
    mamba = attn = mlp = None
    if "M" in pat:
        act = cfg.get("mamba_hidden_act", "silu")
        if act != "silu":
            raise ConversionError(f"{where}: config key 'mamba_hidden_act' = {act!r} is not "
                                  f"supported (silu)")
        H = _int(cfg, "mamba_num_heads", where)
        P = _int(cfg, "mamba_head_dim", where)
        G = _int(cfg, "n_groups", where, _int(cfg, "mamba_n_groups", where, 8))
        if H % G:
            raise ConversionError(f"{where}: layer {pat.index('M')}: n_groups ({G}) must divide "
                                  f"mamba_num_heads ({H})")
        mamba = _mamba2_entry(
            H * P, H, G, _int(cfg, "ssm_state_size", where, 128),
            _int(cfg, "conv_kernel", where, _int(cfg, "mamba_d_conv", where, 4)),
            _bool(cfg, "use_conv_bias", where, True), _bool(cfg, "use_bias", where, False),
            _int(cfg, "chunk_size", where, 128),
            _dt_limit(cfg.get("time_step_limit", [0.0, math.inf]), where, "time_step_limit"))
    if "*" in pat:
        i = pat.index("*")
        Hq = _int(cfg, "num_attention_heads", where)
        kv = cfg.get("num_key_value_heads")
        Hkv = Hq if kv is None else _int(cfg, "num_key_value_heads", where)
        q = tensors.get(f"backbone.layers.{i}.mixer.q_proj.weight")
        rows = q.shape[0] if q is not None and len(q.shape) == 2 else 0
        # The head size from the weights (older configs' attention_head_dim is not read by
        # transformers either); then checked against the config's head_dim.
        if rows % Hq:
            raise ConversionError(f"{where}: layer {i}: num_attention_heads ({Hq}) does not "
                                  f"divide the rows of q_proj ({rows})")
        hd = rows // Hq
        if "head_dim" in cfg and cfg["head_dim"] is not None and cfg["head_dim"] != hd:
            raise ConversionError(f"{where}: layer {i}: config key 'head_dim' = "
                                  f"{cfg['head_dim']} but q_proj holds {Hq} heads of {hd}")
        if Hq % Hkv:
            raise ConversionError(f"{where}: layer {i}: num_key_value_heads ({Hkv}) must divide "
                                  f"num_attention_heads ({Hq})")
        # The KV cache's capacity: the trained context (convert's max_context changes it).
        ctx = _int(cfg, "max_position_embeddings", where, 8192)
        # NoPE, no biases (hard-coded in transformers' NemotronHAttention), scale hd^-1/2.
        attn = {"type": "attention", "num_heads": Hq, "num_kv_heads": Hkv, "head_dim": hd,
                "rotary_dim": 0, "rope_theta": 10000.0, "window": 0, "qkv_bias": False,
                "out_bias": False, "scale": hd ** -0.5, "max_context": ctx,
                "fused_qkv": False, "d_conv": 0}
    if "-" in pat:
        act = cfg.get("mlp_hidden_act", "relu2")
        if act != "relu2":
            raise ConversionError(f"{where}: config key 'mlp_hidden_act' = {act!r} is not "
                                  f"supported (relu2)")
        mlp = {"type": "mlp", "intermediate_size": _int(cfg, "intermediate_size", where),
               "activation": "relu2", "bias": _bool(cfg, "mlp_bias", where, False)}
    for ch in pat:
        layers.append(dict({"M": mamba, "*": attn, "-": mlp}[ch]))
    c["layers"] = layers
    src = Source("transformers", c, prefix="backbone.", emb="backbone.embeddings.weight",
                 ignored=("mtp.",))
    emb = tensors.get(src.emb)
    if emb is not None and len(emb.shape) == 2:
        if emb.shape[0] < V:
            raise ConversionError(f"{weights.files[0]}: tensor '{src.emb}' has {emb.shape[0]} "
                                  f"rows, fewer than vocab_size {V}")
        c["vocab_size_padded"] = emb.shape[0]
    return src


# Granite-4.0-H (GraniteMoeHybridForCausalLM): every source layer is two pre-norm blocks here,
# its mixer (Mamba-2 or attention; input_layernorm) and its feed-forward (post_attention_layernorm:
# the MoE with the shared expert, or the shared MLP alone where num_local_experts is 0). Its
# multipliers are the model's embedding_multiplier / residual_multiplier / logits_scaling; the
# attention_multiplier is the attention's softmax scale.
GRANITE_TYPES = {"mamba": "M", "linear_attention": "M", "attention": "A", "full_attention": "A"}
GRANITE_MARKERS = {"M": "mamba.in_proj.weight", "A": "self_attn.q_proj.weight"}
GRANITE_KIND = {"M": "Mamba-2", "A": "attention"}
GRANITE_A = {"M": "a Mamba-2", "A": "an attention"}
GRANITE_FFN = {  # canonical name under layers.{2i+1}.mixer. -> source name under model.layers.{i}.
    "router.weight": "block_sparse_moe.router.layer.weight",
    "experts.input_linear.weight": "block_sparse_moe.input_linear.weight",
    "experts.output_linear.weight": "block_sparse_moe.output_linear.weight",
    "shared.input_linear.weight": "shared_mlp.input_linear.weight",
    "shared.output_linear.weight": "shared_mlp.output_linear.weight",
    "gate_up_proj.weight": "shared_mlp.input_linear.weight",
    "down_proj.weight": "shared_mlp.output_linear.weight",
}


def _layer_letters(types, where: str, key: str, n: int, names: Dict[str, str]) -> str:
    """Config key `key`, a list of n layer types, as one letter per layer by `names`."""
    if not isinstance(types, list) or len(types) != n:
        raise ConversionError(f"{where}: config key '{key}' must be a list of "
                              f"num_hidden_layers ({n}) layer types")
    out = []
    for i, t in enumerate(types):
        if t not in names:
            raise ConversionError(f"{where}: layer {i}: {key} entry {str(t)[:40]!r} is not a "
                                  f"known layer type ({', '.join(names)})")
        out.append(names[t])
    return "".join(out)


def _check_layer_kinds(pat: str, weights: WeightSet, where: str, markers: Dict[str, str],
                       says: Dict[str, str], has: Dict[str, str]) -> None:
    """Each layer's tensors are those of the kind the config gives it (`markers`: letter ->
    a tensor under model.layers.{i}. that only that kind has), and no tensor names a layer past
    the last; errors name the layer, the kinds (`says`, `has`) and the tensor."""
    files = ", ".join(sorted(set(weights.files))) or "the checkpoint"
    for i, ch in enumerate(pat):
        pre = f"model.layers.{i}."
        found = [k for k, m in markers.items() if pre + m in weights.tensors]
        if ch not in found:
            got = (f"its tensors are those of {has[found[0]]} ('{pre + markers[found[0]]}')"
                   if found else f"'{pre + markers[ch]}' is missing")
            raise ConversionError(f"{where}: layer {i}: the config says {says[ch]} but in "
                                  f"{files} {got}")
    extra = [k for k in weights.tensors
             if re.match(r"model\.layers\.(\d+)\.", k) and int(k.split(".")[2]) >= len(pat)]
    if extra:
        raise ConversionError(f"{where}: num_hidden_layers is {len(pat)} but {files} holds "
                              f"'{extra[0]}'")


def _padded_vocab(src: Source, weights: WeightSet, V: int) -> Source:
    """vocab_size_padded from the embedding's rows (at least V); a tied head is optional."""
    c = src.config
    emb = weights.tensors.get(src.emb)
    if emb is not None and len(emb.shape) == 2:
        if emb.shape[0] < V:
            raise ConversionError(f"{weights.files[0]}: tensor '{src.emb}' has {emb.shape[0]} "
                                  f"rows, fewer than vocab_size {V}")
        c["vocab_size_padded"] = emb.shape[0]
    if c["tie_embeddings"]:
        src.optional_tied = "lm_head.weight"
    return src


def _rope_theta(cfg: dict, where: str) -> float:
    """RoPE's theta from transformers 5's `rope_parameters` (or the older top-level
    `rope_theta`); only the default rope type is supported."""
    rp = cfg.get("rope_parameters") or {}
    if not isinstance(rp, dict):
        raise ConversionError(f"{where}: config key 'rope_parameters' must be an object")
    if rp.get("rope_type", "default") != "default":
        raise ConversionError(f"{where}: rope_parameters.rope_type = "
                              f"{str(rp.get('rope_type'))[:40]!r} is not supported (default)")
    return _num(rp if "rope_theta" in rp else cfg, "rope_theta", where, 10000.0, 1.0, 1e12)


def _granite_pattern(cfg: dict, where: str, n: int) -> str:
    key = "layer_types" if cfg.get("layer_types") is not None else "layers_block_type"
    if cfg.get(key) is None:
        return "M" * n  # transformers' default: every layer Mamba-2
    return _layer_letters(cfg.get(key), where, key, n, GRANITE_TYPES)


def _bamba_pattern(cfg: dict, where: str, n: int) -> str:
    idx = cfg.get("attn_layer_indices")
    if idx is None:
        return "M" * n
    if not isinstance(idx, list):
        raise ConversionError(f"{where}: config key 'attn_layer_indices' must be a list of layer "
                              f"indices")
    out = ["M"] * n
    for v in idx:
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < n:
            raise ConversionError(f"{where}: config key 'attn_layer_indices' entry "
                                  f"{str(v)[:40]} is not a layer index in [0, {n})")
        out[v] = "A"
    return "".join(out)


def _period(cfg: dict, where: str, what: str, period: int, offset: int) -> Tuple[int, int]:
    """Jamba's `{what}_layer_period` / `{what}_layer_offset`, checked (offset < period)."""
    p = _int(cfg, f"{what}_layer_period", where, period)
    o = _int(cfg, f"{what}_layer_offset", where, offset, lo=0)
    if o >= p:
        raise ConversionError(f"{where}: config key '{what}_layer_offset' ({o}) must be smaller "
                              f"than '{what}_layer_period' ({p})")
    return p, o


def _jamba_pattern(cfg: dict, where: str, n: int) -> str:
    """Jamba: attention where i mod attn_layer_period = attn_layer_offset, else Mamba-1."""
    p, o = _period(cfg, where, "attn", 8, 4)
    return "".join("A" if i % p == o else "M" for i in range(n))


def _granite_source(cfg: dict, where: str, weights: WeightSet,
                    family: str = "granitemoehybrid") -> Source:
    """Granite-4.0-H; or Bamba (BambaForCausalLM): the same two blocks per source layer, Bamba's
    FFN a plain SwiGLU MLP (feed_forward.{gate,up,down}_proj, pre_ff_layernorm), its attention
    with partial RoPE (half of hd, as transformers forces) and scale hd^-1/2, no multipliers,
    final norm model.final_layernorm; or Jamba (JambaForCausalLM): Bamba's layout with Mamba-1
    mixers (their dt / B / C RMS norms with weights) and NoPE attention by attn_layer_period /
    offset, each FFN the MoE (the softmax over all experts at the top k, not renormalized; the
    per-expert matrices stacked) where i mod expert_layer_period = expert_layer_offset, else a
    SwiGLU MLP."""
    bamba, jamba = family == "bamba", family == "jamba"
    ai21 = bamba or jamba  # the feed_forward / pre_ff_layernorm / final_layernorm layout
    n = _int(cfg, "num_hidden_layers", where, hi=2048)
    pat = (_jamba_pattern if jamba else _bamba_pattern if bamba else _granite_pattern)(
        cfg, where, n)
    tensors = weights.tensors
    files = ", ".join(sorted(set(weights.files))) or "the checkpoint"
    kind = dict(GRANITE_KIND, M="Mamba-1") if jamba else GRANITE_KIND
    article = dict(GRANITE_A, M="a Mamba-1") if jamba else GRANITE_A
    if jamba:
        X = _int(cfg, "num_experts", where, _int(cfg, "num_local_experts", where, 16), hi=1 << 16)
        ep, eo = _period(cfg, where, "expert", 2, 1)
        moe_at = [X > 1 and i % ep == eo for i in range(n)]  # transformers: 1 expert = an MLP
    else:
        X = 0 if bamba else _int(cfg, "num_local_experts", where, 0, lo=0, hi=1 << 16)
        moe_at = [X > 0] * n
    _check_layer_kinds(pat, weights, where, GRANITE_MARKERS, kind,
                       {k: v + " layer" for k, v in article.items()})
    for i in range(n):
        pre = f"model.layers.{i}."
        moe = pre + ("feed_forward.router.weight" if jamba else GRANITE_FFN["router.weight"])
        if jamba and moe_at[i] != (moe in tensors):
            raise ConversionError(
                f"{where}: layer {i}: the config says {'an MoE' if moe_at[i] else 'an MLP'} "
                f"(num_experts {X}, expert_layer_period {ep}, expert_layer_offset {eo}) but in "
                f"{files} '{moe}' is {'missing' if moe_at[i] else 'present'}")
        if not ai21 and (X > 0) != (moe in tensors):
            raise ConversionError(
                f"{where}: layer {i}: num_local_experts is {X} but in {files} '{moe}' is "
                f"{'missing' if X > 0 else 'present'}")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ConversionError(f"{where}: config key 'hidden_act' = {str(act)[:40]!r} is not "
                              f"supported (silu)")
    d = _int(cfg, "hidden_size", where)
    V = _int(cfg, "vocab_size", where)
    c = _base_config(family)
    eps = _num(cfg, "rms_norm_eps", where, 1e-5 if bamba else 1e-6, 0.0, 1.0)
    c.update(d_model=d, n_layer=2 * n, vocab_size=V, vocab_size_padded=V, norm="rmsnorm",
             norm_eps=eps,
             residual_in_fp32=True,
             tie_embeddings=_bool(cfg, "tie_word_embeddings", where, False))
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        c[k] = _opt_id(cfg.get(k), where, k)
    if not ai21:
        for k in ("embedding_multiplier", "residual_multiplier", "logits_scaling"):
            c[k] = _num(cfg, k, where, 1.0, 0.0, 1e6)
    mamba = attn = None
    if "M" in pat and jamba:
        expand = _int(cfg, "mamba_expand", where, 2, hi=64)
        r = cfg.get("mamba_dt_rank", "auto")
        mamba = {"type": "mamba1", "d_inner": expand * d,
                 "d_state": _int(cfg, "mamba_d_state", where, 16),
                 "d_conv": _int(cfg, "mamba_d_conv", where, 4),
                 "conv_bias": _bool(cfg, "mamba_conv_bias", where, True),
                 "bias": _bool(cfg, "mamba_proj_bias", where, False),
                 "dt_rank": math.ceil(d / 16) if r == "auto" else
                 _int(cfg, "mamba_dt_rank", where),
                 "dt_bc_rms_eps": eps, "dt_bc_rms_weight": True}
    elif "M" in pat:
        i = pat.index("M")
        expand = cfg.get("mamba_expand", 2)
        if isinstance(expand, bool) or not isinstance(expand, int) or not 1 <= expand <= 64:
            raise ConversionError(f"{where}: config key 'mamba_expand' must be an integer in "
                                  f"[1, 64], got {str(expand)[:40]}")
        E = expand * d
        H = _int(cfg, "mamba_n_heads", where, 128)
        if cfg.get("mamba_d_head", "auto") == "auto":
            if E % H:
                raise ConversionError(f"{where}: layer {i}: mamba_n_heads ({H}) does not divide "
                                      f"mamba_expand x hidden_size ({E})")
            P = E // H
        else:
            P = _int(cfg, "mamba_d_head", where)
        if H * P != E:
            raise ConversionError(f"{where}: layer {i}: mamba_n_heads x mamba_d_head ({H} x {P}) "
                                  f"must equal mamba_expand x hidden_size ({E})")
        G = _int(cfg, "mamba_n_groups", where, 1)
        if H % G:
            raise ConversionError(f"{where}: layer {i}: mamba_n_groups ({G}) must divide "
                                  f"mamba_n_heads ({H})")
        mamba = _mamba2_entry(
            E, H, G, _int(cfg, "mamba_d_state", where, 256), _int(cfg, "mamba_d_conv", where, 4),
            _bool(cfg, "mamba_conv_bias", where, True),
            _bool(cfg, "mamba_proj_bias", where, False), _int(cfg, "mamba_chunk_size", where, 256),
            _dt_limit(cfg.get("time_step_limit", [0.0, math.inf]), where, "time_step_limit"))
    if "A" in pat:
        i = pat.index("A")
        Hq = _int(cfg, "num_attention_heads", where)
        kv = cfg.get("num_key_value_heads")
        Hkv = Hq if kv is None else _int(cfg, "num_key_value_heads", where)
        if cfg.get("head_dim") is not None:
            hd = _int(cfg, "head_dim", where)
        else:
            if d % Hq:
                raise ConversionError(f"{where}: layer {i}: num_attention_heads ({Hq}) does not "
                                      f"divide hidden_size ({d})")
            hd = d // Hq
        if Hq % Hkv:
            raise ConversionError(f"{where}: layer {i}: num_key_value_heads ({Hkv}) must divide "
                                  f"num_attention_heads ({Hq})")
        pe = "rope" if bamba else "nope" if jamba else cfg.get("position_embedding_type")
        rotary, theta = 0, 10000.0
        if pe == "rope":
            theta = _rope_theta(cfg, where)
            rotary = hd
            if bamba:  # transformers' BambaConfig sets partial_rotary_factor 0.5 whatever it says
                rotary = int(hd * 0.5)
                if rotary % 2:
                    raise ConversionError(f"{where}: layer {i}: the head size {hd} gives an odd "
                                          f"rotary size {rotary} (half of it); not supported")
        elif pe not in (None, "nope"):
            raise ConversionError(f"{where}: config key 'position_embedding_type' = "
                                  f"{str(pe)[:40]!r} is not supported (rope, nope or null)")
        bias = False if jamba else _bool(cfg, "attention_bias", where, False)
        attn = {"type": "attention", "num_heads": Hq, "num_kv_heads": Hkv, "head_dim": hd,
                "rotary_dim": rotary, "rope_theta": theta, "window": 0, "qkv_bias": bias,
                "out_bias": bias,
                "scale": hd ** -0.5 if ai21 else
                _num(cfg, "attention_multiplier", where, 1.0, 0.0, 1e6),
                "max_context": _int(cfg, "max_position_embeddings", where,
                                    262144 if ai21 else 4096),
                "fused_qkv": False, "d_conv": 0}
    S = 0 if ai21 else _int(cfg, "shared_intermediate_size", where, 1024)
    I = _int(cfg, "intermediate_size", where, 14336 if ai21 else 1024)
    moe = None
    if any(moe_at):
        k = _int(cfg, "num_experts_per_tok", where, 2, hi=32)
        if k > X:
            raise ConversionError(f"{where}: num_experts_per_tok ({k}) exceeds "
                                  f"{'num_experts' if jamba else 'num_local_experts'} ({X})")
        moe = {"type": "moe", "num_experts": X, "top_k": k, "intermediate_size": I,
               "shared_intermediate_size": S, "activation": "swiglu", "normalize": not jamba,
               "routed_scale": 1.0}
    if ai21:
        mlp = {"type": "mlp", "intermediate_size": I, "activation": "swiglu",
               "bias": _bool(cfg, "mlp_bias", where, False) if bamba else False}
    else:
        mlp = {"type": "mlp", "intermediate_size": S, "activation": "swiglu", "bias": False,
               "fused_gate_up": True}
    layers = []
    stacked = {}
    for i, ch in enumerate(pat):
        layers.append(dict(mamba if ch == "M" else attn))
        layers.append(dict(moe if moe_at[i] else mlp))
        if jamba and moe_at[i]:  # per-expert matrices on disk: [gate_e; up_e] and down_e
            pre, canon = f"model.layers.{i}.feed_forward.experts.", f"layers.{2 * i + 1}.mixer."
            stacked[canon + "experts.input_linear.weight"] = [
                f"{pre}{e}.{p}_proj.weight" for e in range(X) for p in ("gate", "up")]
            stacked[canon + "experts.output_linear.weight"] = [
                f"{pre}{e}.down_proj.weight" for e in range(X)]
    c["layers"] = layers

    def rename(canon: str) -> str:
        if canon == "embedding.weight":
            return "model.embed_tokens.weight"
        if canon == "norm_f.weight":
            return "model.final_layernorm.weight" if ai21 else "model.norm.weight"
        m = re.match(r"layers\.(\d+)\.(.*)$", canon)
        if not m:
            return canon
        j, rest = int(m.group(1)), m.group(2)
        pre = f"model.layers.{j // 2}."
        if rest == "norm.weight":
            return pre + ("input_layernorm.weight" if j % 2 == 0 else
                          "pre_ff_layernorm.weight" if ai21 else
                          "post_attention_layernorm.weight")
        rest = rest[len("mixer."):]
        if j % 2 == 1:
            return pre + ("feed_forward." + rest if ai21 else GRANITE_FFN.get(rest, rest))
        return pre + ("mamba." if pat[j // 2] == "M" else "self_attn.") + rest

    return _padded_vocab(Source("transformers", c, emb="model.embed_tokens.weight",
                                rename=rename, stacked=stacked), weights, V)


# Zamba2: layers_block_type entries (5.25's names and the legacy "mamba").
ZAMBA2_TYPES = {"mamba": "M", "linear_attention": "M", "hybrid": "H"}
ZAMBA2_MARKERS = {"M": "mamba.in_proj.weight", "H": "mamba_decoder.mamba.in_proj.weight"}
ZAMBA2_KIND = {"M": "a Mamba-2 layer", "H": "a hybrid layer"}


def _zamba2_pattern(cfg: dict, where: str, n: int) -> str:
    types = cfg.get("layers_block_type")
    if types is None:  # transformers' default: the 54-layer Zamba2-2.7B pattern
        types = ["mamba"] + (["mamba"] * 5 + ["hybrid"]) * 7 + ["mamba"] * 4 + ["hybrid"] + \
            ["mamba"] * 3 + ["hybrid"] + ["mamba"] * 2
    return _layer_letters(types, where, "layers_block_type", n, ZAMBA2_TYPES)


def _zamba2_source(cfg: dict, where: str, weights: WeightSet) -> Source:
    """Zamba2 (Zamba2ForCausalLM): Mamba-2 layers, and hybrid layers (a shared attention + GeGLU
    MLP block fed [h | embedding], its `linear`, then a Mamba-2 layer: the zamba2_hybrid unit).
    Block k mod num_mem_blocks serves the k-th hybrid layer; transformers ties its weights to the
    block's first occurrence (save_pretrained writes only that one; copies in a file must be
    equal), and each occurrence j has its own LoRA adapters (`..._adapter_list.{j}.{0,1}`, in
    the first occurrence's module), merged here into that occurrence's weights (W + B·A), so each
    hybrid layer of the output owns its block. transformers 5.25 ties the blocks only where
    tie_word_embeddings is true (as the published checkpoints are); otherwise each hybrid layer
    has a block of its own (`model.layers.{i}.shared_transformer`), read as such. The Mamba-2 mixers' dt clamp (time_step_min, inf)
    applies to prefill only (dt_limit_prefill_only), their gated norm eps is 1e-5."""
    n = _int(cfg, "num_hidden_layers", where, 54, hi=2048)
    pat = _zamba2_pattern(cfg, where, n)
    _check_layer_kinds(pat, weights, where, ZAMBA2_MARKERS, ZAMBA2_KIND, ZAMBA2_KIND)
    act = cfg.get("hidden_act", "gelu")
    if act != "gelu":
        raise ConversionError(f"{where}: config key 'hidden_act' = {str(act)[:40]!r} is not "
                              f"supported (gelu)")
    d = _int(cfg, "hidden_size", where, 2560)
    V = _int(cfg, "vocab_size", where, 32000)
    eps = _num(cfg, "rms_norm_eps", where, 1e-5, 0.0, 1.0)
    c = _base_config("zamba2")
    c.update(d_model=d, n_layer=n, vocab_size=V, vocab_size_padded=V, norm="rmsnorm",
             norm_eps=eps, residual_in_fp32=True,
             tie_embeddings=_bool(cfg, "tie_word_embeddings", where, True))
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        c[k] = _opt_id(cfg.get(k), where, k)
    E = _int(cfg, "mamba_expand", where, 2, hi=64) * d
    H = _int(cfg, "n_mamba_heads", where, 8)
    if E % H:
        raise ConversionError(f"{where}: n_mamba_heads ({H}) does not divide mamba_expand x "
                              f"hidden_size ({E})")
    G = _int(cfg, "mamba_ngroups", where, 1)
    if H % G:
        raise ConversionError(f"{where}: mamba_ngroups ({G}) must divide n_mamba_heads ({H})")
    mamba = _mamba2_entry(
        E, H, G, _int(cfg, "mamba_d_state", where, 64), _int(cfg, "mamba_d_conv", where, 4), True,
        _bool(cfg, "add_bias_linear", where, False), _int(cfg, "chunk_size", where, 256),
        _dt_limit([_num(cfg, "time_step_min", where, 0.001, -1.0, 1e6), math.inf], where,
                  "time_step_min"),
        gated_norm_eps=1e-5, dt_limit_prefill_only=True)
    hybrids = [i for i, ch in enumerate(pat) if ch == "H"]
    M = _int(cfg, "num_mem_blocks", where, 1, hi=4096)
    adapters = _bool(cfg, "use_shared_attention_adapter", where, False)
    attn = mlp = None
    if hybrids:
        Hq = _int(cfg, "num_attention_heads", where, 32)
        kv = cfg.get("num_key_value_heads")
        Hkv = Hq if kv is None else _int(cfg, "num_key_value_heads", where)
        if (2 * d) % Hq:
            raise ConversionError(f"{where}: num_attention_heads ({Hq}) does not divide the "
                                  f"attention width 2 x hidden_size ({2 * d})")
        hd = 2 * d // Hq
        if Hq % Hkv:
            raise ConversionError(f"{where}: num_key_value_heads ({Hkv}) must divide "
                                  f"num_attention_heads ({Hq})")
        if adapters and Hkv != Hq:
            raise ConversionError(f"{where}: num_key_value_heads ({Hkv}) must equal "
                                  f"num_attention_heads ({Hq}) with use_shared_attention_adapter "
                                  f"(the k / v adapters write 2 x hidden_size)")
        rotary, theta = 0, 10000.0
        if _bool(cfg, "use_mem_rope", where, False):
            theta = _rope_theta(cfg, where)
            rotary = hd
        # transformers 5.25: use_long_context only raises max_position_embeddings to 16384
        # (Zyphra's original code also rescaled rope_theta; 5.25 does not, nor do we).
        ctx = 16384 if _bool(cfg, "use_long_context", where, False) else \
            _int(cfg, "max_position_embeddings", where, 4096)
        attn = {"type": "attention", "num_heads": Hq, "num_kv_heads": Hkv, "head_dim": hd,
                "rotary_dim": rotary, "rope_theta": theta, "window": 0, "qkv_bias": False,
                "out_bias": False, "scale": (hd / 2) ** -0.5, "max_context": ctx,
                "fused_qkv": False, "d_conv": 0, "d_in": 2 * d}
        ffn = cfg.get("intermediate_size")
        mlp = {"type": "mlp", "intermediate_size": 4 * d if ffn is None else
               _int(cfg, "intermediate_size", where), "activation": "geglu",
               "bias": mamba["bias"], "fused_gate_up": True}
    c["layers"] = [dict(mamba) if ch == "M" else
                   {"type": "zamba2_hybrid", "attention": attn, "mlp": mlp, "mamba": mamba}
                   for ch in pat]
    # hybrid layer i -> (occurrence j, the layer whose block it reads: its block's first
    # occurrence where transformers ties them, itself otherwise)
    first: Dict[int, int] = {}
    occ = {}
    for j, i in enumerate(hybrids):
        occ[i] = (j, first.setdefault(j % M, i) if c["tie_embeddings"] else i)
    lora = {}
    for i, (j, f) in occ.items():
        S = f"model.layers.{f}.shared_transformer."
        if adapters:
            for x in "qkv":
                lora[f"layers.{i}.attn.mixer.{x}_proj.weight"] = (
                    f"{S}self_attn.{x}_proj.weight",
                    f"{S}self_attn.linear_{x}_adapter_list.{j}.0.weight",
                    f"{S}self_attn.linear_{x}_adapter_list.{j}.1.weight")
        lora[f"layers.{i}.mlp.mixer.gate_up_proj.weight"] = (
            f"{S}feed_forward.gate_up_proj.weight",
            f"{S}feed_forward.gate_up_proj_adapter_list.{j}.0.weight",
            f"{S}feed_forward.gate_up_proj_adapter_list.{j}.1.weight")
    ignored = []  # without ties: the adapter slots of a layer's block that others use
    for i, (j, f) in occ.items():
        if f != i:
            continue
        S = f"model.layers.{i}.shared_transformer."
        for k in range(j % M, len(hybrids), M):
            if k != j and not (c["tie_embeddings"] and occ[hybrids[k]][1] == i):
                ignored += [f"{S}self_attn.linear_{x}_adapter_list.{k}." for x in "qkv"]
                ignored.append(f"{S}feed_forward.gate_up_proj_adapter_list.{k}.")
    shared = {"attn_norm.weight": "input_layernorm.weight",
              "mlp_norm.weight": "pre_ff_layernorm.weight"}

    def rename(canon: str) -> str:
        if canon == "embedding.weight":
            return "model.embed_tokens.weight"
        if canon == "norm_f.weight":
            return "model.final_layernorm.weight"
        m = re.match(r"layers\.(\d+)\.(.*)$", canon)
        if not m:
            return canon
        i, rest = int(m.group(1)), m.group(2)
        pre = f"model.layers.{i}."
        if pat[i] == "M":
            return pre + ("input_layernorm.weight" if rest == "norm.weight" else
                          "mamba." + rest[len("mixer."):])
        S = f"model.layers.{occ[i][1]}.shared_transformer."
        if rest in shared:
            return S + shared[rest]
        if rest.startswith("attn.mixer."):
            return S + "self_attn." + rest[len("attn.mixer."):]
        if rest.startswith("mlp.mixer."):
            return S + "feed_forward." + rest[len("mlp.mixer."):]
        if rest == "mamba_norm.weight":
            return pre + "mamba_decoder.input_layernorm.weight"
        if rest.startswith("mamba.mixer."):
            return pre + "mamba_decoder.mamba." + rest[len("mamba.mixer."):]
        return pre + rest  # linear.weight

    def tied_copy(name: str) -> Optional[str]:
        m = re.match(r"model\.layers\.(\d+)\.shared_transformer\.(.*)$", name)
        if not m or int(m.group(1)) not in occ or occ[int(m.group(1))][1] == int(m.group(1)):
            return None
        return f"model.layers.{occ[int(m.group(1))][1]}.shared_transformer.{m.group(2)}"

    return _padded_vocab(Source("transformers", c, emb="model.embed_tokens.weight",
                                rename=rename, lora=lora, tied_copy=tied_copy,
                                ignored=tuple(ignored)), weights, V)


def _hf_source(cfg: dict, where: str, weights: WeightSet) -> Source:
    mt = cfg.get("model_type")
    if mt == "nemotron_h":
        return _nemotron_source(cfg, where, weights)
    if mt in ("granitemoehybrid", "bamba", "jamba"):
        return _granite_source(cfg, where, weights, family=mt)
    if mt == "zamba2":
        return _zamba2_source(cfg, where, weights)
    if mt not in ("mamba", "mamba2", "falcon_mamba"):
        raise ConversionError(f"{where}: model_type {mt!r} is not supported (mamba, mamba2, "
                              f"falcon_mamba, nemotron_h, granitemoehybrid, bamba, jamba, "
                              f"zamba2)")
    falcon = mt == "falcon_mamba"
    arch = "mamba2" if mt == "mamba2" else "mamba1"
    d = _int(cfg, "hidden_size", where)
    c = _base_config(arch)
    c["d_model"] = d
    c["n_layer"] = _int(cfg, "num_hidden_layers", where, hi=4096)
    expand = cfg.get("expand", 2)
    if not isinstance(expand, (int, float)) or isinstance(expand, bool) or not 0 < expand <= 1024:
        raise ConversionError(f"{where}: config key 'expand' must be a number in (0, 1024]")
    E = int(expand * d)
    if arch == "mamba1":
        # transformers lets an explicit intermediate_size win over expand x hidden_size; the
        # Falcon-Mamba-7B config has both (expand 16 would mean 65536): the weights decide.
        in_proj = weights.tensors.get("backbone.layers.0.mixer.in_proj.weight")
        if "intermediate_size" in cfg:
            E = cfg["intermediate_size"]
        elif in_proj is not None and len(in_proj.shape) == 2 and in_proj.shape[0] % 2 == 0:
            E = in_proj.shape[0] // 2
    if isinstance(E, bool) or not isinstance(E, int) or not 1 <= E <= MAX_DIM:
        raise ConversionError(f"{where}: config key 'intermediate_size' (or expand x "
                              f"hidden_size) must be an integer in [1, {MAX_DIM}]")
    V = _int(cfg, "vocab_size", where)
    c["vocab_size"] = V
    c["vocab_size_padded"] = V  # fixed below from the embedding rows
    c["d_inner"] = E
    c["d_state"] = _int(cfg, "state_size", where, 16 if arch == "mamba1" else 128)
    c["d_conv"] = _int(cfg, "conv_kernel", where, 4)
    c["conv_bias"] = _bool(cfg, "use_conv_bias", where, True)
    c["bias"] = _bool(cfg, "use_bias", where, False)
    if arch == "mamba1":
        r = cfg.get("time_step_rank", "auto")
        c["dt_rank"] = math.ceil(d / 16) if r == "auto" else _int(cfg, "time_step_rank", where)
        c.update(headdim=0, nheads=0, ngroups=1, chunk_size=0, dt_limit=[0.0, None],
                 gated_norm=False)
    else:
        c["dt_rank"] = 0
        c["headdim"] = _int(cfg, "head_dim", where, 64)
        c["nheads"] = _int(cfg, "num_heads", where, 128)
        if c["nheads"] * c["headdim"] != E:
            raise ConversionError(f"{where}: num_heads x head_dim ({c['nheads']} x "
                                  f"{c['headdim']}) must equal expand x hidden_size ({E})")
        c["ngroups"] = _int(cfg, "n_groups", where, 8)
        if c["nheads"] % c["ngroups"]:
            raise ConversionError(f"{where}: n_groups ({c['ngroups']}) must divide num_heads "
                                  f"({c['nheads']})")
        c["chunk_size"] = _int(cfg, "chunk_size", where, 256)
        c["dt_limit"] = _dt_limit(cfg.get("time_step_limit", [0.0, math.inf]), where,
                                  "time_step_limit")
        c["gated_norm"] = True  # HF's Mamba2Mixer always has the gated RMSNorm
    c["norm_before_gate"] = False
    c["norm"] = "rmsnorm"
    eps = cfg.get("layer_norm_epsilon", 1e-5)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 < eps < 1:
        raise ConversionError(f"{where}: config key 'layer_norm_epsilon' must be in (0, 1)")
    c["norm_eps"] = float(eps)
    c["residual_in_fp32"] = _bool(cfg, "residual_in_fp32", where, True)
    c["tie_embeddings"] = _bool(cfg, "tie_word_embeddings", where, arch == "mamba1")
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        c[k] = _opt_id(cfg.get(k), where, k)
    emb = "backbone.embeddings.weight"
    if emb not in weights.tensors and "backbone.embedding.weight" in weights.tensors:
        emb = "backbone.embedding.weight"
    src = Source("transformers", c, prefix="backbone.", emb=emb)
    if emb in weights.tensors and len(weights.tensors[emb].shape) == 2:
        rows = weights.tensors[emb].shape[0]
        if rows < V:
            raise ConversionError(f"{weights.files[0]}: tensor '{emb}' has {rows} rows, fewer "
                                  f"than vocab_size {V}")
        c["vocab_size_padded"] = rows
    if c["tie_embeddings"]:
        src.optional_tied = "lm_head.weight"
    if falcon:
        # Falcon-Mamba: Mamba-1 with weightless RMS norms on dt, B and C (the mamba1 unit's
        # dt_bc_rms_eps), which only the listed form carries.
        src.config = _listed(c, "falcon_mamba", MAMBA1_KEYS,
                             {"dt_bc_rms_eps": _mixer_rms_eps(cfg, where)})
    return src


# Mistral's native Mamba-2 layout (Mamba-Codestral: params.json + consolidated.safetensors;
# mistral-inference's MambaArgs). Every other Mamba2 argument is mamba_ssm's default.
MISTRAL_KEYS = {"dim", "n_layers", "vocab_size", "n_groups", "rms_norm", "residual_in_fp32",
                "fused_add_norm", "pad_vocab_size_multiple", "tie_embeddings", "model_type"}
MISTRAL_WEIGHTS = ("consolidated.safetensors", "model.safetensors")


def _is_mistral_config(cfg: dict) -> bool:
    return "dim" in cfg and "n_layers" in cfg


def _mistral_source(cfg: dict, where: str, weights: WeightSet) -> Source:
    """A Mamba-2 checkpoint in Mistral's native layout: mamba_ssm's MambaLMHeadModel wrapped as
    `model` (tensor names `model.backbone.*`, `model.lm_head.weight`), configured by MambaArgs
    keys; d_state 128, expand 2, headdim 64, chunk 256, ... are mamba_ssm's Mamba2 defaults."""
    if cfg.get("model_type", "mamba") != "mamba":
        raise ConversionError(f"{where}: model_type {cfg.get('model_type')!r} is not supported "
                              f"in Mistral's native format (mamba: Mamba-Codestral)")
    unknown = sorted(set(cfg) - MISTRAL_KEYS)
    if unknown:
        raise ConversionError(f"{where}: unknown key(s) {unknown} for Mistral's native Mamba "
                              f"format (mistral-inference's MambaArgs refuses them too)")
    ss = {"d_model": _int(cfg, "dim", where), "n_layer": _int(cfg, "n_layers", where, hi=4096),
          "vocab_size": _int(cfg, "vocab_size", where),
          "ssm_cfg": {"layer": "Mamba2", "ngroups": _int(cfg, "n_groups", where, 1)},
          "rms_norm": _bool(cfg, "rms_norm", where, True),
          "residual_in_fp32": _bool(cfg, "residual_in_fp32", where, True),
          "pad_vocab_size_multiple": _int(cfg, "pad_vocab_size_multiple", where, 1),
          "tie_embeddings": _bool(cfg, "tie_embeddings", where, False)}
    _bool(cfg, "fused_add_norm", where, True)  # a kernel choice: the math is the same
    src = _ss_source(ss, where, weights)
    src.fmt = "mistral"
    pre = "model." if "model.backbone.embedding.weight" in weights.tensors else ""
    src.prefix = pre + "backbone."
    src.emb = pre + "backbone.embedding.weight"
    src.head = pre + "lm_head.weight"
    if src.optional_tied is not None:
        src.optional_tied = src.head
    return src


SS_TOP_KEYS = {"d_model", "d_intermediate", "n_layer", "vocab_size", "ssm_cfg", "attn_layer_idx",
               "attn_cfg", "rms_norm", "residual_in_fp32", "fused_add_norm",
               "pad_vocab_size_multiple", "tie_embeddings"}
SS_M1_KEYS = {"layer", "d_state", "d_conv", "expand", "dt_rank", "dt_min", "dt_max", "dt_init",
              "dt_scale", "dt_init_floor", "conv_bias", "bias", "use_fast_path"}
SS_M2_KEYS = {"layer", "d_state", "d_conv", "conv_init", "expand", "headdim", "d_ssm", "ngroups",
              "A_init_range", "D_has_hdim", "rmsnorm", "norm_before_gate", "dt_min", "dt_max",
              "dt_init_floor", "dt_limit", "bias", "conv_bias", "chunk_size", "use_mem_eff_path"}


SS_M3_KEYS = {"layer", "d_state", "expand", "headdim", "ngroups", "rope_fraction", "dt_min",
              "dt_max", "dt_init_floor", "A_floor", "is_outproj_norm", "is_mimo", "mimo_rank",
              "fuse_pregate_headwise_norm", "chunk_size"}
A_ACTIVATIONS = ("heavy_tail", "softplus")


def _ss_mamba3(cfg: dict, ssm: dict, where: str, a_activation: Optional[str]) -> dict:
    """A state-spaces Mamba-3 checkpoint (mamba_ssm's Mamba3 arguments in ssm_cfg; spec 4.2,
    4.7): the mambart config in the listed form, one mamba3 entry per layer."""
    bad = sorted(set(ssm) - SS_M3_KEYS)
    if bad:
        raise ConversionError(f"{where}: unknown ssm_cfg key(s) {bad} for layer Mamba3")
    w = where + " ssm_cfg"
    d = _int(cfg, "d_model", where)
    expand = ssm.get("expand", 2)
    if not isinstance(expand, (int, float)) or isinstance(expand, bool) or not 0 < expand <= 1024:
        raise ConversionError(f"{where}: ssm_cfg.expand must be a number in (0, 1024]")
    E = int(expand * d)
    P = _int(ssm, "headdim", w, 64)
    if E % P:
        raise ConversionError(f"{where}: ssm_cfg.headdim={P} does not divide d_inner={E} "
                              f"(expand x d_model)")
    is_mimo = _bool(ssm, "is_mimo", w, False)
    rope = ssm.get("rope_fraction", 0.5)
    if rope not in (0.5, 1.0) or isinstance(rope, bool):
        raise ConversionError(f"{where}: ssm_cfg.rope_fraction={rope!r} is not supported "
                              f"(0.5, 1.0)")
    floor = ssm.get("A_floor", 1e-4)
    if not isinstance(floor, (int, float)) or isinstance(floor, bool) or not 0 < floor < 1:
        raise ConversionError(f"{where}: ssm_cfg.A_floor must be a number in (0, 1)")
    if a_activation is None:
        a_activation = "heavy_tail"
    if a_activation not in A_ACTIVATIONS:
        raise ConversionError(f"a_activation must be one of {A_ACTIVATIONS}, got "
                              f"{a_activation!r}")
    entry = {"type": "mamba3", "d_inner": E, "d_state": _int(ssm, "d_state", w, 128),
             "headdim": P, "nheads": E // P, "ngroups": _int(ssm, "ngroups", w, 1),
             "is_mimo": is_mimo,
             "mimo_rank": _int(ssm, "mimo_rank", w, 4, hi=64) if is_mimo else 1,
             "rope_fraction": float(rope), "chunk_size": _int(ssm, "chunk_size", w, 64),
             "is_outproj_norm": _bool(ssm, "is_outproj_norm", w, False),
             "a_activation": a_activation, "a_floor": float(floor)}
    _bool(ssm, "fuse_pregate_headwise_norm", w, True)  # a kernel choice: the math is the same
    return entry


def _ss_source(cfg: dict, where: str, weights: WeightSet,
               a_activation: Optional[str] = None) -> Source:
    unknown = sorted(set(cfg) - SS_TOP_KEYS)
    if unknown:
        raise ConversionError(f"{where}: unknown state-spaces config key(s) {unknown} "
                              f"(mamba_ssm's MambaConfig would refuse them too)")
    attn = cfg.get("attn_layer_idx") or []
    di = cfg.get("d_intermediate", 0)
    if di:
        raise ConversionError(f"{where}: this checkpoint has MLP layers (d_intermediate={di}); "
                              f"mambart does not run MLP layers yet")
    ssm = cfg.get("ssm_cfg", {}) or {}
    if not isinstance(ssm, dict):
        raise ConversionError(f"{where}: config key 'ssm_cfg' must be an object")
    layer = ssm.get("layer", "Mamba1")
    if layer not in ("Mamba1", "Mamba2", "Mamba3"):
        raise ConversionError(f"{where}: unknown layer type ssm_cfg.layer={layer!r} (mambart "
                              f"runs Mamba1, Mamba2 and Mamba3)")
    if layer == "Mamba3" and attn:
        raise ConversionError(f"{where}: attention layers (attn_layer_idx) with Mamba3 layers "
                              f"are not supported")
    if layer == "Mamba3":
        entry = _ss_mamba3(cfg, ssm, where, a_activation)
        c = _base_config("mamba3")
        c["d_model"] = _int(cfg, "d_model", where)
        c["n_layer"] = _int(cfg, "n_layer", where, hi=4096)
        V = _int(cfg, "vocab_size", where, 50277)
        c["vocab_size"] = V
        c["vocab_size_padded"] = _pad(V, _int(cfg, "pad_vocab_size_multiple", where, 8))
        c["norm"] = "rmsnorm" if _bool(cfg, "rms_norm", where, True) else "layernorm"
        c["norm_eps"] = 1e-5
        c["residual_in_fp32"] = _bool(cfg, "residual_in_fp32", where, True)
        c["tie_embeddings"] = _bool(cfg, "tie_embeddings", where, True)
        c["bos_token_id"] = c["eos_token_id"] = c["pad_token_id"] = None
        c["layers"] = [dict(entry) for _ in range(c["n_layer"])]
        src = Source("state-spaces", c, prefix="backbone.", emb="backbone.embedding.weight")
        if c["tie_embeddings"]:
            src.optional_tied = "lm_head.weight"
        return src
    arch = "mamba1" if layer == "Mamba1" else "mamba2"
    allowed = SS_M1_KEYS if arch == "mamba1" else SS_M2_KEYS
    bad = sorted(set(ssm) - allowed)
    if bad:
        raise ConversionError(f"{where}: unknown ssm_cfg key(s) {bad} for layer {layer}")
    d = _int(cfg, "d_model", where)
    c = _base_config(arch)
    c["d_model"] = d
    c["n_layer"] = _int(cfg, "n_layer", where, hi=4096)
    V = _int(cfg, "vocab_size", where, 50277)
    m = _int(cfg, "pad_vocab_size_multiple", where, 8)
    c["vocab_size"] = V
    c["vocab_size_padded"] = _pad(V, m)
    expand = ssm.get("expand", 2)
    if not isinstance(expand, (int, float)) or isinstance(expand, bool) or not 0 < expand <= 1024:
        raise ConversionError(f"{where}: ssm_cfg.expand must be a number in (0, 1024]")
    E = int(expand * d)
    if not 1 <= E <= MAX_DIM:
        raise ConversionError(f"{where}: expand x d_model = {E} is out of range")
    c["d_inner"] = E
    c["d_state"] = _int(ssm, "d_state", where + " ssm_cfg", 16 if arch == "mamba1" else 128)
    c["d_conv"] = _int(ssm, "d_conv", where + " ssm_cfg", 4)
    c["conv_bias"] = _bool(ssm, "conv_bias", where + " ssm_cfg", True)
    c["bias"] = _bool(ssm, "bias", where + " ssm_cfg", False)
    if arch == "mamba1":
        r = ssm.get("dt_rank", "auto")
        c["dt_rank"] = math.ceil(d / 16) if r == "auto" else _int(ssm, "dt_rank",
                                                                 where + " ssm_cfg")
        c.update(headdim=0, nheads=0, ngroups=1, chunk_size=0, dt_limit=[0.0, None],
                 gated_norm=False, norm_before_gate=False)
    else:
        d_ssm = ssm.get("d_ssm")
        if d_ssm is not None and d_ssm != E:
            raise ConversionError(f"{where}: ssm_cfg.d_ssm={d_ssm} != expand x d_model ({E}) "
                                  f"means an MLP part inside the mixer, which mambart does not "
                                  f"run yet")
        if ssm.get("D_has_hdim", False):
            raise ConversionError(f"{where}: ssm_cfg.D_has_hdim=true is not supported")
        if ssm.get("norm_before_gate", False):
            raise ConversionError(f"{where}: ssm_cfg.norm_before_gate=true is not supported")
        c["dt_rank"] = 0
        c["headdim"] = _int(ssm, "headdim", where + " ssm_cfg", 64)
        if E % c["headdim"]:
            raise ConversionError(f"{where}: ssm_cfg.headdim={c['headdim']} does not divide "
                                  f"d_inner={E}")
        c["nheads"] = E // c["headdim"]
        c["ngroups"] = _int(ssm, "ngroups", where + " ssm_cfg", 1)
        if c["nheads"] % c["ngroups"]:
            raise ConversionError(f"{where}: ssm_cfg.ngroups={c['ngroups']} does not divide the "
                                  f"{c['nheads']} heads")
        c["chunk_size"] = _int(ssm, "chunk_size", where + " ssm_cfg", 256)
        c["dt_limit"] = _dt_limit(ssm.get("dt_limit", [0.0, math.inf]), where, "ssm_cfg.dt_limit")
        c["gated_norm"] = _bool(ssm, "rmsnorm", where + " ssm_cfg", True)
        c["norm_before_gate"] = False
    c["norm"] = "rmsnorm" if _bool(cfg, "rms_norm", where, True) else "layernorm"
    c["norm_eps"] = 1e-5  # MambaLMHeadModel never passes an eps: every norm uses 1e-5
    c["residual_in_fp32"] = _bool(cfg, "residual_in_fp32", where, True)
    c["tie_embeddings"] = _bool(cfg, "tie_embeddings", where, True)
    c["bos_token_id"] = c["eos_token_id"] = c["pad_token_id"] = None  # set from the tokenizer
    if attn:
        c = _ss_with_attention(c, cfg, attn, where, weights)
    src = Source("state-spaces", c, prefix="backbone.", emb="backbone.embedding.weight")
    if c["tie_embeddings"]:
        src.optional_tied = "lm_head.weight"
    return src


# mamba_ssm's MHA constructor arguments (attn_cfg); spec hybrids §3.2.
SS_ATTN_KEYS = {"num_heads", "num_heads_kv", "head_dim", "mlp_dim", "qkv_proj_bias",
                "out_proj_bias", "softmax_scale", "causal", "d_conv", "rotary_emb_dim",
                "rotary_emb_base", "rotary_emb_interleaved"}
M2_ENTRY_KEYS = ("d_inner", "d_state", "d_conv", "conv_bias", "bias", "headdim", "nheads",
                 "ngroups", "chunk_size", "dt_limit", "gated_norm", "norm_before_gate")
# state-spaces configs record no context length: the KV caches hold this many tokens unless
# convert's max_context says otherwise (the Mamba-2 series was trained on 2048).
SS_ATTN_CONTEXT = 2048


def _ss_with_attention(c: dict, cfg: dict, attn, where: str, weights: WeightSet) -> dict:
    """A flat state-spaces config `c` with mamba_ssm MHA mixers at `attn` (attn_layer_idx), as a
    `layers` list (mamba2attn): the attention entries read attn_cfg as MHA(...) would."""
    n = c["n_layer"]
    if not isinstance(attn, list) or not all(isinstance(i, int) and not isinstance(i, bool)
                                             and 0 <= i < n for i in attn) \
            or len(set(attn)) != len(attn):
        raise ConversionError(f"{where}: config key 'attn_layer_idx' must be a list of distinct "
                              f"layer indices in [0, {n}), got {str(attn)[:80]}")
    # The layer kinds against the checkpoint: a Mamba mixer has A_log, an MHA mixer none.
    files = ", ".join(sorted(set(weights.files))) or "the checkpoint"
    for i in range(n):
        a_log = f"backbone.layers.{i}.mixer.A_log"
        if i in attn and a_log in weights.tensors:
            raise ConversionError(f"{where}: layer {i}: attn_layer_idx lists an attention layer "
                                  f"but in {files} it is a Mamba layer ('{a_log}')")
        if i not in attn and f"backbone.layers.{i}.mixer.in_proj.weight" in weights.tensors \
                and a_log not in weights.tensors:
            raise ConversionError(f"{where}: layer {i}: not in attn_layer_idx, but in {files} its "
                                  f"mixer has no '{a_log}' (an attention layer?)")
    a = cfg.get("attn_cfg", {}) or {}
    if not isinstance(a, dict):
        raise ConversionError(f"{where}: config key 'attn_cfg' must be an object")
    bad = sorted(set(a) - SS_ATTN_KEYS)
    if bad:
        raise ConversionError(f"{where}: unknown attn_cfg key(s) {bad} (mamba_ssm's MHA takes "
                              f"{', '.join(sorted(SS_ATTN_KEYS))})")
    w = where + " attn_cfg"
    d = c["d_model"]
    Hq = _int(a, "num_heads", w)
    kv = a.get("num_heads_kv")
    Hkv = Hq if kv is None else _int(a, "num_heads_kv", w)
    if Hq % Hkv:
        raise ConversionError(f"{where}: layer {attn[0]}: attn_cfg.num_heads_kv ({Hkv}) must "
                              f"divide num_heads ({Hq})")
    if a.get("head_dim") is None:
        if d % Hq:
            raise ConversionError(f"{where}: layer {attn[0]}: attn_cfg.num_heads ({Hq}) does not "
                                  f"divide d_model ({d}) and head_dim is not given")
        hd = d // Hq
    else:
        hd = _int(a, "head_dim", w, hi=1024)
    if a.get("mlp_dim", 0):
        raise ConversionError(f"{where}: attn_cfg.mlp_dim={a['mlp_dim']} (an MLP inside the "
                              f"attention mixer) is not supported")
    if not _bool(a, "causal", w, False):
        raise ConversionError(f"{where}: attn_cfg.causal must be true for a language model")
    if _bool(a, "rotary_emb_interleaved", w, False):
        raise ConversionError(f"{where}: attn_cfg.rotary_emb_interleaved=true is not supported "
                              f"(the rotate-half form is)")
    rd = _int(a, "rotary_emb_dim", w, 0, lo=0, hi=hd)
    if rd % 2:
        raise ConversionError(f"{where}: attn_cfg.rotary_emb_dim={rd} must be even")
    scale = a.get("softmax_scale")
    scale = hd ** -0.5 if scale is None else _num(a, "softmax_scale", w, None, 0.0, 1e6)
    entry = {"type": "attention", "num_heads": Hq, "num_kv_heads": Hkv, "head_dim": hd,
             "rotary_dim": rd, "rope_theta": _num(a, "rotary_emb_base", w, 10000.0, 1.0, 1e12),
             "window": 0, "qkv_bias": _bool(a, "qkv_proj_bias", w, True),
             "out_bias": _bool(a, "out_proj_bias", w, True), "scale": scale,
             "max_context": SS_ATTN_CONTEXT, "fused_qkv": True,
             "d_conv": _int(a, "d_conv", w, 0, lo=0, hi=8)}
    keys = MAMBA1_KEYS if c["architecture"] == "mamba1" else M2_ENTRY_KEYS
    out = _listed(c, c["architecture"] + "attn", keys, {})
    for i in attn:
        out["layers"][i] = dict(entry)
    return out


def validate_config(c: dict, where: str) -> None:
    """Types, ranges and consistency of a mambart config (docs/format.md), checked by the
    runtime's own reader and layer units (config_spec); ConversionError naming the key (and the
    layer, for a `layers` list)."""
    if "dtype" in c and c["dtype"] not in OUT_DTYPES:
        raise ConversionError(f"{where}: config key 'dtype' must be one of {OUT_DTYPES}")
    config_spec(c, where)


def _mambart_source(cfg: dict, where: str) -> Source:
    if "quantization" in cfg:
        raise ConversionError(f"{where}: the model is already quantized; convert (or quantize) "
                              f"from the unquantized model")
    validate_config(cfg, where)
    c = {k: v for k, v in cfg.items() if k not in ("dtype", "source")}
    return Source("mambart", c)


def read_source(src: Path, weights: Optional[WeightSet] = None,
                a_activation: Optional[str] = None) -> Tuple[Source, WeightSet]:
    """Parses `src`'s config, detects its format and opens its weights (lazily)."""
    src = Path(src)
    if not src.exists():
        raise ConversionError(f"{src}: no such file or directory")
    if not src.is_dir():
        raise ConversionError(f"{src}: not a directory (pass the checkpoint's directory)")
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        if (src / "params.json").is_file():
            cfg_path = src / "params.json"
        else:
            raise ConversionError(f"{src}: no config.json")
    cfg = load_json(cfg_path)
    where = str(cfg_path)
    if "mambart_format" in cfg:
        weights = weights or open_weights(src)
        return _mambart_source(cfg, where), weights
    if _is_mistral_config(cfg):
        if weights is None:
            found = [src / n for n in MISTRAL_WEIGHTS if (src / n).is_file()]
            if not found:
                raise ConversionError(f"{src}: no weights found (Mistral's native format: "
                                      f"expected {' or '.join(MISTRAL_WEIGHTS)})")
            weights = WeightSet(read_safetensors_header(str(found[0])), [str(found[0])],
                                "safetensors")
        return _mistral_source(cfg, where, weights), weights
    if cfg_path.name == "params.json":
        raise ConversionError(f"{cfg_path}: not a Mistral Mamba config (no 'dim' / 'n_layers')")
    weights = weights or open_weights(src)
    if "model_type" in cfg or "architectures" in cfg:
        return _hf_source(cfg, where, weights), weights
    if "d_model" in cfg and "n_layer" in cfg:
        return _ss_source(cfg, where, weights, a_activation), weights
    raise ConversionError(f"{where}: unrecognized config (neither a transformers config with "
                          f"model_type nor a state-spaces config with d_model / n_layer)")


# ---------------------------------------------------------------- planning and writing

@dataclass
class PlanItem:
    name: str
    tensor: LazyTensor
    out_dtype: str
    quant: Optional[str] = None  # "int8" / "int4": written as data + `name`_scale


# The matrices `quantize=` quantizes (issue 18): the in / out projections, Mamba-1's x_proj,
# attention's q / k / v / o projections and the MLP's up / gate / down projections, and, with
# quantize_head, the embedding and lm_head (tied or not). Conv weights, norms, A, D, dt_bias
# and dt_proj (tiny; the fused decode step reads it directly) keep their dtype.
_QUANT_SUFFIXES = tuple(f".mixer.{n}.weight" for n in (
    "in_proj", "out_proj", "x_proj", "q_proj", "k_proj", "v_proj", "o_proj", "up_proj",
    "gate_proj", "down_proj"))
_QUANT_HEAD = ("embedding.weight", "lm_head.weight")
QUANT_SCHEMES = ("int8", "int4")


def _quant_scheme(name: str, shape, scheme: Optional[str], group: int, head: bool) -> Optional[str]:
    """The scheme tensor `name` gets: None (kept float), or int8 / int4. int4 falls back to int8
    where K is not a multiple of the group."""
    if scheme is None or len(shape) != 2:
        return None
    if not (name.endswith(_QUANT_SUFFIXES) or (head and name in _QUANT_HEAD)):
        return None
    if scheme == "int4" and shape[1] % group:
        return "int8"
    return scheme


def _same_data(a: LazyTensor, b: LazyTensor) -> bool:
    if a.key == b.key:
        return True
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    import numpy as np

    for x, y in zip(a.chunks(), b.chunks()):
        if not np.array_equal(x, y):
            return False
    return True


def _source_dtype(weights: WeightSet, source: Source) -> str:
    """The dtype of the large matrices: that of the embedding (float64 becomes float32)."""
    t = weights.tensors.get(source.emb)
    dt = t.dtype if t is not None else "float32"
    return "float32" if dt not in OUT_DTYPES else dt


def plan(source: Source, weights: WeightSet, dtype: Optional[str], quantize: Optional[str] = None,
         group: int = 128, quantize_head: bool = True) -> Tuple[List[PlanItem], str]:
    """Validates every tensor against the config; returns what to write, in file order."""
    if dtype is not None and dtype not in OUT_DTYPES:
        raise ConversionError(f"dtype must be None, 'float32', 'float16' or 'bfloat16', got "
                              f"{dtype!r}")
    T = dtype or _source_dtype(weights, source)
    specs = config_spec(source.config, "the config")["tensors"]
    origin = {n: t.origin for n, t in weights.tensors.items()}
    files = ", ".join(sorted(set(weights.files))) or "the checkpoint"
    items: List[PlanItem] = []
    used = set()

    def checked(sname: str, shape: tuple) -> LazyTensor:
        t = weights.tensors.get(sname)
        if t is None:
            raise ConversionError(f"{files}: missing tensor '{sname}' (the config implies it)")
        if t.shape != shape:
            raise ConversionError(f"{origin[sname]}: tensor '{sname}' has shape {t.shape} but "
                                  f"the config implies {shape}")
        if t.dtype not in FLOAT_DTYPES:
            raise ConversionError(f"{origin[sname]}: tensor '{sname}' has dtype {t.dtype}, not a "
                                  f"floating-point type")
        used.add(sname)
        return t

    for spec in specs:
        canon, shape = spec["name"], tuple(spec["shape"])
        parts = source.stacked.get(canon)
        if parts:  # row blocks of the (rows, cols) view, each (rows / len(parts), cols)
            rows = math.prod(shape[:-1])
            if rows % len(parts):
                raise ConversionError(f"{files}: {len(parts)} tensors cannot stack into "
                                      f"'{canon}' {shape}")
            ts = [checked(n, (rows // len(parts), shape[-1])) for n in parts]
            bad = next((n for n, x in zip(parts, ts) if x.dtype != ts[0].dtype), None)
            if bad is not None:
                raise ConversionError(f"{origin[bad]}: tensor '{bad}' has dtype "
                                      f"{weights.tensors[bad].dtype} but '{parts[0]}' has "
                                      f"{ts[0].dtype} (they are stacked into one tensor)")
            t = StackedTensor(ts, shape)
        elif canon in source.lora:  # W (N, K) + B (N, r) · A (r, K)
            wn, an, bn = source.lora[canon]
            a = weights.tensors.get(an)
            r = a.shape[0] if a is not None and len(a.shape) == 2 else 0
            t = LoraTensor(checked(wn, shape), checked(an, (r, shape[1])),
                           checked(bn, (shape[0], r)))
        else:
            t = checked(source.source_name(canon), shape)
        q = _quant_scheme(canon, shape, quantize, group, quantize_head) if spec["matrix"] else None
        items.append(PlanItem(canon, t, "float32" if spec["store_fp32"] else T, q))
    extra = [n for n in weights.tensors
             if n not in used and not any(n.startswith(p) for p in source.ignored)]
    if source.optional_tied in extra:
        emb = weights.tensors[source.emb]
        head = weights.tensors[source.optional_tied]
        if not _same_data(emb, head):
            raise ConversionError(
                f"{origin[source.optional_tied]}: tensor '{source.optional_tied}' differs from "
                f"the embedding, but the config says the embeddings are tied")
        extra.remove(source.optional_tied)
    for n in list(extra):
        twin = source.tied_copy(n) if source.tied_copy else None
        if twin is None or twin not in weights.tensors:
            continue
        if not _same_data(weights.tensors[n], weights.tensors[twin]):
            raise ConversionError(f"{origin[n]}: tensor '{n}' differs from '{twin}', but the "
                                  f"config ties them (a shared block's later occurrence)")
        extra.remove(n)
    if extra:
        hint = ""
        if any(".mlp." in n or "norm2" in n for n in extra):
            hint = " (MLP layers are not supported)"
        elif any(re.search(r"\.(q_proj|k_proj|v_proj|attn|self_attn)\b", n) for n in extra):
            hint = " (attention layers are not supported)"
        shown = ", ".join(f"'{n}'" for n in extra[:5]) + (" ..." if len(extra) > 5 else "")
        raise ConversionError(f"{origin[extra[0]]}: unexpected tensor(s) {shown} not part of a "
                              f"{source.config['architecture']} model with this config{hint}")
    # 4-byte tensors first, then 2-byte, then quantized bytes: every tensor aligned to its
    # element size.
    items.sort(key=lambda it: 2 if it.quant else 0 if it.out_dtype == "float32" else 1)
    return items, T


def _eos_from_tokenizer(tok_path: Optional[Path]):
    if tok_path is None:
        return None
    try:
        tj = json.loads(read_bounded_text(tok_path, MAX_TOKENIZER_BYTES, "tokenizer file",
                                          ConversionError))
        for t in tj.get("added_tokens", []) or []:
            if t.get("content") in ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>"):
                return int(t["id"])
    except (ValueError, TypeError, KeyError, AttributeError):  # ConversionError too
        return None
    return None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _scale_dtype(T: str) -> str:
    return "bfloat16" if T == "bfloat16" else "float16"


def convert(src, dst, dtype: Optional[str] = None, *, overwrite: bool = False,
            progress: bool = False, tokenizer=None, source_info: Optional[dict] = None,
            a_activation: Optional[str] = None, announce: Optional[str] = None,
            quantize: Optional[str] = None, int4_group_size: int = 128,
            quantize_head: bool = True, max_context: Optional[int] = None) -> str:
    """Converts a checkpoint directory into a mambart model directory at `dst`.

    src: a transformers (MambaForCausalLM / Mamba2ForCausalLM / FalconMambaForCausalLM /
        NemotronHForCausalLM),
        state-spaces or Mistral native (Mamba-Codestral) checkpoint directory, or a mambart
        directory (to change its dtype).
    dtype: None keeps the checkpoint's dtype (float64 becomes float32); "float32", "float16" or
        "bfloat16" converts the large matrices. Parameters that feed exponentials (A_log, D,
        dt_bias, dt_proj.bias; Mamba-3's biases and MIMO projections) stay float32.
    overwrite: replace an existing `dst` (otherwise an existing non-empty `dst` is an error).
    progress: show a tqdm progress bar on stderr.
    tokenizer: a tokenizer.json to copy into `dst` (default: `src`/tokenizer.json if present).
    source_info: extra provenance merged into config["source"] (hub repo, revision, ...).
    a_activation: Mamba-3 checkpoints only: the A activation, "heavy_tail" (mamba_ssm since
        2026-06-02, the default) or "softplus" (checkpoints trained before); the checkpoint does
        not record it (spec 4.7), the converted config does.
    announce: a line written to stderr once the source has been checked, before writing.
    quantize: None, "int8" (per output channel, symmetric) or "int4" (groups of
        int4_group_size along K, symmetric); round to nearest (docs/format.md "Quantized
        weights"). Quantizes the in / out projections, Mamba-1's x_proj and the attention and
        MLP projections, plus the embedding and lm_head when quantize_head; int4 tensors whose K is not a multiple of the group
        are int8. Scales are stored in bfloat16 for a bfloat16 model, else float16.
    max_context: models with attention layers only: the tokens a sequence may hold (each
        attention layer's KV cache capacity, laid out in full in every sequence state); default
        the checkpoint's max_position_embeddings.

    Returns str(dst). Raises ConversionError naming the file and tensor on any bad input; an
    interrupted conversion leaves `dst` untouched (the output appears only when complete).
    """
    from ._args import path as _path_arg

    src_p = Path(_path_arg("src", src)).expanduser()
    dst_p = Path(_path_arg("dst", dst)).expanduser()
    check_not_nested(src_p, dst_p, ConversionError)  # before anything is read or replaced
    source, weights = read_source(src_p, a_activation=a_activation)
    if a_activation is not None:
        m3 = [e for e in source.config.get("layers", [])
              if isinstance(e, dict) and e.get("type") == "mamba3"]
        if not m3:
            raise ConversionError(f"{src_p}: a_activation applies to Mamba-3 checkpoints only")
        if a_activation not in A_ACTIVATIONS:
            raise ConversionError(f"a_activation must be one of {A_ACTIVATIONS}, got "
                                  f"{a_activation!r}")
        for e in m3:  # also re-converting a mambart directory
            e["a_activation"] = a_activation
    if max_context is not None:
        attn = [e for e in source.config.get("layers", [])
                if isinstance(e, dict) and e.get("type") == "attention"]
        if not attn:
            raise ConversionError(f"{src_p}: max_context applies to models with attention "
                                  f"layers only")
        if isinstance(max_context, bool) or not isinstance(max_context, int) or \
                not 1 <= max_context <= MAX_DIM:
            raise ConversionError(f"max_context must be an integer in [1, {MAX_DIM}], got "
                                  f"{max_context!r}")
        for e in attn:
            e["max_context"] = max_context
    if quantize is not None and quantize not in QUANT_SCHEMES:
        raise ConversionError(f"quantize must be None, 'int8' or 'int4', got {quantize!r}")
    if (isinstance(int4_group_size, bool) or not isinstance(int4_group_size, int)
            or int4_group_size < 32 or int4_group_size % 32):
        raise ConversionError(f"int4_group_size must be a positive multiple of 32, got "
                              f"{int4_group_size!r}")
    items, T = plan(source, weights, dtype, quantize, int4_group_size, quantize_head)

    tok_path = Path(os.fspath(tokenizer)) if tokenizer is not None else None
    if tok_path is None and (src_p / "tokenizer.json").is_file():
        tok_path = src_p / "tokenizer.json"
    if tok_path is not None and not tok_path.is_file():
        raise ConversionError(f"{tok_path}: tokenizer file not found")

    cfg = dict(source.config)
    if source.fmt == "state-spaces":
        eos = _eos_from_tokenizer(tok_path)
        if eos is not None and eos < cfg["vocab_size"]:
            cfg["bos_token_id"] = cfg["eos_token_id"] = eos
    elif source.fmt == "mistral":
        # Mistral's sentencepiece tokenizers (Mamba-Codestral's v3 included): <s> 1, </s> 2.
        eos = _eos_from_tokenizer(tok_path)
        cfg["bos_token_id"], cfg["eos_token_id"] = 1, (2 if eos is None else eos)
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if cfg.get(k) is not None and cfg[k] >= cfg["vocab_size"]:
            cfg[k] = None  # an id outside the vocabulary can never be generated
    cfg["dtype"] = T
    qt = {it.name: it.quant for it in items if it.quant}
    if qt:
        cfg["quantization"] = {"int4_group_size": int4_group_size,
                               "tensors": {n: qt[n] for n in sorted(qt)}}
    validate_config(cfg, "the converted config")  # what the runtime will check, before writing
    prov = {"format": source.fmt, "path": str(src_p.resolve()), "converter": CONVERTER_VERSION,
            "weights": [os.path.basename(f) for f in weights.files],
            "source_dtype": _source_dtype(weights, source)}
    if source.fmt == "mambart" and isinstance(source.config.get("source"), dict):
        prov["original"] = source.config["source"]
    if source_info:
        prov.update(source_info)
    cfg["source"] = prov

    if dst_p.exists():
        if dst_p.is_dir() and not any(dst_p.iterdir()):
            dst_p.rmdir()
        elif not overwrite:
            raise ConversionError(f"{dst_p}: already exists (pass overwrite=True / --force to "
                                  f"replace it)")
        elif not dst_p.is_dir():
            raise ConversionError(f"{dst_p}: exists and is not a directory")
        elif dst_p.resolve() == src_p.resolve():
            raise ConversionError(f"{dst_p}: the destination is the source directory")
    parent = dst_p.parent
    parent.mkdir(parents=True, exist_ok=True)
    if announce:
        sys.stderr.write(announce + "\n")
        sys.stderr.flush()
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst_p.name}.", suffix=".converting", dir=parent))
    os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes 0700: the user's umask, as mkdir gives
    bar = None
    try:
        SD = _scale_dtype(T)
        entries = []
        for it in items:
            if not it.quant:
                entries.append((it.name, it.out_dtype, it.tensor.shape))
        for it in items:  # scales (2-byte) before the quantized data (bytes)
            if it.quant:
                N, K = it.tensor.shape
                entries.append((it.name + "_scale", SD,
                                (N,) if it.quant == "int8" else (N, K // int4_group_size)))
        for it in items:
            if it.quant:
                N, K = it.tensor.shape
                entries.append((it.name, "int8" if it.quant == "int8" else "uint8",
                                (N, K) if it.quant == "int8" else (N, K // 2)))
        writer = SafetensorsWriter(
            str(tmp / "model.safetensors"), entries,
            metadata={"format": "mambart", "mambart_format": str(FORMAT_VERSION)})
        total = sum(it.tensor.numel * (4 if it.out_dtype == "float32" else 2) for it in items)
        if progress:
            from tqdm.auto import tqdm  # a widget in notebooks, text on a terminal

            bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                       desc=f"converting {src_p.name}", leave=True)
        try:
            quantized = {}
            for it in items:  # the quantized ones first: their scales precede their data
                if not it.quant:
                    continue
                what = f"{it.tensor.origin}: tensor '{source.source_name(it.name)}'"
                w = to_float32(it.tensor.read(), it.tensor.dtype).reshape(it.tensor.shape)
                try:
                    quantized[it.name] = quantize_matrix(w, it.quant, int4_group_size, SD, what)
                except ValueError as e:
                    raise ConversionError(str(e)) from None
                del w
            for it in items:
                if it.quant:
                    continue
                what = f"{it.tensor.origin}: tensor '{source.source_name(it.name)}'"
                for chunk in it.tensor.chunks(CHUNK_ELEMS):
                    out = convert_chunk(chunk, it.tensor.dtype, it.out_dtype, what)
                    writer.write(it.name, out)
                    if bar is not None:
                        bar.update(out.nbytes)
                    del out, chunk
            for phase in (1, 0):  # the scales, then the data (the header's order)
                for it in items:
                    if it.quant:
                        arr = quantized[it.name][phase]
                        writer.write(it.name + "_scale" if phase else it.name, arr)
                        if bar is not None:
                            bar.update(arr.nbytes)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        if tok_path is not None:
            tok_bytes = read_bounded(tok_path, MAX_TOKENIZER_BYTES, "tokenizer file",
                                     ConversionError)  # a regular file, bounded (issue 23)
            write_atomic(tmp / "tokenizer.json", lambda f: f.write(tok_bytes), "tokenizer file",
                         ConversionError)  # fsynced like the other files before the rename
        # config.json last: a directory without it is not a model directory.
        cfg_text = json.dumps(cfg, indent=2, allow_nan=False) + "\n"
        with open(tmp / "config.json", "w", encoding="utf-8") as f:
            f.write(cfg_text)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if overwrite and dst_p.exists():  # move the old one aside, then swap
            old = Path(tempfile.mkdtemp(prefix=f".{dst_p.name}.", suffix=".old", dir=parent))
            os.rename(dst_p, old / "x")
            os.rename(tmp, dst_p)
            shutil.rmtree(old, ignore_errors=True)
        else:
            # Fails (EEXIST / ENOTEMPTY) if another process finished the same output first.
            os.rename(tmp, dst_p)
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    return str(dst_p)

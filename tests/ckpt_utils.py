"""Test helpers for the checkpoint layer: tiny checkpoints in real formats, a byte-level BPE
tokenizer trained with `tokenizers`, and real Hugging Face cache layouts.

- train_tokenizer(path): a byte-level BPE (NFC, ByteLevel pre-tokenizer and decoder, like
  gpt-neox-20b's) with <|endoftext|> = 0 and <|padding|> = 1, trained on a small corpus.
- hf_model(arch, vocab_size, out_dir=None, **config): a random transformers model (fp32),
  saved with save_pretrained when out_dir is given.
- write_state_spaces(model, out_dir, vocab_size, pad_multiple, ...): the same weights as a
  state-spaces (mamba_ssm) checkpoint: upstream config keys and tensor names, written with
  torch.save (lm_head.weight sharing the embedding's storage when tied, as upstream saves it).
- add_to_hf_cache(cache, repo_id, files, commit=None): a repository snapshot in the layout
  huggingface_hub uses (blobs/<sha256>, snapshots/<commit>/<file> -> relative symlink,
  refs/main).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Dict, Optional, Union

CORPUS = [
    "The future of AI is bright, and the future of small models is brighter.",
    "Once upon a time there was a tiny state space model that loved to read.",
    "Mamba models keep a fixed-size state instead of a growing cache.",
    "Café, naïve, résumé, déjà vu: accents are bytes too. €100 or ¥200?",
    "Emoji 😀 and 🚀 take four bytes each; 日本語 takes three per character.",
    "the quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX!",
    "def main():\n    print('hello world')\n    return 0\n",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14159",
] * 8

SPECIALS = ["<|endoftext|>", "<|padding|>"]


def train_tokenizer(path: Union[str, Path], vocab_size: int = 300) -> Path:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def pad_to(v: int, m: int) -> int:
    return v + (-v) % m


def hf_model(arch: str, vocab_size: int, out_dir: Optional[Path] = None, seed: int = 0,
             safe_serialization: bool = True, max_shard_size=None, **kw):
    """A random MambaForCausalLM ("mamba1") or Mamba2ForCausalLM ("mamba2") with every
    parameter perturbed (hf_models.build)."""
    import hf_models

    if arch == "mamba1":
        cfg = hf_models.mamba1_config(vocab_size=vocab_size, **kw)
    else:
        cfg = hf_models.mamba2_config(vocab_size=vocab_size, **kw)
    model = hf_models.build(cfg, None, seed=seed)
    if out_dir is not None:
        kwargs = {"safe_serialization": safe_serialization}
        if max_shard_size is not None:
            kwargs["max_shard_size"] = max_shard_size
        model.save_pretrained(out_dir, **kwargs)
    return model


def state_spaces_config(model, vocab_size: int, pad_multiple: int) -> dict:
    """The upstream MambaConfig keys describing `model` (a transformers model)."""
    c = model.config
    if c.model_type == "mamba":
        ssm = {"d_state": c.state_size, "d_conv": c.conv_kernel, "expand": c.expand,
               "dt_rank": c.time_step_rank, "conv_bias": c.use_conv_bias, "bias": c.use_bias}
        out = {"d_model": c.hidden_size, "n_layer": c.num_hidden_layers,
               "vocab_size": vocab_size, "ssm_cfg": ssm, "rms_norm": True,
               "residual_in_fp32": c.residual_in_fp32, "fused_add_norm": True,
               "pad_vocab_size_multiple": pad_multiple}
        if not c.tie_word_embeddings:
            out["tie_embeddings"] = False
        return out
    ssm = {"layer": "Mamba2", "d_state": c.state_size, "d_conv": c.conv_kernel,
           "expand": c.expand, "headdim": c.head_dim, "ngroups": c.n_groups,
           "chunk_size": c.chunk_size, "conv_bias": c.use_conv_bias, "bias": c.use_bias}
    return {"d_model": c.hidden_size, "d_intermediate": 0, "n_layer": c.num_hidden_layers,
            "vocab_size": vocab_size, "ssm_cfg": ssm, "attn_layer_idx": [], "attn_cfg": {},
            "rms_norm": True, "residual_in_fp32": c.residual_in_fp32, "fused_add_norm": True,
            "pad_vocab_size_multiple": pad_multiple,
            "tie_embeddings": bool(c.tie_word_embeddings)}


def write_state_spaces(model, out_dir: Path, vocab_size: int, pad_multiple: int,
                       storage_dtype=None, config_overrides: Optional[dict] = None,
                       legacy: bool = False) -> Path:
    """Writes `model`'s weights as a state-spaces checkpoint (config.json + pytorch_model.bin).

    storage_dtype: e.g. torch.float16 to store like the published Mamba-2 checkpoints (D and,
    for Mamba-1, A_log stay float32 as upstream keeps them)."""
    import torch

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sd = {}
    for k, v in model.state_dict().items():
        k = k.replace("backbone.embeddings.", "backbone.embedding.")
        v = v.detach().clone()
        if storage_dtype is not None and not k.endswith((".D", ".A_log")):
            v = v.to(storage_dtype)
        sd[k] = v
    cfg = state_spaces_config(model, vocab_size, pad_multiple)
    if cfg.get("tie_embeddings", True):
        sd["lm_head.weight"] = sd["backbone.embedding.weight"]  # shared storage, as upstream
    if config_overrides:
        cfg.update(config_overrides)
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    kw = {"_use_new_zipfile_serialization": False} if legacy else {}
    torch.save(sd, out_dir / "pytorch_model.bin", **kw)
    return out_dir


def round_model_(model, dtype) -> None:
    """Rounds every parameter except D / A_log to `dtype` in place (kept in fp32): the fp32
    model then holds exactly the weights a checkpoint stored in `dtype` holds."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith((".D", ".A_log")):
                p.copy_(p.to(dtype).float())


FAKE_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def add_to_hf_cache(cache: Path, repo_id: str, files: Dict[str, Union[bytes, Path, str]],
                    commit: Optional[str] = None, ref: Optional[str] = "main") -> Path:
    """Puts `files` ({name in repo: bytes or a path}) into a huggingface_hub cache as snapshot
    `commit` of `repo_id` and points refs/<ref> at it. Returns the snapshot directory."""
    cache = Path(cache)
    owner, name = repo_id.split("/")
    repo = cache / f"models--{owner}--{name}"
    if commit is None:
        h = hashlib.sha1(repo_id.encode())
        for fname in sorted(files):
            src = files[fname]
            h.update(fname.encode())
            h.update(src if isinstance(src, bytes) else Path(src).read_bytes())
        commit = h.hexdigest()
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for fname, src in files.items():
        data = src if isinstance(src, bytes) else Path(src).read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        blob = repo / "blobs" / sha
        if not blob.exists():
            blob.write_bytes(data)
        link = snap / fname
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        os.symlink(os.path.relpath(blob, link.parent), link)
    if ref is not None:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snap


def dir_files(d: Path) -> Dict[str, Path]:
    return {p.name: p for p in Path(d).iterdir() if p.is_file()}


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
                 "\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def serve_model_dir(path: Union[str, Path]) -> Path:
    """A tiny Mamba-1 directory for the server tests: random weights (model_dirs), a trained
    byte-level tokenizer of the model's vocabulary size (320; eos = <|endoftext|> = 0) and a
    tokenizer_config.json with special tokens and CHAT_TEMPLATE."""
    from model_dirs import make_model_dir

    d = make_model_dir(path, "mamba1", vocab_size=320, vocab_size_padded=320, eos_token_id=0)
    train_tokenizer(d / "tokenizer.json", vocab_size=320)
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|endoftext|>", "eos_token": {"content": "<|endoftext|>"},
         "chat_template": CHAT_TEMPLATE}))
    return d

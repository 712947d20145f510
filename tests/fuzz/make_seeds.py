"""Regenerates the committed seed corpus (tests/fuzz/corpus/<target>/). Run from the repo root:

    python tests/fuzz/make_seeds.py

Needs torch (only for the pytorch_model.bin seeds, written with torch.save) and tokenizers.
The seeds are small valid inputs plus a few near-misses, so the fuzzer starts inside the
formats instead of having to discover them.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import struct
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402

import model_dirs  # noqa: E402
from harnesses import BASE  # noqa: E402

CORPUS = HERE / "corpus"


def _put(target: str, name: str, data: bytes) -> None:
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data)


def _st_bytes(entries, **kw) -> bytes:
    p = CORPUS / "_tmp.safetensors"
    model_dirs.write_safetensors(p, entries, **kw)
    b = p.read_bytes()
    p.unlink()
    return b


def _model_bytes(arch: str, dtype: str) -> bytes:
    c = model_dirs.config_dict(arch, **BASE[arch])
    p = CORPUS / "_tmp.safetensors"
    model_dirs.save_tensors(p, model_dirs.model_tensors(c, seed=1), dtype)
    b = p.read_bytes()
    p.unlink()
    return b


def safetensors_seeds():
    e = model_dirs.encode
    one = np.arange(6, dtype=np.float32).reshape(2, 3)
    seeds = {
        "f32": _st_bytes({"a": e(one, "float32")}),
        "mixed": _st_bytes({"a": e(one, "float16"), "b": e(one[0], "bfloat16"),
                            "c": e(np.zeros((), np.float32), "float32")},
                           metadata={"format": "pt"}),
        "empty": _st_bytes({}),
        "zero_size": _st_bytes({"z": e(np.zeros((0, 4), np.float32), "float32")}),
        "unpadded": _st_bytes({"a": e(one, "float16")}, pad_header=False),
        "int_dtype": _st_bytes({}, header_override={"i": {"dtype": "I32", "shape": [2],
                                                          "data_offsets": [0, 8]}}) + b"\0" * 8,
        "gap": _st_bytes({}, header_override={"a": {"dtype": "F32", "shape": [1],
                                                    "data_offsets": [4, 8]}}) + b"\0" * 8,
    }
    for name, b in seeds.items():
        _put("safetensors_cpp", name, b)
        _put("safetensors_py", name, b)


def config_seeds():
    rng = np.random.default_rng(0)
    for i in range(8):
        _put("config", f"r{i}", bytes(rng.integers(0, 256, size=24, dtype=np.uint8)))


def model_dir_seeds():
    for bit, arch in ((0, "mamba1"), (1, "mamba2")):
        _put("model_dir", f"weights-{arch}-bf16", bytes([bit]) + _model_bytes(arch, "bfloat16"))
        cfg = json.dumps(model_dirs.config_dict(arch, **BASE[arch])).encode()
        _put("model_dir", f"config-{arch}", bytes([bit | 2]) + cfg)


def torchzip_seeds():
    import torch

    sd = {"a.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3),
          "b": torch.ones(3, dtype=torch.float16), "c": torch.zeros(2, dtype=torch.bfloat16)}
    sd["tied"] = sd["a.weight"]
    sd["view"] = sd["a.weight"][1]
    for name, kw in (("zip", {}), ("legacy", {"_use_new_zipfile_serialization": False})):
        buf = io.BytesIO()
        torch.save(sd, buf, **kw)
        _put("torchzip", name, buf.getvalue())

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    buf = io.BytesIO()
    torch.save({"x": torch.ones(1)}, buf)
    # The same archive with its data.pkl replaced by a pickle that calls os.system.
    import zipfile

    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("data.pkl"):
                data = pickle.dumps({"x": Evil()}, protocol=2)
            z.writestr(info, data)
    _put("torchzip", "evil_global", out.getvalue())


def tokenizer_seeds():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(["hello world", "the quick brown fox", "wörld ☃ 123"] * 10, trainer)
    _put("tokenizer", "bpe_bytelevel.json", tok.to_str().encode())
    wl = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    wl.pre_tokenizer = pre_tokenizers.Whitespace()
    _put("tokenizer", "wordlevel.json", wl.to_str().encode())
    _put("tokenizer", "not_json", b"{\"version\": ")


def libfuzzer_config_seeds():
    """Seeds of the C++ config target (tests/fuzz/cpp/fuzz_config.cpp): whole config texts."""
    _put("libfuzzer_config", "mamba1.json", json.dumps(model_dirs.TINY_M1).encode())
    _put("libfuzzer_config", "mamba2.json", json.dumps(model_dirs.TINY_M2).encode())
    c = model_dirs.config_dict("mamba2", norm="layernorm", dt_limit=[0.001, 0.1], source={"a": 1},
                               pad_token_id=0, tie_embeddings=False, bias=True)
    _put("libfuzzer_config", "mamba2_variants.json", json.dumps(c).encode())


def convert_seeds():
    """Tiny transformers checkpoints (save_pretrained, safetensors) as the base directories of
    the `convert` target (tests/fuzz/data/hf-*), and their two files as seeds."""
    sys.path.insert(0, str(HERE.parent))
    import hf_models

    for bit, arch, cfg in (
            (0, "mamba1", hf_models.mamba1_config(vocab_size=32, hidden_size=8, state_size=4,
                                                  num_hidden_layers=1, time_step_rank=2)),
            (1, "mamba2", hf_models.mamba2_config(vocab_size=32, hidden_size=8, state_size=4,
                                                  num_hidden_layers=1, head_dim=4, num_heads=4,
                                                  n_groups=2, chunk_size=4))):
        d = HERE / "data" / f"hf-{arch}"
        if d.exists():
            shutil.rmtree(d)
        hf_models.build(cfg, d, seed=1)
        for f in list(d.iterdir()):
            if f.name not in ("config.json", "model.safetensors"):
                f.unlink()
        _put("convert", f"config-{arch}", bytes([bit | 2]) + (d / "config.json").read_bytes())
        _put("convert", f"weights-{arch}", bytes([bit]) + (d / "model.safetensors").read_bytes())


def state_file_seeds():
    """States of the base models (what harnesses.state_file uses them with): a prefill, a
    sampled generation's (with its RNG position), one with a pending token; and a near-miss."""
    import tempfile

    import mambart
    from harnesses import workdir

    tmp = Path(tempfile.mkdtemp())
    for arch in ("mamba1", "mamba2"):
        g = mambart.Generator(str(workdir() / f"base-{arch}"))
        states = {"prefill": g.prefill([1, 2, 3]),
                  "generated": g.generate([4, 5], max_new_tokens=3, temperature=0.8, seed=7,
                                          ignore_eos=True, return_state=True).state}
        for name, st in states.items():
            st.save(tmp / "s")
            _put("state_file", f"{arch}-{name}", (tmp / "s").read_bytes())
    b = (CORPUS / "state_file" / "mamba1-prefill").read_bytes()
    _put("state_file", "truncated", b[: len(b) // 2])
    shutil.rmtree(tmp)


def libfuzzer_run_args_seeds():
    """mambart-run argument vectors, NUL-separated (tests/fuzz/cpp/fuzz_run_args.cpp)."""
    seeds = {
        "basic": ["model", "--tokens", "1,2,3"],
        "all_flags": ["model", "--tokens", "0", "--max-new-tokens", "16", "--temperature", "0.8",
                      "--top-k", "40", "--top-p", "0.95", "--min-p", "0.05",
                      "--repetition-penalty", "1.1", "--seed", "18446744073709551615",
                      "--device", "cpu", "--ignore-eos"],
        "wrap_id": ["model", "--tokens", "4294967297"],
        "exponent": ["model", "--tokens", "1", "--max-new-tokens", "1e3"],
        "trailing": ["model", "--tokens", "1", "--temperature", "0.5abc"],
        "neg_seed": ["model", "--tokens", "1", "--seed", "-1"],
        "big_seed": ["model", "--tokens", "1", "--seed", "18446744073709551621"],
        "help": ["--help"],
    }
    for name, argv in seeds.items():
        _put("libfuzzer_run_args", name, "\0".join(argv).encode())


def main():
    if CORPUS.exists():
        shutil.rmtree(CORPUS)
    CORPUS.mkdir()
    safetensors_seeds()
    config_seeds()
    model_dir_seeds()
    torchzip_seeds()
    tokenizer_seeds()
    libfuzzer_config_seeds()
    convert_seeds()
    state_file_seeds()
    libfuzzer_run_args_seeds()
    total = sum(f.stat().st_size for f in CORPUS.rglob("*") if f.is_file())
    print(f"wrote {sum(1 for f in CORPUS.rglob('*') if f.is_file())} seeds, {total} bytes")


if __name__ == "__main__":
    main()

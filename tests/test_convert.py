"""mambart.convert: transformers and state-spaces checkpoints (safetensors, sharded, torch
pickles) converted without torch give transformers' logits on the same weights; bad inputs are
refused naming the file / tensor / key; the output appears only when complete; the conversion
streams (peak memory measured)."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import mambart
from ckpt_utils import (hf_model, pad_to, round_model_, train_tokenizer, write_state_spaces)
from hf_models import hf_logits
from mambart.errors import ConversionError

FP32_TOL = 2e-4
IDS = [1, 5, 7, 9, 3, 2, 11, 40, 41, 42, 7, 7, 90, 3, 0, 17, 18, 19, 20]  # 19: chunk 8 ∤ 19


def st_header(path: Path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def assert_logits_match(model_dir, model, vocab, tol=FP32_TOL):
    g = mambart.Generator(str(model_dir))
    ours = g.logits(IDS)
    ref = hf_logits(model, IDS).numpy()[:, :vocab]
    assert ours.shape == ref.shape
    err = float(np.abs(ours - ref).max())
    assert err < tol, f"max |mambart - transformers| = {err}"


# ---------------------------------------------------------------- transformers formats

def _save_bin(model, out: Path, shards: int = 1):
    """transformers 5 writes only safetensors; .bin checkpoints (older -hf repos) are what
    save_pretrained used to write: torch.save of the state dict, sharded with an index."""
    out.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(out)
    sd = model.state_dict()
    if shards == 1:
        torch.save(sd, out / "pytorch_model.bin")
        return
    names = list(sd)
    wm = {}
    for s in range(shards):
        fname = f"pytorch_model-{s + 1:05d}-of-{shards:05d}.bin"
        part = {k: sd[k] for k in names[s::shards]}
        torch.save(part, out / fname)
        wm.update({k: fname for k in part})
    (out / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": wm}))


HF_CASES = {
    "m1": ("mamba1", {}),
    "m1_bias_untied_fp16res": ("mamba1", dict(use_bias=True, tie_word_embeddings=False,
                                              residual_in_fp32=False)),
    "m2": ("mamba2", {}),
    "m2_tied_bias": ("mamba2", dict(tie_word_embeddings=True, use_bias=True)),
}


@pytest.mark.parametrize("case", list(HF_CASES))
@pytest.mark.parametrize("layout", ["safetensors", "sharded", "bin", "bin_sharded"])
def test_transformers_checkpoints_match_transformers(tmp_path, case, layout):
    arch, kw = HF_CASES[case]
    V = 104
    src = tmp_path / "hf"
    if layout in ("safetensors", "sharded"):
        model = hf_model(arch, V, src, max_shard_size="20KB" if layout == "sharded" else None,
                         **kw)
        if layout == "sharded":
            assert (src / "model.safetensors.index.json").is_file()
    else:
        model = hf_model(arch, V, None, **kw)
        _save_bin(model, src, shards=2 if layout == "bin_sharded" else 1)
    out = mambart.convert(src, tmp_path / "out")
    cfg = json.loads((Path(out) / "config.json").read_text())
    assert cfg["architecture"] == arch and cfg["dtype"] == "float32"
    assert cfg["source"]["format"] == "transformers"
    assert cfg["vocab_size"] == V and cfg["vocab_size_padded"] == V
    assert_logits_match(out, model, V)


def test_output_dtypes_alignment_and_fp32_params(tmp_path):
    src = tmp_path / "hf"
    model = hf_model("mamba1", 104, src)
    out = Path(mambart.convert(src, tmp_path / "bf16", dtype="bfloat16"))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16"
    hdr = st_header(out / "model.safetensors")
    hdr.pop("__metadata__")
    for name, t in hdr.items():
        small = name.endswith(("A_log", ".D", "dt_bias", "dt_proj.bias"))
        assert t["dtype"] == ("F32" if small else "BF16"), name
        size = 4 if t["dtype"] == "F32" else 2
        assert t["data_offsets"][0] % size == 0, name  # every tensor aligned to its element
    # bf16 weights give logits close to fp32 (loose: rounding of every matrix)
    assert_logits_match(out, model, 104, tol=0.2)
    # converting the bf16 mambart directory back to float32 is exact in the bf16 values
    back = Path(mambart.convert(out, tmp_path / "back", dtype="float32"))
    a = mambart.Generator(str(out), dtype="float32").logits(IDS)
    b = mambart.Generator(str(back)).logits(IDS)
    np.testing.assert_array_equal(a, b)
    assert json.loads((back / "config.json").read_text())["source"]["format"] == "mambart"


def test_bf16_rounding_is_round_to_nearest_even():
    from mambart._tensorio import bf16_bits_to_f32, f32_to_bf16_bits

    x = np.array([1.0, 1.00390625, 1.01171875, -2.5, 3.0e38, np.inf, -np.inf, np.nan,
                  1e-40], dtype=np.float32)
    ref = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    got = f32_to_bf16_bits(x)
    np.testing.assert_array_equal(got[:-2], ref[:-2])
    assert np.isnan(bf16_bits_to_f32(got)[7])
    y = np.random.default_rng(0).standard_normal(10000).astype(np.float32) * 100
    np.testing.assert_array_equal(
        f32_to_bf16_bits(y), torch.from_numpy(y).to(torch.bfloat16).view(torch.int16).numpy()
        .view(np.uint16))


def test_fp16_overflow_is_an_error_naming_the_tensor(tmp_path):
    src = tmp_path / "hf"
    model = hf_model("mamba1", 104, None)
    with torch.no_grad():
        model.backbone.layers[1].mixer.out_proj.weight[0, 0] = 1e6
    model.save_pretrained(src)
    with pytest.raises(ConversionError, match="layers.1.mixer.out_proj.weight.*overflow"):
        mambart.convert(src, tmp_path / "out", dtype="float16")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- state-spaces format

@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    return train_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json")


SS_CASES = {
    # name: (arch, hf kwargs, storage dtype, legacy torch.save format)
    "m1_fp32_tied": ("mamba1", dict(tie_word_embeddings=True), None, False),
    "m1_bf16_untied_legacy": ("mamba1", dict(tie_word_embeddings=False, use_bias=True),
                              torch.bfloat16, True),
    "m2_fp16_tied": ("mamba2", dict(tie_word_embeddings=True), torch.float16, False),
    "m2_fp32_untied_3groups": ("mamba2", dict(tie_word_embeddings=False, n_groups=1,
                                              num_heads=4, residual_in_fp32=False), None, False),
}


@pytest.mark.parametrize("case", list(SS_CASES))
def test_state_spaces_checkpoints_match_transformers(tmp_path, tokenizer_path, case):
    arch, kw, sdt, legacy = SS_CASES[case]
    V = 300  # the tokenizer's size (the upstream config's vocab_size)
    m = 16 if arch == "mamba2" else 8
    model = hf_model(arch, pad_to(V, m), None, **kw)
    if sdt is not None:
        round_model_(model, sdt)
    src = write_state_spaces(model, tmp_path / "ss", V, m, storage_dtype=sdt, legacy=legacy)
    shutil.copy(tokenizer_path, src / "tokenizer.json")
    out = Path(mambart.convert(src, tmp_path / "out", dtype="float32"))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["source"]["format"] == "state-spaces"
    assert cfg["vocab_size"] == V and cfg["vocab_size_padded"] == pad_to(V, m)
    assert cfg["tie_embeddings"] == kw["tie_word_embeddings"]
    assert cfg["eos_token_id"] == 0  # <|endoftext|> of the tokenizer
    assert (out / "tokenizer.json").read_bytes() == tokenizer_path.read_bytes()
    names = set(st_header(out / "model.safetensors")) - {"__metadata__"}
    assert ("lm_head.weight" in names) == (not kw["tie_word_embeddings"])
    assert_logits_match(out, model, V)
    if sdt is not None:  # dtype=None keeps the stored dtype
        nat = Path(mambart.convert(src, tmp_path / "native"))
        want = "float16" if sdt == torch.float16 else "bfloat16"
        assert json.loads((nat / "config.json").read_text())["dtype"] == want


def _ss_dir(tmp_path, arch="mamba2", **overrides):
    model = hf_model(arch, 112, None, tie_word_embeddings=True)
    return write_state_spaces(model, tmp_path / "ss", 100, 16, config_overrides=overrides)


SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def test_special_ids_are_always_written(tmp_path):
    """docs/format.md: bos/eos/pad_token_id are required keys, null meaning none. Checkpoints
    without them (a transformers config without the keys, a state-spaces config, which never
    has them) convert to configs stating all three as null, which load and generate; a mambart
    directory missing one is refused by the converter and the loader, naming the key."""
    hf = tmp_path / "hf"
    hf_model("mamba1", 112, hf)
    cfg = json.loads((hf / "config.json").read_text())
    for k in SPECIAL_IDS:
        cfg.pop(k, None)
    (hf / "config.json").write_text(json.dumps(cfg))
    for name, src in (("hf", hf), ("ss", _ss_dir(tmp_path))):
        out = Path(mambart.convert(src, tmp_path / f"out-{name}"))
        c = json.loads((out / "config.json").read_text())
        assert {k: c[k] for k in SPECIAL_IDS} == dict.fromkeys(SPECIAL_IDS), (name, c)
        r = mambart.Generator(str(out)).generate([1, 2], max_new_tokens=3)
        assert len(r.token_ids) == 3 and r.finish_reason == "length"  # no eos: never stops on one
    broken = shutil.copytree(out, tmp_path / "broken")
    c = json.loads((broken / "config.json").read_text())
    del c["eos_token_id"]
    (broken / "config.json").write_text(json.dumps(c))
    with pytest.raises(ConversionError, match="config key 'eos_token_id' is missing"):
        mambart.convert(broken, tmp_path / "re")
    with pytest.raises(mambart.ModelLoadError, match="config.json: config key 'eos_token_id' is "
                                                     "missing"):
        mambart.Generator(str(broken))


@pytest.mark.parametrize("overrides,pattern", [
    # attention layers convert since issue 19; these weights have a Mamba mixer at layer 1
    (dict(attn_layer_idx=[1], attn_cfg={"num_heads": 2, "causal": True}),
     "layer 1: attn_layer_idx lists an attention layer but .* it is a Mamba layer"),
    (dict(d_intermediate=64), "MLP layers"),
    # Mamba-3 converts since issue 15; these weights are Mamba-2 ones at another width
    (dict(ssm_cfg={"layer": "Mamba3"}), "headdim=64 does not divide d_inner=32"),
    (dict(ssm_cfg={"layer": "Mamba7"}), "unknown layer type.*Mamba7"),
    (dict(ssm_cfg={"layer": "Mamba2", "d_stat": 8}), "unknown ssm_cfg key.*d_stat"),
    (dict(n_layers=2), "unknown state-spaces config key.*n_layers"),
    (dict(ssm_cfg={"layer": "Mamba2", "d_state": 12, "headdim": 8, "ngroups": 2,
                   "chunk_size": 8, "norm_before_gate": True}), "norm_before_gate"),
])
def test_unsupported_state_spaces_configs_are_refused(tmp_path, overrides, pattern):
    src = _ss_dir(tmp_path, **overrides)
    with pytest.raises(ConversionError, match=pattern) as e:
        mambart.convert(src, tmp_path / "out")
    assert "config.json" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_bad_tensors_name_the_file_and_tensor(tmp_path):
    model = hf_model("mamba2", 112, None, tie_word_embeddings=True)
    sd = {k.replace("embeddings", "embedding"): v.clone() for k, v in model.state_dict().items()}
    cfg_src = write_state_spaces(model, tmp_path / "base", 100, 16)

    def variant(name, mutate):
        d = tmp_path / name
        d.mkdir()
        shutil.copy(cfg_src / "config.json", d / "config.json")
        s = dict(sd)
        mutate(s)
        torch.save(s, d / "pytorch_model.bin")
        return d

    d = variant("missing", lambda s: s.pop("backbone.layers.1.mixer.dt_bias"))
    with pytest.raises(ConversionError, match=r"missing tensor 'backbone\.layers\.1\.mixer\.dt_bias'"):
        mambart.convert(d, tmp_path / "o1")
    d = variant("shape", lambda s: s.__setitem__("backbone.layers.0.mixer.A_log", torch.zeros(5)))
    with pytest.raises(ConversionError,
                       match=r"pytorch_model\.bin: tensor 'backbone\.layers\.0\.mixer\.A_log' has "
                             r"shape \(5,\) but the config implies \(4,\)"):
        mambart.convert(d, tmp_path / "o2")
    d = variant("extra", lambda s: s.__setitem__("backbone.layers.0.mlp.fc1.weight",
                                                 torch.zeros(2, 2)))
    with pytest.raises(ConversionError, match=r"unexpected tensor.*mlp\.fc1.*MLP"):
        mambart.convert(d, tmp_path / "o3")
    d = variant("untied", lambda s: s.__setitem__("lm_head.weight",
                                                  s["lm_head.weight"].clone() + 1))
    with pytest.raises(ConversionError, match="lm_head.weight.*differs from the embedding"):
        mambart.convert(d, tmp_path / "o4")
    d = variant("int", lambda s: s.__setitem__("backbone.norm_f.weight",
                                               torch.zeros(16, dtype=torch.int64)))
    with pytest.raises(ConversionError, match="norm_f.weight.*int64"):
        mambart.convert(d, tmp_path / "o5")
    for i in range(1, 6):
        assert not (tmp_path / f"o{i}").exists()


def test_bad_directories_and_configs(tmp_path):
    with pytest.raises(ConversionError, match="no such file"):
        mambart.convert(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match="no config.json"):
        mambart.convert(tmp_path / "empty", tmp_path / "out")
    d = tmp_path / "noweights"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "mamba", "hidden_size": 8}))
    with pytest.raises(ConversionError, match="no weights found"):
        mambart.convert(d, tmp_path / "out")
    src = tmp_path / "hf"
    hf_model("mamba1", 104, src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(dict(cfg, model_type="zamba")))
    with pytest.raises(ConversionError, match="model_type 'zamba' is not supported"):
        mambart.convert(src, tmp_path / "out")
    (src / "config.json").write_text(json.dumps(dict(cfg, hidden_size=32)))
    with pytest.raises(ConversionError, match="has shape .* but the config implies"):
        mambart.convert(src, tmp_path / "out")
    (src / "config.json").write_text("{not json")
    with pytest.raises(ConversionError, match="config.json: not valid JSON"):
        mambart.convert(src, tmp_path / "out")
    (src / "config.json").write_text(json.dumps(cfg))
    with open(src / "model.safetensors", "r+b") as f:
        f.truncate(os.path.getsize(src / "model.safetensors") - 100)
    with pytest.raises(ConversionError, match="model.safetensors.*(outside|truncated)"):
        mambart.convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_hf_mamba2_config_with_bare_infinity(tmp_path):
    src = tmp_path / "hf"
    model = hf_model("mamba2", 112, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["time_step_limit"] = [0.0, float("inf")]
    (src / "config.json").write_text(json.dumps(cfg))  # Python writes a bare Infinity
    assert "Infinity" in (src / "config.json").read_text()
    out = Path(mambart.convert(src, tmp_path / "out"))
    text = (out / "config.json").read_text()
    assert "Infinity" not in text and json.loads(text)["dt_limit"] == [0.0, None]
    assert_logits_match(out, model, 112)


# ---------------------------------------------------------------- atomic output

def test_existing_destination_and_overwrite(tmp_path):
    src = tmp_path / "hf"
    hf_model("mamba1", 104, src)
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("x")
    with pytest.raises(ConversionError, match="already exists"):
        mambart.convert(src, dst)
    assert (dst / "keep.txt").exists()
    mambart.convert(src, dst, overwrite=True)
    assert not (dst / "keep.txt").exists() and (dst / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "out"]  # no temporaries left


def test_interrupted_conversion_leaves_nothing_that_looks_valid(tmp_path, monkeypatch):
    conv = importlib.import_module("mambart.convert")  # the module (mambart.convert is the function)

    src = tmp_path / "hf"
    hf_model("mamba2", 112, src)
    real = conv.convert_chunk
    calls = {"n": 0}

    def boom(*a, **k):
        calls["n"] += 1
        if calls["n"] == 10:
            raise KeyboardInterrupt  # Ctrl-C in the middle of writing the weights
        return real(*a, **k)

    monkeypatch.setattr(conv, "convert_chunk", boom)
    with pytest.raises(KeyboardInterrupt):
        mambart.convert(src, tmp_path / "out")
    assert calls["n"] == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_killed_conversion_leaves_no_destination(tmp_path):
    """SIGKILL (no cleanup runs at all): the destination still never appears; only a hidden
    temporary directory without config.json may remain."""
    src = tmp_path / "hf"
    hf_model("mamba1", 104, src)
    code = textwrap.dedent(f"""
        import importlib, os, signal
        conv = importlib.import_module("mambart.convert")
        real = conv.convert_chunk
        n = [0]
        def kill(*a, **k):
            n[0] += 1
            if n[0] == 5:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*a, **k)
        conv.convert_chunk = kill
        conv.convert({str(src)!r}, {str(tmp_path / 'out')!r})
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == -9, r.stderr
    assert not (tmp_path / "out").exists()
    for p in tmp_path.iterdir():
        if p.name != "hf":
            assert p.name.startswith(".out.") and not (p / "config.json").exists()


# ---------------------------------------------------------------- torch-free, streaming

def test_conversion_works_with_torch_unimportable(tmp_path, tokenizer_path):
    model = hf_model("mamba1", 304, None, tie_word_embeddings=True)
    src = write_state_spaces(model, tmp_path / "ss", 300, 8)
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # any `import torch` now raises ImportError
        import mambart
        mambart.convert({str(src)!r}, {str(tmp_path / 'out')!r}, dtype="bfloat16")
        assert "torch" not in sys.modules or sys.modules["torch"] is None
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
    assert_logits_match(tmp_path / "out", model, 300, tol=0.2)


def test_peak_memory_is_a_few_chunks_not_the_model(tmp_path):
    """A state-spaces checkpoint of ~300 MB (torch.save'd, written here from numpy) converted
    to bfloat16 in a fresh process: the peak RSS above the post-import baseline must stay far
    below the checkpoint size (the converter streams in 1 Mi-element chunks)."""
    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs Linux /proc to read the peak RSS")
    d, n_layer, V = 1024, 4, 50277
    E, N, R = 2 * d, 16, 64
    rng = np.random.default_rng(0)

    def rand(*shape):
        return torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))

    sd = {"backbone.embedding.weight": rand(50280, d)}
    for i in range(n_layer):
        p = f"backbone.layers.{i}."
        sd[p + "norm.weight"] = rand(d)
        sd[p + "mixer.in_proj.weight"] = rand(2 * E, d)
        sd[p + "mixer.conv1d.weight"] = rand(E, 1, 4)
        sd[p + "mixer.conv1d.bias"] = rand(E)
        sd[p + "mixer.x_proj.weight"] = rand(R + 2 * N, E)
        sd[p + "mixer.dt_proj.weight"] = rand(E, R)
        sd[p + "mixer.dt_proj.bias"] = rand(E)
        sd[p + "mixer.A_log"] = rand(E, N)
        sd[p + "mixer.D"] = rand(E)
        sd[p + "mixer.out_proj.weight"] = rand(d, E)
    sd["backbone.norm_f.weight"] = rand(d)
    sd["lm_head.weight"] = sd["backbone.embedding.weight"]
    src = tmp_path / "big"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({
        "d_model": d, "n_layer": n_layer, "vocab_size": V, "ssm_cfg": {"dt_rank": R},
        "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
        "pad_vocab_size_multiple": 8}))
    torch.save(sd, src / "pytorch_model.bin")
    size = os.path.getsize(src / "pytorch_model.bin")
    del sd
    assert size > 250e6
    code = textwrap.dedent(f"""
        import json, sys
        import mambart  # numpy, the native module, ...: the baseline
        def rss():  # peak RSS of this process image (VmHWM resets at exec; ru_maxrss does not)
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        base = rss()
        mambart.convert({str(src)!r}, {str(tmp_path / 'out')!r}, dtype="bfloat16")
        print(json.dumps({{"base": base, "peak": rss()}}))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    growth = m["peak"] - m["base"]
    print(f"checkpoint {size / 1e6:.0f} MB, peak RSS growth during conversion "
          f"{growth / 1e6:.1f} MB")
    assert growth < 64e6, f"peak RSS grew by {growth / 1e6:.0f} MB for a {size / 1e6:.0f} MB file"
    out = tmp_path / "out" / "model.safetensors"
    assert os.path.getsize(out) > size * 0.45  # bf16 halves the weights; fp32 params stay

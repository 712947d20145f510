"""Model names through a real Hugging Face cache layout (HF_HUB_CACHE + HF_HUB_OFFLINE=1, no
network): short names, owner/repo names, revisions, the gpt-neox tokenizer fallback, and the
conversion cache (reuse; a new revision, dtype or file converts again; interrupted conversions
leave no entry)."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import mambart
from ckpt_utils import (add_to_hf_cache, dir_files, hf_model, pad_to, round_model_,
                        train_tokenizer, write_state_spaces)
from hf_models import hf_logits
from mambart import hub
from mambart._cache import cache_root, ensure_converted
from mambart.errors import ConversionError, ModelLoadError

V = 300
IDS = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Checkpoints and tokenizers, built once; each test gets its own caches from them."""
    tmp = tmp_path_factory.mktemp("hubsrc")
    neox = train_tokenizer(tmp / "neox" / "tokenizer.json", vocab_size=300)
    own = train_tokenizer(tmp / "own" / "tokenizer.json", vocab_size=290)
    assert neox.read_bytes() != own.read_bytes()
    m1 = hf_model("mamba1", pad_to(V, 8), None, tie_word_embeddings=True, seed=1)
    m1b = hf_model("mamba1", pad_to(V, 8), None, tie_word_embeddings=True, seed=2)
    m2 = hf_model("mamba2", pad_to(V, 16), None, tie_word_embeddings=True, seed=3)
    round_model_(m2, torch.float16)
    ss1 = write_state_spaces(m1, tmp / "ss1", V, 8)
    ss1b = write_state_spaces(m1b, tmp / "ss1b", V, 8)
    ss2 = write_state_spaces(m2, tmp / "ss2", V, 16, storage_dtype=torch.float16)
    attn = write_state_spaces(m2, tmp / "attn", V, 16, storage_dtype=torch.float16,
                              config_overrides={"attn_layer_idx": [1],
                                                "attn_cfg": {"num_heads": 2, "causal": True}})
    hfm = hf_model("mamba2", 290, tmp / "hfrepo", seed=4)
    shutil.copy(own, tmp / "hfrepo" / "tokenizer.json")
    return dict(tmp=tmp, neox=neox, own=own, m1=m1, m1b=m1b, m2=m2, ss1=ss1, ss1b=ss1b, ss2=ss2,
                attn=attn, hfm=hfm, hfdir=tmp / "hfrepo")


@pytest.fixture
def env(world, tmp_path, monkeypatch):
    hf_cache = tmp_path / "hf"
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MAMBART_CACHE", str(tmp_path / "mambart"))
    add_to_hf_cache(hf_cache, "EleutherAI/gpt-neox-20b", {"tokenizer.json": world["neox"]})
    snaps = {
        "m1": add_to_hf_cache(hf_cache, "state-spaces/mamba-130m", dir_files(world["ss1"])),
        "m2": add_to_hf_cache(hf_cache, "state-spaces/mamba2-130m", dir_files(world["ss2"])),
        "attn": add_to_hf_cache(hf_cache, "state-spaces/mamba2attn-2.7b",
                                dir_files(world["attn"])),
        "hf": add_to_hf_cache(hf_cache, "someone/tiny-mamba2-hf", dir_files(world["hfdir"])),
    }
    return dict(world, hf_cache=hf_cache, snaps=snaps, mcache=tmp_path / "mambart")


def logits_match(model_dir_or_g, model, vocab=V, tol=2e-4):
    g = model_dir_or_g if isinstance(model_dir_or_g, mambart.Generator) else \
        mambart.Generator(str(model_dir_or_g))
    err = np.abs(g.logits(IDS) - hf_logits(model, IDS).numpy()[:, :vocab]).max()
    return err < tol


def test_short_name_resolves_through_the_hf_cache(env):
    out, tok = hub.load_model_dir("mamba-130m")
    out = Path(out)
    assert out.parent.parent == env["mcache"]  # <MAMBART_CACHE>/converted/<entry>
    assert Path(tok) == out / "tokenizer.json"
    assert Path(tok).read_bytes() == env["neox"].read_bytes()  # gpt-neox-20b fallback
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["source"]["repo"] == "state-spaces/mamba-130m"
    assert cfg["source"]["revision"] == env["snaps"]["m1"].name
    assert cfg["source"]["format"] == "state-spaces"
    assert logits_match(out, env["m1"])


def test_generator_by_short_and_repo_name_with_text(env):
    g = mambart.Generator("mamba2-130m")
    assert logits_match(g, env["m2"])
    assert g.config["architecture"] == "mamba2" and g.tokenizer is not None
    g2 = mambart.Generator("state-spaces/mamba2-130m")
    assert g2.model_dir == g.model_dir
    r = g.generate("The future of AI is", max_new_tokens=8, ignore_eos=True)
    assert r.text == g.tokenizer.decode(r.token_ids, skip_special_tokens=True)


def test_repo_tokenizer_is_preferred(env):
    out, tok = hub.load_model_dir("someone/tiny-mamba2-hf")
    assert Path(tok).read_bytes() == env["own"].read_bytes()
    assert logits_match(out, env["hfm"], vocab=290)


def test_cache_is_reused(env, monkeypatch):
    first, _ = hub.load_model_dir("mamba-130m")
    cache_mod = importlib.import_module("mambart._cache")

    def no_convert(*a, **k):
        raise AssertionError("converted again")

    monkeypatch.setattr(cache_mod, "convert", no_convert)
    again, _ = hub.load_model_dir("mamba-130m")
    assert again == first
    again, _ = hub.load_model_dir("state-spaces/mamba-130m")
    assert again == first


def test_new_revision_and_dtype_convert_again(env):
    first, _ = hub.load_model_dir("mamba-130m")
    bf16, _ = hub.load_model_dir("mamba-130m", dtype="bfloat16")
    assert bf16 != first
    assert json.loads((Path(bf16) / "config.json").read_text())["dtype"] == "bfloat16"
    # a new commit on main with other weights
    new_snap = add_to_hf_cache(env["hf_cache"], "state-spaces/mamba-130m",
                               dir_files(env["ss1b"]))
    assert new_snap.name != env["snaps"]["m1"].name
    second, _ = hub.load_model_dir("mamba-130m")
    assert second != first
    assert logits_match(second, env["m1b"]) and not logits_match(second, env["m1"])
    # the old revision by commit hash still resolves, to the old conversion
    old, _ = hub.load_model_dir("mamba-130m", revision=env["snaps"]["m1"].name)
    assert old == first
    assert logits_match(old, env["m1"])


def test_unknown_names_and_offline_misses(env):
    with pytest.raises(ModelLoadError, match="unknown model 'mamba-9000b'.*mamba-1.4b"):
        hub.load_model_dir("mamba-9000b")
    with pytest.raises(ModelLoadError, match="unknown model"):
        mambart.Generator("definitely-not-a-model")
    with pytest.raises(ModelLoadError, match="state-spaces/mamba-1.4b.*HF_HUB_OFFLINE"):
        mambart.Generator("mamba-1.4b")
    with pytest.raises(ModelLoadError, match="revision 'v9'.*HF_HUB_OFFLINE"):
        hub.load_model_dir("mamba-130m", revision="v9")


def test_hybrid_checkpoint_disagreeing_with_its_config_is_refused(env):
    # attention layers convert since issue 19; this fixture's layer 1 holds a Mamba mixer
    with pytest.raises(ConversionError, match="layer 1: attn_layer_idx lists an attention layer"):
        mambart.Generator("mamba2attn-2.7b")
    conv = env["mcache"] / "converted"
    assert not conv.exists() or not any(p for p in conv.iterdir() if not p.name.startswith("."))


def test_missing_neox_tokenizer_warns_and_runs_on_ids(env):
    shutil.rmtree(env["hf_cache"] / "models--EleutherAI--gpt-neox-20b")
    with pytest.warns(UserWarning, match="gpt-neox-20b"):
        out, tok = hub.load_model_dir("mamba-130m")
    assert tok is None
    g = mambart.Generator(out)
    assert g.tokenizer is None and len(g.generate(IDS, max_new_tokens=3).token_ids) == 3


def test_interrupted_cache_conversion_leaves_no_entry(env, monkeypatch):
    conv = importlib.import_module("mambart.convert")
    real = conv.convert_chunk
    n = {"calls": 0}

    def boom(*a, **k):
        n["calls"] += 1
        if n["calls"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(conv, "convert_chunk", boom)
    with pytest.raises(KeyboardInterrupt):
        hub.load_model_dir("mamba-130m")
    entries = list((env["mcache"] / "converted").iterdir())
    assert entries == []
    monkeypatch.setattr(conv, "convert_chunk", real)
    out, _ = hub.load_model_dir("mamba-130m")
    assert logits_match(out, env["m1"])


def test_local_directory_edits_convert_again(env, tmp_path):
    src = shutil.copytree(env["ss1"], tmp_path / "local")
    a = ensure_converted(src)
    assert ensure_converted(src) == a
    time.sleep(0.01)
    shutil.copy(env["ss1b"] / "pytorch_model.bin", Path(src) / "pytorch_model.bin")
    b = ensure_converted(src)
    assert b != a and logits_match(b, env["m1b"])
    g = mambart.Generator(str(src))  # the Generator path goes through the same cache
    assert str(g.model_dir) == b


def test_cache_root_defaults(monkeypatch, tmp_path):
    monkeypatch.delenv("MAMBART_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "mambart"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "mambart"
    monkeypatch.setenv("MAMBART_CACHE", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"


def test_short_names_cover_the_published_models():
    for n in ("mamba-130m", "mamba-370m", "mamba-790m", "mamba-1.4b", "mamba-2.8b",
              "mamba-2.8b-slimpj", "mamba2-130m", "mamba2-370m", "mamba2-780m", "mamba2-1.3b",
              "mamba2-2.7b"):
        assert hub.resolve_repo_id(n) == f"state-spaces/{n}"
    assert hub.resolve_repo_id("someone/x") == "someone/x"


def test_losing_a_conversion_race_uses_the_winner(env, monkeypatch):
    """Another process finishes the same cache entry between our write and our rename: our
    rename fails, our temporary is removed, and the winner's directory is returned."""
    conv = importlib.import_module("mambart.convert")
    real_fsync = conv._fsync_dir
    state = {"raced": False}

    def fsync_then_race(path):
        real_fsync(path)
        if not state["raced"] and Path(path).name.endswith(".converting"):
            state["raced"] = True
            dst = Path(path).parent / Path(path).name[1:].rsplit(".", 2)[0]
            conv.convert(env["snaps"]["m1"], dst)  # the "other process" wins

    monkeypatch.setattr(conv, "_fsync_dir", fsync_then_race)
    out, _ = hub.load_model_dir("mamba-130m")
    assert state["raced"]
    assert logits_match(out, env["m1"])
    left = [p.name for p in (env["mcache"] / "converted").iterdir()]
    assert left == [Path(out).name]


def test_online_resolution_downloads_only_the_needed_files(env, monkeypatch):
    """The online path (network mocked): the repository listing picks safetensors over .bin,
    and a network failure falls back to the cache."""
    import types

    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    calls = []
    listing = ["config.json", "pytorch_model.bin", "model.safetensors", "README.md"]

    def model_info(self, repo_id, revision=None, **kw):
        if repo_id == "state-spaces/mamba2-130m":
            raise ConnectionError("network is unreachable")
        return types.SimpleNamespace(sha="f" * 40, siblings=[
            types.SimpleNamespace(rfilename=f) for f in listing])

    real = huggingface_hub.snapshot_download

    def snapshot_download(repo_id, **kw):
        calls.append((repo_id, kw.get("allow_patterns"), kw.get("local_files_only", False)))
        return real(repo_id, **dict(kw, local_files_only=True, allow_patterns=None))

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    hub.snapshot("state-spaces/mamba-130m")
    repo, patterns, local = calls[-1]
    assert repo == "state-spaces/mamba-130m" and not local
    assert "model.safetensors" in patterns and "pytorch_model.bin" not in patterns
    assert "config.json" in patterns and "tokenizer.json" in patterns
    listing[:] = ["config.json", "pytorch_model.bin"]
    hub.snapshot("state-spaces/mamba-130m")
    assert "pytorch_model.bin" in calls[-1][1]
    # network down: the cached snapshot is used
    snap = hub.snapshot("state-spaces/mamba2-130m")
    assert Path(snap) == env["snaps"]["m2"] and calls[-1][2] is True
    listing[:] = ["config.json", "README.md"]
    with pytest.raises(ModelLoadError, match="no model.safetensors or pytorch_model.bin"):
        hub.snapshot("state-spaces/mamba-130m")

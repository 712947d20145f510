"""Mamba-3 layers (issue 15) on the CPU backend against a float64 numpy reference written from the
spec (tests/mamba3_ref.py, itself checked between its recurrent and attention forms), and the
runtime's invariants for the new layer type: prefill == token-by-token decode, a continued state
== one run, state save / load, a Mamba-2 / Mamba-3 hybrid, and clear errors for bad configs."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

import mambart
from mambart import _C

import mamba3_ref as ref
from model_dirs import TINY_M2, random_tensor, save_tensors, write_config

D_MODEL, VOCAB = 16, 100
IDS = [3, 17, 42, 5, 99, 0, 7, 64, 23, 11, 8, 2, 31, 77]

MODEL = dict(mambart_format=1, architecture="mamba3", d_model=D_MODEL, vocab_size=VOCAB,
             vocab_size_padded=104, norm="rmsnorm", norm_eps=1e-5, residual_in_fp32=True,
             tie_embeddings=True, bos_token_id=0, eos_token_id=1, pad_token_id=None,
             dtype="float32")


def m3(**kw) -> dict:
    e = dict(type="mamba3", d_inner=32, d_state=8, headdim=8, nheads=4, ngroups=1,
             is_mimo=False, mimo_rank=1, rope_fraction=0.5, chunk_size=16,
             is_outproj_norm=False, a_activation="heavy_tail", a_floor=1e-4)
    e.update(kw)
    return e


VARIANTS = {
    "siso": m3(),
    "siso_rope1_norm_groups": m3(rope_fraction=1.0, is_outproj_norm=True, ngroups=4),
    "siso_softplus": m3(a_activation="softplus"),
    "mimo2": m3(is_mimo=True, mimo_rank=2),
    "mimo4_norm_rope1": m3(is_mimo=True, mimo_rank=4, is_outproj_norm=True, rope_fraction=1.0),
    "mimo1_groups2": m3(is_mimo=True, mimo_rank=1, ngroups=2),
}


def make_dir(path: Path, layers, seed=0):
    """A model dir with Mamba-3 (and other) layers: mixer weights from mamba3_ref for Mamba-3
    layers, the runtime's spec for every other tensor. Returns (dir, host weights)."""
    cfg = dict(MODEL, n_layer=len(layers), layers=layers)
    path.mkdir(parents=True, exist_ok=True)
    write_config(path, cfg)
    rng = np.random.default_rng(seed)
    spec = _C.config_spec(json.dumps(cfg), "test")["tensors"]
    tensors = {}
    for i, e in enumerate(layers):
        if e["type"] == "mamba3":
            for k, v in ref.random_weights(e, D_MODEL, rng).items():
                tensors[f"layers.{i}.mixer.{k}"] = v
    for t in spec:
        if t["name"] not in tensors:
            tensors[t["name"]] = random_tensor(t["name"], tuple(t["shape"]), rng)
        assert tensors[t["name"]].shape == tuple(t["shape"]), t["name"]
    save_tensors(path / "model.safetensors", tensors)
    return path, tensors


def ref_logits(tensors, layers, ids, states=None):
    """The whole model in float64: embedding, per layer add + RMSNorm + Mamba-3, final norm,
    tied head. Returns (logits (L, V), per-layer final states)."""
    f = lambda k: np.asarray(tensors[k], np.float64)  # noqa: E731
    emb = f("embedding.weight")
    x = emb[ids]
    residual = None
    hidden = x
    out_states = []
    for i, e in enumerate(layers):
        residual = hidden if residual is None else residual + hidden
        normed = residual / np.sqrt(np.mean(residual ** 2, -1, keepdims=True) + 1e-5) * \
            f(f"layers.{i}.norm.weight")
        w = {k.split(f"layers.{i}.mixer.", 1)[1]: v for k, v in tensors.items()
             if k.startswith(f"layers.{i}.mixer.")}
        hidden, st = ref.recurrent(normed, w, e, None if states is None else states[i])
        out_states.append(st)
    residual = residual + hidden
    normed = residual / np.sqrt(np.mean(residual ** 2, -1, keepdims=True) + 1e-5) * \
        f("norm_f.weight")
    return (normed @ emb.T)[:, :VOCAB], out_states


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_cpu_matches_float64_reference(tmp_path, name):
    layers = [VARIANTS[name], VARIANTS[name]]
    d, tensors = make_dir(tmp_path / "m", layers, seed=1)
    got = mambart.Generator(str(d)).logits(IDS)
    want, _ = ref_logits(tensors, layers, IDS)
    err = np.abs(got - want).max() / np.abs(want).max()
    assert np.abs(want).max() > 0.5
    assert err <= 1e-4, f"{name}: relative error {err:.3g}"


@pytest.mark.parametrize("name", ["siso", "mimo4_norm_rope1"])
def test_prefill_equals_decode_steps_and_continuation(tmp_path, name):
    layers = [VARIANTS[name]] * 2
    d, tensors = make_dir(tmp_path / "m", layers, seed=2)
    g = mambart.Generator(str(d))
    full = g._g.logits(IDS, 0)
    np.testing.assert_allclose(g._g.logits(IDS, 1), full, atol=1e-4, rtol=0)
    np.testing.assert_allclose(g._g.logits(IDS, 5), full, atol=1e-4, rtol=0)
    # a prefill continued from a state == one run; the state round-trips through a file
    s = g.prefill(IDS[:6])
    path = tmp_path / "s.safetensors"
    s.save(path)
    cont = g.score(IDS[6:], state=g.load_state(path))
    whole = g.score(IDS)
    np.testing.assert_allclose(cont.logprobs, whole.logprobs[5:], atol=1e-4)
    names = [e["name"] for e in g._g.state_spec]
    assert names == ["angle", "ssm", "k", "v"]
    # the final states against the reference's
    _, st = ref_logits(tensors, layers, IDS[:6])
    host = mambart.load_state(path)._host
    for key in ("angle", "ssm", "k", "v"):
        np.testing.assert_allclose(host[key][1], st[1][key], atol=2e-5, err_msg=key)


def test_greedy_generation_continues_exactly(tmp_path):
    d, _ = make_dir(tmp_path / "m", [VARIANTS["mimo2"]] * 2, seed=3)
    g = mambart.Generator(str(d))
    full = g.generate(IDS, max_new_tokens=12, ignore_eos=True)
    a = g.generate(IDS, max_new_tokens=5, ignore_eos=True, return_state=True)
    b = g.generate(None, state=a.state, max_new_tokens=7, ignore_eos=True)
    assert a.token_ids + b.token_ids == full.token_ids
    rows = g.generate([IDS[:3], IDS], max_new_tokens=4, ignore_eos=True)
    assert rows[1].token_ids == g.generate(IDS, max_new_tokens=4, ignore_eos=True).token_ids


def test_angle_state_stays_reduced(tmp_path):
    """A long generation keeps the angle state in [0, 2 pi): fp32 angles keep their precision."""
    d, _ = make_dir(tmp_path / "m", [VARIANTS["siso"]], seed=4)
    g = mambart.Generator(str(d))
    r = g.generate(IDS, max_new_tokens=300, ignore_eos=True, return_state=True)
    angle = r.state._native.to_host()[0]
    assert angle.size and (angle >= 0).all() and (angle < 2 * np.pi).all()


def test_hybrid_with_mamba2(tmp_path):
    m2 = {"type": "mamba2", **{k: TINY_M2[k] for k in (
        "d_inner", "d_state", "d_conv", "conv_bias", "bias", "headdim", "nheads", "ngroups",
        "chunk_size", "dt_limit", "gated_norm", "norm_before_gate")}}
    d, _ = make_dir(tmp_path / "m", [m2, VARIANTS["siso"], m2, VARIANTS["mimo2"]], seed=5)
    g = mambart.Generator(str(d))
    full = g._g.logits(IDS, 0)
    np.testing.assert_allclose(g._g.logits(IDS, 1), full, atol=2e-4, rtol=0)
    names = [e["name"] for e in g._g.state_spec]
    # Mamba-2 and Mamba-3 ssm states of one shape (H, P, N) share a tensor; k differs by rank.
    assert names == ["conv", "ssm", "angle", "k@1", "v", "k@3"]


def _bad(tmp_path, entry, *fragments, exc=mambart.ModelLoadError):
    d, _ = make_dir(tmp_path / "good", [VARIANTS["siso"]])
    bad = tmp_path / "bad"
    bad.mkdir()
    os.symlink(d / "model.safetensors", bad / "model.safetensors")
    write_config(bad, dict(MODEL, n_layer=1, layers=[entry]))
    with pytest.raises(exc) as ei:
        mambart.Generator(str(bad))
    for f in fragments:
        assert f in str(ei.value), str(ei.value)


@pytest.mark.parametrize("change,fragments", [
    (dict(a_activation="relu"), ("layers[0]", "'a_activation'", "heavy_tail, softplus")),
    (dict(rope_fraction=0.75), ("layers[0]", "'rope_fraction'", "0.5, 1.0")),
    (dict(mimo_rank=2), ("layers[0]", "'mimo_rank'", "must be 1 when is_mimo is false")),
    (dict(ngroups=3), ("layers[0]", "'ngroups'", "must divide nheads")),
    (dict(headdim=6), ("layers[0]", "'nheads'", "must equal d_inner")),
    (dict(d_state=7), ("layers[0]", "'d_state'", "even")),
    (dict(a_floor=0), ("layers[0]", "'a_floor'", "(0, 1)")),
    (dict(is_mimo=True, mimo_rank=2), ("layers.0.mixer.in_proj.weight", "has shape")),
    (dict(is_outproj_norm=True), ("layers.0.mixer.norm.weight",)),
])
def test_bad_configs(tmp_path, change, fragments):
    _bad(tmp_path, m3(**change), *fragments)


def test_unsupported_sizes_and_flat_form(tmp_path):
    _bad(tmp_path, m3(d_state=512, d_inner=32), "d_state 512", exc=NotImplementedError)
    d = tmp_path / "flat"
    d.mkdir()
    write_config(d, dict(TINY_M2, architecture="mamba3"))
    with pytest.raises(mambart.ModelLoadError, match="'architecture' = 'mamba3' is not supported "
                                                     "in this form"):
        mambart.Generator(str(d))


@pytest.mark.cuda
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_cuda_matches_cpu(tmp_path, name):
    """The CUDA kernel (cuda/mamba3.cu) against the CPU backend: prefill logits, the decode-step
    path, and greedy generation."""
    layers = [VARIANTS[name]] * 2
    d, tensors = make_dir(tmp_path / "m", layers, seed=6)
    cpu = mambart.Generator(str(d))
    gpu = mambart.Generator(str(d), device="cuda")
    want = cpu.logits(IDS)
    scale = np.abs(want).max()
    assert np.abs(gpu.logits(IDS) - want).max() <= 1e-4 * scale
    assert np.abs(gpu._g.logits(IDS, 1) - want).max() <= 1e-4 * scale
    ref, _ = ref_logits(tensors, layers, IDS)
    assert np.abs(gpu.logits(IDS) - ref).max() <= 1e-4 * np.abs(ref).max()
    a = cpu.generate(IDS, max_new_tokens=16, ignore_eos=True)
    b = gpu.generate(IDS, max_new_tokens=16, ignore_eos=True)
    assert a.token_ids == b.token_ids


@pytest.mark.cuda
def test_cuda_batches_and_states(tmp_path):
    d, _ = make_dir(tmp_path / "m", [VARIANTS["mimo4_norm_rope1"], VARIANTS["siso"]], seed=8)
    cpu = mambart.Generator(str(d))
    gpu = mambart.Generator(str(d), device="cuda")
    prompts = [IDS[:3], IDS, IDS[:9]]
    rows = gpu.generate(prompts, max_new_tokens=8, ignore_eos=True)
    for pr, r in zip(prompts, rows):
        assert r.token_ids == cpu.generate(pr, max_new_tokens=8, ignore_eos=True).token_ids
    s = cpu.prefill(IDS[:6])
    path = tmp_path / "s.safetensors"
    s.save(path)
    cont = gpu.score(IDS[6:], state=gpu.load_state(path))
    whole = cpu.score(IDS)
    np.testing.assert_allclose(cont.logprobs, whole.logprobs[5:], atol=1e-4)


# ---------------------------------------------------------------- the official checkpoint format


def _write_official(path: Path, entry: dict, n_layer=2, seed=7):
    """A tiny checkpoint in the layout of state-spaces/mamba3-*: MambaConfig fields with
    ssm_cfg.layer = "Mamba3", a torch-pickled bf16 pytorch_model.bin (the fp32 parameters of
    spec 4.3 kept fp32), tied head. Returns the float32 values the file holds, by mambart name."""
    import torch

    rng = np.random.default_rng(seed)
    ssm = {"layer": "Mamba3", "d_state": entry["d_state"], "expand": 2,
           "headdim": entry["headdim"], "ngroups": entry["ngroups"],
           "rope_fraction": entry["rope_fraction"], "is_mimo": entry["is_mimo"],
           "is_outproj_norm": entry["is_outproj_norm"], "chunk_size": entry["chunk_size"],
           "dt_min": 0.001, "dt_max": 0.1, "A_floor": 1e-4}
    if entry["is_mimo"]:
        ssm["mimo_rank"] = entry["mimo_rank"]
    cfg = {"d_model": D_MODEL, "d_intermediate": 0, "n_layer": n_layer, "vocab_size": VOCAB,
           "ssm_cfg": ssm, "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True,
           "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 8,
           "tie_embeddings": True}
    fp32 = ("dt_bias", "B_bias", "C_bias", ".D", "mimo_x", "mimo_z", "mimo_o")
    sd, values = {}, {}

    def put(name, arr):
        t = torch.from_numpy(np.asarray(arr, np.float32))
        if not name.endswith(fp32):
            t = t.to(torch.bfloat16)
        sd["backbone." + name if name != "lm_head.weight" else name] = t
        values[name] = t.float().numpy()

    put("embedding.weight", rng.standard_normal((104, D_MODEL)) / 4)
    for i in range(n_layer):
        put(f"layers.{i}.norm.weight", 1 + 0.1 * rng.standard_normal(D_MODEL))
        for k, v in ref.random_weights(entry, D_MODEL, rng).items():
            put(f"layers.{i}.mixer.{k}", v)
    put("norm_f.weight", 1 + 0.1 * rng.standard_normal(D_MODEL))
    sd["lm_head.weight"] = sd["backbone.embedding.weight"]
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(cfg))
    torch.save(sd, path / "pytorch_model.bin")
    return values


@pytest.mark.parametrize("name,act", [("siso", None), ("mimo2", "softplus"),
                                      ("mimo4_norm_rope1", None)])
def test_official_checkpoint_converts_and_matches(tmp_path, name, act):
    pytest.importorskip("torch")
    entry = dict(VARIANTS[name], a_activation=act or "heavy_tail")
    values = _write_official(tmp_path / "ckpt", entry)
    out = Path(mambart.convert(tmp_path / "ckpt", tmp_path / "out", a_activation=act))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == "mamba3" and cfg["dtype"] == "bfloat16"
    assert cfg["layers"] == [entry, entry]
    g = mambart.Generator(str(out), dtype="float32")
    want, _ = ref_logits(values, [entry, entry], IDS)
    got = g.logits(IDS)
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err <= 1e-4, f"relative error {err:.3g}"


def test_official_checkpoint_bad_configs(tmp_path):
    pytest.importorskip("torch")
    _write_official(tmp_path / "ckpt", VARIANTS["siso"])
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    for change, frag in ((dict(rope_fraction=0.25), "rope_fraction=0.25 is not supported"),
                         (dict(headdim=6), "headdim=6 does not divide"),
                         (dict(mimo_vocab=3), "unknown ssm_cfg key.*mimo_vocab")):
        (tmp_path / "ckpt" / "config.json").write_text(
            json.dumps(dict(cfg, ssm_cfg=dict(cfg["ssm_cfg"], **change))))
        with pytest.raises(mambart.ConversionError, match=frag):
            mambart.convert(tmp_path / "ckpt", tmp_path / "out")
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(mambart.ConversionError, match="a_activation must be one of"):
        mambart.convert(tmp_path / "ckpt", tmp_path / "out", a_activation="relu")
    assert not (tmp_path / "out").exists()


def test_hub_short_name_uses_only_its_own_tokenizer(tmp_path, monkeypatch):
    """`mamba3-siso-187m` resolves through a real HF cache layout offline; without a
    tokenizer.json in the repository no other tokenizer (GPT-NeoX's) is substituted."""
    pytest.importorskip("torch")
    from ckpt_utils import add_to_hf_cache, dir_files, train_tokenizer

    values = _write_official(tmp_path / "ckpt", VARIANTS["siso"])
    neox = train_tokenizer(tmp_path / "neox" / "tokenizer.json", vocab_size=120)
    hf_cache = tmp_path / "hf"
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MAMBART_CACHE", str(tmp_path / "mambart"))
    add_to_hf_cache(hf_cache, "EleutherAI/gpt-neox-20b", {"tokenizer.json": neox})
    add_to_hf_cache(hf_cache, "state-spaces/mamba3-siso-187m", dir_files(tmp_path / "ckpt"))
    with pytest.warns(UserWarning, match="Llama-3 tokenizer"):
        g = mambart.Generator("mamba3-siso-187m", dtype="float32")
    assert g.tokenizer is None
    assert g.config["architecture"] == "mamba3"
    want, _ = ref_logits(values, [VARIANTS["siso"]] * 2, IDS)
    assert np.abs(g.logits(IDS) - want).max() / np.abs(want).max() <= 1e-4


def test_hub_mamba3_with_tiktoken_tokenizer(tmp_path, monkeypatch):
    """A Mamba-3 repository that ships a tiktoken tokenizer.model (Llama-3 style) and no
    tokenizer.json: the hub path converts it, and text works."""
    pytest.importorskip("torch")
    import base64

    from ckpt_utils import add_to_hf_cache, dir_files

    from mambart._tiktoken import byte_alphabet

    _write_official(tmp_path / "ckpt", VARIANTS["siso"])
    alpha = byte_alphabet()
    # 100 single-byte tokens (the vocabulary of the tiny model): bytes 32..131
    lines = [f"{base64.b64encode(bytes([b])).decode()} {i}" for i, b in enumerate(range(32, 132))]
    (tmp_path / "ckpt" / "tokenizer.model").write_text("\n".join(lines) + "\n")
    assert len(alpha) == 256
    hf_cache = tmp_path / "hf"
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MAMBART_CACHE", str(tmp_path / "mambart"))
    add_to_hf_cache(hf_cache, "state-spaces/mamba3-siso-187m", dir_files(tmp_path / "ckpt"))
    g = mambart.Generator("mamba3-siso-187m")
    assert g.tokenizer is not None
    ids = g.tokenizer.encode("Hi!").ids
    assert ids == [ord("H") - 32, ord("i") - 32, ord("!") - 32]
    r = g.generate("Hi!", max_new_tokens=4, ignore_eos=True)
    assert len(r.token_ids) == 4 and isinstance(r.text, str)


# ---------------------------------------------------------------- the chunked (SSD) scan form
# The scan op alone (_C._ops.mamba3_scan: proj in, y and the four states out) at real head sizes
# (P = 64, N = 128) against the float64 recurrent reference with identity projections
# (mamba3_ref.scan_reference), from random input states (a prefill continuing a chat), at
# lengths around the chunk boundaries (SISO chunks of 64 tokens, MIMO 64 / Rm).


def m3s(**kw) -> dict:
    e = dict(m3(), d_inner=128, d_state=128, headdim=64, nheads=2, chunk_size=64)
    e.update(kw)
    return e


SCAN_VARIANTS = {
    "siso": m3s(),
    "siso_rope1_norm_groups": m3s(rope_fraction=1.0, is_outproj_norm=True, ngroups=2),
    "siso_softplus": m3s(a_activation="softplus"),
    "mimo2": m3s(is_mimo=True, mimo_rank=2),
    "mimo4_norm_rope1": m3s(is_mimo=True, mimo_rank=4, is_outproj_norm=True, rope_fraction=1.0),
    "mimo1_groups2": m3s(is_mimo=True, mimo_rank=1, ngroups=2),
}
SCAN_OUT = ("y", "angle", "ssm", "k", "v")


def scan_backend(device, **env):
    """An _ops backend made while the MAMBART_* variables `env` are set (backends read their
    options when made); the environment is restored after."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return _C._ops.Backend(device)
    finally:
        for k, v in old.items():
            if v is None:
                del os.environ[k]
            else:
                os.environ[k] = v


def check_scan(got, want, rel, what):
    for name, g, w in zip(SCAN_OUT, got, want):
        d = np.abs(g - w)
        if name == "angle":  # compare on the circle (a value near 0 may come out near 2 pi)
            d = np.minimum(d, 2 * np.pi - d)
        scale = max(1.0, float(np.abs(w).max()))
        assert float(d.max()) <= rel * scale, f"{what} {name}: max err {d.max():.3g} (scale {scale:.3g})"


@pytest.fixture(scope="module")
def cpu_forms():
    return {"chunked": scan_backend("cpu", MAMBART_CPU_MAMBA3="chunked"),
            "recurrent": scan_backend("cpu", MAMBART_CPU_MAMBA3="recurrent")}


@pytest.mark.parametrize("L", [1, 63, 64, 65, 200])
@pytest.mark.parametrize("name", sorted(SCAN_VARIANTS))
def test_cpu_scan_forms_match_reference(cpu_forms, name, L):
    c = SCAN_VARIANTS[name]
    args, w, st = ref.scan_case(c, 2, L, np.random.default_rng(L + 7 * len(name)))
    want = ref.scan_reference(c, args, w, st)
    for form, be in cpu_forms.items():
        check_scan(be.mamba3_scan(*args), want, 2e-5, f"{name} L={L} cpu {form}")


def test_cpu_chunked_is_a_different_path(cpu_forms):
    """The two forms agree to rounding but are not the same computation (the option works)."""
    c = SCAN_VARIANTS["siso"]
    args, _, _ = ref.scan_case(c, 1, 130, np.random.default_rng(1))
    a = cpu_forms["chunked"].mamba3_scan(*args)[0]
    b = cpu_forms["recurrent"].mamba3_scan(*args)[0]
    assert not np.array_equal(a, b)
    np.testing.assert_allclose(a, b, atol=1e-5 * np.abs(b).max(), rtol=0)


@pytest.mark.parametrize("name", ["siso", "mimo4_norm_rope1"])
def test_cpu_chunked_model_prefill_and_continuation(tmp_path, monkeypatch, name):
    """Whole models with prompts spanning several chunks, from a state: the chunked CPU form
    against the float64 model reference (and the prefill's final states)."""
    monkeypatch.setenv("MAMBART_CPU_MAMBA3", "chunked")
    layers = [VARIANTS[name]] * 2
    d, tensors = make_dir(tmp_path / "m", layers, seed=11)
    g = mambart.Generator(str(d))
    ids = [int(t) for t in np.random.default_rng(3).integers(0, VOCAB, 150)]
    want, st = ref_logits(tensors, layers, ids)
    got = g.logits(ids)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    s = g.prefill(ids[:70])
    cont = g.score(ids[70:], state=s)
    whole = g.score(ids)
    np.testing.assert_allclose(cont.logprobs, whole.logprobs[69:], atol=1e-4)
    path = tmp_path / "s.safetensors"
    g.prefill(ids[70:], state=s).save(path)
    host = mambart.load_state(path)._host
    for key in ("ssm", "k", "v"):
        np.testing.assert_allclose(host[key][1], st[1][key], atol=2e-5, err_msg=key)


# ---- CUDA: the chunked kernels (cuda/mamba3_chunked.cu) run for L >= 32 -----------------------

CUDA_LENGTHS = [1, 31, 32, 63, 64, 65, 200, 1000]


@pytest.fixture(scope="module")
def gpu_forms():
    return {"chunked": scan_backend("cuda"),
            "recurrent": scan_backend("cuda", MAMBART_CUDA_SSD="recurrent"),
            "tf32": scan_backend("cuda", MAMBART_CUDA_SSD="tf32"),
            "cpu": scan_backend("cpu", MAMBART_CPU_MAMBA3="recurrent")}


@pytest.mark.cuda
@pytest.mark.parametrize("L", CUDA_LENGTHS)
@pytest.mark.parametrize("name", sorted(SCAN_VARIANTS))
def test_cuda_mamba3_chunked_scan(gpu_forms, name, L):
    """The CUDA chunked form (default, split TF32) against the float64 reference and the CPU
    backend; B = 2 rows from random input states. The recurrent CUDA form (MAMBART_CUDA_SSD=
    recurrent) against the reference too, and the plain-TF32 chunked form within 5e-3."""
    c = SCAN_VARIANTS[name]
    args, w, st = ref.scan_case(c, 2, L, np.random.default_rng(L + 7 * len(name)))
    want = ref.scan_reference(c, args, w, st)
    got = gpu_forms["chunked"].mamba3_scan(*args)
    check_scan(got, want, 5e-5, f"{name} L={L} cuda chunked vs float64")
    check_scan(got, gpu_forms["cpu"].mamba3_scan(*args), 5e-5, f"{name} L={L} cuda vs cpu")
    check_scan(gpu_forms["recurrent"].mamba3_scan(*args), want, 5e-5,
               f"{name} L={L} cuda recurrent vs float64")
    check_scan(gpu_forms["tf32"].mamba3_scan(*args), want, 5e-3, f"{name} L={L} cuda tf32")


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [
    dict(headdim=128, d_inner=256),                                   # two 64-wide p tiles
    dict(headdim=128, d_inner=256, is_outproj_norm=True),             # norm, P > 64: recurrent
    dict(d_state=256, rope_fraction=1.0),                             # 128 pairs: 64 KB smem
    dict(d_state=16, headdim=32, d_inner=96, nheads=3),               # small tiles, odd H
    dict(is_mimo=True, mimo_rank=3),                                  # 21 tokens, 63 rows
    dict(is_mimo=True, mimo_rank=8, is_outproj_norm=True),            # 8 tokens per chunk
    dict(d_state=30, headdim=24, d_inner=48),                         # N % 4 != 0: scalar loads
])
def test_cuda_mamba3_chunked_scan_shapes(gpu_forms, shape):
    c = m3s(**shape)
    c["nheads"] = c["d_inner"] // c["headdim"]
    for L in (97, 300):
        args, w, st = ref.scan_case(c, 2, L, np.random.default_rng(L))
        want = ref.scan_reference(c, args, w, st)
        check_scan(gpu_forms["chunked"].mamba3_scan(*args), want, 5e-5, f"{shape} L={L}")


@pytest.mark.cuda
def test_cuda_mamba3_chunked_is_a_different_path(gpu_forms):
    c = SCAN_VARIANTS["siso"]
    args, _, _ = ref.scan_case(c, 1, 200, np.random.default_rng(2))
    a = gpu_forms["chunked"].mamba3_scan(*args)[0]
    b = gpu_forms["recurrent"].mamba3_scan(*args)[0]
    assert not np.array_equal(a, b)


@pytest.mark.cuda
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_cuda_mamba3_long_prompts_match_cpu(tmp_path, name):
    """Models with prompts over several chunks (CUDA chunked prefill) against the CPU backend
    and the float64 reference: logits, a prefill continued from a state (the chat's second turn),
    batches of prompts of different lengths, greedy generation after a long prompt."""
    layers = [VARIANTS[name]] * 2
    d, tensors = make_dir(tmp_path / "m", layers, seed=12)
    cpu = mambart.Generator(str(d))
    gpu = mambart.Generator(str(d), device="cuda")
    ids = [int(t) for t in np.random.default_rng(4).integers(0, VOCAB, 300)]
    want, _ = ref_logits(tensors, layers, ids)
    scale = np.abs(want).max()
    assert np.abs(gpu.logits(ids) - want).max() <= 1e-4 * scale
    s = gpu.prefill(ids[:130])
    cont = gpu.score(ids[130:], state=s)
    np.testing.assert_allclose(cont.logprobs, cpu.score(ids).logprobs[129:], atol=1e-4)
    prompts = [ids[:250], ids[:40], ids[:3]]
    rows = gpu.generate(prompts, max_new_tokens=8, ignore_eos=True)
    for pr, r in zip(prompts, rows):
        assert r.token_ids == cpu.generate(pr, max_new_tokens=8, ignore_eos=True).token_ids

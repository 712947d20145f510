"""mamba2attn (state-spaces' MambaLMHeadModel with attn_layer_idx; issue 19, item 3): Mamba-2
layers with mamba_ssm's MHA mixers at the listed indices (fused in_proj, an optional causal conv
on qkv without activation, partial rotate-half RoPE, biases), converted torch-free from a
pytorch_model.bin. The oracle: the Mamba-2 mixers are transformers' own (Mamba2Mixer, whose
weights these are), the attention mixers the float64 numpy reference written from the spec
(tests/attention_ref.py), composed in the pre-norm residual loop."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import mambart
from attention_ref import model_logits
from ckpt_utils import state_spaces_config
from hf_models import build, mamba2_config
from mambart.errors import ConversionError

V, PAD = 112, 16
ATTN_CFG = {"num_heads": 4, "num_heads_kv": 2, "head_dim": 8, "causal": True, "d_conv": 4,
            "rotary_emb_dim": 4, "qkv_proj_bias": True, "out_proj_bias": False}
CASES = {
    # GQA, conv, partial RoPE, in_proj bias (the 2.7b checkpoint: MHA, no biases, rotary 64/128)
    "conv-rope-gqa": ([1, 3], ATTN_CFG),
    "plain-mha": ([0], {"num_heads": 2, "causal": True, "qkv_proj_bias": False,
                        "out_proj_bias": True, "rotary_emb_dim": 8, "rotary_emb_base": 500.0}),
}


def write_checkpoint(root, attn_idx, attn_cfg, seed=0):
    """A state-spaces mamba2attn checkpoint: a random transformers Mamba2 model's weights in
    mamba_ssm's names, with MHA weights at attn_idx. Returns (the Mamba2 model, directory)."""
    hf = build(mamba2_config(num_hidden_layers=5, vocab_size=V), None, seed=seed)
    d, g = hf.config.hidden_size, torch.Generator().manual_seed(seed + 1)
    hq = attn_cfg["num_heads"]
    hkv = attn_cfg.get("num_heads_kv") or hq
    hd = attn_cfg.get("head_dim") or d // hq
    qkv = hd * (hq + 2 * hkv)
    sd = {k.replace("backbone.embeddings.", "backbone.embedding."): v.detach().clone()
          for k, v in hf.state_dict().items()}
    rnd = lambda *s, scale: torch.randn(*s, generator=g) * scale
    for i in attn_idx:
        pre = f"backbone.layers.{i}.mixer."
        for k in [k for k in sd if k.startswith(pre)]:
            del sd[k]
        sd[pre + "in_proj.weight"] = rnd(qkv, d, scale=d ** -0.5)
        if attn_cfg.get("qkv_proj_bias", True):
            sd[pre + "in_proj.bias"] = rnd(qkv, scale=0.1)
        if attn_cfg.get("d_conv", 0):
            sd[pre + "conv1d.weight"] = rnd(qkv, 1, attn_cfg["d_conv"], scale=0.5)
            sd[pre + "conv1d.bias"] = rnd(qkv, scale=0.1)
        sd[pre + "out_proj.weight"] = rnd(d, hq * hd, scale=(hq * hd) ** -0.5)
        if attn_cfg.get("out_proj_bias", True):
            sd[pre + "out_proj.bias"] = rnd(d, scale=0.1)
    cfg = state_spaces_config(hf, V, PAD)
    cfg.update(attn_layer_idx=list(attn_idx), attn_cfg=dict(attn_cfg))
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(cfg))
    torch.save(sd, root / "pytorch_model.bin")
    return hf, root


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for i, (name, (idx, acfg)) in enumerate(CASES.items()):
        root = tmp_path_factory.mktemp(name)
        hf, src = write_checkpoint(root / "ss", idx, acfg, seed=30 + i)
        conv = mambart.convert(src, root / "mambart")
        out[name] = (hf, conv, mambart.Generator(conv, device="cpu"))
    return out


def ref_logits(hf, conv_dir, ids):
    import safetensors.numpy as stn

    cfg = json.loads(open(f"{conv_dir}/config.json").read())
    t = stn.load_file(f"{conv_dir}/model.safetensors")

    def mamba(i, u):  # transformers' Mamba2Mixer of layer i on the normed input
        with torch.no_grad():
            x = torch.tensor(u[None], dtype=torch.float32)
            return hf.backbone.layers[i].mixer(x)[0].double().numpy()

    return model_logits(cfg, t, ids, other=mamba)


def ids_for(n, seed=0):
    return [int(x) for x in np.random.default_rng(seed).integers(0, V, size=n)]


def test_conversion_lists_the_layers(models):
    _, d, g = models["conv-rope-gqa"]
    cfg = json.loads(open(f"{d}/config.json").read())
    assert cfg["architecture"] == "mamba2attn"
    assert [e["type"] for e in cfg["layers"]] == ["mamba2", "attention", "mamba2", "attention",
                                                  "mamba2"]
    a = cfg["layers"][1]
    assert (a["num_heads"], a["num_kv_heads"], a["head_dim"], a["rotary_dim"], a["d_conv"],
            a["fused_qkv"], a["qkv_bias"], a["out_bias"], a["max_context"]) == \
        (4, 2, 8, 4, 4, True, True, False, 2048)
    assert a["scale"] == pytest.approx(8 ** -0.5)


@pytest.mark.parametrize("name", list(CASES))
def test_logits_equal_the_reference(models, name):
    hf, d, g = models[name]
    ids = ids_for(37, seed=1)
    ref = ref_logits(hf, d, ids)[:, :V]
    got = g.logits(ids)
    err = float(np.abs(got - ref).max())
    assert err < 1e-4 * max(1.0, float(np.abs(ref).max())), f"{name}: max abs err {err}"


@pytest.mark.parametrize("name", list(CASES))
def test_prefill_equals_decode(models, name):
    _, _, g = models[name]
    ids = ids_for(30, seed=2)
    full = g.logits(ids)
    scale = max(1.0, float(np.abs(full).max()))
    assert np.abs(g._g.logits(ids, 1) - full).max() < 1e-4 * scale
    assert np.abs(g._g.logits(ids, 3) - full).max() < 1e-4 * scale  # conv state across chunks


def test_state_continuation_equals_one_run(models, tmp_path):
    _, _, g = models["conv-rope-gqa"]
    prompt = ids_for(9, seed=3)
    full = g.generate(prompt, max_new_tokens=16, ignore_eos=True)
    a = g.generate(prompt, max_new_tokens=6, ignore_eos=True, return_state=True)
    a.state.save(tmp_path / "s.safetensors")
    b = g.generate(None, state=g.load_state(tmp_path / "s.safetensors"), max_new_tokens=10,
                   ignore_eos=True)
    assert a.token_ids + b.token_ids == full.token_ids
    rows = g.generate([prompt, ids_for(4, seed=4)], max_new_tokens=16, ignore_eos=True)
    assert rows[0].token_ids == full.token_ids


@pytest.mark.parametrize("change,msg", [
    ({"causal": False}, "attn_cfg.causal must be true"),
    ({"rotary_emb_interleaved": True}, "rotary_emb_interleaved=true is not supported"),
    ({"mlp_dim": 64}, r"attn_cfg.mlp_dim=64 \(an MLP inside the attention mixer\)"),
    ({"window_size": 8}, r"unknown attn_cfg key\(s\) \['window_size'\]"),
    ({"num_heads_kv": 3}, r"layer 1: attn_cfg.num_heads_kv \(3\) must divide num_heads \(4\)"),
])
def test_bad_attn_cfg_is_refused(tmp_path, change, msg):
    _, src = write_checkpoint(tmp_path / "ss", [1], ATTN_CFG)
    cfg = json.loads((src / "config.json").read_text())
    cfg["attn_cfg"].update(change)
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match=msg):
        mambart.convert(src, tmp_path / "out")


def test_bad_attn_layer_idx_and_missing_tensors(tmp_path):
    _, src = write_checkpoint(tmp_path / "ss", [1], ATTN_CFG)
    cfg = json.loads((src / "config.json").read_text())
    for bad in ([5], [1, 1], ["1"]):
        (src / "config.json").write_text(json.dumps(dict(cfg, attn_layer_idx=bad)))
        with pytest.raises(ConversionError, match="'attn_layer_idx' must be a list of distinct"):
            mambart.convert(src, tmp_path / "out")
    # the config says attention at 2, the weights have it at 1
    (src / "config.json").write_text(json.dumps(dict(cfg, attn_layer_idx=[2])))
    with pytest.raises(ConversionError, match=r"layer 1: not in attn_layer_idx, but .* no "
                                              r"'backbone\.layers\.1\.mixer\.A_log'"):
        mambart.convert(src, tmp_path / "out")
    (src / "config.json").write_text(json.dumps(dict(cfg, attn_layer_idx=[1, 2])))
    with pytest.raises(ConversionError, match=r"layer 2: attn_layer_idx lists an attention "
                                              r"layer but .* it is a Mamba layer"):
        mambart.convert(src, tmp_path / "out")


def test_max_context_option(models, tmp_path):
    _, d, _ = models["plain-mha"]
    out = mambart.convert(d, tmp_path / "ctx", max_context=64)
    g = mambart.Generator(out, device="cpu")
    with pytest.raises(ValueError, match="max_context = 64"):
        g.generate(ids_for(60), max_new_tokens=5)

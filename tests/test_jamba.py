"""Jamba (transformers JambaForCausalLM; issue 19, item 4) on the CPU backend: Mamba-1 layers
with learned RMS norms on dt, B and C (the mamba1 unit's dt_bc_rms_weight) and NoPE GQA
attention by attn_layer_period / offset, each followed by an MoE (the softmax over all experts
at the top k, not renormalized; its per-expert tensors stacked by the converter) by
expert_layer_period / offset, else a SwiGLU MLP; converted torch-free and checked against
transformers' own class (tiny random weights): fp32 logits, greedy decoding, prefill == decode,
state save / load continuation, the prompt cache; the conversion's refusals name the layer."""

from __future__ import annotations

import json

import numpy as np
import pytest

import mambart
from hf_models import (FamilyChecks, assert_refused, check_logits, convert_cases, hf_dir, ids_for,
                       jamba_config)
from mambart import _C, hub
from mambart.errors import ConversionError

CASES = {
    # M+MLP, M+MoE, A+MLP, M+MoE: 5 experts top 2, GQA 4/2, untied head
    "jamba": lambda: jamba_config(),
    # attention first (period 3), every FFN an MoE (top 3 of 4), MHA, Mamba projection biases,
    # no conv bias, a 3-tap conv, expand 3, dt_rank "auto", a tied head, eps 1e-6
    "jamba-mha-allmoe": lambda: jamba_config(
        num_hidden_layers=5, attn_layer_period=3, attn_layer_offset=0, expert_layer_period=1,
        expert_layer_offset=0, num_experts=4, num_experts_per_tok=3, num_key_value_heads=4,
        mamba_proj_bias=True, mamba_conv_bias=False, mamba_d_conv=3, mamba_expand=3,
        mamba_dt_rank="auto", tie_word_embeddings=True, rms_norm_eps=1e-6),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return convert_cases(tmp_path_factory, CASES, seed=80, device="cpu")


def test_conversion_lays_out_the_layers(models):
    _, d, _ = models["jamba"]
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["architecture"] == "jamba"
    assert [e["type"] for e in cfg["layers"]] == ["mamba1", "mlp", "mamba1", "moe", "attention",
                                                  "mlp", "mamba1", "moe"]
    assert cfg["layers"][0] == {"type": "mamba1", "d_inner": 64, "d_state": 8, "d_conv": 4,
                                "conv_bias": True, "bias": False, "dt_rank": 4,
                                "dt_bc_rms_eps": 1e-3, "dt_bc_rms_weight": True}
    assert cfg["layers"][1] == {"type": "mlp", "intermediate_size": 40, "activation": "swiglu",
                                "bias": False}
    assert cfg["layers"][3] == {"type": "moe", "num_experts": 5, "top_k": 2,
                                "intermediate_size": 40, "shared_intermediate_size": 0,
                                "activation": "swiglu", "normalize": False, "routed_scale": 1.0}
    a = cfg["layers"][4]
    assert (a["num_heads"], a["num_kv_heads"], a["head_dim"], a["rotary_dim"], a["qkv_bias"],
            a["max_context"]) == (4, 2, 8, 0, False, 128)
    assert a["scale"] == 8 ** -0.5 and cfg["norm_eps"] == 1e-3
    _, d2, _ = models["jamba-mha-allmoe"]
    cfg2 = json.loads((d2 / "config.json").read_text())
    assert [e["type"] for e in cfg2["layers"][::2]] == ["attention", "mamba1", "mamba1",
                                                        "attention", "mamba1"]
    assert {e["type"] for e in cfg2["layers"][1::2]} == {"moe"}
    assert cfg2["layers"][2]["dt_rank"] == 2 and cfg2["tie_embeddings"] is True  # ceil(32 / 16)


def test_the_stacked_experts_are_transformers_experts(models):
    """The converted (X, 2I, d) / (X, d, I) expert tensors: [gate_e; up_e] and down_e."""
    from safetensors.numpy import load_file

    hf, d, _ = models["jamba"]
    t = load_file(str(d / "model.safetensors"))
    ex = hf.model.layers[1].feed_forward.experts
    np.testing.assert_array_equal(t["layers.3.mixer.experts.input_linear.weight"],
                                  ex.gate_up_proj.detach().numpy())
    np.testing.assert_array_equal(t["layers.3.mixer.experts.output_linear.weight"],
                                  ex.down_proj.detach().numpy())


class TestJamba(FamilyChecks):
    CASES = CASES
    STATE_CASES = tuple(CASES)
    CACHE_CASE = "jamba"


def test_norm_weights_change_the_model(models, tmp_path):
    """The learned dt / B / C norm weights are read: all ones gives other logits."""
    from safetensors.numpy import load_file, save_file

    _, d, g = models["jamba"]
    t = load_file(str(d / "model.safetensors"))
    names = [k for k in t if k.endswith(("dt_layernorm.weight", "b_layernorm.weight",
                                         "c_layernorm.weight"))]
    assert len(names) == 9  # three Mamba-1 layers
    for k in names:
        t[k] = np.ones_like(t[k])
    out = tmp_path / "ones"
    out.mkdir()
    (out / "config.json").write_text((d / "config.json").read_text())
    save_file(t, str(out / "model.safetensors"), metadata={"format": "mambart"})
    ids = ids_for(g.vocab_size, 20, seed=3)
    a, b = g.logits(ids), mambart.Generator(out, device="cpu").logits(ids)
    assert np.abs(a - b).max() > 1e-2 * np.abs(a).max()


def test_one_expert_means_mlps(models, tmp_path):
    """transformers builds a dense MLP where num_experts is 1: the conversion agrees."""
    from hf_models import build

    hf = build(jamba_config(num_experts=1, num_experts_per_tok=1), tmp_path / "hf", seed=3)
    out = mambart.convert(tmp_path / "hf", tmp_path / "out")
    g = mambart.Generator(out, device="cpu")
    assert {e["type"] for e in g.config["layers"][1::2]} == {"mlp"}
    check_logits(hf, g, ids_for(g.vocab_size, 20), "one expert")


# ---------------------------------------------------------------- refusals

def test_attention_period_disagreeing_with_the_tensors_names_the_layer(models, tmp_path):
    hf = models["jamba"][0]
    assert_refused(hf, tmp_path, r"layer 1: the config says attention but .* those of a "
                   r"Mamba-1 layer \('model\.layers\.1\.mamba\.in_proj\.weight'\)",
                   attn_layer_offset=1)
    assert_refused(hf, tmp_path / "b", r"layer 2: the config says Mamba-1 but .* an attention "
                   r"layer \('model\.layers\.2\.self_attn", attn_layer_offset=3)


def test_expert_period_disagreeing_with_the_tensors_names_the_layer(models, tmp_path):
    assert_refused(models["jamba"][0], tmp_path, r"layer 0: the config says an MoE "
                   r"\(num_experts 5, expert_layer_period 2, expert_layer_offset 0\) but .* "
                   r"'model\.layers\.0\.feed_forward\.router\.weight' is missing",
                   expert_layer_offset=0)


@pytest.mark.parametrize("change,msg", [
    ({"attn_layer_offset": 4}, r"config key 'attn_layer_offset' \(4\) must be smaller than "
                               r"'attn_layer_period' \(4\)"),
    ({"expert_layer_offset": 2}, r"config key 'expert_layer_offset' \(2\) must be smaller than "
                                 r"'expert_layer_period' \(2\)"),
    ({"num_key_value_heads": 3}, r"layer 2: num_key_value_heads \(3\) must divide "
                                 r"num_attention_heads \(4\)"),
    ({"num_attention_heads": 5}, r"layer 2: num_attention_heads \(5\) does not divide "
                                 r"hidden_size \(32\)"),
    ({"num_experts_per_tok": 6}, r"num_experts_per_tok \(6\) exceeds num_experts \(5\)"),
    ({"hidden_act": "gelu"}, r"'hidden_act' = 'gelu' is not supported"),
    ({"num_hidden_layers": 3}, r"num_hidden_layers is 3 but .* holds 'model\.layers\.3\."),
    ({"mamba_dt_rank": 5}, r"tensor 'model\.layers\.0\.mamba\.x_proj\.weight' has shape "
                           r"\(20, 64\) but the config implies \(21, 64\)"),
    # the router first: one expert more than the checkpoint holds
    ({"num_experts": 6}, r"tensor 'model\.layers\.1\.feed_forward\.router\.weight' has shape "
                         r"\(5, 32\) but the config implies \(6, 32\)"),
])
def test_bad_config_values_are_named(models, tmp_path, change, msg):
    assert_refused(models["jamba"][0], tmp_path, msg, **change)


def _edit_tensors(models, tmp_path, edit):
    from model_dirs import encode, write_safetensors
    import safetensors.numpy as stn

    src = hf_dir(models["jamba"][0], tmp_path)
    t = stn.load_file(str(src / "model.safetensors"))
    edit(t)
    write_safetensors(src / "model.safetensors",
                      {n: encode(v, "float16" if v.dtype == np.float16 else "float32")
                       for n, v in t.items()}, metadata={"format": "pt"})
    return src


EXPERT = "model.layers.3.feed_forward.experts.{}.{}_proj.weight"


@pytest.mark.parametrize("edit,msg", [
    (lambda t: t.update({EXPERT.format(2, "up"): t[EXPERT.format(2, "up")][:-1]}),
     r"tensor 'model\.layers\.3\.feed_forward\.experts\.2\.up_proj\.weight' has shape "
     r"\(39, 32\) but the config implies \(40, 32\)"),
    (lambda t: t.pop(EXPERT.format(4, "down")),
     r"missing tensor 'model\.layers\.3\.feed_forward\.experts\.4\.down_proj\.weight'"),
    (lambda t: t.update({EXPERT.format(5, "gate"): t[EXPERT.format(0, "gate")]}),
     r"unexpected tensor\(s\) 'model\.layers\.3\.feed_forward\.experts\.5\.gate_proj"),
    (lambda t: t.update({EXPERT.format(1, "gate"): t[EXPERT.format(1, "gate")].astype(
        np.float16)}),
     r"tensor 'model\.layers\.3\.feed_forward\.experts\.1\.gate_proj\.weight' has dtype "
     r"float16 but '.*experts\.0\.gate_proj\.weight' has float32 \(they are stacked"),
])
def test_bad_expert_tensors_are_named(models, tmp_path, edit, msg):
    src = _edit_tensors(models, tmp_path, edit)
    with pytest.raises(ConversionError, match=msg):
        mambart.convert(src, tmp_path / "out")


def test_dt_bc_rms_weight_needs_the_eps():
    from model_dirs import config_dict, listed_mamba1

    c = listed_mamba1(config_dict("mamba1"), "jamba", dt_bc_rms_weight=True)
    with pytest.raises(ValueError, match=r"layers\[0\].*'dt_bc_rms_weight'.*needs "
                                         r"'dt_bc_rms_eps'"):
        _C.config_spec(json.dumps(c), "config.json")
    c = listed_mamba1(config_dict("mamba1"), "jamba", dt_bc_rms_eps=1e-6, dt_bc_rms_weight=True)
    names = [t["name"] for t in _C.config_spec(json.dumps(c), "config.json")["tensors"]]
    assert "layers.0.mixer.dt_layernorm.weight" in names and \
        "layers.1.mixer.c_layernorm.weight" in names


def test_short_name():
    assert hub.resolve_repo_id("jamba-v0.1") == "ai21labs/Jamba-v0.1"

"""Granite-4.0-H (transformers GraniteMoeHybridForCausalLM; issue 19, item 4) on the CPU backend:
Mamba-2 / attention layers by layer_types, each with its FFN (the MoE plus the shared expert, or
the shared MLP alone), the embedding / residual / attention multipliers and the logits scaling,
converted torch-free and checked against transformers' own class (tiny random weights): fp32
logits, greedy decoding, prefill == decode, state save / load continuation, the prompt cache;
the conversion's refusals name the layer."""

from __future__ import annotations

import json

import numpy as np
import pytest

import mambart
from hf_models import FamilyChecks, assert_refused, convert_cases, granite_config, hf_dir, ids_for
from mambart.errors import ConversionError

CASES = {
    # MoE (5 experts, top 2) + shared expert, NoPE GQA 4/2, groups 2, untied head
    "granite-moe": lambda: granite_config(),
    # micro-like: dense (shared MLP only), RoPE, attention biases, Mamba projection biases, tied
    # head, MHA, attention first; the hub's layer_types names ("mamba" / "attention")
    "granite-dense-rope": lambda: granite_config(
        num_local_experts=0, position_embedding_type="rope", attention_bias=True,
        mamba_proj_bias=True, tie_word_embeddings=True, num_hidden_layers=3,
        layer_types=["attention", "mamba", "attention"], num_key_value_heads=4,
        mamba_n_groups=1, rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
    # the spec's multipliers (12, 1/128, 0.22, 8; Granite-like), top 3 of 6
    "granite-moe-spec-multipliers": lambda: granite_config(
        embedding_multiplier=12.0, residual_multiplier=1 / 128, attention_multiplier=0.22,
        logits_scaling=8.0, num_local_experts=6, num_experts_per_tok=3),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return convert_cases(tmp_path_factory, CASES, seed=40, device="cpu")


def test_conversion_lays_out_the_layers(models):
    hf, d, g = models["granite-moe"]
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["architecture"] == "granitemoehybrid"
    assert [e["type"] for e in cfg["layers"]] == ["mamba2", "moe", "attention", "moe", "mamba2",
                                                  "moe", "mamba2", "moe"]
    assert (cfg["embedding_multiplier"], cfg["residual_multiplier"], cfg["logits_scaling"]) == \
        (3.0, 0.5, 2.5)
    a = cfg["layers"][2]
    assert (a["num_heads"], a["num_kv_heads"], a["head_dim"], a["rotary_dim"], a["scale"]) == \
        (4, 2, 8, 0, 0.2)
    assert cfg["layers"][1] == {"type": "moe", "num_experts": 5, "top_k": 2,
                                "intermediate_size": 24, "shared_intermediate_size": 40,
                                "activation": "swiglu", "normalize": True, "routed_scale": 1.0}
    m = cfg["layers"][0]
    assert (m["nheads"], m["headdim"], m["ngroups"], m["d_state"], m["chunk_size"]) == \
        (8, 8, 2, 12, 8)
    _, d2, _ = models["granite-dense-rope"]
    cfg2 = json.loads((d2 / "config.json").read_text())
    assert cfg2["layers"][1] == {"type": "mlp", "intermediate_size": 40, "activation": "swiglu",
                                 "bias": False, "fused_gate_up": True}
    assert (cfg2["layers"][0]["rotary_dim"], cfg2["layers"][0]["rope_theta"]) == (8, 500.0)
    assert cfg2["tie_embeddings"] is True


class TestGranite(FamilyChecks):
    CASES = CASES
    STATE_CASES = ("granite-moe", "granite-dense-rope")
    CACHE_CASE = "granite-moe"


def test_fused_projections_option_keeps_the_logits(models, tmp_path):
    """The fused decode projections have no multipliers: the model runs the separate ops."""
    _, d, g = models["granite-moe"]
    mambart.set_options(fused_projections=True)
    try:
        g2 = mambart.Generator(d, device="cpu")
    finally:
        mambart.set_options(fused_projections=None)
    ids = ids_for(g.vocab_size, 12, seed=9)
    np.testing.assert_array_equal(g2._g.logits(ids, 1), g._g.logits(ids, 1))


# ---------------------------------------------------------------- refusals

def _hf_dir(models, tmp_path, name="granite-moe", **change):
    return hf_dir(models[name][0], tmp_path, **change)


def test_layer_types_disagreeing_with_the_tensors_name_the_layer(models, tmp_path):
    src = _hf_dir(models, tmp_path, layer_types=["mamba", "mamba", "attention", "mamba"])
    with pytest.raises(ConversionError, match=r"layer 1: the config says Mamba-2 but .* an "
                                              r"attention layer \('model\.layers\.1\.self_attn"
                                              r"\.q_proj\.weight'\)"):
        mambart.convert(src, tmp_path / "out")


def test_fewer_layers_than_the_checkpoint_is_refused(models, tmp_path):
    src = _hf_dir(models, tmp_path, num_hidden_layers=3, layer_types=["mamba", "attention",
                                                                      "mamba"])
    with pytest.raises(ConversionError, match=r"num_hidden_layers is 3 but .* holds "
                                              r"'model\.layers\.3\."):
        mambart.convert(src, tmp_path / "out")


def test_unknown_layer_type_names_the_layer(models, tmp_path):
    src = _hf_dir(models, tmp_path, layer_types=["mamba", "attention", "conv", "mamba"])
    with pytest.raises(ConversionError, match=r"layer 2: layer_types entry 'conv' is not a "
                                              r"known layer type"):
        mambart.convert(src, tmp_path / "out")


def test_experts_disagreeing_with_the_tensors_name_the_layer(models, tmp_path):
    src = _hf_dir(models, tmp_path, num_local_experts=0)
    with pytest.raises(ConversionError, match=r"layer 0: num_local_experts is 0 but .* "
                                              r"'model\.layers\.0\.block_sparse_moe\.router\."
                                              r"layer\.weight' is present"):
        mambart.convert(src, tmp_path / "out")
    src = _hf_dir(models, tmp_path / "b", name="granite-dense-rope", num_local_experts=4)
    with pytest.raises(ConversionError, match=r"layer 0: num_local_experts is 4 but .* is "
                                              r"missing"):
        mambart.convert(src, tmp_path / "out")


@pytest.mark.parametrize("change,msg", [
    ({"num_key_value_heads": 3}, r"layer 1: num_key_value_heads \(3\) must divide "
                                 r"num_attention_heads \(4\)"),
    ({"num_attention_heads": 5}, r"layer 1: num_attention_heads \(5\) does not divide "
                                 r"hidden_size \(32\)"),
    ({"mamba_n_groups": 3}, r"layer 0: mamba_n_groups \(3\) must divide mamba_n_heads \(8\)"),
    ({"mamba_n_heads": 6}, r"layer 0: mamba_n_heads x mamba_d_head \(6 x 8\) must equal "
                           r"mamba_expand x hidden_size \(64\)"),
    ({"mamba_n_heads": 6, "mamba_d_head": "auto"}, r"layer 0: mamba_n_heads \(6\) does not "
                                                   r"divide mamba_expand x hidden_size \(64\)"),
    ({"num_experts_per_tok": 6}, r"num_experts_per_tok \(6\) exceeds num_local_experts \(5\)"),
    ({"hidden_act": "gelu"}, r"'hidden_act' = 'gelu' is not supported"),
    ({"position_embedding_type": "alibi"}, r"'position_embedding_type' = 'alibi' is not "
                                           r"supported"),
])
def test_bad_config_values_are_named(models, tmp_path, change, msg):
    assert_refused(models["granite-moe"][0], tmp_path, msg, **change)


def test_expert_tensor_of_the_wrong_shape_names_it(models, tmp_path):
    src = _hf_dir(models, tmp_path, intermediate_size=20)
    with pytest.raises(ConversionError, match=r"tensor 'model\.layers\.0\.block_sparse_moe\."
                                              r"input_linear\.weight' has shape \(5, 48, 32\) "
                                              r"but the config implies \(5, 40, 32\)"):
        mambart.convert(src, tmp_path / "out")

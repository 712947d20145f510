"""Bamba (transformers BambaForCausalLM; issue 19, item 4) on the CPU backend: Mamba-2 layers and
attention at attn_layer_indices (GQA, RoPE on the first half of each head), each followed by a
SwiGLU MLP, converted torch-free and checked against transformers' own class (tiny random
weights): fp32 logits, greedy decoding, prefill == decode, state save / load continuation; the
conversion's refusals name the layer."""

from __future__ import annotations

import json

import pytest

import mambart
from hf_models import FamilyChecks, assert_refused, bamba_config, convert_cases, hf_dir
from mambart.errors import ConversionError

CASES = {
    "bamba": lambda: bamba_config(),
    # two attention layers (one first), MHA, attention and MLP biases, Mamba projection biases,
    # a tied head, rope_theta 500
    "bamba-mha-bias": lambda: bamba_config(
        attn_layer_indices=[0, 2], num_key_value_heads=4, attention_bias=True, mlp_bias=True,
        mamba_proj_bias=True, tie_word_embeddings=True, mamba_n_groups=1,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return convert_cases(tmp_path_factory, CASES, seed=60, device="cpu")


def test_conversion_lays_out_the_layers(models):
    _, d, _ = models["bamba"]
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["architecture"] == "bamba"
    assert [e["type"] for e in cfg["layers"]] == ["mamba2", "mlp", "attention", "mlp", "mamba2",
                                                  "mlp", "mamba2", "mlp"]
    a = cfg["layers"][2]
    assert (a["num_heads"], a["num_kv_heads"], a["head_dim"], a["rotary_dim"]) == (4, 2, 8, 4)
    assert a["scale"] == 8 ** -0.5 and a["max_context"] == 128
    assert cfg["layers"][1] == {"type": "mlp", "intermediate_size": 48, "activation": "swiglu",
                                "bias": False}
    assert "embedding_multiplier" not in cfg


class TestBamba(FamilyChecks):
    CASES = CASES
    STATE_CASES = ("bamba",)
    CACHE_CASE = "bamba"


# ---------------------------------------------------------------- refusals

def _hf_dir(models, tmp_path, name="bamba", **change):
    return hf_dir(models[name][0], tmp_path, **change)


def test_attention_indices_disagreeing_with_the_tensors_name_the_layer(models, tmp_path):
    src = _hf_dir(models, tmp_path, attn_layer_indices=[2])
    with pytest.raises(ConversionError, match=r"layer 1: the config says Mamba-2 but .* an "
                                              r"attention layer \('model\.layers\.1\.self_attn"):
        mambart.convert(src, tmp_path / "out")


@pytest.mark.parametrize("change,msg", [
    ({"attn_layer_indices": [1, 7]}, r"'attn_layer_indices' entry 7 is not a layer index in "
                                     r"\[0, 4\)"),
    ({"attn_layer_indices": "1"}, r"'attn_layer_indices' must be a list"),
    ({"num_key_value_heads": 3}, r"layer 1: num_key_value_heads \(3\) must divide "
                                 r"num_attention_heads \(4\)"),
    ({"mamba_n_groups": 3}, r"layer 0: mamba_n_groups \(3\) must divide mamba_n_heads \(8\)"),
    ({"num_hidden_layers": 3}, r"num_hidden_layers is 3 but .* holds 'model\.layers\.3\."),
])
def test_bad_config_values_are_named(models, tmp_path, change, msg):
    assert_refused(models["bamba"][0], tmp_path, msg, **change)

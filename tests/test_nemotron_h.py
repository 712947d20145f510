"""Nemotron-H (transformers NemotronHForCausalLM; issue 19, item 3) on the CPU backend: Mamba-2,
attention and MLP blocks by hybrid_override_pattern, converted torch-free and checked against
transformers' own class (tiny random weights): fp32 logits, greedy decoding, prefill == decode,
state save / load continuation, the prompt cache; the conversion's refusals name the layer."""

from __future__ import annotations

import json

import numpy as np
import pytest

import mambart
from hf_models import (FamilyChecks, assert_refused, convert_cases, hf_dir, ids_for,
                       nemotron_h_config)
from mambart.errors import ConversionError

CASES = {
    # GQA 4/2, groups 2, untied head (as Nemotron-H-8B, scaled down)
    "nemotron-h": lambda: nemotron_h_config(),
    # attention first, MHA, biases in the Mamba projections and the MLP, odd sizes;
    # tie_word_embeddings, which transformers' NemotronH does not read (its lm_head stays)
    "nemotron-h-mha-bias": lambda: nemotron_h_config(
        hybrid_override_pattern="*M-M*-", num_attention_heads=3, num_key_value_heads=3,
        head_dim=10, hidden_size=30, mamba_num_heads=6, mamba_head_dim=6, n_groups=3,
        use_bias=True, mlp_bias=True, intermediate_size=20, tie_word_embeddings=True,
        chunk_size=5),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return convert_cases(tmp_path_factory, CASES, seed=20, device="cpu")


def test_conversion_lays_out_the_pattern(models):
    hf, d, g = models["nemotron-h"]
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["architecture"] == "nemotron_h"
    assert [e["type"] for e in cfg["layers"]] == ["mamba2", "mlp", "attention", "mamba2", "mlp",
                                                  "attention", "mamba2"]
    a = cfg["layers"][2]
    assert (a["num_heads"], a["num_kv_heads"], a["head_dim"], a["rotary_dim"], a["window"]) == \
        (4, 2, 8, 0, 0)
    assert a["max_context"] == hf.config.max_position_embeddings
    assert cfg["layers"][1] == {"type": "mlp", "intermediate_size": 48, "activation": "relu2",
                                "bias": False}
    m = cfg["layers"][0]
    assert (m["nheads"], m["headdim"], m["ngroups"], m["d_state"]) == (8, 8, 2, 12)


class TestNemotronH(FamilyChecks):
    CASES = CASES
    STATE_CASES = ("nemotron-h",)
    CACHE_CASE = "nemotron-h"


def test_max_context_option_and_the_bound(models, tmp_path):
    hf, _, _ = models["nemotron-h"]
    src = tmp_path / "hf"
    hf.save_pretrained(src)
    out = mambart.convert(src, tmp_path / "out", max_context=40)
    g = mambart.Generator(out, device="cpu")
    assert {e.get("max_context") for e in g.config["layers"] if e["type"] == "attention"} == {40}
    with pytest.raises(ValueError, match="max_context = 40"):
        g.generate(ids_for(g.vocab_size, 30), max_new_tokens=11)
    with pytest.raises(ConversionError, match="max_context must be an integer"):
        mambart.convert(src, tmp_path / "out2", max_context=0)


# ---------------------------------------------------------------- refusals

def _hf_dir(models, tmp_path, name="nemotron-h", **change):
    return hf_dir(models[name][0], tmp_path, **change)


def test_pattern_disagreeing_with_the_tensors_names_the_layer(models, tmp_path):
    # layers 1 and 2 swapped: the pattern says MLP where the checkpoint has attention
    src = _hf_dir(models, tmp_path, layers_block_type=None,
                  hybrid_override_pattern="M*-M-*M")
    with pytest.raises(ConversionError, match=r"layer 1: the pattern says '\*' \(attention\) but "
                                              r".* a MLP block \('backbone\.layers\.1\.mixer\."
                                              r"up_proj\.weight'\)"):
        mambart.convert(src, tmp_path / "out")


def test_pattern_shorter_than_the_checkpoint_is_refused(models, tmp_path):
    src = _hf_dir(models, tmp_path, layers_block_type=None, hybrid_override_pattern="M-*M-*")
    with pytest.raises(ConversionError, match=r"the pattern has 6 layers but .* holds "
                                              r"'backbone\.layers\.6\."):
        mambart.convert(src, tmp_path / "out")


def test_unknown_block_letter_names_the_layer(models, tmp_path):
    src = _hf_dir(models, tmp_path, layers_block_type=None, hybrid_override_pattern="M-*X-*M")
    with pytest.raises(ConversionError, match=r"layer 3: config key 'hybrid_override_pattern' "
                                              r"has unknown block letter 'X'"):
        mambart.convert(src, tmp_path / "out")
    src = _hf_dir(models, tmp_path / "b", layers_block_type=["mamba", "mlp", "attention",
                                                             "mamba", "mlp", "conv", "mamba"])
    with pytest.raises(ConversionError, match=r"layer 5: config key 'layers_block_type' has "
                                              r"unknown block type 'conv'"):
        mambart.convert(src, tmp_path / "out")


@pytest.mark.parametrize("change,msg", [
    ({"num_attention_heads": 3}, r"layer 2: num_attention_heads \(3\) does not divide the rows "
                                 r"of q_proj \(32\)"),
    ({"num_key_value_heads": 3}, r"layer 2: num_key_value_heads \(3\) must divide "
                                 r"num_attention_heads \(4\)"),
    ({"n_groups": 3}, r"layer 0: n_groups \(3\) must divide mamba_num_heads \(8\)"),
    ({"head_dim": 16}, r"layer 2: config key 'head_dim' = 16 but q_proj holds 4 heads of 8"),
])
def test_head_counts_that_do_not_divide_name_the_layer(models, tmp_path, change, msg):
    assert_refused(models["nemotron-h"][0], tmp_path, msg, **change)


def test_moe_blocks_are_refused_by_name(models, tmp_path):
    src = _hf_dir(models, tmp_path, layers_block_type=None, hybrid_override_pattern="M-*M-*E")
    with pytest.raises(ConversionError, match=r"layer 6: the pattern says 'E' \(MoE\)"):
        mambart.convert(src, tmp_path / "out")


def test_mtp_tensors_are_ignored(models, tmp_path):
    """Multi-token-prediction weights (mtp.*) are not part of the model and are skipped."""
    from model_dirs import encode, write_safetensors
    from mambart._tensorio import read_safetensors_header  # noqa: F401 (format check below)
    import safetensors.numpy as stn

    hf, _, g = models["nemotron-h"]
    src = tmp_path / "hf"
    hf.save_pretrained(src)
    t = stn.load_file(str(src / "model.safetensors"))
    t["mtp.layers.0.mixer.q_proj.weight"] = np.ones((4, 4), np.float32)
    write_safetensors(src / "model.safetensors", {k: encode(v, "float32") for k, v in t.items()},
                      metadata={"format": "pt"})
    out = mambart.convert(src, tmp_path / "out")
    ids = ids_for(g.vocab_size, 12, seed=9)
    np.testing.assert_array_equal(mambart.Generator(out, device="cpu").logits(ids), g.logits(ids))

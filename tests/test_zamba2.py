"""Zamba2 (transformers Zamba2ForCausalLM; issue 19, item 4) on the CPU backend: Mamba-2 layers
and hybrid layers (the zamba2_hybrid unit: the shared attention + GeGLU MLP block fed
[h | embedding], its per-occurrence LoRA adapters merged into each occurrence's weights by the
converter, then `linear` and a Mamba-2 layer whose residual is h), converted torch-free and
checked against transformers' own class (tiny random weights): fp32 logits, greedy decoding,
prefill == decode, state save / load continuation, the prompt cache; the conversion's refusals
name the layer, key or tensor."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

import mambart
from hf_models import (FamilyChecks, assert_refused, build, check_logits,
                       check_prefill_equals_decode, convert_cases, hf_dir,
                       ids_for, zamba2_config)
from mambart import _C
from mambart.errors import ConversionError

CASES = {
    # M H M H H M: blocks 0, 1, 0 (block 0's second use tied, adapters j = 0, 1, 2), RoPE, MHA
    "zamba2": lambda: zamba2_config(),
    # a hybrid layer first (it norms its own input at layer 0), one block, no attention adapters
    # (the MLP's are always there), NoPE, GQA 4/2, projection biases, untied head, eps 1e-5
    "zamba2-gqa-nope": lambda: zamba2_config(
        num_hidden_layers=4, layers_block_type=["hybrid", "mamba", "hybrid", "mamba"],
        num_mem_blocks=1, use_shared_attention_adapter=False, use_mem_rope=False,
        num_key_value_heads=2, add_bias_linear=True, tie_word_embeddings=False,
        rms_norm_eps=1e-5, mamba_ngroups=1),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return convert_cases(tmp_path_factory, CASES, seed=90, device="cpu")


def test_conversion_lays_out_the_layers(models):
    _, d, _ = models["zamba2"]
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["architecture"] == "zamba2" and cfg["tie_embeddings"] is True
    assert [e["type"] for e in cfg["layers"]] == ["mamba2", "zamba2_hybrid", "mamba2",
                                                  "zamba2_hybrid", "zamba2_hybrid", "mamba2"]
    m = cfg["layers"][0]
    assert (m["d_inner"], m["nheads"], m["headdim"], m["ngroups"], m["d_state"], m["chunk_size"],
            m["dt_limit"], m["gated_norm_eps"], m["dt_limit_prefill_only"]) == \
        (64, 4, 16, 2, 8, 8, [0.001, None], 1e-5, True)
    h = cfg["layers"][1]
    assert h["mamba"] == m
    a = h["attention"]
    assert (a["num_heads"], a["num_kv_heads"], a["head_dim"], a["rotary_dim"], a["d_in"],
            a["max_context"]) == (4, 4, 16, 16, 64, 128)
    assert a["scale"] == 8 ** -0.5 and cfg["norm_eps"] == 1e-3
    assert h["mlp"] == {"type": "mlp", "intermediate_size": 48, "activation": "geglu",
                        "bias": False, "fused_gate_up": True}
    names = [t["name"] for t in _C.config_spec(json.dumps(cfg), "config.json")["tensors"]]
    assert "layers.0.norm.weight" in names and "layers.1.norm.weight" not in names


def test_each_occurrence_has_its_block_with_its_adapters_merged(models):
    """Hybrid layer i (occurrence j, block j mod 2) holds its block's weights (tied in
    transformers to the block's first occurrence) with adapter j merged in: W + B_j A_j."""
    from safetensors.numpy import load_file

    hf, d, _ = models["zamba2"]
    t = load_file(str(d / "model.safetensors"))
    for i, j in ((1, 0), (3, 1), (4, 2)):
        blk = hf.model.layers[i].shared_transformer
        for x in "qkv":
            w = getattr(blk.self_attn, f"{x}_proj").weight.detach().numpy()
            ad = getattr(blk.self_attn, f"linear_{x}_adapter_list")[j]
            ba = (ad[1].weight @ ad[0].weight).detach().numpy()
            np.testing.assert_allclose(t[f"layers.{i}.attn.mixer.{x}_proj.weight"], w + ba,
                                       rtol=0, atol=1e-6)
        ad = blk.feed_forward.gate_up_proj_adapter_list[j]
        np.testing.assert_allclose(
            t[f"layers.{i}.mlp.mixer.gate_up_proj.weight"],
            blk.feed_forward.gate_up_proj.weight.detach().numpy() +
            (ad[1].weight @ ad[0].weight).detach().numpy(), rtol=0, atol=1e-6)
    # layers 1 and 4 share block 0 but not the adapters
    assert not np.array_equal(t["layers.1.attn.mixer.q_proj.weight"],
                              t["layers.4.attn.mixer.q_proj.weight"])
    np.testing.assert_array_equal(t["layers.1.attn.mixer.o_proj.weight"],
                                  t["layers.4.attn.mixer.o_proj.weight"])


class TestZamba2(FamilyChecks):
    CASES = CASES
    STATE_CASES = tuple(CASES)
    CACHE_CASE = "zamba2"

    def test_prefill_equals_decode_steps(self, models, name, tmp_path):
        """Chunks of 7 equal one prefill. Token by token differs where the dt clamp
        (time_step_min) bites, by design (transformers clamps in prefill only, see
        test_the_dt_clamp_is_prefill_only_as_in_transformers): with the clamp off (dt_limit
        [0, inf] in the same model's config) token by token equals one prefill too."""
        _, d, g = models[name]
        ids = ids_for(g.vocab_size, self.SEQ, seed=1, lo=self.LO)
        check_prefill_equals_decode(g, ids, self.CHUNK, steps=False)
        cfg = json.loads((d / "config.json").read_text())
        for e in cfg["layers"]:
            (e if e["type"] == "mamba2" else e["mamba"])["dt_limit"] = [0.0, None]
        (tmp_path / "config.json").write_text(json.dumps(cfg))
        (tmp_path / "model.safetensors").symlink_to(d / "model.safetensors")
        check_prefill_equals_decode(mambart.Generator(tmp_path, device="cpu"), ids, self.CHUNK)


def test_legacy_layer_names_and_repeated_tied_blocks_are_accepted(models, tmp_path):
    """Hub configs spell Mamba layers "mamba"; a file may repeat the tied copies of a shared
    block (equal to the first occurrence): both convert to the same model."""
    from model_dirs import encode, write_safetensors
    import safetensors.numpy as stn

    hf, _, g = models["zamba2"]
    src = hf_dir(hf, tmp_path, layers_block_type=["mamba", "hybrid", "mamba", "hybrid",
                                                  "hybrid", "mamba"])
    t = stn.load_file(str(src / "model.safetensors"))
    copies = {k.replace("layers.1.", "layers.4.", 1): v for k, v in t.items()
              if k.startswith("model.layers.1.shared_transformer.")}
    assert copies and not any(k in t for k in copies)
    t.update(copies)
    write_safetensors(src / "model.safetensors", {n: encode(v, "float32") for n, v in t.items()},
                      metadata={"format": "pt"})
    out = mambart.Generator(mambart.convert(src, tmp_path / "out"), device="cpu")
    ids = ids_for(g.vocab_size, 20, seed=4)
    np.testing.assert_array_equal(out.logits(ids), g.logits(ids))
    # a copy that differs is refused, naming both tensors
    k = "model.layers.4.shared_transformer.pre_ff_layernorm.weight"
    t[k] = t[k] + 1
    write_safetensors(src / "model.safetensors", {n: encode(v, "float32") for n, v in t.items()},
                      metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"tensor 'model\.layers\.4\.shared_transformer\."
                       r"pre_ff_layernorm\.weight' differs from 'model\.layers\.1\."
                       r"shared_transformer\.pre_ff_layernorm\.weight'"):
        mambart.convert(src, tmp_path / "out2")


def test_the_dt_clamp_is_prefill_only_as_in_transformers(tmp_path):
    """time_step_min clamps dt in the chunked (prefill) path only, as transformers does: with a
    bound that matters (0.05), a prefill of 3 tokens then one-token steps give transformers'
    logits for the same calls; one prefill of everything gives other logits after token 3."""
    import torch

    hf = build(zamba2_config(time_step_min=0.05), tmp_path / "hf", seed=5)
    g = mambart.Generator(mambart.convert(tmp_path / "hf", tmp_path / "out"), device="cpu")
    ids = ids_for(g.vocab_size, 12, seed=2)
    check_logits(hf, g, ids, "one prefill")
    s = g.prefill(ids[:3])
    steps = [s._native.logits]
    for tok in ids[3:]:
        s = g.prefill([tok], state=s)
        steps.append(s._native.logits)
    steps = np.stack(steps)
    with torch.no_grad():
        out = hf(torch.tensor([ids[:3]]), use_cache=True)
        ref, cache = [out.logits[0, -1]], out.past_key_values
        for p, tok in enumerate(ids[3:], start=3):
            out = hf(torch.tensor([[tok]]), cache=cache, use_cache=True,
                     position_ids=torch.tensor([[p]]), cache_position=torch.tensor([p]))
            ref.append(out.logits[0, -1])
            cache = out.past_key_values
    ref = torch.stack(ref).numpy()[:, : g.vocab_size]
    assert np.abs(steps - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())
    assert np.abs(steps[1:] - g.logits(ids)[3:]).max() > 1e-3


def test_gelu_gate_is_the_exact_gelu():
    from math import erf, sqrt

    rng = np.random.default_rng(0)
    y, z = rng.standard_normal((3, 10)).astype(np.float32), \
        3 * rng.standard_normal((3, 13)).astype(np.float32)
    got = _C._ops.Backend("cpu").gelu_gate(y, z)
    ref = np.array([[y[i, j] * 0.5 * z[i, j] * (1 + erf(z[i, j] / sqrt(2))) for j in range(10)]
                    for i in range(3)])
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


def test_add_norm_without_output_is_the_add():
    rng = np.random.default_rng(1)
    r, h = rng.standard_normal((4, 8)).astype(np.float32), rng.standard_normal((4, 8)).astype(
        np.float32)
    got, out = _C._ops.Backend("cpu").add_norm(r, h, None, None, "rms", 1e-5, add_only=True)
    np.testing.assert_array_equal(got, r + h)
    assert out is None


# ---------------------------------------------------------------- refusals

def test_layer_types_disagreeing_with_the_tensors_name_the_layer(models, tmp_path):
    hf = models["zamba2"][0]
    assert_refused(hf, tmp_path, r"layer 2: the config says a hybrid layer but .* those of a "
                   r"Mamba-2 layer \('model\.layers\.2\.mamba\.in_proj\.weight'\)",
                   layers_block_type=["mamba", "hybrid", "hybrid", "hybrid", "hybrid", "mamba"])
    assert_refused(hf, tmp_path / "b", r"layer 1: the config says a Mamba-2 layer but .* a "
                   r"hybrid layer \('model\.layers\.1\.mamba_decoder",
                   layers_block_type=["mamba"] * 6)


@pytest.mark.parametrize("change,msg", [
    ({"layers_block_type": ["mamba", "hybrid", "mamba", "attention", "hybrid", "mamba"]},
     r"layer 3: layers_block_type entry 'attention' is not a known layer type"),
    ({"layers_block_type": ["mamba", "hybrid"]},
     r"config key 'layers_block_type' must be a list of num_hidden_layers \(6\)"),
    ({"num_attention_heads": 5}, r"num_attention_heads \(5\) does not divide the attention "
                                 r"width 2 x hidden_size \(64\)"),
    ({"num_key_value_heads": 2}, r"num_key_value_heads \(2\) must equal num_attention_heads "
                                 r"\(4\) with use_shared_attention_adapter"),
    ({"n_mamba_heads": 5}, r"n_mamba_heads \(5\) does not divide mamba_expand x hidden_size"),
    ({"hidden_act": "silu"}, r"'hidden_act' = 'silu' is not supported \(gelu\)"),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}},
     r"rope_parameters\.rope_type = 'linear' is not supported"),
    ({"num_hidden_layers": 5, "layers_block_type": ["mamba", "hybrid", "mamba", "hybrid",
                                                    "hybrid"]},
     r"num_hidden_layers is 5 but .* holds 'model\.layers\.5\."),
    # one block: layer 3's adapters slot 1 would live in layer 1's module, which has 0 and 2 only
    ({"num_mem_blocks": 1}, r"missing tensor 'model\.layers\.1\.shared_transformer\.self_attn\."
                            r"linear_q_adapter_list\.1\.0\.weight'"),
    ({"use_shared_attention_adapter": False},
     r"unexpected tensor\(s\) 'model\.layers\.1\.shared_transformer\.self_attn\.linear_"),
    ({"intermediate_size": 40}, r"tensor 'model\.layers\.1\.shared_transformer\.feed_forward\."
                                r"gate_up_proj\.weight' has shape \(96, 32\) but the config "
                                r"implies \(80, 32\)"),
])
def test_bad_config_values_are_named(models, tmp_path, change, msg):
    assert_refused(models["zamba2"][0], tmp_path, msg, **change)


def test_a_bad_adapter_tensor_is_named(models, tmp_path):
    from model_dirs import encode, write_safetensors
    import safetensors.numpy as stn

    src = hf_dir(models["zamba2"][0], tmp_path)
    t = stn.load_file(str(src / "model.safetensors"))
    k = "model.layers.3.shared_transformer.feed_forward.gate_up_proj_adapter_list.1.1.weight"
    t[k] = t[k][:, :3]
    write_safetensors(src / "model.safetensors", {n: encode(v, "float32") for n, v in t.items()},
                      metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=re.escape(k) + r"' has shape \(96, 3\) but the "
                       r"config implies \(96, 4\)"):
        mambart.convert(src, tmp_path / "out")


@pytest.mark.parametrize("edit,msg", [
    (lambda h: h["attention"].pop("d_in"), r"layers\[1\]: config key 'attention' must have "
                                           r"d_in = 2 x d_model = 64"),
    (lambda h: h["mlp"].update(type="moe"), r"layers\[1\]\.mlp: config key 'type' = 'moe' must "
                                            r"be 'mlp'"),
    (lambda h: h["mamba"].update(gated_norm_eps=0), r"layers\[1\]\.mamba: config key "
                                                    r"'gated_norm_eps' must be in \(0, 1\)"),
    (lambda h: h["mamba"].update(extra=1), r"layers\[1\]\.mamba: unknown config key 'extra'"),
    (lambda h: h.pop("mlp"), r"layers\[1\]: config key 'mlp' is missing"),
])
def test_bad_hybrid_entries_are_named(models, edit, msg):
    cfg = json.loads((models["zamba2"][1] / "config.json").read_text())
    edit(cfg["layers"][1])
    with pytest.raises(ValueError, match=msg):
        _C.config_spec(json.dumps(cfg), "config.json")

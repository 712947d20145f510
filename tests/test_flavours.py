"""Flavours of the existing layer types (issue 19, item 1), on the CPU backend:

- Falcon-Mamba (transformers FalconMambaForCausalLM): Mamba-1 with weightless RMS norms on dt's
  low-rank input, B and C (the mamba1 unit's dt_bc_rms_eps); logits, greedy decode (batch,
  state continuation) against transformers; the conversion and its refusals.
- Mamba-Codestral: Mamba-2 with several groups, in transformers' layout and in Mistral's native
  one (params.json + consolidated.safetensors), which must convert to the same model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

import mambart
from conftest import TOL
from hf_models import (FamilyChecks, assert_close, build, convert_cases, falcon_config, hf_dir,
                       hf_logits, ids_for, mamba2_config)
from mambart import _C, hub
from mambart.errors import ConversionError
from model_dirs import config_dict, listed_mamba1, model_tensors, save_tensors, write_config

SEQ = 37

FALCON_CASES = {
    # eps large enough to matter at these scales; untied head (as falcon-mamba-7b)
    "falcon": lambda: falcon_config(mixer_rms_eps=1e-3),
    # the 7B config's trap: expand disagrees with intermediate_size (transformers uses the
    # latter); biases, tied head, a 3-tap conv, no fp32 residual
    "falcon-expand-trap": lambda: falcon_config(expand=16, intermediate_size=36, use_bias=True,
                                                tie_word_embeddings=True, conv_kernel=3,
                                                residual_in_fp32=False, state_size=4,
                                                time_step_rank=3),
}


@pytest.fixture(scope="module")
def falcons(tmp_path_factory):
    """name -> (transformers model, converted directory, mambart Generator)."""
    return convert_cases(tmp_path_factory, FALCON_CASES, seed=10)


# ---------------------------------------------------------------- Falcon-Mamba

def test_falcon_conversion_writes_the_norm_option(falcons):
    hf, d, _ = falcons["falcon"]
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["architecture"] == "falcon_mamba" and cfg["source"]["format"] == "transformers"
    assert len(cfg["layers"]) == hf.config.num_hidden_layers
    assert cfg["layers"][0] == {"type": "mamba1", "d_inner": 40, "d_state": 7, "d_conv": 4,
                                "conv_bias": True, "bias": False, "dt_rank": 5,
                                "dt_bc_rms_eps": 1e-3}
    assert "d_inner" not in cfg and cfg["tie_embeddings"] is False
    # the expand trap: intermediate_size wins over expand x hidden_size (16 x 20)
    cfg = json.loads((falcons["falcon-expand-trap"][1] / "config.json").read_text())
    assert cfg["layers"][1]["d_inner"] == 36


class TestFalcon(FamilyChecks):
    CASES = FALCON_CASES
    STATE_CASES = ("falcon",)
    CACHE_CASE = "falcon"
    SEQ, CHUNK, GREEDY, STATE_SPLIT, LO, REL = 37, 6, 12, (4, 6), 0, TOL["float32"]

    @pytest.fixture
    def models(self, falcons):
        return falcons


def test_falcon_without_intermediate_size_takes_in_proj_rows(falcons, tmp_path):
    """A config with only expand (wrong, as 7B's 16) and no intermediate_size: the width comes
    from in_proj's rows / 2."""
    hf, _, g = falcons["falcon-expand-trap"]
    src = tmp_path / "hf"
    hf.save_pretrained(src)
    cfg = json.loads((src / "config.json").read_text())
    del cfg["intermediate_size"]
    (src / "config.json").write_text(json.dumps(cfg))
    out = mambart.convert(src, tmp_path / "out")
    ids = ids_for(g.vocab_size, 13, seed=3, lo=0)
    np.testing.assert_array_equal(mambart.Generator(out).logits(ids), g.logits(ids))


def _hf_dir(falcons, tmp_path, **change):
    return hf_dir(falcons["falcon"][0], tmp_path, **change)


@pytest.mark.parametrize("eps", [0, -1e-6, 1.5, "1e-6", True])
def test_falcon_bad_mixer_rms_eps_is_refused(falcons, tmp_path, eps):
    src = _hf_dir(falcons, tmp_path, mixer_rms_eps=eps)
    with pytest.raises(ConversionError, match="'mixer_rms_eps' must be a number in"):
        mambart.convert(src, tmp_path / "out")


def test_falcon_width_disagreeing_with_the_weights_names_the_tensor(falcons, tmp_path):
    src = _hf_dir(falcons, tmp_path, intermediate_size=44)
    with pytest.raises(ConversionError, match=r"in_proj\.weight' has shape"):
        mambart.convert(src, tmp_path / "out")


def _listed_m1(**entry):
    return listed_mamba1(config_dict("mamba1"), "falcon_mamba", **entry)


@pytest.mark.parametrize("eps,msg", [(0.0, "must be in (0, 1)"), (1.0, "must be in (0, 1)"),
                                     ("x", "must be a number"), (None, "must be a number")])
def test_bad_dt_bc_rms_eps_names_the_layer(eps, msg):
    c = _listed_m1(dt_bc_rms_eps=eps)
    with pytest.raises(ValueError) as ei:
        _C.config_spec(json.dumps(c), "config.json")
    assert "layers[0]" in str(ei.value) and "'dt_bc_rms_eps'" in str(ei.value)
    assert msg in str(ei.value)


def test_dt_bc_rms_eps_is_refused_in_the_flat_form():
    c = config_dict("mamba1", dt_bc_rms_eps=1e-6)
    with pytest.raises(ValueError, match="unknown config key 'dt_bc_rms_eps'"):
        _C.config_spec(json.dumps(c), "config.json")


def test_norms_change_the_model_and_keep_its_tensors(tmp_path):
    """The option adds no tensors (the norms have no weights) and changes the logits."""
    plain, falcon = _listed_m1(), _listed_m1(dt_bc_rms_eps=1e-6)
    names = lambda c: [t["name"] for t in _C.config_spec(json.dumps(c), "x")["tensors"]]
    assert names(plain) == names(falcon)
    tensors = model_tensors(config_dict("mamba1"), seed=3)
    gens = []
    for name, c in (("plain", plain), ("falcon", falcon)):
        d = tmp_path / name
        d.mkdir()
        write_config(d, c)
        save_tensors(d / "model.safetensors", tensors)
        gens.append(mambart.Generator(str(d)))
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    assert np.abs(gens[0].logits(ids) - gens[1].logits(ids)).max() > 1e-2
    assert gens[1].config["layers"][0]["dt_bc_rms_eps"] == pytest.approx(1e-6)


# ---------------------------------------------------------------- Mamba-Codestral

# Mistral's params.json cannot set headdim, d_state, expand or chunk_size (mamba_ssm's Mamba2
# defaults: 64, 128, 2, 256): the smallest model with them and several groups.
CODESTRAL_KW = dict(hidden_size=128, n_groups=4, num_heads=4, head_dim=64, state_size=128,
                    chunk_size=256, vocab_size=120)


def _write_native(hf, d: Path, prefix="model.", pad_multiple=8, **params):
    """`hf`'s weights in Mistral's native layout: mamba_ssm names (backbone.embedding) under
    `prefix`, in consolidated.safetensors, with a params.json of MambaArgs keys."""
    from safetensors.torch import save_file

    d.mkdir(parents=True, exist_ok=True)
    sd = {}
    for k, v in hf.state_dict().items():
        sd[prefix + k.replace("backbone.embeddings.", "backbone.embedding.")] = \
            v.detach().clone().contiguous()
    save_file(sd, str(d / "consolidated.safetensors"))
    c = hf.config
    p = {"dim": c.hidden_size, "n_layers": c.num_hidden_layers, "vocab_size": c.vocab_size,
         "n_groups": c.n_groups, "rms_norm": True, "residual_in_fp32": c.residual_in_fp32,
         "fused_add_norm": True, "pad_vocab_size_multiple": pad_multiple,
         "tie_embeddings": bool(c.tie_word_embeddings), "model_type": "mamba"}
    p.update(params)
    (d / "params.json").write_text(json.dumps(p))
    return d


@pytest.fixture(scope="module")
def codestral(tmp_path_factory):
    """A Codestral-shaped Mamba2ForCausalLM (G 4, untied head), smaller."""
    root = tmp_path_factory.mktemp("codestral")
    hf = build(mamba2_config(**CODESTRAL_KW), root / "hf", seed=7)
    conv = mambart.convert(root / "hf", root / "from_hf")
    return hf, root, Path(conv)


def _tensors(path: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(path))


def test_codestral_hf_layout_equals_transformers(codestral):
    hf, _, d = codestral
    g = mambart.Generator(str(d))
    assert g.config["layers"][0]["ngroups"] == 4
    ids = ids_for(g.vocab_size, SEQ, seed=2, lo=0)
    assert_close(g.logits(ids), hf_logits(hf, ids).numpy()[:, : g.vocab_size], "codestral hf",
                 TOL["float32"])


@pytest.mark.parametrize("prefix", ["model.", ""])
def test_codestral_native_layout_equals_hf_layout(codestral, tmp_path, prefix):
    hf, _, from_hf = codestral
    src = _write_native(hf, tmp_path / "native", prefix=prefix)
    out = Path(mambart.convert(src, tmp_path / "out"))
    cfg, ref = (json.loads((p / "config.json").read_text()) for p in (out, from_hf))
    assert cfg["source"]["format"] == "mistral"
    assert cfg["source"]["weights"] == ["consolidated.safetensors"]
    skip = ("source", "bos_token_id", "eos_token_id", "pad_token_id")
    assert {k: v for k, v in cfg.items() if k not in skip} == \
        {k: v for k, v in ref.items() if k not in skip}
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)  # Mistral's <s>, </s>
    a, b = _tensors(out / "model.safetensors"), _tensors(from_hf / "model.safetensors")
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    ids = ids_for(120, 20, seed=4, lo=0)
    np.testing.assert_array_equal(mambart.Generator(str(out)).logits(ids),
                                  mambart.Generator(str(from_hf)).logits(ids))


def test_codestral_native_pads_the_vocabulary(codestral, tmp_path):
    """mamba_ssm pads the embedding to pad_vocab_size_multiple: vocab_size stays the real V."""
    hf, _, _ = codestral
    src = _write_native(hf, tmp_path / "native", vocab_size=117, pad_multiple=8)
    cfg = json.loads((Path(mambart.convert(src, tmp_path / "out")) / "config.json").read_text())
    assert (cfg["vocab_size"], cfg["vocab_size_padded"]) == (117, 120)


@pytest.mark.parametrize("change,pattern", [
    (dict(head_dim=64), r"unknown key\(s\) \['head_dim'\]"),
    (dict(model_type="transformer"), "model_type 'transformer' is not supported"),
    (dict(n_groups=3), "ngroups=3 does not divide the 4 heads"),
    (dict(dim="4096"), "'dim' must be an integer"),
    (dict(tie_embeddings=True), "lm_head.weight' differs from the embedding"),
])
def test_codestral_native_bad_params_are_refused(codestral, tmp_path, change, pattern):
    src = _write_native(codestral[0], tmp_path / "native", **change)
    with pytest.raises(ConversionError, match=pattern):
        mambart.convert(src, tmp_path / "out")


def test_codestral_native_without_weights_is_refused(codestral, tmp_path):
    src = _write_native(codestral[0], tmp_path / "native")
    os.remove(src / "consolidated.safetensors")
    with pytest.raises(ConversionError, match="consolidated.safetensors"):
        mambart.convert(src, tmp_path / "out")


def test_params_json_of_another_model_is_refused(tmp_path):
    d = tmp_path / "x"
    d.mkdir()
    (d / "params.json").write_text(json.dumps({"hidden": 8}))
    with pytest.raises(ConversionError, match="not a Mistral Mamba config"):
        mambart.convert(d, tmp_path / "out")


def test_flavour_short_names():
    assert hub.resolve_repo_id("falcon-mamba-7b") == "tiiuae/falcon-mamba-7b"
    assert hub.resolve_repo_id("falcon-mamba-7b-instruct") == "tiiuae/falcon-mamba-7b-instruct"
    assert hub.resolve_repo_id("mamba-codestral-7b") == "mistralai/Mamba-Codestral-7B-v0.1"


def test_add_norm_without_weight_is_plain_rms_normalisation():
    """The op the Falcon norms use: the CPU backend's add_norm with no weight (and in the
    model, in place) against the formula in float64."""
    x = np.random.default_rng(0).standard_normal((6, 7)).astype(np.float32) * 3
    r, o = _C._ops.Backend("cpu").add_norm(x, None, None, None, "rms", 1e-3)
    x64 = x.astype(np.float64)
    ref = x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + 1e-3)
    np.testing.assert_array_equal(r, x)
    assert np.abs(o - ref).max() < 1e-6

"""A model is a list of layers (issue 13): config.json's `layers` list, models that mix layer
types, the typed state those give, and clear errors for bad layer entries.

The flat form (every layer the `architecture` type, its fields at the top level) and the list
form must give the same model; a model mixing Mamba-1 and Mamba-2 layers must keep the
runtime's invariants (prefill == token-by-token decode, batch rows == single runs, state save /
load round trip). Outside references for each layer type are in test_model.py / test_convert.py
(transformers); this file checks the composition.
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest

import mambart
from mambart import StateError, _C

from model_dirs import (TINY_M1, TINY_M2, config_dict, make_model_dir, random_tensor,
                        save_tensors, write_config)

MODEL_KEYS = ("mambart_format", "architecture", "d_model", "n_layer", "vocab_size",
              "vocab_size_padded", "norm", "norm_eps", "residual_in_fp32", "tie_embeddings",
              "bos_token_id", "eos_token_id", "pad_token_id", "dtype")
M1_KEYS = ("d_inner", "d_state", "d_conv", "conv_bias", "bias", "dt_rank")
M2_KEYS = ("d_inner", "d_state", "d_conv", "conv_bias", "bias", "headdim", "nheads", "ngroups",
           "chunk_size", "dt_limit", "gated_norm", "norm_before_gate")
IDS = [3, 17, 42, 5, 99, 0, 7, 64, 23, 11, 8, 2]


def entry(flat: dict) -> dict:
    """The `layers` entry of a flat config's layer type (written here, not by the runtime)."""
    keys = M1_KEYS if flat["architecture"] == "mamba1" else M2_KEYS
    return {"type": flat["architecture"], **{k: flat[k] for k in keys}}


def listed(layers, architecture="hybrid", **model) -> dict:
    base = {k: TINY_M1[k] for k in MODEL_KEYS}
    base.update(architecture=architecture, n_layer=len(layers), layers=layers, **model)
    return base


def make_listed_dir(path, cfg: dict, seed: int = 0) -> Path:
    """A model dir for any config: tensor names and shapes from the runtime's spec."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_config(path, cfg)
    spec = _C.config_spec(json.dumps(cfg), "test")["tensors"]
    rng = np.random.default_rng(seed)
    save_tensors(path / "model.safetensors",
                 {t["name"]: random_tensor(t["name"], tuple(t["shape"]), rng) for t in spec})
    return path


HYBRID = [entry(TINY_M1), entry(TINY_M2), entry(dict(TINY_M1, d_state=4)), entry(TINY_M2)]


@pytest.fixture(scope="module")
def hybrid_dir(tmp_path_factory):
    return make_listed_dir(tmp_path_factory.mktemp("hybrid") / "m", listed(HYBRID), seed=3)


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_list_form_equals_flat_form(tmp_path, arch):
    """The same weights under a flat config and under the equivalent `layers` list give
    bit-identical logits: the list form is the same model, not a different code path."""
    flat = make_model_dir(tmp_path / "flat", arch, seed=5)
    c = config_dict(arch)
    lst = tmp_path / "list"
    lst.mkdir()
    os.symlink(flat / "model.safetensors", lst / "model.safetensors")
    write_config(lst, listed([entry(c)] * c["n_layer"], architecture=arch))
    a = mambart.Generator(str(flat)).logits(IDS)
    b = mambart.Generator(str(lst)).logits(IDS)
    np.testing.assert_array_equal(a, b)
    cfg = mambart.Generator(str(lst)).config
    assert [layer["type"] for layer in cfg["layers"]] == [arch] * c["n_layer"]
    assert cfg["d_inner"] == c["d_inner"]  # a uniform stack also shows its fields at the top


def test_hybrid_prefill_equals_decode_steps(hybrid_dir):
    g = mambart.Generator(str(hybrid_dir))
    full = g._g.logits(IDS, 0)
    steps = g._g.logits(IDS, 1)  # the decode-step path, one token per forward
    chunked = g._g.logits(IDS, 5)
    assert np.abs(full).max() > 0.1
    np.testing.assert_allclose(steps, full, atol=2e-4, rtol=0)
    np.testing.assert_allclose(chunked, full, atol=2e-4, rtol=0)


def test_hybrid_layers_differ_from_each_type_alone(hybrid_dir, tmp_path):
    """Each layer runs its own type: relabelling the Mamba-2 layers as Mamba-1 is refused by the
    weights (their tensors differ), so no layer silently runs another type's forward."""
    cfg = json.loads((hybrid_dir / "config.json").read_text())
    cfg["layers"][1] = entry(TINY_M1)
    d = tmp_path / "m"
    d.mkdir()
    os.symlink(hybrid_dir / "model.safetensors", d / "model.safetensors")
    write_config(d, cfg)
    with pytest.raises(mambart.ModelLoadError, match="layers.1.mixer"):
        mambart.Generator(str(d))


def test_hybrid_state_spec_and_round_trip(hybrid_dir, tmp_path):
    g = mambart.Generator(str(hybrid_dir))
    spec = g._g.state_spec
    names = [e["name"] for e in spec]
    # conv and ssm differ in shape between the two types (and between the two Mamba-1 layers'
    # ssm): one state tensor per distinct shape, named by its first layer where a name repeats.
    assert names == ["conv@0", "ssm@0", "conv@1", "ssm@1", "ssm@2"]
    assert [e["layers"] for e in spec] == [[0, 2], [0], [1, 3], [1, 3], [2]]
    assert spec[0]["shape"] == (2, TINY_M1["d_inner"], TINY_M1["d_conv"])
    full = g.generate(IDS, max_new_tokens=10, ignore_eos=True)
    a = g.generate(IDS, max_new_tokens=4, ignore_eos=True, return_state=True)
    path = tmp_path / "s.safetensors"
    a.state.save(path)
    for st in (mambart.load_state(path), g.load_state(path)):
        b = g.generate(None, state=st, max_new_tokens=6, ignore_eos=True)
        assert a.token_ids + b.token_ids == full.token_ids
    loaded = mambart.load_state(path)
    assert loaded.layer_types == ("mamba1", "mamba2", "mamba1", "mamba2")
    for e, arr in zip(spec, a.state._native.to_host()):
        assert np.array_equal(loaded._host[e["name"]].reshape(-1), arr)


def test_hybrid_batch_rows_equal_single_runs(hybrid_dir):
    g = mambart.Generator(str(hybrid_dir))
    prompts = [IDS[:3], IDS, IDS[:7]]
    rows = g.generate(prompts, max_new_tokens=5, ignore_eos=True)
    for p, r in zip(prompts, rows):
        assert r.token_ids == g.generate(p, max_new_tokens=5, ignore_eos=True).token_ids


def test_state_of_another_layer_stack_names_the_layer(hybrid_dir, tmp_path):
    g = mambart.Generator(str(hybrid_dir))
    other = make_listed_dir(tmp_path / "o", listed(HYBRID[::-1]), seed=3)
    path = tmp_path / "s.safetensors"
    g.prefill(IDS).save(path)
    st = mambart.load_state(path)
    g2 = mambart.Generator(str(other))
    st.fingerprint = g2.fingerprint  # a forged fingerprint: the layer check still refuses it
    with pytest.raises(StateError, match=r"layer 0 is mamba1 in the state but mamba2"):
        g2.generate(None, state=st, max_new_tokens=1)


def test_state_with_a_tensor_of_another_shape_names_it(tmp_path):
    a = make_listed_dir(tmp_path / "a", listed([entry(TINY_M1)] * 2))
    b = make_listed_dir(tmp_path / "b", listed([entry(dict(TINY_M1, d_state=4))] * 2))
    path = tmp_path / "s.safetensors"
    mambart.Generator(str(a)).prefill(IDS).save(path)
    st = mambart.load_state(path)
    gb = mambart.Generator(str(b))
    st.fingerprint = gb.fingerprint
    with pytest.raises(StateError, match=r"state tensor 'ssm' has shape \(2, 32, 6\), this "
                                         r"model's has shape \(2, 32, 4\)"):
        gb.generate(None, state=st, max_new_tokens=1)


# ---------------------------------------------------------------- bad layer entries


def _expect(tmp_path, hybrid_dir, cfg, *fragments, exc=mambart.ModelLoadError):
    d = tmp_path / "m"
    d.mkdir()
    os.symlink(hybrid_dir / "model.safetensors", d / "model.safetensors")
    write_config(d, cfg)
    with pytest.raises(exc) as ei:
        mambart.Generator(str(d))
    msg = str(ei.value)
    assert str(d) in msg, msg  # the file: config.json, or model.safetensors for shapes
    for f in fragments:
        assert f in msg, msg
    return msg


def _with_layer(i, **change):
    layers = [dict(e) for e in HYBRID]
    for k, v in change.items():
        if v is None:
            layers[i].pop(k)
        else:
            layers[i][k] = v
    return listed(layers)


@pytest.mark.parametrize("cfg,fragments", [
    (_with_layer(2, type="mamba9"), ("layers[2]", "'type'", "'mamba9' is not a known layer type",
                                     "mamba1, mamba2")),
    (_with_layer(1, type=None), ("layers[1]", "'type' is missing")),
    (_with_layer(3, d_state=None), ("layers[3]", "'d_state' is missing")),
    (_with_layer(0, dt_rank=0), ("layers[0]", "'dt_rank'", "must be >= 1")),
    (_with_layer(1, ngroups=3), ("layers[1]", "'ngroups'", "must divide nheads")),
    (_with_layer(1, d_conv="4"), ("layers[1]", "'d_conv' must be an integer")),
    (_with_layer(0, headdim=8), ("layers[0]", "unknown config key 'headdim'")),
    (_with_layer(2, d_inner=48), ("layers.2.mixer.in_proj.weight", "has shape")),
    (dict(listed(HYBRID), n_layer=3), ("'layers'", "4 entries but n_layer is 3")),
    (dict(listed(HYBRID), layers={"type": "mamba1"}), ("'layers'", "must be a list")),
    (dict(listed(HYBRID), layers=HYBRID[:3] + [7]), ("layers[3]", "must be an object")),
    (dict(listed(HYBRID), d_inner=32), ("unknown config key 'd_inner'",)),
])
def test_bad_layer_entries_name_the_layer_and_field(tmp_path, hybrid_dir, cfg, fragments):
    _expect(tmp_path, hybrid_dir, cfg, *fragments)


def test_unsupported_layer_option_names_the_layer(tmp_path, hybrid_dir):
    _expect(tmp_path, hybrid_dir, _with_layer(3, norm_before_gate=True), "layers[3]",
            "norm_before_gate", exc=NotImplementedError)


def test_config_spec_is_the_converters_source_of_names():
    spec = _C.config_spec(json.dumps(listed(HYBRID)), "x")
    names = [t["name"] for t in spec["tensors"]]
    assert names[:2] == ["embedding.weight", "norm_f.weight"]
    assert "layers.0.mixer.x_proj.weight" in names and "layers.1.mixer.norm.weight" in names
    assert "layers.1.mixer.x_proj.weight" not in names
    fp32 = {t["name"] for t in spec["tensors"] if t["store_fp32"]}
    assert {"layers.0.mixer.A_log", "layers.0.mixer.D", "layers.0.mixer.dt_proj.bias",
            "layers.1.mixer.dt_bias"} <= fp32
    assert spec["layer_types"] == ["mamba1", "mamba2", "mamba1", "mamba2"]
    with pytest.raises(mambart.ModelLoadError, match=r"x: layers\[0\]: config key 'type'"):
        _C.config_spec(json.dumps(_with_layer(0, type="shared_block")), "x")


def test_converter_keeps_a_layers_list(tmp_path, hybrid_dir):
    """A mambart directory with a `layers` list converts to another dtype: the list is kept
    and the result runs the same model in bf16."""
    out = Path(mambart.convert(hybrid_dir, tmp_path / "bf16", dtype="bfloat16"))
    cfg = json.loads((out / "config.json").read_text())
    assert [e["type"] for e in cfg["layers"]] == ["mamba1", "mamba2", "mamba1", "mamba2"]
    a = mambart.Generator(str(hybrid_dir)).logits(IDS)
    b = mambart.Generator(str(out)).logits(IDS)
    assert np.abs(a - b).max() < 0.2

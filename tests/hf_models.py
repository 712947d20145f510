"""Tiny random transformers checkpoints (MambaForCausalLM, Mamba2ForCausalLM,
FalconMambaForCausalLM, NemotronHForCausalLM, GraniteMoeHybridForCausalLM, BambaForCausalLM,
JambaForCausalLM, Zamba2ForCausalLM) for the oracle tests, with every parameter perturbed away from its structured
initialisation (norm weights 1, D 1, zero biases) so that a mistake in any of them shows in the
logits; and the checks the converted families share (logits and greedy tokens against
transformers, prefill == decode, state save / load continuation, the prompt cache)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import (BambaConfig, BambaForCausalLM, FalconMambaConfig,
                          FalconMambaForCausalLM, GraniteMoeHybridConfig,
                          GraniteMoeHybridForCausalLM, JambaConfig, JambaForCausalLM,
                          Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM,
                          NemotronHConfig, NemotronHForCausalLM, Zamba2Config,
                          Zamba2ForCausalLM)

import mambart
from mambart.errors import ConversionError


def mamba1_config(**kw) -> MambaConfig:
    base = dict(vocab_size=96, hidden_size=24, state_size=5, num_hidden_layers=2, expand=2,
                conv_kernel=4, time_step_rank=3, use_bias=False, use_conv_bias=True,
                residual_in_fp32=True, tie_word_embeddings=True, layer_norm_epsilon=1e-5,
                eos_token_id=0, bos_token_id=0, pad_token_id=0)
    base.update(kw)
    return MambaConfig(**base)


def mamba2_config(**kw) -> Mamba2Config:
    base = dict(vocab_size=112, hidden_size=16, state_size=12, num_hidden_layers=2, expand=2,
                head_dim=8, num_heads=4, n_groups=2, conv_kernel=4, chunk_size=8,
                use_bias=False, use_conv_bias=True, residual_in_fp32=True, rms_norm=True,
                tie_word_embeddings=False, layer_norm_epsilon=1e-5, time_step_limit=(0.0, float("inf")),
                eos_token_id=0, bos_token_id=0, pad_token_id=0)
    base.update(kw)
    return Mamba2Config(**base)


def falcon_config(**kw) -> FalconMambaConfig:
    """Falcon-Mamba: Mamba-1 with weightless RMS norms on dt, B and C (eps mixer_rms_eps)."""
    base = dict(vocab_size=88, hidden_size=20, state_size=7, num_hidden_layers=2, expand=2,
                conv_kernel=4, time_step_rank=5, use_bias=False, use_conv_bias=True,
                residual_in_fp32=True, tie_word_embeddings=False, layer_norm_epsilon=1e-5,
                mixer_rms_eps=1e-6, eos_token_id=0, bos_token_id=0, pad_token_id=0)
    base.update(kw)
    return FalconMambaConfig(**base)


def nemotron_h_config(**kw) -> NemotronHConfig:
    """Nemotron-H: Mamba-2 (M), NoPE GQA attention (*) and relu² MLP (-) blocks, one mixer per
    pre-norm block, by hybrid_override_pattern."""
    base = dict(vocab_size=97, hidden_size=32, hybrid_override_pattern="M-*M-*M",
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, mamba_num_heads=8,
                mamba_head_dim=8, ssm_state_size=12, n_groups=2, conv_kernel=4, chunk_size=8,
                intermediate_size=48, layer_norm_epsilon=1e-5, tie_word_embeddings=False,
                max_position_embeddings=128, eos_token_id=0, bos_token_id=0, pad_token_id=0)
    base.update(kw)
    return NemotronHConfig(**base)


def granite_config(**kw) -> GraniteMoeHybridConfig:
    """Granite-4.0-H: Mamba-2 / attention layers by layer_types, each with an FFN (the MoE plus
    the shared SwiGLU MLP; the shared MLP alone with num_local_experts=0), and its multipliers
    (moderate values, so that the layers' outputs weigh in the logits)."""
    base = dict(vocab_size=101, hidden_size=32, num_hidden_layers=4,
                layer_types=["mamba", "attention", "mamba", "mamba"], num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=24, num_local_experts=5,
                num_experts_per_tok=2, shared_intermediate_size=40, mamba_n_heads=8,
                mamba_n_groups=2, mamba_d_state=12, mamba_d_conv=4, mamba_chunk_size=8,
                embedding_multiplier=3.0, attention_multiplier=0.2, residual_multiplier=0.5,
                logits_scaling=2.5, position_embedding_type="nope", rms_norm_eps=1e-5,
                max_position_embeddings=128, tie_word_embeddings=False, eos_token_id=0,
                bos_token_id=0, pad_token_id=0)
    base.update(kw)
    return GraniteMoeHybridConfig(**base)


def bamba_config(**kw) -> BambaConfig:
    """Bamba: Mamba-2 layers with attention at attn_layer_indices (GQA, RoPE on half of hd), each
    layer with a SwiGLU MLP."""
    base = dict(vocab_size=93, hidden_size=32, num_hidden_layers=4, attn_layer_indices=[1],
                num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
                mamba_n_heads=8, mamba_n_groups=2, mamba_d_state=12, mamba_d_conv=4,
                mamba_chunk_size=8, rms_norm_eps=1e-5, max_position_embeddings=128,
                tie_word_embeddings=False, eos_token_id=0, bos_token_id=0, pad_token_id=0)
    base.update(kw)
    return BambaConfig(**base)


def jamba_config(**kw) -> JambaConfig:
    """Jamba: Mamba-1 (with learned RMS norms on dt, B and C) or NoPE GQA attention by
    attn_layer_period / offset, each layer followed by an MoE (softmax over all experts, top k,
    no renormalization) by expert_layer_period / offset, else a SwiGLU MLP. rms_norm_eps large
    enough that the norms' eps matters at these scales."""
    base = dict(vocab_size=91, hidden_size=32, num_hidden_layers=4, attn_layer_period=4,
                attn_layer_offset=2, expert_layer_period=2, expert_layer_offset=1,
                num_experts=5, num_experts_per_tok=2, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=40, mamba_d_state=8, mamba_d_conv=4,
                mamba_expand=2, mamba_dt_rank=4, rms_norm_eps=1e-3,
                max_position_embeddings=128, tie_word_embeddings=False, eos_token_id=0,
                bos_token_id=0, pad_token_id=0)
    base.update(kw)
    return JambaConfig(**base)


def zamba2_config(**kw) -> Zamba2Config:
    """Zamba2: Mamba-2 layers and hybrid layers (the shared attention + GeGLU MLP block fed
    [h | embedding], with per-occurrence LoRA adapters, then `linear` and a Mamba-2 layer); two
    blocks over three hybrid layers (block 0 twice), RoPE, G 2, chunk 8 < the prompts."""
    base = dict(vocab_size=97, hidden_size=32, num_hidden_layers=6,
                layers_block_type=["mamba", "hybrid", "mamba", "hybrid", "hybrid", "mamba"],
                num_mem_blocks=2, use_shared_attention_adapter=True, adapter_rank=4,
                use_mem_rope=True, num_attention_heads=4, n_mamba_heads=4, mamba_ngroups=2,
                mamba_d_state=8, mamba_d_conv=4, chunk_size=8, intermediate_size=48,
                rms_norm_eps=1e-3, max_position_embeddings=128, eos_token_id=0,
                bos_token_id=0, pad_token_id=0)
    base.update(kw)
    return Zamba2Config(**base)


CLASSES = ((Zamba2Config, Zamba2ForCausalLM), (JambaConfig, JambaForCausalLM), (BambaConfig, BambaForCausalLM),
           (GraniteMoeHybridConfig, GraniteMoeHybridForCausalLM),
           (NemotronHConfig, NemotronHForCausalLM), (FalconMambaConfig, FalconMambaForCausalLM),
           (Mamba2Config, Mamba2ForCausalLM), (MambaConfig, MambaForCausalLM))


def build(config, out_dir: Path | None = None, seed: int = 0, scale: float = 0.2):
    """Builds a random model for `config` (fp32, eval mode); saves it with save_pretrained
    (safetensors) into out_dir when given. Returns the model."""
    torch.manual_seed(seed)
    cls = next(m for c, m in CLASSES if isinstance(config, c))
    model = cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "A_log" in name:
                p.add_(scale * torch.randn_like(p))
            elif name.endswith("norm.weight") or name.endswith("norm_f.weight"):
                p.copy_(1.0 + scale * torch.randn_like(p))
            elif name.endswith(".D"):
                p.copy_(torch.randn_like(p))
            else:
                p.add_(scale * torch.randn_like(p))
    if out_dir is not None:
        model.save_pretrained(out_dir, safe_serialization=True)
    return model


def hf_logits(model, ids) -> "torch.Tensor":
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def hf_greedy(model, ids, n: int):
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                             min_new_tokens=n, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


# ---------------------------------------------------------------- the families' shared checks

def ids_for(V: int, n: int, seed: int = 0, lo: int = 1):
    """n token ids in [lo, V) (lo 1: transformers' generate masks the pad id 0 out of a prompt)."""
    return [int(t) for t in np.random.default_rng(seed).integers(lo, V, size=n)]


def convert_cases(tmp_path_factory, cases: dict, seed: int, **generator_kw) -> dict:
    """name -> (transformers model, converted directory, mambart Generator) for each case's
    config (random weights of seed, seed + 1, ... in case order), converted torch-free."""
    out = {}
    for i, (name, make) in enumerate(cases.items()):
        root = tmp_path_factory.mktemp(name)
        hf = build(make(), root / "hf", seed=seed + i)
        conv = mambart.convert(root / "hf", root / "mambart")
        out[name] = (hf, Path(conv), mambart.Generator(conv, **generator_kw))
    return out


def hf_dir(hf, tmp_path: Path, **change) -> Path:
    """hf saved under tmp_path/hf with its config.json keys updated by `change`."""
    src = tmp_path / "hf"
    hf.save_pretrained(src)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(change)
    (src / "config.json").write_text(json.dumps(cfg))
    return src


def assert_refused(hf, tmp_path: Path, msg: str, **change):
    """Converting hf with its config.json keys changed by `change` raises a ConversionError
    matching `msg`."""
    src = hf_dir(hf, tmp_path, **change)
    with pytest.raises(ConversionError, match=msg):
        mambart.convert(src, tmp_path / "out")


def assert_close(got, ref, what: str = "", rel: float = 1e-4):
    """max |got - ref| < rel x max(1, max |ref|)."""
    err = float(np.abs(got - ref).max())
    assert err < rel * max(1.0, float(np.abs(ref).max())), f"{what}: max abs err {err}"


def check_logits(hf, g, ids, what: str = "", rel: float = 1e-4):
    """mambart's fp32 logits of `ids` against transformers', within `rel` relative."""
    ref = hf_logits(hf, ids).numpy()[:, : g.vocab_size]
    got = g.logits(ids)
    assert got.shape == (len(ids), g.vocab_size)
    assert_close(got, ref, what, rel)


def check_prefill_equals_decode(g, ids, chunk: int, steps: bool = True):
    """Token-by-token (unless not `steps`) and chunk-by-chunk (state carried) logits equal one
    prefill's."""
    full = g.logits(ids)
    if steps:
        assert_close(g._g.logits(ids, 1), full, "token by token")
    assert_close(g._g.logits(ids, chunk), full, f"chunks of {chunk}")


def check_greedy(hf, g, prompts, n: int):
    """A batch of greedy rows, each equal to transformers' generate of its prompt."""
    rows = g.generate(prompts, max_new_tokens=n, ignore_eos=True)
    for p, r in zip(prompts, rows):
        assert r.token_ids == hf_greedy(hf, p, n)


def check_state_continuation(hf, g, prompt, first: int, rest: int, tmp_path: Path):
    """One greedy run of first + rest tokens (transformers' tokens) equals `first` tokens, the
    state saved to a file and loaded, then `rest` more."""
    full = g.generate(prompt, max_new_tokens=first + rest, ignore_eos=True)
    assert full.token_ids == hf_greedy(hf, prompt, first + rest)
    a = g.generate(prompt, max_new_tokens=first, ignore_eos=True, return_state=True)
    path = tmp_path / "s.safetensors"
    a.state.save(path)
    b = g.generate(None, state=g.load_state(path), max_new_tokens=rest, ignore_eos=True)
    assert a.token_ids + b.token_ids == full.token_ids


def check_prompt_cache_next_turn(hf, d: Path):
    """The prompt cache (snapshots of sequence states, KV caches included): the next turn
    prefills only its new tokens and gives transformers' tokens for the whole conversation."""
    g = mambart.Generator(d, device="cpu", prompt_cache_bytes=1 << 24)
    base = ids_for(g.vocab_size, 14, seed=7)
    t1 = g.generate(base, max_new_tokens=5, ignore_eos=True)
    assert t1.token_ids == hf_greedy(hf, base, 5)
    turn2 = base + t1.token_ids + ids_for(g.vocab_size, 6, seed=8)
    t2 = g.generate(turn2, max_new_tokens=9, ignore_eos=True)
    assert t2.prefill_tokens == 7  # the pending last token and the 6 new ones
    assert t2.token_ids == hf_greedy(hf, turn2, 9)
    assert g.prompt_cache.hits >= 1


class FamilyChecks:
    """The checks every converted family runs against transformers' class, as tests: a test
    module subclasses this (class name Test...) with its CASES and a module fixture `models`
    (convert_cases of CASES); conftest's pytest_generate_tests runs the `name` tests once per
    case and the `state_name` test once per STATE_CASES entry."""

    FAMILY_CHECKS = True
    CASES: dict = {}          # name -> transformers config maker
    STATE_CASES: tuple = ()   # the cases of the state save / load continuation test
    CACHE_CASE = ""           # the case of the prompt cache test
    SEQ = 45                  # prompt length of the logits and prefill tests
    CHUNK = 7                 # the prefill test's chunk length
    GREEDY = 32               # greedy tokens against generate
    STATE_SPLIT = (8, 12)     # tokens before / after the state is saved and loaded
    LO = 1                    # the lowest token id in the prompts
    REL = 1e-4                # the logits' tolerance, relative to max(1, max |logit|)

    def test_logits_equal_transformers(self, models, name):
        hf, _, g = models[name]
        check_logits(hf, g, ids_for(g.vocab_size, self.SEQ, lo=self.LO), name, self.REL)

    def test_prefill_equals_decode_steps(self, models, name):
        _, _, g = models[name]
        check_prefill_equals_decode(g, ids_for(g.vocab_size, self.SEQ, seed=1, lo=self.LO),
                                    self.CHUNK)

    def test_greedy_equals_transformers_generate(self, models, name):
        hf, _, g = models[name]
        check_greedy(hf, g, [ids_for(g.vocab_size, n, seed=n, lo=self.LO) for n in (9, 4, 15)],
                     self.GREEDY)

    def test_state_save_load_continuation_equals_one_run(self, models, tmp_path, state_name):
        hf, _, g = models[state_name]
        check_state_continuation(hf, g, ids_for(g.vocab_size, 11, seed=5, lo=self.LO),
                                 *self.STATE_SPLIT, tmp_path)

    def test_prompt_cache_next_turn(self, models):
        hf, d, _ = models[self.CACHE_CASE]
        check_prompt_cache_next_turn(hf, d)

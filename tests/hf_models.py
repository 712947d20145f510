"""Tiny random transformers checkpoints (MambaForCausalLM, Mamba2ForCausalLM,
FalconMambaForCausalLM, NemotronHForCausalLM, GraniteMoeHybridForCausalLM, BambaForCausalLM) for
the oracle
tests, with every parameter perturbed away from its structured initialisation (norm weights 1,
D 1, zero biases) so that a mistake in any of them shows in the logits."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (BambaConfig, BambaForCausalLM, FalconMambaConfig, FalconMambaForCausalLM, GraniteMoeHybridConfig,
                          GraniteMoeHybridForCausalLM, Mamba2Config, Mamba2ForCausalLM,
                          MambaConfig, MambaForCausalLM, NemotronHConfig, NemotronHForCausalLM)


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


CLASSES = ((BambaConfig, BambaForCausalLM), (GraniteMoeHybridConfig, GraniteMoeHybridForCausalLM),
           (NemotronHConfig, NemotronHForCausalLM), (FalconMambaConfig, FalconMambaForCausalLM), (Mamba2Config, Mamba2ForCausalLM),
           (MambaConfig, MambaForCausalLM))


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

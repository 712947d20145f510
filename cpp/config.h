// L1 data: the mambart model configuration (config.json, schema in docs/format.md).
#pragma once

#include <cstdint>
#include <string>

#include "dtype.h"

namespace mambart {

enum class Arch { Mamba1, Mamba2 };
enum class NormKind { RMSNorm, LayerNorm };

struct ModelConfig {
    Arch arch = Arch::Mamba1;
    int64_t d_model = 0;            // d
    int64_t n_layer = 0;
    int64_t vocab_size = 0;         // V: rows that take part in logits and sampling
    int64_t vocab_size_padded = 0;  // Vp: rows of embedding / lm_head
    int64_t d_inner = 0;            // E
    int64_t d_state = 0;            // N
    int64_t d_conv = 0;             // W
    bool conv_bias = true;
    bool bias = false;              // in_proj / out_proj bias
    int64_t dt_rank = 0;            // Mamba-1: Rdt
    int64_t headdim = 0;            // Mamba-2: P
    int64_t nheads = 0;             // Mamba-2: H
    int64_t ngroups = 1;            // Mamba-2: G
    int64_t chunk_size = 0;         // Mamba-2: Q
    float dt_min = 0.0f;            // Mamba-2 dt_limit after softplus
    float dt_max = 0.0f;            //   (+inf when unbounded)
    bool gated_norm = true;         // Mamba-2: RMSNormGated before out_proj
    NormKind norm = NormKind::RMSNorm;
    float norm_eps = 1e-5f;
    bool residual_in_fp32 = true;
    bool tie_embeddings = true;
    int64_t bos_token_id = -1;      // -1: none
    int64_t eos_token_id = -1;
    int64_t pad_token_id = -1;
    DType dtype = DType::F32;       // storage dtype of the large matrices

    // Derived sizes.
    int64_t conv_dim() const;   // channels of the causal conv: E (M1) or E + 2GN (M2)
    int64_t d_in_proj() const;  // 2E (M1) or 2E + 2GN + H (M2)
    int64_t x_proj_dim() const; // Mamba-1: Rdt + 2N
    // Number of parameters implied by the config (tied head counted once).
    int64_t num_params() const;

    // Parses and validates `path`; throws ModelLoadError naming the file and key.
    static ModelConfig from_file(const std::string& path);
    // Parses JSON text; `origin` names the source in error messages.
    static ModelConfig from_json_text(const std::string& text, const std::string& origin);
};

const char* arch_name(Arch a);

}  // namespace mambart

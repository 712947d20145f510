// L3 model: the weights of a model directory placed on a backend.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "backend.h"
#include "config.h"
#include "safetensors.h"

namespace mambart {

struct LayerWeights {
    Param norm_w, norm_b;      // (d), (d) [layernorm only]
    Weight in_proj;            // (d_in_proj, d)
    Param in_proj_b;           // (d_in_proj) [bias]
    Param conv_w;              // (conv_dim, W) fp32
    Param conv_b;              // (conv_dim) [conv_bias]
    // Mamba-1
    Weight x_proj;             // (Rdt + 2N, E)
    Weight dt_proj;            // (E, Rdt)
    Param dt_bias;             // (E) M1 dt_proj.bias, or (H) M2 dt_bias
    Param A;                   // (E, N) M1 or (H) M2: -exp(A_log), precomputed in fp32
    Param D;                   // (E) M1 or (H) M2
    Param gated_norm_w;        // (E) M2 [gated_norm]
    Weight out_proj;           // (d, E)
    Param out_proj_b;          // (d) [bias]
};

class ModelWeights {
 public:
    // Reads `dir`/model.safetensors, checks every tensor against `config` (exact set, shapes,
    // float dtypes) and places them on `backend`, large matrices in `dtype`.
    ModelWeights(const std::string& dir, const ModelConfig& config, Backend& backend, DType dtype);
    ~ModelWeights();
    ModelWeights(const ModelWeights&) = delete;
    ModelWeights& operator=(const ModelWeights&) = delete;

    Weight embedding;          // (Vp, d)
    Param norm_f_w, norm_f_b;  // (d)
    Weight lm_head;            // (Vp, d): the embedding when tied
    std::vector<LayerWeights> layers;
    DType dtype;
    size_t device_bytes = 0;   // bytes owned on the backend

 private:
    Backend& backend_;
    std::unique_ptr<SafetensorsFile> file_;  // keeps zero-copy views alive
    std::vector<void*> owned_;
};

}  // namespace mambart

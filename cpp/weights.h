// L3 model: the weights of a model directory placed on a backend.
//
// Generic over layer types: every tensor the config implies (ModelConfig::tensors(), which asks
// each layer's unit) is read from model.safetensors, its shape checked against the spec, and
// placed: large matrices in the load dtype, small parameters as fp32. Layers take theirs by name.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "backend.h"
#include "config.h"
#include "safetensors.h"

namespace mambart {

class ModelWeights {
 public:
    // Reads `dir`/model.safetensors, checks every tensor against `config` (exact set, shapes,
    // float dtypes) and places them on `backend`, large matrices in `dtype`.
    ModelWeights(const std::string& dir, const ModelConfig& config, Backend& backend, DType dtype);
    ~ModelWeights();
    ModelWeights(const ModelWeights&) = delete;
    ModelWeights& operator=(const ModelWeights&) = delete;

    // A placed tensor by its full name (InvalidArgument if the config implies no such tensor).
    Weight matrix(const std::string& name) const;
    Param param(const std::string& name) const;

    Weight embedding;          // (Vp, d)
    Param norm_f_w, norm_f_b;  // (d)
    Weight lm_head;            // (Vp, d): the embedding when tied
    DType dtype;
    size_t device_bytes = 0;   // bytes owned on the backend

 private:
    Backend& backend_;
    std::unique_ptr<SafetensorsFile> file_;  // keeps zero-copy views alive
    std::vector<void*> owned_;
    std::map<std::string, Weight> matrices_;
    std::map<std::string, Param> params_;
};

}  // namespace mambart

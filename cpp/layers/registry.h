// L3 layers: the registry of layer types. Adding a type is a folder under cpp/layers/ and one
// line in registry.cpp (docs/architecture.md, "Adding a layer type").
#pragma once

#include <memory>
#include <string>

#include "config.h"
#include "layers/layer.h"

namespace mambart {

class ConfigReader;

struct LayerUnit {
    const char* type;  // the name in config.json ("mamba1")
    // Reads the layer's fields through `r` (which names the file, layer index and key in its
    // errors) and validates them.
    std::shared_ptr<const LayerConfig> (*parse)(ConfigReader& r, const ModelConfig& m);
    // The layer itself (weights not yet bound) for a config that `parse` made.
    std::unique_ptr<Layer> (*create)(std::shared_ptr<const LayerConfig> c, const ModelConfig& m);
    // Whether the flat form of config.json (format 1 without `layers`, whose fixed key set
    // predates the layer list) can hold this type; new types are written as a `layers` list.
    bool flat_form = false;
};

// The registry as the config reader sees it (known types, parse).
const LayerTypes& layer_types();
// The layer for a parsed config.
std::unique_ptr<Layer> create_layer(const std::shared_ptr<const LayerConfig>& c,
                                    const ModelConfig& m);

}  // namespace mambart

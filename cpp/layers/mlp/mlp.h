// L3 layers: the MLP layer unit (a feed-forward block as its own layer: relu² or gated SwiGLU).
// Config, tensors and forward: cpp/layers/mlp/mlp.cpp.
#pragma once

#include "layers/registry.h"

namespace mambart {
namespace mlp {

LayerUnit unit();

}  // namespace mlp
}  // namespace mambart

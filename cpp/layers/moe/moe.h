// L3 layers: the MoE layer unit (routed SwiGLU experts plus an optional shared SwiGLU expert,
// a feed-forward block as its own layer). Config, tensors and forward: cpp/layers/moe/moe.cpp.
#pragma once

#include "layers/registry.h"

namespace mambart {
namespace moe {

LayerUnit unit();

}  // namespace moe
}  // namespace mambart

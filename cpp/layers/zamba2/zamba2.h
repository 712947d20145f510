// L3 layers: Zamba2's hybrid layer unit (transformers' Zamba2HybridLayer: the shared attention +
// MLP block, its `linear`, then a Mamba-2 layer). Config, tensors, state and forward:
// cpp/layers/zamba2/zamba2.cpp.
#pragma once

#include "layers/registry.h"

namespace mambart {
namespace zamba2 {

LayerUnit unit();

}  // namespace zamba2
}  // namespace mambart

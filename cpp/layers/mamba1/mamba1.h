// L3 layers: the Mamba-1 layer unit (selective SSM; mamba_ssm's Mamba / transformers'
// MambaMixer). Config, tensors, state and forward: cpp/layers/mamba1/mamba1.cpp.
#pragma once

#include "layers/registry.h"

namespace mambart {
namespace mamba1 {

LayerUnit unit();

}  // namespace mamba1
}  // namespace mambart

// L3 layers: the Mamba-2 layer unit (SSD; mamba_ssm's Mamba2 / transformers' Mamba2Mixer).
// Config, tensors, state and forward: cpp/layers/mamba2/mamba2.cpp.
#pragma once

#include "layers/registry.h"

namespace mambart {
namespace mamba2 {

LayerUnit unit();

}  // namespace mamba2
}  // namespace mambart

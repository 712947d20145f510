// L3 layers: the attention layer unit (causal multi-head / grouped-query attention with a KV
// cache in the sequence state; RoPE or none; optional sliding window and biases).
// Config, tensors, state and forward: cpp/layers/attention/attention.cpp.
#pragma once

#include "layers/registry.h"

namespace mambart {
namespace attention {

LayerUnit unit();

}  // namespace attention
}  // namespace mambart

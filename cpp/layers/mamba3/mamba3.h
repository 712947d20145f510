// L3 layers: the Mamba-3 layer unit (mamba_ssm's Mamba3: trapezoidal discretization,
// data-dependent A, rotary "complex" state, no conv, optional MIMO rank). Config, tensors,
// state and forward: cpp/layers/mamba3/mamba3.cpp; the math: Backend::mamba3_scan
// (cpp/op_params.h) and ../shared/spec/mamba.md section 4.
#pragma once

#include "layers/registry.h"

namespace mambart {
namespace mamba3 {

LayerUnit unit();

}  // namespace mamba3
}  // namespace mambart

// CPU mixture of experts (Backend::moe; the formula is MoeParams' in cpp/op_params.h): each
// row's top-k routing, then expert by expert the rows routed to it gathered into one block
// (prefill: a GEMM per expert; decode: k GEMVs), its SwiGLU, and the weighted rows added back.
#pragma once

#include "op_params.h"

namespace mambart {
namespace cpu {

// The routing of one row: the k largest of `logits` (X) in descending order, ties to the lower
// id, into ids (k), and their weights (k) as MoeParams defines them. Shared by the CPU op and
// the tests' expectations.
void moe_route_row(const float* logits, int64_t X, int64_t k, bool normalize, int32_t* ids,
                   float* weights);

void moe(const MoeParams& p);

}  // namespace cpu
}  // namespace mambart

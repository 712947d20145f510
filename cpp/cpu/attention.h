// CPU attention with a KV cache (Backend::attention; the formula is AttentionParams' in
// cpp/op_params.h): RoPE and the cache append per row, then every (token, q head) pair's softmax
// over its keys in tiles of kKeyTile keys with a running max (online softmax), the pairs split
// across the current thread pool (cpu/pool.h).
#pragma once

#include "op_params.h"

namespace mambart {
namespace cpu {

// Throws InvalidArgument when a row's cache would exceed p.max_ctx (nothing of that row is
// written then).
void attention(const AttentionParams& p);

}  // namespace cpu
}  // namespace mambart

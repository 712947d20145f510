// L3 layers: the interface every layer type implements (one unit per type, cpp/layers/<type>/,
// registered in cpp/layers/registry.cpp). A layer is the mixer of a pre-norm residual block:
// the model norms the residual stream into `in`, the layer writes its output to `out`, and the
// model adds `out` to the residual before the next block's norm.
//
// A layer whose config norms_own_input() gets the raw residual stream as `in` instead (and the
// model has no block norm for it); one whose config reads_embedding() also gets the embedding
// output (LayerIO::embedding).
//
// A unit holds everything about its type: its config fields and their validation (a
// LayerConfig subclass, parsed through ConfigReader), its tensors (names and shapes as
// functions of the config: LayerConfig::tensors), its per-sequence state (LayerConfig::state),
// its workspace, and its forward on every backend (through Backend ops). Nothing outside the
// units branches on the layer type.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "backend.h"
#include "config.h"

namespace mambart {

// The placed tensors of one layer, by the names its LayerConfig::tensors() gave (relative to
// "layers.{i}."). Shapes were checked against the spec before placement.
class LayerTensors {
 public:
    virtual ~LayerTensors() = default;
    virtual Weight matrix(const std::string& name) const = 0;  // a spec with matrix = true
    virtual Param param(const std::string& name) const = 0;    // a small fp32 parameter
};

// One forward call of B rows x L tokens (R = B * L token rows, rows contiguous per sequence).
struct LayerIO {
    const float* in;      // (R, d) the normed input (norms_own_input(): the residual stream)
    float* out;           // (R, d) the layer's output (the residual add happens in the model)
    float* const* ws;     // workspace buffers in workspace_cols() order, buffer k (R, cols[k])
    float* const* state;  // state tensors in LayerConfig::state() order, each (B, shape...),
                          // starting at the first of the B rows; an SSM state (StateSpec::ssm)
                          // holds bf16 bits when the model's state_dtype is BF16 (set_ssm_state)
    int64_t B, L;
    // Speculative verification (issue 25), or nullptr: per state tensor (state() order), a
    // (B, L, shape...) buffer that gets the tensor's value after each token, so that a caller
    // can keep the state after any prefix of the L tokens (the layer's `state` still ends at
    // the last token). Only for layers whose supports_state_trace() is true.
    float* const* trace = nullptr;
    // (R, d) the embedding output of these tokens (after embedding_multiplier), for layers
    // whose config reads_embedding(); nullptr otherwise.
    const float* embedding = nullptr;
    // The fused decode projections (issue 16; option fused_projections, L = 1, layers whose
    // takes_fused_projections() is true), or nullptr: the block's input is then
    // norm(residual) (`norm`), which the layer's input projection computes itself, and the
    // layer's output projection adds into `residual` (R, d); `in` and `out` are (R, d)
    // scratch buffers then, not the input and the output. See project_in / project_out.
    float* residual = nullptr;
    ProjNorm norm = {};
};

// A layer's input projection y (R, N) row stride ldy = x · Wᵀ + bias of the block's normed
// input: from io.in, or with the fused decode projections from norm(io.residual), in one op.
inline void project_in(Backend& be, const LayerIO& io, int64_t d, const Weight& W, int64_t N,
                       const float* bias, float* y, int64_t ldy, const ProjConv& conv = {}) {
    if (!io.residual) {
        be.linear(io.in, d, io.B * io.L, W, N, bias, y, ldy);
        return;
    }
    ProjParams p;
    p.M = io.B * io.L;
    p.W = W;
    p.N = N;
    p.bias = bias;
    p.y = y;
    p.ldy = ldy;
    p.norm = io.norm;
    p.conv = conv;
    p.scratch_x = io.out;  // (R, d)
    be.project(p);
}

// A layer's output projection x (R, K) row stride ldx -> the block output: written to io.out,
// or with the fused decode projections added into io.residual in the same op (gate.z: x put
// through the gated norm first, in the op's prologue, with gate_scratch (R, K) for a backend
// that runs the separate ops; the caller checked fused_projection(R, K, groups)).
inline void project_out(Backend& be, const LayerIO& io, const float* x, int64_t ldx,
                        const Weight& W, int64_t d, const float* bias, const ProjGate& gate = {},
                        float* gate_scratch = nullptr) {
    const int64_t R = io.B * io.L;
    if (!io.residual) {
        be.linear(x, ldx, R, W, d, bias, io.out, d);
        return;
    }
    ProjParams p;
    p.x = x;
    p.ldx = ldx;
    p.M = R;
    p.W = W;
    p.N = d;
    p.bias = bias;
    p.y = io.residual;
    p.ldy = d;
    p.accumulate = true;
    p.gate = gate;
    p.scratch_x = gate_scratch;
    p.scratch_y = io.out;  // (R, d)
    be.project(p);
}

// A scan op's state pointers (SelectiveScanParams, SsdParams) from the layer's SSM state tensor
// and its trace (LayerIO::state / trace, or nullptr): fp32, or bf16 with the option state_dtype.
template <class ScanParams>
inline void set_ssm_state(ScanParams& p, float* state, float* trace, bool bf16) {
    if (bf16) {
        p.ssm_state = nullptr;
        p.ssm_state_bf16 = reinterpret_cast<uint16_t*>(state);
        p.state_trace_bf16 = reinterpret_cast<uint16_t*>(trace);
    } else {
        p.ssm_state = state;
        p.state_trace = trace;
    }
}

class Layer {
 public:
    virtual ~Layer() = default;
    virtual const LayerConfig& config() const = 0;
    // Takes its weights (views stay valid for the life of the model's weights).
    virtual void bind(const LayerTensors& t) = 0;
    // Columns per token row of each fp32 workspace buffer the forward uses.
    virtual std::vector<int64_t> workspace_cols() const = 0;
    // The largest input-feature count of its projections (the backend's operand scratch).
    virtual int64_t max_linear_cols() const = 0;
    // Prefill (L > 1) and decode (L == 1) alike; everything enqueued on `be`, no allocation,
    // no synchronisation (decode steps are recorded into graphs).
    virtual void forward(Backend& be, const LayerIO& io) = 0;
    // Whether forward honours LayerIO::trace (speculative decoding, issue 25).
    virtual bool supports_state_trace() const { return false; }
    // Whether forward honours LayerIO::residual (the fused decode projections, issue 16).
    virtual bool takes_fused_projections() const { return false; }
    // The persistent decode (issue 16, PersistentLayer): fills `out` with this layer's weights
    // and io's state rows and workspace for one batch-1 decode step (io.B == io.L == 1), or
    // returns false where the layer cannot run in it (the model then runs the separate ops).
    virtual bool persistent_layer(const LayerIO& io, PersistentLayer& out) const {
        (void)io;
        (void)out;
        return false;
    }
};

}  // namespace mambart

// L3 model: recurrent state, scratch workspace and the forward pass of a Mamba-1 / Mamba-2 LM.
//
// Readers start at Model::forward: embedding -> n_layer x (add + norm -> mixer) -> add + norm_f
// -> lm_head. The same function serves prefill (one row, L tokens, continuing from the row's
// state) and decode (B rows, one token each).
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "backend.h"
#include "config.h"
#include "weights.h"

namespace mambart {

// The recurrent state of B sequences: per layer a conv state and an SSM state, all fp32, in one
// device allocation made at construction.
class State {
 public:
    State(const ModelConfig& config, Backend& backend, int64_t batch);
    ~State();
    State(const State&) = delete;
    State& operator=(const State&) = delete;

    int64_t batch() const { return batch_; }
    float* conv(int64_t layer, int64_t row) const;  // (C, W) of that row; rows contiguous
    float* ssm(int64_t layer, int64_t row) const;   // (E, N) or (H, P, N); rows contiguous
    void reset_row(int64_t row);                    // a fresh sequence: zero history
    size_t bytes() const { return bytes_; }
    int64_t conv_elems() const { return conv_elems_; }  // per row and layer
    int64_t ssm_elems() const { return ssm_elems_; }    // per row and layer
    int64_t n_layer() const { return n_layer_; }
    Backend& backend() const { return backend_; }

    // Snapshot / restore (issue 7), backend-generic (Backend copies only):
    // Copies row `src_row` of `src` into row `dst_row` of this state (device to device). `src`
    // must have the same shape per row and live on the same backend (InvalidArgument otherwise).
    void copy_row_from(const State& src, int64_t src_row, int64_t dst_row);
    // Host copies of one row: conv (n_layer, C, W) and ssm (n_layer, ssm_elems), fp32.
    void row_to_host(int64_t row, float* conv_out, float* ssm_out) const;
    void row_from_host(int64_t row, const float* conv_in, const float* ssm_in);

 private:
    Backend& backend_;
    int64_t n_layer_, batch_, conv_elems_, ssm_elems_;
    size_t bytes_;
    float* base_ = nullptr;  // [conv: n_layer x B x C x W][ssm: n_layer x B x ssm_elems]
};

enum class LogitsMode {
    None,  // no logits (an intermediate prefill chunk)
    Last,  // the last token of each row: (B, V)
    All,   // every token: (B*L, V)
};

class Model {
 public:
    // Loads `dir` (config.json + model.safetensors) onto `backend`; `dtype` of the large matrices
    // (defaults to the stored dtype).
    Model(const std::string& dir, std::shared_ptr<Backend> backend, const DType* dtype);
    ~Model();

    const ModelConfig& config() const { return config_; }
    Backend& backend() const { return *backend_; }
    std::shared_ptr<Backend> backend_shared() const { return backend_; }  // keeps it alive
    DType dtype() const { return weights_->dtype; }
    size_t weight_bytes() const { return weights_->device_bytes; }

    // Runs B rows x L tokens through the model, rows [row0, row0 + B) of `state`, continuing
    // from that state (reset a row first for a new sequence). ids: (B, L) device pointer.
    // Returns the device pointer of the logits (rows per `mode`, vocab_size columns, row stride
    // vocab_size), valid until the next call; nullptr for LogitsMode::None.
    // Preconditions: B * L <= max_rows(); logits rows (B for Last, B * L for All) <=
    // max_logits_rows() (see reserve).
    const float* forward(State& state, int64_t row0, int64_t B, int64_t L, const int32_t* ids,
                         LogitsMode mode);

    // Grows the scratch workspace to hold `rows` = B * L token rows and `logits_rows` rows of
    // logits (allocation happens here, never inside forward).
    void reserve(int64_t rows, int64_t logits_rows);
    int64_t max_rows() const { return ws_rows_; }
    int64_t max_logits_rows() const { return logits_rows_; }

    // Tokens per prefill chunk: long prompts run in chunks of this many tokens, so activation
    // memory does not grow with the prompt.
    static constexpr int64_t kPrefillChunk = 512;
    // The chunk this model's backend runs best: GPUs want larger GEMMs (2048 rows: about 0.3 GB of
    // activations at mamba-2.8b's shape), the CPU smaller working sets (kPrefillChunk).
    int64_t prefill_chunk() const {
        return backend_->kind() == DeviceKind::CUDA ? 4 * kPrefillChunk : kPrefillChunk;
    }
    // Rows of logits the workspace holds (mode All runs in chunks of this many tokens).
    static constexpr int64_t kLogitsRows = 64;

 private:
    void mixer_mamba1(const LayerWeights& w, State& st, int64_t layer, int64_t row0, int64_t B,
                      int64_t L);
    void mixer_mamba2(const LayerWeights& w, State& st, int64_t layer, int64_t row0, int64_t B,
                      int64_t L);
    void free_workspace();

    ModelConfig config_;
    std::shared_ptr<Backend> backend_;
    std::unique_ptr<ModelWeights> weights_;

    // Workspace (device), rows = ws_rows_ token rows:
    int64_t ws_rows_ = 0;
    int32_t* ids_ = nullptr;      // (rows)        token ids staged for forward
    float* hidden_ = nullptr;     // (rows, d)     mixer output / embedding
    float* residual_ = nullptr;   // (rows, d)     residual stream (fp32)
    float* normed_ = nullptr;     // (rows, d)     normed input of the mixer
    float* proj_ = nullptr;       // (rows, d_in_proj)  M1: [x | z]; M2: [z | xBC | dt]
    float* xconv_ = nullptr;      // (rows, conv_dim)   post-conv, post-SiLU
    float* xdbl_ = nullptr;       // (rows, Rdt + 2N)   M1: [dt_low | B | C]
    float* dt_ = nullptr;         // (rows, E)          M1: dt before bias
    float* y_ = nullptr;          // (rows, E)          scan output
    float* y2_ = nullptr;         // (rows, E)          M2: gated-norm output
    float* logits_ = nullptr;     // (logits_rows, V)
    int64_t logits_rows_ = 0;
    uint64_t* rng_ = nullptr;     // (rows, 3)     decode_step: (seed, stream, counter) per row

 public:
    // The staging buffer for ids (device): callers copy ids here and pass it to forward.
    int32_t* ids_buffer() const { return ids_; }

    // Decode fast path (backends with supports_graphs(), i.e. CUDA): one token for each of
    // rows [0, B) of `state`, fed from the B ids in ids_buffer(); the forward and the device
    // sampling (`s`: options and `seen`; logits, ld, B, V, rng and out are filled here) are
    // one graph replay per step, recorded once per (B, state, seen, options). The sampled ids
    // stay in ids_buffer() and are copied to `tokens` (B, host): the only copy back.
    // `rng` (B, 3) host: (seed, stream, counter) per row, uploaded before the replay.
    // Returns the device logits (B, V), valid until the next forward. Needs reserve(B, B).
    const float* decode_step(State& state, int64_t B, DeviceSampleParams s, const uint64_t* rng,
                             int32_t* tokens);
};

}  // namespace mambart

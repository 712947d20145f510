// L4 model: recurrent state, scratch workspace and the forward pass of a language model made of
// a list of layers (cpp/layers/).
//
// Readers start at Model::forward: embedding -> n_layer x (add + norm -> layer) -> add + norm_f
// -> lm_head. The same function serves prefill (one row, L tokens, continuing from the row's
// state) and decode (B rows, one token each).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "backend.h"
#include "config.h"
#include "layers/layer.h"
#include "weights.h"

namespace mambart {

// The recurrent state of B sequences, laid out from the layers' state specs in one device
// allocation made at construction. Layers' state tensors with the same name and shape share a
// slot: slot s holds (layers in the slot) x B x (elements per row), in the slot's dtype (fp32,
// or for SSM states the config's state_dtype: bf16 with the option state_dtype, issue 18). For
// a Mamba model that is two slots, conv (n_layer, B, C, W) and ssm (n_layer, B, ...).
class State {
 public:
    struct Slot {
        std::string name;            // the tensor name in state files ("conv", "ssm", ...)
        std::vector<int64_t> shape;  // per sequence and layer
        int64_t elems = 0;           // per sequence and layer
        std::vector<int64_t> layers; // the layers whose state this slot holds, in order
        size_t offset = 0;           // bytes from the start of the allocation
        DType dtype = DType::F32;    // F32, or BF16 (an SSM state with state_dtype bfloat16)
        // Bytes of one sequence's slot in all its layers.
        uint64_t row_bytes() const {
            return uint64_t(layers.size()) * uint64_t(elems) * dtype_size(dtype);
        }
    };

    State(const ModelConfig& config, Backend& backend, int64_t batch);
    ~State();
    State(const State&) = delete;
    State& operator=(const State&) = delete;

    // Per layer, per state tensor (LayerConfig::state() order): (slot, index within the slot).
    using LayerSlots = std::vector<std::vector<std::pair<size_t, int64_t>>>;
    // The slots a config's layers give (no allocation): the layout of states and state files.
    static std::vector<Slot> layout(const ModelConfig& config, LayerSlots* where = nullptr);
    // Bytes of state one sequence takes (all slots, all layers).
    static uint64_t row_bytes(const ModelConfig& config);

    int64_t batch() const { return batch_; }
    int64_t n_layer() const { return int64_t(where_.size()); }
    const std::vector<Slot>& slots() const { return slots_; }
    // The layer's state tensors at `row`, in state() order, into out[0..] (for LayerIO::state;
    // a BF16 slot's pointer addresses bf16 values: the layer passes it on as such).
    void layer_tensors(int64_t layer, int64_t row, float** out) const;
    void* base() const { return base_; }
    void reset_row(int64_t row);  // a fresh sequence: zero history
    size_t bytes() const { return bytes_; }
    Backend& backend() const { return backend_; }
    // Whether `other` has this state's slots (names, shapes, layers and dtypes).
    bool same_layout(const State& other) const;

    // Snapshot / restore (issue 7), backend-generic (Backend copies only):
    // Copies row `src_row` of `src` into row `dst_row` of this state (device to device). `src`
    // must have the same layout and live on the same backend (InvalidArgument otherwise).
    void copy_row_from(const State& src, int64_t src_row, int64_t dst_row);
    // Host copies of one row: per slot, (layers in the slot, shape...) fp32 (a BF16 slot's
    // values widened, exactly). row_from_host checks the count and sizes (InvalidArgument
    // naming the state tensor); into a BF16 slot it rounds to nearest even.
    std::vector<std::vector<float>> row_to_host(int64_t row) const;
    void row_from_host(int64_t row, const std::vector<std::vector<float>>& in);

 private:
    Backend& backend_;
    int64_t batch_;
    std::vector<Slot> slots_;
    LayerSlots where_;
    void* at(size_t slot, int64_t i, int64_t row) const;  // layer i of the slot, at `row`
    size_t bytes_ = 0;
    void* base_ = nullptr;
};

enum class LogitsMode {
    None,  // no logits (an intermediate prefill chunk)
    Last,  // the last token of each row: (B, V)
    All,   // every token: (B*L, V)
};

class Model {
 public:
    // Whether decode steps (L = 1) run the fused projections (option fused_projections, read at
    // load; every layer takes them; the backend decides per call by the rows).
    bool fused_projections() const { return fuse_projections_; }
    // Loads `dir` (config.json + model.safetensors) onto `backend`; `dtype` of the large matrices
    // (defaults to the stored dtype); `state_dtype` of the SSM states, F32 or BF16 (defaults to
    // the option state_dtype; Unsupported where the backend or a layer type has no bf16 state).
    Model(const std::string& dir, std::shared_ptr<Backend> backend, const DType* dtype,
          const DType* state_dtype = nullptr);
    DType state_dtype() const { return config_.state_dtype; }
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
    // trace (speculative verification, issue 25), or nullptr: a State of this model with at
    // least B * L rows; row b * L + t gets row row0 + b's state after its token t, so a caller
    // keeps the state after any prefix with State::copy_row_from (no recomputation). Needs
    // supports_state_trace() (Unsupported naming the layer type otherwise).
    const float* forward(State& state, int64_t row0, int64_t B, int64_t L, const int32_t* ids,
                         LogitsMode mode, State* trace = nullptr);
    // Whether every layer can write per-token states (forward's trace).
    bool supports_state_trace() const;
    // Whether batch-1 decode steps try the persistent decode (option cuda_persistent_decode).
    bool persistent_decode() const { return persistent_; }
    // Forwards that ran (or were recorded into a graph) as the persistent decode.
    int64_t persistent_steps() const { return persistent_steps_; }

    // Grows the scratch workspace to hold `rows` = B * L token rows and `logits_rows` rows of
    // logits (allocation happens here, never inside forward).
    void reserve(int64_t rows, int64_t logits_rows);
    int64_t max_rows() const { return ws_rows_; }
    // Bytes reserve(rows, logits_rows) allocates in all (the backend's scratch included), for
    // estimates made before allocating (cpp/footprint.h); reserve() grows the workspace to at
    // least this, freeing the old one first.
    uint64_t workspace_bytes(int64_t rows, int64_t logits_rows) const;
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
    void free_workspace();
    // The widths (floats per token row) of the layers' workspace buffers and of the
    // projections' inputs (the backend's scratch).
    void workspace_cols(std::vector<int64_t>* layer_cols, int64_t* scratch_cols) const;

    ModelConfig config_;
    std::shared_ptr<Backend> backend_;
    std::unique_ptr<ModelWeights> weights_;
    std::vector<std::unique_ptr<Layer>> layers_;  // n_layer, from the layer registry
    std::vector<Param> block_norm_w_, block_norm_b_;  // per layer (d): the pre-norm of its block
    bool keep_embedding_ = false;    // a layer reads the embedding output (LayerIO::embedding)
    bool fuse_projections_ = false;  // option fused_projections, every layer takes them (issue 16)
    bool persistent_step(State& st, int64_t row0);
    bool persistent_ = false;  // option cuda_persistent_decode, tried per batch-1 step (issue 16)
    std::vector<PersistentLayer> persistent_layers_;  // (n_layer) the step's descriptions
    int64_t persistent_steps_ = 0;

    // Workspace (device), rows = ws_rows_ token rows:
    int64_t ws_rows_ = 0;
    int32_t* ids_ = nullptr;      // (rows)        token ids staged for forward
    int32_t* dids_ = nullptr;     // (2, rows)     decode lanes' ids: fed, then overwritten by the
                                  //               sampled ids (lane 0: decode_step; 1: the engine)
    float* hidden_ = nullptr;     // (rows, d)     layer output / embedding
    float* residual_ = nullptr;   // (rows, d)     residual stream (fp32)
    float* normed_ = nullptr;     // (rows, d)     normed input of the layer
    float* embed_ = nullptr;      // (rows, d)     the embedding output [keep_embedding_]
    // The layers' workspace buffers: buffer k is (rows, max over layers of workspace_cols()[k]).
    std::vector<float*> layer_ws_;
    std::vector<int64_t> layer_ws_cols_;
    float* logits_ = nullptr;     // (logits_rows, V)
    int64_t logits_rows_ = 0;
    uint64_t* rng_ = nullptr;     // (rows, 3)     decode_step: (seed, stream, counter) per row
    // Page-locked host staging of the decode launches, per launch buffer (0: lane 0; 1 and 2:
    // lane 1's two launches in flight), kept across reserve() (grown with their contents):
    static constexpr int kDecodeBufs = 3;
    int64_t host_rows_ = 0;
    int32_t* hids_[kDecodeBufs] = {};   // (host_rows) ids fed
    uint64_t* hrng_[kDecodeBufs] = {};  // (host_rows, 3) draws
    int32_t* htok_[kDecodeBufs] = {};   // (host_rows) sampled ids, copied back
    uint64_t marks_[kDecodeBufs] = {};  // the backend marker after each buffer's copy back
    void reserve_host(int64_t rows);

 public:
    // The staging buffer for ids (device): callers copy ids here and pass it to forward.
    int32_t* ids_buffer() const { return ids_; }
    // The logits forward writes (device; what it returns), for callers that replay a recorded
    // forward (Backend::run_graph) and so do not get its return value.
    const float* logits_buffer() const { return logits_; }

    // Decode fast path (backends with supports_graphs(), i.e. CUDA): one token for each of
    // rows [0, B) of `state`; the forward and the device sampling (`s`: options and `seen`;
    // logits, ld, B, V, rng and out are filled here) are one graph replay per step, recorded once
    // per (B, state, seen, options, lane). Two lanes, each with its own device ids (the logits are
    // the workspace's, read by the sampling inside the same replay):
    // lane 0 (buffer 0) for decode_step's callers, lane 1 (buffers 1 and 2, alternating, so
    // that two launches may be in flight) for the engine.
    // `ids` (B, host): the ids to feed; nullptr: feed what the lane's previous launch sampled,
    // in place (its rows, in the same order). `rng` (B, 3) host: (seed, stream, counter) per
    // row. Both are staged through page-locked buffers: nothing here waits for the device.
    // Returns the device logits (B, V), valid until the next forward. Needs reserve(B, B).
    const float* decode_launch(State& state, int64_t B, DeviceSampleParams s, const uint64_t* rng,
                               const int32_t* ids, int buf);
    // The B ids launch `buf` sampled, into `tokens` (host): waits for that launch only (not for
    // work enqueued after it); -1 marks a row with a non-finite logit.
    void decode_collect(int64_t B, int buf, int32_t* tokens);
    // decode_launch + decode_collect on lane 0.
    const float* decode_step(State& state, int64_t B, DeviceSampleParams s, const uint64_t* rng,
                             const int32_t* ids, int32_t* tokens);
};

}  // namespace mambart

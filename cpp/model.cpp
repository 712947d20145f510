#include "model.h"

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "error.h"
#include "layers/registry.h"
#include "options.h"

namespace mambart {

// ---- State -----------------------------------------------------------------------------------

std::vector<State::Slot> State::layout(const ModelConfig& c, LayerSlots* where) {
    std::vector<Slot> slots;
    if (where) where->assign(c.layers.size(), {});
    for (int64_t l = 0; l < int64_t(c.layers.size()); ++l) {
        for (const StateSpec& s : c.layers[size_t(l)]->state(c)) {
            const DType dt = s.ssm ? c.state_dtype : DType::F32;
            size_t k = slots.size();
            for (size_t j = 0; j < slots.size(); ++j)
                if (slots[j].name == s.name && slots[j].shape == s.shape && slots[j].dtype == dt)
                    k = j;
            if (k == slots.size()) slots.push_back(Slot{s.name, s.shape, s.numel(), {}, 0, dt});
            if (where) (*where)[size_t(l)].emplace_back(k, int64_t(slots[k].layers.size()));
            slots[k].layers.push_back(l);
        }
    }
    // Slots of one name but different shapes (a hybrid's layers of different widths) are told
    // apart in files by the first layer they hold: "conv@3".
    std::vector<int> same(slots.size(), 0);
    for (size_t i = 0; i < slots.size(); ++i)
        for (const Slot& y : slots) same[i] += y.name == slots[i].name;
    for (size_t i = 0; i < slots.size(); ++i)
        if (same[i] > 1) slots[i].name = str_cat(slots[i].name, "@", slots[i].layers.front());
    return slots;
}

uint64_t State::row_bytes(const ModelConfig& c) {
    uint64_t n = 0;
    for (const Slot& s : layout(c)) n += s.row_bytes();
    return n;
}

State::State(const ModelConfig& c, Backend& backend, int64_t batch)
    : backend_(backend), batch_(batch) {
    if (batch < 1) throw InvalidArgument(str_cat("batch size must be >= 1, got ", batch));
    slots_ = layout(c, &where_);
    size_t off = 0;
    for (Slot& x : slots_) {
        x.offset = off;
        off += size_t(x.row_bytes()) * size_t(batch_);
        off = (off + 3) & ~size_t(3);  // the next slot 4-byte aligned (after an odd bf16 count)
    }
    bytes_ = off;
    base_ = backend_.alloc(bytes_, "the recurrent state");
    backend_.zero(base_, bytes_);
}

State::~State() { backend_.dealloc(base_); }

void* State::at(size_t slot, int64_t i, int64_t row) const {
    const Slot& x = slots_[slot];
    return static_cast<char*>(base_) + x.offset +
           size_t((i * batch_ + row) * x.elems) * dtype_size(x.dtype);
}

void State::layer_tensors(int64_t layer, int64_t row, float** out) const {
    const auto& w = where_[size_t(layer)];
    for (size_t k = 0; k < w.size(); ++k)
        out[k] = static_cast<float*>(at(w[k].first, w[k].second, row));
}

// A row of a slot is one block per layer, `batch_ * elems` elements apart: one strided call
// per slot (cudaMemcpy2DAsync / cudaMemset2DAsync on CUDA), not one per layer.
void State::reset_row(int64_t row) {
    for (size_t s = 0; s < slots_.size(); ++s) {
        const Slot& x = slots_[s];
        const size_t e = dtype_size(x.dtype);
        backend_.zero_2d(at(s, 0, row), size_t(batch_ * x.elems) * e, size_t(x.elems) * e,
                         x.layers.size());
    }
}

bool State::same_layout(const State& o) const {
    bool same = o.slots_.size() == slots_.size();
    for (size_t s = 0; same && s < slots_.size(); ++s)
        same = o.slots_[s].name == slots_[s].name && o.slots_[s].shape == slots_[s].shape &&
               o.slots_[s].layers == slots_[s].layers && o.slots_[s].dtype == slots_[s].dtype;
    return same;
}

void State::copy_row_from(const State& src, int64_t src_row, int64_t dst_row) {
    if (&src.backend_ != &backend_ || !same_layout(src))
        throw InvalidArgument("State::copy_row_from: the source state belongs to another model "
                              "or backend, or has another state_dtype");
    if (src_row < 0 || src_row >= src.batch_ || dst_row < 0 || dst_row >= batch_)
        throw InvalidArgument(str_cat("State::copy_row_from: row ", src_row, " -> ", dst_row,
                                      " out of range"));
    for (size_t s = 0; s < slots_.size(); ++s) {
        const Slot& x = slots_[s];
        const size_t e = dtype_size(x.dtype);
        backend_.copy_device_2d(at(s, 0, dst_row), size_t(batch_ * x.elems) * e,
                                src.at(s, 0, src_row), size_t(src.batch_ * x.elems) * e,
                                size_t(x.elems) * e, x.layers.size());
    }
}

std::vector<std::vector<float>> State::row_to_host(int64_t row) const {
    std::vector<std::vector<float>> out;
    std::vector<uint16_t> half;  // a BF16 slot's layer, as stored
    for (size_t s = 0; s < slots_.size(); ++s) {
        const size_t n = size_t(slots_[s].elems);
        const bool f32 = slots_[s].dtype == DType::F32;
        out.emplace_back(slots_[s].layers.size() * n);
        for (size_t i = 0; i < slots_[s].layers.size(); ++i) {
            float* dst = out.back().data() + i * n;
            if (f32) {
                backend_.copy_to_host(dst, at(s, int64_t(i), row), n * sizeof(float));
                continue;
            }
            half.resize(n);
            backend_.copy_to_host(half.data(), at(s, int64_t(i), row), n * sizeof(uint16_t));
            convert_to_f32(half.data(), DType::BF16, dst, n);
        }
    }
    return out;
}

void State::row_from_host(int64_t row, const std::vector<std::vector<float>>& in) {
    MAMBART_CHECK_ARG(in.size() == slots_.size(), "the state has ", in.size(),
                      " tensors, this model needs ", slots_.size());
    std::vector<uint16_t> half;
    for (size_t s = 0; s < slots_.size(); ++s) {
        const size_t n = size_t(slots_[s].elems);
        MAMBART_CHECK_ARG(in[s].size() == slots_[s].layers.size() * n, slots_[s].name,
                          " state has ", in[s].size(), " values, this model needs ",
                          slots_[s].layers.size() * n);
        for (size_t i = 0; i < slots_[s].layers.size(); ++i) {
            const float* src = in[s].data() + i * n;
            if (slots_[s].dtype == DType::F32) {
                backend_.copy_to_device(at(s, int64_t(i), row), src, n * sizeof(float));
                continue;
            }
            half.resize(n);
            convert_from_f32(src, half.data(), DType::BF16, n);
            backend_.copy_to_device(at(s, int64_t(i), row), half.data(), n * sizeof(uint16_t));
        }
    }
}

// ---- Model -----------------------------------------------------------------------------------

namespace {

// A layer's view of the placed weights: its names prefixed with "layers.{i}.".
class PrefixedTensors final : public LayerTensors {
 public:
    PrefixedTensors(const ModelWeights& w, std::string prefix) : w_(w), pre_(std::move(prefix)) {}
    Weight matrix(const std::string& name) const override { return w_.matrix(pre_ + name); }
    Param param(const std::string& name) const override { return w_.param(pre_ + name); }

 private:
    const ModelWeights& w_;
    std::string pre_;
};

// Most state tensors any layer has (LayerIO::state is filled from a fixed array).
constexpr size_t kMaxLayerStateTensors = 16;

}  // namespace

Model::Model(const std::string& dir, std::shared_ptr<Backend> backend, const DType* dtype,
             const DType* state_dtype)
    : config_(ModelConfig::from_file(dir + "/config.json", layer_types())),
      backend_(std::move(backend)) {
    // The SSM states' storage (option state_dtype, issue 18): checked before anything is placed.
    config_.state_dtype = state_dtype ? *state_dtype : runtime_options().state_dtype;
    MAMBART_CHECK_ARG(config_.state_dtype == DType::F32 || config_.state_dtype == DType::BF16,
                      "state_dtype must be float32 or bfloat16, got ",
                      dtype_name(config_.state_dtype));
    if (config_.state_dtype != DType::F32) {
        if (!backend_->supports_state_dtype(config_.state_dtype))
            throw Unsupported(str_cat("option state_dtype=", dtype_name(config_.state_dtype),
                                      ": the ", backend_->name(), " backend has no ",
                                      dtype_name(config_.state_dtype),
                                      " SSM state yet (use state_dtype=float32)"));
        for (const auto& lc : config_.layers)
            if (!lc->supports_bf16_state())
                throw Unsupported(str_cat("option state_dtype=", dtype_name(config_.state_dtype),
                                          ": ", lc->type(), " layers keep a float32 state "
                                          "(use state_dtype=float32 for this model)"));
    }
    for (const auto& lc : config_.layers) {
        layers_.push_back(create_layer(lc, config_));
        if (lc->state(config_).size() > kMaxLayerStateTensors)
            throw ModelLoadError(str_cat(dir, "/config.json: a ", lc->type(), " layer has more than ",
                                         kMaxLayerStateTensors, " state tensors"));
    }
    weights_ = std::make_unique<ModelWeights>(dir, config_, *backend_,
                                              dtype ? *dtype : config_.dtype);
    for (size_t i = 0; i < layers_.size(); ++i) {
        const std::string pre = str_cat("layers.", i, ".");
        const bool own = config_.layers[i]->norms_own_input();  // no block norm
        block_norm_w_.push_back(own ? Param{} : weights_->param(pre + "norm.weight"));
        block_norm_b_.push_back(!own && config_.norm == NormKind::LayerNorm
                                    ? weights_->param(pre + "norm.bias")
                                    : Param{});
        keep_embedding_ = keep_embedding_ || config_.layers[i]->reads_embedding();
        layers_[i]->bind(PrefixedTensors(*weights_, pre));
    }
    fuse_projections_ = runtime_options().fused_projections;
    for (const auto& l : layers_) fuse_projections_ = fuse_projections_ && l->takes_fused_projections();
    // The fused projection kernels read float weights: a quantized model runs its projections
    // unfused (issue 18), whatever the option says.
    if (!config_.quant.empty()) fuse_projections_ = false;
    // The persistent batch-1 decode (option cuda_persistent_decode, issue 16): tried when the
    // option is on, no layer norms its own input or reads the embedding, and the residual stream
    // is not scaled; each layer and the backend may still decline (persistent_step).
    persistent_ = runtime_options().cuda_persistent_decode && !keep_embedding_ &&
                  config_.residual_multiplier == 1.0 && config_.logits_scaling == 1.0 &&
                  config_.embedding_multiplier == 1.0;
    for (const auto& l : config_.layers) persistent_ = persistent_ && !l->norms_own_input();
    if (persistent_) persistent_layers_.resize(size_t(config_.n_layer));
}

// Every layer of one batch-1 decode step (row0 of st) in the backend's persistent decode, from
// residual_ (the embedding) to residual_ after the last layer's add; false (nothing enqueued):
// a layer or the backend declined, the separate ops run instead.
bool Model::persistent_step(State& st, int64_t row0) {
    const ModelConfig& c = config_;
    float* state_ptrs[kMaxLayerStateTensors];
    for (int64_t i = 0; i < c.n_layer; ++i) {
        st.layer_tensors(i, row0, state_ptrs);
        LayerIO io{normed_, hidden_, layer_ws_.data(), state_ptrs, 1, 1};
        PersistentLayer& pl = persistent_layers_[size_t(i)];
        pl = PersistentLayer{};
        if (!layers_[size_t(i)]->persistent_layer(io, pl)) return false;
        pl.norm_w = block_norm_w_[size_t(i)].data;
        pl.norm_b = block_norm_b_[size_t(i)].data;
    }
    PersistentDecodeParams p;
    p.layers = persistent_layers_.data();
    p.n_layers = c.n_layer;
    p.d = c.d_model;
    p.rms = c.norm == NormKind::RMSNorm;
    p.eps = float(c.norm_eps);
    p.residual = residual_;
    if (!backend_->persistent_decode(p)) return false;
    ++persistent_steps_;
    return true;
}

Model::~Model() {
    free_workspace();
    for (int b = 0; b < kDecodeBufs; ++b)
        for (void* p : {static_cast<void*>(hids_[b]), static_cast<void*>(hrng_[b]),
                        static_cast<void*>(htok_[b])})
            backend_->dealloc_host(p);
}

void Model::free_workspace() {
    for (void* p : {static_cast<void*>(ids_), static_cast<void*>(dids_),
                    static_cast<void*>(hidden_), static_cast<void*>(residual_),
                    static_cast<void*>(normed_), static_cast<void*>(embed_),
                    static_cast<void*>(logits_),
                    static_cast<void*>(rng_)})
        if (p) backend_->dealloc(p);
    for (float* p : layer_ws_)
        if (p) backend_->dealloc(p);
    layer_ws_.clear();
    backend_->clear_graphs();  // recorded graphs use these buffers
    rng_ = nullptr;
    ids_ = dids_ = nullptr;
    hidden_ = residual_ = normed_ = embed_ = logits_ = nullptr;
    ws_rows_ = logits_rows_ = 0;
}

void Model::reserve_host(int64_t rows) {
    if (rows <= host_rows_) return;
    // A launch in flight may still copy into the old buffers: wait for it, keep their contents.
    backend_->synchronize();
    for (int b = 0; b < kDecodeBufs; ++b) {
        auto grow = [&](auto*& p, int64_t per_row, const char* what) {
            using T = std::remove_reference_t<decltype(*p)>;
            T* q = static_cast<T*>(backend_->alloc_host(size_t(rows * per_row) * sizeof(T), what));
            if (p) std::memcpy(q, p, size_t(host_rows_ * per_row) * sizeof(T));
            backend_->dealloc_host(p);
            p = q;
        };
        grow(hids_[b], 1, "decode ids (host staging)");
        grow(hrng_[b], 3, "decode draws (host staging)");
        grow(htok_[b], 1, "sampled ids (host staging)");
    }
    host_rows_ = rows;
}

void Model::workspace_cols(std::vector<int64_t>* layer_cols, int64_t* scratch_cols) const {
    // The layers' buffers: buffer k as wide as the widest layer's k-th.
    layer_cols->clear();
    *scratch_cols = config_.d_model;  // lm_head's input
    for (const auto& l : layers_) {
        const std::vector<int64_t> cols = l->workspace_cols();
        if (cols.size() > layer_cols->size()) layer_cols->resize(cols.size(), 0);
        for (size_t k = 0; k < cols.size(); ++k)
            (*layer_cols)[k] = std::max((*layer_cols)[k], cols[k]);
        *scratch_cols = std::max(*scratch_cols, l->max_linear_cols());
    }
}

uint64_t Model::workspace_bytes(int64_t rows, int64_t logits_rows) const {
    if (rows <= 0 && logits_rows <= 0) return 0;
    std::vector<int64_t> layer_cols;
    int64_t scratch_cols = 0;
    workspace_cols(&layer_cols, &scratch_cols);
    // hidden, residual, normed (and the kept embedding)
    uint64_t cols = (keep_embedding_ ? 4 : 3) * uint64_t(config_.d_model);
    for (int64_t c : layer_cols) cols += uint64_t(c);
    const uint64_t r = uint64_t(std::max<int64_t>(rows, 0));
    // ids_ and the two lanes' dids_; rng_; the activations; the logits.
    return r * (3 * sizeof(int32_t) + 3 * sizeof(uint64_t) + cols * sizeof(float)) +
           uint64_t(std::max<int64_t>(logits_rows, 0)) * uint64_t(config_.vocab_size) *
               sizeof(float) +
           backend_->scratch_bytes(int64_t(r), scratch_cols);
}

void Model::reserve(int64_t rows, int64_t logits_rows) {
    if (rows <= ws_rows_ && logits_rows <= logits_rows_) return;
    rows = std::max(rows, ws_rows_);
    logits_rows = std::max(logits_rows, logits_rows_);
    const ModelConfig& c = config_;
    Backend& be = *backend_;
    // The lanes' ids survive (a decode fed in place may follow): copied into the new buffer
    // before the old one is freed (in queue order).
    int32_t* dids = static_cast<int32_t*>(be.alloc(size_t(2 * rows) * sizeof(int32_t),
                                                   "decode token ids"));
    if (dids_)
        for (int lane = 0; lane < 2; ++lane)
            be.copy_device(dids + lane * rows, dids_ + lane * ws_rows_,
                           size_t(ws_rows_) * sizeof(int32_t));
    free_workspace();
    dids_ = dids;
    auto buf = [&](int64_t cols, const char* what) {
        return static_cast<float*>(be.alloc(size_t(rows * cols) * sizeof(float), what));
    };
    ids_ = static_cast<int32_t*>(be.alloc(size_t(rows) * sizeof(int32_t), "token ids"));
    rng_ = static_cast<uint64_t*>(be.alloc(size_t(rows) * 3 * sizeof(uint64_t), "sampling draws"));
    hidden_ = buf(c.d_model, "hidden activations");
    residual_ = buf(c.d_model, "the residual stream");
    normed_ = buf(c.d_model, "normed activations");
    if (keep_embedding_) embed_ = buf(c.d_model, "the embedding output");
    int64_t scratch_cols = 0;
    workspace_cols(&layer_ws_cols_, &scratch_cols);
    for (int64_t cols : layer_ws_cols_) layer_ws_.push_back(buf(cols, "layer activations"));
    logits_ = static_cast<float*>(
        be.alloc(size_t(logits_rows * c.vocab_size) * sizeof(float), "logits"));
    ws_rows_ = rows;
    logits_rows_ = logits_rows;
    reserve_host(rows);
    // The projections' inputs: at most scratch_cols features per row.
    be.reserve_scratch(rows, scratch_cols);
}

bool Model::supports_state_trace() const {
    for (const auto& l : layers_)
        if (!l->supports_state_trace()) return false;
    return true;
}

const float* Model::forward(State& st, int64_t row0, int64_t B, int64_t L, const int32_t* ids,
                            LogitsMode mode, State* trace) {
    const ModelConfig& c = config_;
    Backend& be = *backend_;
    const int64_t R = B * L, d = c.d_model;
    const int64_t logit_rows = mode == LogitsMode::All ? R : mode == LogitsMode::Last ? B : 0;
    if (R > ws_rows_ || logit_rows > logits_rows_ || row0 < 0 || row0 + B > st.batch())
        throw InvalidArgument(str_cat("Model::forward: ", B, " x ", L,
                                      " rows exceed the reserved workspace or state"));
    if (trace) {
        for (const auto& l : layers_)
            if (!l->supports_state_trace())
                throw Unsupported(str_cat("speculative decoding: ", l->config().type(),
                                          " layers cannot keep per-token states yet"));
        if (trace->batch() < R || !trace->same_layout(st))
            throw InvalidArgument(str_cat("Model::forward: the state trace holds ",
                                          trace->batch(), " rows, ", B, " x ", L, " needed"));
    }

    be.embedding(ids, R, weights_->embedding, hidden_);
    if (c.embedding_multiplier != 1.0) be.scale(hidden_, R * d, float(c.embedding_multiplier));
    be.copy_device(residual_, hidden_, size_t(R * d) * sizeof(float));
    if (keep_embedding_) be.copy_device(embed_, hidden_, size_t(R * d) * sizeof(float));
    // The fused decode projections (option fused_projections, issue 16): no add_norm kernels;
    // each layer's input projection norms the residual itself, its output projection adds into
    // the residual, and the head norms it too. The same values, bit for bit.
    // (Not with Granite's residual multiplier or logits scaling: the fused ops have no scale.)
    const bool fused = fuse_projections_ && L == 1 && !trace && be.fused_projection(R, d) &&
                       c.residual_multiplier == 1.0 && c.logits_scaling == 1.0;
    // The persistent decode leaves the last layer's output added into residual_ already.
    const bool persistent = persistent_ && R == 1 && !trace && !fused && persistent_step(st, row0);
    const float* last_hidden = persistent ? nullptr : hidden_;
    float* state_ptrs[kMaxLayerStateTensors];
    float* trace_ptrs[kMaxLayerStateTensors];
    for (int64_t i = 0; i < (persistent ? 0 : c.n_layer); ++i) {
        // Layer 0 norms the embedding itself; later layers add the previous layer output first
        // (fused: the layer's input projection does both). A layer that norms its own input
        // gets the residual stream (the add alone: add_norm without output).
        const bool own = c.layers[size_t(i)]->norms_own_input();
        if (!fused && (!own || i > 0))
            be.add_norm(residual_, i == 0 ? nullptr : hidden_, block_norm_w_[size_t(i)],
                        block_norm_b_[size_t(i)], c.norm, c.norm_eps, R, d,
                        own ? nullptr : normed_);
        st.layer_tensors(i, row0, state_ptrs);
        LayerIO io{own ? residual_ : normed_, hidden_, layer_ws_.data(), state_ptrs, B, L};
        io.embedding = embed_;
        if (fused) {
            io.residual = residual_;
            io.norm = ProjNorm{residual_, block_norm_w_[size_t(i)].data,
                               block_norm_b_[size_t(i)].data, c.norm == NormKind::RMSNorm,
                               float(c.norm_eps)};
        }
        if (trace) {
            trace->layer_tensors(i, 0, trace_ptrs);  // rows [0, B * L): (B, L, shape...)
            io.trace = trace_ptrs;
        }
        layers_[size_t(i)]->forward(be, io);
        if (c.residual_multiplier != 1.0) be.scale(hidden_, R * d, float(c.residual_multiplier));
    }
    if (fused) {
        if (mode == LogitsMode::None) return nullptr;
        ProjParams p;
        p.M = B;
        p.W = weights_->lm_head;
        p.N = c.vocab_size;
        p.y = logits_;
        p.ldy = c.vocab_size;
        p.norm = ProjNorm{residual_, weights_->norm_f_w.data, weights_->norm_f_b.data,
                          c.norm == NormKind::RMSNorm, float(c.norm_eps)};
        p.scratch_x = normed_;
        be.project(p);
        return logits_;
    }
    be.add_norm(residual_, last_hidden, weights_->norm_f_w, weights_->norm_f_b, c.norm,
                c.norm_eps, R, d, normed_);
    if (mode == LogitsMode::None) return nullptr;
    const float* x = normed_;
    int64_t ldx = d, M = R;
    if (mode == LogitsMode::Last && L > 1) {  // the last token of each row
        x = normed_ + (L - 1) * d;
        ldx = L * d;
        M = B;
    }
    // Only the first vocab_size rows of the (padded) head: padding rows never get logits.
    be.linear(x, ldx, M, weights_->lm_head, c.vocab_size, nullptr, logits_, c.vocab_size);
    if (c.logits_scaling != 1.0) be.scale(logits_, M * c.vocab_size, float(1.0 / c.logits_scaling));
    return logits_;
}

// ---- decode fast path (CUDA graphs + device sampling) --------------------------------------

namespace {
inline uint64_t mix_key(uint64_t h, uint64_t v) {
    h ^= v + 0x9E3779B97F4A7C15ull + (h << 6) + (h >> 2);
    return h;
}
inline uint64_t float_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}
}  // namespace

const float* Model::decode_step(State& st, int64_t B, DeviceSampleParams s, const uint64_t* rng,
                                const int32_t* ids, int32_t* tokens) {
    const float* lg = decode_launch(st, B, s, rng, ids, 0);
    decode_collect(B, 0, tokens);
    return lg;
}

void Model::decode_collect(int64_t B, int buf, int32_t* tokens) {
    if (buf < 0 || buf >= kDecodeBufs || B < 1 || B > host_rows_)
        throw InvalidArgument(str_cat("Model::decode_collect: buffer ", buf, ", batch ", B));
    backend_->wait_marker(marks_[buf]);
    std::memcpy(tokens, htok_[buf], size_t(B) * sizeof(int32_t));
}

const float* Model::decode_launch(State& st, int64_t B, DeviceSampleParams s, const uint64_t* rng,
                                  const int32_t* ids, int buf) {
    Backend& be = *backend_;
    const int64_t V = config_.vocab_size;
    if (B < 1 || B > ws_rows_ || B > logits_rows_ || B > st.batch() || B > host_rows_)
        throw InvalidArgument(str_cat("Model::decode_launch: batch ", B,
                                      " exceeds the reserved workspace or state"));
    if (buf < 0 || buf >= kDecodeBufs)
        throw InvalidArgument(str_cat("Model::decode_launch: buffer ", buf, " is not 0, 1 or 2"));
    const int lane = buf == 0 ? 0 : 1;
    int32_t* dids = dids_ + lane * ws_rows_;
    // The staging buffer was last read by the copies before this buffer's previous marker: wait
    // for it (a no-op when that launch was collected).
    be.wait_marker(marks_[buf]);
    std::memcpy(hrng_[buf], rng, size_t(B) * 3 * sizeof(uint64_t));
    be.copy_to_device(rng_, hrng_[buf], size_t(B) * 3 * sizeof(uint64_t));
    if (ids) {
        std::memcpy(hids_[buf], ids, size_t(B) * sizeof(int32_t));
        be.copy_to_device(dids, hids_[buf], size_t(B) * sizeof(int32_t));
    }
    s.logits = logits_;
    s.ld = V;
    s.B = B;
    s.V = V;
    s.rng = rng_;
    s.out = dids;
    uint64_t key = 0;
    for (uint64_t v : {uint64_t(B), uint64_t(reinterpret_cast<uintptr_t>(st.base())),
                       uint64_t(reinterpret_cast<uintptr_t>(s.seen)), float_bits(s.temperature),
                       uint64_t(s.top_k), float_bits(s.top_p), float_bits(s.min_p),
                       float_bits(s.repetition_penalty), uint64_t(lane)})
        key = mix_key(key, v);
    be.run_graph(key, [&] {
        forward(st, 0, B, 1, dids, LogitsMode::Last);
        be.sample(s);
    });
    be.copy_to_host_async(htok_[buf], dids, size_t(B) * sizeof(int32_t));
    marks_[buf] = be.record_marker();
    return logits_;
}

}  // namespace mambart

#include "model.h"

#include <algorithm>
#include <cstring>

#include "error.h"

namespace mambart {

// ---- State -----------------------------------------------------------------------------------

State::State(const ModelConfig& c, Backend& backend, int64_t batch)
    : backend_(backend), n_layer_(c.n_layer), batch_(batch) {
    if (batch < 1) throw InvalidArgument(str_cat("batch size must be >= 1, got ", batch));
    conv_elems_ = c.conv_dim() * c.d_conv;
    ssm_elems_ = c.arch == Arch::Mamba1 ? c.d_inner * c.d_state
                                        : c.nheads * c.headdim * c.d_state;
    bytes_ = size_t(n_layer_ * batch_ * (conv_elems_ + ssm_elems_)) * sizeof(float);
    base_ = static_cast<float*>(backend_.alloc(bytes_, "the recurrent state"));
    backend_.zero(base_, bytes_);
}

State::~State() { backend_.dealloc(base_); }

float* State::conv(int64_t layer, int64_t row) const {
    return base_ + (layer * batch_ + row) * conv_elems_;
}

float* State::ssm(int64_t layer, int64_t row) const {
    return base_ + n_layer_ * batch_ * conv_elems_ + (layer * batch_ + row) * ssm_elems_;
}

void State::reset_row(int64_t row) {
    for (int64_t l = 0; l < n_layer_; ++l) {
        backend_.zero(conv(l, row), size_t(conv_elems_) * sizeof(float));
        backend_.zero(ssm(l, row), size_t(ssm_elems_) * sizeof(float));
    }
}

void State::copy_row_from(const State& src, int64_t src_row, int64_t dst_row) {
    if (&src.backend_ != &backend_ || src.n_layer_ != n_layer_ ||
        src.conv_elems_ != conv_elems_ || src.ssm_elems_ != ssm_elems_)
        throw InvalidArgument("State::copy_row_from: the source state belongs to another model "
                              "or backend");
    if (src_row < 0 || src_row >= src.batch_ || dst_row < 0 || dst_row >= batch_)
        throw InvalidArgument(str_cat("State::copy_row_from: row ", src_row, " -> ", dst_row,
                                      " out of range"));
    for (int64_t l = 0; l < n_layer_; ++l) {
        backend_.copy_device(conv(l, dst_row), src.conv(l, src_row),
                             size_t(conv_elems_) * sizeof(float));
        backend_.copy_device(ssm(l, dst_row), src.ssm(l, src_row),
                             size_t(ssm_elems_) * sizeof(float));
    }
}

void State::row_to_host(int64_t row, float* conv_out, float* ssm_out) const {
    for (int64_t l = 0; l < n_layer_; ++l) {
        backend_.copy_to_host(conv_out + l * conv_elems_, conv(l, row),
                              size_t(conv_elems_) * sizeof(float));
        backend_.copy_to_host(ssm_out + l * ssm_elems_, ssm(l, row),
                              size_t(ssm_elems_) * sizeof(float));
    }
}

void State::row_from_host(int64_t row, const float* conv_in, const float* ssm_in) {
    for (int64_t l = 0; l < n_layer_; ++l) {
        backend_.copy_to_device(conv(l, row), conv_in + l * conv_elems_,
                                size_t(conv_elems_) * sizeof(float));
        backend_.copy_to_device(ssm(l, row), ssm_in + l * ssm_elems_,
                                size_t(ssm_elems_) * sizeof(float));
    }
}

// ---- Model -----------------------------------------------------------------------------------

Model::Model(const std::string& dir, std::shared_ptr<Backend> backend, const DType* dtype)
    : config_(ModelConfig::from_file(dir + "/config.json")), backend_(std::move(backend)) {
    weights_ = std::make_unique<ModelWeights>(dir, config_, *backend_,
                                              dtype ? *dtype : config_.dtype);
}

Model::~Model() { free_workspace(); }

void Model::free_workspace() {
    for (void* p : {static_cast<void*>(ids_), static_cast<void*>(hidden_),
                    static_cast<void*>(residual_), static_cast<void*>(normed_),
                    static_cast<void*>(proj_), static_cast<void*>(xconv_),
                    static_cast<void*>(xdbl_), static_cast<void*>(dt_), static_cast<void*>(y_),
                    static_cast<void*>(y2_), static_cast<void*>(logits_),
                    static_cast<void*>(rng_)})
        if (p) backend_->dealloc(p);
    backend_->clear_graphs();  // recorded graphs use these buffers
    rng_ = nullptr;
    ids_ = nullptr;
    hidden_ = residual_ = normed_ = proj_ = xconv_ = xdbl_ = dt_ = y_ = y2_ = logits_ = nullptr;
    ws_rows_ = logits_rows_ = 0;
}

void Model::reserve(int64_t rows, int64_t logits_rows) {
    if (rows <= ws_rows_ && logits_rows <= logits_rows_) return;
    rows = std::max(rows, ws_rows_);
    logits_rows = std::max(logits_rows, logits_rows_);
    free_workspace();
    const ModelConfig& c = config_;
    Backend& be = *backend_;
    auto buf = [&](int64_t cols, const char* what) {
        return static_cast<float*>(be.alloc(size_t(rows * cols) * sizeof(float), what));
    };
    ids_ = static_cast<int32_t*>(be.alloc(size_t(rows) * sizeof(int32_t), "token ids"));
    rng_ = static_cast<uint64_t*>(be.alloc(size_t(rows) * 3 * sizeof(uint64_t), "sampling draws"));
    hidden_ = buf(c.d_model, "hidden activations");
    residual_ = buf(c.d_model, "the residual stream");
    normed_ = buf(c.d_model, "normed activations");
    proj_ = buf(c.d_in_proj(), "in_proj output");
    xconv_ = buf(c.conv_dim(), "conv output");
    if (c.arch == Arch::Mamba1) {
        xdbl_ = buf(c.x_proj_dim(), "x_proj output");
        dt_ = buf(c.d_inner, "dt");
    }
    y_ = buf(c.d_inner, "scan output");
    if (c.arch == Arch::Mamba2 && c.gated_norm) y2_ = buf(c.d_inner, "gated norm output");
    logits_ = static_cast<float*>(
        be.alloc(size_t(logits_rows * c.vocab_size) * sizeof(float), "logits"));
    ws_rows_ = rows;
    logits_rows_ = logits_rows;
    // The projections' inputs: d_model (in_proj, lm_head), d_inner (x_proj, out_proj) or dt_rank
    // (dt_proj) features per row.
    be.reserve_scratch(rows, std::max(c.d_model, c.d_inner));
}

const float* Model::forward(State& st, int64_t row0, int64_t B, int64_t L, const int32_t* ids,
                            LogitsMode mode) {
    const ModelConfig& c = config_;
    Backend& be = *backend_;
    const int64_t R = B * L, d = c.d_model;
    const int64_t logit_rows = mode == LogitsMode::All ? R : mode == LogitsMode::Last ? B : 0;
    if (R > ws_rows_ || logit_rows > logits_rows_ || row0 < 0 || row0 + B > st.batch())
        throw InvalidArgument(str_cat("Model::forward: ", B, " x ", L,
                                      " rows exceed the reserved workspace or state"));

    be.embedding(ids, R, weights_->embedding, hidden_);
    be.copy_device(residual_, hidden_, size_t(R * d) * sizeof(float));
    for (int64_t i = 0; i < c.n_layer; ++i) {
        const LayerWeights& w = weights_->layers[size_t(i)];
        // Layer 0 norms the embedding itself; later layers add the previous mixer output first.
        be.add_norm(residual_, i == 0 ? nullptr : hidden_, w.norm_w, w.norm_b, c.norm,
                    c.norm_eps, R, d, normed_);
        if (c.arch == Arch::Mamba1)
            mixer_mamba1(w, st, i, row0, B, L);
        else
            mixer_mamba2(w, st, i, row0, B, L);
    }
    be.add_norm(residual_, hidden_, weights_->norm_f_w, weights_->norm_f_b, c.norm, c.norm_eps,
                R, d, normed_);
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
    return logits_;
}

// Mamba-1: xz = in_proj(u); x' = silu(conv(x)); [δ | B | C] = x_proj(x'); dt = dt_proj(δ);
// y = scan(x', dt, A, B, C, D) * silu(z); out = out_proj(y)
void Model::mixer_mamba1(const LayerWeights& w, State& st, int64_t layer, int64_t row0,
                         int64_t B, int64_t L) {
    const ModelConfig& c = config_;
    Backend& be = *backend_;
    const int64_t R = B * L, E = c.d_inner, N = c.d_state, Rdt = c.dt_rank, X = c.x_proj_dim();
    be.linear(normed_, c.d_model, R, w.in_proj, 2 * E, w.in_proj_b.data, proj_, 2 * E);
    be.conv1d(ConvParams{proj_, 2 * E, st.conv(layer, row0), w.conv_w.data, w.conv_b.data,
                         xconv_, B, L, E, c.d_conv});
    be.linear(xconv_, E, R, w.x_proj, X, nullptr, xdbl_, X);
    if (L == 1) {  // decode: dt_proj + scan fused where the backend can
        Mamba1DecodeParams fp{xconv_, xdbl_, X, w.dt_proj, proj_ + E, 2 * E, w.A.data,
                              w.D.data, w.dt_bias.data, st.ssm(layer, row0), y_, B, E, N, Rdt};
        if (be.mamba1_decode_fused(fp)) {
            be.linear(y_, E, R, w.out_proj, c.d_model, w.out_proj_b.data, hidden_, c.d_model);
            return;
        }
    }
    be.linear(xdbl_, X, R, w.dt_proj, E, nullptr, dt_, E);
    SelectiveScanParams sp{};
    sp.x = xconv_;
    sp.dt = dt_;
    sp.Bm = xdbl_ + Rdt;
    sp.Cm = xdbl_ + Rdt + N;
    sp.ld_bc = X;
    sp.z = proj_ + E;
    sp.ld_z = 2 * E;
    sp.A = w.A.data;
    sp.D = w.D.data;
    sp.dt_bias = w.dt_bias.data;
    sp.ssm_state = st.ssm(layer, row0);
    sp.y = y_;
    sp.B = B;
    sp.L = L;
    sp.E = E;
    sp.N = N;
    be.selective_scan(sp);
    be.linear(y_, E, R, w.out_proj, c.d_model, w.out_proj_b.data, hidden_, c.d_model);
}

// Mamba-2: [z | xBC | dt] = in_proj(u); xBC' = silu(conv(xBC)); y = SSD(x, dt, A, B, C) + D x;
// y = gated_rmsnorm(y, z) (or y * silu(z)); out = out_proj(y)
void Model::mixer_mamba2(const LayerWeights& w, State& st, int64_t layer, int64_t row0,
                         int64_t B, int64_t L) {
    const ModelConfig& c = config_;
    Backend& be = *backend_;
    const int64_t R = B * L, E = c.d_inner, N = c.d_state, G = c.ngroups, Din = c.d_in_proj();
    const int64_t conv_dim = c.conv_dim();
    be.linear(normed_, c.d_model, R, w.in_proj, Din, w.in_proj_b.data, proj_, Din);
    const ConvParams cp{proj_ + E, Din, st.conv(layer, row0), w.conv_w.data, w.conv_b.data,
                        xconv_, B, L, conv_dim, c.d_conv};
    SsdParams sp{};
    sp.x = xconv_;
    sp.Bm = xconv_ + E;
    sp.Cm = xconv_ + E + G * N;
    sp.ld_xbc = conv_dim;
    sp.dt = proj_ + E + conv_dim;
    sp.ld_dt = Din;
    sp.z = c.gated_norm ? nullptr : proj_;
    sp.ld_z = Din;
    sp.A = w.A.data;
    sp.D = w.D.data;
    sp.dt_bias = w.dt_bias.data;
    sp.dt_min = c.dt_min;
    sp.dt_max = c.dt_max;
    sp.ssm_state = st.ssm(layer, row0);
    sp.y = y_;
    sp.B = B;
    sp.L = L;
    sp.H = c.nheads;
    sp.P = c.headdim;
    sp.G = G;
    sp.N = N;
    sp.chunk_size = c.chunk_size;
    // decode: conv update + scan fused where the backend can
    if (!(L == 1 && be.mamba2_decode_fused(Mamba2DecodeParams{cp, sp}))) {
        be.conv1d(cp);
        be.ssd_scan(sp);
    }
    const float* out = y_;
    if (c.gated_norm) {
        be.gated_rmsnorm(y_, proj_, Din, w.gated_norm_w.data, R, E, E / G, c.norm_eps, y2_);
        out = y2_;
    }
    be.linear(out, E, R, w.out_proj, c.d_model, w.out_proj_b.data, hidden_, c.d_model);
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
                                int32_t* tokens) {
    Backend& be = *backend_;
    const int64_t V = config_.vocab_size;
    if (B < 1 || B > ws_rows_ || B > logits_rows_ || B > st.batch())
        throw InvalidArgument(str_cat("Model::decode_step: batch ", B,
                                      " exceeds the reserved workspace or state"));
    be.copy_to_device(rng_, rng, size_t(B) * 3 * sizeof(uint64_t));
    s.logits = logits_;
    s.ld = V;
    s.B = B;
    s.V = V;
    s.rng = rng_;
    s.out = ids_;
    uint64_t key = 0;
    for (uint64_t v : {uint64_t(B), uint64_t(reinterpret_cast<uintptr_t>(st.conv(0, 0))),
                       uint64_t(reinterpret_cast<uintptr_t>(s.seen)), float_bits(s.temperature),
                       uint64_t(s.top_k), float_bits(s.top_p), float_bits(s.min_p),
                       float_bits(s.repetition_penalty)})
        key = mix_key(key, v);
    be.run_graph(key, [&] {
        forward(st, 0, B, 1, ids_, LogitsMode::Last);
        be.sample(s);
    });
    be.copy_to_host(tokens, ids_, size_t(B) * sizeof(int32_t));
    return logits_;
}

}  // namespace mambart

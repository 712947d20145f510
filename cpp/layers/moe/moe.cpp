// The MoE layer unit (Granite-4.0-H's block_sparse_moe + shared_mlp).
//
//   logits = router(u)                                        (X experts)
//   top-k of the logits per token (ties: the lower expert id), weights w_j:
//     normalize: softmax over the k selected logits (Granite; Mixtral's renormalized top-k)
//     else:      the softmax over all X logits, at the k selected (Jamba)
//   out = shared(u) + routed_scale · Σ_j w_j · expert_{e_j}(u)
//   expert_e(u) = output_e(silu(gate_e u) * (up_e u)), [gate_e; up_e] = input_e (2I, d), gate
//   first; shared(u) the same with the shared expert's (2S, d) / (d, S) matrices.
//
// config.json `layers` entry: {"type": "moe", "num_experts": X, "top_k": k,
// "intermediate_size": I (per expert), "shared_intermediate_size": S (0: no shared expert),
// "activation": "swiglu", "normalize": bool, "routed_scale": float}. No state.
#include "layers/moe/moe.h"

#include <algorithm>
#include <nlohmann/json.hpp>

#include "config_reader.h"

namespace mambart {
namespace moe {
namespace {

struct Config final : LayerConfig {
    int64_t num_experts = 0;        // X
    int64_t top_k = 0;              // k
    int64_t intermediate_size = 0;  // I (per expert)
    int64_t shared_size = 0;        // S (0: none)
    bool normalize = true;
    double routed_scale = 1.0;

    const char* type() const override { return "moe"; }
    std::vector<TensorSpec> tensors(const ModelConfig& m) const override {
        const int64_t d = m.d_model, X = num_experts, I = intermediate_size, S = shared_size;
        std::vector<TensorSpec> t;
        t.push_back({"mixer.router.weight", {X, d}, true, false});
        t.push_back({"mixer.experts.input_linear.weight", {X, 2 * I, d}, true, false});
        t.push_back({"mixer.experts.output_linear.weight", {X, d, I}, true, false});
        if (S > 0) {
            t.push_back({"mixer.shared.input_linear.weight", {2 * S, d}, true, false});
            t.push_back({"mixer.shared.output_linear.weight", {d, S}, true, false});
        }
        return t;
    }
    std::vector<StateSpec> state(const ModelConfig&) const override { return {}; }
    std::string to_json() const override {
        return nlohmann::ordered_json{{"type", type()},
                                      {"num_experts", num_experts},
                                      {"top_k", top_k},
                                      {"intermediate_size", intermediate_size},
                                      {"shared_intermediate_size", shared_size},
                                      {"activation", "swiglu"},
                                      {"normalize", normalize},
                                      {"routed_scale", routed_scale}}
            .dump();
    }
};

std::shared_ptr<const LayerConfig> parse(ConfigReader& r, const ModelConfig&) {
    auto c = std::make_shared<Config>();
    c->num_experts = r.integer("num_experts", 1, 1 << 16);
    c->top_k = r.integer("top_k", 1, kMoeMaxTopK);
    if (c->top_k > c->num_experts)
        r.fail("top_k", str_cat("= ", c->top_k, " exceeds num_experts = ", c->num_experts));
    c->intermediate_size = r.integer("intermediate_size", 1, kMaxDim);
    c->shared_size = r.integer("shared_intermediate_size", 0, kMaxDim);
    const std::string a = r.string("activation");
    if (a != "swiglu") r.fail("activation", str_cat("= '", a, "' is not supported (swiglu)"));
    c->normalize = r.boolean("normalize");
    c->routed_scale = r.number("routed_scale");
    if (!(c->routed_scale > 0.0 && c->routed_scale < 1e6))
        r.fail("routed_scale", "must be in (0, 1e6)");
    return c;
}

// A view of rows [row0, row0 + rows) of a weight whose rows are `cols` wide.
Weight rows_of(const Weight& w, int64_t row0, int64_t rows, int64_t cols) {
    Weight v = w;
    v.data = static_cast<const char*>(w.data) + size_t(row0 * cols) * dtype_size(w.dtype);
    v.rows = rows;
    v.cols = cols;
    return v;
}

class Moe final : public Layer {
 public:
    Moe(std::shared_ptr<const Config> c, const ModelConfig& m)
        : c_(std::move(c)), d_model_(m.d_model) {}

    const LayerConfig& config() const override { return *c_; }

    void bind(const LayerTensors& t) override {
        const int64_t d = d_model_, S = c_->shared_size;
        router_ = t.matrix("mixer.router.weight");
        w_in_ = t.matrix("mixer.experts.input_linear.weight");
        w_out_ = t.matrix("mixer.experts.output_linear.weight");
        if (S > 0) {
            const Weight in = t.matrix("mixer.shared.input_linear.weight");
            shared_gate_ = rows_of(in, 0, S, d);
            shared_up_ = rows_of(in, S, S, d);
            shared_out_ = t.matrix("mixer.shared.output_linear.weight");
        }
    }

    // logits (R, X); route (R, 2k): expert ids and weights; h (R, H): expert hiddens (and the
    // shared expert's gate and up, 2S); xy (R, 2d): rows gathered per expert.
    std::vector<int64_t> workspace_cols() const override {
        const int64_t k = c_->top_k, I = c_->intermediate_size;
        const int64_t H = std::max(std::max<int64_t>(k, 2) * I, 2 * c_->shared_size);
        return {c_->num_experts, 2 * k, H, 2 * d_model_};
    }
    int64_t max_linear_cols() const override {
        return std::max({d_model_, c_->intermediate_size, c_->shared_size});
    }

    void forward(Backend& be, const LayerIO& io) override {
        const int64_t R = io.B * io.L, d = d_model_, S = c_->shared_size, X = c_->num_experts;
        float* logits = io.ws[0];  // (R, X)
        float* route = io.ws[1];   // (R, 2k)
        float* h = io.ws[2];       // (R, H)
        float* xy = io.ws[3];      // (R, 2d)
        if (S > 0) {
            float* g = h;          // (R, S) the shared expert's gate
            float* u = h + R * S;  // (R, S) its up, then silu(gate) * up
            be.linear(io.in, d, R, shared_gate_, S, nullptr, g, S);
            be.linear(io.in, d, R, shared_up_, S, nullptr, u, S);
            be.silu_gate(u, g, S, R, S);
            be.linear(u, S, R, shared_out_, d, nullptr, io.out, d);
        } else {
            be.zero(io.out, size_t(R * d) * sizeof(float));
        }
        be.linear(io.in, d, R, router_, X, nullptr, logits, X);
        MoeParams p;
        p.x = io.in;
        p.logits = logits;
        p.w_in = w_in_;
        p.w_out = w_out_;
        p.route = route;
        p.h = h;
        p.xy = xy;
        p.out = io.out;
        p.R = R;
        p.d = d;
        p.X = X;
        p.k = c_->top_k;
        p.I = c_->intermediate_size;
        p.normalize = c_->normalize;
        p.scale = float(c_->routed_scale);
        be.moe(p);
    }

 private:
    std::shared_ptr<const Config> c_;
    int64_t d_model_;
    Weight router_;      // (X, d)
    Weight w_in_;        // (X, 2I * d): per expert (2I, d), gate rows first
    Weight w_out_;       // (X, d * I): per expert (d, I)
    Weight shared_gate_; // (S, d) [S > 0]: rows [0, S) of the shared (2S, d) input matrix
    Weight shared_up_;   // (S, d) [S > 0]: rows [S, 2S)
    Weight shared_out_;  // (d, S) [S > 0]
};

std::unique_ptr<Layer> create(std::shared_ptr<const LayerConfig> c, const ModelConfig& m) {
    return std::make_unique<Moe>(std::static_pointer_cast<const Config>(std::move(c)), m);
}

}  // namespace

LayerUnit unit() { return LayerUnit{"moe", &parse, &create}; }

}  // namespace moe
}  // namespace mambart

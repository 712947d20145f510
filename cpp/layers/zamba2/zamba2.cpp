// The Zamba2 hybrid layer unit ("zamba2_hybrid"). With h the residual stream (the layer norms
// its own input: LayerConfig::norms_own_input) and e the embedding output (reads_embedding):
//
//   t = RMSNorm_attn([h | e])                  (2d wide)
//   a = attention(t)                           (q/k/v_proj read 2d, o_proj writes d; its own KV)
//   g = mlp(RMSNorm_mlp(a))                    (GeGLU in transformers' Zamba2)
//   x = linear(g)                              (d -> d, no bias; no residual inside the block)
//   out = mamba2(RMSNorm_mamba(h + x))         (the model adds out to h: the residual is h, not
//                                               h + x)
//
// The block's weights are shared between its occurrences in transformers, each occurrence with
// its own LoRA adapters; the converter writes each occurrence's weights with its adapters merged
// in (W + B A: the same products, no extra work per token), so here every layer owns its tensors.
// The attention, MLP and Mamba-2 parts are the attention, mlp and mamba2 units.
//
// config.json `layers` entry: {"type": "zamba2_hybrid", "attention": {an attention entry with
// "d_in": 2 d_model}, "mlp": {an mlp entry}, "mamba": {a mamba2 entry}}; the three norms are
// RMSNorms with the model's norm_eps.
// Tensors (under layers.{i}.): attn_norm.weight (2d), attn.<attention's>, mlp_norm.weight (d),
// mlp.<mlp's>, linear.weight (d, d), mamba_norm.weight (d), mamba.<mamba2's>.
// State per sequence: the attention's (key_cache, value_cache, pos), then the mamba2's (conv, ssm).
#include "layers/zamba2/zamba2.h"

#include <algorithm>
#include <nlohmann/json.hpp>

#include "config_reader.h"

namespace mambart {
namespace zamba2 {
namespace {

struct Config final : LayerConfig {
    std::shared_ptr<const LayerConfig> attn, mlp, mamba;

    const char* type() const override { return "zamba2_hybrid"; }
    std::vector<TensorSpec> tensors(const ModelConfig& m) const override {
        const int64_t d = m.d_model;
        std::vector<TensorSpec> t;
        auto add = [&](const std::string& pre, const LayerConfig& c) {
            for (TensorSpec s : c.tensors(m)) {
                s.name = pre + s.name;
                t.push_back(std::move(s));
            }
        };
        t.push_back({"attn_norm.weight", {2 * d}, false, false});
        add("attn.", *attn);
        t.push_back({"mlp_norm.weight", {d}, false, false});
        add("mlp.", *mlp);
        t.push_back({"linear.weight", {d, d}, true, false});
        t.push_back({"mamba_norm.weight", {d}, false, false});
        add("mamba.", *mamba);
        return t;
    }
    std::vector<StateSpec> state(const ModelConfig& m) const override {
        std::vector<StateSpec> s = attn->state(m);
        for (StateSpec& x : mamba->state(m)) s.push_back(std::move(x));
        return s;
    }
    std::string to_json() const override {
        return nlohmann::ordered_json{{"type", type()},
                                      {"attention", nlohmann::ordered_json::parse(attn->to_json())},
                                      {"mlp", nlohmann::ordered_json::parse(mlp->to_json())},
                                      {"mamba", nlohmann::ordered_json::parse(mamba->to_json())}}
            .dump();
    }
    int64_t max_context() const override { return attn->max_context(); }
    bool norms_own_input() const override { return true; }
    bool reads_embedding() const override { return true; }
    bool supports_bf16_state() const override {
        return attn->supports_bf16_state() && mamba->supports_bf16_state();
    }
};

// The part under `key`: a layers entry of type `type`, read by that unit (errors name
// "layers[i].key" and the key inside).
std::shared_ptr<const LayerConfig> part(ConfigReader& r, const char* key, const char* type,
                                        const ModelConfig& m) {
    const nlohmann::json& j = r.need(key);
    if (!j.is_object()) r.fail(key, str_cat("must be an object (a layers entry of type '", type, "')"));
    ConfigReader pr(j, str_cat(r.origin(), ".", key));
    const std::string t = pr.string("type");
    if (t != type) pr.fail("type", str_cat("= '", t, "' must be '", type, "'"));
    auto c = layer_types().parse(type, pr, m);
    pr.reject_unknown();
    return c;
}

std::shared_ptr<const LayerConfig> parse(ConfigReader& r, const ModelConfig& m) {
    if (m.norm != NormKind::RMSNorm)
        r.fail("type", "zamba2_hybrid needs the model's norm to be rmsnorm");
    auto c = std::make_shared<Config>();
    c->attn = part(r, "attention", "attention", m);
    const nlohmann::json& a = r.need("attention");
    if (!a.contains("d_in") || a.at("d_in") != 2 * m.d_model)
        r.fail("attention", str_cat("must have d_in = 2 x d_model = ", 2 * m.d_model,
                                    " (it reads [h | embedding])"));
    c->mlp = part(r, "mlp", "mlp", m);
    c->mamba = part(r, "mamba", "mamba2", m);
    return c;
}

// A part's view of the layer's tensors: its names prefixed ("attn.", ...).
class PartTensors final : public LayerTensors {
 public:
    PartTensors(const LayerTensors& t, std::string prefix) : t_(t), pre_(std::move(prefix)) {}
    Weight matrix(const std::string& name) const override { return t_.matrix(pre_ + name); }
    Param param(const std::string& name) const override { return t_.param(pre_ + name); }

 private:
    const LayerTensors& t_;
    std::string pre_;
};

// The layer's own buffers, before the parts' (which run one after another and share theirs).
constexpr size_t kOwnBuffers = 4;

class Hybrid final : public Layer {
 public:
    Hybrid(std::shared_ptr<const Config> c, const ModelConfig& m)
        : c_(std::move(c)),
          d_model_(m.d_model),
          eps_(m.norm_eps),
          attn_(create_layer(c_->attn, m)),
          mlp_(create_layer(c_->mlp, m)),
          mamba_(create_layer(c_->mamba, m)),
          attn_states_(c_->attn->state(m).size()) {}

    const LayerConfig& config() const override { return *c_; }

    void bind(const LayerTensors& t) override {
        attn_norm_ = t.param("attn_norm.weight");
        attn_->bind(PartTensors(t, "attn."));
        mlp_norm_ = t.param("mlp_norm.weight");
        mlp_->bind(PartTensors(t, "mlp."));
        linear_ = t.matrix("linear.weight");
        mamba_norm_ = t.param("mamba_norm.weight");
        mamba_->bind(PartTensors(t, "mamba."));
    }

    // t (R, 2d) [h | e], normed; a (R, d) attention output, normed in place; g (R, d) MLP output,
    // then the mamba's normed input; x (R, d) linear output + h; then the parts' buffers (for
    // each k the widest of the parts' k-th).
    std::vector<int64_t> workspace_cols() const override {
        const int64_t d = d_model_;
        std::vector<int64_t> parts;
        for (const Layer* l : {attn_.get(), mlp_.get(), mamba_.get()}) {
            const std::vector<int64_t> w = l->workspace_cols();
            if (w.size() > parts.size()) parts.resize(w.size(), 0);
            for (size_t k = 0; k < w.size(); ++k) parts[k] = std::max(parts[k], w[k]);
        }
        std::vector<int64_t> cols = {2 * d, d, d, d};
        cols.insert(cols.end(), parts.begin(), parts.end());
        return cols;
    }
    int64_t max_linear_cols() const override {
        return std::max({d_model_, attn_->max_linear_cols(), mlp_->max_linear_cols(),
                         mamba_->max_linear_cols()});
    }

    void forward(Backend& be, const LayerIO& io) override {
        const int64_t R = io.B * io.L, d = d_model_;
        const size_t row = size_t(d) * sizeof(float);
        float* t = io.ws[0];  // (R, 2d)
        float* a = io.ws[1];  // (R, d)
        float* g = io.ws[2];  // (R, d)
        float* x = io.ws[3];  // (R, d)
        float* const* parts = io.ws + kOwnBuffers;
        be.copy_device_2d(t, 2 * row, io.in, row, row, size_t(R));
        be.copy_device_2d(t + d, 2 * row, io.embedding, row, row, size_t(R));
        be.add_norm(t, nullptr, attn_norm_, Param{}, NormKind::RMSNorm, eps_, R, 2 * d, t);
        attn_->forward(be, LayerIO{t, a, parts, io.state, io.B, io.L});
        be.add_norm(a, nullptr, mlp_norm_, Param{}, NormKind::RMSNorm, eps_, R, d, a);
        mlp_->forward(be, LayerIO{a, g, parts, nullptr, io.B, io.L});
        be.linear(g, d, R, linear_, d, nullptr, x, d);
        be.add_norm(x, io.in, mamba_norm_, Param{}, NormKind::RMSNorm, eps_, R, d, g);
        mamba_->forward(be, LayerIO{g, io.out, parts, io.state + attn_states_, io.B, io.L});
    }

 private:
    std::shared_ptr<const Config> c_;
    int64_t d_model_;
    float eps_;
    std::unique_ptr<Layer> attn_, mlp_, mamba_;
    size_t attn_states_;  // state tensors of the attention part (the mamba's follow)
    Param attn_norm_;     // (2d)
    Param mlp_norm_;      // (d)
    Weight linear_;       // (d, d)
    Param mamba_norm_;    // (d)
};

std::unique_ptr<Layer> create(std::shared_ptr<const LayerConfig> c, const ModelConfig& m) {
    return std::make_unique<Hybrid>(std::static_pointer_cast<const Config>(std::move(c)), m);
}

}  // namespace

LayerUnit unit() { return LayerUnit{"zamba2_hybrid", &parse, &create}; }

}  // namespace zamba2
}  // namespace mambart

// The MLP layer unit.
//
//   relu2:  out = down_proj(relu(up_proj(u))²)                (Nemotron-H "-" blocks)
//   swiglu: out = down_proj(silu(gate_proj(u)) * up_proj(u))  (Llama-style gated MLP)
//   geglu:  out = down_proj(gelu(gate_proj(u)) * up_proj(u))  (exact erf GELU; Zamba2's "gelu")
//
// config.json `layers` entry: {"type": "mlp", "intermediate_size": I,
// "activation": "relu2" | "swiglu" | "geglu", "bias": bool, optionally "fused_gate_up": bool}.
// No state. fused_gate_up (swiglu or geglu): one (2I, d) mixer.gate_up_proj.weight (and with
// bias its (2I) mixer.gate_up_proj.bias), the gate's rows first (Granite-4.0-H's
// shared_mlp.input_linear, Zamba2's gate_up_proj), instead of gate_proj and up_proj.
#include "layers/mlp/mlp.h"

#include <algorithm>
#include <nlohmann/json.hpp>

#include "config_reader.h"

namespace mambart {
namespace mlp {
namespace {

enum class Act { Relu2, SwiGLU, GeGLU };

struct Config final : LayerConfig {
    int64_t intermediate_size = 0;  // I
    Act act = Act::Relu2;
    bool bias = false;
    bool fused_gate_up = false;  // [gated] one (2I, d) gate_up_proj, gate rows first

    bool gated() const { return act != Act::Relu2; }

    const char* type() const override { return "mlp"; }
    std::vector<TensorSpec> tensors(const ModelConfig& m) const override {
        const int64_t d = m.d_model, I = intermediate_size;
        std::vector<TensorSpec> t;
        if (fused_gate_up) {
            t.push_back({"mixer.gate_up_proj.weight", {2 * I, d}, true, false});
            if (bias) t.push_back({"mixer.gate_up_proj.bias", {2 * I}, false, false});
            t.push_back({"mixer.down_proj.weight", {d, I}, true, false});
            if (bias) t.push_back({"mixer.down_proj.bias", {d}, false, false});
            return t;
        }
        if (gated()) {
            t.push_back({"mixer.gate_proj.weight", {I, d}, true, false});
            if (bias) t.push_back({"mixer.gate_proj.bias", {I}, false, false});
        }
        t.push_back({"mixer.up_proj.weight", {I, d}, true, false});
        if (bias) t.push_back({"mixer.up_proj.bias", {I}, false, false});
        t.push_back({"mixer.down_proj.weight", {d, I}, true, false});
        if (bias) t.push_back({"mixer.down_proj.bias", {d}, false, false});
        return t;
    }
    std::vector<StateSpec> state(const ModelConfig&) const override { return {}; }
    std::string to_json() const override {
        nlohmann::ordered_json j{{"type", type()},
                                 {"intermediate_size", intermediate_size},
                                 {"activation", act == Act::SwiGLU  ? "swiglu"
                                                : act == Act::GeGLU ? "geglu"
                                                                    : "relu2"},
                                 {"bias", bias}};
        if (fused_gate_up) j["fused_gate_up"] = true;
        return j.dump();
    }
};

std::shared_ptr<const LayerConfig> parse(ConfigReader& r, const ModelConfig&) {
    auto c = std::make_shared<Config>();
    c->intermediate_size = r.integer("intermediate_size", 1, kMaxDim);
    const std::string a = r.string("activation");
    if (a == "relu2") c->act = Act::Relu2;
    else if (a == "swiglu") c->act = Act::SwiGLU;
    else if (a == "geglu") c->act = Act::GeGLU;
    else r.fail("activation", str_cat("= '", a, "' is not supported (relu2, swiglu, geglu)"));
    c->bias = r.boolean("bias");
    if (r.has("fused_gate_up")) c->fused_gate_up = r.boolean("fused_gate_up");
    if (c->fused_gate_up && !c->gated())
        r.fail("fused_gate_up", "needs a gated activation (swiglu, geglu)");
    return c;
}

class Mlp final : public Layer {
 public:
    Mlp(std::shared_ptr<const Config> c, const ModelConfig& m)
        : c_(std::move(c)), d_model_(m.d_model) {}

    const LayerConfig& config() const override { return *c_; }

    void bind(const LayerTensors& t) override {
        if (c_->fused_gate_up) {
            const int64_t I = c_->intermediate_size;
            const Weight gu = t.matrix("mixer.gate_up_proj.weight");
            const size_t half = size_t(I * d_model_) * dtype_size(gu.dtype);
            gate_ = Weight{gu.data, gu.dtype, I, d_model_};
            up_ = Weight{static_cast<const char*>(gu.data) + half, gu.dtype, I, d_model_};
            down_ = t.matrix("mixer.down_proj.weight");
            if (c_->bias) {
                const Param gub = t.param("mixer.gate_up_proj.bias");  // (2I): gate, then up
                gate_b_ = Param{gub.data, I};
                up_b_ = Param{gub.data + I, I};
                down_b_ = t.param("mixer.down_proj.bias");
            }
            return;
        }
        if (c_->gated()) {
            gate_ = t.matrix("mixer.gate_proj.weight");
            if (c_->bias) gate_b_ = t.param("mixer.gate_proj.bias");
        }
        up_ = t.matrix("mixer.up_proj.weight");
        if (c_->bias) up_b_ = t.param("mixer.up_proj.bias");
        down_ = t.matrix("mixer.down_proj.weight");
        if (c_->bias) down_b_ = t.param("mixer.down_proj.bias");
    }

    // h (R, I) the activated hidden; g (R, I) the gate [gated].
    std::vector<int64_t> workspace_cols() const override {
        const int64_t I = c_->intermediate_size;
        if (c_->gated()) return {I, I};
        return {I};
    }
    int64_t max_linear_cols() const override {
        return std::max(d_model_, c_->intermediate_size);
    }

    void forward(Backend& be, const LayerIO& io) override {
        const int64_t R = io.B * io.L, I = c_->intermediate_size;
        float* h = io.ws[0];  // (R, I)
        be.linear(io.in, d_model_, R, up_, I, up_b_.data, h, I);
        if (c_->gated()) {
            float* g = io.ws[1];  // (R, I)
            be.linear(io.in, d_model_, R, gate_, I, gate_b_.data, g, I);
            if (c_->act == Act::GeGLU) be.gelu_gate(h, g, I, R, I);
            else be.silu_gate(h, g, I, R, I);
        } else {
            be.relu_sq(h, R, I);
        }
        be.linear(h, I, R, down_, d_model_, down_b_.data, io.out, d_model_);
    }

 private:
    std::shared_ptr<const Config> c_;
    int64_t d_model_;
    Weight gate_;    // (I, d) [gated]
    Param gate_b_;   // (I) [bias, gated]
    Weight up_;      // (I, d)
    Param up_b_;     // (I) [bias]
    Weight down_;    // (d, I)
    Param down_b_;   // (d) [bias]
};

std::unique_ptr<Layer> create(std::shared_ptr<const LayerConfig> c, const ModelConfig& m) {
    return std::make_unique<Mlp>(std::static_pointer_cast<const Config>(std::move(c)), m);
}

}  // namespace

LayerUnit unit() { return LayerUnit{"mlp", &parse, &create}; }

}  // namespace mlp
}  // namespace mambart

// The attention layer unit.
//
//   q = q_proj(u), k = k_proj(u), v = v_proj(u)   (Hq, Hkv heads of hd; Hkv divides Hq)
//     (fused_qkv: [q | k | v] = in_proj(u), mamba_ssm's MHA; d_conv > 0: then a causal
//     depthwise conv over [q | k | v], with bias and no activation)
//   q, k <- RoPE at the token's absolute position (first rotary_dim dims; none when 0)
//   o = softmax(scale q kᵀ + causal / window mask) v over the cached keys, per head (GQA: kv head
//   j serves q heads [j Hq/Hkv, (j+1) Hq/Hkv)); out = o_proj(o) (fused_qkv: out_proj)
//
// config.json `layers` entry: {"type": "attention", "num_heads": Hq, "num_kv_heads": Hkv,
// "head_dim": hd, "rotary_dim": 0 or even <= hd, "rope_theta": θ, "window": 0 (none) or tokens,
// "qkv_bias": bool, "out_bias": bool, "scale": softmax scale, "max_context": tokens,
// "fused_qkv": bool, "d_conv": 0 or W}, optionally "d_in": the input width of q/k/v_proj
// (default d_model; Zamba2's shared block reads concat(h, embedding), 2 d; o_proj still
// writes d_model).
// State per sequence: key_cache and value_cache (max_context, Hkv, hd), pos (1): the tokens
// held, and with d_conv conv ((Hq + 2 Hkv) hd, W): the last W pre-conv inputs, oldest first. The cache is laid out at its full capacity (max_context) when the state is made; a
// sequence longer than max_context is refused (ModelConfig::max_context; the CPU backend also
// checks each call).
#include "layers/attention/attention.h"

#include <algorithm>
#include <cmath>
#include <nlohmann/json.hpp>

#include "config_reader.h"

namespace mambart {
namespace attention {
namespace {

// Decode split-K: partial results of up to kSplits key ranges per (row, q head), in the layer's
// first workspace buffer (which a hybrid's Mamba-2 in_proj buffer usually already covers).
constexpr int64_t kSplits = 4;

struct Config final : LayerConfig {
    int64_t num_heads = 0;     // Hq
    int64_t num_kv_heads = 0;  // Hkv
    int64_t head_dim = 0;      // hd
    int64_t rotary_dim = 0;    // 0: NoPE
    double rope_theta = 10000.0;
    int64_t window = 0;        // 0: none
    bool qkv_bias = false;
    bool out_bias = false;
    double scale = 0.0;
    int64_t max_ctx = 0;       // max_context
    bool fused_qkv = false;    // one in_proj / out_proj (mamba_ssm) instead of q/k/v/o_proj
    int64_t d_conv = 0;        // W: conv over qkv (0: none)
    int64_t d_in = 0;          // input features of the projections (0: d_model)

    int64_t q_dim() const { return num_heads * head_dim; }
    int64_t kv_dim() const { return num_kv_heads * head_dim; }
    int64_t qkv_dim() const { return q_dim() + 2 * kv_dim(); }
    int64_t in_dim(const ModelConfig& m) const { return d_in > 0 ? d_in : m.d_model; }

    const char* type() const override { return "attention"; }
    std::vector<TensorSpec> tensors(const ModelConfig& m) const override {
        const int64_t d = m.d_model, din = in_dim(m);
        std::vector<TensorSpec> t;
        if (fused_qkv) {
            t.push_back({"mixer.in_proj.weight", {qkv_dim(), din}, true, false});
            if (qkv_bias) t.push_back({"mixer.in_proj.bias", {qkv_dim()}, false, false});
            if (d_conv > 0) {
                t.push_back({"mixer.conv1d.weight", {qkv_dim(), 1, d_conv}, false, false});
                t.push_back({"mixer.conv1d.bias", {qkv_dim()}, false, false});
            }
            t.push_back({"mixer.out_proj.weight", {d, q_dim()}, true, false});
            if (out_bias) t.push_back({"mixer.out_proj.bias", {d}, false, false});
            return t;
        }
        t.push_back({"mixer.q_proj.weight", {q_dim(), din}, true, false});
        t.push_back({"mixer.k_proj.weight", {kv_dim(), din}, true, false});
        t.push_back({"mixer.v_proj.weight", {kv_dim(), din}, true, false});
        if (qkv_bias) {
            t.push_back({"mixer.q_proj.bias", {q_dim()}, false, false});
            t.push_back({"mixer.k_proj.bias", {kv_dim()}, false, false});
            t.push_back({"mixer.v_proj.bias", {kv_dim()}, false, false});
        }
        t.push_back({"mixer.o_proj.weight", {d, q_dim()}, true, false});
        if (out_bias) t.push_back({"mixer.o_proj.bias", {d}, false, false});
        return t;
    }
    std::vector<StateSpec> state(const ModelConfig&) const override {
        std::vector<StateSpec> s = {{"key_cache", {max_ctx, num_kv_heads, head_dim}},
                                    {"value_cache", {max_ctx, num_kv_heads, head_dim}},
                                    {"pos", {1}}};
        if (d_conv > 0) s.push_back({"conv", {qkv_dim(), d_conv}});
        return s;
    }
    std::string to_json() const override {
        nlohmann::ordered_json j{{"type", type()},
                                      {"num_heads", num_heads},
                                      {"num_kv_heads", num_kv_heads},
                                      {"head_dim", head_dim},
                                      {"rotary_dim", rotary_dim},
                                      {"rope_theta", rope_theta},
                                      {"window", window},
                                      {"qkv_bias", qkv_bias},
                                      {"out_bias", out_bias},
                                      {"scale", scale},
                                      {"max_context", max_ctx},
                                      {"fused_qkv", fused_qkv},
                                      {"d_conv", d_conv}};
        if (d_in > 0) j["d_in"] = d_in;
        return j.dump();
    }
    int64_t max_context() const override { return max_ctx; }
};

std::shared_ptr<const LayerConfig> parse(ConfigReader& r, const ModelConfig&) {
    auto c = std::make_shared<Config>();
    c->num_heads = r.integer("num_heads", 1, 1 << 16);
    c->num_kv_heads = r.integer("num_kv_heads", 1, 1 << 16);
    c->head_dim = r.integer("head_dim", 1, 1024);
    c->rotary_dim = r.integer("rotary_dim", 0, 1024);
    c->rope_theta = r.number("rope_theta");
    c->window = r.integer("window", 0, kMaxDim);
    c->qkv_bias = r.boolean("qkv_bias");
    c->out_bias = r.boolean("out_bias");
    c->scale = r.number("scale");
    c->max_ctx = r.integer("max_context", 1, kMaxDim);
    c->fused_qkv = r.boolean("fused_qkv");
    c->d_conv = r.integer("d_conv", 0, 8);
    if (r.has("d_in")) c->d_in = r.integer("d_in", 1, kMaxDim);
    if (c->d_conv > 0 && !c->fused_qkv)
        r.fail("d_conv", "needs fused_qkv (the conv runs over mamba_ssm's fused in_proj output)");
    if (c->num_heads % c->num_kv_heads != 0)
        r.fail("num_kv_heads", str_cat("= ", c->num_kv_heads, " must divide num_heads = ",
                                       c->num_heads));
    if (c->rotary_dim % 2 != 0 || c->rotary_dim > c->head_dim)
        r.fail("rotary_dim", str_cat("= ", c->rotary_dim, " must be even and <= head_dim = ",
                                     c->head_dim));
    if (!(c->rope_theta > 1.0 && c->rope_theta < 1e12))
        r.fail("rope_theta", "must be in (1, 1e12)");
    if (!(c->scale > 0.0 && c->scale < 1e6)) r.fail("scale", "must be in (0, 1e6)");
    // The cache of one sequence must stay addressable: max_context x kv width bounded.
    if (double(c->max_ctx) * double(c->kv_dim()) > double(int64_t(1) << 40))
        r.fail("max_context", str_cat("= ", c->max_ctx, " x ", c->kv_dim(),
                                      " cache values per token is too large"));
    return c;
}

class Attention final : public Layer {
 public:
    Attention(std::shared_ptr<const Config> c, const ModelConfig& m)
        : c_(std::move(c)), d_model_(m.d_model), d_in_(c_->in_dim(m)) {}

    const LayerConfig& config() const override { return *c_; }

    void bind(const LayerTensors& t) override {
        if (c_->fused_qkv) {
            in_proj_ = t.matrix("mixer.in_proj.weight");
            if (c_->qkv_bias) in_b_ = t.param("mixer.in_proj.bias");
            if (c_->d_conv > 0) {
                conv_w_ = t.param("mixer.conv1d.weight");
                conv_b_ = t.param("mixer.conv1d.bias");
            }
            o_proj_ = t.matrix("mixer.out_proj.weight");
            if (c_->out_bias) o_b_ = t.param("mixer.out_proj.bias");
            return;
        }
        q_proj_ = t.matrix("mixer.q_proj.weight");
        k_proj_ = t.matrix("mixer.k_proj.weight");
        v_proj_ = t.matrix("mixer.v_proj.weight");
        if (c_->qkv_bias) {
            q_b_ = t.param("mixer.q_proj.bias");
            k_b_ = t.param("mixer.k_proj.bias");
            v_b_ = t.param("mixer.v_proj.bias");
        }
        o_proj_ = t.matrix("mixer.o_proj.weight");
        if (c_->out_bias) o_b_ = t.param("mixer.o_proj.bias");
    }

    // partial (R, Hq * kSplits * (hd + 2)) decode split-K scratch; qkv (R, (Hq + 2 Hkv) hd);
    // o (R, Hq hd); pre (R, (Hq + 2 Hkv) hd) the pre-conv projection [d_conv].
    std::vector<int64_t> workspace_cols() const override {
        std::vector<int64_t> w = {c_->num_heads * kSplits * (c_->head_dim + 2), c_->qkv_dim(),
                                  c_->q_dim()};
        if (c_->d_conv > 0) w.push_back(c_->qkv_dim());
        return w;
    }
    int64_t max_linear_cols() const override {
        return std::max({d_model_, d_in_, c_->q_dim()});
    }

    void forward(Backend& be, const LayerIO& io) override {
        const Config& c = *c_;
        const int64_t R = io.B * io.L, ld = c.qkv_dim();
        float* qkv = io.ws[1];  // (R, qkv_dim)
        float* o = io.ws[2];    // (R, Hq hd)
        if (c.d_conv > 0) {
            float* pre = io.ws[3];  // (R, qkv_dim)
            be.linear(io.in, d_in_, R, in_proj_, ld, in_b_.data, pre, ld);
            ConvParams cp{pre, ld, io.state[3], conv_w_.data, conv_b_.data, qkv,
                          io.B, io.L, ld, c.d_conv};
            cp.silu = false;
            be.conv1d(cp);
        } else if (c.fused_qkv) {
            be.linear(io.in, d_in_, R, in_proj_, ld, in_b_.data, qkv, ld);
        } else {
            be.linear(io.in, d_in_, R, q_proj_, c.q_dim(), q_b_.data, qkv, ld);
            be.linear(io.in, d_in_, R, k_proj_, c.kv_dim(), k_b_.data, qkv + c.q_dim(), ld);
            be.linear(io.in, d_in_, R, v_proj_, c.kv_dim(), v_b_.data,
                      qkv + c.q_dim() + c.kv_dim(), ld);
        }
        AttentionParams p{};
        p.qkv = qkv;
        p.ld_qkv = ld;
        p.k_cache = io.state[0];
        p.v_cache = io.state[1];
        p.cache_stride = c.max_ctx * c.kv_dim();
        p.pos = io.state[2];
        p.pos_stride = 1;
        p.o = o;
        p.partial = io.ws[0];  // (R, Hq kSplits (hd + 2)) = B Hq (kSplits L) (hd + 2) floats
        p.max_splits = kSplits * io.L;
        p.B = io.B;
        p.L = io.L;
        p.Hq = c.num_heads;
        p.Hkv = c.num_kv_heads;
        p.hd = c.head_dim;
        p.max_ctx = c.max_ctx;
        p.rotary_dim = c.rotary_dim;
        p.rope_theta = float(c.rope_theta);
        p.window = c.window;
        p.scale = float(c.scale);
        be.attention(p);
        be.linear(o, c.q_dim(), R, o_proj_, d_model_, o_b_.data, io.out, d_model_);
    }

 private:
    std::shared_ptr<const Config> c_;
    int64_t d_model_;
    int64_t d_in_;    // input features of the projections (d_in, or d)
    Weight in_proj_;  // ((Hq + 2 Hkv) hd, d) [fused_qkv]
    Param in_b_;      // ((Hq + 2 Hkv) hd) [fused_qkv, qkv_bias]
    Param conv_w_;    // ((Hq + 2 Hkv) hd, W) [d_conv]
    Param conv_b_;    // ((Hq + 2 Hkv) hd) [d_conv]
    Weight q_proj_;  // (Hq hd, d)
    Weight k_proj_;  // (Hkv hd, d)
    Weight v_proj_;  // (Hkv hd, d)
    Param q_b_;      // (Hq hd) [qkv_bias]
    Param k_b_;      // (Hkv hd) [qkv_bias]
    Param v_b_;      // (Hkv hd) [qkv_bias]
    Weight o_proj_;  // (d, Hq hd) (out_proj with fused_qkv)
    Param o_b_;      // (d) [out_bias]
};

std::unique_ptr<Layer> create(std::shared_ptr<const LayerConfig> c, const ModelConfig& m) {
    return std::make_unique<Attention>(std::static_pointer_cast<const Config>(std::move(c)), m);
}

}  // namespace

LayerUnit unit() { return LayerUnit{"attention", &parse, &create}; }

}  // namespace attention
}  // namespace mambart

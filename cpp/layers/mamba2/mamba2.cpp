// The Mamba-2 layer unit.
//
//   [z | xBC | dt] = in_proj(u); xBC' = silu(conv(xBC)); y = SSD(x, dt, A, B, C) + D x;
//   y = gated_rmsnorm(y, z) (or y * silu(z)); out = out_proj(y)
//
// config.json `layers` entry: {"type": "mamba2", "d_inner": E, "d_state": N, "d_conv": W,
// "conv_bias": bool, "bias": bool, "headdim": P, "nheads": H, "ngroups": G, "chunk_size": Q,
// "dt_limit": [min, max or null], "gated_norm": bool, "norm_before_gate": false}, optionally
// "gated_norm_eps": the gated norm's eps (default the model's norm_eps; Zamba2 fixes 1e-5) and
// "dt_limit_prefill_only": true to clamp dt in calls of L > 1 tokens only (transformers' chunked
// path clamps, its one-token decode step does not; Zamba2's dt_limit [0.001, inf]).
// State per sequence: conv (E + 2GN, W), oldest first, fp32; ssm (H, P, N) in the model's
// state_dtype (fp32, or bf16 with the option state_dtype).
#include "layers/mamba2/mamba2.h"

#include <algorithm>
#include <cmath>
#include <nlohmann/json.hpp>

#include "config_reader.h"

namespace mambart {
namespace mamba2 {
namespace {

struct Config final : LayerConfig {
    int64_t d_inner = 0;     // E = H * P
    int64_t d_state = 0;     // N
    int64_t d_conv = 0;      // W
    bool conv_bias = true;
    bool bias = false;       // in_proj / out_proj bias
    int64_t headdim = 0;     // P
    int64_t nheads = 0;      // H
    int64_t ngroups = 1;     // G
    int64_t chunk_size = 0;  // Q
    float dt_min = 0.0f;     // dt_limit after softplus
    float dt_max = 0.0f;     //   (+inf when unbounded)
    std::string dt_limit;    // as written in the config (to_json gives it back unrounded)
    bool gated_norm = true;  // RMSNormGated before out_proj
    double gated_norm_eps = -1.0;        // < 0: the model's norm_eps
    bool dt_limit_prefill_only = false;  // decode steps (L = 1) do not clamp dt

    int64_t conv_dim() const { return d_inner + 2 * ngroups * d_state; }
    int64_t d_in_proj() const { return 2 * d_inner + 2 * ngroups * d_state + nheads; }

    const char* type() const override { return "mamba2"; }
    std::vector<TensorSpec> tensors(const ModelConfig& m) const override {
        const int64_t d = m.d_model, E = d_inner, H = nheads;
        std::vector<TensorSpec> t;
        t.push_back({"mixer.in_proj.weight", {d_in_proj(), d}, true, false});
        if (bias) t.push_back({"mixer.in_proj.bias", {d_in_proj()}, false, false});
        t.push_back({"mixer.conv1d.weight", {conv_dim(), 1, d_conv}, false, false});
        if (conv_bias) t.push_back({"mixer.conv1d.bias", {conv_dim()}, false, false});
        t.push_back({"mixer.dt_bias", {H}, false, false, true});
        t.push_back({"mixer.A_log", {H}, false, true, true});
        t.push_back({"mixer.D", {H}, false, false, true});
        if (gated_norm) t.push_back({"mixer.norm.weight", {E}, false, false});
        t.push_back({"mixer.out_proj.weight", {d, E}, true, false});
        if (bias) t.push_back({"mixer.out_proj.bias", {d}, false, false});
        return t;
    }
    std::vector<StateSpec> state(const ModelConfig&) const override {
        return {{"conv", {conv_dim(), d_conv}}, {"ssm", {nheads, headdim, d_state}, /*ssm=*/true}};
    }
    std::string to_json() const override {
        nlohmann::ordered_json j{{"type", type()},
                              {"d_inner", d_inner},
                              {"d_state", d_state},
                              {"d_conv", d_conv},
                              {"conv_bias", conv_bias},
                              {"bias", bias},
                              {"headdim", headdim},
                              {"nheads", nheads},
                              {"ngroups", ngroups},
                              {"chunk_size", chunk_size},
                              {"dt_limit", nlohmann::ordered_json::parse(dt_limit)},
                              {"gated_norm", gated_norm},
                              {"norm_before_gate", false}};
        if (gated_norm_eps >= 0.0) j["gated_norm_eps"] = gated_norm_eps;
        if (dt_limit_prefill_only) j["dt_limit_prefill_only"] = true;
        return j.dump();
    }
};

std::shared_ptr<const LayerConfig> parse(ConfigReader& r, const ModelConfig&) {
    auto c = std::make_shared<Config>();
    c->d_inner = r.integer("d_inner", 1, kMaxDim);
    c->d_state = r.integer("d_state", 1, 4096);
    c->d_conv = r.integer("d_conv", 1, 64);
    c->conv_bias = r.boolean("conv_bias");
    c->bias = r.boolean("bias");
    c->headdim = r.integer("headdim", 0, kMaxDim);
    c->nheads = r.integer("nheads", 0, kMaxDim);
    c->ngroups = r.integer("ngroups", 1, kMaxDim);
    c->chunk_size = r.integer("chunk_size", 0, 1 << 16);
    r.float_range("dt_limit", &c->dt_min, &c->dt_max);
    c->dt_limit = r.need("dt_limit").dump();
    c->gated_norm = r.boolean("gated_norm");
    if (r.boolean("norm_before_gate"))
        throw Unsupported(str_cat(r.origin(), ": norm_before_gate=true is not supported"));
    if (r.has("gated_norm_eps")) {
        c->gated_norm_eps = r.number("gated_norm_eps");
        if (!(c->gated_norm_eps > 0.0 && c->gated_norm_eps < 1.0))
            r.fail("gated_norm_eps", "must be in (0, 1)");
    }
    if (r.has("dt_limit_prefill_only"))
        c->dt_limit_prefill_only = r.boolean("dt_limit_prefill_only");
    if (c->headdim < 1) r.fail("headdim", "must be >= 1 for mamba2");
    if (c->nheads * c->headdim != c->d_inner)
        r.fail("nheads", str_cat("x headdim (", c->nheads, " x ", c->headdim,
                                 ") must equal d_inner (", c->d_inner, ")"));
    if (c->nheads % c->ngroups != 0)
        r.fail("ngroups", str_cat("= ", c->ngroups, " must divide nheads = ", c->nheads));
    if (c->chunk_size < 1) r.fail("chunk_size", "must be >= 1 for mamba2");
    return c;
}

class Mamba2 final : public Layer {
 public:
    Mamba2(std::shared_ptr<const Config> c, const ModelConfig& m)
        : c_(std::move(c)),
          d_model_(m.d_model),
          norm_eps_(c_->gated_norm_eps >= 0.0 ? float(c_->gated_norm_eps) : m.norm_eps),
          bf16_state_(m.state_dtype == DType::BF16) {}

    const LayerConfig& config() const override { return *c_; }

    void bind(const LayerTensors& t) override {
        in_proj_ = t.matrix("mixer.in_proj.weight");
        if (c_->bias) in_proj_b_ = t.param("mixer.in_proj.bias");
        conv_w_ = t.param("mixer.conv1d.weight");
        if (c_->conv_bias) conv_b_ = t.param("mixer.conv1d.bias");
        dt_bias_ = t.param("mixer.dt_bias");
        A_ = t.param("mixer.A_log");  // -exp(A_log)
        D_ = t.param("mixer.D");
        if (c_->gated_norm) norm_w_ = t.param("mixer.norm.weight");
        out_proj_ = t.matrix("mixer.out_proj.weight");
        if (c_->bias) out_proj_b_ = t.param("mixer.out_proj.bias");
    }

    // proj (R, Din): [z | xBC | dt]; xconv (R, E + 2GN) post-conv, post-SiLU; y (R, E) scan
    // output; y2 (R, E) gated-norm output [gated_norm].
    std::vector<int64_t> workspace_cols() const override {
        const int64_t E = c_->d_inner;
        if (c_->gated_norm) return {c_->d_in_proj(), c_->conv_dim(), E, E};
        return {c_->d_in_proj(), c_->conv_dim(), E};
    }
    int64_t max_linear_cols() const override { return std::max(d_model_, c_->d_inner); }
    bool supports_state_trace() const override { return true; }
    bool takes_fused_projections() const override { return true; }

    void forward(Backend& be, const LayerIO& io) override {
        const Config& c = *c_;
        const int64_t B = io.B, L = io.L, R = B * L;
        const int64_t E = c.d_inner, N = c.d_state, G = c.ngroups, Din = c.d_in_proj();
        const int64_t conv_dim = c.conv_dim();
        float* proj = io.ws[0];   // (R, Din)
        float* xconv = io.ws[1];  // (R, conv_dim)
        float* y = io.ws[2];      // (R, E)
        project_in(be, io, d_model_, in_proj_, Din, in_proj_b_.data, proj, Din);
        ConvParams cp{proj + E, Din, io.state[0], conv_w_.data, conv_b_.data,
                      xconv, B, L, conv_dim, c.d_conv};
        cp.state_trace = io.trace ? io.trace[0] : nullptr;  // (B, L, conv_dim, W)
        SsdParams sp{};
        sp.x = xconv;
        sp.Bm = xconv + E;
        sp.Cm = xconv + E + G * N;
        sp.ld_xbc = conv_dim;
        sp.dt = proj + E + conv_dim;
        sp.ld_dt = Din;
        sp.z = c.gated_norm ? nullptr : proj;
        sp.ld_z = Din;
        sp.A = A_.data;
        sp.D = D_.data;
        sp.dt_bias = dt_bias_.data;
        const bool clamp = !(c.dt_limit_prefill_only && L == 1);
        sp.dt_min = clamp ? c.dt_min : 0.0f;
        sp.dt_max = clamp ? c.dt_max : INFINITY;
        sp.y = y;
        sp.B = B;
        sp.L = L;
        sp.H = c.nheads;
        sp.P = c.headdim;
        sp.G = G;
        sp.N = N;
        sp.chunk_size = c.chunk_size;
        sp.half_weights = in_proj_.dtype == DType::F16 || in_proj_.dtype == DType::BF16;
        set_ssm_state(sp, io.state[1], io.trace ? io.trace[1] : nullptr /* (B, L, H, P, N) */,
                      bf16_state_);
        // decode: conv update + scan fused where the backend can (not with a trace)
        if (!(L == 1 && !io.trace &&
              be.mamba2_decode_fused(Mamba2DecodeParams{cp, sp}))) {
            be.conv1d(cp);
            be.ssd_scan(sp);
        }
        if (c.gated_norm && io.residual && be.fused_projection(R, E, G)) {
            // the fused decode projections: the gated norm in out_proj's prologue as well
            project_out(be, io, y, E, out_proj_, d_model_, out_proj_b_.data,
                        ProjGate{proj, Din, norm_w_.data, E / G, norm_eps_}, io.ws[3]);
            return;
        }
        const float* out = y;
        if (c.gated_norm) {
            float* y2 = io.ws[3];  // (R, E)
            be.gated_rmsnorm(y, proj, Din, norm_w_.data, R, E, E / G, norm_eps_, y2);
            out = y2;
        }
        project_out(be, io, out, E, out_proj_, d_model_, out_proj_b_.data);
    }

 private:
    std::shared_ptr<const Config> c_;
    int64_t d_model_;
    float norm_eps_;    // the gated norm's
    bool bf16_state_;   // the ssm state is bf16 (option state_dtype)
    Weight in_proj_;    // (Din, d)
    Param in_proj_b_;   // (Din) [bias]
    Param conv_w_;      // (E + 2GN, W)
    Param conv_b_;      // (E + 2GN) [conv_bias]
    Param dt_bias_;     // (H)
    Param A_;           // (H) = -exp(A_log)
    Param D_;           // (H)
    Param norm_w_;      // (E) [gated_norm]
    Weight out_proj_;   // (d, E)
    Param out_proj_b_;  // (d) [bias]
};

std::unique_ptr<Layer> create(std::shared_ptr<const LayerConfig> c, const ModelConfig& m) {
    return std::make_unique<Mamba2>(std::static_pointer_cast<const Config>(std::move(c)), m);
}

}  // namespace

LayerUnit unit() { return LayerUnit{"mamba2", &parse, &create, /*flat_form=*/true}; }

}  // namespace mamba2
}  // namespace mambart

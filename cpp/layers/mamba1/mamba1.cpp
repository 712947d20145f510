// The Mamba-1 layer unit.
//
//   xz = in_proj(u); x' = silu(conv(x)); [δ | B | C] = x_proj(x'); dt = dt_proj(δ);
//   y = scan(x', dt, A, B, C, D) * silu(z); out = out_proj(y)
//
// Falcon-Mamba option (`dt_bc_rms_eps`): δ, B and C are each RMS-normalised without a weight
// (fp32, that eps) right after the x_proj split, δ over its Rdt dims before dt_proj.
// Jamba option (`dt_bc_rms_weight`, with dt_bc_rms_eps): the same norms, each then multiplied by
// its learned weight (dt_layernorm (Rdt), b_layernorm (N), c_layernorm (N)).
//
// config.json `layers` entry: {"type": "mamba1", "d_inner": E, "d_state": N, "d_conv": W,
// "conv_bias": bool, "bias": bool, "dt_rank": Rdt[, "dt_bc_rms_eps": eps[,
// "dt_bc_rms_weight": bool]]}; the flat form has neither.
// State per sequence: conv (E, W), the last W pre-conv inputs, oldest first, fp32; ssm (E, N)
// in the model's state_dtype (fp32, or bf16 with the option state_dtype).
#include "layers/mamba1/mamba1.h"

#include <algorithm>
#include <nlohmann/json.hpp>

#include "config_reader.h"

namespace mambart {
namespace mamba1 {
namespace {

struct Config final : LayerConfig {
    int64_t d_inner = 0;  // E
    int64_t d_state = 0;  // N
    int64_t d_conv = 0;   // W
    bool conv_bias = true;
    bool bias = false;    // in_proj / out_proj bias
    int64_t dt_rank = 0;  // Rdt
    bool dt_bc_rms = false;     // Falcon-Mamba: weightless RMS norms on δ, B, C
    double dt_bc_rms_eps = 0.0;  // their eps (as written in the config), when dt_bc_rms
    bool dt_bc_rms_weight = false;  // Jamba: the norms have learned weights

    int64_t x_proj_dim() const { return dt_rank + 2 * d_state; }

    const char* type() const override { return "mamba1"; }
    std::vector<TensorSpec> tensors(const ModelConfig& m) const override {
        const int64_t d = m.d_model, E = d_inner, N = d_state;
        std::vector<TensorSpec> t;
        t.push_back({"mixer.in_proj.weight", {2 * E, d}, true, false});
        if (bias) t.push_back({"mixer.in_proj.bias", {2 * E}, false, false});
        t.push_back({"mixer.conv1d.weight", {E, 1, d_conv}, false, false});
        if (conv_bias) t.push_back({"mixer.conv1d.bias", {E}, false, false});
        t.push_back({"mixer.x_proj.weight", {x_proj_dim(), E}, true, false});
        t.push_back({"mixer.dt_proj.weight", {E, dt_rank}, true, false});
        t.push_back({"mixer.dt_proj.bias", {E}, false, false, true});
        t.push_back({"mixer.A_log", {E, N}, false, true, true});
        t.push_back({"mixer.D", {E}, false, false, true});
        t.push_back({"mixer.out_proj.weight", {d, E}, true, false});
        if (bias) t.push_back({"mixer.out_proj.bias", {d}, false, false});
        if (dt_bc_rms_weight) {
            t.push_back({"mixer.dt_layernorm.weight", {dt_rank}, false, false});
            t.push_back({"mixer.b_layernorm.weight", {N}, false, false});
            t.push_back({"mixer.c_layernorm.weight", {N}, false, false});
        }
        return t;
    }
    std::vector<StateSpec> state(const ModelConfig&) const override {
        return {{"conv", {d_inner, d_conv}}, {"ssm", {d_inner, d_state}, /*ssm=*/true}};
    }
    std::string to_json() const override {
        nlohmann::ordered_json j{{"type", type()},       {"d_inner", d_inner}, {"d_state", d_state},
                                 {"d_conv", d_conv},     {"conv_bias", conv_bias},
                                 {"bias", bias},         {"dt_rank", dt_rank}};
        if (dt_bc_rms) j["dt_bc_rms_eps"] = dt_bc_rms_eps;
        if (dt_bc_rms_weight) j["dt_bc_rms_weight"] = true;
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
    c->dt_rank = r.integer("dt_rank", 0, kMaxDim);
    if (c->dt_rank < 1) r.fail("dt_rank", "must be >= 1 for mamba1");
    if (r.has("dt_bc_rms_eps")) {
        c->dt_bc_rms = true;
        c->dt_bc_rms_eps = r.number("dt_bc_rms_eps");
        if (!(c->dt_bc_rms_eps > 0.0 && c->dt_bc_rms_eps < 1.0))
            r.fail("dt_bc_rms_eps", "must be in (0, 1)");
    }
    if (r.has("dt_bc_rms_weight")) {
        c->dt_bc_rms_weight = r.boolean("dt_bc_rms_weight");
        if (c->dt_bc_rms_weight && !c->dt_bc_rms)
            r.fail("dt_bc_rms_weight", "needs 'dt_bc_rms_eps' (the norms' eps)");
    }
    return c;
}

class Mamba1 final : public Layer {
 public:
    Mamba1(std::shared_ptr<const Config> c, const ModelConfig& m)
        : c_(std::move(c)), d_model_(m.d_model), bf16_state_(m.state_dtype == DType::BF16) {}

    const LayerConfig& config() const override { return *c_; }

    void bind(const LayerTensors& t) override {
        in_proj_ = t.matrix("mixer.in_proj.weight");
        if (c_->bias) in_proj_b_ = t.param("mixer.in_proj.bias");
        conv_w_ = t.param("mixer.conv1d.weight");
        if (c_->conv_bias) conv_b_ = t.param("mixer.conv1d.bias");
        x_proj_ = t.matrix("mixer.x_proj.weight");
        dt_proj_ = t.matrix("mixer.dt_proj.weight");
        dt_bias_ = t.param("mixer.dt_proj.bias");
        A_ = t.param("mixer.A_log");  // -exp(A_log)
        D_ = t.param("mixer.D");
        out_proj_ = t.matrix("mixer.out_proj.weight");
        if (c_->bias) out_proj_b_ = t.param("mixer.out_proj.bias");
        if (c_->dt_bc_rms_weight) {
            dt_norm_w_ = t.param("mixer.dt_layernorm.weight");
            b_norm_w_ = t.param("mixer.b_layernorm.weight");
            c_norm_w_ = t.param("mixer.c_layernorm.weight");
        }
    }

    // proj (R, 2E): [x | z]; xconv (R, E) post-conv, post-SiLU; xdbl (R, Rdt + 2N):
    // [dt_low | B | C]; dt (R, E) before bias; y (R, E) scan output; with dt_bc_rms also
    // dtn (R, Rdt) and bcn (2, R, N): the normed dt_low, then all normed B rows, all C rows.
    std::vector<int64_t> workspace_cols() const override {
        const int64_t E = c_->d_inner;
        std::vector<int64_t> cols{2 * E, E, c_->x_proj_dim(), E, E};
        if (c_->dt_bc_rms) {
            cols.push_back(c_->dt_rank);
            cols.push_back(2 * c_->d_state);
        }
        return cols;
    }
    int64_t max_linear_cols() const override { return std::max(d_model_, c_->d_inner); }
    bool supports_state_trace() const override { return true; }
    bool takes_fused_projections() const override { return true; }

    bool persistent_layer(const LayerIO& io, PersistentLayer& o) const override {
        const DType dt = in_proj_.dtype;
        if (c_->dt_bc_rms || bf16_state_ || io.B != 1 || io.L != 1 || io.trace) return false;
        for (const Weight* w : {&in_proj_, &x_proj_, &dt_proj_, &out_proj_})
            if (w->quant != QuantScheme::None || w->dtype != dt) return false;
        o.kind = PersistentLayer::Mamba1;
        o.dtype = dt;
        o.E = c_->d_inner;
        o.N = c_->d_state;
        o.W = c_->d_conv;
        o.R = c_->dt_rank;
        o.in_proj = in_proj_.data;
        o.in_bias = in_proj_b_.data;
        o.conv_w = conv_w_.data;
        o.conv_b = conv_b_.data;
        o.x_proj = x_proj_.data;
        o.dt_proj = dt_proj_.data;
        o.dt_bias = dt_bias_.data;
        o.A = A_.data;
        o.D = D_.data;
        o.out_proj = out_proj_.data;
        o.out_bias = out_proj_b_.data;
        o.conv_state = io.state[0];  // (1, E, W)
        o.ssm_state = io.state[1];   // (1, E, N)
        o.proj = io.ws[0];
        o.xconv = io.ws[1];
        o.xdbl = io.ws[2];
        o.y = io.ws[4];
        return true;
    }

    void forward(Backend& be, const LayerIO& io) override {
        const int64_t B = io.B, L = io.L, R = B * L;
        const int64_t E = c_->d_inner, N = c_->d_state, Rdt = c_->dt_rank, X = c_->x_proj_dim();
        float* proj = io.ws[0];   // (R, 2E)
        float* xconv = io.ws[1];  // (R, E)
        float* xdbl = io.ws[2];   // (R, X)
        float* dt = io.ws[3];     // (R, E)
        float* y = io.ws[4];      // (R, E)
        float* conv_state = io.state[0];  // (B, E, W)
        float* ssm_state = io.state[1];   // (B, E, N), bf16 bits when bf16_state_
        if (io.residual) {  // fused decode projections: the norm and the conv step folded in
            project_in(be, io, d_model_, in_proj_, 2 * E, in_proj_b_.data, proj, 2 * E,
                       ProjConv{conv_state, conv_w_.data, conv_b_.data, xconv, E, c_->d_conv});
        } else {
            be.linear(io.in, d_model_, R, in_proj_, 2 * E, in_proj_b_.data, proj, 2 * E);
            ConvParams cp{proj, 2 * E, conv_state, conv_w_.data, conv_b_.data, xconv, B, L,
                          E, c_->d_conv};
            cp.state_trace = io.trace ? io.trace[0] : nullptr;  // (B, L, E, W)
            be.conv1d(cp);
        }
        be.linear(xconv, E, R, x_proj_, X, nullptr, xdbl, X);
        const float* dt_low = xdbl;  // (R, Rdt), row stride ld_dt
        const float* bc = xdbl + Rdt;  // B (R, N), row stride ld_bc (C: sp.Cm below)
        int64_t ld_dt = X, ld_bc = X;
        if (c_->dt_bc_rms) {
            // Falcon-Mamba / Jamba: contiguous copies, normed in place by the backend's RMSNorm
            // (the weights Param{} without dt_bc_rms_weight); B and C each a block of R rows of
            // N, so that C sits R rows after B (ld_bc = N). The fused decode step has no norms,
            // so it is not used.
            float* dtn = io.ws[5];  // (R, Rdt)
            float* bn = io.ws[6];   // (R, N) then cn = bn + R·N (R, N)
            float* cn = bn + R * N;
            const float eps = float(c_->dt_bc_rms_eps);
            const size_t f = sizeof(float);
            be.copy_device_2d(dtn, Rdt * f, xdbl, X * f, Rdt * f, R);
            be.add_norm(dtn, nullptr, dt_norm_w_, Param{}, NormKind::RMSNorm, eps, R, Rdt, dtn);
            be.copy_device_2d(bn, N * f, xdbl + Rdt, X * f, N * f, R);
            be.add_norm(bn, nullptr, b_norm_w_, Param{}, NormKind::RMSNorm, eps, R, N, bn);
            be.copy_device_2d(cn, N * f, xdbl + Rdt + N, X * f, N * f, R);
            be.add_norm(cn, nullptr, c_norm_w_, Param{}, NormKind::RMSNorm, eps, R, N, cn);
            dt_low = dtn;
            ld_dt = Rdt;
            bc = bn;
            ld_bc = N;
        } else if (L == 1 && !io.trace && dt_proj_.quant == QuantScheme::None && !bf16_state_) {
            // decode: dt_proj + scan fused where the backend can (dt_proj unquantized)
            Mamba1DecodeParams fp{xconv, xdbl, X, dt_proj_, proj + E, 2 * E, A_.data,
                                  D_.data, dt_bias_.data, ssm_state, y, B, E, N, Rdt};
            if (be.mamba1_decode_fused(fp)) {
                project_out(be, io, y, E, out_proj_, d_model_, out_proj_b_.data);
                return;
            }
        }
        be.linear(dt_low, ld_dt, R, dt_proj_, E, nullptr, dt, E);
        SelectiveScanParams sp{};
        sp.x = xconv;
        sp.dt = dt;
        sp.Bm = bc;
        sp.Cm = c_->dt_bc_rms ? bc + R * N : bc + N;  // the normed C block, or C in xdbl
        sp.ld_bc = ld_bc;
        sp.z = proj + E;
        sp.ld_z = 2 * E;
        sp.A = A_.data;
        sp.D = D_.data;
        sp.dt_bias = dt_bias_.data;
        sp.y = y;
        sp.B = B;
        sp.L = L;
        sp.E = E;
        sp.N = N;
        set_ssm_state(sp, ssm_state, io.trace ? io.trace[1] : nullptr /* (B, L, E, N) */,
                      bf16_state_);
        be.selective_scan(sp);
        project_out(be, io, y, E, out_proj_, d_model_, out_proj_b_.data);
    }

 private:
    std::shared_ptr<const Config> c_;
    int64_t d_model_;
    bool bf16_state_;   // the ssm state is bf16 (option state_dtype)
    Weight in_proj_;    // (2E, d)
    Param in_proj_b_;   // (2E) [bias]
    Param conv_w_;      // (E, W)
    Param conv_b_;      // (E) [conv_bias]
    Weight x_proj_;     // (Rdt + 2N, E)
    Weight dt_proj_;    // (E, Rdt)
    Param dt_bias_;     // (E)
    Param A_;           // (E, N) = -exp(A_log)
    Param D_;           // (E)
    Weight out_proj_;   // (d, E)
    Param out_proj_b_;  // (d) [bias]
    Param dt_norm_w_;   // (Rdt) [dt_bc_rms_weight]
    Param b_norm_w_;    // (N) [dt_bc_rms_weight]
    Param c_norm_w_;    // (N) [dt_bc_rms_weight]
};

std::unique_ptr<Layer> create(std::shared_ptr<const LayerConfig> c, const ModelConfig& m) {
    return std::make_unique<Mamba1>(std::static_pointer_cast<const Config>(std::move(c)), m);
}

}  // namespace

LayerUnit unit() { return LayerUnit{"mamba1", &parse, &create, /*flat_form=*/true}; }

}  // namespace mamba1
}  // namespace mambart

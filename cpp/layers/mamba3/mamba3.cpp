// The Mamba-3 layer unit.
//
//   [z | x | B | C | dd_dt | dd_A | trap | angles] = in_proj(u);
//   y = mamba3_scan(...) (trapezoidal recurrence with rotary q/k, D skip, gate, MIMO sum);
//   out = out_proj(y)
//
// config.json `layers` entry: {"type": "mamba3", "d_inner": E, "d_state": N, "headdim": P,
// "nheads": H, "ngroups": G, "is_mimo": bool, "mimo_rank": Rm, "rope_fraction": 0.5 | 1.0,
// "chunk_size": Q, "is_outproj_norm": bool, "a_activation": "heavy_tail" | "softplus",
// "a_floor": float}. SISO is is_mimo = false with mimo_rank 1.
// State per sequence: angle (H, S), ssm (H, P, N), k (Rm, H, N) the last rotated k, v (H, P)
// the last x; S = floor(N * rope_fraction) rounded down to even, halved.
#include "layers/mamba3/mamba3.h"

#include <algorithm>
#include <nlohmann/json.hpp>

#include "config_reader.h"

namespace mambart {
namespace mamba3 {
namespace {

constexpr float kEps = 1e-5f;  // the B/C norms and the per-head output norm (fixed in mamba_ssm)

struct Config final : LayerConfig {
    int64_t d_inner = 0;     // E = H * P
    int64_t d_state = 0;     // N
    int64_t headdim = 0;     // P
    int64_t nheads = 0;      // H
    int64_t ngroups = 1;     // G (B/C groups)
    bool is_mimo = false;
    int64_t mimo_rank = 1;   // Rm (1 for SISO)
    double rope_fraction = 0.5;
    int64_t chunk_size = 64; // Q, recorded (the chunked scans run 64 / Rm tokens: exact for any)
    bool is_outproj_norm = false;
    bool softplus_a = false; // a_activation "softplus" (checkpoints before 2026-06-02)
    double a_floor = 1e-4;

    int64_t S() const {  // rotated pairs
        int64_t split = int64_t(double(d_state) * rope_fraction);
        split -= split % 2;
        return split / 2;
    }
    int64_t d_in_proj() const {
        return 2 * d_inner + 2 * d_state * ngroups * mimo_rank + 3 * nheads + S();
    }

    const char* type() const override { return "mamba3"; }
    std::vector<TensorSpec> tensors(const ModelConfig& m) const override {
        const int64_t d = m.d_model, E = d_inner, H = nheads, N = d_state, P = headdim,
                      Rm = mimo_rank;
        std::vector<TensorSpec> t;
        t.push_back({"mixer.in_proj.weight", {d_in_proj(), d}, true, false});
        t.push_back({"mixer.dt_bias", {H}, false, false, true});
        t.push_back({"mixer.B_bias", {H, Rm, N}, false, false, true});
        t.push_back({"mixer.C_bias", {H, Rm, N}, false, false, true});
        t.push_back({"mixer.B_norm.weight", {N}, false, false});
        t.push_back({"mixer.C_norm.weight", {N}, false, false});
        t.push_back({"mixer.D", {H}, false, false, true});
        if (is_mimo) {
            t.push_back({"mixer.mimo_x", {H, Rm, P}, false, false, true});
            t.push_back({"mixer.mimo_z", {H, Rm, P}, false, false, true});
            t.push_back({"mixer.mimo_o", {H, Rm, P}, false, false, true});
        }
        if (is_outproj_norm) t.push_back({"mixer.norm.weight", {E}, false, false});
        t.push_back({"mixer.out_proj.weight", {d, E}, true, false});
        return t;
    }
    std::vector<StateSpec> state(const ModelConfig&) const override {
        return {{"angle", {nheads, S()}},
                {"ssm", {nheads, headdim, d_state}},
                {"k", {mimo_rank, nheads, d_state}},
                {"v", {nheads, headdim}}};
    }
    // Its states stay fp32: no bf16 form of the Mamba-3 scan yet (option state_dtype).
    bool supports_bf16_state() const override { return false; }
    std::string to_json() const override {
        return nlohmann::ordered_json{{"type", type()},
                                      {"d_inner", d_inner},
                                      {"d_state", d_state},
                                      {"headdim", headdim},
                                      {"nheads", nheads},
                                      {"ngroups", ngroups},
                                      {"is_mimo", is_mimo},
                                      {"mimo_rank", mimo_rank},
                                      {"rope_fraction", rope_fraction},
                                      {"chunk_size", chunk_size},
                                      {"is_outproj_norm", is_outproj_norm},
                                      {"a_activation", softplus_a ? "softplus" : "heavy_tail"},
                                      {"a_floor", a_floor}}
            .dump();
    }
};

std::shared_ptr<const LayerConfig> parse(ConfigReader& r, const ModelConfig&) {
    auto c = std::make_shared<Config>();
    c->d_inner = r.integer("d_inner", 1, kMaxDim);
    c->d_state = r.integer("d_state", 1, 4096);
    c->headdim = r.integer("headdim", 1, kMaxDim);
    c->nheads = r.integer("nheads", 1, kMaxDim);
    c->ngroups = r.integer("ngroups", 1, kMaxDim);
    c->is_mimo = r.boolean("is_mimo");
    c->mimo_rank = r.integer("mimo_rank", 1, 64);
    c->rope_fraction = r.number("rope_fraction");
    c->chunk_size = r.integer("chunk_size", 1, 1 << 16);
    c->is_outproj_norm = r.boolean("is_outproj_norm");
    const std::string act = r.string("a_activation");
    if (act == "softplus") c->softplus_a = true;
    else if (act != "heavy_tail")
        r.fail("a_activation", str_cat("= '", act, "' is not supported (heavy_tail, softplus)"));
    c->a_floor = r.number("a_floor");
    if (!(c->a_floor > 0.0 && c->a_floor < 1.0)) r.fail("a_floor", "must be in (0, 1)");
    if (c->nheads * c->headdim != c->d_inner)
        r.fail("nheads", str_cat("x headdim (", c->nheads, " x ", c->headdim,
                                 ") must equal d_inner (", c->d_inner, ")"));
    if (c->nheads % c->ngroups != 0)
        r.fail("ngroups", str_cat("= ", c->ngroups, " must divide nheads = ", c->nheads));
    if (!c->is_mimo && c->mimo_rank != 1)
        r.fail("mimo_rank", str_cat("= ", c->mimo_rank, " must be 1 when is_mimo is false"));
    if (c->rope_fraction != 0.5 && c->rope_fraction != 1.0)
        r.fail("rope_fraction", str_cat("= ", c->rope_fraction, " is not supported (0.5, 1.0)"));
    if (c->d_state % 2 != 0) r.fail("d_state", "must be even (rotary pairs)");
    if (c->S() < 1) r.fail("d_state", "is too small for any rotary pair at this rope_fraction");
    // The CPU kernel keeps a token's q, k and per-rank rows on the stack.
    if (c->d_state > 256 || c->headdim > 256 || c->mimo_rank > 8)
        throw Unsupported(str_cat(r.origin(), ": mamba3 with d_state ", c->d_state, ", headdim ",
                                  c->headdim, ", mimo_rank ", c->mimo_rank,
                                  " is not supported (at most 256, 256, 8)"));
    return c;
}

class Mamba3 final : public Layer {
 public:
    Mamba3(std::shared_ptr<const Config> c, const ModelConfig& m)
        : c_(std::move(c)), d_model_(m.d_model) {}

    const LayerConfig& config() const override { return *c_; }

    void bind(const LayerTensors& t) override {
        in_proj_ = t.matrix("mixer.in_proj.weight");
        dt_bias_ = t.param("mixer.dt_bias");
        B_bias_ = t.param("mixer.B_bias");
        C_bias_ = t.param("mixer.C_bias");
        B_norm_ = t.param("mixer.B_norm.weight");
        C_norm_ = t.param("mixer.C_norm.weight");
        D_ = t.param("mixer.D");
        if (c_->is_mimo) {
            mimo_x_ = t.param("mixer.mimo_x");
            mimo_z_ = t.param("mixer.mimo_z");
            mimo_o_ = t.param("mixer.mimo_o");
        }
        if (c_->is_outproj_norm) norm_w_ = t.param("mixer.norm.weight");
        out_proj_ = t.matrix("mixer.out_proj.weight");
    }

    // proj (R, Din): in_proj output; y (R, E): the scan's gated output.
    std::vector<int64_t> workspace_cols() const override {
        return {c_->d_in_proj(), c_->d_inner};
    }
    int64_t max_linear_cols() const override { return std::max(d_model_, c_->d_inner); }
    bool takes_fused_projections() const override { return true; }

    void forward(Backend& be, const LayerIO& io) override {
        const Config& c = *c_;
        const int64_t E = c.d_inner, Din = c.d_in_proj();  // R = io.B * io.L token rows
        float* proj = io.ws[0];  // (R, Din)
        float* y = io.ws[1];     // (R, E)
        project_in(be, io, d_model_, in_proj_, Din, nullptr, proj, Din);
        Mamba3ScanParams p{};
        p.proj = proj;
        p.ld_proj = Din;
        p.dt_bias = dt_bias_.data;
        p.B_bias = B_bias_.data;
        p.C_bias = C_bias_.data;
        p.B_norm_w = B_norm_.data;
        p.C_norm_w = C_norm_.data;
        p.D = D_.data;
        p.mimo_x = mimo_x_.data;
        p.mimo_z = mimo_z_.data;
        p.mimo_o = mimo_o_.data;
        p.norm_w = norm_w_.data;
        p.angle_state = io.state[0];
        p.ssm_state = io.state[1];
        p.k_state = io.state[2];
        p.v_state = io.state[3];
        p.y = y;
        p.B = io.B;
        p.L = io.L;
        p.H = c.nheads;
        p.P = c.headdim;
        p.N = c.d_state;
        p.G = c.ngroups;
        p.Rm = c.mimo_rank;
        p.S = c.S();
        p.halved = c.is_mimo;  // the module rotates MIMO halved, SISO pairwise (spec 4.5)
        p.softplus_a = c.softplus_a;
        p.a_floor = float(c.a_floor);
        p.eps = kEps;
        be.mamba3_scan(p);
        project_out(be, io, y, E, out_proj_, d_model_, nullptr);
    }

 private:
    std::shared_ptr<const Config> c_;
    int64_t d_model_;
    Weight in_proj_;             // (Din, d)
    Param dt_bias_;              // (H)
    Param B_bias_, C_bias_;      // (H, Rm, N)
    Param B_norm_, C_norm_;      // (N)
    Param D_;                    // (H)
    Param mimo_x_, mimo_z_, mimo_o_;  // (H, Rm, P) [is_mimo]
    Param norm_w_;               // (E) [is_outproj_norm]
    Weight out_proj_;            // (d, E)
};

std::unique_ptr<Layer> create(std::shared_ptr<const LayerConfig> c, const ModelConfig& m) {
    return std::make_unique<Mamba3>(std::static_pointer_cast<const Config>(std::move(c)), m);
}

}  // namespace

LayerUnit unit() { return LayerUnit{"mamba3", &parse, &create, /*flat_form=*/false}; }

}  // namespace mamba3
}  // namespace mambart

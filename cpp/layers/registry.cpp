#include "layers/registry.h"

#include <cstring>

#include "error.h"
#include "layers/attention/attention.h"
#include "layers/mamba1/mamba1.h"
#include "layers/mamba2/mamba2.h"
#include "layers/mamba3/mamba3.h"
#include "layers/mlp/mlp.h"
#include "layers/moe/moe.h"
#include "layers/zamba2/zamba2.h"

namespace mambart {
namespace {

// One line per layer type.
const LayerUnit kUnits[] = {
    mamba1::unit(),
    mamba2::unit(),
    mamba3::unit(),
    attention::unit(),
    mlp::unit(),
    moe::unit(),
    zamba2::unit(),
};

const LayerUnit* find(const std::string& type) {
    for (const LayerUnit& u : kUnits)
        if (type == u.type) return &u;
    return nullptr;
}

class Registry final : public LayerTypes {
 public:
    bool known(const std::string& type) const override { return find(type) != nullptr; }
    std::string names() const override {
        std::string out;
        for (const LayerUnit& u : kUnits) out += (out.empty() ? "" : ", ") + std::string(u.type);
        return out;
    }
    bool flat(const std::string& type) const override {
        const LayerUnit* u = find(type);
        return u && u->flat_form;
    }
    std::string flat_names() const override {
        std::string out;
        for (const LayerUnit& u : kUnits)
            if (u.flat_form) out += (out.empty() ? "" : ", ") + std::string(u.type);
        return out;
    }
    std::shared_ptr<const LayerConfig> parse(const std::string& type, ConfigReader& r,
                                             const ModelConfig& m) const override {
        const LayerUnit* u = find(type);
        if (!u) throw ModelLoadError(str_cat("unknown layer type '", type, "' (", names(), ")"));
        return u->parse(r, m);
    }
};

}  // namespace

const LayerTypes& layer_types() {
    static const Registry r;
    return r;
}

std::unique_ptr<Layer> create_layer(const std::shared_ptr<const LayerConfig>& c,
                                    const ModelConfig& m) {
    const LayerUnit* u = find(c->type());
    if (!u) throw ModelLoadError(str_cat("unknown layer type '", c->type(), "'"));
    return u->create(c, m);
}

}  // namespace mambart
